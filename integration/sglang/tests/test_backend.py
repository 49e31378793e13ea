"""The backend driven with SGLang's own ForwardBatch, pools, allocator and release path on CPU:
equal to ``torch_native`` when nothing is evicted, equal to the dense Rust-core reference when it
evicts (with and without ``protect_prompt``), and every token slot either free exactly once or held by
exactly one live request, the protected prompt's until its request ends."""

import random

import pytest
import torch
from reference import RequestRef
from rig import Rig

import foresightkv
from foresightkv.engine import EngineConfig, request_rng_key
from foresightkv_sglang.backend import ForesightKVAttnBackend
from foresightkv_sglang.ledger import ledger_for, ledger_key


def _backend(rig, config, checkpoint=None):
    return ForesightKVAttnBackend(rig.runner, config, checkpoint=checkpoint)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_budget_above_every_length_equals_torch_native(server_args, seed, dtype, monkeypatch):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.model_executor.model_runner_components.attention_backend_setup import (
        _build_full_attention_backend_from_str,
    )

    ours, theirs = Rig(server_args, seed=seed, dtype=dtype), Rig(server_args, seed=seed, dtype=dtype)
    monkeypatch.setenv("FORESIGHTKV_CONFIG", '{"budget": 200, "interval": 8, "policy": "h2o"}')
    # built the way SGLang's ModelRunner builds a backend from --attention-backend
    fkv = _build_full_attention_backend_from_str(
        model_runner=ours.runner, backend_str="foresightkv", init_new_workspace=False
    )
    assert isinstance(fkv, ForesightKVAttnBackend)
    native = TorchNativeAttnBackend(theirs.runner)
    rng = random.Random(seed)
    lens = [rng.randint(2, 24) for _ in range(3)]
    reqs = [[r.add(f"r{i}", n) for i, n in enumerate(lens)] for r in (ours, theirs)]
    steps = [("extend", lens)] + [("decode", None)] * 6
    late = rng.randint(3, 30)
    steps.insert(3, ("late", [late]))
    for kind, new in steps:
        outs = []
        for rig, rs in zip((ours, theirs), reqs):
            if kind == "late":
                rs.append(rig.add("late", late))
                batch = rig.batch([rs[-1]], new)
            elif kind == "extend":
                batch = rig.batch(rs, new)
            else:
                batch = rig.batch(rs, [1] * len(rs))
            outs.append(rig.run(fkv if rig is ours else native, batch))
        for a, b in zip(*outs):
            if kind == "decode":
                tol = 1e-5 if dtype == torch.float32 else 1.6e-2
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            else:
                assert torch.equal(a, b)
    assert ours.alloc.available_size() == theirs.alloc.available_size()
    assert fkv.freed_slots == 0


class Scenario:
    """Runs requests through the backend and the dense reference side by side, checking outputs,
    cache contents and slot accounting after every step and every release."""

    def __init__(self, server_args, config, checkpoint=None, seed=0):
        self.rig = Rig(server_args, size=256, rows=8, max_ctx=128, seed=seed)
        self.backend = _backend(self.rig, config, checkpoint)
        self.policy = self.backend.engine.policy
        self.config = config
        self.live = {}
        self.refs = {}
        self.evictions = 0

    def add(self, name, prompt):
        """A request whose prompt (what SGLang prefills: all its chunks) has ``prompt`` tokens."""
        self.live[name] = self.rig.add(name, prompt)
        self.refs[name] = RequestRef(
            self.rig.stream(name),
            request_rng_key(name),
            budget=self.config.budget,
            interval=self.config.interval,
            policy=self.policy,
            num_layers=self.rig.num_layers,
            hq=self.rig.hq,
            h=self.rig.h,
            scale=self.rig.scale,
            protect_prompt=self.config.protect_prompt,
            prompt_len=prompt,
        )

    def step(self, names, new):
        reqs = [self.live[n] for n in names]
        fb = self.rig.batch(reqs, new)
        decode = fb.forward_mode.is_decode()
        outs = self.rig.run(self.backend, fb)
        offset = 0
        for name, n in zip(names, new):
            ref = self.refs[name].step(n, prefill=not decode)
            for layer in range(self.rig.num_layers):
                torch.testing.assert_close(outs[layer][offset : offset + n].float(), ref[layer], rtol=2e-5, atol=2e-5)
            offset += n
        self.check_cache()
        self.check_slots()

    def key(self, name):
        return ledger_key(self.rig.rtp, self.live[name].req.kv.req_pool_idx)

    def check_cache(self):
        """Each (layer, KV head)'s live slots hold exactly the reference's kept tokens, in order, and
        the protected prompt's slots its own tokens, untouched."""
        eng = self.backend.engine
        for name, lv in self.live.items():
            key = self.key(name)
            pending = eng.pending_live_start(key)
            start = eng.live_start(key) if pending is None else pending
            ref = self.refs[name]
            assert start == ref.live_start
            assert eng.protected_len(key) == ref.protected_len
            prompt = min(ref.protected_len, lv.length)
            base = max(start, prompt)
            row = self.rig.rtp.req_to_token[lv.req.kv.req_pool_idx]
            slots, prompt_slots = row[base : lv.length].long(), row[:prompt].long()
            for layer in range(self.rig.num_layers):
                kb = self.rig.kv.get_key_buffer(layer)
                vb = self.rig.kv.get_value_buffer(layer)
                assert torch.equal(kb[prompt_slots], lv.stream.k[layer, :prompt])
                assert torch.equal(vb[prompt_slots], lv.stream.v[layer, :prompt])
                kept_all = eng.kept_positions(key, layer, self.rig.h)
                for kh in range(self.rig.h):
                    kept = torch.tensor(ref.layers[layer].kept[kh], dtype=torch.int64)
                    assert torch.equal(kept_all[kh], torch.cat([torch.arange(prompt), kept]))
                    assert torch.equal(kb[slots, kh], lv.stream.k[layer, kept, kh])
                    assert torch.equal(vb[slots, kh], lv.stream.v[layer, kept, kh])

    def check_slots(self):
        """No slot is free twice; free slots and the slots live requests hold partition the pool;
        foresightkv returned exactly the slots between the protected prompt (if any) and each
        committed live_start, never a prompt slot."""
        free = self.rig.free_slots()
        assert len(free) == len(set(free)), "a slot was freed twice"
        held = []
        for name, lv in self.live.items():
            key = self.key(name)
            eng = self.backend.engine
            start, prompt = eng.live_start(key), eng.protected_len(key)
            taken = ledger_for(self.rig.rtp).taken(key)
            assert taken == ([(prompt, start)] if start > prompt else [])
            row = self.rig.rtp.req_to_token[lv.req.kv.req_pool_idx]
            assert set(free).isdisjoint(row[: min(prompt, lv.length)].tolist()), "a prompt slot was freed"
            held += row[: min(prompt, lv.length)].tolist() + row[max(start, prompt) : lv.length].tolist()
        assert len(held) == len(set(held))
        assert set(free).isdisjoint(held)
        assert set(free) | set(held) == set(range(1, self.rig.size + 1)), "a slot leaked"

    def pending(self, name):
        return self.backend.engine.pending_live_start(self.key(name)) is not None

    def finish(self, name):
        self.rig.finish(self.live.pop(name))
        self.refs.pop(name)
        self.check_slots()

    def retract(self, name):
        lv = self.live.pop(name)
        length = lv.length
        self.rig.retract(lv)
        self.refs.pop(name)
        self.check_slots()
        return length


def _policies(tmp_path_factory):
    ck = foresightkv.ScorerCheckpoint.random(2, 2, 2, 64, 8, 4, seed=11)
    path = tmp_path_factory.mktemp("scorer") / "ck"
    ck.save(path)
    return {
        "h2o": (EngineConfig(budget=8, interval=4, policy="h2o"), None),
        "tova": (EngineConfig(budget=8, interval=4, policy="tova"), None),
        "streaming_llm": (EngineConfig(budget=8, interval=4, policy="streaming_llm", sinks=2), None),
        "random": (EngineConfig(budget=8, interval=4, policy="random", seed=5), None),
        "foresight_sample": (
            EngineConfig(budget=8, interval=4, policy="foresight", checkpoint=str(path), seed=7),
            None,
        ),
        "foresight_topl_kernels": (
            EngineConfig(budget=8, interval=4, policy="foresight", checkpoint=str(path), sample=False),
            None,
        ),
        "h2o_protect": (EngineConfig(budget=8, interval=4, policy="h2o", protect_prompt=True), None),
        "snapkv_protect": (EngineConfig(budget=8, interval=4, policy="snapkv", protect_prompt=True), None),
        "foresight_sample_protect": (
            EngineConfig(budget=8, interval=4, policy="foresight", checkpoint=str(path), seed=7, protect_prompt=True),
            None,
        ),
        "foresight_topl_kernels_protect": (
            EngineConfig(
                budget=8, interval=4, policy="foresight", checkpoint=str(path), sample=False, protect_prompt=True
            ),
            None,
        ),
    }


@pytest.mark.parametrize(
    "policy",
    [
        "h2o",
        "tova",
        "streaming_llm",
        "random",
        "foresight_sample",
        "foresight_topl_kernels",
        "h2o_protect",
        "snapkv_protect",
        "foresight_sample_protect",
        "foresight_topl_kernels_protect",
    ],
)
@pytest.mark.parametrize("seed", [0, 3])
def test_eviction_matches_the_dense_reference_and_returns_every_slot_once(server_args, tmp_path_factory, policy, seed):
    config, checkpoint = _policies(tmp_path_factory)[policy]
    sc = Scenario(server_args, config, checkpoint, seed=seed)
    rng = random.Random(seed)
    first = [rng.randint(2, 7), rng.randint(9, 20), rng.randint(9, 14)]
    second = rng.randint(2, 10)
    for name, n in zip("abc", first[:2] + [first[2] + second]):
        sc.add(name, n)
    sc.step(["a", "b", "c"], first)
    sc.step(["c"], [second])
    finished = retracted = False
    for i in range(26):
        names = sorted(sc.live)
        sc.step(names, [1] * len(names))
        if not finished and "b" in sc.live and sc.pending("b"):
            sc.finish("b")
            finished = True
        elif i == 9:
            # SGLang recomputes the prompt and the generated tokens; the prompt stays the prompt
            length = sc.retract("c")
            sc.add("c", first[2] + second)
            sc.step(["c"], [length])
            retracted = True
        if i == 5:
            n = rng.randint(2, 30)
            sc.add("d", n)
            sc.step(["d"], [n])
    assert finished and retracted
    assert sc.backend.freed_slots > 0
    for name in sorted(sc.live):
        sc.finish(name)
    free = sc.rig.free_slots()
    assert sorted(free) == list(range(1, sc.rig.size + 1))

"""The metadata builder and impl driven with vLLM's own ``CommonAttentionMetadata`` and KV caches made
by vLLM's own ``create_kv_cache_views`` for the customized spec in the layout the backend pins, on
CPU tensors, over many steps of mixed batches (chunked prefills, decodes, finished requests whose
``req_idx`` and blocks are reused, preemption by recompute): the outputs and each (layer, KV head)'s
kept entries equal a step-by-step dense reference of the same policy through the Rust core
(``reference.RequestRef``), which without eviction is plain dense causal attention. Blocks before
each live window (which vLLM frees and may hand to other requests) are poisoned with NaN, so reading
one would show."""

import math
import random
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference import RequestRef

from foresightkv.engine import EngineConfig

H, HQ, D, BS, LAYERS, NUM_BLOCKS, MAX_LEN = 2, 4, 64, 16, 2, 160, 160


@dataclass
class Stream:
    """A request's queries and K/V for every position and layer (what the model would produce)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def _setup(make_vllm_config, fkv, dtype, **engine_args):
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from foresightkv_vllm.backend import ForesightKVBackend

    cfg = make_vllm_config(fkv, dtype=str(dtype).replace("torch.", ""), **engine_args)
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=dtype)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    with set_current_vllm_config(cfg):
        builder = ForesightKVBackend.get_builder_cls()(spec, names, cfg, torch.device("cpu"))
        impl = ForesightKVBackend.get_impl_cls()(HQ, D, 1.0 / math.sqrt(D), H, None, None, "auto")
    layers = [SimpleNamespace(layer_name=n) for n in names]
    return builder, impl, layers, _vllm_kv_caches(ForesightKVBackend.customize_spec(spec), names)


def _vllm_kv_caches(spec, names):
    """The per-layer caches exactly as vLLM's worker makes them for ``spec``: one flat int8 buffer,
    layer-compact, viewed by ``create_kv_cache_views`` in the layout the backend pins."""
    from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views

    from foresightkv_vllm.backend import ForesightKVBackend

    (layout,) = ForesightKVBackend.supported_kv_cache_layouts()
    page = spec.page_size_bytes
    tensor = KVCacheTensor(
        size=page * NUM_BLOCKS * len(names), layers=names, layer_stride=page * NUM_BLOCKS, block_stride=page
    )
    raw = torch.zeros(tensor.size, dtype=torch.int8)
    return create_kv_cache_views(raw, spec, NUM_BLOCKS, layout, tensor)


def _ref_step(ref, a, b, prefill, orig):
    """The reference's outputs for positions ``[a, b)``; in protect mode (``orig``, the original prompt
    length) the prompt tokens are exactly those before ``orig``, a chunk crossing it taken in two."""
    if orig is None:
        return ref.step(b - a, prefill)
    if a < orig < b:
        first, rest = ref.step(orig - a, True), ref.step(b - orig, False)
        return [torch.cat([x, y]) for x, y in zip(first, rest)]
    return ref.step(b - a, b <= orig)


def _run(make_vllm_config, fkv, seed, steps, max_chunk, dtype=torch.float32):
    """Runs ``steps`` forward steps of random mixed batches through the builder and impl and the dense
    reference side by side; returns (max |out - reference|, longest evictable window after a step's
    eviction, number of evictions seen, number of preemptions, number of resumed chunks crossing the
    original prompt). In protect mode the model config carries the R-SWA window and each step vLLM's
    ``rswa_prefix_lens`` (the original prompt lengths, also of resumed requests)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    protect = bool(fkv.get("protect_prompt"))
    extra = {"hf_overrides": {"rswa_window": fkv["budget"] + fkv["interval"]}} if protect else {}
    builder, impl, layers, caches = _setup(make_vllm_config, fkv, dtype, **extra)
    engine = builder.engine
    policy = EngineConfig.from_dict(fkv, block_size=BS).build_policy()
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    reqs = {}
    serial = 0
    worst, longest, evictions, preemptions, crossings = 0.0, 0, 0, 0, 0
    for _ in range(steps):
        # finish a request now and then (vLLM reuses its req_idx and blocks), admit new ones
        if len(reqs) > 1 and rng.random() < 0.1:
            done = rng.choice(sorted(reqs))
            free.extend(reqs.pop(done)["blocks"])
        # preempt a decoding request now and then: vLLM frees its blocks and recomputes prompt and
        # generated tokens as one new prefill under the same req_idx
        decoding = sorted(i for i, r in reqs.items() if r["len"] >= r["prompt"])
        if decoding and rng.random() < 0.05:
            r = reqs[rng.choice(decoding)]
            free.extend(r["blocks"])
            r.update(blocks=[], prompt=r["len"], len=0)
            preemptions += 1
        if not reqs or (len(reqs) < 3 and rng.random() < 0.5):
            idx = min(set(range(8)) - set(reqs))
            stream = Stream(*(torch.randn(LAYERS, MAX_LEN, n, D, generator=gen).to(dtype) for n in (HQ, H, H)))
            prompt = rng.randint(2, 90)
            reqs[idx] = dict(len=0, blocks=[], prompt=prompt, orig=prompt, stream=stream, ref=None)
        for done in [i for i, r in reqs.items() if r["len"] == MAX_LEN]:
            free.extend(reqs.pop(done)["blocks"])
        order = sorted(reqs, key=lambda i: reqs[i]["len"] < reqs[i]["prompt"])  # decodes first, as vLLM
        qlens, prefilling = [], []
        for i in order:
            r = reqs[i]
            if r["len"] < r["prompt"]:
                q = min(rng.randint(1, max_chunk), r["prompt"] - r["len"], MAX_LEN - r["len"])
            else:
                q = 1
            if r["len"] == 0:
                r["ref"] = RequestRef(
                    r["stream"],
                    serial,
                    budget=fkv["budget"],
                    interval=fkv["interval"],
                    policy=policy,
                    num_layers=LAYERS,
                    hq=HQ,
                    h=H,
                    scale=impl.scale,
                    block_size=BS,
                    protect_prompt=protect,
                )
                serial += 1
            while len(r["blocks"]) * BS < r["len"] + q:
                r["blocks"].append(free.pop())
            qlens.append(q)
            prefilling.append(r["len"] < r["prompt"])
        width = max(len(reqs[i]["blocks"]) for i in order)
        table = torch.zeros(len(order), width, dtype=torch.int32)
        slots, seq_lens = [], []
        for row, i in enumerate(order):
            r = reqs[i]
            table[row, : len(r["blocks"])] = torch.tensor(r["blocks"], dtype=torch.int32)
            slots += [r["blocks"][p // BS] * BS + p % BS for p in range(r["len"], r["len"] + qlens[row])]
            seq_lens.append(r["len"] + qlens[row])
        qsl = torch.tensor([0] + list(np.cumsum(qlens)), dtype=torch.int32)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl,
            query_start_loc_cpu=qsl,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            num_reqs=len(order),
            num_actual_tokens=int(qsl[-1]),
            max_query_len=max(qlens),
            max_seq_len=max(seq_lens),
            block_table_tensor=table,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            is_prefilling=torch.tensor(prefilling),
            req_idx=np.array(order, dtype=np.int32),
            rswa_prefix_lens=torch.tensor([reqs[i]["orig"] for i in order], dtype=torch.int32) if protect else None,
        )
        meta = builder.build(0, cm)
        for row, i in enumerate(order):
            r = reqs[i]
            crossings += protect and r["len"] < r["orig"] < seq_lens[row] and r["prompt"] > r["orig"]
            for b in r["blocks"][engine.protected_len(i) // BS : engine.live_start(i) // BS]:
                for c in caches:
                    c[b] = float("nan")
        outs = []
        for layer in range(LAYERS):
            parts = [(reqs[i]["stream"], reqs[i]["len"], reqs[i]["len"] + qlens[row]) for row, i in enumerate(order)]
            q = torch.cat([s.q[layer, a:b] for s, a, b in parts]).reshape(-1, HQ * D)
            k = torch.cat([s.k[layer, a:b] for s, a, b in parts])
            v = torch.cat([s.v[layer, a:b] for s, a, b in parts])
            out = torch.zeros_like(q)
            impl.do_kv_cache_update(layers[layer], k, v, caches[layer], cm.slot_mapping)
            impl.forward(layers[layer], q, k, v, caches[layer], meta, out)
            outs.append(out.view(-1, HQ, D))
        for row, i in enumerate(order):
            r = reqs[i]
            a, b = int(qsl[row]), int(qsl[row + 1])
            ref_outs = _ref_step(r["ref"], r["len"], seq_lens[row], prefilling[row], r["orig"] if protect else None)
            for layer in range(LAYERS):
                got = outs[layer][a:b]
                assert torch.isfinite(got).all(), "the backend read a block before a live window"
                worst = max(worst, (got.float() - ref_outs[layer]).abs().max().item())
                ref_kept = r["ref"].layers[layer].kept
                if engine.protected_len(i) > seq_lens[row]:
                    # inside the protected prompt's last block nothing is evictable yet (the engine's
                    # kept_positions cannot be asked there: it builds arange(protected_len, length))
                    assert ref_kept == [[] for _ in range(H)]
                    continue
                prompt = list(range(engine.protected_len(i)))
                kept = engine.kept_positions(i, layer, H)
                assert kept.tolist() == [prompt + k for k in ref_kept], f"request {i} layer {layer} kept other entries"
            after = engine.pending_live_start(i)
            if after is not None:
                evictions += 1
                assert after == r["ref"].live_start
            r["len"] = seq_lens[row]
            start = engine.live_start(i) if after is None else after
            longest = max(longest, r["len"] - max(start, engine.protected_len(i)))
    return worst, longest, evictions, preemptions, crossings


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("seed", [1, 2])
def test_without_eviction_equals_dense_causal_attention(make_vllm_config, seed, dtype, tol):
    fkv = {"budget": 1024, "interval": 16, "policy": "h2o"}
    worst, longest, evictions, _, _ = _run(make_vllm_config, fkv, seed, 30, 40, dtype)
    assert worst < tol
    assert evictions == 0


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """A scorer checkpoint of the test model's shape (2 layers, 2 KV heads, group 2, head size 64)."""
    from foresightkv import ScorerCheckpoint

    path = tmp_path_factory.mktemp("scorer") / "scorer"
    ScorerCheckpoint.random(LAYERS, H, HQ // H, D, 32, 16, seed=5).save(path)
    return str(path)


@pytest.mark.parametrize(
    "policy", ["h2o", "tova", "snapkv", "streaming_llm", "random", "foresight_sample", "foresight_topl_kernels"]
)
@pytest.mark.parametrize("seed", [3, 4])
def test_with_eviction_equals_the_dense_reference_of_the_same_policy(make_vllm_config, scorer_dir, policy, seed):
    fkv = {"budget": 32, "interval": 16, "policy": policy}
    if policy.startswith("foresight"):
        fkv = {**fkv, "policy": "foresight", "checkpoint": scorer_dir, "sample": policy == "foresight_sample"}
    worst, longest, evictions, preemptions, _ = _run(make_vllm_config, fkv, seed, 60, 24)
    assert evictions > 0, "no eviction happened"
    assert preemptions > 0, "no request was preempted"
    assert worst < 1e-4
    # after each step's eviction the live window holds fewer than the W = B + L tokens vLLM's
    # sliding-window manager keeps, so the manager never frees a live block
    assert longest <= 32 + 16 - 1


@pytest.mark.parametrize("seed", [1, 2])
def test_protect_mode_without_eviction_equals_dense_causal_attention(make_vllm_config, seed):
    fkv = {"budget": 1024, "interval": 16, "policy": "h2o", "protect_prompt": True}
    worst, _, evictions, _, _ = _run(make_vllm_config, fkv, seed, 30, 40)
    assert worst < 1e-5
    assert evictions == 0


@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv", "foresight_sample"])
@pytest.mark.parametrize("seed", [4, 5])
def test_protect_mode_equals_the_dense_reference_over_prompt_and_survivors(make_vllm_config, scorer_dir, policy, seed):
    """Protect mode with preemption: the original prompt (rounded up to a block) stays whole, also when
    a resumed request re-prefills prompt and generated tokens, and outputs and kept entries equal the
    dense reference over (prompt ∪ survivors); blocks between the prompt and each live window are
    poisoned."""
    fkv = {"budget": 32, "interval": 16, "policy": policy, "protect_prompt": True}
    if policy.startswith("foresight"):
        fkv = {**fkv, "policy": "foresight", "checkpoint": scorer_dir, "sample": True}
    worst, longest, evictions, preemptions, crossings = _run(make_vllm_config, fkv, seed, 120, 24)
    assert evictions > 0, "no eviction happened"
    assert preemptions > 0, "no request was preempted"
    assert crossings > 0, "no resumed prefill chunk crossed the original prompt"
    assert worst < 1e-4
    # the evictable window stays under W = B + L, so vLLM's RSWAManager never frees a block it reads
    assert longest <= 32 + 16 - 1

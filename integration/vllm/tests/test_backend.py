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
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    # vLLM's order: the layers' impls (model construction), then the customized spec, then the
    # builders of the KV cache group over it
    with set_current_vllm_config(cfg):
        impl = ForesightKVBackend.get_impl_cls()(HQ, D, 1.0 / math.sqrt(D), H, None, None, "auto")
    spec = ForesightKVBackend.customize_spec(FullAttentionSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=dtype))
    with set_current_vllm_config(cfg):
        builder = ForesightKVBackend.get_builder_cls()(spec, names, cfg, torch.device("cpu"))
    layers = [SimpleNamespace(layer_name=n) for n in names]
    return builder, impl, layers, _vllm_kv_caches(spec, names)


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


def _dummy_metadata(runner, num_reqs, num_tokens, last_table):
    """A dummy batch's metadata as vLLM builds it: model runner V2 (``runner="v2"``) from
    ``InputBatch.make_dummy`` (``req_idx`` 0..n-1, ``seq_len == query_len``, not prefilling) with
    ``BlockTables.get_dummy_block_tables`` (zeroed rows) and ``get_dummy_slot_mappings`` (all
    ``PAD_SLOT_ID``); the V1 runner's ``_dummy_run`` (``runner="v1"``): the persistent batch's
    block table as it is (live requests' rows), slots filled with -1, ``seq_lens = query_len``, no
    ``req_idx``."""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    ib = InputBatch.make_dummy(num_reqs, num_tokens, InputBuffers(16, 256, torch.device("cpu")))
    qsl = torch.from_numpy(ib.query_start_loc_np.copy())
    width = max(last_table.shape[1], 1)
    if runner == "v2":
        table = torch.zeros(num_reqs, width, dtype=torch.int32)
        req_idx = ib.idx_mapping_np
    else:
        table = torch.zeros(num_reqs, width, dtype=torch.int32)
        rows = min(num_reqs, last_table.shape[0])
        table[:rows] = last_table[:rows]
        req_idx = None
    return CommonAttentionMetadata(
        query_start_loc=ib.query_start_loc,
        query_start_loc_cpu=qsl,
        seq_lens=ib.seq_lens,
        seq_lens_cpu_upper_bound=ib.seq_lens_cpu_upper_bound,
        num_reqs=num_reqs,
        num_actual_tokens=num_tokens,
        max_query_len=int(ib.num_scheduled_tokens.max()),
        max_seq_len=int(ib.seq_lens.max()),
        block_table_tensor=table,
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64),
        is_prefilling=torch.from_numpy(ib.is_prefilling_np),
        req_idx=req_idx,
        rswa_prefix_lens=ib.prompt_lens,
    )


def _metadata(blocks, starts, qlens, prefilling, **optional):
    """vLLM's ``CommonAttentionMetadata`` of one step: row ``i`` computes ``qlens[i]`` tokens from
    position ``starts[i]`` over the block ids ``blocks[i]`` (``BS`` tokens each), prefilling or not;
    ``optional``: its optional fields (``req_idx``, ``rswa_prefix_lens``)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    seq_lens = [a + q for a, q in zip(starts, qlens)]
    table = torch.zeros(len(blocks), max(len(row) for row in blocks), dtype=torch.int32)
    slots = []
    for i, row in enumerate(blocks):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        slots += [row[p // BS] * BS + p % BS for p in range(starts[i], seq_lens[i])]
    qsl = torch.tensor([0] + list(np.cumsum(qlens)), dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=len(blocks),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(qlens),
        max_seq_len=max(seq_lens),
        block_table_tensor=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        is_prefilling=torch.tensor(prefilling),
        **optional,
    )


def _run(
    make_vllm_config, fkv, seed, steps, max_chunk, dtype=torch.float32, with_req_idx=True, dummies=None, checks=None
):
    """Runs ``steps`` forward steps of random mixed batches through the builder and impl and the dense
    reference side by side; returns (max |out - reference|, longest evictable window after a step's
    eviction, number of evictions seen, number of preemptions, number of resumed chunks crossing the
    original prompt). In protect mode the model config carries the R-SWA window and each step vLLM's
    ``rswa_prefix_lens`` (the original prompt lengths, also of resumed requests). Outside protect mode
    a prompt (and a resumed re-prefill) comes in one step, as vLLM sends it with
    ``--no-enable-chunked-prefill``, which the plugin requires there. ``with_req_idx=False`` leaves
    ``req_idx`` out, as vLLM's V1 and CPU model runners do; keys come from ``RequestKeys`` either way.
    ``dummies`` ("v1" / "v2"): now and then a dummy batch of that runner between two steps (DP busy
    loop, warm-up), which must change no request's state and read nothing. ``checks(engine, builder,
    reqs, key)`` runs after every step."""
    from foresightkv_vllm.backend import VLLM_RNG_KEY

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    # the dummy batches draw from their own generators: the workload is the same with or without them
    drng, dgen = random.Random(seed + 1), torch.Generator().manual_seed(seed + 1)
    protect = bool(fkv.get("protect_prompt"))
    extra = {"hf_overrides": {"rswa_window": fkv["budget"] + fkv["interval"]}} if protect else {}
    builder, impl, layers, caches = _setup(make_vllm_config, fkv, dtype, **extra)
    engine = builder.engine
    policy = EngineConfig.from_dict(fkv, block_size=BS).build_policy()
    free = list(range(1, NUM_BLOCKS))  # block 0 is vLLM's null block
    rng.shuffle(free)
    reqs = {}
    worst, longest, evictions, preemptions, crossings, dummy_steps = 0.0, 0, 0, 0, 0, 0
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
                chunk = rng.randint(1, max_chunk) if protect else MAX_LEN
                q = min(chunk, r["prompt"] - r["len"], MAX_LEN - r["len"])
            else:
                q = 1
            if r["len"] == 0:
                r["ref"] = RequestRef(
                    r["stream"],
                    VLLM_RNG_KEY,
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
            while len(r["blocks"]) * BS < r["len"] + q:
                r["blocks"].append(free.pop())
            qlens.append(q)
            prefilling.append(r["len"] < r["prompt"])
        cm = _metadata(
            [reqs[i]["blocks"] for i in order],
            [reqs[i]["len"] for i in order],
            qlens,
            prefilling,
            req_idx=np.array(order, dtype=np.int32) if with_req_idx else None,
            rswa_prefix_lens=torch.tensor([reqs[i]["orig"] for i in order], dtype=torch.int32) if protect else None,
        )
        qsl, table = cm.query_start_loc, cm.block_table_tensor
        seq_lens = [reqs[i]["len"] + q for i, q in zip(order, qlens)]
        meta = builder.build(0, cm)
        # each request's engine key, found by the block of its last token (RequestKeys)
        key = {i: builder.keys.key_at(reqs[i]["blocks"][(seq_lens[row] - 1) // BS]) for row, i in enumerate(order)}
        assert None not in key.values() and len(set(key.values())) == len(key)
        for row, i in enumerate(order):
            r = reqs[i]
            crossings += protect and r["len"] < r["orig"] < seq_lens[row] and r["prompt"] > r["orig"]
            for b in r["blocks"][engine.protected_len(key[i]) // BS : engine.live_start(key[i]) // BS]:
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
                if engine.protected_len(key[i]) > seq_lens[row]:
                    # inside the protected prompt's last block nothing is evictable yet (the engine's
                    # kept_positions cannot be asked there: it builds arange(protected_len, length))
                    assert ref_kept == [[] for _ in range(H)]
                    continue
                prompt = list(range(engine.protected_len(key[i])))
                kept = engine.kept_positions(key[i], layer, H)
                assert kept.tolist() == [prompt + k for k in ref_kept], f"request {i} layer {layer} kept other entries"
            after = engine.pending_live_start(key[i])
            if after is not None:
                evictions += 1
                assert after == r["ref"].live_start
            r["len"] = seq_lens[row]
            start = engine.live_start(key[i]) if after is None else after
            longest = max(longest, r["len"] - max(start, engine.protected_len(key[i])))
        if checks is not None:
            checks(engine, builder, reqs, key)
        if dummies is not None and drng.random() < 0.3:
            before = {k: engine._planner.state(k) for k in engine.keys()}
            nd = drng.randint(1, 3)
            dcm = _dummy_metadata(dummies, nd, nd * drng.randint(1, 2), table)
            dmeta = builder.build(0, dcm)
            for layer in range(LAYERS):
                t = dcm.num_actual_tokens
                dq = torch.randn(t, HQ * D, generator=dgen).to(dtype)
                dk, dv = (torch.randn(t, H, D, generator=dgen).to(dtype) for _ in range(2))
                dout = torch.full_like(dq, float("nan"))
                impl.do_kv_cache_update(layers[layer], dk, dv, caches[layer], dcm.slot_mapping)
                impl.forward(layers[layer], dq, dk, dv, caches[layer], dmeta, dout)
                assert (dout == 0).all(), "a dummy row got attention output"
            assert {k: engine._planner.state(k) for k in engine.keys()} == before, "a dummy batch changed a request"
            dummy_steps += 1
    assert dummies is None or dummy_steps > 0
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


# ---------------------------------------------------------------------------------------------
# issue 15: the batches vLLM really sends, memory inside vLLM's budget, reproducible victims


@pytest.mark.parametrize("runner", ["v2", "v1"])
@pytest.mark.parametrize("protect", [False, True])
def test_dummy_batches_leave_every_live_request_alone(make_vllm_config, runner, protect):
    """Dummy batches between real steps (model runner V2's ``InputBatch.make_dummy`` with ``req_idx``
    0..n-1 and ``seq_len == query_len``; the V1 runner's ``_dummy_run`` over the live rows' block
    table, without ``req_idx``): no request's window changes, no output is produced for them, and the
    live requests keep matching the dense reference (reading a freed, poisoned block would show)."""
    fkv = {"budget": 32, "interval": 16, "policy": "h2o", "protect_prompt": protect}
    worst, _, evictions, _, _ = _run(
        make_vllm_config, fkv, 4, 120 if protect else 60, 24, with_req_idx=runner == "v2", dummies=runner
    )
    assert evictions > 0
    assert worst < 1e-4


@pytest.mark.parametrize("policy", ["h2o", "foresight_sample"])
def test_without_req_idx_as_the_v1_and_cpu_runners_send_it(make_vllm_config, scorer_dir, policy):
    """vLLM's V1 model runner (also the one vLLM uses on CPU) passes no ``req_idx`` and condenses its
    rows every step: the builder still finds every request's state, and outputs and kept entries
    equal the dense reference, with preemption and reuse of finished requests' blocks."""
    fkv = {"budget": 32, "interval": 16, "policy": policy}
    if policy.startswith("foresight"):
        fkv = {**fkv, "policy": "foresight", "checkpoint": scorer_dir, "sample": True}
    worst, _, evictions, preemptions, _ = _run(make_vllm_config, fkv, 3, 60, 24, with_req_idx=False)
    assert evictions > 0 and preemptions > 0
    assert worst < 1e-4


def test_statistics_live_in_vllm_pages_and_nothing_is_allocated_at_an_eviction(make_vllm_config):
    """The window statistics are views into vLLM's KV pages (allocated by vLLM at start-up, inside
    its budget): the engine allocates no statistics buffer of its own, not at the first eviction of
    any layer nor later, and results still equal the dense reference."""
    seen = []
    fkv = {"budget": 32, "interval": 16, "policy": "h2o"}
    worst, _, evictions, _, _ = _run(
        make_vllm_config, fkv, 3, 60, 24, checks=lambda engine, *_: seen.append(engine.stats_bytes())
    )
    assert evictions > 0 and worst < 1e-4
    assert max(seen) == 0


def _serve_one(builder, impl, layers, caches, stream, prompt, total, first_block, chunks=None, protect=False):
    """One request through the builder and impl as vLLM sends it: the prompt in one step (or in
    ``chunks``, chunked prefill), then one token per step, blocks ``first_block, first_block + 1,
    ...``; in protect mode with vLLM's ``rswa_prefix_lens``. Returns its key and the attention
    output of every position ``[total, layers, HQ, D]``."""
    n, key = 0, None
    blocks = []
    steps = list(chunks or [prompt]) + [1] * (total - prompt)
    outs = torch.zeros(total, LAYERS, HQ, D)
    for q in steps:
        while len(blocks) * BS < n + q:
            blocks.append(first_block + len(blocks))
        cm = _metadata(
            [blocks], [n], [q], [n < prompt], rswa_prefix_lens=torch.tensor([prompt], dtype=torch.int32) if protect else None
        )
        meta = builder.build(0, cm)
        for layer in range(LAYERS):
            query = stream.q[layer, n : n + q].reshape(q, HQ * D)
            k, v = stream.k[layer, n : n + q], stream.v[layer, n : n + q]
            out = torch.zeros_like(query)
            impl.do_kv_cache_update(layers[layer], k, v, caches[layer], cm.slot_mapping)
            impl.forward(layers[layer], query, k, v, caches[layer], meta, out)
            outs[n : n + q, layer] = out.view(q, HQ, D)
        n += q
        key = builder.keys.key_at(blocks[(n - 1) // BS])
    return key, outs


@pytest.mark.parametrize("policy", ["random", "foresight_sample"])
def test_victims_do_not_depend_on_what_the_engine_served_before(make_vllm_config, scorer_dir, policy):
    """Two engines, one of which served other requests first, choose the same victims for the same
    request (sampled victims: the request part of the RNG key is stable, not a per-process counter)."""
    from foresightkv_vllm import backend, config

    fkv = {"budget": 32, "interval": 16, "policy": policy, "seed": 9}
    if policy.startswith("foresight"):
        fkv = {**fkv, "policy": "foresight", "checkpoint": scorer_dir, "sample": True}
    gen = torch.Generator().manual_seed(3)
    streams = [Stream(*(torch.randn(LAYERS, MAX_LEN, n, D, generator=gen) for n in (HQ, H, H))) for _ in range(3)]
    kept = []
    for warm_up in (0, 2):
        config._active, backend._engine = None, None
        backend._keys.clear()
        builder, impl, layers, caches = _setup(make_vllm_config, fkv, torch.float32)
        for w in range(warm_up):
            _serve_one(builder, impl, layers, caches, streams[1 + w], 40, 100, 1 + 10 * w)
        key, _ = _serve_one(builder, impl, layers, caches, streams[0], 40, 120, 50)
        assert builder.engine.evictions(key) >= 3
        kept.append([builder.engine.kept_positions(key, layer, H).tolist() for layer in range(LAYERS)])
    assert kept[0] == kept[1]


@pytest.mark.parametrize("protect", [True, False])
def test_kept_set_and_outputs_do_not_depend_on_prompt_chunking_in_protect_mode(make_vllm_config, protect):
    """The same 90-token prompt in one chunk and in three (30 + 25 + 35): in protect mode (where
    the plugin allows chunked prefill) the kept positions and every output are identical. Outside
    protect mode they are not (a prompt is compressed at each chunk's end, and vLLM frees the blocks
    outside the window between chunks, so compression cannot wait): the reason the plugin refuses
    chunked prefill there, naming --no-enable-chunked-prefill."""
    from foresightkv_vllm import backend, config

    fkv = {"budget": 32, "interval": 16, "policy": "h2o", "protect_prompt": protect}
    extra = {"hf_overrides": {"rswa_window": 48}} if protect else {}
    gen = torch.Generator().manual_seed(4)
    stream = Stream(*(torch.randn(LAYERS, MAX_LEN, n, D, generator=gen) for n in (HQ, H, H)))
    runs = []
    for chunks in ([90], [30, 25, 35]):
        config._active, backend._engine = None, None
        backend._keys.clear()
        builder, impl, layers, caches = _setup(make_vllm_config, fkv, torch.float32, **extra)
        key, outs = _serve_one(builder, impl, layers, caches, stream, 90, 160, 1, chunks=chunks, protect=protect)
        assert builder.engine.evictions(key) >= 1
        runs.append(([builder.engine.kept_positions(key, layer, H).tolist() for layer in range(LAYERS)], outs))
    (kept1, out1), (kept3, out3) = runs
    if protect:
        assert kept1 == kept3
        assert (out1 - out3).abs().max().item() < 1e-5
    else:
        # the second chunk's queries already saw a compressed first chunk
        assert (out1 - out3).abs().max().item() > 1e-2


def test_kv_write_has_no_data_dependent_shape_so_cuda_graphs_can_capture_it(make_vllm_config):
    """vLLM does not split its piecewise CUDA graphs at ``unified_kv_cache_update``, so the backend's
    KV write is captured in them: it must trace as one graph (no boolean-mask indexing, no host
    round trip); padding slots (-1) land in vLLM's null block 0."""
    builder, impl, layers, caches = _setup(make_vllm_config, {"budget": 32, "interval": 16, "policy": "h2o"}, torch.float32)
    k, v = torch.randn(5, H, D), torch.randn(5, H, D)
    slots = torch.tensor([3 * BS + 1, -1, 7 * BS, -1, 9 * BS + 15])
    fn = torch.compile(lambda kk, vv, c, s: impl.do_kv_cache_update(layers[0], kk, vv, c, s), backend="eager", fullgraph=True)
    fn(k, v, caches[0], slots)
    from foresightkv_vllm.backend import split_kv_cache

    kc, vc, _ = split_kv_cache(caches[0], D, HQ // H)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc[s // BS, s % BS], k[t]) and torch.equal(vc[s // BS, s % BS], v[t])


class _Worker:
    """The worker side of vLLM's V1 model runner reduced to what the attention backend sees, driven by
    vLLM's real ``Scheduler``: per request the block ids of the scheduler output (new requests'
    ``block_ids``, cached requests' ``new_block_ids`` appended, replaced on resume after preemption),
    rows decode-first, one ``CommonAttentionMetadata`` per step (no ``req_idx``, as the V1 and CPU
    runners), then the builder and the impl of every layer."""

    def __init__(self, builder, impl, layers, caches, seed):
        self.builder, self.impl, self.layers, self.caches = builder, impl, layers, caches
        self.blocks, self.prompt = {}, {}
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, so):
        from vllm.v1.outputs import ModelRunnerOutput

        for rid in so.finished_req_ids:
            self.blocks.pop(rid, None)
        computed = {}
        for nr in so.scheduled_new_reqs:
            self.blocks[nr.req_id] = list(nr.block_ids[0])
            self.prompt[nr.req_id] = len(nr.prompt_token_ids)
            computed[nr.req_id] = nr.num_computed_tokens
        cd = so.scheduled_cached_reqs
        for j, rid in enumerate(cd.req_ids):
            nb = cd.new_block_ids[j]
            if rid in cd.resumed_req_ids:
                self.blocks[rid] = list(nb[0])
            elif nb is not None:
                self.blocks[rid].extend(nb[0])
            computed[rid] = cd.num_computed_tokens[j]
        rows = sorted(so.num_scheduled_tokens, key=lambda r: so.num_scheduled_tokens[r] > 1)
        if not rows:
            return ModelRunnerOutput(req_ids=[], req_id_to_index={})
        cm = _metadata(
            [self.blocks[r] for r in rows],
            [computed[r] for r in rows],
            [so.num_scheduled_tokens[r] for r in rows],
            [computed[r] < self.prompt[r] for r in rows],
        )
        meta = self.builder.build(0, cm)
        t = cm.num_actual_tokens
        for layer in range(LAYERS):
            q = torch.randn(t, HQ * D, generator=self.gen)
            k, v = torch.randn(t, H, D, generator=self.gen), torch.randn(t, H, D, generator=self.gen)
            out = torch.zeros_like(q)
            self.impl.do_kv_cache_update(self.layers[layer], k, v, self.caches[layer], cm.slot_mapping)
            self.impl.forward(self.layers[layer], q, k, v, self.caches[layer], meta, out)
            assert torch.isfinite(out).all()
        return ModelRunnerOutput(
            req_ids=rows, req_id_to_index={r: i for i, r in enumerate(rows)}, sampled_token_ids=[[7] for _ in rows]
        )


def test_state_of_finished_aborted_and_preempted_requests_is_released(make_vllm_config):
    """vLLM's real ``Scheduler`` and KV cache manager over a small pool: requests finish, one is
    aborted, others are preempted by the pool running out and resumed; no request's state outlives
    the hand-over of its block to another request, and a final request that takes almost every block
    leaves at most one stale state per block it did not take."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager

    from foresightkv_vllm.backend import ForesightKVBackend

    fkv = {"budget": 32, "interval": 16, "policy": "h2o"}
    builder, impl, layers, caches = _setup(make_vllm_config, fkv, torch.float32, max_model_len=352)
    cfg = builder.vllm_config
    spec = builder.kv_cache_spec
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    usable = 24
    resolve_kv_cache_layout(cfg, [[layout.name for layout in ForesightKVBackend.supported_kv_cache_layouts()]], [spec])
    (kv_cfg,) = get_kv_cache_configs(cfg, [{n: spec for n in names}], [(usable + 1) * spec.page_size_bytes * LAYERS])
    assert kv_cfg.num_blocks == usable + 1 <= NUM_BLOCKS
    cfg.cache_config.num_gpu_blocks = kv_cfg.num_blocks  # as the engine core sets it
    sched = Scheduler(cfg, kv_cfg, StructuredOutputManager(cfg), block_size=BS)
    pool = sched.kv_cache_manager.block_pool
    worker = _Worker(builder, impl, layers, caches, 1)
    engine = builder.engine
    rng = random.Random(2)

    def add(rid, prompt, out):
        params = SamplingParams(max_tokens=out, ignore_eos=True)
        sched.add_request(Request(rid, [rng.randrange(1000) for _ in range(prompt)], params, None))

    def check():
        # every state the engine holds belongs to a live request, or to a gone one whose anchor block
        # vLLM has not handed out again
        mine = set()
        for rid, blocks in worker.blocks.items():
            n = sched.requests[rid].num_computed_tokens if rid in sched.requests else 0
            if n > 0:
                mine.add(builder.keys.key_at(blocks[(n - 1) // BS]))
        for key in engine.keys():
            if key in mine:
                continue
            block = builder.keys.block_of(key)
            assert pool.blocks[block].ref_cnt == 0, f"stale state of key {key} whose block {block} is in use"

    # short prompts all fit at first; growing to their window they outgrow the pool: preemption
    for i in range(10):
        add(f"r{i}", rng.randint(17, 30), rng.randint(60, 90))
    preempted, aborted, steps = 0, False, 0
    while sched.has_unfinished_requests() and steps < 400:
        so = sched.schedule()
        preempted += len(so.preempted_req_ids or ())
        sched.update_from_output(so, worker.step(so))
        check()
        steps += 1
        if steps == 30 and "r0" in sched.requests:
            sched.finish_requests("r0", RequestStatus.FINISHED_ABORTED)
            aborted = True
    assert aborted and preempted > 0 and not sched.has_unfinished_requests()
    assert len(engine.keys()) > 0  # finished requests' states wait for their blocks to be reused
    stale = len(engine.keys())
    add("last", 344, 1)  # 22 of the 24 blocks
    while sched.has_unfinished_requests():
        so = sched.schedule()
        sched.update_from_output(so, worker.step(so))
        check()
    # every stale state whose block was handed out went: at most the 2 blocks "last" left untouched
    assert len(engine.keys()) <= 1 + 2 < stale + 1

"""The KV cache spec ``customize_spec`` hands vLLM, checked against vLLM's real KV manager classes
(``BlockPool`` and the manager vLLM's registry picks for the spec): over long generations, with
chunked prefill and preemption by recompute, a request's blocks stay bounded by the window, freed
blocks go back to the pool, and no block the backend reads (from ``live_start``) is ever freed.
``live_start`` comes from foresightkv's own ``EvictionEngine.begin_step``, as in the backend."""

import random

import pytest
import torch

from foresightkv.engine import EngineConfig, EvictionEngine, StepRequest
from foresightkv_vllm.backend import live_window_spec
from foresightkv_vllm.config import ModelShape, PluginSettings


def _full_spec(block_size, num_kv_heads=8, head_size=128, dtype=torch.float16):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)


def _settings(budget, interval, block_size, policy="h2o", protect=False):
    """The plugin's settings for a model of 2 layers, 8 KV heads (group 2), head size 128, fp16."""
    fkv = {"budget": budget, "interval": interval, "policy": policy}
    if protect:
        fkv["protect_prompt"] = True
    engine = EngineConfig.from_dict(fkv, block_size=block_size)
    return PluginSettings(engine=engine, block_size=block_size, shape=ModelShape(2, 8, 16, 128, torch.float16))


def _manager(spec, bs, *, chunk, max_model_len, num_blocks):
    """vLLM's ``BlockPool`` of ``num_blocks`` (no prefix caching) and the manager vLLM's registry picks
    for ``spec``."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import get_manager_for_kv_cache_spec

    pool = BlockPool(num_blocks, enable_caching=False, hash_block_size=bs)
    mgr = get_manager_for_kv_cache_spec(
        spec,
        max_in_flight_tokens=chunk,
        max_model_len=max_model_len,
        block_pool=pool,
        enable_caching=False,
        kv_cache_group_id=0,
        scheduler_block_size=bs,
    )
    return pool, mgr


@pytest.mark.parametrize("protect", [False, True], ids=["sliding-window", "protect-r-swa"])
def test_customize_spec_gives_the_live_window_and_packs_the_statistics_in_the_page(protect):
    """Outside protect mode the spec is vLLM's sliding window of W = B + L; in protect mode it is
    R-SWA's window (``rswa_window``, no sliding window); either way the page holds the statistics."""
    from vllm.v1.kv_cache_interface import RSWASpec, SlidingWindowSpec

    from foresightkv_vllm import config
    from foresightkv_vllm.backend import ForesightKVBackend

    full = _full_spec(16)
    config.activate(_settings(1024, 128, 16, protect=protect))
    spec = ForesightKVBackend.customize_spec(full)
    if protect:
        assert type(spec) is RSWASpec
        assert spec.rswa_window == 1024 + 128
        assert spec.sliding_window is None
    else:
        assert type(spec) is SlidingWindowSpec
        assert spec.sliding_window == 1024 + 128
    # each (block, slot, KV head) cell: K and V (2 x 128 fp16) then float32 statistics [G = 2, 8]
    assert full.page_size_bytes == 16 * 8 * 2 * 128 * 2
    assert spec.page_size_bytes == 16 * 8 * (2 * 128 * 2 + 2 * 8 * 4)
    assert (spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype) == (16, 8, 128, torch.float16)
    # a spec that is not plain full attention is left alone
    assert ForesightKVBackend.customize_spec(spec) is spec


def test_customize_spec_keeps_full_attention_under_the_full_cache_policy():
    from foresightkv_vllm import config
    from foresightkv_vllm.backend import ForesightKVBackend

    config.activate(_settings(1024, 128, 16, policy="full_cache"))
    full = _full_spec(16)
    # full_cache never evicts, so vLLM must keep (and the backend reads) every block of the sequence
    assert ForesightKVBackend.customize_spec(full) is full


def test_customize_spec_without_configuration_is_a_clear_error():
    from foresightkv.errors import ConfigError
    from foresightkv_vllm.backend import ForesightKVBackend

    with pytest.raises(ConfigError, match="no vLLM configuration is current"):
        ForesightKVBackend.customize_spec(_full_spec(16))


def _chunks(total, chunk):
    """The steps of a prefill of ``total`` tokens in chunks of at most ``chunk``: ``(committed, new)``."""
    n = 0
    while n < total:
        q = min(chunk, total - n)
        yield n, q
        n += q


def _preempt(mgr, pool, engine, rid, key, usable):
    """Preemption by recompute: vLLM frees every block of the request (the pool is whole again) and
    the engine forgets it; the caller then prefills the whole sequence again."""
    mgr.free(rid)
    assert pool.get_num_free_blocks() == usable
    engine.release(key)


def _cases(protect=False):
    """Random ``(budget, interval, bs, prompt, chunk, decode, preempt_at)`` cases and one fixed one;
    in protect mode shorter prompts, decodes of at least ``2 W``, and preemptions also past ``W``."""
    rng = random.Random(20261124 if protect else 20261123)
    out = []
    for _ in range(12):
        bs = rng.choice([16, 32])
        interval = bs * rng.randint(1, 4)
        budget = interval + bs * rng.randint(0, 10)  # the core requires interval <= budget
        w = budget + interval
        prompt = rng.randint(1, (3 if protect else 5) * w)
        chunk = rng.choice([prompt, bs * rng.randint(1, 8), rng.randint(1, 300)])
        decode = rng.randint(2 * w if protect else 1, 6 * w)
        preempt_at = rng.choice([None, rng.randint(0, decode - 1), *([rng.randint(w, decode - 1)] if protect else [])])
        out.append((budget, interval, bs, prompt, chunk, decode, preempt_at))
    out.append((64, 16, 16, 100, 37, 700, 400) if protect else (1024, 128, 16, 3000, 3000, 3000, None))
    return out


@pytest.mark.parametrize("budget,interval,bs,prompt,chunk,decode,preempt_at", _cases())
def test_vllm_manager_frees_before_the_window_and_never_a_live_block(
    budget, interval, bs, prompt, chunk, decode, preempt_at
):
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    spec = live_window_spec(_full_spec(bs), _settings(budget, interval, bs))
    max_len = prompt + decode
    num_blocks = max_len // bs + 8
    pool, mgr = _manager(spec, bs, chunk=chunk, max_model_len=max_len + 1, num_blocks=num_blocks)
    assert type(mgr) is SlidingWindowManager
    cap = spec.max_admission_blocks_per_request(max_in_flight_tokens=chunk, max_model_len=max_len + 1)
    engine = EvictionEngine(_settings(budget, interval, bs).engine, block_size=bs)
    rid, key = "req-0", 7
    usable = num_blocks - 1  # the pool's null block is never handed out

    def step(n, q, prefill):
        """One scheduler + worker step: n committed tokens, q new ones."""
        mgr.remove_skipped_blocks(rid, n)
        need = mgr.get_num_blocks_to_allocate(rid, n + q, [], n, 0, n + q, apply_admission_cap=n == 0)
        assert need <= pool.get_num_free_blocks()
        mgr.allocate_new_blocks(rid, n + q, n + q)
        plan = engine.begin_step([StepRequest(key, n + q, q, prefill, reset=n == 0)])
        live_start = plan.live_starts[0]
        row = mgr.req_to_blocks[rid]
        # every block the backend reads this step is allocated, not freed, and owned by the request
        for i in range(live_start // bs, -(-(n + q) // bs)):
            assert not row[i].is_null, f"block {i} (live window from {live_start}) was freed at {n} tokens"
            assert row[i].ref_cnt == 1
        held = sum(1 for b in row if not b.is_null)
        assert held <= cap
        assert held + pool.get_num_free_blocks() == usable
        return held

    peak_after_prompt, steady = 0, []
    for n, q in _chunks(prompt, chunk):
        peak_after_prompt = max(peak_after_prompt, step(n, q, True))
    n = prompt
    for t in range(decode):
        if preempt_at is not None and t == preempt_at:
            _preempt(mgr, pool, engine, rid, key, usable)
            for m, q in _chunks(n, chunk):
                step(m, q, True)
        steady.append(step(n, 1, False))
        n += 1
    # the window bounds what a request holds, however long it runs
    assert max(steady) <= -(-(budget + interval) // bs) + 1
    mgr.free(rid)
    assert pool.get_num_free_blocks() == usable


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_pool_sized_by_the_window_admits_and_runs_long_requests_concurrently(seed):
    """vLLM sizes and admits sliding-window requests by ``max_admission_blocks_per_request``: a pool of
    ``k`` such caps (far fewer blocks than ``k`` full sequences) runs ``k`` long requests side by side,
    interleaved, without ever lacking a block."""
    rng = random.Random(seed)
    budget, interval, bs, chunk, k = 64, 32, 16, 48, 4
    lengths = [rng.randint(600, 1200) for _ in range(k)]
    settings = _settings(budget, interval, bs)
    spec = live_window_spec(_full_spec(bs), settings)
    cap = spec.max_admission_blocks_per_request(max_in_flight_tokens=chunk, max_model_len=2048)
    pool, mgr = _manager(spec, bs, chunk=chunk, max_model_len=2048, num_blocks=k * cap + 1)
    assert k * cap + 1 < sum(-(-n // bs) for n in lengths) // 4  # full attention would need > 4x the pool
    engine = EvictionEngine(settings.engine, block_size=bs)
    done = [0] * k
    prompts = [rng.randint(1, 300) for _ in range(k)]
    while any(d < n for d, n in zip(done, lengths)):
        batch = []
        for r in range(k):
            n = done[r]
            if n >= lengths[r]:
                continue
            q = min(chunk, prompts[r] - n) if n < prompts[r] else 1
            rid = f"r{r}"
            mgr.remove_skipped_blocks(rid, n)
            need = mgr.get_num_blocks_to_allocate(rid, n + q, [], n, 0, n + q, apply_admission_cap=n == 0)
            assert need <= pool.get_num_free_blocks(), f"request {r} lacks blocks at {n} tokens"
            mgr.allocate_new_blocks(rid, n + q, n + q)
            batch.append(StepRequest(r, n + q, q, n < prompts[r], reset=n == 0))
            done[r] = n + q
        plan = engine.begin_step(batch)
        for req, start in zip(plan.requests, plan.live_starts):
            row = mgr.req_to_blocks[f"r{req.key}"]
            assert all(not b.is_null for b in row[start // bs : -(-req.seq_len // bs)])
        for r in range(k):
            if done[r] >= lengths[r] and f"r{r}" in mgr.req_to_blocks:
                mgr.free(f"r{r}")
    assert pool.get_num_free_blocks() == k * cap


@pytest.mark.parametrize("budget,interval,bs,prompt,chunk,decode,preempt_at", _cases(protect=True))
def test_vllm_r_swa_manager_keeps_the_prompt_and_never_frees_a_block_the_backend_reads(
    budget, interval, bs, prompt, chunk, decode, preempt_at
):
    """Protect mode with vLLM's real ``RSWAManager``: the blocks of the original prompt are never freed,
    not even after preemption and a resumed re-prefill of prompt + generated tokens; no block the
    engine reads (protected prompt, then its evictable window) is freed; a request holds at most the
    prompt's blocks plus ``cdiv(W, bs) + 1``; the gap blocks really go back to the pool."""
    from vllm.v1.core.single_type_kv_cache_manager import RSWAManager

    from foresightkv_vllm.backend import step_requests

    settings = _settings(budget, interval, bs, protect=True)
    spec = live_window_spec(_full_spec(bs), settings)
    max_len = prompt + decode
    num_blocks = max_len // bs + 8
    pool, mgr = _manager(spec, bs, chunk=chunk, max_model_len=max_len + 1, num_blocks=num_blocks)
    assert type(mgr) is RSWAManager
    engine = EvictionEngine(settings.engine, block_size=bs)
    rid, key = "req-0", 7
    usable = num_blocks - 1
    prompt_blocks = -(-prompt // bs)
    window_blocks = -(-(budget + interval) // bs) + 1

    def step(n, q):
        """One scheduler + worker step, as vLLM's allocate_slots and the builder do it."""
        mgr.remove_skipped_blocks(rid, n, num_prompt_tokens=prompt)
        need = mgr.get_num_blocks_to_allocate(rid, n + q, [], n, 0, n + q)
        assert need <= pool.get_num_free_blocks()
        mgr.allocate_new_blocks(rid, n + q, n + q)
        plan = engine.begin_step(step_requests(key, n + q, q, n < prompt or n + q <= prompt, prompt))
        protected = engine.protected_len(key)
        assert protected == min(-(-(n + q) // bs), prompt_blocks) * bs
        start = max(engine.live_start(key), protected)
        row = mgr.req_to_blocks[rid]
        reads = list(range(protected // bs)) + list(range(start // bs, -(-(n + q) // bs)))
        for i in reads:
            assert not row[i].is_null, f"block {i} (protected {protected}, window from {start}) freed at {n}"
            assert row[i].ref_cnt == 1
        held = sum(1 for b in row if not b.is_null)
        assert held + pool.get_num_free_blocks() == usable
        return plan, held

    for n, q in _chunks(prompt, chunk):
        step(n, q)
    n = prompt
    steady, evictions = [], 0
    for t in range(decode):
        if preempt_at is not None and t == preempt_at:
            _preempt(mgr, pool, engine, rid, key, usable)
            for m, q in _chunks(n, chunk):
                step(m, q)
        plan, held = step(n, 1)
        evictions += sum(t is not None for t in plan.evict_to)
        assert all(not b.is_null for b in mgr.req_to_blocks[rid][:prompt_blocks]), "a prompt block was freed"
        steady.append(held)
        n += 1
    assert evictions > 0
    assert max(steady) <= prompt_blocks + window_blocks
    # the gap really went back: far fewer blocks than the sequence spans
    assert steady[-1] < -(-n // bs) - 1
    mgr.free(rid)
    assert pool.get_num_free_blocks() == usable


def test_a_resumed_chunk_crossing_the_prompt_is_split_at_the_original_prompt():
    from foresightkv_vllm.backend import step_requests

    # vLLM re-prefills prompt (100) + generated tokens (230) after preemption
    first, rest = step_requests(3, 330, 330, True, 100)
    assert (first.seq_len, first.num_new, first.prefill, first.reset) == (100, 100, True, True)
    assert (rest.seq_len, rest.num_new, rest.prefill, rest.reset) == (330, 230, False, False)
    (only,) = step_requests(3, 80, 80, True, 100)
    assert only.prefill and only.reset
    (gen,) = step_requests(3, 260, 60, True, 100)  # a later chunk of the replay: generated tokens only
    assert not gen.prefill and not gen.reset
    (plain,) = step_requests(3, 330, 330, True, None)
    assert plain.prefill and plain.num_new == 330
    engine = EvictionEngine(_settings(64, 16, 16, protect=True).engine, block_size=16)
    engine.begin_step(step_requests(3, 330, 330, True, 100))
    assert engine.protected_len(3) == 112


@pytest.mark.parametrize("protect", [False, True])
def test_vllm_kv_sizing_counts_the_statistics_pages(make_vllm_config, protect):
    """vLLM's own KV-cache sizing (``get_kv_cache_configs``, what the engine core runs after
    profiling) computes fewer blocks for the same memory, by exactly the statistics' share of the
    page, so ``--gpu-memory-utilization`` covers them; the full-cache policy keeps vLLM's pages."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from foresightkv_vllm.backend import ForesightKVBackend

    fkv = {"budget": 64, "interval": 16, "policy": "h2o", "protect_prompt": protect}
    extra = {"hf_overrides": {"rswa_window": 80}} if protect else {}
    cfg = make_vllm_config(fkv, dtype="float16", **extra)
    with set_current_vllm_config(cfg):
        ForesightKVBackend.get_impl_cls()(4, 64, 0.125, 2, None, None, "auto")
    names = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16)
    ours = ForesightKVBackend.customize_spec(full)
    memory = 64 << 20
    # what the engine core resolves from the backend's supported layouts before sizing
    resolve_kv_cache_layout(cfg, [[layout.name for layout in ForesightKVBackend.supported_kv_cache_layouts()]], [ours])

    def blocks(spec):
        (kv,) = get_kv_cache_configs(cfg, [{n: spec for n in names}], [memory])
        return kv.num_blocks

    # cell: K + V = 2 x 64 fp16 = 256 bytes, statistics = group 2 x 8 float32 = 64 bytes
    assert ours.page_size_bytes == 16 * 2 * (256 + 64)
    assert blocks(full) == memory // (2 * full.page_size_bytes)
    assert blocks(ours) == memory // (2 * ours.page_size_bytes)
    assert blocks(ours) < blocks(full) * 0.81


def test_startup_message_states_the_statistics_bytes(make_vllm_config, caplog):
    import logging

    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from foresightkv_vllm.backend import ForesightKVBackend

    cfg = make_vllm_config({"budget": 64, "interval": 16, "policy": "h2o"}, dtype="float16")
    cfg.cache_config.num_gpu_blocks = 1000  # set by vLLM's worker before it builds the backends
    with set_current_vllm_config(cfg):
        ForesightKVBackend.get_impl_cls()(4, 64, 0.125, 2, None, None, "auto")
    spec = ForesightKVBackend.customize_spec(
        FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16)
    )
    log = logging.getLogger("vllm.foresightkv")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="vllm.foresightkv"):
            ForesightKVBackend.get_builder_cls()(spec, ["a", "b"], cfg, torch.device("cpu"))
    finally:
        log.removeHandler(caplog.handler)
    per_block = 16 * 2 * 64
    assert f"{per_block} of {spec.page_size_bytes} bytes per block and layer" in caplog.text
    assert f"{per_block * 1000 * 2} bytes in all (1000 blocks x 2 layers)" in caplog.text

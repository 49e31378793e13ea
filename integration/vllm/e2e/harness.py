"""What the whole-engine tests share: building a ``vllm.LLM`` on CPU with vLLM's native CPU attention or
with foresightkv (through the plugin's own registration), an instrumented ``BlockPool`` (every block
allocated once and freed once), and a driver that feeds requests to vLLM's ``LLMEngine`` step by step
(staggered arrivals, aborts) while recording tokens, logprobs, blocks held and preemptions."""

import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

#: Environment variable naming the testbed model directory (default: scripts/setup_model.sh's).
TESTBED_ENV = "FORESIGHTKV_TESTBED"


def testbed_dir() -> Optional[pathlib.Path]:
    """The testbed model (SmolLM2-135M-Instruct, converted by scripts/setup_model.sh), if present."""
    cache = os.environ.get("FORESIGHTKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "foresightkv"
    )
    path = pathlib.Path(os.environ.get(TESTBED_ENV) or os.path.join(cache, "models", "smollm2-135m-instruct"))
    return path if (path / "config.json").exists() else None


# ---------------------------------------------------------------------------------------- block pool


class BlockLedger:
    """Wraps ``vllm.v1.core.block_pool.BlockPool`` (class level, for the pools made while installed):
    records each pool, the blocks it handed out, and every error of its bookkeeping: a block handed out
    while already held, or freed while not held (a double free), or a ref count below zero."""

    def __init__(self) -> None:
        from vllm.v1.core.block_pool import BlockPool

        self._cls = BlockPool
        self._orig = (BlockPool.__init__, BlockPool.get_new_blocks, BlockPool.free_blocks)
        self.pools: List = []
        self.held: Dict[int, set] = {}
        self.errors: List[str] = []
        self.allocated = 0
        self.freed = 0

    def install(self) -> "BlockLedger":
        """Installs the wrappers."""
        init, get_new, free = self._orig
        ledger = self

        def __init__(pool, *a, **kw):
            init(pool, *a, **kw)
            ledger.pools.append(pool)
            ledger.held[id(pool)] = set()

        def get_new_blocks(pool, num_blocks):
            blocks = get_new(pool, num_blocks)
            held = ledger.held.setdefault(id(pool), set())
            for b in blocks:
                if b.block_id in held:
                    ledger.errors.append(f"block {b.block_id} handed out while held")
                held.add(b.block_id)
            ledger.allocated += len(blocks)
            return blocks

        def free_blocks(pool, ordered_blocks):
            blocks = list(ordered_blocks)
            held = ledger.held.setdefault(id(pool), set())
            for b in blocks:
                if b.is_null or (b.pool is not None and b.pool is not pool):
                    continue
                if b.ref_cnt <= 0:
                    ledger.errors.append(f"block {b.block_id} freed with ref_cnt {b.ref_cnt} (double free)")
                elif b.ref_cnt == 1:
                    if b.block_id not in held:
                        ledger.errors.append(f"block {b.block_id} freed but not held (double free)")
                    held.discard(b.block_id)
                    ledger.freed += 1
            return free(pool, blocks)

        self._cls.__init__, self._cls.get_new_blocks, self._cls.free_blocks = __init__, get_new_blocks, free_blocks
        return self

    def uninstall(self) -> None:
        """Restores vLLM's methods."""
        self._cls.__init__, self._cls.get_new_blocks, self._cls.free_blocks = self._orig


# ---------------------------------------------------------------------------------------- engines


def use_native_cpu_attention() -> None:
    """vLLM's CPU platform resolves attention to ``CPU_ATTN`` whatever is asked: make that vLLM's own
    CPU backend again (drop a foresightkv override) and forget the selector's cached choice."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import _cached_get_attn_backend

    AttentionBackendEnum.CPU_ATTN.clear_override()
    _cached_get_attn_backend.cache_clear()


def use_foresightkv() -> None:
    """Routes ``CPU_ATTN`` to foresightkv the way a user does: ``FORESIGHTKV_VLLM_CPU=1`` and the plugin's
    own ``register`` (what vLLM's ``load_general_plugins`` runs; it runs once per process, so it is
    called again here after a native engine)."""
    from foresightkv_vllm import CPU_ENV, register
    from vllm.v1.attention.selector import _cached_get_attn_backend

    os.environ[CPU_ENV] = "1"
    register()
    _cached_get_attn_backend.cache_clear()


def make_llm(model: str, fkv: Optional[dict] = None, *, num_blocks: Optional[int] = None, **kw):
    """A ``vllm.LLM`` on CPU, float32, 32-token blocks, eager, no prefix caching, no chunked prefill
    (whole prompts of up to ``max_model_len`` = 512 tokens per step); foresightkv with the
    settings ``fkv`` (``--additional-config '{"foresightkv": fkv}'``, plus the R-SWA window in protect
    mode) or vLLM's native CPU attention when None. ``num_blocks`` fixes the KV pool's size."""
    from vllm import LLM

    args = dict(
        model=model,
        dtype="float32",
        block_size=32,
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,  # foresightkv outside protect mode refuses chunked prefill
        max_model_len=512,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        seed=0,
        disable_log_stats=True,
    )
    if num_blocks is not None:
        args["num_gpu_blocks_override"] = num_blocks
    if fkv is None:
        use_native_cpu_attention()
    else:
        use_foresightkv()
        args["additional_config"] = {"foresightkv": dict(fkv)}
        if fkv.get("protect_prompt"):
            args["hf_overrides"] = {"rswa_window": fkv["budget"] + fkv["interval"]}
    args.update(kw)
    return LLM(**args)


def engine_core(llm):
    """vLLM's in-process ``EngineCore`` of ``llm``."""
    return llm.llm_engine.engine_core.engine_core


def model_runner(llm):
    """The worker's model runner (V1 ``CPUModelRunner`` on CPU)."""
    return engine_core(llm).model_executor.driver_worker.worker.model_runner


def scheduler(llm):
    """vLLM's scheduler of ``llm``."""
    return engine_core(llm).scheduler


def shutdown(llm) -> None:
    """Shuts ``llm``'s engine core down (frees its KV cache) before the next engine is made."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()


# ---------------------------------------------------------------------------------------- driver


@dataclass
class Req:
    """One request of a workload: prompt tokens, tokens to generate, the step it arrives at, and
    optionally the step it is aborted at."""

    rid: str
    prompt: Sequence[int]
    max_tokens: int
    arrive: int = 0
    abort_at: Optional[int] = None


@dataclass
class Result:
    """What a run observed."""

    tokens: Dict[str, List[int]] = field(default_factory=dict)
    logprobs: Dict[str, List[float]] = field(default_factory=dict)
    finished: Dict[str, str] = field(default_factory=dict)
    max_blocks: Dict[str, int] = field(default_factory=dict)
    #: most blocks held after a step that decoded one token (a whole-prompt or recomputed prefill
    #: holds its blocks until vLLM's next allocation frees those outside the window)
    decode_blocks: Dict[str, int] = field(default_factory=dict)
    preemptions: int = 0
    steps: int = 0
    free_after: int = 0
    pool_blocks: int = 0
    max_concurrent: int = 0
    #: requests foresightkv still holds state for once the runner has seen every finish (None: native)
    states_after: Optional[int] = None
    #: most requests foresightkv held state for after any step (None: native)
    max_states: Optional[int] = None
    #: most requests foresightkv held state for after a step beyond those the step's scheduler output
    #: scheduled (None: native; > 0: a finished, aborted or preempted request's state outlived the step
    #: at which vLLM's runner learned of it)
    max_unscheduled_states: Optional[int] = None
    #: vLLM's bound on running requests (``max_num_seqs``)
    max_running: int = 0
    #: bytes of query rings the foresightkv engines took at start-up (allocated at model construction)
    ring_bytes: int = 0
    #: bytes of query rings the engines hold after the run (more than ``ring_bytes``: a ring grew)
    ring_bytes_after: int = 0


def run(llm, reqs: Sequence[Req], *, max_steps: int = 100000) -> Result:
    """Feeds ``reqs`` to ``llm``'s ``LLMEngine`` (greedy, ``ignore_eos``, 1 logprob), step by step:
    each arrives at its step, is aborted at its ``abort_at``; records every request's tokens and
    logprobs, the most blocks it held in vLLM's KV manager (ever, and after decode steps), preemptions, and the pool's free blocks
    once all are done."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    sched = scheduler(llm)
    mgr = sched.kv_cache_manager
    pool = mgr.block_pool
    res = Result(pool_blocks=pool.num_gpu_blocks - 1, max_running=sched.max_num_running_reqs)
    res.ring_bytes = ring_bytes(llm)
    orig_preempt = sched._preempt_request

    def counting(request, *a, **kw):
        res.preemptions += 1
        return orig_preempt(request, *a, **kw)

    sched._preempt_request = counting
    orig_schedule = sched.schedule
    scheduled = [0]

    def recording(*a, **kw):
        out = orig_schedule(*a, **kw)
        scheduled[0] = len(out.num_scheduled_tokens)
        return out

    sched.schedule = recording
    pending = sorted(reqs, key=lambda r: r.arrive)
    computed: Dict[str, int] = {}
    aborts = {r.rid: r.abort_at for r in reqs if r.abort_at is not None}
    try:
        step = 0
        while pending or eng.has_unfinished_requests():
            while pending and pending[0].arrive <= step:
                r = pending.pop(0)
                params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)
                eng.add_request(r.rid, {"prompt_token_ids": list(r.prompt)}, params)
                res.tokens[r.rid], res.logprobs[r.rid] = [], []
            for rid, at in list(aborts.items()):
                if at <= step and rid in res.tokens:
                    eng.abort_request([rid])
                    res.finished[rid] = "abort"
                    del aborts[rid]
            for out in eng.step():
                o = out.outputs[0]
                res.tokens[out.request_id] = list(o.token_ids)
                if o.logprobs is not None:
                    res.logprobs[out.request_id] = [
                        lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)
                    ]
                if out.finished:
                    res.finished.setdefault(out.request_id, str(o.finish_reason))
            for mgr1 in mgr.coordinator.single_type_managers:
                for internal, blocks in mgr1.req_to_blocks.items():
                    # vLLM's internal id is the user's with a random suffix (assign_request_id)
                    rid = internal.rsplit("-", 1)[0]
                    held = sum(1 for b in blocks if not b.is_null)
                    res.max_blocks[rid] = max(res.max_blocks.get(rid, 0), held)
                    req = sched.requests.get(internal)
                    if req is None:
                        continue
                    done = req.num_computed_tokens
                    if done - computed.get(internal, -1) == 1:  # this step decoded one token
                        res.decode_blocks[rid] = max(res.decode_blocks.get(rid, 0), held)
                    computed[internal] = done
            res.max_concurrent = max(res.max_concurrent, len(sched.running))
            held = foresightkv_states(llm)
            if held is not None:
                res.max_states = max(res.max_states or 0, held)
                res.max_unscheduled_states = max(res.max_unscheduled_states or 0, held - scheduled[0])
            step += 1
            if step > max_steps:
                raise AssertionError(f"the workload did not finish in {max_steps} steps")
        res.steps = step
        # the last finished requests' ids reach the model runner with the next scheduler step
        # (vLLM's engine core runs it, with no tokens, while finished ids are pending)
        if sched.has_finished_requests():
            eng.step()
    finally:
        sched._preempt_request = orig_preempt
        sched.schedule = orig_schedule
    res.free_after = pool.get_num_free_blocks()
    res.states_after = foresightkv_states(llm)
    res.ring_bytes_after = ring_bytes(llm, held=True)
    return res


def ring_bytes(llm, held: bool = False) -> int:
    """Bytes of the query rings the foresightkv engines of ``llm`` took at start-up (``held``: hold now)."""
    from foresightkv_vllm.lifecycle import foresightkv_builders

    builders = [b for _, b in foresightkv_builders(model_runner(llm))]
    if held:
        return sum(b.engine.reserved_bytes() - b.engine.stats_bytes() for b in builders)
    return sum(b.ring_bytes for b in builders)


def foresightkv_states(llm) -> Optional[int]:
    """Requests with state in the foresightkv engines of ``llm``'s model runner (None: native)."""
    from foresightkv_vllm.lifecycle import foresightkv_builders

    builders = foresightkv_builders(model_runner(llm))
    if not builders:
        return None
    return sum(len(b.engine.keys()) for _, b in builders)


def run_once(model: str, reqs: Sequence[Req], fkv: Optional[dict] = None, **kw) -> Result:
    """``run`` of ``reqs`` on an engine made for it (``make_llm(model, fkv, **kw)``) and shut down after."""
    llm = make_llm(model, fkv, **kw)
    try:
        return run(llm, reqs)
    finally:
        shutdown(llm)


def all_finite(values: Sequence[float]) -> bool:
    """True when every value is finite."""
    return all(math.isfinite(v) for v in values)

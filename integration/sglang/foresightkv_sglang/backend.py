"""``ForesightKVAttnBackend``: SGLang's attention backend interface over foresightkv's engine step.

Each forward writes the new K/V into SGLang's ``MHATokenToKVPool`` (page size 1), then attends over
every request's live window read in place through its ``req_to_token`` row, records the recent
queries, and evicts per (layer, KV head) when the schedule says so. Slots of the positions an
eviction drops (before a request's live window; after its prompt with ``protect_prompt``, whose slots
stay until the request ends) go back through SGLang's token allocator one step later (see ``ledger``)."""

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import foresightkv
from foresightkv.engine import EngineConfig, EvictionEngine, StepBatch, StepPlan, request_rng_key
from foresightkv.errors import ConfigError
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool

from . import hooks
from .ledger import ROW_BITS, ROW_MASK, free_slots, host_generations, key_row, ledger_for, ledger_key, ledger_keys


logger = logging.getLogger(__name__)

#: The flags that turn SGLang's CUDA graphs off (this backend has data-dependent control flow).
CUDA_GRAPH_FLAGS = "--cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled"

_NO_GRAPHS = (
    "foresightkv does not support CUDA graphs (its eviction step has data-dependent control flow): "
    f"launch SGLang with {CUDA_GRAPH_FLAGS} (or the deprecated --disable-cuda-graph)"
)

_NO_CPU_GRAPHS = (
    "foresightkv does not support SGLang's CPU graphs (--enable-torch-compile on device cpu compiles and "
    "captures the decode step; the eviction step has data-dependent control flow): remove --enable-torch-compile"
)


@dataclass
class ForwardMetadata:
    """Per-forward metadata: the engine's plan for the batch's real rows (None when every row is
    padding), their ``req_to_token`` rows (int32), and, when some rows are padding, the token indices
    of the real rows (``token_index``, on the cache's device)."""

    plan: Optional[StepPlan]
    block_tables: torch.Tensor
    token_index: Optional[torch.Tensor] = None


#: ``req_to_token`` row of SGLang's padding rows (dummy and padded decode batches, autotune warm-up):
#: ``ReqToTokenPool`` never hands row 0 to a request, so such rows carry no request and get no state.
PADDING_ROW = 0


def validate_runner(model_runner, config: EngineConfig) -> None:
    """Refuses configurations the backend cannot serve, naming the flag to change."""
    page_size = getattr(model_runner, "page_size", 1) or 1
    if page_size != 1:
        raise ConfigError(f"foresightkv evicts single token slots: launch SGLang with --page-size 1 (got {page_size})")
    pool = model_runner.token_to_kv_pool
    if not isinstance(pool, MHATokenToKVPool):
        raise ConfigError(
            "foresightkv supports SGLang's MHATokenToKVPool only (plain multi-head attention), "
            f"got {type(pool).__name__} (hybrid sliding-window, MLA and Mamba models are not supported)"
        )
    k = pool.get_key_buffer(pool.start_layer if hasattr(pool, "start_layer") else 0)
    if k.dim() != 3 or k.shape[1] != pool.head_num or k.shape[2] != pool.head_dim:
        raise ConfigError(
            f"foresightkv reads the token-major (NHD) KV layout; got a key buffer of shape {tuple(k.shape)} "
            "(unset SGLANG_USE_HND_KVCACHE)"
        )
    if pool.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"foresightkv needs an fp16, bf16 or fp32 KV cache, got {pool.dtype} (drop --kv-cache-dtype)")
    if torch.device(model_runner.device).type == "cuda" and pool.head_dim not in (64, 128, 256):
        raise ConfigError(
            f"foresightkv's CUDA kernels support head dims 64, 128 and 256, the model has {pool.head_dim}"
        )
    args = getattr(model_runner, "server_args", None)
    if args is not None:
        if not getattr(args, "disable_radix_cache", False):
            raise ConfigError(
                "foresightkv rewrites cached slots in place when it evicts, so prefix sharing is impossible: "
                "launch SGLang with --disable-radix-cache"
            )
        phases = {getattr(args, f"{p}_attention_backend", None) for p in ("prefill", "decode")} - {None}
        if phases - {"foresightkv"} or (
            phases and getattr(args, "attention_backend", None) not in (None, "foresightkv")
        ):
            raise ConfigError(
                "foresightkv must run both prefill and decode (its eviction state spans both): use "
                "--attention-backend foresightkv without a different --prefill-attention-backend or "
                "--decode-attention-backend"
            )
        for flag, _value in _slot_moving_features(args, BACKEND_SPLITTING_FEATURES):
            raise ConfigError(
                f"foresightkv does not support {flag}: SGLang then splits a forward between several attention "
                "backends, and each would plan and evict with its own copy of the requests' eviction state. "
                f"Remove {flag}"
            )
        for flag, value in _slot_moving_features(args):
            raise ConfigError(
                f"foresightkv does not support {flag} ({value!r}): it moves or shares KV slots outside "
                "foresightkv's slot ledger, so an eviction would free or rewrite slots it still uses. "
                f"Remove {flag}"
            )
        if torch.device(model_runner.device).type == "cpu" and getattr(args, "enable_torch_compile", False):
            raise ConfigError(_NO_CPU_GRAPHS)
        if getattr(args, "enable_mixed_chunk", False):
            raise ConfigError("foresightkv does not support mixed prefill/decode batches: remove --enable-mixed-chunk")
        if config.policy == "foresight" and (getattr(args, "tp_size", 1) or 1) > 1:
            raise ConfigError(
                "foresightkv's foresight policy does not split the scorer's KV heads across tensor-parallel ranks yet: "
                "use --tp-size 1 (or a baseline policy)"
            )


#: Server arguments of SGLang features that move, share or copy a request's KV slots behind the
#: attention backend's back, with the value that turns each off: (attribute, flag, off value).
SLOT_MOVING_FEATURES = (
    ("speculative_algorithm", "--speculative-algorithm", None),
    ("disaggregation_mode", "--disaggregation-mode", "null"),
    ("enable_hierarchical_cache", "--enable-hierarchical-cache", False),
    ("enable_hisparse", "--enable-hisparse", False),
    ("enable_lmcache", "--enable-lmcache", False),
    ("enable_flexkv", "--enable-flexkv", False),
    ("radix_cache_backend", "--radix-cache-backend", None),
    ("enable_streaming_session", "--enable-streaming-session", False),
)


#: Server arguments with which SGLang builds several attention backends and splits a forward between
#: them (two-batch overlap's micro-batches, PD multiplexing's SM groups), as (attribute, flag, off):
#: each instance would plan and evict its share of the batch with its own per-request state.
BACKEND_SPLITTING_FEATURES = (
    ("enable_two_batch_overlap", "--enable-two-batch-overlap", False),
    ("enable_pdmux", "--enable-pdmux", False),
)


def _slot_moving_features(args, features=SLOT_MOVING_FEATURES):
    """``(flag, value)`` of each feature of ``features`` (default ``SLOT_MOVING_FEATURES``) that
    ``args`` turn on."""
    for attr, flag, off in features:
        value = getattr(args, attr, off)
        if value not in (off, None, False, "", "null", "NONE"):
            yield flag, value


class ForesightKVAttnBackend(AttentionBackend):
    """SGLang attention backend with ForesightKV token-slot eviction (page size 1, eager mode only)."""

    def __init__(self, model_runner, config: EngineConfig, *, checkpoint=None) -> None:
        super().__init__()
        validate_runner(model_runner, config)
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.engine = EvictionEngine(config, block_size=1, checkpoint=checkpoint)
        _check_scorer(self.engine, model_runner)
        _reserve_stats(self.engine, model_runner)
        _reserve_rings(self.engine, model_runner)
        self.ledger = ledger_for(self.req_to_token_pool)
        self.forward_metadata: Optional[ForwardMetadata] = None
        #: Slots this backend gave back to the allocator so far (for tests and logs).
        self.freed_slots = 0
        hooks.attach(self)

    # ------------------------------------------------------------------ metadata

    def init_forward_metadata(self, forward_batch) -> None:
        """Plans the step: commits (and frees the slots of) the last step's evictions, then decides
        each request's live window and eviction for this one."""
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        if mode.is_target_verify() or mode.is_draft_extend_v2():
            raise ConfigError("foresightkv does not support speculative decoding")
        pool = self.req_to_token_pool
        # The batch's columns as host int64 arrays (SGLang's CPU mirrors when it keeps them), handed to
        # the planner as CPU tensors it reads in place: no Python object per request on the hot path,
        # and numpy for the arithmetic (a tenth of a torch CPU op's fixed cost).
        rows = _host_ints(getattr(forward_batch, "req_pool_indices_cpu", None), forward_batch.req_pool_indices)
        seq_lens = _host_ints(getattr(forward_batch, "seq_lens_cpu", None), forward_batch.seq_lens)
        n = rows.size
        decode = mode.is_decode()
        if decode:
            num_new = np.ones(n, dtype=np.int64)
            prefix = seq_lens - 1
        else:
            num_new = _host_ints(getattr(forward_batch, "extend_seq_lens_cpu", None), forward_batch.extend_seq_lens)
            prefix = _host_ints(getattr(forward_batch, "extend_prefix_lens_cpu", None), forward_batch.extend_prefix_lens)
        self._forget_stale()
        prompt_lens, rng_keys = _row_info(forward_batch, n, decode)
        real = rows != PADDING_ROW
        token_index = None
        if not real.all():
            # Padding rows: no request, no state, no attention (their outputs are zeros).
            token_index = torch.from_numpy(np.flatnonzero(np.repeat(real, num_new))).to(self.token_to_kv_pool.device)
            rows, seq_lens, num_new, prefix = (x[real] for x in (rows, seq_lens, num_new, prefix))
            kept = np.flatnonzero(real).tolist()
            prompt_lens = None if prompt_lens is None else [prompt_lens[i] for i in kept]
            rng_keys = None if rng_keys is None else [rng_keys[i] for i in kept]
            n = rows.size
        if not n:
            self.forward_metadata = ForwardMetadata(None, pool.req_to_token[:0], token_index)
            return
        keys = ledger_keys(pool, rows)
        if not decode:
            # a request's first forward (and its first after a retraction) is an extend
            self.ledger.track(keys)
        prefill = [not decode] * n
        reset = [False] * n if decode else (prefix == 0).tolist()
        cols = (torch.from_numpy(seq_lens), torch.from_numpy(num_new))
        plan = self.engine.begin_step(StepBatch(keys, *cols, prefill, reset, prompt_lens, rng_keys))
        if plan.released:
            spans = [
                (key_row(adv.key), self.ledger.take(adv.key, adv.evicted_from, adv.new_live_start))
                for adv in plan.released
            ]
            self.freed_slots += free_slots(self.allocator, pool.req_to_token, spans)
        width = int(seq_lens.max())
        idx = forward_batch.req_pool_indices.to(pool.req_to_token.device).long()
        if token_index is not None:
            idx = idx[idx != PADDING_ROW]
        # one copy: the batch's rows of req_to_token up to the longest request
        block_tables = pool.req_to_token[:, :width].index_select(0, idx)
        self.forward_metadata = ForwardMetadata(plan, block_tables.to(self.token_to_kv_pool.device), token_index)

    def release_rows(self, rows) -> None:
        """Drops the engine state and ledger entries of the requests holding ``rows`` (SGLang gives the
        rows back: the request finished, was aborted or retracted; its pending eviction is dropped and
        SGLang's release path has freed every slot foresightkv had not)."""
        pool = self.req_to_token_pool
        for row in rows:
            key = ledger_key(pool, row)
            self.engine.release(key)
            self.ledger.forget(key)

    def _forget_stale(self) -> None:
        """Drops the engine state and ledger entries of rows SGLang gave to another request (their
        generation moved on), checking every known key in one pass."""
        gens = host_generations(self.req_to_token_pool)
        for keys, drop in ((self.ledger.keys(), self.ledger.forget), (self.engine.keys(), self.engine.release)):
            if not keys:
                continue
            k = np.array(keys, dtype=np.int64)
            stale = gens[k & ROW_MASK] != k >> ROW_BITS
            if stale.any():
                for key in k[stale].tolist():
                    drop(key)

    # ------------------------------------------------------------------ forward

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        """Prefill / extend: writes the new K/V, attends causally over each live window, evicts."""
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        """Decode: writes the new K/V, attends with foresightkv's paged decode kernel, evicts."""
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache):
        meta = self.forward_metadata
        if meta is None:
            raise RuntimeError("foresightkv: forward called before init_forward_metadata")
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise ConfigError("foresightkv supports causal self-attention layers without sliding window only")
        if layer.qk_head_dim != layer.v_head_dim:
            raise ConfigError("foresightkv needs equal query/key and value head dims")
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        q3 = q.reshape(-1, hq, d)
        idx = meta.token_index
        if meta.plan is None or idx is not None:
            out = q3.new_zeros(q3.shape)  # padding rows: no request, no attention
        if meta.plan is None:
            return out.reshape(-1, hq * d).to(q.dtype)
        kc = self.token_to_kv_pool.get_key_buffer(layer.layer_id).unsqueeze(1)
        vc = self.token_to_kv_pool.get_value_buffer(layer.layer_id).unsqueeze(1)
        qr = q3 if idx is None else q3.index_select(0, idx)
        dst = qr.new_empty(qr.shape)
        self.engine.attend(
            meta.plan,
            layer.layer_id,
            qr.to(kc.dtype),
            kc,
            vc,
            meta.block_tables,
            dst,
            scale=layer.scaling,
        )
        if idx is None:
            return dst.reshape(-1, hq * d).to(q.dtype)
        out.index_copy_(0, idx, dst.to(out.dtype))
        return out.reshape(-1, hq * d).to(q.dtype)

    # ------------------------------------------------------------------ CUDA graphs: unsupported

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """CUDA graphs are not supported: raises, naming the flags that turn them off."""
        raise RuntimeError(_NO_GRAPHS)

    def get_cuda_graph_seq_len_fill_value(self):
        """Length of the padding rows of SGLang's dummy and padded batches (FlashInfer's autotune
        warm-up builds its decode buffers with it, with or without CUDA graphs): 1, the native
        backends' value (a one-token row attends to its own slot only)."""
        return 1

    def get_cpu_graph_seq_len_fill_value(self):
        """The same padding length for SGLang's CPU runner (``ForwardBatch`` padding on CPU)."""
        return 1

    def init_forward_metadata_for_breakable_cuda_graph_capture(self, forward_batch):
        """CUDA graphs are not supported: raises, naming the flags that turn them off."""
        raise RuntimeError(_NO_GRAPHS)

    # ------------------------------------------------------------------ CPU graphs: unsupported

    def init_cpu_graph_state(self, *args, **kwargs):
        """SGLang's CPU graphs (``--enable-torch-compile`` on CPU) are not supported: raises, naming the flag."""
        raise ConfigError(_NO_CPU_GRAPHS)

    def init_forward_metadata_capture_cpu_graph(self, *args, **kwargs):
        """SGLang's CPU graphs are not supported: raises, naming the flag."""
        raise ConfigError(_NO_CPU_GRAPHS)

    def support_triton(self):
        """The backend runs no Triton kernels of SGLang's."""
        return False


def _check_scorer(engine: EvictionEngine, model_runner) -> None:
    """Checks the foresight scorer against the model (layers, KV heads, group, head dim) when the
    runner carries SGLang's model config; the first eviction of each layer checks it again."""
    ck = engine.checkpoint
    mc = getattr(model_runner, "model_config", None)
    if ck is None or mc is None:
        return
    pool = model_runner.token_to_kv_pool
    try:
        group = mc.num_attention_heads // mc.get_total_num_kv_heads()
        ck.check_model(mc.num_hidden_layers, pool.head_num, group, pool.head_dim)
    except foresightkv.Error as e:
        raise ConfigError(f"foresightkv checkpoint does not fit the model: {e}") from e


def _reserve_stats(engine: EvictionEngine, model_runner) -> None:
    """Allocates every layer's per-slot statistics at start-up when the runner carries SGLang's model
    config (the query-head group is known), so that a shortage fails here, naming the fix. SGLang sized
    the KV pool with their bytes per slot counted (``hooks.cell_size_hook``), so they fit inside
    ``--mem-fraction-static``; the bytes reserved are logged."""
    mc = getattr(model_runner, "model_config", None)
    if mc is None:
        return
    pool = model_runner.token_to_kv_pool
    group = mc.num_attention_heads // mc.get_total_num_kv_heads()
    start = getattr(pool, "start_layer", 0) or 0
    layers = range(start, start + pool.layer_num)
    rows = pool.get_key_buffer(start).shape[0]
    need = len(layers) * rows * pool.head_num * group * hooks.STATS_BYTES
    try:
        total = engine.reserve_stats(layers, rows, 1, pool.head_num, group, pool.device)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError ("can't allocate memory")
        raise StatsMemoryError(need, str(pool.device), e) from e
    logger.info(
        "foresightkv: reserved %d bytes (%.3f GiB) of eviction statistics for %d layers x %d slots on %s",
        total,
        total / 2**30,
        len(layers),
        rows,
        pool.device,
    )


def _reserve_rings(engine: EvictionEngine, model_runner) -> None:
    """Allocates every layer's query rings at start-up for every request row of SGLang's
    ``ReqToTokenPool`` (its ``size``; row 0 is padding: a request holds state only while it holds a
    row, so no forward needs more), when the runner carries
    SGLang's model config. SGLang sized the KV pool from its budget less these rings
    (``hooks.pool_budget_hook``), so they fit inside ``--mem-fraction-static``; the bytes are logged and
    a failed allocation stops start-up with ``StatsMemoryError`` naming them."""
    mc = getattr(model_runner, "model_config", None)
    if mc is None or not engine.policy.evicts:
        return
    pool = model_runner.token_to_kv_pool
    rows = int(model_runner.req_to_token_pool.size)
    start = getattr(pool, "start_layer", 0) or 0
    layers = range(start, start + pool.layer_num)
    heads = pool.head_num * (mc.num_attention_heads // mc.get_total_num_kv_heads())
    dtype = getattr(model_runner, "dtype", None) or pool.dtype
    need = len(layers) * rows * engine.ring * heads * pool.head_dim * torch.empty(0, dtype=dtype).element_size()
    try:
        total = engine.reserve(
            max_requests=rows, layers=layers, num_q_heads=heads, head_dim=pool.head_dim, dtype=dtype, device=pool.device
        )
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        raise StatsMemoryError(need, str(pool.device), e, what="query rings") from e
    logger.info(
        "foresightkv: reserved %d bytes (%.3f GiB) of query rings for %d layers x %d request rows x %d queries on %s",
        total,
        total / 2**30,
        len(layers),
        rows,
        engine.ring,
        pool.device,
    )


class StatsMemoryError(ConfigError):
    """The eviction statistics (or the query rings) could not be allocated at start-up; the message
    names the bytes needed and the flags that make room."""

    def __init__(self, need: int, device: str, cause: BaseException, what: str = "eviction statistics") -> None:
        rings = " or --max-running-requests" if what == "query rings" else ""
        super().__init__(
            f"foresightkv could not allocate {need} bytes ({need / 2**30:.2f} GiB) on {device} for its "
            f"{what} next to the KV pool ({type(cause).__name__}: {cause}). Make room: lower "
            f"--mem-fraction-static (or --max-total-tokens{rings}); on CPU, free host memory"
        )
        #: Bytes the statistics need.
        self.needed = need


def _row_info(forward_batch, n: int, decode: bool):
    """``(prompt_lens, rng_keys)`` of the batch's rows for ``StepBatch``: from the requests
    (``hooks.RowInfo``, attached by SGLang's ``ForwardBatch.init_new``), else the victim-RNG keys from
    ``ForwardBatch.rids`` alone. Decode rows have no prompt length to give (-1: the request's state
    knows it)."""
    info = getattr(forward_batch, hooks.ROWS_ATTR, None)
    if info is not None and len(info.rng_keys) == n:
        prompts = [-1] * n if decode else list(info.prompt_lens)
        return (None if decode else prompts), list(info.rng_keys)
    rids = getattr(forward_batch, "rids", None)
    if rids is not None and len(rids) == n:
        return None, [request_rng_key(str(r)) for r in rids]
    return None, None


def _host_ints(cpu_values, tensor) -> np.ndarray:
    """A host int64 array of the column: from the host mirror SGLang keeps when present (a tensor,
    array or list), else from the tensor."""
    src = tensor if cpu_values is None else cpu_values
    if isinstance(src, torch.Tensor):
        src = src.cpu().numpy()
    return np.asarray(src, dtype=np.int64).reshape(-1)


def create_foresightkv_backend(model_runner) -> ForesightKVAttnBackend:
    """The factory SGLang calls for ``--attention-backend foresightkv``: reads the configuration from
    ``$FORESIGHTKV_CONFIG`` (JSON file or text), validates it against the runner, builds the backend."""
    config = EngineConfig.from_env(block_size=1)
    return ForesightKVAttnBackend(model_runner, config)

"""The hooks that make SGLang's own scheduler, memory sizing and request validation see foresightkv,
registered through SGLang's plugin hook API (``HookRegistry``) by ``plugin.register``.

Each hook is a no-op unless foresightkv is the attention backend of the objects it sees: at start-up
(``--attention-backend foresightkv`` in the server arguments), after it through the backend that
serves a ``ReqToTokenPool`` (``attach`` / ``backend_for``; the scheduler and the model runner of a
rank share a process, hence the pool object).

- Memory sizing: SGLang sizes the KV pool from ``--mem-fraction-static`` as available bytes over the
  bytes per token (``DefaultPoolConfigurator._compute_cell_size``). The hook adds the float32
  window statistics foresightkv keeps per slot (``stats_bytes_per_token``), so the pool shrinks by
  exactly the statistics' share and the statistics fit inside the fraction. The query rings (one
  per request row and layer, ``ring_bytes_per_request``) are taken off the budget before SGLang turns
  it into tokens (``KVCacheConfigurator.config_from_budget``), for the request rows SGLang will
  allocate: the user's ``--max-running-requests``, else as many requests as the budget holds at a
  full eviction window (``ring_requests``), which also caps SGLang's own default
  (``KVCacheConfigurator.resolve_max_num_reqs``). The backend then reserves the rings for every row.
- Requests: the ``ScheduleBatch``'s requests give each row of a forward its prompt length and
  victim-RNG key (``ForwardBatch.init_new``); a finished, aborted or retracted request's state is
  dropped when SGLang gives its ``req_to_token`` row back (``ReqToTokenPool.free_rows``); beam search
  (``beam_width > 1``), which shares slots between rows outside foresightkv's slot ledger, is refused
  per request through SGLang's own beam validation (the request is aborted with that message).
- Admission (``PrefillAdder``): with eviction a request never holds more than ``budget + interval +
  1`` slots (plus its prompt with ``protect_prompt``), so what SGLang reserves for its future tokens
  is capped at that footprint (``admission``)."""

import logging
import weakref
from typing import Any, List, Optional

import torch

from foresightkv.engine import EngineConfig, request_rng_key, ring_rows
from foresightkv.errors import ConfigError

from . import admission
from .plugin import BACKEND_NAME

logger = logging.getLogger(__name__)

#: Bytes of window statistics per slot, KV head, query of its group and layer (8 float32).
STATS_BYTES = 8 * 4

_BACKENDS: "weakref.WeakKeyDictionary[Any, weakref.ref]" = weakref.WeakKeyDictionary()


def attach(backend) -> None:
    """Makes ``backend`` the foresightkv backend of its ``ReqToTokenPool`` and token allocator (what the
    hooks consult)."""
    ref = weakref.ref(backend)
    _BACKENDS[backend.req_to_token_pool] = ref
    _BACKENDS[backend.allocator] = ref


def backend_for(pool) -> Optional[Any]:
    """The live foresightkv backend serving ``pool`` (a ``ReqToTokenPool`` or a token allocator), None
    when foresightkv does not."""
    if pool is None:
        return None
    try:
        ref = _BACKENDS.get(pool)
    except TypeError:
        return None
    return None if ref is None else ref()


# ---------------------------------------------------------------------- memory sizing


def stats_bytes_per_token(model_config, num_layers: int, attn_tp_size: int, config: EngineConfig) -> int:
    """Bytes of statistics foresightkv keeps per KV slot over ``num_layers`` layers: float32 ``[H, G,
    8]`` per layer (``H`` KV heads of this rank, ``G`` queries per KV head); 0 for a policy that never
    evicts (``full_cache``)."""
    if config.policy == "full_cache":
        return 0
    kv_heads = model_config.get_num_kv_heads(attn_tp_size)
    group = model_config.num_attention_heads // model_config.get_total_num_kv_heads()
    return num_layers * kv_heads * group * STATS_BYTES


def ring_bytes_per_request(model_config, num_layers: int, attn_tp_size: int, config: EngineConfig, dtype) -> int:
    """Bytes of the query rings foresightkv keeps per request row over ``num_layers`` layers: the last
    ``ring_rows(L)`` queries of the rank's query heads in the model dtype, per layer; 0 for a policy
    that never evicts (``full_cache``)."""
    if config.policy == "full_cache":
        return 0
    heads = model_config.get_num_attention_heads(attn_tp_size)
    return num_layers * ring_rows(config.interval) * heads * model_config.head_dim * torch.empty(0, dtype=dtype).element_size()


#: SGLang's own ceiling on its default request rows (``KVCacheConfigurator.resolve_max_num_reqs``).
MAX_DEFAULT_REQUESTS = 4096


def ring_requests(budget_bytes: int, per_token: int, per_request: int, window: int, requested: Optional[int]) -> int:
    """Request rows to reserve query rings for: ``requested`` (the user's ``--max-running-requests`` per
    worker) when given, else as many requests as ``budget_bytes`` holds at a full eviction window
    (``window`` slots of ``per_token`` bytes plus ``per_request`` bytes of rings each), at least 1 and
    at most SGLang's own default ceiling."""
    if requested is not None:
        return max(1, int(requested))
    fits = int(budget_bytes) // (int(window) * int(per_token) + int(per_request))
    return max(1, min(fits, MAX_DEFAULT_REQUESTS))


#: ``id(configurator) -> (configurator, request rows its budget reserved rings for)`` of the last few
#: configurators sized (``KVCacheConfigurator`` has slots: no attribute or weak reference can be added).
_RING_ROWS: "dict[int, tuple[Any, int]]" = {}


def _set_ring_rows(kvc, rows: int) -> None:
    while len(_RING_ROWS) >= 8 and id(kvc) not in _RING_ROWS:
        del _RING_ROWS[next(iter(_RING_ROWS))]
    _RING_ROWS[id(kvc)] = (kvc, int(rows))


def ring_rows_of(kvc) -> Optional[int]:
    """The request rows whose query rings ``kvc``'s budget reserved (``pool_budget_hook``), or None."""
    entry = _RING_ROWS.get(id(kvc))
    return entry[1] if entry is not None and entry[0] is kvc else None


class RingMemoryError(ConfigError):
    """The query rings of the requested running requests leave the KV pool no room for one request's
    eviction window; the message names the bytes and the flags that make room."""


def _ring_sizing(kvc):
    """``(per_request, per_token, window, requested)`` of foresightkv on configurator ``kvc``, or None
    when foresightkv does not serve it or keeps no rings."""
    if not _selected(getattr(kvc, "server_args", None)) or getattr(kvc, "is_draft_worker", False):
        return None
    from sglang.srt.runtime_context import get_parallel, get_schedule

    config = EngineConfig.from_env(block_size=1)
    tp = get_parallel().attn_tp_size
    mc, layers = kvc.model_config, kvc.layer_info.num_effective_layers
    per_request = ring_bytes_per_request(mc, layers, tp, config, kvc.model_dtype)
    if not per_request:
        return None
    kv_size = torch.empty(0, dtype=kvc.kv_cache_dtype).element_size()
    per_token = layers * mc.get_num_kv_heads(tp) * (mc.head_dim + mc.v_head_dim) * kv_size
    per_token += stats_bytes_per_token(mc, layers, tp, config)
    requested = get_schedule().max_running_requests
    if requested is not None:
        requested = max(1, int(requested) // max(1, int(getattr(kvc, "attn_dp_size", 1) or 1)))
    return per_request, per_token, config.budget + config.interval + 1, requested


def pool_budget_hook(original, kvc, budget_bytes, *args, **kwargs):
    """AROUND hook of ``KVCacheConfigurator.config_from_budget``: the KV pool is sized from the budget
    less the query rings of every request row SGLang will allocate (``ring_requests`` rows; its padding
    row 0 never holds a request), so rings, K/V and statistics all fit inside ``--mem-fraction-static``. Records the
    rows of the configurator (``ring_rows_of``) for ``max_requests_hook``; when SGLang would allocate
    fewer rows than that, the rings of the difference go back to the pool."""
    sizing = _ring_sizing(kvc)
    if sizing is None:
        return original(kvc, budget_bytes, *args, **kwargs)
    per_request, per_token, window, requested = sizing
    rows = ring_requests(budget_bytes, per_token, per_request, window, requested)
    for _ in range(2):
        rest = int(budget_bytes) - rows * per_request
        if rest < window * per_token:
            raise RingMemoryError(
                f"foresightkv's query rings for {rows} running requests need {rows * per_request} bytes "
                f"({rows * per_request / 2**30:.2f} GiB, {per_request} per request) of the "
                f"{int(budget_bytes)}-byte KV budget, leaving less than one eviction window ({window} slots of "
                f"{per_token} bytes): lower --max-running-requests or raise --mem-fraction-static"
            )
        _set_ring_rows(kvc, rows)
        config = original(kvc, rest, *args, **kwargs)
        sglang_rows = kvc.resolve_max_num_reqs(config.max_total_num_tokens)
        if sglang_rows >= rows:
            break
        rows = sglang_rows  # SGLang allocates fewer rows: size the rings (and the pool) for those
    logger.info(
        "foresightkv: %d bytes of query rings (%d per request, %d request rows) taken from the KV budget; "
        "%d tokens of K/V and statistics in the rest (more running requests: --max-running-requests)",
        rows * per_request,
        per_request,
        rows,
        config.max_total_num_tokens,
    )
    return config


def max_requests_hook(original, kvc, token_capacity, *args, **kwargs):
    """AROUND hook of ``KVCacheConfigurator.resolve_max_num_reqs``: SGLang's request rows, capped at the
    rows whose query rings the budget reserved (``pool_budget_hook``)."""
    rows = original(kvc, token_capacity, *args, **kwargs)
    cap = ring_rows_of(kvc)
    if cap is None or rows <= cap:
        return rows
    logger.debug("foresightkv: max_running_requests %d -> %d (the rows whose query rings fit the budget)", rows, cap)
    return cap


def _selected(server_args) -> bool:
    """Whether ``server_args`` select foresightkv as the attention backend."""
    return getattr(server_args, "attention_backend", None) == BACKEND_NAME


def cell_size_hook(original, configurator, kvc, num_layers, *args, **kwargs):
    """AROUND hook of ``DefaultPoolConfigurator._compute_cell_size``: the KV bytes per token plus
    foresightkv's statistics per token, so that ``--mem-fraction-static`` covers both. Reads (and
    validates) ``$FORESIGHTKV_CONFIG`` here, before the pool exists."""
    cell = original(configurator, kvc, num_layers, *args, **kwargs)
    if not _selected(getattr(kvc, "server_args", None)) or getattr(kvc, "is_draft_worker", False):
        return cell
    from sglang.srt.runtime_context import get_parallel

    config = EngineConfig.from_env(block_size=1)
    extra = stats_bytes_per_token(kvc.model_config, num_layers, get_parallel().attn_tp_size, config)
    if extra:
        logger.info(
            "foresightkv: %d bytes of eviction statistics per KV slot next to %d bytes of K/V; "
            "the KV pool is sized for both within --mem-fraction-static",
            extra,
            cell,
        )
    return cell + extra


# ---------------------------------------------------------------------- requests


#: Attribute of a ``ForwardBatch`` holding its rows' request information (``RowInfo``).
ROWS_ATTR = "foresightkv_rows"


class RowInfo:
    """Per row of a forward, from the ``ScheduleBatch``'s requests: ``prompt_lens`` (the length of the
    request's prompt, ``len(origin_input_ids)``; for a retracted request that SGLang recomputes too,
    whose generated tokens then follow the regular schedule), and ``rng_keys``
    (``request_rng_key(rid, sampling_seed)``)."""

    __slots__ = ("prompt_lens", "rng_keys")

    def __init__(self, prompt_lens: List[int], rng_keys: List[int]) -> None:
        self.prompt_lens = prompt_lens
        self.rng_keys = rng_keys


def annotate_forward_batch(forward_batch, reqs) -> None:
    """Attaches ``RowInfo`` of ``reqs`` (batch order) to ``forward_batch``."""
    prompt_lens = [len(r.origin_input_ids) for r in reqs]
    rng_keys = [request_rng_key(str(r.rid), getattr(r.sampling_params, "sampling_seed", None)) for r in reqs]
    setattr(forward_batch, ROWS_ATTR, RowInfo(prompt_lens, rng_keys))


def init_new_hook(result, *args, **kwargs):
    """AFTER hook of ``ForwardBatch.init_new(batch, model_runner, ...)``: annotates the forward batch
    of a foresightkv model runner with its requests' ``RowInfo``."""
    batch = kwargs.get("batch", args[1] if len(args) > 1 else None)
    runner = kwargs.get("model_runner", args[2] if len(args) > 2 else None)
    reqs = getattr(batch, "reqs", None)
    if reqs is None or backend_for(getattr(runner, "req_to_token_pool", None)) is None:
        return None
    if len(reqs) == result.batch_size:
        annotate_forward_batch(result, reqs)
    return None


def free_rows_hook(pool, rows, *args, **kwargs):
    """BEFORE hook of ``ReqToTokenPool.free_rows``: SGLang gives these rows back (the request
    finished, was aborted or retracted), so foresightkv drops their per-request state now."""
    backend = backend_for(pool)
    if backend is not None:
        backend.release_rows(list(rows))
    return None


#: The message a beam-search request is aborted with.
BEAM_REFUSED = (
    "foresightkv does not support beam search (beam_width > 1): beam members share and remap KV slots "
    "outside foresightkv's slot ledger, so an eviction would free or rewrite a slot another beam still "
    "reads. Send beam_width 1, or serve beam search with another --attention-backend"
)


def beam_hook(original, coordinator, req, recv_req, *args, **kwargs):
    """AROUND hook of ``BeamCoordinator.validate_and_init``: refuses beam requests on a foresightkv
    pool (SGLang aborts the request with the message, status 400)."""
    if backend_for(getattr(coordinator, "req_to_token_pool", None)) is not None:
        return BEAM_REFUSED
    return original(coordinator, req, recv_req, *args, **kwargs)


#: (target, hook, hook type name) of every hook the plugin registers.
HOOKS = (
    (
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        cell_size_hook,
        "AROUND",
    ),
    ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget", pool_budget_hook, "AROUND"),
    ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.resolve_max_num_reqs", max_requests_hook, "AROUND"),
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", init_new_hook, "AFTER"),
    ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows", free_rows_hook, "BEFORE"),
    ("sglang.srt.beam_search.coordinator.BeamCoordinator.validate_and_init", beam_hook, "AROUND"),
) + admission.HOOKS

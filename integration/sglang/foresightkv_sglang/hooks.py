"""The hooks that make SGLang's own scheduler, memory sizing and request validation see foresightkv,
registered through SGLang's plugin hook API (``HookRegistry``) by ``plugin.register``.

Each hook is a no-op unless foresightkv is the attention backend of the objects it sees: at start-up
(``--attention-backend foresightkv`` in the server arguments), after it through the backend that
serves a ``ReqToTokenPool`` (``attach`` / ``backend_for``; the scheduler and the model runner of a
rank share a process, hence the pool object).

- Memory sizing: SGLang sizes the KV pool from ``--mem-fraction-static`` as available bytes over the
  bytes per token (``DefaultPoolConfigurator._compute_cell_size``). The hook adds the float32
  window statistics foresightkv keeps per slot (``stats_bytes_per_token``), so the pool shrinks by
  exactly the statistics' share and the statistics fit inside the fraction.
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

from foresightkv.engine import EngineConfig, request_rng_key

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
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", init_new_hook, "AFTER"),
    ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows", free_rows_hook, "BEFORE"),
    ("sglang.srt.beam_search.coordinator.BeamCoordinator.validate_and_init", beam_hook, "AROUND"),
) + admission.HOOKS

"""Releases foresightkv's per-request state when vLLM's model runner drops a finished or aborted
request, or learns that one was preempted, instead of when one of its blocks is next handed to another
request (``RequestKeys``' fallback, which under a large, lightly used pool can keep a request's state
for long).

vLLM hands attention backends no request ids, but the V1 model runner (``GPUModelRunner``, and the
CPU runner, its subclass) learns of every finished or aborted request (``SchedulerOutput.
finished_req_ids``) and of every request preempted since the last step (``preempted_req_ids``, which
vLLM 0.32's scheduler fills for every runner) at the start of the next step, while it still holds the
request's block ids and computed-token count (``CachedRequestState``). ``install`` wraps
``GPUModelRunner._update_states`` so that, before vLLM forgets them and before that step's forward
writes anything, each foresightkv builder of that runner releases the request anchored in the
request's newest blocks (``release_requests``).

A preempted request is recomputed from scratch when it resumes (a new state then), and the runner
keeps its old block ids, which vLLM freed at the preemption and may hand to other requests; so a
request released at preemption is remembered until it resumes or finishes, and its finish releases
nothing (its stale blocks may hold another request's anchor by then). Model Runner V2 keeps its
block tables on the device and is not wrapped: there the fallback holds."""

import functools
import threading
from typing import Any, Iterable, List

import numpy as np

_lock = threading.Lock()
#: Attribute holding vLLM's original ``_update_states`` on the wrapper (``functools.wraps``'s; install
#: is idempotent).
_ORIGINAL = "__wrapped__"
#: Attribute of a runner holding the ids of the requests released at their preemption that have not
#: resumed or finished since.
_PREEMPTED = "_foresightkv_preempted"


def foresightkv_builders(runner) -> List[Any]:
    """``(kv_cache_group_id, builder)`` of every foresightkv metadata builder of ``runner``."""
    from .backend import ForesightKVMetadataBuilder

    out = []
    for gid, groups in enumerate(getattr(runner, "attn_groups", None) or []):
        for group in groups:
            for builder in getattr(group, "metadata_builders", None) or []:
                if isinstance(builder, ForesightKVMetadataBuilder):
                    out.append((gid, builder))
    return out


def release_anchored(runner, req_ids: Iterable[str]) -> int:
    """Releases, in every foresightkv builder of ``runner``, the state of each request of
    ``req_ids`` that ``runner.requests`` still holds, found by its blocks; returns the number released.

    The request's key is anchored in the block of its last written token, at block index
    ``(length - 1) // block_size`` of its own table, with ``length > num_computed_tokens`` (the
    runner's count at the start of the request's last step). Only blocks from index
    ``num_computed_tokens // block_size`` on are looked at: those still held the request's newest
    tokens when vLLM freed them, so no other request can be anchored there yet (an anchor is filed
    only when a step writes into a block), whereas vLLM's sliding-window manager may have handed
    the request's older blocks to others while the runner's copy of its table still lists them."""
    req_ids = list(req_ids)
    requests = getattr(runner, "requests", None)
    if not requests or not req_ids:
        return 0
    released = 0
    seen = set()
    for gid, builder in foresightkv_builders(runner):
        keys = builder.keys
        if id(keys) in seen:
            continue
        seen.add(id(keys))
        for rid in req_ids:
            state = requests.get(rid)
            if state is None or gid >= len(state.block_ids):
                continue
            released += keys.release_anchored(np.asarray(state.block_ids[gid], dtype=np.int64),
                                              int(state.num_computed_tokens))
    return released


def release_requests(runner, scheduler_output) -> int:
    """Releases the state of the requests ``scheduler_output`` reports preempted or finished (the
    finish of one released at its preemption and not resumed since releases nothing: its block ids
    are stale); returns the number released. Called before vLLM's runner updates its states."""
    preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
    finished = set(getattr(scheduler_output, "finished_req_ids", None) or ())
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    resumed = set(getattr(cached, "resumed_req_ids", None) or ())
    gone = runner.__dict__.setdefault(_PREEMPTED, set())
    if not (preempted or finished or gone):
        return 0
    now = (preempted - gone) | (finished - gone - preempted)
    released = release_anchored(runner, now)
    gone |= preempted
    gone -= finished | resumed
    return released


def _wrap(original):
    """``GPUModelRunner._update_states`` releasing the preempted and finished requests' state first."""

    @functools.wraps(original)
    def _update_states(self, scheduler_output, *args, **kwargs):
        release_requests(self, scheduler_output)
        return original(self, scheduler_output, *args, **kwargs)

    return _update_states


def install() -> bool:
    """Wraps the V1 runner's ``_update_states`` (once per process); False when this vLLM has no V1
    runner of that shape (then ``RequestKeys``' release on block reuse is the only one)."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return False
    with _lock:
        current = getattr(GPUModelRunner, "_update_states", None)
        if current is None:
            return False
        if not hasattr(current, _ORIGINAL):
            GPUModelRunner._update_states = _wrap(current)
    return True


def uninstall() -> None:
    """Restores vLLM's own ``_update_states`` (tests)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    with _lock:
        current = GPUModelRunner._update_states
        original = getattr(current, _ORIGINAL, None)
        if original is not None:
            GPUModelRunner._update_states = original

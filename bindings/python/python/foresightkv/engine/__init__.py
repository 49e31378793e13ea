"""The engine-neutral attention + eviction step the serving-engine plugins (SGLang, vLLM) share.

- ``EngineConfig``: the plugin options (budget, interval, policy and its parameters), validated.
- ``EvictionEngine``: per-request state (recent queries, statistics, ``live_start``) and the step:
  ``begin_step`` plans a forward and commits the previous step's evictions, ``attend`` runs one
  layer's attention over the live windows of a paged cache read in place and evicts when due.
- ``next_live_start``: the core's eviction schedule, for engine code that frees memory.

With ``protect_prompt`` the prompt (rounded up to a block) is never evicted: attention reads
``[0, protected_len) ∪ [max(live_start, protected_len), len)`` and an ``Advance`` frees
``[evicted_from, new_live_start)`` only.

Requires torch."""

from .config import CONFIG_ENV, POLICIES, EngineConfig
from .schedule import align_down, align_up, next_live_start
from .step import Advance, EvictionEngine, RequestState, StepPlan, StepRequest

__all__ = [
    "CONFIG_ENV",
    "POLICIES",
    "Advance",
    "EngineConfig",
    "EvictionEngine",
    "RequestState",
    "StepPlan",
    "StepRequest",
    "align_down",
    "align_up",
    "next_live_start",
]

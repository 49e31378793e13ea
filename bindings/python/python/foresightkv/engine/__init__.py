"""The engine-neutral attention + eviction step the serving-engine plugins (SGLang, vLLM) share.

- ``EngineConfig``: the plugin options (budget, interval, policy and its parameters), validated.
- ``EvictionEngine``: per-request state (recent queries, statistics) and the step: ``begin_step``
  plans a forward with one call of the core's batched planner (``foresightkv.WindowPlanner``, the
  same live window and schedule as ``KvCacheManager``) and commits the previous step's evictions,
  ``attend`` runs one layer's attention over the live windows of a paged cache read in place and
  evicts when due.
- ``StepBatch`` (columns, what plugins build) or ``StepRequest`` (one request): the input of a step.
- ``EvictionBatch`` / ``choose_survivors`` (``victims``): the victim choice of every policy on the
  device, batched over a layer's due requests and KV heads; an ``on_evict`` hook of the engine
  receives the batch.

With ``protect_prompt`` the prompt (rounded up to a block) is never evicted: attention reads
``[0, protected_len) ∪ [max(live_start, protected_len), len)`` and an ``Advance`` frees
``[evicted_from, new_live_start)`` only.

Requires torch."""

from .config import CONFIG_ENV, POLICIES, EngineConfig
from .step import Advance, EvictionEngine, StepBatch, StepPlan, StepRequest, request_rng_key, ring_rows
from .victims import EvictionBatch, choose_survivors

__all__ = [
    "CONFIG_ENV",
    "POLICIES",
    "Advance",
    "EngineConfig",
    "EvictionBatch",
    "EvictionEngine",
    "StepBatch",
    "StepPlan",
    "StepRequest",
    "choose_survivors",
    "request_rng_key",
    "ring_rows",
]

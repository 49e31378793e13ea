"""The quality testbed: a real model, its own traces over seeded long-context tasks, the eviction
simulator (the paper's teacher-forced chunked forward through the serving step) and the harness.

- ``model``: loading any HF Llama/Qwen2/Qwen3 directory; routing its attention through foresightkv.
- ``tasks``: seeded tasks with exact answers far back in the context; the natural text.
- ``traces``: trace sets (the model's own full-cache answers), one safetensors file per split.
- ``simulate``: ``simulate(model, input_ids, *, prompt_len, policy, budget, interval, ...)``.
- ``generate``: generation with eviction through ``foresightkv.engine``.
- ``harness``: loss ratio, accuracy and attention mass of every policy and budget.

Requires torch and transformers (and safetensors, tqdm, matplotlib for traces and plots)."""

from .simulate import (
    POLICIES,
    EvictionEvent,
    GoldenRun,
    SimResult,
    record_full,
    simulate,
)

__all__ = [
    "POLICIES",
    "EvictionEvent",
    "GoldenRun",
    "SimResult",
    "record_full",
    "simulate",
]

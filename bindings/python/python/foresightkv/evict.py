"""Eviction policies, scorer checkpoints, traces and Golden Eviction (``Policy``, ``ScorerCheckpoint``,
``Trace``, ``simulate``, ``golden_eviction``, ``sample_victims`` from the native module), plus ``scorer_weights``, which
turns one layer of a checkpoint into the tensors ``kernels.scorer_mlp`` takes."""

from typing import Any, Optional, Tuple

from ._native import Policy, ScorerCheckpoint, Trace, golden_eviction, sample_victims, simulate

__all__ = ["Policy", "ScorerCheckpoint", "Trace", "golden_eviction", "sample_victims", "scorer_weights", "simulate"]


def scorer_weights(checkpoint: ScorerCheckpoint, layer: int, device: Optional[Any] = None) -> Tuple[Any, Any, Any, Any]:
    """``(w1, b1, w2, b2)`` of ``layer`` as float32 torch tensors on ``device`` (CPU when None), in the
    layout ``kernels.scorer_mlp`` reads: ``[H, 16, in_dim]``, ``[H, 16]``, ``[H, 16]``, ``[H]``."""
    import torch

    raw = checkpoint.layer_weights(layer)
    out = []
    for name in ("w1", "b1", "w2", "b2"):
        shape, buf = raw[name]
        t = torch.frombuffer(bytearray(buf), dtype=torch.float32).reshape(shape)
        out.append(t if device is None else t.to(device))
    return tuple(out)

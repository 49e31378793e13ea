"""Host-to-device copies of the step's small index arrays, queued on the stream instead of waiting
for it (a copy from pageable host memory makes the host wait for every kernel already queued)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch


def to_device(x: Any, device: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` (a numpy array, a list of numbers or a CPU tensor) as a tensor on ``device``, of
    ``dtype`` when given. On CUDA the copy goes through pinned memory with ``non_blocking=True``:
    queued on the current stream, no synchronisation (PyTorch's caching host allocator keeps the
    pinned buffer until the copy has run). On the CPU a tensor or numpy array is returned without a
    copy (as ``.to("cpu")`` would)."""
    device = torch.device(device)
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        t = torch.tensor(x, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

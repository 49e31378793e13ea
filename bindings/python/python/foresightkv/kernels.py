"""The kernels over tensors: thin wrappers of the native functions that allocate outputs when the
caller passes none. Tensors are ``torch.Tensor`` (CPU or CUDA) or ``numpy.ndarray`` (CPU), read and
written in place; every argument is validated in Rust before any memory is touched.

Shapes (``S`` sequences, ``Hq`` query heads, ``H`` KV heads, ``G = Hq / H``, ``D`` head dim):

- cache: ``[num_blocks, block_size, H, D]`` any strides with ``D`` contiguous (a permuted view of a
  head-major cache works in place);
- ``block_tables``: int32 ``[S, width]``; ``seq_lens``, ``live_starts``: int32 ``[S]``;
- statistics: float32 ``[num_blocks, block_size, H, G, 8]``;
- per-slot matrices (``scores`` float32, ``survivors`` int32): ``[S, H, max_live]``.

``select_survivors`` evicts the top scores; ``sample_survivors`` draws the victims as ForesightKV does
(top ``2 n`` by score, then ``n`` by softmax with Philox noise), bit for bit the same on CPU and CUDA.
"""

from typing import Any, Optional

from . import _native
from ._native import (
    compact,
    reshape_and_cache,
    sample_survivors,
    scorer_mlp,
    select_survivors,
    window_stats,
)

__all__ = [
    "compact",
    "paged_attention_decode",
    "reshape_and_cache",
    "sample_survivors",
    "scorer_mlp",
    "select_survivors",
    "window_stats",
]


def _empty_like(x: Any) -> Any:
    """A fresh contiguous tensor/array shaped like ``x``, or ``x`` itself when it is neither a torch
    tensor nor an ndarray (the native call then rejects it, naming the argument)."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        import torch

        if isinstance(x, torch.Tensor) and x.layout == torch.strided:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if mod == "numpy":
        import numpy

        if isinstance(x, numpy.ndarray):
            return numpy.empty(x.shape, dtype=x.dtype)
    return None


def paged_attention_decode(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    live_starts: Any,
    *,
    scale: Optional[float] = None,
    out: Any = None,
    seq_lens_host: Any = None,
    live_starts_host: Any = None,
) -> Any:
    """Decode attention of each sequence's query ``[S, Hq, D]`` over its live window of the paged
    cache (GQA, float32 accumulation); returns ``out`` (allocated like ``query`` when None).
    ``seq_lens_host`` / ``live_starts_host``: CPU int32 copies of the windows the caller keeps (the
    op then reads no device array on the host, so it does not wait for the device)."""
    if out is None:
        out = _empty_like(query)
    _native.paged_attention_decode(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        live_starts,
        out,
        scale,
        seq_lens_host=seq_lens_host,
        live_starts_host=live_starts_host,
    )
    return out

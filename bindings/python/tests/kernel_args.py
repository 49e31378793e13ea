"""What the kernel-argument tests share (test_hostile.py, test_kernels.py and fuzz_tensors_driver.py,
which the fuzz test runs in its own interpreter): valid keyword arguments of every kernel over a small
cache, which of them each kernel writes, and a foreign tensor that only speaks DLPack."""

import torch

#: The small cache: block size, blocks, KV heads, head dim, query heads per KV head.
BS, NB, H, D, G = 2, 6, 2, 4, 2

#: The arguments each kernel writes in place.
OUTPUTS = {
    "reshape_and_cache": ["key_cache", "value_cache"],
    "paged_attention_decode": ["out"],
    "window_stats": ["stats"],
    "scorer_mlp": ["scores"],
    "select_survivors": ["survivors"],
    "compact": ["key_cache", "value_cache", "stats"],
}
KERNELS = sorted(OUTPUTS)


class DLPackOnly:
    """A foreign tensor that only speaks DLPack (as CuPy or JAX arrays do)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, *args, **kwargs):
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def valid_args(kernel, gen=None):
    """Valid keyword arguments of ``kernel`` (two sequences over a small cache); random values come
    from ``gen`` (default: a generator seeded 0)."""
    gen = torch.Generator().manual_seed(0) if gen is None else gen
    kc = torch.randn(NB, BS, H, D, generator=gen)
    vc = torch.randn(NB, BS, H, D, generator=gen)
    bt = torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32)
    sl = torch.tensor([6, 3], dtype=torch.int32)
    ls = torch.tensor([2, 0], dtype=torch.int32)
    stats = torch.zeros(NB, BS, H, G, 8)
    if kernel == "reshape_and_cache":
        return dict(key=torch.randn(3, H, D, generator=gen), value=torch.randn(3, H, D, generator=gen),
                    key_cache=kc, value_cache=vc, slot_mapping=torch.tensor([0, 5, -1]))
    if kernel == "paged_attention_decode":
        return dict(query=torch.randn(2, H * G, D, generator=gen), key_cache=kc, value_cache=vc, block_tables=bt,
                    seq_lens=sl, live_starts=ls, out=torch.zeros(2, H * G, D))
    if kernel == "window_stats":
        return dict(queries=torch.randn(2, 3, H * G, D, generator=gen),
                    num_queries=torch.tensor([3, 1], dtype=torch.int32), key_cache=kc, block_tables=bt, seq_lens=sl,
                    live_starts=ls, stats=stats)
    if kernel == "scorer_mlp":
        in_dim = 2 * D + 8 * G
        return dict(key_cache=kc, value_cache=vc, block_tables=bt, seq_lens=sl, live_starts=ls, stats=stats,
                    w1=torch.randn(H, 16, in_dim, generator=gen), b1=torch.zeros(H, 16), w2=torch.zeros(H, 16),
                    b2=torch.full((H,), 0.5), scores=torch.zeros(2, H, 4))  # b2 != 0: a write would show
    if kernel == "select_survivors":
        return dict(seq_lens=sl, live_starts=ls, scores=torch.randn(2, H, 4, generator=gen),
                    num_evict=torch.tensor([2, 1], dtype=torch.int32), survivors=torch.zeros(2, H, 4, dtype=torch.int32))
    if kernel == "compact":
        surv = torch.tensor([[[2, 3, 0, 0], [1, 3, 0, 0]], [[0, 1, 2, 0], [0, 1, 2, 0]]], dtype=torch.int32)
        return dict(key_cache=kc, value_cache=vc, block_tables=bt, seq_lens=sl, live_starts=ls,
                    num_evict=torch.tensor([2, 0], dtype=torch.int32), survivors=surv, stats=stats)
    raise AssertionError(kernel)

"""Shared helpers of the foresightkv Python tests: manager consistency checks and naive PyTorch
references of the kernels (written from the documented contracts, loop by loop)."""

import math
from typing import Dict, List

import pytest
import torch

import foresightkv as fkv


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    matrices on a busy machine are far faster without OpenMP barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def check_consistent(m: fkv.KvCacheManager) -> Dict:
    """Asserts the manager's invariants from its snapshot; returns the snapshot."""
    snap = m.snapshot()
    cfg = m.config
    bs = cfg.block_size
    refs = [0] * cfg.num_blocks
    for seq_id, s in snap["sequences"].items():
        n = len(s["tokens"])
        assert s["live_start"] % bs == 0, (seq_id, s["live_start"])
        assert 0 <= s["live_start"] <= n
        assert len(s["blocks"]) == -(-n // bs), (seq_id, len(s["blocks"]), n)
        for i, b in enumerate(s["blocks"]):
            if b is None:
                assert i * bs < s["live_start"], (seq_id, i, "released block inside the live window")
            else:
                refs[b] += 1
    for src, _dst in snap["pending_copies"]:
        refs[src] += 1
    assert snap["refcounts"] == refs
    free = sorted(snap["free_queue"])
    assert free == [b for b, r in enumerate(refs) if r == 0]
    assert m.num_free_blocks == len(free)
    assert m.num_sequences == len(snap["sequences"])
    return snap


def gather_live(cache: torch.Tensor, table: List[int], start: int, end: int, bs: int, head: int) -> torch.Tensor:
    """Rows of logical positions [start, end) of one KV head, as float64 [end - start, D]."""
    rows = [cache[table[p // bs], p % bs, head].double() for p in range(start, end)]
    if not rows:
        return torch.zeros(0, cache.shape[-1], dtype=torch.float64)
    return torch.stack(rows)


def ref_decode(query, key_cache, value_cache, block_tables, seq_lens, live_starts, scale=None):
    """Naive decode attention: softmax(scale * q.k) v over each live window, float64."""
    num_seqs, hq, d = query.shape
    hkv, bs = key_cache.shape[2], key_cache.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(num_seqs, hq, d, dtype=torch.float64)
    for s in range(num_seqs):
        start, end = int(live_starts[s]), int(seq_lens[s])
        table = [int(x) for x in block_tables[s]]
        for h in range(hq):
            k = gather_live(key_cache, table, start, end, bs, h // g)
            v = gather_live(value_cache, table, start, end, bs, h // g)
            if k.shape[0] == 0:
                continue
            p = torch.softmax((k @ query[s, h].double()) * scale, dim=0)
            out[s, h] = p @ v
    return out


def ref_window_stats(
    queries, num_queries, key_cache, block_tables, seq_lens, live_starts, stats, scale=None, window=None, mode="paper"
):
    """Naive window statistics (the 8 ForesightKV statistics), updating a float64 copy of ``stats``:
    the last ``min(n, window)`` query rows are the window, earlier rows are folded into the
    cumulative ones; decayed = 0.9 * (old + folded) + window sum; ``mode="official"`` sets
    sum8/16/32 to the window sum."""
    out = stats.double().clone()
    num_seqs, _, hq, d = queries.shape
    hkv, bs = key_cache.shape[2], key_cache.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    for s in range(num_seqs):
        n = int(num_queries[s])
        if n == 0:
            continue
        w = n if not window else min(n, window)
        f = n - w
        start, end = int(live_starts[s]), int(seq_lens[s])
        live = end - start
        base = live - n
        table = [int(x) for x in block_tables[s]]
        for h in range(hq):
            kh, gi = h // g, h % g
            k = gather_live(key_cache, table, start, end, bs, kh)
            probs = torch.zeros(n, live, dtype=torch.float64)
            for j in range(n):
                logits = (k[: base + j + 1] @ queries[s, j, h].double()) * scale
                probs[j, : base + j + 1] = torch.softmax(logits, dim=0)
            for i in range(live):
                first = max(f, i - base)
                seen = probs[first:, i]
                col = probs[f:, i]
                folded = float(probs[:f, i].sum())
                pos = start + i
                row = out[table[pos // bs], pos % bs, kh, gi]
                old_cum, old_dec = (float(row[6]), float(row[7])) if i < base else (0.0, 0.0)
                total = col.sum()
                row[0] = seen.max()
                row[1] = seen.min()
                row[2] = total
                for slot, last in ((3, 8), (4, 16), (5, 32)):
                    row[slot] = total if mode == "official" else col[max(0, w - last) :].sum()
                row[6] = old_cum + folded + total
                row[7] = 0.9 * (old_dec + folded) + total
    return out


def ref_scorer(key_cache, value_cache, block_tables, seq_lens, live_starts, stats, w1, b1, w2, b2, max_live):
    """Naive scorer MLP: concat(k, v, stats) -> Linear(16) -> GELU (erf) -> Linear(1), float64."""
    num_seqs = len(seq_lens)
    hkv, bs = key_cache.shape[2], key_cache.shape[1]
    scores = torch.full((num_seqs, hkv, max_live), float("nan"), dtype=torch.float64)
    for s in range(num_seqs):
        start, end = int(live_starts[s]), int(seq_lens[s])
        table = [int(x) for x in block_tables[s]]
        for kh in range(hkv):
            for i, pos in enumerate(range(start, end)):
                blk, off = table[pos // bs], pos % bs
                x = torch.cat([key_cache[blk, off, kh].double(), value_cache[blk, off, kh].double(), stats[blk, off, kh].reshape(-1).double()])
                hidden = torch.nn.functional.gelu(w1[kh].double() @ x + b1[kh].double())
                scores[s, kh, i] = w2[kh].double() @ hidden + b2[kh].double()
    return scores


def ref_select(seq_lens, live_starts, scores, num_evict, num_protected):
    """Naive top-k selection: survivors (ascending) per (sequence, KV head)."""
    result = []
    for s in range(len(seq_lens)):
        live = int(seq_lens[s]) - int(live_starts[s])
        cands = max(0, live - num_protected)
        rows = []
        for kh in range(scores.shape[1]):
            order = sorted(range(cands), key=lambda i: (-float(scores[s, kh, i]), i))
            gone = set(order[: int(num_evict[s])])
            rows.append([i for i in range(live) if i not in gone])
        result.append(rows)
    return result


cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and fkv.gpu_available() and fkv.kernels_compiled()),
    reason="needs a visible GPU, a CUDA build of torch and foresightkv built with its CUDA kernels",
)

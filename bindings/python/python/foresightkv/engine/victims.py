"""Victim choice on the device: the eviction scores of every policy over all due requests and KV
heads of one layer at once, as batched tensor ops on the cache's device (ForesightKV: the
``scorer_mlp`` kernel), then the shared selection kernels: ``select_survivors`` (evict the highest
scores outside the newest ``L`` slots; ties: the older slot goes first) or, for ForesightKV with
sampling, ``sample_survivors`` (top ``2 n`` then Philox Gumbel top-k, bit for bit the core's draw).
No key, value, statistic or query is copied to the host.

Each baseline's scores follow its definition in the core (src/evict/baselines.rs), parameters read
from ``Policy.params``:

- StreamingLLM: ``-position``, ``-inf`` for the first ``sinks`` original positions;
- H2O: minus the cumulative statistic summed over the GQA group (in the core's order: exact);
- TOVA: minus the last query's softmax averaged over the GQA group;
- SnapKV / R-KV: the observation-window importance of the R-KV code (window 8: max of the logits over
  the group, softmax over the entries before the window, mean over the window's queries, max-pooled
  with ``kernel``); R-KV mixes it with the key redundancy (cosine similarity, the most recent entry of a
  pair above ``threshold`` spared, softmax of the column means); the window's own entries ``-inf``;
- random: the Philox uniform of (seed, request, layer, head, eviction, slot), bit for bit the core's.

Float scores come from the same formulas in another summation order than the core's loops, so they
match the core's to rounding (the selection then agrees except for scores within rounding of each
other); H2O, StreamingLLM and random are exact."""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import kernels
from .._native import Policy
from ..errors import ConfigError
from .transfer import to_device

#: Index of the cumulative attention statistic (``window_stats``' stat 6), which H2O reads.
STAT_CUMULATIVE = 6

#: Bytes of float32 working set the R-KV redundancy (``[S, H, N, N]``) may take per chunk of requests.
_RKV_CHUNK_BYTES = 256 << 20

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


@dataclass
class EvictionBatch:
    """The inputs of one layer's eviction over its ``S`` due requests, batched on the cache's device:
    what the victim choice reads and what an ``on_evict`` hook of ``EvictionEngine`` receives.

    Windows are in the kernels' coordinates (``block_tables`` rows with the evicted middle cut out in
    protect mode): request ``j``'s evictable entries are window slots ``[live_starts[j],
    seq_lens[j])``, ``live[j]`` of them, ``num_evict[j]`` to go, the newest ``num_protected`` never.
    ``queries`` ``[S, maxq, Hq, D]`` (cache dtype) holds the ``num_queries[j]`` queries of request
    ``j`` since its last eviction in rows ``[0, num_queries[j])``, oldest first; ``positions``
    ``[S, H, max_live]`` int64 the original positions of the evictable entries (``-1`` past
    ``live[j]``). Host lists (``live``, ``num_evict_host``, ``num_queries_host``, ``lengths`` = the
    requests' lengths in original positions, ``evictions`` = evictions each request-layer had before,
    ``requests`` = the request part of each victim RNG key, ``keys`` = the engine's request keys) are
    what the engine's plan already holds, so nothing is read back from the device; ``seq_lens_host``
    / ``live_starts_host`` (CPU int32, equal to ``seq_lens`` / ``live_starts``; None: the kernels
    read the device arrays, which waits for the device) are passed to every kernel of the choice."""

    layer: int
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    stats: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    live_starts: torch.Tensor
    num_evict: torch.Tensor
    queries: torch.Tensor
    num_queries: torch.Tensor
    positions: torch.Tensor
    live: List[int]
    num_evict_host: List[int]
    num_queries_host: List[int]
    lengths: List[int]
    evictions: List[int]
    requests: List[int]
    keys: List[int]
    num_protected: int
    scale: float
    block_size: int
    seq_lens_host: Optional[torch.Tensor] = None
    live_starts_host: Optional[torch.Tensor] = None
    _slots: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    def host_windows(self) -> Dict[str, Optional[torch.Tensor]]:
        """The host mirrors of the windows as the kernels' keyword arguments."""
        return {"seq_lens_host": self.seq_lens_host, "live_starts_host": self.live_starts_host}

    def host_selection(self) -> Dict[str, Optional[torch.Tensor]]:
        """``host_windows`` plus ``num_evict_host`` as a CPU int32 tensor (the selection kernels' and
        ``compact``'s keyword arguments)."""
        return dict(self.host_windows(), num_evict_host=torch.tensor(self.num_evict_host, dtype=torch.int32))

    @property
    def num_seqs(self) -> int:
        """Due requests ``S``."""
        return len(self.live)

    @property
    def max_live(self) -> int:
        """Columns of the per-slot matrices: the largest evictable window."""
        return self.positions.shape[2]

    @property
    def num_kv_heads(self) -> int:
        """KV heads ``H``."""
        return self.key_cache.shape[2]

    @property
    def group(self) -> int:
        """Query heads per KV head ``G``."""
        return self.queries.shape[2] // self.num_kv_heads

    def slots(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(blocks, offsets, valid)`` ``[S, max_live]`` of every evictable window slot (padding slots
        point at the window's first entry and are not ``valid``); computed once."""
        if self._slots is None:
            dev = self.block_tables.device
            start = self.live_starts.long().unsqueeze(1)
            idx = torch.arange(self.max_live, device=dev).unsqueeze(0)
            valid = idx < (self.seq_lens.long().unsqueeze(1) - start)
            pos = torch.where(valid, start + idx, start)
            blocks = self.block_tables.long().gather(1, pos // self.block_size)
            self._slots = (blocks, pos % self.block_size, valid)
        return self._slots

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """The rows of ``cache`` (``[num_blocks, block_size, ...]``: K, V or statistics) of every
        evictable slot: ``[S, max_live, ...]`` on the cache's device (padding: the first entry)."""
        blocks, offs, _ = self.slots()
        return cache[blocks, offs]


def choose_survivors(
    policy: Policy,
    batch: EvictionBatch,
    *,
    weights: Optional[Callable[[], Tuple[Any, Any, Any, Any]]] = None,
) -> torch.Tensor:
    """Survivors ``[S, H, max_live]`` int32 (per request and KV head, the ``live - num_evict`` kept
    window slots ascending, as ``compact`` reads them) of ``policy`` on ``batch``, on its device.
    ``weights``: returns the layer's scorer weights (ForesightKV only)."""
    scores = policy_scores(policy, batch, weights=weights)
    survivors = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    params = policy.params
    if policy.name == "foresight" and params.get("sample"):
        dev = scores.device
        kernels.sample_survivors(
            batch.seq_lens,
            batch.live_starts,
            scores,
            batch.num_evict,
            _as_int32(batch.requests, dev),
            _as_int32(batch.evictions, dev),
            survivors,
            layer=batch.layer,
            seed=int(params["seed"]),
            temperature=float(params["temperature"]),
            num_protected=batch.num_protected,
            **batch.host_selection(),
        )
    else:
        kernels.select_survivors(
            batch.seq_lens, batch.live_starts, scores, batch.num_evict, survivors, num_protected=batch.num_protected,
            **batch.host_selection(),
        )
    return survivors


def policy_scores(
    policy: Policy,
    batch: EvictionBatch,
    *,
    weights: Optional[Callable[[], Tuple[Any, Any, Any, Any]]] = None,
) -> torch.Tensor:
    """Eviction scores ``[S, H, max_live]`` float32 (higher = evicted first) of ``policy`` on ``batch``,
    the core's ``Policy.score`` of every (request, KV head) at once; padding slots hold any value."""
    name, params = policy.name, policy.params
    if name in ("foresight", "foresight-top"):
        if weights is None:
            raise ConfigError("the foresight policy's scores need the layer's scorer weights")
        w1, b1, w2, b2 = weights()
        scores = torch.zeros(
            (batch.num_seqs, batch.num_kv_heads, batch.max_live), dtype=torch.float32, device=batch.key_cache.device
        )
        kernels.scorer_mlp(
            batch.key_cache,
            batch.value_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.live_starts,
            batch.stats,
            w1,
            b1,
            w2,
            b2,
            scores,
            **batch.host_windows(),
        )
        return scores
    if name == "streaming":
        return streaming_scores(batch.positions, int(params["sinks"]))
    if name == "h2o":
        return h2o_scores(batch.gather(batch.stats))
    if name == "random":
        return random_scores(
            int(params["seed"]),
            batch.requests,
            batch.layer,
            batch.evictions,
            batch.num_kv_heads,
            batch.max_live,
            batch.key_cache.device,
        )
    valid = batch.slots()[2]
    live = to_device(batch.live, valid.device, torch.long)
    keys = batch.gather(batch.key_cache).float()
    queries = batch.queries
    if name == "tova":
        return tova_scores(keys, queries, batch.num_queries, valid, batch.scale)
    if name in ("snapkv", "rkv"):
        window, kernel = int(params["window"]), int(params["kernel"])
        imp, before = observation_importance(keys, queries, batch.num_queries, live, window, kernel, batch.scale)
        if name == "snapkv":
            return torch.where(before.unsqueeze(1), -imp, float("-inf"))
        red = rkv_redundancy(keys, valid, float(params["threshold"]))
        lam = to_device(float(params["lam"]), imp.device, torch.float32)
        z = lam * imp - (1.0 - lam) * red
        return torch.where(before.unsqueeze(1), -z, float("-inf"))
    raise ConfigError(f"policy {name!r} has no batched victim choice")


def streaming_scores(positions: torch.Tensor, sinks: int) -> torch.Tensor:
    """StreamingLLM: ``-position`` (float32), ``-inf`` for the ``sinks`` first original positions, so the
    oldest non-sink entries go first. ``positions``: int64 ``[S, H, N]``."""
    return torch.where(positions < sinks, float("-inf"), -positions.float())


def h2o_scores(stats: torch.Tensor) -> torch.Tensor:
    """H2O: minus the cumulative attention statistic summed over the GQA group, added in the core's
    order (head 0 first), so the scores are the core's bit for bit. ``stats``: ``[S, N, H, G, 8]``
    (the windows' statistics rows); returns ``[S, H, N]``."""
    acc = stats[:, :, :, 0, STAT_CUMULATIVE]
    for g in range(1, stats.shape[3]):
        acc = acc + stats[:, :, :, g, STAT_CUMULATIVE]
    return (-acc).transpose(1, 2).contiguous()


def _group_queries(queries: torch.Tensor, rows: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Float32 query rows ``rows`` ``[S, W]`` of ``queries`` ``[S, M, Hq, D]`` as ``[S, W, H, G, D]``."""
    s, _, hq, d = queries.shape
    w = rows.shape[1]
    idx = rows.long().view(s, w, 1, 1).expand(s, w, hq, d)
    return queries.gather(1, idx).float().view(s, w, num_kv_heads, hq // num_kv_heads, d)


def tova_scores(
    keys: torch.Tensor, queries: torch.Tensor, num_queries: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """TOVA: minus the softmax of the last query over the live entries, averaged over the GQA group
    (``-= p_g / G`` head by head, as the core). ``keys`` float32 ``[S, N, H, D]``, ``valid`` ``[S, N]``."""
    h = keys.shape[2]
    last = (num_queries.long() - 1).clamp(min=0).unsqueeze(1)
    q = _group_queries(queries, last, h)[:, 0]  # [S, H, G, D]
    logits = torch.einsum("shgd,snhd->shgn", q, keys) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    g = q.shape[2]
    acc = torch.zeros_like(p[:, :, 0])
    for gi in range(g):
        acc = acc - p[:, :, gi] / g
    return acc


def observation_importance(
    keys: torch.Tensor,
    queries: torch.Tensor,
    num_queries: torch.Tensor,
    live: torch.Tensor,
    window: int,
    kernel: int,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The observation-window importance SnapKV and R-KV share (``rkv/utils.py`` of the R-KV code, the
    core's ``observation_importance``): for each of the last ``w = min(window, m)`` queries, the logits
    ``scale * q . k`` maxed over the GQA group, softmax over the ``n - w`` entries before the window,
    averaged over the ``w`` queries, max-pooled with ``kernel`` (edges clipped). Returns the pooled
    importance ``[S, H, N]`` and the mask ``[S, N]`` of the entries before the window (the rest hold
    ``-inf``)."""
    s, n, h, _ = keys.shape
    m = num_queries.long()
    w = m.clamp(max=window)
    wmax = max(1, min(window, queries.shape[1]))
    r = torch.arange(wmax, device=keys.device).unsqueeze(0)
    rvalid = r < w.unsqueeze(1)
    rows = torch.where(rvalid, (m - w).unsqueeze(1) + r, 0)
    q = _group_queries(queries, rows, h)  # [S, W, H, G, D]
    logits = (torch.einsum("swhgd,snhd->shwgn", q, keys) * scale).amax(dim=3)  # [S, H, W, N]
    before = torch.arange(n, device=keys.device).unsqueeze(0) < (live - w).unsqueeze(1)
    logits = logits.masked_fill(~before[:, None, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    imp = (p / w.clamp(min=1).float().view(s, 1, 1, 1)).masked_fill(~rvalid[:, None, :, None], 0.0).sum(dim=2)
    imp = imp.masked_fill(~before.unsqueeze(1), float("-inf"))
    pooled = F.max_pool1d(imp.reshape(s * h, 1, n), kernel, stride=1, padding=kernel // 2).view(s, h, n)
    return pooled, before


def rkv_redundancy(keys: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy of every live key (``rkv/utils.py::cal_similarity``, the core's
    ``rkv_redundancy``): cosine similarities of the unit keys ``k / (|k| + 1e-8)``, diagonal zeroed; in
    each row the entry of the last key with similarity above ``threshold`` is zeroed (none: the first);
    then the softmax over the keys of the column means. ``keys`` float32 ``[S, N, H, D]``, ``valid``
    ``[S, N]``; returns ``[S, H, N]`` (chunked over requests to bound the ``[S, H, N, N]`` working set)."""
    s, n, h, _ = keys.shape
    per = max(1, _RKV_CHUNK_BYTES // max(1, 4 * 4 * h * n * n))
    out = []
    for a in range(0, s, per):
        out.append(_rkv_redundancy(keys[a : a + per], valid[a : a + per], threshold))
    return torch.cat(out) if out else keys.new_zeros((0, h, n))


def _rkv_redundancy(keys: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """``rkv_redundancy`` of one chunk of requests."""
    s, n, h, _ = keys.shape
    k = keys.transpose(1, 2)  # [S, H, N, D]
    unit = k / (k.square().sum(dim=-1, keepdim=True).sqrt() + 1e-8)
    sim = unit @ unit.transpose(-1, -2)  # [S, H, N(i), N(j)]
    eye = torch.eye(n, dtype=torch.bool, device=keys.device)
    vj = valid[:, None, None, :]
    sim = sim.masked_fill(eye | ~vj, 0.0)
    idx = torch.arange(n, device=keys.device)
    above = (sim > threshold) & vj
    retain = torch.where(above, idx, -1).amax(dim=-1).clamp(min=0)  # [S, H, N]
    sim = sim.scatter(-1, retain.unsqueeze(-1), 0.0)
    sim = sim.masked_fill(~valid[:, None, :, None], 0.0)
    count = valid.sum(dim=1).clamp(min=1).float().view(s, 1, 1)
    mean = sim.sum(dim=2) / count  # [S, H, N]
    mean = mean.masked_fill(~valid.unsqueeze(1), float("-inf"))
    return torch.softmax(mean, dim=-1)


def _mulhilo(m: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``m * x`` (``m`` a 32-bit constant, ``x`` int64 in [0, 2^32)) in int64
    arithmetic without overflow (``x`` split in 16-bit halves)."""
    p_lo = (x & 0xFFFF) * m
    p_hi = (x >> 16) * m
    t = (p_lo & _MASK32) + ((p_hi & 0xFFFF) << 16)
    return (p_lo >> 32) + (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(ctr: List[torch.Tensor], key: Tuple[int, int]) -> List[torch.Tensor]:
    """Philox4x32-10 (Random123's ``philox4x32_R`` with 10 rounds, the core's ``evict::philox``) on
    int64 tensors holding 32-bit counter words (broadcast together); returns the four output words."""
    c = list(ctr)
    k0, k1 = key
    for r in range(10):
        if r > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c[0])
        hi1, lo1 = _mulhilo(_PHILOX_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def random_scores(
    seed: int,
    requests: List[int],
    layer: int,
    evictions: List[int],
    num_kv_heads: int,
    max_live: int,
    device: Any,
) -> torch.Tensor:
    """The random policy's scores ``[S, H, max_live]``: per slot ``i`` the Philox uniform of counter
    ``[i, eviction, layer << 16 | head, request]`` and key ``[seed_lo, seed_hi]`` (52 bits of words 0
    and 1, ``(n + 0.5) * 2^-52`` in binary64, rounded to float32): the core's ``SampleKey::uniform``."""
    s = len(requests)
    i64 = dict(dtype=torch.int64, device=device)
    entry = torch.arange(max_live, **i64).view(1, 1, max_live)
    ev = to_device([int(e) & _MASK32 for e in evictions], device, torch.int64).view(s, 1, 1)
    lh = (((layer & 0xFFFF) << 16) | torch.arange(num_kv_heads, **i64)).view(1, num_kv_heads, 1)
    rq = to_device([int(r) & _MASK32 for r in requests], device, torch.int64).view(s, 1, 1)
    shape = (s, num_kv_heads, max_live)
    ctr = [t.expand(shape) for t in (entry, ev, lh, rq)]
    w = philox4x32_10(ctr, (seed & _MASK32, (seed >> 32) & _MASK32))
    n = (w[0] << 20) | (w[1] >> 12)
    return ((n.double() + 0.5) * (1.0 / 4503599627370496.0)).float()


def _as_int32(values: List[int], device: Any) -> torch.Tensor:
    """Unsigned 32-bit ``values`` as the int32 bit patterns the kernels read as u32."""
    return to_device([v - (1 << 32) if v >= 1 << 31 else v for v in values], device, torch.int32)


__all__ = [
    "EvictionBatch",
    "choose_survivors",
    "h2o_scores",
    "observation_importance",
    "philox4x32_10",
    "policy_scores",
    "random_scores",
    "rkv_redundancy",
    "streaming_scores",
    "tova_scores",
]

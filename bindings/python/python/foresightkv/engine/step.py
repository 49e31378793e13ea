"""The engine-neutral attention + eviction step: attention of a batch over each request's live window
of a paged cache read in place, the recent-query buffer, and, when the schedule says so, window
statistics, victim choice and in-place compaction with foresightkv's kernels and policies.

An engine plugin translates its own metadata into ``StepRequest``s, calls ``begin_step`` once per
forward, ``attend`` once per layer, and frees the memory of the ``Advance``s ``begin_step`` returns
(the evictions of the previous step, committed one step late so that no engine frees a slot its
in-flight step may still read).

Protect mode (``protect_prompt``), as in the core's ``KvCacheManager``: the prompt rounded up to a
block, ``protected_len``, is never evicted nor rewritten. Attention reads ``[0, protected_len) ∪
[max(live_start, protected_len), len)``; the policy sees the evictable window ``[max(live_start,
protected_len), len)`` alone (its statistics come from the queries of that window over its entries),
and an eviction is due when that window reaches ``budget + interval`` (prompts are never compressed).
The kernels read the two parts as one window through a block table whose evicted middle is cut out."""

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import kernels
from .._native import NUM_STATS, ScorerCheckpoint
from ..errors import ConfigError, ShapeError
from ..evict import scorer_weights
from .config import EngineConfig
from .schedule import align_up, next_live_start


@dataclass(frozen=True)
class StepRequest:
    """One request of a forward step: its stable ``key``, its length after the step, the number of
    new tokens (queries) the step adds, whether they are prompt tokens (in protect mode they extend
    the protected prompt), and ``reset`` when the engine starts the request over (new request, or
    recomputation after preemption)."""

    key: Hashable
    seq_len: int
    num_new: int
    prefill: bool
    reset: bool = False


@dataclass(frozen=True)
class Advance:
    """A committed eviction: logical positions ``[evicted_from, new_live_start)`` of request ``key``
    hold no live entry any more, so the engine may give their memory back. ``evicted_from`` is
    ``old_live_start`` unless the protected prompt ``[0, protected_len)`` lies beyond it (protect
    mode), which stays."""

    key: Hashable
    old_live_start: int
    new_live_start: int
    protected_len: int = 0

    @property
    def evicted_from(self) -> int:
        """First position whose memory this eviction gives back: ``max(old_live_start, protected_len)``."""
        return max(self.old_live_start, self.protected_len)


@dataclass
class _LayerState:
    """Per (request, layer): queries since the last eviction and the original positions of the
    entries each KV head kept at that eviction."""

    queries: List[torch.Tensor] = field(default_factory=list)
    positions: Optional[torch.Tensor] = None
    positions_end: int = 0
    evictions: int = 0


@dataclass
class RequestState:
    """Per request: its serial number (the request part of the victim RNG key), the committed
    ``live_start``, the one this step's eviction moves it to, the per-layer state and the protected
    prefix (protect mode, else 0)."""

    serial: int
    length: int = 0
    live_start: int = 0
    pending: Optional[int] = None
    layers: Dict[int, _LayerState] = field(default_factory=dict)
    protected_len: int = 0


@dataclass
class StepPlan:
    """What ``begin_step`` decided for one forward: per request (in batch order) its state, window and
    eviction target, the offsets of its queries, the evictions committed from the last step, and its
    protected prefix (all 0 outside protect mode)."""

    requests: List[StepRequest]
    states: List[RequestState]
    seq_lens: List[int]
    live_starts: List[int]
    query_starts: List[int]
    evict_to: List[Optional[int]]
    released: List[Advance]
    protected_lens: List[int] = field(default_factory=list)
    _windows: Optional["_Windows"] = field(default=None, repr=False, compare=False)


@dataclass
class _Windows:
    """The windows of a plan as the kernels read them through ``tables`` (a block table per request,
    its evicted middle cut out in protect mode): length, attention start and evictable start per
    request, in those cut coordinates (the plan's own outside protect mode)."""

    source: torch.Tensor
    tables: torch.Tensor
    seq_lens: List[int]
    attn_starts: List[int]
    evict_starts: List[int]


class EvictionEngine:
    """Owns the per-request eviction state of one model (all layers) and runs the step.

    ``block_size`` is the engine's page size (SGLang: 1); ``checkpoint`` overrides the one the
    configuration names. The scorer's shape is checked against each layer's cache at its first
    eviction."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        block_size: int,
        checkpoint: Optional[ScorerCheckpoint] = None,
    ) -> None:
        config.validate(block_size)
        self.config = config
        self.block_size = block_size
        self._checkpoint = checkpoint if checkpoint is not None else config.load_checkpoint()
        self.policy = config.build_policy(self._checkpoint)
        self._use_kernels = config.policy == "foresight" and not config.sample
        self._states: Dict[Hashable, RequestState] = {}
        self._serials = itertools.count()
        self._stats: Dict[int, torch.Tensor] = {}
        self._weights: Dict[int, Any] = {}

    @property
    def checkpoint(self) -> Optional[ScorerCheckpoint]:
        """The scorer checkpoint of the foresight policy (None for the baselines)."""
        return self._checkpoint

    # ------------------------------------------------------------------ per-request bookkeeping

    def keys(self) -> List[Hashable]:
        """Keys of the requests with state."""
        return list(self._states)

    def live_start(self, key: Hashable) -> int:
        """Committed ``live_start`` of ``key`` (0 for an unknown request)."""
        st = self._states.get(key)
        return 0 if st is None else st.live_start

    def protected_len(self, key: Hashable) -> int:
        """Protected prefix of ``key``: its prompt rounded up to a block in protect mode, else 0."""
        st = self._states.get(key)
        return 0 if st is None else st.protected_len

    def pending_live_start(self, key: Hashable) -> Optional[int]:
        """``live_start`` the last step's eviction moves ``key`` to at the next ``begin_step``, if any."""
        st = self._states.get(key)
        return None if st is None else st.pending

    def kept_positions(self, key: Hashable, layer: int, num_kv_heads: int) -> torch.Tensor:
        """Original positions ``[num_kv_heads, live]`` (int64, ascending per head) of the entries each KV
        head of ``layer`` holds after the last step, i.e. that attention reads: the protected prompt
        (protect mode) then the live window (for checks and debugging)."""
        st = self._states[key]
        start = st.live_start if st.pending is None else st.pending
        ls = st.layers.get(layer, _LayerState())
        window_start = min(max(start, st.protected_len), st.length)
        window = self._positions(ls, window_start, st.length, num_kv_heads)
        if not st.protected_len:
            return window
        prompt = torch.arange(min(st.protected_len, st.length), dtype=torch.int64).expand(num_kv_heads, -1)
        return torch.cat([prompt, window], dim=1)

    def release(self, key: Hashable) -> None:
        """Forgets ``key`` (finished, aborted or preempted request); its pending eviction is dropped."""
        self._states.pop(key, None)

    def begin_step(self, requests: Sequence[StepRequest]) -> StepPlan:
        """Commits the previous step's evictions (returned as ``released``), then plans this step:
        each request's live window and whether an eviction is due at its end."""
        released = []
        for key, st in self._states.items():
            if st.pending is not None:
                released.append(Advance(key, st.live_start, st.pending, st.protected_len))
                st.live_start, st.pending = st.pending, None
        cfg = self.config
        protect = cfg.protect_prompt
        states, lens, starts, qstarts, evict_to, protected = [], [], [], [], [], []
        offset = 0
        for r in requests:
            if r.num_new < 0 or r.seq_len < r.num_new:
                raise ShapeError(f"request {r.key!r}: {r.num_new} new tokens for a length of {r.seq_len}")
            st = None if r.reset else self._states.get(r.key)
            if st is None:
                st = RequestState(serial=next(self._serials))
                self._states[r.key] = st
            if r.seq_len - r.num_new < st.live_start:
                raise ShapeError(
                    f"request {r.key!r}: its new tokens start at {r.seq_len - r.num_new}, before its live window "
                    f"[{st.live_start}, ...); the engine must reset a request it recomputes"
                )
            if protect and r.prefill and r.num_new:
                if st.live_start:
                    raise ShapeError(
                        f"request {r.key!r}: prompt tokens after an eviction in protect mode; the engine must "
                        "reset a request it recomputes"
                    )
                st.protected_len = max(st.protected_len, align_up(r.seq_len, self.block_size))
            target = None
            if self.policy.evicts:
                target = next_live_start(
                    cfg.budget,
                    cfg.interval,
                    self.block_size,
                    r.seq_len,
                    st.live_start,
                    protected_len=st.protected_len,
                    compress=not protect and r.prefill and r.num_new > 1,
                )
            st.pending = target
            st.length = r.seq_len
            states.append(st)
            lens.append(r.seq_len)
            starts.append(st.live_start)
            qstarts.append(offset)
            evict_to.append(target)
            protected.append(st.protected_len)
            offset += r.num_new
        return StepPlan(list(requests), states, lens, starts, qstarts, evict_to, released, protected)

    # ------------------------------------------------------------------ the per-layer step

    def attend(
        self,
        plan: StepPlan,
        layer: int,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        out: torch.Tensor,
        *,
        scale: float,
        stats: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention of ``query`` ``[T, Hq, D]`` (the requests' new tokens, in batch order, K/V already
        written) over each request's live window of ``key_cache``/``value_cache`` ``[num_blocks,
        block_size, H, D]`` through ``block_tables`` (int32 ``[S, width]``, entry ``i`` = block of
        positions ``[i * block_size, (i + 1) * block_size)``), written to ``out``; then the eviction
        of layer ``layer`` for every request the plan marks, compacting the cache (and ``stats``,
        float32 ``[num_blocks, block_size, H, G, 8]``, allocated here when None) in place. In protect
        mode the window is the protected prompt plus the live window, and only the queries of the
        evictable window are recorded for the statistics."""
        num_tokens, hq, d = query.shape
        h = key_cache.shape[2]
        if hq % h != 0 or key_cache.shape[3] != d:
            raise ShapeError(
                f"query [{num_tokens}, {hq}, {d}] does not fit a cache of {h} KV heads x {tuple(key_cache.shape[3:])}"
            )
        expected = sum(r.num_new for r in plan.requests)
        if num_tokens != expected:
            raise ShapeError(f"query holds {num_tokens} tokens, the plan's requests add {expected}")
        if block_tables.shape[0] != len(plan.requests):
            raise ShapeError(f"block_tables has {block_tables.shape[0]} rows for {len(plan.requests)} requests")
        win = self._windows(plan, block_tables)
        self._attention(plan, win, query, key_cache, value_cache, out, scale)
        if not self.policy.evicts:
            return out
        for i, r in enumerate(plan.requests):
            skip = min(max(plan.protected_lens[i] - (r.seq_len - r.num_new), 0), r.num_new)
            if r.num_new > skip:
                qs = plan.query_starts[i]
                ls = plan.states[i].layers.setdefault(layer, _LayerState())
                ls.queries.append(query[qs + skip : qs + r.num_new].detach().clone())
        due = [i for i, t in enumerate(plan.evict_to) if t is not None]
        if due:
            if stats is None:
                stats = self._layer_stats(layer, key_cache, hq // h)
            self._evict(plan, win, due, layer, key_cache, value_cache, stats, scale)
        return out

    def _windows(self, plan: StepPlan, block_tables: torch.Tensor) -> _Windows:
        """The plan's windows in the coordinates the kernels read (computed once per plan and table).
        In protect mode, a request whose ``live_start`` passed its protected prefix ``P`` reads a table
        row whose blocks ``[P, live_start)`` are cut out: its window ``[0, P + len - live_start)``
        is the prompt then the live entries, and its evictable part starts at ``P``."""
        win = plan._windows
        if win is not None and win.source is block_tables:
            return win
        lens, starts = list(plan.seq_lens), list(plan.live_starts)
        if not self.config.protect_prompt:
            win = _Windows(block_tables, block_tables, lens, starts, starts)
        else:
            bs = self.block_size
            tables = block_tables
            evict_starts = list(plan.protected_lens)
            for i, (p, ls, n) in enumerate(zip(plan.protected_lens, starts, lens)):
                if ls <= p:
                    continue
                if tables is block_tables:
                    tables = block_tables.clone()
                row = torch.cat([block_tables[i, : p // bs], block_tables[i, ls // bs : -(-n // bs)]])
                tables[i, : row.numel()] = row
                lens[i] = p + n - ls
            win = _Windows(block_tables, tables, lens, [0] * len(lens), evict_starts)
        plan._windows = win
        return win

    def reserve_stats(
        self, layers: Sequence[int], num_blocks: int, block_size: int, num_kv_heads: int, group: int, device
    ) -> int:
        """Allocates the statistics buffers of ``layers`` now (float32 ``[num_blocks, block_size, H, G,
        8]`` each) so that a shortage shows at start-up rather than at the first eviction; returns the
        bytes allocated. Nothing is allocated for a policy that never evicts."""
        if not self.policy.evicts:
            return 0
        shape = (num_blocks, block_size, num_kv_heads, group, NUM_STATS)
        total = 0
        for layer in layers:
            st = self._stats.get(layer)
            if st is None or tuple(st.shape) != shape or st.device != torch.device(device):
                st = torch.zeros(shape, dtype=torch.float32, device=device)
                self._stats[layer] = st
            total += st.numel() * st.element_size()
        return total

    def stats_bytes(self) -> int:
        """Bytes of statistics buffers allocated so far (all layers)."""
        return sum(st.numel() * st.element_size() for st in self._stats.values())

    def _layer_stats(self, layer: int, key_cache: torch.Tensor, group: int) -> torch.Tensor:
        """The statistics buffer of ``layer``, shaped after its cache (allocated on first use)."""
        nb, bs, h, _ = key_cache.shape
        want = (nb, bs, h, group, NUM_STATS)
        st = self._stats.get(layer)
        if st is None or tuple(st.shape) != want or st.device != key_cache.device:
            st = torch.zeros(want, dtype=torch.float32, device=key_cache.device)
            self._stats[layer] = st
        return st

    def _attention(self, plan, win, query, key_cache, value_cache, out, scale) -> None:
        """Decode rows through the paged decode kernel, multi-token rows through causal SDPA over the
        gathered window ``win`` (query ``j`` of ``n`` sees window slots ``0 ..= live - n + j``)."""
        device = query.device
        block_tables = win.tables
        dec = [i for i, r in enumerate(plan.requests) if r.num_new == 1]
        if dec:
            rows = torch.tensor([plan.query_starts[i] for i in dec], dtype=torch.long, device=device)
            sel = torch.tensor(dec, dtype=torch.long, device=device)
            o = kernels.paged_attention_decode(
                query.index_select(0, rows).contiguous(),
                key_cache,
                value_cache,
                block_tables.index_select(0, sel).contiguous(),
                torch.tensor([win.seq_lens[i] for i in dec], dtype=torch.int32, device=device),
                torch.tensor([win.attn_starts[i] for i in dec], dtype=torch.int32, device=device),
                scale=scale,
            )
            out.index_copy_(0, rows, o.to(out.dtype))
        hq, h = query.shape[1], key_cache.shape[2]
        for i, r in enumerate(plan.requests):
            n = r.num_new
            if n <= 1:
                continue
            start, end = win.attn_starts[i], win.seq_lens[i]
            blocks, offs = self._slots(block_tables[i], start, end)
            k = key_cache[blocks, offs].transpose(0, 1).unsqueeze(0)
            v = value_cache[blocks, offs].transpose(0, 1).unsqueeze(0)
            qs = plan.query_starts[i]
            q = query[qs : qs + n].transpose(0, 1).unsqueeze(0)
            live = end - start
            if n == live:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=hq != h)
            else:
                qpos = torch.arange(n, device=query.device).unsqueeze(1) + (live - n)
                mask = torch.arange(live, device=query.device).unsqueeze(0) <= qpos
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != h)
            out[qs : qs + n] = o.squeeze(0).transpose(0, 1).to(out.dtype)

    def _slots(self, table_row: torch.Tensor, start: int, end: int):
        """(block, offset) index tensors of logical positions ``[start, end)`` through one table row."""
        pos = torch.arange(start, end, device=table_row.device)
        blocks = table_row.index_select(0, pos // self.block_size).long()
        return blocks, pos % self.block_size

    def _evict(self, plan, win, due, layer, key_cache, value_cache, stats, scale) -> None:
        """Window statistics, victim choice and compaction of layer ``layer`` for requests ``due``,
        over each evictable window (``starts``/``lens`` in the kernels' coordinates, ``bases``/
        ``ends`` the original positions)."""
        device = key_cache.device
        h, d = key_cache.shape[2], key_cache.shape[3]
        cfg = self.config
        sel = torch.tensor(due, dtype=torch.long, device=device)
        bt = win.tables.index_select(0, sel).contiguous()
        lens = [win.seq_lens[i] for i in due]
        starts = [win.evict_starts[i] for i in due]
        ends = [plan.seq_lens[i] for i in due]
        bases = [max(plan.live_starts[i], plan.protected_lens[i]) for i in due]
        sl = torch.tensor(lens, dtype=torch.int32, device=device)
        ls = torch.tensor(starts, dtype=torch.int32, device=device)
        num_evict = [plan.evict_to[i] - b for i, b in zip(due, bases)]
        ne = torch.tensor(num_evict, dtype=torch.int32, device=device)
        layer_states = [plan.states[i].layers.setdefault(layer, _LayerState()) for i in due]
        qbufs = [torch.cat(s.queries) for s in layer_states]
        maxq = max(q.shape[0] for q in qbufs)
        hq = qbufs[0].shape[1]
        group = hq // h
        queries = key_cache.new_zeros((len(due), maxq, hq, d))
        for j, q in enumerate(qbufs):
            queries[j, : q.shape[0]] = q.to(key_cache.dtype)
        nq = torch.tensor([q.shape[0] for q in qbufs], dtype=torch.int32, device=device)
        # The statistics window is the interval L (earlier queries of the first eviction only enter
        # the cumulative statistics), in the mode the scorer was trained on (None: baselines).
        kernels.window_stats(
            queries, nq, key_cache, bt, sl, ls, stats, scale=scale, window=cfg.interval, mode=self.policy.stats_mode
        )
        max_live = max(e - s for s, e in zip(starts, lens))
        survivors = torch.zeros((len(due), h, max_live), dtype=torch.int32, device=device)
        positions = [self._positions(s, base, end, h) for s, base, end in zip(layer_states, bases, ends)]
        if self._use_kernels:
            w1, b1, w2, b2 = self._layer_weights(layer, h, group, d, device)
            scores = torch.zeros((len(due), h, max_live), dtype=torch.float32, device=device)
            kernels.scorer_mlp(key_cache, value_cache, bt, sl, ls, stats, w1, b1, w2, b2, scores)
            kernels.select_survivors(sl, ls, scores, ne, survivors, num_protected=cfg.interval)
        else:
            for j, i in enumerate(due):
                survivors[j] = self._choose(
                    plan.states[i],
                    layer_states[j],
                    layer,
                    bt[j],
                    starts[j],
                    lens[j],
                    ends[j],
                    num_evict[j],
                    key_cache,
                    value_cache,
                    stats,
                    qbufs[j],
                    positions[j],
                    max_live,
                    scale,
                ).to(device)
        kernels.compact(key_cache, value_cache, bt, sl, ls, ne, survivors, stats)
        for j, s in enumerate(layer_states):
            keep = lens[j] - starts[j] - num_evict[j]
            idx = survivors[j, :, :keep].long().cpu()
            s.positions = positions[j].gather(1, idx)
            s.positions_end = ends[j]
            s.queries.clear()
            s.evictions += 1

    def _positions(self, s: _LayerState, start: int, end: int, h: int) -> torch.Tensor:
        """Original positions ``[H, live]`` of the live entries of each KV head (CPU int64)."""
        fresh_from = max(s.positions_end, start) if s.positions is not None else start
        fresh = torch.arange(fresh_from, end, dtype=torch.int64).expand(h, -1)
        if s.positions is None:
            return fresh.contiguous()
        return torch.cat([s.positions, fresh], dim=1)

    def _choose(
        self,
        st,
        ls,
        layer,
        table_row,
        start,
        end,
        seq_len,
        num_evict,
        key_cache,
        value_cache,
        stats,
        queries,
        positions,
        max_live,
        scale,
    ) -> torch.Tensor:
        """Survivor rows ``[H, max_live]`` of one request through ``Policy.choose_victims`` per KV head
        (float32 host copies of the evictable entries, window slots ``[start, end)`` of ``table_row``;
        ``seq_len`` is the request's length in original positions)."""
        blocks, offs = self._slots(table_row, start, end)
        h = key_cache.shape[2]
        group = queries.shape[1] // h
        keys = key_cache[blocks, offs].float().cpu()
        values = value_cache[blocks, offs].float().cpu()
        st_rows = stats[blocks, offs].float().cpu()
        q = queries.float().cpu()
        live = end - start
        out = torch.zeros((h, max_live), dtype=torch.int32)
        for kh in range(h):
            victims = self.policy.choose_victims(
                keys[:, kh].contiguous(),
                values[:, kh].contiguous(),
                st_rows[:, kh].contiguous(),
                q[:, kh * group : (kh + 1) * group].contiguous(),
                positions[kh].tolist(),
                seq_len,
                num_protected=self.config.interval,
                num_evict=num_evict,
                layer=layer,
                kv_head=kh,
                eviction=ls.evictions,
                request=st.serial,
                scale=scale,
            )
            gone = torch.zeros(live, dtype=torch.bool)
            gone[torch.tensor(victims, dtype=torch.long)] = True
            keep = torch.nonzero(~gone).flatten().to(torch.int32)
            out[kh, : keep.numel()] = keep
        return out

    def _layer_weights(self, layer: int, h: int, group: int, d: int, device) -> Any:
        """The scorer weights of ``layer`` on ``device`` (checked against the model's shape once)."""
        ck = self._checkpoint
        if ck is None:
            raise ConfigError("the kernel path of the foresight policy needs a scorer checkpoint")
        w = self._weights.get(layer)
        if w is None or w[0].device != torch.device(device):
            expected_in = 2 * d + NUM_STATS * group
            if ck.in_dim != expected_in:
                raise ConfigError(
                    f"scorer checkpoint input width {ck.in_dim} does not fit the model "
                    f"(2 * head_dim {d} + 8 * group {group} = {expected_in})"
                )
            w = scorer_weights(ck, layer, device)
            if tuple(w[0].shape[:1]) != (h,):
                raise ConfigError(f"scorer checkpoint has {w[0].shape[0]} KV heads per layer, the model {h}")
            self._weights[layer] = w
        return w

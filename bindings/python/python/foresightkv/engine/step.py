"""The engine-neutral attention + eviction step: attention of a batch over each request's live window
of a paged cache read in place, the recent-query buffer, and, when the schedule says so, window
statistics, victim choice and in-place compaction with foresightkv's kernels and policies.

An engine plugin translates its own metadata into ``StepRequest``s, calls ``begin_step`` once per
forward, ``attend`` once per layer, and frees the memory of the ``Advance``s ``begin_step`` returns
(the evictions of the previous step, committed one step late so that no engine frees a slot its
in-flight step may still read)."""

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
from .schedule import next_live_start


@dataclass(frozen=True)
class StepRequest:
    """One request of a forward step: its stable ``key``, its length after the step, the number of
    new tokens (queries) the step adds, whether they are prompt tokens, and ``reset`` when the engine
    starts the request over (new request, or recomputation after preemption)."""

    key: Hashable
    seq_len: int
    num_new: int
    prefill: bool
    reset: bool = False


@dataclass(frozen=True)
class Advance:
    """A committed eviction: logical positions ``[old_live_start, new_live_start)`` of request ``key``
    hold no live entry any more, so the engine may give their memory back."""

    key: Hashable
    old_live_start: int
    new_live_start: int


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
    ``live_start``, the one this step's eviction moves it to, and the per-layer state."""

    serial: int
    length: int = 0
    live_start: int = 0
    pending: Optional[int] = None
    layers: Dict[int, _LayerState] = field(default_factory=dict)


@dataclass
class StepPlan:
    """What ``begin_step`` decided for one forward: per request (in batch order) its state, window and
    eviction target, the offsets of its queries, and the evictions committed from the last step."""

    requests: List[StepRequest]
    states: List[RequestState]
    seq_lens: List[int]
    live_starts: List[int]
    query_starts: List[int]
    evict_to: List[Optional[int]]
    released: List[Advance]


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

    def pending_live_start(self, key: Hashable) -> Optional[int]:
        """``live_start`` the last step's eviction moves ``key`` to at the next ``begin_step``, if any."""
        st = self._states.get(key)
        return None if st is None else st.pending

    def kept_positions(self, key: Hashable, layer: int, num_kv_heads: int) -> torch.Tensor:
        """Original positions ``[num_kv_heads, live]`` (int64, ascending per head) of the entries each KV
        head of ``layer`` holds in ``key``'s live window after the last step (for checks and debugging)."""
        st = self._states[key]
        start = st.live_start if st.pending is None else st.pending
        ls = st.layers.get(layer, _LayerState())
        return self._positions(ls, start, st.length, num_kv_heads)

    def release(self, key: Hashable) -> None:
        """Forgets ``key`` (finished, aborted or preempted request); its pending eviction is dropped."""
        self._states.pop(key, None)

    def begin_step(self, requests: Sequence[StepRequest]) -> StepPlan:
        """Commits the previous step's evictions (returned as ``released``), then plans this step:
        each request's live window and whether an eviction is due at its end."""
        released = []
        for key, st in self._states.items():
            if st.pending is not None:
                released.append(Advance(key, st.live_start, st.pending))
                st.live_start, st.pending = st.pending, None
        cfg = self.config
        states, lens, starts, qstarts, evict_to = [], [], [], [], []
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
            target = None
            if self.policy.evicts:
                target = next_live_start(
                    cfg.budget,
                    cfg.interval,
                    self.block_size,
                    r.seq_len,
                    st.live_start,
                    compress=r.prefill and r.num_new > 1,
                )
            st.pending = target
            st.length = r.seq_len
            states.append(st)
            lens.append(r.seq_len)
            starts.append(st.live_start)
            qstarts.append(offset)
            evict_to.append(target)
            offset += r.num_new
        return StepPlan(list(requests), states, lens, starts, qstarts, evict_to, released)

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
        float32 ``[num_blocks, block_size, H, G, 8]``, allocated here when None) in place."""
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
        self._attention(plan, query, key_cache, value_cache, block_tables, out, scale)
        if not self.policy.evicts:
            return out
        for i, r in enumerate(plan.requests):
            if r.num_new:
                qs = plan.query_starts[i]
                ls = plan.states[i].layers.setdefault(layer, _LayerState())
                ls.queries.append(query[qs : qs + r.num_new].detach().clone())
        due = [i for i, t in enumerate(plan.evict_to) if t is not None]
        if due:
            if stats is None:
                stats = self._layer_stats(layer, key_cache, hq // h)
            self._evict(plan, due, layer, key_cache, value_cache, block_tables, stats, scale)
        return out

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

    def _attention(self, plan, query, key_cache, value_cache, block_tables, out, scale) -> None:
        """Decode rows through the paged decode kernel, multi-token rows through causal SDPA over the
        gathered live window (query ``j`` of ``n`` sees live slots ``0 ..= live - n + j``)."""
        device = query.device
        dec = [i for i, r in enumerate(plan.requests) if r.num_new == 1]
        if dec:
            rows = torch.tensor([plan.query_starts[i] for i in dec], dtype=torch.long, device=device)
            sel = torch.tensor(dec, dtype=torch.long, device=device)
            o = kernels.paged_attention_decode(
                query.index_select(0, rows).contiguous(),
                key_cache,
                value_cache,
                block_tables.index_select(0, sel).contiguous(),
                torch.tensor([plan.seq_lens[i] for i in dec], dtype=torch.int32, device=device),
                torch.tensor([plan.live_starts[i] for i in dec], dtype=torch.int32, device=device),
                scale=scale,
            )
            out.index_copy_(0, rows, o.to(out.dtype))
        hq, h = query.shape[1], key_cache.shape[2]
        for i, r in enumerate(plan.requests):
            n = r.num_new
            if n <= 1:
                continue
            start, end = plan.live_starts[i], plan.seq_lens[i]
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

    def _evict(self, plan, due, layer, key_cache, value_cache, block_tables, stats, scale) -> None:
        """Window statistics, victim choice and compaction of layer ``layer`` for requests ``due``."""
        device = key_cache.device
        h, d = key_cache.shape[2], key_cache.shape[3]
        cfg = self.config
        sel = torch.tensor(due, dtype=torch.long, device=device)
        bt = block_tables.index_select(0, sel).contiguous()
        lens = [plan.seq_lens[i] for i in due]
        starts = [plan.live_starts[i] for i in due]
        sl = torch.tensor(lens, dtype=torch.int32, device=device)
        ls = torch.tensor(starts, dtype=torch.int32, device=device)
        num_evict = [plan.evict_to[i] - plan.live_starts[i] for i in due]
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
        kernels.window_stats(queries, nq, key_cache, bt, sl, ls, stats, scale=scale)
        max_live = max(e - s for s, e in zip(starts, lens))
        survivors = torch.zeros((len(due), h, max_live), dtype=torch.int32, device=device)
        positions = [self._positions(s, start, end, h) for s, start, end in zip(layer_states, starts, lens)]
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
            s.positions_end = lens[j]
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
        (float32 host copies of the live entries)."""
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
                end,
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

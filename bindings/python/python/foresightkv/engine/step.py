"""The engine-neutral attention + eviction step: attention of a batch over each request's live window
of a paged cache read in place, the recent-query buffer, and, when the schedule says so, window
statistics, victim choice and in-place compaction with foresightkv's kernels and policies.

An engine plugin translates its own metadata into a ``StepBatch`` (columns: key, length, new tokens,
prefill, reset), calls ``begin_step`` once per forward (one call of the core's batched planner, whose
flat answer becomes the plan's tensors), ``attend`` once per layer, and frees the memory of the
``Advance``s ``begin_step`` returns (the evictions of the previous step, committed one step late so
that no engine frees a slot its in-flight step may still read).

Protect mode (``protect_prompt``), as in the core's ``KvCacheManager``: the prompt rounded up to a
block, ``protected_len``, is never evicted nor rewritten. Attention reads ``[0, protected_len) ∪
[max(live_start, protected_len), len)``; the policy sees the evictable window ``[max(live_start,
protected_len), len)`` alone (its statistics come from the queries of that window over its entries),
and an eviction is due when that window reaches ``budget + interval`` (prompts are never compressed).
The kernels read the two parts as one window through a block table whose evicted middle is cut out."""

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import kernels
from .._native import NUM_STATS, ScorerCheckpoint, WindowPlanner
from ..errors import ConfigError, ShapeError
from ..evict import scorer_weights
from .config import EngineConfig
from .victims import EvictionBatch, choose_survivors

#: Row ``i`` of ``StepPlan.rows`` holds the planner's field ``_FIELDS[i]`` (``WindowPlanner.FIELDS``).
_FIELDS = WindowPlanner.FIELDS
_ROW = {name: i for i, name in enumerate(_FIELDS)}
_RELEASED = len(WindowPlanner.RELEASED_FIELDS)


def request_rng_key(request_id: Union[str, bytes, int], seed: Optional[int] = None) -> int:
    """The request part of the victim RNG key, in [0, 2^32): a hash (BLAKE2b) of the engine's request
    id and, when the user gave one, the request's own sampling seed, so the victims sampled for a
    request do not depend on what the process served before it (a per-process counter would)."""
    if isinstance(request_id, int):
        request_id = str(request_id)
    data = request_id.encode() if isinstance(request_id, str) else bytes(request_id)
    h = hashlib.blake2b(data, digest_size=8, person=b"fkv-rng")
    if seed is not None:
        h.update(b"\x00seed" + int(seed).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest()[:4], "little")


@dataclass(frozen=True)
class StepRequest:
    """One request of a forward step: its stable integer ``key`` (in [0, 2^63); the engine's request
    identity), its length after the step, the number of new tokens (queries) the step adds, whether
    they are prompt tokens (in protect mode they extend the protected prompt), ``reset`` when the
    engine starts the request over (new request, or recomputation after preemption), and optionally
    the length of its whole prompt (``prompt_len``; in protect mode a prefill chunk then protects
    ``align_up(min(seq_len, prompt_len))``), and the request part of its victim RNG key
    (``rng_key``, e.g. ``request_rng_key(request_id, seed)``; default: the planner's state serial)."""

    key: int
    seq_len: int
    num_new: int
    prefill: bool
    reset: bool = False
    prompt_len: Optional[int] = None
    rng_key: Optional[int] = None


@dataclass(frozen=True)
class StepBatch:
    """The requests of one forward as columns (one entry per request row, batch order), what engine
    plugins build from their own per-batch arrays without a Python object per request. ``prompt_lens``
    is optional (-1 = unknown); ``rng_keys`` (optional, default: the keys) is the request part of each
    row's victim RNG key, stable across processes (``request_rng_key``); without it the planner's
    per-process state serial is used."""

    keys: Sequence[int]
    seq_lens: Sequence[int]
    num_new: Sequence[int]
    prefill: Sequence[bool]
    reset: Sequence[bool]
    prompt_lens: Optional[Sequence[int]] = None
    rng_keys: Optional[Sequence[int]] = None

    @staticmethod
    def of(requests: Sequence[StepRequest]) -> "StepBatch":
        """The columns of ``requests``."""
        prompts = [-1 if r.prompt_len is None else r.prompt_len for r in requests]
        return StepBatch(
            [r.key for r in requests],
            [r.seq_len for r in requests],
            [r.num_new for r in requests],
            [r.prefill for r in requests],
            [r.reset for r in requests],
            prompts if any(p >= 0 for p in prompts) else None,
            [r.key if r.rng_key is None else r.rng_key for r in requests]
            if any(r.rng_key is not None for r in requests)
            else None,
        )

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class Advance:
    """A committed eviction: logical positions ``[evicted_from, new_live_start)`` of request ``key``
    hold no live entry any more, so the engine may give their memory back. ``evicted_from`` is
    ``old_live_start`` unless the protected prompt ``[0, protected_len)`` lies beyond it (protect
    mode), which stays."""

    key: int
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


class StepPlan:
    """What ``begin_step`` decided for one forward, as the core's planner returned it: ``rows``, an
    int32 CPU tensor ``[len(WindowPlanner.FIELDS) * n]`` (row major: per request row, batch order: length,
    new tokens, query offset, committed live start, protected prefix, evictable start, eviction
    target or -1, and the window length / attention start / evictable start in the kernels'
    coordinates), the rows' state ``serials`` (the request part of the victim RNG key), the
    evictions committed from the last step (``released``), and the forward's token count. The
    per-field lists (``seq_lens``, ``live_starts``, ``evict_to`` with None for no eviction, ...)
    are derived once on first use; device copies once per device."""

    def __init__(self, keys: Sequence[int], rows: torch.Tensor, serials: Sequence[int], released, num_tokens: int):
        self.keys = keys
        self.rows = rows
        self.serials = serials
        self.released: List[Advance] = released
        self.num_tokens = num_tokens
        self._n = len(serials)
        self._lists: Optional[List[int]] = None
        self._device: Dict[Any, torch.Tensor] = {}
        self._windows: Optional["_Windows"] = None

    def __len__(self) -> int:
        return self._n

    def field(self, name: str) -> List[int]:
        """The planner's row ``name`` (one of ``WindowPlanner.FIELDS``) as a list."""
        if self._lists is None:
            self._lists = self.rows.tolist()
        i = _ROW[name] * self._n
        return self._lists[i : i + self._n]

    def row(self, name: str, device=None) -> torch.Tensor:
        """The planner's row ``name`` as an int32 tensor ``[n]`` on ``device`` (CPU by default; the
        plan is copied once per device)."""
        t = self.rows
        if device is not None and torch.device(device).type != "cpu":
            device = torch.device(device)
            t = self._device.get(device)
            if t is None:
                t = self._device[device] = self.rows.to(device)
        i = _ROW[name] * self._n
        return t[i : i + self._n]

    @property
    def seq_lens(self) -> List[int]:
        """Length of each request after the step."""
        return self.field("seq_lens")

    @property
    def num_new(self) -> List[int]:
        """New tokens of each request."""
        return self.field("num_new")

    @property
    def query_starts(self) -> List[int]:
        """Offset of each request's first query in the step's token array."""
        return self.field("query_starts")

    @property
    def live_starts(self) -> List[int]:
        """Committed ``live_start`` of each request."""
        return self.field("live_starts")

    @property
    def protected_lens(self) -> List[int]:
        """Protected prefix of each request (0 outside protect mode)."""
        return self.field("protected_lens")

    @property
    def evict_to(self) -> List[Optional[int]]:
        """``live_start`` each request's eviction at the end of this step moves to, None when none is due."""
        return [None if t < 0 else t for t in self.field("evict_to")]

    @property
    def requests(self) -> List[StepRequest]:
        """The rows as ``StepRequest`` (without the prefill / reset flags, which the plan does not keep)."""
        return [StepRequest(k, n, q, False) for k, n, q in zip(self.keys, self.seq_lens, self.num_new)]


@dataclass
class _Windows:
    """The windows of a plan as the kernels read them through ``tables`` (a block table per request,
    its evicted middle cut out in protect mode), on the tables' device: length, attention start and
    evictable start per request, in those cut coordinates (the plan's own outside protect mode), and the
    row selections every layer reuses."""

    source: torch.Tensor
    tables: torch.Tensor
    seq_lens: torch.Tensor
    attn_starts: torch.Tensor
    evict_starts: torch.Tensor
    #: Rows with one new token (decode), as a long tensor on the tables' device.
    decode: torch.Tensor
    #: Rows with more than one new token (prefill chunks).
    multi: List[int]
    #: Rows whose eviction is due at the end of this step.
    due: List[int]


class EvictionEngine:
    """Owns the per-request eviction state of one model (all layers) and runs the step. The live
    windows live in the core's batched planner (``foresightkv.WindowPlanner``); this class keeps
    only what the kernels' inputs need per request and layer (recent queries, kept positions),
    keyed by the planner's state serial.

    ``block_size`` is the engine's page size (SGLang: 1); ``checkpoint`` overrides the one the
    configuration names. The scorer's shape is checked against each layer's cache at its first
    eviction. ``on_evict(batch)``, when given, is called at every eviction of every layer with the
    batched inputs of the victim choice (``victims.EvictionBatch``, on the cache's device) before
    the policy is asked: it returns the survivors (int32 ``[S, H, max_live]``, as
    ``victims.choose_survivors``) to use instead, or None to let the policy choose (the simulator's
    and the trainer's hook)."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        block_size: int,
        checkpoint: Optional[ScorerCheckpoint] = None,
        on_evict: Optional[Callable[[EvictionBatch], Optional[torch.Tensor]]] = None,
    ) -> None:
        config.validate(block_size)
        self.config = config
        self.block_size = block_size
        self._checkpoint = checkpoint if checkpoint is not None else config.load_checkpoint()
        self.policy = config.build_policy(self._checkpoint)
        self._on_evict = on_evict
        self._planner = WindowPlanner(
            config.budget, config.interval, block_size, config.protect_prompt, self.policy.evicts
        )
        self._layers: Dict[int, Dict[int, _LayerState]] = {}
        self._stats: Dict[int, torch.Tensor] = {}
        self._weights: Dict[int, Any] = {}
        #: Request part of the victim RNG key per state serial (when it is not the request key).
        self._rng_keys: Dict[int, int] = {}

    @property
    def checkpoint(self) -> Optional[ScorerCheckpoint]:
        """The scorer checkpoint of the foresight policy (None for the baselines)."""
        return self._checkpoint

    # ------------------------------------------------------------------ per-request bookkeeping

    def keys(self) -> List[int]:
        """Keys of the requests with state."""
        return self._planner.keys()

    def live_start(self, key: int) -> int:
        """Committed ``live_start`` of ``key`` (0 for an unknown request)."""
        st = self._planner.state(key)
        return 0 if st is None else st[2]

    def protected_len(self, key: int) -> int:
        """Protected prefix of ``key``: its prompt rounded up to a block in protect mode, else 0."""
        st = self._planner.state(key)
        return 0 if st is None else st[4]

    def pending_live_start(self, key: int) -> Optional[int]:
        """``live_start`` the last step's eviction moves ``key`` to at the next ``begin_step``, if any."""
        st = self._planner.state(key)
        return None if st is None else st[3]

    def kept_positions(self, key: int, layer: int, num_kv_heads: int) -> torch.Tensor:
        """Original positions ``[num_kv_heads, live]`` (int64, ascending per head) of the entries each KV
        head of ``layer`` holds after the last step, i.e. that attention reads: the protected prompt
        (protect mode) then the live window (for checks and debugging)."""
        st = self._planner.state(key)
        if st is None:
            raise KeyError(key)
        serial, length, live_start, pending, protected_len = st
        start = live_start if pending is None else pending
        ls = self._layers.get(serial, {}).get(layer, _LayerState())
        window_start = min(max(start, protected_len), length)
        window = self._positions(ls, window_start, length, num_kv_heads, "cpu")
        if not protected_len:
            return window
        prompt = torch.arange(min(protected_len, length), dtype=torch.int64).expand(num_kv_heads, -1)
        return torch.cat([prompt, window], dim=1)

    def evictions(self, key: int) -> int:
        """Evictions ``key`` has had so far (the most of any layer; 0 for an unknown request)."""
        st = self._planner.state(key)
        if st is None:
            return 0
        return max((ls.evictions for ls in self._layers.get(st[0], {}).values()), default=0)

    def release(self, key: int) -> None:
        """Forgets ``key`` (finished, aborted or preempted request); its pending eviction is dropped."""
        serial = self._planner.release(key)
        if serial is not None:
            self._layers.pop(serial, None)
            self._rng_keys.pop(serial, None)

    def begin_step(self, requests: Union[StepBatch, Sequence[StepRequest]]) -> StepPlan:
        """Commits the previous step's evictions (returned as ``released``), then plans this step with
        one call of the core's planner: each request's live window and whether an eviction is due at
        its end. ``requests``: a ``StepBatch`` (columns, what plugins pass) or ``StepRequest``s."""
        b = requests if isinstance(requests, StepBatch) else StepBatch.of(requests)
        rows, serials, rel, dropped, num_tokens = self._planner.plan(
            b.keys, b.seq_lens, b.num_new, b.prefill, b.reset, b.prompt_lens
        )
        for serial in dropped:
            self._layers.pop(serial, None)
            self._rng_keys.pop(serial, None)
        if b.rng_keys is not None:
            if len(b.rng_keys) != len(b.keys):
                raise ShapeError(f"rng_keys has {len(b.rng_keys)} entries for {len(b.keys)} requests")
            for serial, rk in zip(serials, b.rng_keys):
                rk = int(rk)
                if not 0 <= rk < 1 << 32:
                    raise ConfigError(f"rng key {rk} is outside [0, 2^32)")
                self._rng_keys[serial] = rk
        table = torch.frombuffer(rows, dtype=torch.int32) if serials else torch.zeros(0, dtype=torch.int32)
        released = []
        if rel:
            r = rel.tolist()
            released = [Advance(r[i], r[i + 1], r[i + 2], r[i + 3]) for i in range(0, len(r), _RELEASED)]
        return StepPlan(b.keys, table, serials, released, num_tokens)

    def _layer_state(self, serial: int, layer: int) -> _LayerState:
        """The state of (request ``serial``, ``layer``), created on first use."""
        per = self._layers.get(serial)
        if per is None:
            per = self._layers[serial] = {}
        ls = per.get(layer)
        if ls is None:
            ls = per[layer] = _LayerState()
        return ls

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
        if num_tokens != plan.num_tokens:
            raise ShapeError(f"query holds {num_tokens} tokens, the plan's requests add {plan.num_tokens}")
        if block_tables.shape[0] != len(plan):
            raise ShapeError(f"block_tables has {block_tables.shape[0]} rows for {len(plan)} requests")
        win = self._windows(plan, block_tables)
        self._attention(plan, win, query, key_cache, value_cache, out, scale)
        if not self.policy.evicts:
            return out
        seq_lens, num_new, qstarts = plan.seq_lens, plan.num_new, plan.query_starts
        for i, (p, serial) in enumerate(zip(plan.protected_lens, plan.serials)):
            n = num_new[i]
            skip = min(max(p - (seq_lens[i] - n), 0), n)
            if n > skip:
                qs = qstarts[i]
                self._layer_state(serial, layer).queries.append(query[qs + skip : qs + n].detach().clone())
        if win.due:
            if stats is None:
                stats = self._layer_stats(layer, key_cache, hq // h)
            self._evict(plan, win, win.due, layer, key_cache, value_cache, stats, scale)
        return out

    def _windows(self, plan: StepPlan, block_tables: torch.Tensor) -> _Windows:
        """The plan's windows in the coordinates the kernels read (computed once per plan and table,
        on the table's device). In protect mode, a request whose ``live_start`` passed its protected
        prefix ``P`` reads a table row whose blocks ``[P, live_start)`` are cut out (one gather): its
        window ``[0, P + len - live_start)`` is the prompt then the live entries, and its evictable
        part starts at ``P``."""
        win = plan._windows
        if win is not None and win.source is block_tables:
            return win
        dev = block_tables.device
        tables = block_tables
        if self.config.protect_prompt and bool((plan.row("live_starts") > plan.row("protected_lens")).any()):
            bs = self.block_size
            protected, live = plan.row("protected_lens", dev), plan.row("live_starts", dev)
            prompt_blocks = (protected // bs).long().unsqueeze(1)
            shift = ((live - protected).clamp(min=0) // bs).long().unsqueeze(1)
            width = block_tables.shape[1]
            cols = torch.arange(width, device=dev).unsqueeze(0)
            idx = (cols + shift * (cols >= prompt_blocks)).clamp(max=max(width - 1, 0))
            tables = torch.gather(block_tables, 1, idx)
        num_new = plan.row("num_new")
        dec = torch.nonzero(num_new == 1).flatten()
        multi = torch.nonzero(num_new > 1).flatten().tolist()
        due = torch.nonzero(plan.row("evict_to") >= 0).flatten().tolist()
        win = _Windows(
            block_tables,
            tables,
            plan.row("window_lens", dev),
            plan.row("attn_starts", dev),
            plan.row("evict_starts", dev),
            dec.to(dev),
            multi,
            due,
        )
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
        if win.decode.numel():
            sel = win.decode.to(device)
            rows = plan.row("query_starts", device).index_select(0, sel).long()
            o = kernels.paged_attention_decode(
                query.index_select(0, rows).contiguous(),
                key_cache,
                value_cache,
                block_tables.index_select(0, sel).contiguous(),
                win.seq_lens.index_select(0, sel).contiguous(),
                win.attn_starts.index_select(0, sel).contiguous(),
                scale=scale,
            )
            out.index_copy_(0, rows, o.to(out.dtype))
        hq, h = query.shape[1], key_cache.shape[2]
        num_new, qstarts = plan.num_new, plan.query_starts
        attn_starts, window_lens = plan.field("attn_starts"), plan.field("window_lens")
        for i in win.multi:
            n = num_new[i]
            start, end = attn_starts[i], window_lens[i]
            blocks, offs = self._slots(block_tables[i], start, end)
            k = key_cache[blocks, offs].transpose(0, 1).unsqueeze(0)
            v = value_cache[blocks, offs].transpose(0, 1).unsqueeze(0)
            qs = qstarts[i]
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
        all on the cache's device: ``window_stats``, the policy's batched scores and survivor
        selection (``victims.choose_survivors``, or the ``on_evict`` hook's), ``compact``; the
        windows' lengths and counts come from the plan's host lists, so no K/V, statistic or query
        is read back to the host."""
        device = key_cache.device
        h = key_cache.shape[2]
        cfg = self.config
        sel = torch.tensor(due, dtype=torch.long, device=device)
        bt = win.tables.index_select(0, sel).contiguous()
        window_lens, evict_starts = plan.field("window_lens"), plan.field("evict_starts")
        bases_all, targets = plan.field("bases"), plan.field("evict_to")
        seq_lens = plan.seq_lens
        live = [window_lens[i] - evict_starts[i] for i in due]
        ends = [seq_lens[i] for i in due]
        bases = [bases_all[i] for i in due]
        sl = win.seq_lens.index_select(0, sel).contiguous()
        ls = win.evict_starts.index_select(0, sel).contiguous()
        num_evict = [targets[i] - b for i, b in zip(due, bases)]
        ne = torch.tensor(num_evict, dtype=torch.int32, device=device)
        layer_states = [self._layer_state(plan.serials[i], layer) for i in due]
        queries, nq, nq_host = self._due_queries(layer_states, key_cache)
        # The statistics window is the interval L (earlier queries of the first eviction only enter
        # the cumulative statistics), in the mode the scorer was trained on (None: baselines).
        kernels.window_stats(
            queries, nq, key_cache, bt, sl, ls, stats, scale=scale, window=cfg.interval, mode=self.policy.stats_mode
        )
        max_live = max(live)
        positions = torch.full((len(due), h, max_live), -1, dtype=torch.int64, device=device)
        for j, (s, base, end) in enumerate(zip(layer_states, bases, ends)):
            positions[j, :, : live[j]] = self._positions(s, base, end, h, device)
        batch = EvictionBatch(
            layer=layer,
            key_cache=key_cache,
            value_cache=value_cache,
            stats=stats,
            block_tables=bt,
            seq_lens=sl,
            live_starts=ls,
            num_evict=ne,
            queries=queries,
            num_queries=nq,
            positions=positions,
            live=live,
            num_evict_host=num_evict,
            num_queries_host=nq_host,
            lengths=ends,
            evictions=[s.evictions for s in layer_states],
            requests=[self._rng_key(plan, i) for i in due],
            keys=[plan.keys[i] for i in due],
            num_protected=cfg.interval,
            scale=scale,
            block_size=self.block_size,
        )
        survivors = self._on_evict(batch) if self._on_evict is not None else None
        if survivors is None:
            survivors = choose_survivors(
                self.policy, batch, weights=lambda: self._layer_weights(layer, h, batch.group, key_cache.shape[3], device)
            )
        elif tuple(survivors.shape) != tuple(positions.shape) or survivors.dtype != torch.int32:
            raise ShapeError(
                f"on_evict returned survivors {tuple(survivors.shape)} {survivors.dtype}, "
                f"expected int32 {tuple(positions.shape)}"
            )
        kernels.compact(key_cache, value_cache, bt, sl, ls, ne, survivors, stats)
        kept = positions.gather(2, survivors.long().clamp(min=0))
        for j, s in enumerate(layer_states):
            s.positions = kept[j, :, : live[j] - num_evict[j]].clone()
            s.positions_end = ends[j]
            s.queries.clear()
            s.evictions += 1

    def _due_queries(self, layer_states: Sequence[_LayerState], key_cache: torch.Tensor):
        """The queries of the due requests since their last eviction as the victim choice reads them:
        ``[due, maxq, Hq, D]`` (cache dtype, rows ``[0, count)`` of each request, oldest first), the
        counts as an int32 tensor on the cache's device and as a host list."""
        qbufs = [torch.cat(s.queries) for s in layer_states]
        counts = [q.shape[0] for q in qbufs]
        hq, d = qbufs[0].shape[1], qbufs[0].shape[2]
        queries = key_cache.new_zeros((len(qbufs), max(counts), hq, d))
        for j, q in enumerate(qbufs):
            queries[j, : q.shape[0]] = q.to(key_cache.dtype)
        nq = torch.tensor(counts, dtype=torch.int32, device=key_cache.device)
        return queries, nq, counts

    def _rng_key(self, plan: StepPlan, row: int) -> int:
        """The request part of the victim RNG key of plan row ``row``: the ``rng_keys`` the engine gave
        for the request, else its state serial (per process: plugins pass ``rng_keys``)."""
        serial = plan.serials[row]
        return self._rng_keys.get(serial, serial)

    def _positions(self, s: _LayerState, start: int, end: int, h: int, device=None) -> torch.Tensor:
        """Original positions ``[H, live]`` (int64, on ``device``, default the kept positions' own or
        the CPU) of the live entries of each KV head: those kept at the last eviction, then
        ``[max(positions_end, start), end)``."""
        if device is None:
            device = s.positions.device if s.positions is not None else "cpu"
        fresh_from = max(s.positions_end, start) if s.positions is not None else start
        fresh = torch.arange(fresh_from, end, dtype=torch.int64, device=device).expand(h, -1)
        if s.positions is None:
            return fresh.contiguous()
        return torch.cat([s.positions.to(device), fresh], dim=1)

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

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
The kernels read the two parts as one window through a block table whose evicted middle is cut out.

Recent queries live in a per-layer ring of the last ``max(L, 8)`` queries per request slot (the
planner's ``slots``), reserved at start-up (``EvictionEngine.reserve``): the statistics window (the
last ``L`` queries) and the baselines' observation windows need no more, and the older queries of a
long first interval are folded into the cumulative statistics as they leave the ring
(``window_stats``' streaming fold), bit for bit what one call over all of them gives. A decode step
builds its device tensors once per forward from the planner's flat arrays (one host-to-device copy)
and passes the kernels the host mirrors, so it does not wait for the device."""

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .. import kernels
from .._native import NUM_STATS, ScorerCheckpoint, WindowPlanner
from ..errors import CapacityError, ConfigError, ShapeError
from ..evict import scorer_weights
from .config import EngineConfig
from .transfer import to_device
from .victims import EvictionBatch, choose_survivors

#: Row ``i`` of ``StepPlan.rows`` holds the planner's field ``_FIELDS[i]`` (``WindowPlanner.FIELDS``).
_FIELDS = WindowPlanner.FIELDS
_ROW = {name: i for i, name in enumerate(_FIELDS)}
_RELEASED = len(WindowPlanner.RELEASED_FIELDS)

#: Request slots the query rings hold when the plugin reserved none (``EvictionEngine.reserve``);
#: the rings then grow on demand.
_DEFAULT_SLOTS = 8


def ring_rows(interval: int) -> int:
    """Queries a request slot keeps per layer: the statistics window (the interval ``L``) and the
    baselines' observation windows (8 queries) need no more; older ones are folded as they leave."""
    return max(int(interval), 8)


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


class StepBatch:
    """The requests of one forward as columns (one entry per request row, batch order), what engine
    plugins build from their own per-batch arrays without a Python object per request. ``prompt_lens``
    (optional, -1 = unknown) is each row's whole prompt length: with it, no eviction is due while the
    prompt is still being prefilled and the prompt is compressed once at its end, so the result does
    not depend on how the engine chunked it (without it every prefill chunk of more than one token is
    compressed at its end). ``rng_keys`` (optional) is the request part of each row's victim RNG key,
    stable across processes (``request_rng_key(request_id, seed)``; pass it on every forward); without
    it the planner's per-process state serial is used."""

    # A plain slotted class, not a frozen dataclass: built once per forward on the hot path, where
    # a frozen dataclass's ``__init__`` costs about three times the planner's own call at batch 1.
    __slots__ = ("keys", "seq_lens", "num_new", "prefill", "reset", "prompt_lens", "rng_keys")

    def __init__(
        self,
        keys: Sequence[int],
        seq_lens: Sequence[int],
        num_new: Sequence[int],
        prefill: Sequence[bool],
        reset: Sequence[bool],
        prompt_lens: Optional[Sequence[int]] = None,
        rng_keys: Optional[Sequence[int]] = None,
    ):
        self.keys = keys
        self.seq_lens = seq_lens
        self.num_new = num_new
        self.prefill = prefill
        self.reset = reset
        self.prompt_lens = prompt_lens
        self.rng_keys = rng_keys

    def _columns(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepBatch) and self._columns() == other._columns()

    __hash__ = None  # columns are lists: unhashable, as the dataclass it replaces was in practice

    def __repr__(self) -> str:
        cols = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"StepBatch({cols})"

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


class _KeptPositions:
    """Per layer and request slot (the planner's ``slots``), from the slot's request's first eviction
    on: the original positions of the entries each KV head kept at the last eviction (``kept``
    ``[slots, H, K]`` int32 on the cache's device, the first ``count[slot]`` valid), the length they
    run to (``end``), the evictions so far, and the state serial that owns the slot's row (a released
    or reset request's serial never comes back, so a row whose owner is not the plan's serial is
    fresh: nothing kept, no eviction yet). Read and written for all due requests of a layer at once."""

    def __init__(self) -> None:
        self.kept: Optional[torch.Tensor] = None
        self.count = np.full(0, -1, dtype=np.int64)
        self.end = np.zeros(0, dtype=np.int64)
        self.evictions = np.zeros(0, dtype=np.int64)
        self.owner = np.full(0, -1, dtype=np.int64)

    def lookup(self, slots: np.ndarray, serials: np.ndarray):
        """``(count, end, evictions)`` of ``slots`` for their requests ``serials`` (count -1: fresh)."""
        cap = self.owner.size
        if not cap:
            return np.full(slots.size, -1, np.int64), np.zeros(slots.size, np.int64), np.zeros(slots.size, np.int64)
        inside = slots < cap
        at = np.where(inside, slots, 0)
        mine = inside & (self.owner[at] == serials)
        return (
            np.where(mine, self.count[at], -1),
            np.where(mine, self.end[at], 0),
            np.where(mine, self.evictions[at], 0),
        )

    def store(self, slots, serials, kept: torch.Tensor, count, end, evictions) -> None:
        """Files ``kept`` ``[len(slots), H, K']`` (each row's first ``count`` valid) for ``slots``."""
        need = int(slots.max()) + 1
        cap = self.owner.size
        h, k = kept.shape[1], kept.shape[2]
        if need > cap:
            grow = max(need, 2 * cap, _DEFAULT_SLOTS) - cap
            self.count = np.concatenate([self.count, np.full(grow, -1, np.int64)])
            self.end = np.concatenate([self.end, np.zeros(grow, np.int64)])
            self.evictions = np.concatenate([self.evictions, np.zeros(grow, np.int64)])
            self.owner = np.concatenate([self.owner, np.full(grow, -1, np.int64)])
        old = self.kept
        if old is None or old.shape[0] < self.owner.size or old.shape[1] != h or old.shape[2] < k or old.device != kept.device:
            width = max(k, old.shape[2] if old is not None and old.shape[1] == h else 0)
            grown = torch.full((self.owner.size, h, width), -1, dtype=torch.int32, device=kept.device)
            if old is not None and old.shape[1] == h and old.device == kept.device:
                grown[: old.shape[0], :, : old.shape[2]] = old
            self.kept = grown
        index = to_device(slots, kept.device)
        self.kept[index, :, :k] = kept.to(torch.int32)
        self.count[slots], self.end[slots], self.evictions[slots] = count, end, evictions
        self.owner[slots] = serials

    def positions(self, slot: int, serial: int, start: int, end: int, h: int) -> torch.Tensor:
        """Original positions ``[H, live]`` (CPU int64) of the live entries of ``slot``'s request: those
        kept at its last eviction, then ``[max(end_kept, start), end)``."""
        count, kept_end, _ = (int(x[0]) for x in self.lookup(np.array([slot]), np.array([serial])))
        if count < 0 or self.kept is None:
            return torch.arange(start, end, dtype=torch.int64).expand(h, -1).contiguous()
        fresh = torch.arange(max(kept_end, start), end, dtype=torch.int64).expand(h, -1)
        return torch.cat([self.kept[slot, :, :count].cpu().long(), fresh], dim=1)


class StepPlan:
    """What ``begin_step`` decided for one forward, as the core's planner returned it: ``rows``, an
    int32 CPU tensor ``[len(WindowPlanner.FIELDS) * n]`` (row major: per request row, batch order: length,
    new tokens, query offset, committed live start, protected prefix, evictable start, eviction
    target or -1, and the window length / attention start / evictable start in the kernels'
    coordinates), the rows' state ``serials`` (the request part of the victim RNG key), the
    evictions committed from the last step (``released``), and the forward's token count. The
    per-field lists (``seq_lens``, ``live_starts``, ``evict_to`` with None for no eviction, ...)
    are derived once on first use; device copies once per device."""

    def __init__(
        self,
        keys: Sequence[int],
        rows: torch.Tensor,
        serials: Sequence[int],
        released,
        num_tokens: int,
        rng_keys: Optional[torch.Tensor] = None,
    ):
        self.keys = keys
        self.rows = rows
        self.serials = serials
        self.released: List[Advance] = released
        self.num_tokens = num_tokens
        #: Request part of each row's victim RNG key as the engine gave it (None: not given).
        self.rng_keys = rng_keys
        self._n = len(serials)
        self._lists: Optional[List[int]] = None
        self._device: Dict[Any, torch.Tensor] = {}
        self._windows: Optional["_Windows"] = None
        self._host: Optional[_HostPlan] = None

    @property
    def max_slot(self) -> int:
        """Largest request slot of the plan's rows (-1 for an empty plan)."""
        return int(self.row("slots").max()) if self._n else -1

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
                t = self._device[device] = to_device(self.rows, device)
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


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the ``n`` newest positions ``q`` ``[R, n, Hq, D]`` of ``R`` rows over windows ``k``,
    ``v`` ``[R, live, H, D]`` whose last ``n`` entries are theirs: query ``j`` sees entries ``0 ..= live -
    n + j``. A square window is plain causal; otherwise a lower-right causal bias
    (``causal_lower_right``) over K/V expanded to the query heads, which PyTorch runs in its fused
    kernels (flash / memory efficient: O(n x head_dim) memory) where the device has them, instead of
    an explicit mask that selects the math kernel and materialises the fp32 ``[Hq, n, live]``
    attention. Returns ``[R, n, Hq, D]``."""
    n, hq = q.shape[1], q.shape[2]
    live, h = k.shape[1], k.shape[2]
    qh = q.transpose(1, 2)
    if n == live:
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=hq != h)
    else:
        if hq != h:
            k, v = k.repeat_interleave(hq // h, dim=2), v.repeat_interleave(hq // h, dim=2)
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(n, live), scale=scale)
    return o.transpose(1, 2)


class _HostPlan:
    """What every layer of one forward reuses, derived once per plan on the host from the planner's
    flat rows (CPU tensor ops, no device involved): the decode and multi-token row selections, the
    host mirrors of the kernels' window arrays, and the query ring's index arrays: where this
    forward's recorded queries go (``rec_*``), which older queries leave the ring and are folded
    first (``fold_*``), and which ring rows an eviction reads (``ev_*``). ``dev`` lists the int32
    arrays the device needs, copied there in one transfer per device."""

    def __init__(self, plan: "StepPlan", ring: int) -> None:
        n = len(plan)
        rows = plan.rows.view(len(_FIELDS), n)

        def f(name: str) -> torch.Tensor:
            return rows[_ROW[name]]

        num_new = f("num_new")
        self.n = n
        self.window_lens = f("window_lens")
        self.attn_starts = f("attn_starts")
        self.evict_starts = f("evict_starts")
        dec = num_new == 1
        self.all_decode = n > 0 and bool(dec.all())
        self.multi: List[int] = [] if self.all_decode else torch.nonzero(num_new > 1).flatten().tolist()
        self.due: List[int] = torch.nonzero(f("evict_to") >= 0).flatten().tolist()
        dev: Dict[str, torch.Tensor] = {"rows": plan.rows}
        if not self.all_decode:
            d = torch.nonzero(dec).flatten()
            self.num_decode = d.numel()
            self.decode_lens = self.window_lens.index_select(0, d)
            self.decode_starts = self.attn_starts.index_select(0, d)
            dev["decode"] = d.int()
        # Query ring: row r of a slot holds the query of position p with p % ring == r.
        self.num_fold = self.fold_max = self.ev_max = 0
        nq_i32 = f("num_queries")
        if self.all_decode and not self.due and bool((nq_i32 > 0).all()) and int(nq_i32.max()) <= ring:
            # A decode step with no eviction due and nothing to fold: every row records its query.
            slot_i32 = f("slots")
            if torch.unique(slot_i32).numel() != n:
                raise ShapeError("two rows of one request record queries in one forward")
            self.num_recorded = n
            dev["rec_dst"] = slot_i32 * ring + (f("seq_lens") - 1) % ring
            self._pack(dev)
            return
        seq, nq = f("seq_lens").long(), nq_i32.long()
        new, qs, slot = num_new.long(), f("query_starts").long(), f("slots").long()
        rec = torch.minimum(new, nq).clamp(min=0)
        self.num_recorded = int(rec.sum())
        keep = rec.clamp(max=ring)  # only the last `ring` of a long chunk stay in the ring
        if self.num_recorded:
            if bool((keep <= 1).all()):
                r = torch.nonzero(keep).flatten()
                tok, pos = qs[r], seq[r] - 1
            else:
                r = torch.repeat_interleave(torch.arange(n), keep)
                k = torch.arange(r.numel()) - torch.repeat_interleave(torch.cumsum(keep, 0) - keep, keep)
                tok, pos = qs[r] + new[r] - keep[r] + k, seq[r] - keep[r] + k
            rec_slots = slot[r]
            if torch.unique(rec_slots).numel() != int((keep > 0).sum()):
                raise ShapeError("two rows of one request record queries in one forward")
            dev["rec_tokens"] = tok.int()
            dev["rec_dst"] = (rec_slots * ring + pos % ring).int()
        # Queries past the ring's depth are folded into the statistics before they are overwritten.
        before = (nq - rec - ring).clamp(min=0)
        after = (nq - ring).clamp(min=0)
        count = after - before
        fr = torch.nonzero(count > 0).flatten()
        self.num_fold = fr.numel()
        if self.num_fold:
            c = count[fr]
            cmax = self.fold_max = int(c.max())
            j = torch.arange(cmax).unsqueeze(0).minimum(c.unsqueeze(1) - 1)
            q0 = (seq - nq)[fr].unsqueeze(1)
            pos = q0 + before[fr].unsqueeze(1) + j
            old = pos < (seq - rec)[fr].unsqueeze(1)
            ring_idx = slot[fr].unsqueeze(1) * ring + pos % ring
            tok_idx = (qs + new - seq)[fr].unsqueeze(1) + pos
            self.fold_counts = c.int()
            self.fold_before = before[fr].int()
            end = (q0 + after[fr].unsqueeze(1)).squeeze(1)
            self.fold_lens = (self.window_lens.index_select(0, fr) - (seq[fr] - end)).int()
            self.fold_starts = self.evict_starts.index_select(0, fr)
            self.fold_all_old = bool(old.all())
            dev["fold_rows"] = fr.int()
            dev["fold_ring"] = torch.where(old, ring_idx, 0).flatten().int()
            dev["fold_tok"] = torch.where(old, 0, tok_idx).flatten().int()
            dev["fold_old"] = old.flatten().int()
            for name in ("fold_counts", "fold_before", "fold_lens", "fold_starts"):
                dev[name] = getattr(self, name)
        # An eviction reads its request's ring rows, oldest first.
        if self.due:
            d = torch.tensor(self.due, dtype=torch.long)
            k = nq[d].clamp(max=ring)
            kmax = self.ev_max = max(int(k.max()), 1)
            j = torch.arange(kmax).unsqueeze(0).minimum((k - 1).clamp(min=0).unsqueeze(1))
            pos = (seq[d] - k).unsqueeze(1) + j
            self.ev_counts = k.int()
            self.ev_folded = after[d].int()
            dev["ev_ring"] = (slot[d].unsqueeze(1) * ring + pos % ring).flatten().int()
            dev["ev_counts"] = self.ev_counts
            dev["ev_folded"] = self.ev_folded
        self._pack(dev)

    def _pack(self, dev: Dict[str, torch.Tensor]) -> None:
        """The device arrays as one int32 host tensor (``packed``) and each one's (offset, length)."""
        self.layout: Dict[str, Any] = {}
        off = 0
        for name, t in dev.items():
            self.layout[name] = (off, t.numel())
            off += t.numel()
        parts = [t.flatten() if t.dtype == torch.int32 else t.flatten().int() for t in dev.values()]
        self.packed = torch.cat(parts)


@dataclass
class _Windows:
    """The windows of a plan as the kernels read them through ``tables`` (a block table per request,
    its evicted middle cut out in protect mode), on the tables' device: length, attention start and
    evictable start per request, in those cut coordinates (the plan's own outside protect mode),
    with the host plan (mirrors, selections) and its device arrays (``dev``, views of one copy)."""

    source: torch.Tensor
    tables: torch.Tensor
    seq_lens: torch.Tensor
    attn_starts: torch.Tensor
    evict_starts: torch.Tensor
    host: _HostPlan
    dev: Dict[str, torch.Tensor]

    @property
    def due(self) -> List[int]:
        """Rows whose eviction is due at the end of this step."""
        return self.host.due


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
        #: Per layer: the original positions each request slot's heads kept (``_KeptPositions``).
        self._kept: Dict[int, _KeptPositions] = {}
        self._stats: Dict[int, torch.Tensor] = {}
        self._weights: Dict[int, Any] = {}
        #: Query ring rows per request slot and layer, and the rings (``[slots, ring, Hq, D]``).
        self.ring = ring_rows(config.interval)
        self._rings: Dict[int, torch.Tensor] = {}
        self._reserved: Optional[Dict[str, Any]] = None

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
        serial, length, live_start, pending, protected_len, slot = st[:6]
        start = live_start if pending is None else pending
        window_start = min(max(start, protected_len), length)
        window = self._kept.get(layer, _KeptPositions()).positions(slot, serial, window_start, length, num_kv_heads)
        if not protected_len:
            return window
        prompt = torch.arange(min(protected_len, length), dtype=torch.int64).expand(num_kv_heads, -1)
        return torch.cat([prompt, window], dim=1)

    def evictions(self, key: int) -> int:
        """Evictions ``key`` has had so far (the most of any layer; 0 for an unknown request)."""
        st = self._planner.state(key)
        if st is None:
            return 0
        slot, serial = np.array([st[5]]), np.array([st[0]])
        return max((int(kp.lookup(slot, serial)[2][0]) for kp in self._kept.values()), default=0)

    def reserve(
        self,
        *,
        max_requests: int,
        layers: Union[int, Sequence[int]],
        num_q_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Any,
    ) -> int:
        """Allocates, at start-up, the recent-query rings of ``layers`` (a count, or the layer indices):
        ``[max_requests, ring_rows(L), num_q_heads, head_dim]`` of ``dtype`` on ``device`` each, and bounds
        the requests holding state to ``max_requests`` (a forward past it raises ``CapacityError``).
        Returns the bytes allocated (0 for a policy that never evicts). Without it the rings are
        allocated at each layer's first step and grow with the requests."""
        if int(max_requests) <= 0:
            raise ConfigError(f"max_requests must be positive, got {max_requests}")
        if int(num_q_heads) <= 0 or int(head_dim) <= 0:
            raise ConfigError(f"num_q_heads and head_dim must be positive, got {num_q_heads} and {head_dim}")
        layer_ids = list(range(int(layers))) if isinstance(layers, int) else [int(x) for x in layers]
        shape = (int(max_requests), self.ring, int(num_q_heads), int(head_dim))
        rings = {} if not self.policy.evicts else {
            layer: torch.zeros(shape, dtype=dtype, device=device) for layer in layer_ids
        }
        self.adopt_rings(rings, max_requests=int(max_requests), num_q_heads=int(num_q_heads),
                         head_dim=int(head_dim), dtype=dtype, device=device)
        return sum(r.numel() * r.element_size() for r in rings.values())

    def adopt_rings(
        self,
        rings: Mapping[int, torch.Tensor],
        *,
        max_requests: int,
        num_q_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Any,
        bound: bool = True,
    ) -> None:
        """Takes ``rings`` (layer -> ``[max_requests, ring_rows(L), num_q_heads, head_dim]`` of ``dtype`` on
        ``device``), allocated by the caller where its engine counts them (vLLM: at model construction,
        inside ``--gpu-memory-utilization``), as the layers' query rings, and bounds the requests holding
        state to ``max_requests`` (a forward past it raises ``CapacityError``), as ``reserve`` does;
        ``bound=False``: no bound, the rings grow past ``max_requests`` slots on demand."""
        shape = (int(max_requests), self.ring, int(num_q_heads), int(head_dim))
        if shape[0] <= 0:
            raise ConfigError(f"max_requests must be positive, got {max_requests}")
        want = torch.device(device)
        for layer, ring in rings.items():
            here = ring.device
            same = here.type == want.type and (want.index is None or here.index == want.index)
            if tuple(ring.shape) != shape or ring.dtype != dtype or not same:
                raise ShapeError(
                    f"the query ring of layer {layer} is {tuple(ring.shape)} {ring.dtype} on {ring.device}; "
                    f"this engine needs {shape} {dtype} on {want}"
                )
        if bound:
            self._planner.set_max_slots(shape[0])
            self._reserved = {"slots": shape[0], "shape": shape[1:], "dtype": dtype, "device": want}
        self._rings = dict(rings) if self.policy.evicts else {}

    def reserved_bytes(self) -> int:
        """Bytes of the query rings and statistics buffers allocated so far (all layers)."""
        return self.stats_bytes() + sum(r.numel() * r.element_size() for r in self._rings.values())

    def _ring(self, layer: int, plan: "StepPlan", query: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The query ring of ``layer``: reserved at start-up (checked against the step's queries), else
        allocated on first use and grown (doubling) to the largest slot of the plan."""
        ring = self._rings.get(layer)
        hq, d = query.shape[1], query.shape[2]
        if self._reserved is not None and ring is not None:
            if tuple(ring.shape[1:]) != (self.ring, hq, d) or ring.device != query.device:
                raise ShapeError(
                    f"queries [{hq}, {d}] on {query.device} do not fit the reserved rings "
                    f"{tuple(ring.shape)} on {ring.device}"
                )
            return ring
        need = plan.max_slot + 1
        if ring is None or ring.shape[0] < need or tuple(ring.shape[1:]) != (self.ring, hq, d) or ring.device != query.device:
            if self._reserved is not None:
                raise CapacityError(f"layer {layer} has no reserved query ring (EvictionEngine.reserve)")
            slots = max(_DEFAULT_SLOTS, need, 2 * (ring.shape[0] if ring is not None else 0))
            grown = torch.zeros((slots, self.ring, hq, d), dtype=dtype, device=query.device)
            if ring is not None and tuple(ring.shape[1:]) == (self.ring, hq, d) and ring.device == query.device:
                grown[: ring.shape[0]] = ring
            ring = self._rings[layer] = grown
        return ring

    def release(self, key: int) -> None:
        """Forgets ``key`` (finished, aborted or preempted request); its pending eviction is dropped."""
        self._planner.release(key)  # its serial never comes back: its slot's rows read as fresh

    def begin_step(self, requests: Union[StepBatch, Sequence[StepRequest]]) -> StepPlan:
        """Commits the previous step's evictions (returned as ``released``), then plans this step with
        one call of the core's planner: each request's live window and whether an eviction is due at
        its end. ``requests``: a ``StepBatch`` (columns, what plugins pass) or ``StepRequest``s."""
        b = requests if isinstance(requests, StepBatch) else StepBatch.of(requests)
        rows, serials, rel, dropped, num_tokens = self._planner.plan(
            b.keys, b.seq_lens, b.num_new, b.prefill, b.reset, b.prompt_lens
        )
        del dropped  # reset states: their serials never come back (``_KeptPositions``)
        rng = None
        if b.rng_keys is not None:
            if len(b.rng_keys) != len(b.keys):
                raise ShapeError(f"rng_keys has {len(b.rng_keys)} entries for {len(b.keys)} requests")
            rng = torch.as_tensor(b.rng_keys, dtype=torch.int64)
            if rng.numel() and (int(rng.min()) < 0 or int(rng.max()) >= 1 << 32):
                bad = rng[(rng < 0) | (rng >= 1 << 32)][0]
                raise ConfigError(f"rng key {int(bad)} is outside [0, 2^32)")
        table = torch.frombuffer(rows, dtype=torch.int32) if serials else torch.zeros(0, dtype=torch.int32)
        released = []
        if rel:
            r = rel.tolist()
            released = [Advance(r[i], r[i + 1], r[i + 2], r[i + 3]) for i in range(0, len(r), _RELEASED)]
        return StepPlan(b.keys, table, serials, released, num_tokens, rng)

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
        if win.host.num_fold or win.due:
            if stats is None:
                stats = self._layer_stats(layer, key_cache, hq // h)
        self._record(plan, win, layer, query, key_cache, stats, scale)
        if win.due:
            self._evict(plan, win, win.due, layer, key_cache, value_cache, stats, scale)
        return out

    def _record(self, plan, win, layer, query, key_cache, stats, scale) -> None:
        """Records the step's queries of the evictable windows in ``layer``'s ring (one batched copy),
        after folding the queries that leave it into the statistics (``window_stats`` fold-only over
        the rows that need it: the queries beyond the ring's depth since the last eviction)."""
        hp, dev = win.host, win.dev
        if not hp.num_recorded:
            return
        ring = self._ring(layer, plan, query, key_cache.dtype)
        flat = ring.view(-1, ring.shape[2], ring.shape[3])
        if hp.num_fold:
            old = flat.index_select(0, dev["fold_ring"])
            if not hp.fold_all_old:
                new = query.index_select(0, dev["fold_tok"]).to(flat.dtype)
                old = torch.where(dev["fold_old"].view(-1, 1, 1).bool(), old, new)
            fq = old.view(hp.num_fold, hp.fold_max, ring.shape[2], ring.shape[3])
            bt = win.tables.index_select(0, dev["fold_rows"]).contiguous()
            kernels.window_stats(
                fq,
                dev["fold_counts"],
                key_cache,
                bt,
                dev["fold_lens"],
                dev["fold_starts"],
                stats,
                scale=scale,
                window=self.config.interval,
                mode=self.policy.stats_mode,
                folded=dev["fold_before"],
                fold_only=True,
                seq_lens_host=hp.fold_lens,
                live_starts_host=hp.fold_starts,
                num_queries_host=hp.fold_counts,
                folded_host=hp.fold_before,
            )
        src = query if hp.num_recorded == query.shape[0] and hp.all_decode else query.index_select(0, dev["rec_tokens"])
        flat.index_put_((dev["rec_dst_long"],), src.to(flat.dtype))

    def _windows(self, plan: StepPlan, block_tables: torch.Tensor) -> _Windows:
        """The plan's windows in the coordinates the kernels read (computed once per plan and table,
        on the table's device). In protect mode, a request whose ``live_start`` passed its protected
        prefix ``P`` reads a table row whose blocks ``[P, live_start)`` are cut out (one gather): its
        window ``[0, P + len - live_start)`` is the prompt then the live entries, and its evictable
        part starts at ``P``. The host plan is derived once per plan; its device arrays arrive in one
        copy."""
        win = plan._windows
        if win is not None and win.source is block_tables:
            return win
        dev = block_tables.device
        hp = plan._host
        if hp is None:
            hp = plan._host = _HostPlan(plan, self.ring)
        packed = to_device(hp.packed, dev)
        arrays = {name: packed[o : o + n] for name, (o, n) in hp.layout.items()}
        if "rec_dst" in arrays:
            arrays["rec_dst_long"] = arrays["rec_dst"].long()
        rows = arrays["rows"]
        n = len(plan)

        def row(name: str) -> torch.Tensor:
            i = _ROW[name] * n
            return rows[i : i + n]

        tables = block_tables
        if self.config.protect_prompt and bool((plan.row("live_starts") > plan.row("protected_lens")).any()):
            bs = self.block_size
            protected, live = row("protected_lens"), row("live_starts")
            prompt_blocks = (protected // bs).long().unsqueeze(1)
            shift = ((live - protected).clamp(min=0) // bs).long().unsqueeze(1)
            width = block_tables.shape[1]
            cols = torch.arange(width, device=dev).unsqueeze(0)
            idx = (cols + shift * (cols >= prompt_blocks)).clamp(max=max(width - 1, 0))
            tables = torch.gather(block_tables, 1, idx)
        arrays["query_starts"] = row("query_starts")
        win = _Windows(block_tables, tables, row("window_lens"), row("attn_starts"), row("evict_starts"), hp, arrays)
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
        """Decode rows through the paged decode kernel (given the host mirrors of their windows: no
        device read), multi-token rows through causal SDPA over the gathered window ``win`` (query
        ``j`` of ``n`` sees window slots ``0 ..= live - n + j``: a lower-right causal bias, so the
        fused kernels run and memory stays O(chunk x head_dim))."""
        hp = win.host
        if hp.all_decode:
            direct = out.dtype == query.dtype and out.stride(-1) == 1
            o = kernels.paged_attention_decode(
                query,
                key_cache,
                value_cache,
                win.tables,
                win.seq_lens,
                win.attn_starts,
                scale=scale,
                out=out if direct else None,
                seq_lens_host=hp.window_lens,
                live_starts_host=hp.attn_starts,
            )
            if not direct:
                out.copy_(o)
            return
        if hp.num_decode:
            sel = win.dev["decode"]
            rows = win.dev["query_starts"].index_select(0, sel).long()
            o = kernels.paged_attention_decode(
                query.index_select(0, rows).contiguous(),
                key_cache,
                value_cache,
                win.tables.index_select(0, sel).contiguous(),
                win.seq_lens.index_select(0, sel).contiguous(),
                win.attn_starts.index_select(0, sel).contiguous(),
                scale=scale,
                seq_lens_host=hp.decode_lens,
                live_starts_host=hp.decode_starts,
            )
            out.index_copy_(0, rows, o.to(out.dtype))
        num_new, qstarts = plan.num_new, plan.query_starts
        attn_starts, window_lens = plan.field("attn_starts"), plan.field("window_lens")
        # Rows of equal (queries, window) shape attend in one batched call: one gather of their
        # windows through their table rows, one SDPA.
        shapes: Dict[tuple, List[int]] = {}
        for i in hp.multi:
            shapes.setdefault((num_new[i], window_lens[i] - attn_starts[i]), []).append(i)
        dev = query.device
        for (n, w), rows in shapes.items():
            if len(rows) == 1:
                i = rows[0]
                blocks, offs = self._slots(win.tables[i], attn_starts[i], window_lens[i])
                qs = qstarts[i]
                o = _causal_attention(
                    query[qs : qs + n].unsqueeze(0),
                    key_cache[blocks, offs].unsqueeze(0),
                    value_cache[blocks, offs].unsqueeze(0),
                    scale,
                )
                out[qs : qs + n] = o[0].to(out.dtype)
                continue
            sel = to_device(rows, dev, torch.long)
            pos = to_device([attn_starts[i] for i in rows], dev, torch.long).unsqueeze(1) + torch.arange(
                w, device=dev
            )
            blocks = torch.gather(win.tables.index_select(0, sel).long(), 1, pos // self.block_size)
            offs = pos % self.block_size
            qidx = (
                to_device([qstarts[i] for i in rows], dev, torch.long).unsqueeze(1)
                + torch.arange(n, device=dev)
            ).flatten()
            o = _causal_attention(
                query.index_select(0, qidx).view(len(rows), n, query.shape[1], query.shape[2]),
                key_cache[blocks, offs],
                value_cache[blocks, offs],
                scale,
            )
            out.index_copy_(0, qidx, o.reshape(-1, o.shape[2], o.shape[3]).to(out.dtype))

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
        sel = to_device(due, device, torch.long)
        bt = win.tables.index_select(0, sel).contiguous()
        # the due rows' columns of the planner's table, as host arrays (no Python per request)
        rows = plan.rows.numpy().reshape(len(_FIELDS), len(plan)).astype(np.int64)[:, np.asarray(due)]
        bases, ends = rows[_ROW["bases"]], rows[_ROW["seq_lens"]]
        live_a = rows[_ROW["window_lens"]] - rows[_ROW["evict_starts"]]
        evict_a = rows[_ROW["evict_to"]] - bases
        slots, serials = rows[_ROW["slots"]], np.asarray(plan.serials, dtype=np.int64)[np.asarray(due)]
        live, num_evict = live_a.tolist(), evict_a.tolist()
        sl = win.seq_lens.index_select(0, sel).contiguous()
        ls = win.evict_starts.index_select(0, sel).contiguous()
        # host mirrors of the due rows' windows (what sl / ls / ne hold), so no kernel reads them back
        sl_host = torch.from_numpy(rows[_ROW["window_lens"]].astype(np.int32))
        ls_host = torch.from_numpy(rows[_ROW["evict_starts"]].astype(np.int32))
        ne_host = torch.from_numpy(evict_a.astype(np.int32))
        ne = to_device(ne_host, device)
        kp = self._kept.get(layer)
        if kp is None:
            kp = self._kept[layer] = _KeptPositions()
        count, kept_end, evictions = kp.lookup(slots, serials)
        # The queries of the ring, oldest first ([due, ring rows, Hq, D]; earlier ones were folded).
        queries, nq, _ = self._ring_queries(win, layer, key_cache)
        nq_host = [int(c) for c in win.host.ev_counts.tolist()]
        # The statistics window is the interval L (earlier queries of the first eviction only enter
        # the cumulative statistics, folded as they left the ring), in the mode the scorer was
        # trained on (None: baselines).
        hp = win.host
        kernels.window_stats(
            queries,
            nq,
            key_cache,
            bt,
            sl,
            ls,
            stats,
            scale=scale,
            window=cfg.interval,
            mode=self.policy.stats_mode,
            folded=win.dev["ev_folded"],
            seq_lens_host=sl_host,
            live_starts_host=ls_host,
            num_queries_host=hp.ev_counts,
            folded_host=hp.ev_folded,
        )
        positions = self._window_positions(kp, slots, count, kept_end, bases, live_a, h, device)
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
            lengths=ends.tolist(),
            evictions=evictions.tolist(),
            requests=[self._rng_key(plan, i) for i in due],
            keys=[plan.keys[i] for i in due],
            num_protected=cfg.interval,
            scale=scale,
            block_size=self.block_size,
            seq_lens_host=sl_host,
            live_starts_host=ls_host,
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
        kernels.compact(
            key_cache, value_cache, bt, sl, ls, ne, survivors, stats,
            seq_lens_host=sl_host, live_starts_host=ls_host, num_evict_host=ne_host,
        )
        kept = positions.gather(2, survivors.long().clamp(min=0))
        left = live_a - evict_a
        kp.store(slots, serials, kept[:, :, : int(left.max())], left, ends, evictions + 1)

    @staticmethod
    def _window_positions(kp: "_KeptPositions", slots, count, kept_end, bases, live, h: int, device) -> torch.Tensor:
        """Original positions ``[due, H, max(live)]`` (int64, -1 past each row's ``live``) of the due
        requests' evictable windows, in batch: what each head kept at the request's last eviction
        (``count`` entries, -1 for none yet), then ``[max(kept_end, base), len)`` (fresh: ``[base,
        len)``)."""
        n_old = np.maximum(count, 0)
        fresh_from = np.where(count >= 0, np.maximum(kept_end, bases), bases)
        max_live = int(live.max())
        col = torch.arange(max_live, dtype=torch.int64, device=device).view(1, 1, -1)
        cols = to_device(np.stack([n_old, fresh_from, live]), device)
        n_old_t, fresh_t, live_t = (c.view(-1, 1, 1) for c in cols)
        fresh = torch.where(col < live_t, fresh_t + col - n_old_t, torch.full((), -1, dtype=torch.int64, device=device))
        out = fresh.expand(-1, h, -1).contiguous()
        k = min(int(n_old.max()), max_live)
        if k and kp.kept is not None:
            rows = to_device(np.where(count >= 0, slots, 0), device)  # fresh rows read none
            old = kp.kept.index_select(0, rows)[:, :, :k].long()
            out[:, :, :k] = torch.where(col[..., :k] < n_old_t, old, out[:, :, :k])
        return out

    def _ring_queries(self, win: _Windows, layer: int, key_cache: torch.Tensor):
        """The ring rows of the plan's due requests, oldest first: ``(queries [due, rows, Hq, D], counts
        int32 [due] on the device, Hq)`` (one gather)."""
        ring = self._rings[layer]
        hp = win.host
        flat = ring.view(-1, ring.shape[2], ring.shape[3])
        q = flat.index_select(0, win.dev["ev_ring"]).view(len(hp.due), hp.ev_max, ring.shape[2], ring.shape[3])
        return q.to(key_cache.dtype), win.dev["ev_counts"], ring.shape[2]

    def _rng_key(self, plan: StepPlan, row: int) -> int:
        """The request part of the victim RNG key of plan row ``row``: the ``rng_keys`` the engine gave
        for this forward, else the row's state serial (per process: plugins pass ``rng_keys``)."""
        if plan.rng_keys is not None:
            return int(plan.rng_keys[row])
        return int(plan.serials[row])

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
            w = tuple(to_device(t, device) for t in scorer_weights(ck, layer))  # queued, not waited for
            if tuple(w[0].shape[:1]) != (h,):
                raise ConfigError(f"scorer checkpoint has {w[0].shape[0]} KV heads per layer, the model {h}")
            self._weights[layer] = w
        return w

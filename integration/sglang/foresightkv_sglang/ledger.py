"""Which token slots of each request went back to SGLang's allocator, and through whom.

foresightkv returns the slots of the positions its evictions drop itself (before a request's live
window, after the protected prompt in protect mode); SGLang's release path (finish, abort, retract:
``release_kv_cache`` -> ``BasePrefixCache.free_kv_row``) later frees the rest of the row, the protected
prompt included. Each position must be freed exactly once, so both sides consult this ledger: the
release hook drops the positions foresightkv already freed, and foresightkv skips the positions the
release path already freed.

There is one ledger per ``ReqToTokenPool`` (``ledger_for``); requests are keyed by ``(row,
generation)`` packed into one integer (``ledger_key``; the same key foresightkv's engine state uses):
SGLang bumps a row's generation on every allocation (``ReqToTokenPool.alloc_rows``), so a reused row
never matches a stale entry."""

import threading
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch

Key = int
Range = Tuple[int, int]


@dataclass
class _Entry:
    """``taken`` are the ranges foresightkv took charge of (freed unless SGLang freed them first);
    ``released`` are the ranges SGLang's release path freed."""

    taken: List[Range] = field(default_factory=list)
    released: List[Range] = field(default_factory=list)


def subtract(span: Range, taken: Iterable[Range]) -> List[Range]:
    """The parts of half-open ``span`` outside every range of ``taken``, ascending."""
    parts = [span]
    for ts, te in sorted(taken):
        nxt = []
        for s, e in parts:
            if te <= s or ts >= e:
                nxt.append((s, e))
                continue
            if s < ts:
                nxt.append((s, ts))
            if te < e:
                nxt.append((te, e))
        parts = nxt
    return [(s, e) for s, e in parts if e > s]


def merge(ranges: Iterable[Range]) -> List[Range]:
    """Half-open ``ranges`` sorted, with overlapping or touching ones joined."""
    out: List[Range] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


class SlotLedger:
    """The ledger of one ``ReqToTokenPool`` (the scheduler and the model of a request share a process,
    hence the pool object)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: Dict[Key, _Entry] = {}

    def track(self, keys: Iterable[Key]) -> None:
        """Starts recording releases of ``keys`` (called with the requests of every extend batch: a
        request's first forward, and the first after a retraction, is one, before any eviction of it
        can be pending)."""
        with self._lock:
            for key in keys:
                self._entries.setdefault(key, _Entry())

    def taken(self, key: Key) -> List[Range]:
        """The position ranges foresightkv took charge of for ``key``, ascending (empty when unknown)."""
        with self._lock:
            e = self._entries.get(key)
            return [] if e is None else list(e.taken)

    def keys(self) -> List[Key]:
        """Keys with an entry."""
        with self._lock:
            return list(self._entries)

    def forget(self, key: Key) -> None:
        """Drops ``key`` (its row was given to another request)."""
        with self._lock:
            self._entries.pop(key, None)

    def clip_release(self, key: Key, ranges: List[Range]) -> List[Range]:
        """The part of a release of ``ranges`` SGLang must still free (positions foresightkv freed
        are dropped); records it so that foresightkv never frees it."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return list(ranges)
            out = [part for span in ranges for part in subtract(span, e.taken)]
            e.released.extend(out)
            return out

    def take(self, key: Key, start: int, end: int) -> List[Range]:
        """Takes charge of positions ``[start, end)`` of ``key`` after an eviction dropped them; returns
        the ranges foresightkv must free now (those neither it nor the release path freed before)."""
        with self._lock:
            e = self._entries.setdefault(key, _Entry())
            if end <= start:
                return []
            out = subtract((start, end), e.released + e.taken)
            e.taken = merge(e.taken + out)
            return out


_LEDGERS: "weakref.WeakKeyDictionary[object, SlotLedger]" = weakref.WeakKeyDictionary()
_LEDGERS_LOCK = threading.Lock()


def ledger_for(req_to_token_pool) -> SlotLedger:
    """The ledger of ``req_to_token_pool`` (created on first use, dropped with the pool)."""
    with _LEDGERS_LOCK:
        led = _LEDGERS.get(req_to_token_pool)
        if led is None:
            led = SlotLedger()
            _LEDGERS[req_to_token_pool] = led
        return led


#: Bits of a key that hold the row (the generation sits above them).
ROW_BITS = 32
#: The row bits of a key.
ROW_MASK = (1 << ROW_BITS) - 1


def ledger_key(req_to_token_pool, row: int) -> Key:
    """The key of the request now holding ``row`` of ``req_to_token_pool``: ``generation << 32 | row``
    (a non-negative integer below 2^63, what foresightkv's engine keys its state by)."""
    return pack_key(int(row), int(req_to_token_pool.req_generation[row]))


def host_generations(req_to_token_pool) -> np.ndarray:
    """The pool's row generations as a host int64 array (a view of SGLang's CPU tensor)."""
    return req_to_token_pool.req_generation.cpu().numpy()


def ledger_keys(req_to_token_pool, rows: np.ndarray) -> List[Key]:
    """``ledger_key`` of each row of ``rows`` (a host int64 array), in one pass over the batch;
    refuses rows or generations that do not fit a key, naming the first."""
    bad = (rows < 0) | (rows >= 1 << ROW_BITS)
    if bad.any():
        pack_key(int(rows[np.flatnonzero(bad)[0]]), 0)  # raises, naming it
    gens = host_generations(req_to_token_pool)[rows]
    bad = (gens < 0) | (gens >= 1 << 31)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        pack_key(int(rows[i]), int(gens[i]))  # raises, naming them
    return (gens << ROW_BITS | rows).tolist()


def pack_key(row: int, generation: int) -> Key:
    """``generation << 32 | row``; refuses values that do not fit (row below 2^32, generation below 2^31)."""
    if not (0 <= row < 1 << ROW_BITS and 0 <= generation < 1 << 31):
        raise ValueError(f"foresightkv: request row {row} / generation {generation} do not fit a 63-bit key")
    return generation << ROW_BITS | row


def key_row(key: Key) -> int:
    """The ``req_to_token`` row of ``key``."""
    return key & ROW_MASK


def key_generation(key: Key) -> int:
    """The row generation of ``key``."""
    return key >> ROW_BITS


def free_kv_row_hook(original, tree_cache, kv, ranges, *args, **kwargs):
    """AROUND hook of ``BasePrefixCache.free_kv_row``: frees only what foresightkv has not freed.

    Frees the ranges unchanged for requests foresightkv never evicted (no ledger entry, nothing taken)."""
    row = getattr(kv, "req_pool_idx", None)
    if row is None:
        return original(tree_cache, kv, ranges, *args, **kwargs)
    pool = tree_cache.req_to_token_pool
    clipped = ledger_for(pool).clip_release(ledger_key(pool, row), list(ranges))
    if not clipped:
        return None
    return original(tree_cache, kv, clipped, *args, **kwargs)


#: What a freed position of a ``req_to_token`` row holds: SGLang's padding slot, which its allocator
#: never hands out (free slots are 1..size), so no live row names a slot that is free or reused.
FREED_SLOT = 0


def free_slots(allocator, req_to_token: torch.Tensor, spans: Iterable[Tuple[int, List[Range]]]) -> int:
    """Gives the slots of every ``(row, ranges)`` of ``spans`` back to SGLang's token allocator in one
    ``free`` call (which joins a free group the scheduler may have open; one call per step, as the
    allocator concatenates its free list on each), then points those positions of their rows at
    ``FREED_SLOT`` (SGLang's page-invariant check flags a row naming a free slot); returns how many
    slots were freed."""
    parts = [(row, s, e) for row, ranges in spans for s, e in ranges if e > s]
    if not parts:
        return 0
    slots = torch.cat([req_to_token[row, s:e] for row, s, e in parts]).to(torch.int64)
    allocator.free(slots)
    for row, s, e in parts:
        req_to_token[row, s:e] = FREED_SLOT
    return int(slots.numel())


def freed_count(ranges: Iterable[Range], start: int, end: int) -> int:
    """How many positions of ``[start, end)`` the half-open ``ranges`` cover (they do not overlap)."""
    return sum(max(0, min(e, end) - max(s, start)) for s, e in ranges)


def uncached_sizes_hook(original, checker, *args, **kwargs):
    """AROUND hook of SGLang's ``SchedulerInvariantChecker._get_total_uncached_sizes``: the (full, swa)
    slots the running requests own, less the slots foresightkv already gave back for them.

    SGLang counts every position in ``[cache_protected_len, kv_allocated_len)`` of a request's row as
    held by it; foresightkv's evictions free part of that range while the request runs, so without
    this the busy-time memory check (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``) sees those
    slots twice (free and held) and reports a leak."""
    full, swa = original(checker, *args, **kwargs)
    pool = checker.req_to_token_pool
    led = _LEDGERS.get(pool)
    if led is None:
        return full, swa
    for req in checker._requests_owning_rows():
        kv = req.kv
        if kv.req_pool_idx is None:
            continue
        taken = led.taken(ledger_key(pool, kv.req_pool_idx))
        full -= freed_count(taken, kv.cache_protected_len or 0, kv.kv_allocated_len)
    return full, swa

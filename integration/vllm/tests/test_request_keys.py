"""``RequestKeys`` (each vLLM request's engine key, learned from the KV blocks it owns) over random
step sequences of a block pool that hands freed blocks to other requests: the batched, array-backed
table returns the same keys, files the same anchors and releases the same states as ``DictKeys``
below, the per-request rules it replaced written out one row at a time (resolve: a row with nothing
computed is a new key, else the key anchored in the block of its last computed token, with that
length; claim: a request anchored in a block another request's new tokens went to is gone)."""

import random
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from foresightkv.engine import EngineConfig, EvictionEngine
from foresightkv.errors import EvictionStateError

BS = 4


class RecordingEngine(EvictionEngine):
    """A real engine that also records which keys were released, in order."""

    def __init__(self) -> None:
        super().__init__(EngineConfig(budget=32, interval=8, policy="h2o"), block_size=BS)
        self.released: List[int] = []

    def release(self, key: int) -> None:
        self.released.append(key)
        super().release(key)


class DictKeys:
    """The rules one row at a time over dicts (block -> (key, length), key -> block)."""

    def __init__(self, engine: RecordingEngine) -> None:
        self.engine = engine
        self.anchors: Dict[int, Tuple[int, int]] = {}
        self.block_of: Dict[int, int] = {}
        self.next = 0

    def resolve(self, computed: int, prev_block: int) -> int:
        if computed == 0:
            self.next += 1
            return self.next
        entry = self.anchors.get(prev_block)
        if entry is None or entry[1] != computed:
            raise EvictionStateError(f"no state at block {prev_block}")
        return entry[0]

    def claim(self, key: int, length: int, new_blocks, last_block: int) -> None:
        for b in new_blocks:
            other = self.anchors.get(b)
            if other is not None and other[0] != key:
                self.forget(other[0])
        old = self.block_of.get(key)
        if old is not None and old != last_block:
            self.anchors.pop(old, None)
        self.anchors[last_block] = (key, length)
        self.block_of[key] = last_block

    def forget(self, key: int) -> None:
        block = self.block_of.pop(key, None)
        if block is not None and self.anchors.get(block, (None,))[0] == key:
            del self.anchors[block]
        self.engine.release(key)


class Pool:
    """A block pool and its requests as vLLM's KV manager keeps them: blocks come from a free list
    (freed blocks are reused, most recently freed first), a finished or preempted request's blocks go
    back without the backend being told."""

    def __init__(self, rng: random.Random, blocks: int) -> None:
        self.rng = rng
        self.free = list(range(1, blocks))
        self.reqs: Dict[int, Dict] = {}  # id -> {"blocks": [...], "len": computed tokens}
        self.ids = 0

    def step(self) -> Optional[List[Tuple[int, int, List[int]]]]:
        """One scheduler step: per scheduled request (computed, prev block, slots of its new tokens)."""
        rng = self.rng
        for rid in [r for r in self.reqs if rng.random() < 0.15]:  # finish / abort / preempt
            self.free.extend(self.reqs.pop(rid)["blocks"])
        rng.shuffle(self.free)
        while len(self.reqs) < 6 and rng.random() < 0.7:
            self.ids += 1
            self.reqs[self.ids] = {"blocks": [], "len": 0}
        rows = []
        for r in list(self.reqs.values()):
            new = rng.randint(1, 9) if r["len"] == 0 else rng.choice([1, 1, 1, 3])
            need = -(-(r["len"] + new) // BS) - len(r["blocks"])
            if need > len(self.free):
                continue  # not scheduled this step
            r["blocks"] += [self.free.pop() for _ in range(need)]
            c = r["len"]
            prev = r["blocks"][max(c - 1, 0) // BS]
            slots = [r["blocks"][p // BS] * BS + p % BS for p in range(c, c + new)]
            rows.append((c, prev, slots))
            r["len"] = c + new
        return rows


@pytest.mark.parametrize("seed", range(6))
def test_batched_keys_follow_the_per_row_rules_over_random_steps(seed):
    from foresightkv_vllm.backend import RequestKeys

    rng = random.Random(seed)
    pool = Pool(rng, blocks=rng.choice([12, 24, 60]))
    ours_engine, theirs_engine = RecordingEngine(), RecordingEngine()
    ours, theirs = RequestKeys(ours_engine, BS), DictKeys(theirs_engine)
    released = 0
    for _ in range(150):
        rows = pool.step()
        if not rows:
            continue
        computed = np.array([c for c, _, _ in rows], dtype=np.int64)
        prev = np.array([p for _, p, _ in rows], dtype=np.int64)
        keys = ours.resolve(computed, prev)
        expect = [theirs.resolve(c, p) for c, p, _ in rows]
        assert keys.tolist() == expect
        new_r = np.array([len(s) for _, _, s in rows], dtype=np.int64)
        slots = np.array([x for _, _, s in rows for x in s], dtype=np.int64)
        last = np.array([s[-1] // BS for _, _, s in rows], dtype=np.int64)
        ours.claim(keys, computed + new_r, prev, computed == 0, slots // BS, np.repeat(keys, new_r), last)
        for key, (c, _, s) in zip(expect, rows):
            theirs.claim(key, c + len(s), {x // BS for x in s}, s[-1] // BS)
        # the same states released (in another order within a step: releases are independent)
        assert sorted(ours_engine.released) == sorted(theirs_engine.released)
        assert len(ours) == len(theirs.block_of)
        for block in range(64):
            entry = theirs.anchors.get(block)
            assert ours.key_at(block) == (None if entry is None else entry[0]), block
        for key, block in theirs.block_of.items():
            assert ours.block_of(key) == block
        released = len(theirs_engine.released)
    assert released > 0  # blocks were handed from gone requests to others


def test_a_row_written_without_the_backend_is_refused_and_changes_nothing():
    from foresightkv_vllm.backend import RequestKeys

    engine = RecordingEngine()
    keys = RequestKeys(engine, BS)
    first = keys.resolve(np.array([0], dtype=np.int64), np.array([3], dtype=np.int64))
    keys.claim(first, np.array([5]), np.array([3]), np.array([True]), np.array([3, 4]), np.array([1, 1]), np.array([4]))
    assert keys.key_at(4) == int(first[0])
    # 8 computed tokens whose last one is in block 4, where a request of length 5 is anchored
    with pytest.raises(EvictionStateError, match=r"8 computed tokens whose last token is in block 4 \(known there: \(1, 5\)\)"):
        keys.resolve(np.array([0, 8], dtype=np.int64), np.array([7, 4], dtype=np.int64))
    with pytest.raises(EvictionStateError, match=r"in block 9 \(known there: None\)"):
        keys.resolve(np.array([4], dtype=np.int64), np.array([9], dtype=np.int64))
    # the refused calls allotted no key and filed nothing
    assert keys.resolve(np.array([0], dtype=np.int64), np.array([7], dtype=np.int64)).tolist() == [2]
    assert len(keys) == 1 and engine.released == []


@pytest.mark.parametrize("seed", range(8))
def test_a_finished_request_releases_its_own_state_and_no_other(seed):
    """``release_anchored`` as ``lifecycle.release_anchored`` calls it: the finished request's table
    as the runner holds it (every block ever appended, although a sliding window, W = 3 blocks here,
    gave its old blocks back to the pool, where other requests may now be anchored) and its computed
    count at the start of its last step, after the scheduler freed its blocks and handed some to
    this step's requests. Exactly the finished request's key is released, never another's."""
    from foresightkv_vllm.backend import RequestKeys

    rng = random.Random(seed)
    window = 3 * BS
    free = list(range(1, rng.choice([14, 20, 40])))
    reqs: Dict[int, Dict] = {}  # id -> table (block per position block), held indices, length, last start, key
    engine = RecordingEngine()
    keys = RequestKeys(engine, BS)
    ids = finished_total = 0
    for _ in range(250):
        done = [rid for rid in reqs if reqs[rid]["key"] is not None and rng.random() < 0.12]
        gone = []
        for rid in done:  # the scheduler frees what the request still holds
            r = reqs.pop(rid)
            free.extend(r["table"][i] for i in sorted(r["held"]))
            gone.append(r)
        rng.shuffle(free)
        while len(reqs) < 5 and rng.random() < 0.6:
            ids += 1
            reqs[ids] = {"table": [], "held": set(), "len": 0, "start": 0, "key": None}
        rows = []
        for rid, r in reqs.items():
            new = rng.randint(1, 9) if r["len"] == 0 else rng.choice([1, 1, 2])
            need = -(-(r["len"] + new) // BS) - len(r["table"])
            if need > len(free):
                continue
            r["held"].update(range(len(r["table"]), len(r["table"]) + need))
            r["table"] += [free.pop() for _ in range(need)]
            rows.append((rid, r["len"], new))
        # the runner's _update_states, before this step's build: release the finished requests
        for r in gone:
            before = len(engine.released)
            assert keys.release_anchored(np.array(r["table"], dtype=np.int64), r["start"]) == 1
            assert engine.released[before:] == [r["key"]]
            finished_total += 1
        if rows:
            computed = np.array([c for _, c, _ in rows], dtype=np.int64)
            new_r = np.array([n for _, _, n in rows], dtype=np.int64)
            prev = np.array([reqs[rid]["table"][max(c - 1, 0) // BS] for rid, c, _ in rows], dtype=np.int64)
            got_keys = keys.resolve(computed, prev)
            slots = np.array(
                [reqs[rid]["table"][p // BS] * BS + p % BS for rid, c, n in rows for p in range(c, c + n)],
                dtype=np.int64,
            )
            last = np.array([reqs[rid]["table"][(c + n - 1) // BS] for rid, c, n in rows], dtype=np.int64)
            before = len(engine.released)
            keys.claim(got_keys, computed + new_r, prev, computed == 0, slots // BS, np.repeat(got_keys, new_r), last)
            assert engine.released[before:] == []  # finished requests were released already
            for (rid, c, n), key in zip(rows, got_keys.tolist()):
                r = reqs[rid]
                r["key"], r["start"], r["len"] = key, c, c + n
        for r in reqs.values():  # the sliding window frees blocks before the live window
            for i in range(max(r["len"] - window, 0) // BS):
                if i in r["held"]:
                    r["held"].discard(i)
                    free.append(r["table"][i])
        live = [r["key"] for r in reqs.values() if r["key"] is not None]
        assert all(keys.block_of(k) is not None for k in live) and not set(live) & set(engine.released)
    assert finished_total > 10

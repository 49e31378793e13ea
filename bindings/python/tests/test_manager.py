"""The configuration objects and KvCacheManager from Python: slots, live windows, the eviction
schedule, compaction, prefix sharing, copy-on-write, preemption, block tables as arrays, and the
invariants after random operation sequences."""

import random

import numpy as np
import pytest
import torch

import foresightkv as fkv
from conftest import check_consistent


def make(block_size=4, num_blocks=64, budget=None, interval=None, protect=False, caching=False):
    ev = None if budget is None else fkv.EvictionConfig(budget, interval, protect_prompt=protect)
    return fkv.KvCacheManager(fkv.CacheConfig(block_size, num_blocks, enable_prefix_caching=caching, eviction=ev))


def test_config_fields_repr_and_json_round_trip():
    cfg = fkv.CacheConfig(16, 128, enable_prefix_caching=True, eviction=fkv.EvictionConfig(64, 32))
    assert (cfg.block_size, cfg.num_blocks, cfg.enable_prefix_caching) == (16, 128, True)
    assert cfg.eviction == fkv.EvictionConfig(64, 32, protect_prompt=False)
    assert "budget=64" in repr(cfg) and "interval=32" in repr(cfg)
    again = fkv.CacheConfig.from_json(cfg.to_json())
    assert again == cfg
    assert fkv.CacheConfig(16, 8).eviction is None


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(block_size=0, num_blocks=8), "block_size"),
        (dict(block_size=16, num_blocks=0), "num_blocks"),
        (dict(block_size=16, num_blocks=8, eviction=fkv.EvictionConfig(60, 30)), "60"),
        (dict(block_size=16, num_blocks=8, eviction=fkv.EvictionConfig(64, 24)), "24"),
        (dict(block_size=16, num_blocks=2**31, eviction=None), "2147483648"),
    ],
)
def test_config_rules_raise_config_error_naming_the_value(kwargs, needle):
    with pytest.raises(fkv.ConfigError, match=needle):
        fkv.CacheConfig(**kwargs)


def test_config_error_is_a_value_error_and_an_fkv_error():
    with pytest.raises(ValueError):
        fkv.EvictionConfig(16, 32)
    with pytest.raises(fkv.Error):
        fkv.CacheConfig.from_json("{not json")


def test_slots_follow_blocks_and_block_tables_are_int32_arrays():
    m = make(block_size=4, num_blocks=16)
    slots = m.add_sequence(7, [1, 2, 3, 4, 5, 6])
    assert len(slots) == 6
    blocks = sorted({s // 4 for s in slots})
    assert len(blocks) == 2
    assert [s % 4 for s in slots] == [0, 1, 2, 3, 0, 1]
    more = m.append(7, [9, 9, 9])
    assert [s % 4 for s in more] == [2, 3, 0]
    assert m.seq_len(7) == 9 and m.blocks_held(7) == 3 and m.live_start(7) == 0 and m.live_tokens(7) == 9
    m.add_sequence(8, np.array([5], dtype=np.int64))
    bt = m.block_tables([7, 8])
    assert (bt.num_seqs, bt.width) == (2, 3)
    assert bt.table.typecode == "i" and len(bt.table) == 6
    table, starts, lens, prot = bt.as_numpy()
    assert table.dtype == np.int32 and table.shape == (2, 3)
    assert list(lens) == [9, 1] and list(starts) == [0, 0] and list(prot) == [0, 0]
    assert table[1, 1] == -1 and table[1, 2] == -1
    assert [int(b) for b in table[0]] == [s // 4 for s in (slots[0], slots[4], more[2])]
    t_table, t_starts, t_lens, _ = bt.as_torch()
    assert t_table.dtype == torch.int32 and t_table.tolist() == table.tolist()
    assert torch.equal(t_lens, torch.tensor([9, 1], dtype=torch.int32))
    via_buffer = np.frombuffer(bt.table, dtype=np.int32).reshape(2, 3)
    assert (via_buffer == table).all()
    check_consistent(m)


def test_tokens_accept_lists_arrays_and_tensors():
    m = make()
    m.add_sequence(1, [1, 2, 3])
    m.add_sequence(2, np.array([1, 2, 3], dtype=np.int32))
    m.add_sequence(3, torch.tensor([1, 2, 3]))
    m.add_sequence(4, range(3))
    m.append(3, torch.tensor([4, 5], dtype=torch.int32)[::1])
    assert [m.seq_len(i) for i in (1, 2, 3, 4)] == [3, 3, 5, 3]
    assert m.preempt(3) == [1, 2, 3, 4, 5]


def test_eviction_schedule_compact_and_release():
    m = make(block_size=4, num_blocks=32, budget=8, interval=4)
    m.add_sequence(1, list(range(6)))
    assert m.eviction_due(1) is None
    m.append(1, list(range(6)))
    plan = m.eviction_due(1)
    assert plan == m.eviction_due(1)
    assert (plan.len, plan.live_start_before, plan.live_start_after, plan.evicted_per_head, plan.released_blocks) == (12, 0, 4, 4, 1)
    with pytest.raises(fkv.EvictionStateError, match="compact"):
        m.append(1, [1])
    free = m.num_free_blocks
    released = m.compact(1)
    assert len(released) == 1 and m.num_free_blocks == free + 1
    assert m.live_start(1) == 4 and m.live_tokens(1) == 8
    with pytest.raises(fkv.EvictionStateError):
        m.compact(1)
    bt = m.block_tables([1])
    assert list(bt.live_starts) == [4] and bt.table[0] == -1
    check_consistent(m)


def test_protect_mode_keeps_the_prompt():
    m = make(block_size=4, num_blocks=32, budget=8, interval=4, protect=True)
    m.add_sequence(1, list(range(5)))
    assert m.protected_len(1) == 8
    m.append(1, list(range(15)))
    assert m.eviction_due(1) is not None
    m.compact(1)
    assert m.live_start(1) >= 8 and m.live_tokens(1) == 8 + (20 - m.live_start(1))
    check_consistent(m)


def test_prefix_sharing_fork_and_copy_on_write():
    m = make(block_size=4, num_blocks=16, caching=True)
    first = m.add_sequence(1, list(range(9)))
    second = m.add_sequence(2, list(range(9)))
    assert second[:8] == [-1] * 8 and second[8] >= 0
    assert first[8] != second[8]
    m.fork(1, 3)
    assert m.blocks_held(3) == m.blocks_held(1)
    m.append(3, [100])
    copies = m.take_copies()
    assert len(copies) == 1 and copies[0][0] == first[8] // 4
    assert m.take_copies() == []
    check_consistent(m)


def test_out_of_blocks_changes_nothing_and_carries_counts():
    m = make(block_size=4, num_blocks=4)
    m.add_sequence(1, list(range(12)))
    before = m.snapshot()
    with pytest.raises(fkv.OutOfBlocksError) as info:
        m.add_sequence(2, list(range(8)))
    assert info.value.needed == 2 and info.value.free == 1
    assert m.snapshot() == before
    m.free(1)
    assert m.num_free_blocks == 4
    check_consistent(m)


def test_preempt_and_resume():
    m = make(block_size=4, num_blocks=8)
    m.add_sequence(5, [1, 2, 3])
    m.append(5, [4, 5])
    tokens = m.preempt(5)
    assert tokens == [1, 2, 3, 4, 5] and m.num_sequences == 0
    with pytest.raises(fkv.SequenceError):
        m.seq_len(5)
    m.add_sequence(5, tokens)
    assert m.seq_len(5) == 5
    check_consistent(m)


@pytest.mark.parametrize("seed", range(12))
def test_random_operation_sequences_keep_the_invariants(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    budget = bs * rng.randint(2, 4)
    interval = bs * rng.randint(1, budget // bs)
    m = make(block_size=bs, num_blocks=rng.randint(8, 40), budget=budget, interval=interval,
             protect=rng.random() < 0.3, caching=rng.random() < 0.5)
    live = set()
    next_id = 0
    for _ in range(150):
        op = rng.random()
        try:
            if op < 0.25 or not live:
                prompt = [rng.randrange(3) for _ in range(rng.randint(1, 3 * bs))]
                m.add_sequence(next_id, prompt)
                live.add(next_id)
                next_id += 1
            elif op < 0.6:
                sid = rng.choice(sorted(live))
                if m.eviction_due(sid) is not None:
                    m.compact(sid)
                else:
                    m.append(sid, [rng.randrange(3) for _ in range(rng.randint(1, 2))])
            elif op < 0.7:
                m.fork(rng.choice(sorted(live)), next_id)
                live.add(next_id)
                next_id += 1
            elif op < 0.8:
                m.take_copies()
            elif op < 0.9:
                sid = rng.choice(sorted(live))
                m.free(sid)
                live.discard(sid)
            else:
                sid = rng.choice(sorted(live))
                tokens = m.preempt(sid)
                live.discard(sid)
                assert len(tokens) >= 1
        except fkv.OutOfBlocksError:
            pass
        check_consistent(m)
    for sid in sorted(live):
        m.free(sid)
    m.take_copies()
    assert m.num_free_blocks == m.num_blocks
    check_consistent(m)


@pytest.mark.parametrize("seed", range(6))
def test_apply_step_equals_one_call_per_operation(seed):
    """A random operation sequence cut into steps through ``apply_step`` leaves the same manager state
    and returns the same slots, released blocks and preempted tokens as one call per operation."""
    rng = random.Random(seed)
    one, batched = (make(block_size=4, num_blocks=96, budget=8, interval=4) for _ in range(2))
    codes = {name: i for i, name in enumerate(fkv.KvCacheManager.STEP_OPS)}
    live, nxt = {}, 0
    for _ in range(40):
        step, want_slots, want_released, want_counts, want_pre = [], [], [], [], []
        touched = set()
        for _ in range(rng.randint(1, 6)):
            choice = rng.random()
            if choice < 0.25 or not live:
                toks = [rng.randrange(50) for _ in range(rng.randint(1, 10))]
                if one.num_free_blocks < 8:
                    continue
                step.append(("add", nxt, toks))
                want_slots += one.add_sequence(nxt, toks)
                live[nxt], nxt = len(toks), nxt + 1
                touched.add(nxt - 1)
                continue
            seq = rng.choice(sorted(live))
            if seq in touched:
                continue
            touched.add(seq)
            if one.eviction_due(seq) is not None:
                step.append(("compact", seq, []))
                r = one.compact(seq)
                want_released += r
                want_counts.append(len(r))
            elif choice < 0.85 and one.num_free_blocks > 2:
                toks = [rng.randrange(50) for _ in range(rng.randint(1, 3))]
                step.append(("append", seq, toks))
                want_slots += one.append(seq, toks)
            elif choice < 0.92:
                step.append(("free", seq, []))
                one.free(seq)
                live.pop(seq)
            else:
                step.append(("preempt", seq, []))
                want_pre += one.preempt(seq)
                live.pop(seq)
        slots, released, counts, pre, pre_counts = batched.apply_step(
            [codes[k] for k, _, _ in step],
            [s for _, s, _ in step],
            [len(t) for _, _, t in step],
            [t for _, _, ts in step for t in ts],
        )
        assert list(slots) == want_slots
        assert list(released) == want_released and list(counts) == want_counts
        assert list(pre) == want_pre and sum(pre_counts) == len(want_pre)
        assert batched.num_free_blocks == one.num_free_blocks
    for s in live:
        assert batched.live_start(s) == one.live_start(s) and batched.seq_len(s) == one.seq_len(s)
    check_consistent(batched)


def test_apply_step_refuses_bad_columns():
    m = make()
    with pytest.raises(fkv.ShapeError, match="counts"):
        m.apply_step([0], [1], [3], [1, 2])
    with pytest.raises(fkv.InvalidArgumentError, match="operation code"):
        m.apply_step([9], [1], [0], [])
    with pytest.raises(fkv.ShapeError, match="tokens has"):
        m.apply_step([0], [1], [1], [1, 2])
    with pytest.raises(fkv.SequenceError):
        m.apply_step([0, 1], [1, 2], [2, 1], [5, 6, 7])
    assert m.seq_len(1) == 2  # the add before the refused append stays applied


def test_window_planner_buffers_and_errors():
    """``WindowPlanner.plan``: one call per forward, flat buffers; a decode after a long prompt's
    compression commits it one step late; refused rows change nothing and name the request."""
    p = fkv.WindowPlanner(8, 4, 4)
    fields = fkv.WindowPlanner.FIELDS
    rows, serials, released, dropped, n = p.plan([5, 6], [14, 3], [14, 3], [True, True], [True, True])
    t = torch.frombuffer(rows, dtype=torch.int32).view(len(fields), 2)
    row = dict(zip(fields, t.tolist()))
    assert row["evict_to"] == [4, -1] and row["query_starts"] == [0, 14] and n == 17
    assert list(serials) == [0, 1] and len(released) == 0 and len(dropped) == 0
    assert p.state(5) == (0, 14, 0, 4, 0, 0) and p.state(99) is None
    with pytest.raises(fkv.ShapeError, match="request 6: 4 new tokens"):
        p.plan([5, 6], [15, 3], [1, 4], [False, False], [False, False])
    assert p.state(5) == (0, 14, 0, 4, 0, 0)
    with pytest.raises(fkv.ShapeError, match="entries"):
        p.plan([5], [15, 2], [1], [False], [False])
    with pytest.raises(fkv.InvalidArgumentError, match=r"keys\[0\] = -1"):
        p.plan([-1], [1], [1], [False], [False])
    rows, serials, released, dropped, _ = p.plan(torch.tensor([5]), [15], [1], [False], [0])
    assert list(released) == [5, 0, 4, 0, 0]
    assert dict(zip(fields, torch.frombuffer(rows, dtype=torch.int32).tolist()))["live_starts"] == 4
    assert sorted(p.keys()) == [5, 6] and len(p) == 2
    assert p.release(6) == 1 and p.release(6) is None
    with pytest.raises(fkv.ConfigError):
        fkv.WindowPlanner(6, 4, 4)

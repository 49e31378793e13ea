"""The manager used from several Python threads at once, and the GIL released inside kernel calls."""

import random
import threading
import time

import torch

import foresightkv as fkv
from conftest import check_consistent


def test_threads_share_one_manager_and_keep_it_consistent():
    m = fkv.KvCacheManager(fkv.CacheConfig(4, 96, enable_prefix_caching=True, eviction=fkv.EvictionConfig(8, 4)))
    errors = []
    done = threading.Event()

    def worker(tid):
        rng = random.Random(tid)
        try:
            for step in range(60):
                sid = tid * 1000 + step
                try:
                    m.add_sequence(sid, [rng.randrange(4) for _ in range(rng.randint(1, 10))])
                except fkv.OutOfBlocksError:
                    continue
                for _ in range(rng.randint(0, 12)):
                    try:
                        if m.eviction_due(sid) is not None:
                            m.compact(sid)
                        else:
                            m.append(sid, [rng.randrange(4)])
                    except fkv.OutOfBlocksError:
                        break
                if rng.random() < 0.3:
                    try:
                        m.fork(sid, sid + 500)
                        m.free(sid + 500)
                    except fkv.OutOfBlocksError:
                        pass
                m.take_copies()
                assert m.live_start(sid) <= m.seq_len(sid)
                m.block_tables([sid])
                (m.preempt if rng.random() < 0.5 else m.free)(sid)
        except Exception as e:  # surfaced below with the thread id
            errors.append((tid, repr(e)))

    def observer():
        while not done.is_set():
            snap = m.snapshot()
            assert len(snap["refcounts"]) == 96
            assert 0 <= m.num_free_blocks <= 96

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    obs = threading.Thread(target=observer)
    obs.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    obs.join()
    assert errors == []
    m.take_copies()
    check_consistent(m)
    assert m.num_sequences == 0 and m.num_free_blocks == m.num_blocks


def test_duplicate_adds_from_many_threads_register_exactly_once():
    m = fkv.KvCacheManager(fkv.CacheConfig(4, 64))
    wins, losses = [], []
    barrier = threading.Barrier(8)

    def racer():
        barrier.wait()
        try:
            m.add_sequence(42, [1, 2, 3])
            wins.append(1)
        except fkv.SequenceError:
            losses.append(1)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(wins), len(losses)) == (1, 7)
    check_consistent(m)


def test_kernel_calls_release_the_gil():
    """While one thread runs a long decode, a pure-Python loop in another keeps running."""
    gen = torch.Generator().manual_seed(0)
    live, hq, hkv, d, bs = 2048, 16, 4, 64, 16
    for seqs in (4, 16, 64, 256):
        nb = seqs * live // bs
        kc = torch.randn(nb, bs, hkv, d, generator=gen)
        vc = torch.randn(nb, bs, hkv, d, generator=gen)
        bt = torch.arange(nb, dtype=torch.int32).reshape(seqs, live // bs)
        sl = torch.full((seqs,), live, dtype=torch.int32)
        ls = torch.zeros(seqs, dtype=torch.int32)
        q = torch.randn(seqs, hq, d, generator=gen)
        t0 = time.perf_counter()
        fkv.paged_attention_decode(q, kc, vc, bt, sl, ls)
        single = time.perf_counter() - t0
        if single > 0.1:
            break
    finished = threading.Event()
    ticks = []

    def run():
        fkv.paged_attention_decode(q, kc, vc, bt, sl, ls)
        finished.set()

    worker = threading.Thread(target=run)
    worker.start()
    start = time.perf_counter()
    while not finished.is_set():
        ticks.append(time.perf_counter() - start)
    worker.join()
    # With the GIL held for the whole call this loop would be frozen for its duration: it would
    # record only a couple of ticks, far apart. Released, it ticks throughout.
    assert single > 0.05, f"the call is too short ({single:.4f} s) to tell"
    assert len(ticks) > 1000, f"only {len(ticks)} ticks during a {single:.3f} s call"
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.8 * single, f"the loop froze for {max(gaps):.3f} s of a {single:.3f} s call"

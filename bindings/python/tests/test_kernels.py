"""The kernels on CPU tensors (and numpy arrays) against naive PyTorch references, in place on
strided views, and the whole eviction step driven by the manager."""

import math

import numpy as np
import pytest
import torch

import foresightkv as fkv
from conftest import check_consistent, ref_decode, ref_scorer, ref_select, ref_window_stats
from kernel_args import DLPackOnly

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def windows(lens, starts, bs, num_blocks, gen):
    """Random disjoint block tables covering each sequence, as int32 tensors."""
    width = max(-(-n // bs) for n in lens)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    for s, n in enumerate(lens):
        for b in range(-(-n // bs)):
            table[s, b] = perm.pop()
    return table, torch.tensor(lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_writes_the_named_slots(dtype):
    gen = torch.Generator().manual_seed(1)
    t, h, d, nb, bs = 7, 2, 8, 5, 4
    key = torch.randn(t, h, d, generator=gen).to(dtype)
    value = torch.randn(t, h, d, generator=gen).to(dtype)
    kc = torch.zeros(nb, bs, h, d, dtype=dtype)
    vc = torch.zeros(nb, bs, h, d, dtype=dtype)
    slots = torch.tensor([3, 0, -1, 19, 8, 9, 4], dtype=torch.int64)
    fkv.reshape_and_cache(key, value, kc, vc, slots)
    expect_k = torch.zeros_like(kc)
    expect_v = torch.zeros_like(vc)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expect_k[s // bs, s % bs] = key[i]
            expect_v[s // bs, s % bs] = value[i]
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)


def test_reshape_and_cache_into_a_head_major_cache_view_in_place():
    gen = torch.Generator().manual_seed(2)
    t, h, d, nb, bs = 5, 3, 4, 4, 2
    head_major = torch.zeros(nb, h, bs, d)
    vhm = torch.zeros(nb, h, bs, d)
    key = torch.randn(t, h, d, generator=gen)
    value = torch.randn(2 * t, h, d, generator=gen)[::2]
    slots = torch.tensor([0, 7, 2, 5, 1])
    fkv.reshape_and_cache(key, value, head_major.permute(0, 2, 1, 3), vhm.permute(0, 2, 1, 3), slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(head_major[s // bs, :, s % bs], key[i])
        assert torch.equal(vhm[s // bs, :, s % bs], value[i])


def test_reshape_and_cache_on_numpy_arrays():
    rng = np.random.default_rng(3)
    key = rng.standard_normal((3, 1, 4), dtype=np.float32)
    value = rng.standard_normal((3, 1, 4), dtype=np.float32)
    kc = np.zeros((2, 2, 1, 4), dtype=np.float32)
    vc = np.zeros((2, 2, 1, 4), dtype=np.float32)
    fkv.reshape_and_cache(key, value, kc, vc, np.array([3, 0, 1], dtype=np.int64))
    assert (kc[1, 1, 0] == key[0, 0]).all() and (vc[0, 1, 0] == value[2, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
def test_paged_attention_decode_matches_naive_attention(dtype, hq, hkv):
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    d, bs, nb = 16, 4, 24
    lens, starts = [9, 1, 16, 12], [4, 0, 8, 12]
    kc = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    bt, sl, ls = windows(lens, starts, bs, nb, gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    out = fkv.paged_attention_decode(q, kc, vc, bt, sl, ls)
    assert out.dtype == dtype and out.shape == q.shape
    expect = ref_decode(q, kc, vc, bt, sl, ls)
    assert torch.allclose(out.double(), expect, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.count_nonzero(out[3]) == 0, "an empty live window gives zeros"


def test_paged_attention_decode_reads_strided_queries_and_custom_scale():
    gen = torch.Generator().manual_seed(5)
    d, bs, nb, hq, hkv = 8, 2, 10, 2, 1
    kc = torch.randn(nb, bs, hkv, d, generator=gen)
    vc = torch.randn(nb, bs, hkv, d, generator=gen)
    bt, sl, ls = windows([5, 6], [0, 2], bs, nb, gen)
    q_big = torch.randn(hq, 2, d, generator=gen)
    q = q_big.transpose(0, 1)
    out = torch.empty(2, hq, d)
    got = fkv.paged_attention_decode(q, kc, vc, bt, sl, ls, scale=0.3, out=out)
    assert got is out
    assert torch.allclose(out.double(), ref_decode(q, kc, vc, bt, sl, ls, scale=0.3), atol=1e-5)


def test_paged_attention_decode_on_numpy():
    rng = np.random.default_rng(6)
    kc = rng.standard_normal((4, 2, 1, 4), dtype=np.float32)
    vc = rng.standard_normal((4, 2, 1, 4), dtype=np.float32)
    q = rng.standard_normal((1, 2, 4), dtype=np.float32)
    bt = np.array([[2, 0]], dtype=np.int32)
    out = fkv.paged_attention_decode(q, kc, vc, bt, np.array([3], np.int32), np.array([0], np.int32))
    assert isinstance(out, np.ndarray)
    expect = ref_decode(*(torch.from_numpy(x) for x in (q, kc, vc, bt)), [3], [0])
    assert np.allclose(out, expect.numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,mode", [(None, None), (4, "paper"), (4, "official"), (2, "official")])
def test_window_stats_match_the_paper_definitions(dtype, window, mode):
    gen = torch.Generator().manual_seed(7)
    d, bs, nb, hq, hkv = 8, 4, 20, 4, 2
    lens, starts = [14, 9, 6], [4, 0, 4]
    nq = torch.tensor([10, 3, 0], dtype=torch.int32)
    kc = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    bt, sl, ls = windows(lens, starts, bs, nb, gen)
    queries = torch.randn(3, 10, hq, d, generator=gen).to(dtype)
    stats = torch.rand(nb, bs, hkv, hq // hkv, 8, generator=gen)
    before = stats.clone()
    fkv.window_stats(queries, nq, kc, bt, sl, ls, stats, window=window, mode=mode)
    expect = ref_window_stats(queries, nq, kc, bt, sl, ls, before, window=window, mode=mode or "paper")
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert torch.allclose(stats.double(), expect, atol=tol, rtol=1e-4)
    assert not torch.equal(stats, before)


def test_window_stats_rejects_an_unknown_mode():
    gen = torch.Generator().manual_seed(9)
    kc = torch.randn(4, 4, 1, 8, generator=gen)
    bt, sl, ls = windows([6], [0], 4, 4, gen)
    q = torch.randn(1, 2, 2, 8, generator=gen)
    stats = torch.zeros(4, 4, 1, 2, 8)
    with pytest.raises(fkv.InvalidArgumentError, match="daily"):
        fkv.window_stats(q, torch.tensor([2], dtype=torch.int32), kc, bt, sl, ls, stats, mode="daily")


def test_scorer_mlp_matches_the_torch_mlp():
    gen = torch.Generator().manual_seed(8)
    d, bs, nb, hkv, g = 8, 2, 12, 2, 2
    lens, starts = [7, 4], [2, 0]
    kc = torch.randn(nb, bs, hkv, d, generator=gen)
    vc = torch.randn(nb, bs, hkv, d, generator=gen)
    stats = torch.rand(nb, bs, hkv, g, 8, generator=gen)
    bt, sl, ls = windows(lens, starts, bs, nb, gen)
    in_dim = 2 * d + 8 * g
    w1 = torch.randn(hkv, fkv.SCORER_HIDDEN, in_dim, generator=gen) * 0.3
    b1 = torch.randn(hkv, 16, generator=gen)
    w2 = torch.randn(hkv, 16, generator=gen)
    b2 = torch.randn(hkv, generator=gen)
    scores = torch.full((2, hkv, 5), -7.0)
    fkv.scorer_mlp(kc, vc, bt, sl, ls, stats, w1, b1, w2, b2, scores)
    expect = ref_scorer(kc, vc, bt, sl, ls, stats, w1, b1, w2, b2, 5)
    mask = ~torch.isnan(expect)
    assert torch.allclose(scores.double()[mask], expect[mask], atol=1e-4, rtol=1e-4)
    assert (scores[1, :, 4] == -7.0).all(), "slots past a live window are untouched"


@pytest.mark.parametrize("protected", [0, 2])
def test_select_survivors_is_top_k_with_ties_to_the_older(protected):
    gen = torch.Generator().manual_seed(9 + protected)
    lens, starts = torch.tensor([10, 6], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    scores = torch.randint(0, 4, (2, 3, 8), generator=gen).float()
    num_evict = torch.tensor([3, 2], dtype=torch.int32)
    surv = torch.full((2, 3, 8), -5, dtype=torch.int32)
    fkv.select_survivors(lens, starts, scores, num_evict, surv, num_protected=protected)
    expect = ref_select(lens, starts, scores, num_evict, protected)
    for s in range(2):
        for kh in range(3):
            keep = expect[s][kh]
            assert surv[s, kh, : len(keep)].tolist() == keep


def test_compact_moves_survivors_with_their_stats():
    gen = torch.Generator().manual_seed(10)
    d, bs, nb, hkv, g = 4, 2, 10, 2, 1
    kc = torch.randn(nb, bs, hkv, d, generator=gen)
    vc = torch.randn(nb, bs, hkv, d, generator=gen)
    stats = torch.rand(nb, bs, hkv, g, 8, generator=gen)
    bt, sl, ls = windows([8], [0], bs, nb, gen)
    surv = torch.zeros(1, hkv, 8, dtype=torch.int32)
    keep = [[0, 3, 5, 6, 7, 1], [1, 2, 4, 5, 6, 7]]
    keep[0] = sorted(keep[0])[:6]
    for kh in range(hkv):
        surv[0, kh, :6] = torch.tensor(keep[kh])
    table = bt[0].tolist()

    def at(x, p, kh):
        return x[table[p // bs], p % bs, kh].clone()

    expect = {(p, kh): (at(kc, src, kh), at(vc, src, kh), at(stats, src, kh))
              for kh in range(hkv) for p, src in zip(range(2, 8), keep[kh])}
    fkv.compact(kc, vc, bt, sl, ls, torch.tensor([2], dtype=torch.int32), surv, stats)
    for (p, kh), (k, v, s) in expect.items():
        assert torch.equal(at(kc, p, kh), k) and torch.equal(at(vc, p, kh), v) and torch.equal(at(stats, p, kh), s)


def test_compact_on_a_fused_kv_tensor():
    gen = torch.Generator().manual_seed(11)
    d, bs, nb, hkv = 4, 2, 6, 1
    fused = torch.randn(nb, hkv, bs, 2 * d, generator=gen)
    kview = fused[..., :d].permute(0, 2, 1, 3)
    vview = fused[..., d:].permute(0, 2, 1, 3)
    bt, sl, ls = windows([4], [0], bs, nb, gen)
    before_k, before_v = kview.clone(), vview.clone()
    surv = torch.tensor([[[1, 3, 0, 0]]], dtype=torch.int32)
    fkv.compact(kview, vview, bt, sl, ls, torch.tensor([2], dtype=torch.int32), surv)
    table = bt[0].tolist()
    for dst, src in [(2, 1), (3, 3)]:
        assert torch.equal(kview[table[dst // bs], dst % bs], before_k[table[src // bs], src % bs])
        assert torch.equal(vview[table[dst // bs], dst % bs], before_v[table[src // bs], src % bs])


def test_a_whole_eviction_step_driven_by_the_manager():
    """Prefill and decode through the manager's slots, evict with stats -> scorer -> select ->
    compact, and check attention over the live window equals attention over the kept tokens."""
    gen = torch.Generator().manual_seed(12)
    bs, nb, hkv, g, d = 4, 32, 2, 2, 8
    hq = hkv * g
    m = fkv.KvCacheManager(fkv.CacheConfig(bs, nb, eviction=fkv.EvictionConfig(8, 4)))
    kc = torch.zeros(nb, bs, hkv, d)
    vc = torch.zeros(nb, bs, hkv, d)
    stats = torch.zeros(nb, bs, hkv, g, 8)
    n_tok = 12
    keys = torch.randn(n_tok, hkv, d, generator=gen)
    values = torch.randn(n_tok, hkv, d, generator=gen)
    slots = m.add_sequence(0, list(range(6)))
    fkv.reshape_and_cache(keys[:6], values[:6], kc, vc, torch.tensor(slots))
    slots = m.append(0, list(range(6, n_tok)))
    fkv.reshape_and_cache(keys[6:], values[6:], kc, vc, torch.tensor(slots))
    plan = m.eviction_due(0)
    assert plan is not None and plan.evicted_per_head == 4
    table, starts, lens, _ = m.block_tables([0]).as_torch()
    queries = torch.randn(1, n_tok, hq, d, generator=gen)
    fkv.window_stats(queries, torch.tensor([n_tok], dtype=torch.int32), kc, table, lens, starts, stats)
    w1 = torch.randn(hkv, 16, 2 * d + 8 * g, generator=gen) * 0.2
    b1, w2, b2 = torch.randn(hkv, 16, generator=gen), torch.randn(hkv, 16, generator=gen), torch.zeros(hkv)
    scores = torch.zeros(1, hkv, n_tok)
    fkv.scorer_mlp(kc, vc, table, lens, starts, stats, w1, b1, w2, b2, scores)
    survivors = torch.zeros(1, hkv, n_tok, dtype=torch.int32)
    evict = torch.tensor([plan.evicted_per_head], dtype=torch.int32)
    fkv.select_survivors(lens, starts, scores, evict, survivors, num_protected=4)
    fkv.compact(kc, vc, table, lens, starts, evict, survivors, stats)
    m.compact(0)
    check_consistent(m)
    table, starts, lens, _ = m.block_tables([0]).as_torch()
    assert int(starts[0]) == 4
    q = torch.randn(1, hq, d, generator=gen)
    out = fkv.paged_attention_decode(q, kc, vc, table, lens, starts)
    for h in range(hq):
        kept = survivors[0, h // g, : n_tok - 4].tolist()
        k, v = keys[kept, h // g].double(), values[kept, h // g].double()
        p = torch.softmax(k @ q[0, h].double() / math.sqrt(d), dim=0)
        assert torch.allclose(out[0, h].double(), p @ v, atol=1e-5)


def test_empty_batches_are_no_ops():
    kc = torch.randn(4, 2, 1, 8)
    vc = torch.randn(4, 2, 1, 8)
    before = kc.clone()
    fkv.reshape_and_cache(torch.empty(0, 1, 8), torch.empty(0, 1, 8), kc, vc, torch.empty(0, dtype=torch.int64))
    assert torch.equal(kc, before)
    out = fkv.paged_attention_decode(torch.empty(0, 2, 8), kc, vc, torch.empty(0, 3, dtype=torch.int32),
                                     torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32))
    assert out.shape == (0, 2, 8)
    surv = torch.empty(0, 1, 4, dtype=torch.int32)
    fkv.select_survivors(torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32),
                         torch.empty(0, 1, 4), torch.empty(0, dtype=torch.int32), surv)


def test_dlpack_producers_are_read_and_written_in_place():
    key = np.arange(12, dtype=np.float32).reshape(3, 1, 4)
    kc = np.zeros((2, 2, 1, 4), np.float32)
    vc = np.zeros((2, 2, 1, 4), np.float32)
    slots = np.array([3, 0, -1], np.int64)
    fkv.reshape_and_cache(DLPackOnly(key), DLPackOnly(key), DLPackOnly(kc), DLPackOnly(vc), DLPackOnly(slots))
    assert (kc[1, 1, 0] == key[0, 0]).all() and (vc[0, 0, 0] == key[1, 0]).all()
    with pytest.raises(fkv.ArgumentTypeError, match="DLPack"):
        fkv.reshape_and_cache(object(), key, kc, vc, slots)


def sample_case(seed, temperature=1.0, layer=3, requests=(7, 9)):
    gen = torch.Generator().manual_seed(seed)
    lens, starts = torch.tensor([40, 23], dtype=torch.int32), torch.tensor([16, 0], dtype=torch.int32)
    # Distinct scores 0.01 apart, shuffled per row.
    scores = torch.stack([torch.randperm(40, generator=gen) for _ in range(4)]).float().reshape(2, 2, 40) / 100
    num_evict = torch.tensor([8, 5], dtype=torch.int32)
    req = torch.tensor(requests, dtype=torch.int32)
    evictions = torch.tensor([0, 2], dtype=torch.int32)
    surv = torch.full((2, 2, 40), -5, dtype=torch.int32)
    fkv.sample_survivors(lens, starts, scores, num_evict, req, evictions, surv, layer=layer, seed=11,
                         temperature=temperature, num_protected=4)
    return lens, starts, scores, num_evict, surv


def test_sample_survivors_keeps_the_protected_and_evicts_from_the_top_2n():
    lens, starts, scores, num_evict, surv = sample_case(0)
    for s in range(2):
        live, n = int(lens[s] - starts[s]), int(num_evict[s])
        for kh in range(2):
            kept = surv[s, kh, : live - n].tolist()
            assert kept == sorted(set(kept)) and len(kept) == live - n
            assert all(p in kept for p in range(live - 4, live)), "the newest 4 slots are protected"
            victims = set(range(live)) - set(kept)
            row = scores[s, kh, : live - 4].tolist()
            pool = sorted(range(live - 4), key=lambda i: (-row[i], i))[: 2 * n]
            assert victims <= set(pool), "victims come from the top 2n unprotected scores"
    # Reproducible: the same key draws the same victims; another request or layer draws others.
    assert torch.equal(sample_case(0)[4], surv)
    others = [sample_case(0, layer=4)[4], sample_case(0, requests=(8, 10))[4]]
    assert all(not torch.equal(o, surv) for o in others)


def test_sample_survivors_at_a_tiny_temperature_is_the_top_n():
    # score / T dwarfs the Gumbel noise (|G| < 40) when scores differ by 0.01 and T = 1e-6.
    lens, starts, scores, num_evict, surv = sample_case(1, temperature=1e-6)
    expect = ref_select(lens, starts, scores, num_evict, 4)
    for s in range(2):
        for kh in range(2):
            keep = expect[s][kh]
            assert surv[s, kh, : len(keep)].tolist() == keep


def test_sample_survivors_rejects_bad_keys_with_the_value():
    lens, starts = torch.tensor([8], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    args = (lens, starts, torch.zeros(1, 1, 8), torch.tensor([2], dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
            torch.zeros(1, 1, 8, dtype=torch.int32))
    with pytest.raises(fkv.InvalidArgumentError, match="70000"):
        fkv.sample_survivors(*args, layer=70000, seed=0)
    with pytest.raises(fkv.InvalidArgumentError, match="temperature"):
        fkv.sample_survivors(*args, layer=0, seed=0, temperature=-1.0)
    with pytest.raises(fkv.ShapeError, match="requests"):
        fkv.sample_survivors(lens, starts, *args[2:4], torch.zeros(2, dtype=torch.int32), *args[5:], layer=0, seed=0)


def test_host_mirrors_are_read_instead_of_the_device_arrays():
    """``scorer_mlp``, ``select_survivors``, ``sample_survivors`` and ``compact`` take the CPU int32
    copies of ``seq_lens`` / ``live_starts`` / ``num_evict`` the engine step keeps (so on CUDA they
    read nothing back): given equal mirrors each writes what it writes without them; a mirror of the
    wrong length or dtype is refused naming it."""
    from test_cuda import eviction_case

    c = eviction_case(torch.float16, 5)
    host = dict(seq_lens_host=c["sl"].clone(), live_starts_host=c["ls"].clone())
    evict = torch.tensor([32, 16, 16], dtype=torch.int32)
    sel_host = dict(host, num_evict_host=evict.clone())
    outs = []
    for kw_w, kw_s in (({}, {}), (host, sel_host)):
        kc, vc, stats = c["kc"].clone(), c["vc"].clone(), c["stats"].clone()
        scores = torch.zeros(3, 2, 200)
        fkv.scorer_mlp(kc, vc, c["bt"], c["sl"], c["ls"], stats, *c["w"], scores, **kw_w)
        top = torch.zeros(3, 2, 200, dtype=torch.int32)
        fkv.select_survivors(c["sl"], c["ls"], scores, evict, top, num_protected=16, **kw_s)
        drawn = torch.zeros(3, 2, 200, dtype=torch.int32)
        i32 = torch.tensor([1, 2, 3], dtype=torch.int32)
        fkv.sample_survivors(c["sl"], c["ls"], scores, evict, i32, i32, drawn, layer=1, seed=4, num_protected=16, **kw_s)
        fkv.compact(kc, vc, c["bt"], c["sl"], c["ls"], evict, top, stats, **kw_s)
        outs.append((scores, top, drawn, kc, vc, stats))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    with pytest.raises(fkv.ShapeError, match="num_evict_host"):
        fkv.select_survivors(c["sl"], c["ls"], outs[0][0], evict, top, num_evict_host=evict[:2])
    with pytest.raises(fkv.DTypeError, match="seq_lens_host"):
        fkv.compact(kc, vc, c["bt"], c["sl"], c["ls"], evict, top, seq_lens_host=c["sl"].long())


def test_a_host_mirror_that_disagrees_with_its_array_is_refused():
    """The ops bound their reads by the mirrors, so on host tensors (where checking is free) a mirror
    that differs from its array is an InvalidArgumentError naming both and the entry."""
    from test_cuda import eviction_case

    c = eviction_case(torch.float16, 6)
    wrong = c["sl"].clone()
    wrong[1] += 16
    with pytest.raises(fkv.InvalidArgumentError, match=r"seq_lens_host\[1\] is 53 but seq_lens\[1\] is 37"):
        fkv.paged_attention_decode(c["q"], c["kc"], c["vc"], c["bt"], c["sl"], c["ls"], seq_lens_host=wrong)
    evict = torch.tensor([32, 16, 16], dtype=torch.int32)
    survivors = torch.zeros(3, 2, 200, dtype=torch.int32)
    with pytest.raises(fkv.InvalidArgumentError, match="num_evict_host"):
        fkv.compact(c["kc"], c["vc"], c["bt"], c["sl"], c["ls"], evict, survivors, num_evict_host=evict + 16)

"""Policies, scorer checkpoints, traces and Golden Eviction from Python, checked against naive
PyTorch references and against the kernels."""

import math
import random

import numpy as np
import pytest
import torch

import foresightkv as fkv


def view(n=24, m=6, g=2, d=8, seed=0):
    """A random (layer, KV head) eviction view: keys, values, stats, queries, positions, seq_len."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=gen)
    values = torch.randn(n, d, generator=gen)
    stats = torch.rand(n, g, 8, generator=gen)
    queries = torch.randn(m, g, d, generator=gen)
    positions = torch.tensor(sorted(random.Random(seed).sample(range(3 * n), n)))
    return keys, values, stats, queries, positions, int(positions[-1]) + 1


def test_checkpoint_round_trip_and_model_check(tmp_path):
    ck = fkv.ScorerCheckpoint.random(2, 3, 2, 8, 32, 16, seed=5)
    assert ck.in_dim == 2 * 8 + 8 * 2
    ck.save(tmp_path / "ck")
    again = fkv.ScorerCheckpoint.load(str(tmp_path / "ck"))
    assert again.config == ck.config
    for layer in range(2):
        a, b = ck.layer_weights(layer), again.layer_weights(layer)
        assert a.keys() == b.keys() == {"w1", "b1", "w2", "b2"}
        for name in a:
            assert a[name][0] == b[name][0] and list(a[name][1]) == list(b[name][1])
    ck.check_model(2, 3, 2, 8)
    with pytest.raises(fkv.ConfigError, match="num_kv_heads.*head_dim"):
        ck.check_model(2, 4, 2, 16)


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(fkv.FileError):
        fkv.ScorerCheckpoint.load(tmp_path / "missing")
    ck = fkv.ScorerCheckpoint.random(1, 1, 1, 4, 8, 4)
    ck.save(tmp_path / "ck")
    (tmp_path / "ck" / "scorer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(fkv.FormatError):
        fkv.ScorerCheckpoint.load(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{")
    with pytest.raises(fkv.FormatError):
        fkv.ScorerCheckpoint.load(tmp_path / "ck")
    with pytest.raises(fkv.ArgumentTypeError, match="path"):
        fkv.ScorerCheckpoint.load(7)


def test_foresight_scores_equal_the_scorer_kernel_and_the_torch_mlp():
    """The policy path and the kernel path compute the same MLP, which matches torch."""
    g, d, hkv, layer = 2, 8, 2, 1
    ck = fkv.ScorerCheckpoint.random(2, hkv, g, d, 16, 8, seed=3, std=0.3)
    keys, values, stats, queries, positions, seq_len = view(n=10, g=g, d=d, seed=3)
    policy = fkv.Policy.foresight(ck, sample=False)
    w1, b1, w2, b2 = fkv.scorer_weights(ck, layer)
    assert w1.shape == (hkv, 16, ck.in_dim)
    for kh in range(hkv):
        got = torch.tensor(policy.score(keys, values, stats, queries, positions, seq_len, layer=layer, kv_head=kh))
        x = torch.cat([keys, values, stats.reshape(10, -1)], dim=1).double()
        expect = torch.nn.functional.gelu(x @ w1[kh].double().T + b1[kh].double()) @ w2[kh].double() + b2[kh].double()
        assert torch.allclose(got.double(), expect, atol=1e-4)
    # The same entries in a paged cache of block size 1, scored by the kernel.
    kc = torch.zeros(10, 1, hkv, d)
    vc = torch.zeros(10, 1, hkv, d)
    st = torch.zeros(10, 1, hkv, g, 8)
    kc[:, 0, 1], vc[:, 0, 1], st[:, 0, 1] = keys, values, stats
    scores = torch.zeros(1, hkv, 10)
    fkv.scorer_mlp(kc, vc, torch.arange(10, dtype=torch.int32)[None], torch.tensor([10], dtype=torch.int32),
                   torch.tensor([0], dtype=torch.int32), st, w1, b1, w2, b2, scores)
    kernel = scores[0, 1]
    policy_scores = torch.tensor(policy.score(keys, values, stats, queries, positions, seq_len, layer=layer, kv_head=1))
    assert torch.allclose(kernel, policy_scores, atol=1e-5)


def test_baselines_follow_their_definitions():
    keys, values, stats, queries, positions, seq_len = view(n=20, seed=1)
    args = (keys, values, stats, queries, positions, seq_len)
    # H2O: lowest cumulative attention (statistic 6, summed over the group) goes first.
    cum = stats[:, :, 6].sum(1)
    victims = fkv.Policy.h2o().choose_victims(*args, num_protected=4, num_evict=5)
    expect = sorted(sorted(range(16), key=lambda i: (float(cum[i]), i))[:5])
    assert victims == expect
    # StreamingLLM: sinks (original positions < 4) stay, then the oldest go.
    pos = positions.clone()
    pos[:3] = torch.tensor([0, 1, 2])
    victims = fkv.Policy.streaming_llm(sinks=2).choose_victims(keys, values, stats, queries, pos, seq_len, num_protected=4, num_evict=3)
    assert victims == [2, 3, 4]
    # TOVA: what the last query attends to least (mean over the group's heads).
    probs = torch.stack([torch.softmax(keys @ queries[-1, h] / math.sqrt(8), 0) for h in range(2)]).mean(0)
    victims = fkv.Policy.tova().choose_victims(*args, num_protected=4, num_evict=4)
    assert victims == sorted(sorted(range(16), key=lambda i: (float(probs[i]), i))[:4])
    assert fkv.Policy.full_cache().choose_victims(*args, num_protected=4, num_evict=4) == []
    assert not fkv.Policy.full_cache().evicts


@pytest.mark.parametrize("seed", range(8))
def test_victims_are_never_protected_and_sampling_is_reproducible(seed):
    rng = random.Random(seed)
    n = rng.randint(8, 40)
    keys, values, stats, queries, positions, seq_len = view(n=n, m=min(n, 5), seed=seed)
    protected = rng.randint(0, n // 2)
    evict = rng.randint(0, n - protected)
    ck = fkv.ScorerCheckpoint.random(1, 1, 2, 8, 16, 8, seed=seed)
    for policy in [fkv.Policy.h2o(), fkv.Policy.snapkv(kernel=3), fkv.Policy.rkv(), fkv.Policy.random(seed=seed),
                   fkv.Policy.foresight(ck, seed=seed), fkv.Policy.foresight(ck, sample=False)]:
        kw = dict(num_protected=protected, num_evict=evict, eviction=rng.randrange(9), request=7)
        victims = policy.choose_victims(keys, values, stats, queries, positions, seq_len, **kw)
        assert victims == sorted(set(victims)) and len(victims) == evict, policy
        assert all(v < n - protected for v in victims), policy
        assert victims == policy.choose_victims(keys, values, stats, queries, positions, seq_len, **kw)


def test_sampled_victims_come_from_the_top_two_l():
    keys, values, stats, queries, positions, seq_len = view(n=40, seed=4)
    ck = fkv.ScorerCheckpoint.random(1, 1, 2, 8, 16, 8, seed=4, std=0.5)
    top = fkv.Policy.foresight(ck, sample=False)
    scores = top.score(keys, values, stats, queries, positions, seq_len)
    top2l = set(sorted(range(32), key=lambda i: (-scores[i], i))[:16])
    seen = set()
    for s in range(10):
        v = fkv.Policy.foresight(ck, seed=s).choose_victims(keys, values, stats, queries, positions, seq_len,
                                                            num_protected=8, num_evict=8)
        assert set(v) <= top2l
        seen.add(tuple(v))
    assert len(seen) > 1, "different seeds should sample different victim sets"


def test_numpy_views_work_too():
    keys, values, stats, queries, positions, seq_len = (x.numpy() if isinstance(x, torch.Tensor) else x for x in view())
    assert len(fkv.Policy.tova().score(keys, values, stats, queries, positions, seq_len)) == 24


def test_golden_eviction_beats_the_baselines_on_a_synthetic_trace(tmp_path):
    trace = fkv.Trace.synthetic(2, 4, 2, 16, 256, seed=11)
    assert trace.shape == {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16, "len": 256}
    trace.save(tmp_path / "t.safetensors")
    trace = fkv.Trace.load(tmp_path / "t.safetensors")
    golden = fkv.golden_eviction(trace, 64, 32)
    full = fkv.simulate(trace, fkv.Policy.full_cache(), 64, 32)
    assert abs(full["fidelity"]["mass"] - 1) < 1e-6 and full["fidelity"]["rel_err"] < 1e-5
    g = golden["fidelity"]
    # Evictions at 96, 128, ..., 224; none at the end of the trace (256): nothing later to measure.
    assert 0 < g["mass"] < 1 and g["evictions"] == 2 * 2 * 5
    assert max(rec["seq_len"] for rec in golden["records"]) == 224
    for rec in golden["records"]:
        assert len(rec["victims"]) == 32 and set(rec["victims"]) <= set(rec["candidates"])
    for p in [fkv.Policy.random(seed=1), fkv.Policy.streaming_llm(), fkv.Policy.h2o()]:
        other = fkv.simulate(trace, p, 64, 32, record=True)
        assert g["mass"] >= other["fidelity"]["mass"], p
        assert len(other["records"]) == g["evictions"]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: fkv.Policy.snapkv(kernel=4), fkv.InvalidArgumentError, "kernel"),
        (lambda: fkv.Policy.rkv(lam=2.0), fkv.InvalidArgumentError, "lam"),
        (lambda: fkv.Policy.random(seed=-1), fkv.InvalidArgumentError, "seed"),
        (lambda: fkv.Policy.streaming_llm(sinks="4"), fkv.ArgumentTypeError, "sinks"),
        (lambda: fkv.Policy.foresight("ck"), fkv.ArgumentTypeError, "checkpoint"),
        (lambda: fkv.Policy.foresight(fkv.ScorerCheckpoint.random(1, 1, 1, 4, 8, 4), temperature=0.0), fkv.InvalidArgumentError, "temperature"),
        (lambda: fkv.ScorerCheckpoint.random(0, 1, 1, 4, 8, 4), fkv.InvalidArgumentError, "num_layers"),
        (lambda: fkv.ScorerCheckpoint.random(1, 2**40, 1, 4, 8, 4), fkv.InvalidArgumentError, "num_kv_heads"),
        (lambda: fkv.ScorerCheckpoint.random(1, 1, 1, 4, 8, 4).layer_weights(1), fkv.InvalidArgumentError, "layer"),
        (lambda: fkv.Trace.synthetic(1, 4, 3, 8, 64), fkv.FormatError, "multiple"),
        (lambda: fkv.Trace.synthetic(1024, 1024, 1024, 4096, 2**20), fkv.InvalidArgumentError, "too large"),
        (lambda: fkv.Trace.load("/nonexistent/trace"), fkv.FileError, "trace"),
        (lambda: fkv.golden_eviction("trace", 64, 32), fkv.ArgumentTypeError, "trace"),
        (lambda: fkv.golden_eviction(fkv.Trace.synthetic(1, 2, 1, 8, 64), 16, 32), fkv.InvalidArgumentError, "budget"),
        (lambda: fkv.simulate(fkv.Trace.synthetic(1, 2, 1, 8, 64), "h2o", 64, 32), fkv.ArgumentTypeError, "policy"),
        (lambda: fkv.simulate(fkv.Trace.synthetic(1, 2, 1, 8, 64), fkv.Policy.h2o(), -1, 32), fkv.InvalidArgumentError, "budget"),
    ],
)
def test_hostile_policy_and_trace_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(keys=a["keys"].double()), fkv.DTypeError, "keys"),
        (lambda a: a.update(values=a["values"][:, :4]), fkv.ShapeError, "values"),
        (lambda a: a.update(stats=a["stats"][:, :1]), fkv.ShapeError, "stats"),
        (lambda a: a.update(queries=a["queries"][:, :, :3]), fkv.ShapeError, "queries"),
        (lambda a: a.update(keys=a["keys"].t().contiguous().t()), fkv.ShapeError, "keys"),
        (lambda a: a.update(positions=a["positions"].flip(0)), fkv.InvalidArgumentError, "ascending"),
        (lambda a: a.update(positions=a["positions"][:-1]), fkv.ShapeError, "positions"),
        (lambda a: a.update(seq_len=1), fkv.InvalidArgumentError, "seq_len"),
        (lambda a: a.update(num_evict=23), fkv.InvalidArgumentError, "num_evict"),
        (lambda a: a.update(num_protected=-2), fkv.InvalidArgumentError, "num_protected"),
        (lambda a: a.update(layer=2**40), fkv.InvalidArgumentError, "layer"),
        (lambda a: a.update(layer=70000), fkv.ConfigError, "layer 70000"),
        (lambda a: a.update(queries=torch.randn(30, 2, 8)), fkv.ShapeError, "queries"),
        (lambda a: a.update(keys=torch.empty(24, 8, device="meta")), fkv.DeviceError, "keys"),
        (lambda a: a.update(keys=[[0.0] * 8] * 24), fkv.ArgumentTypeError, "keys"),
    ],
)
def test_hostile_views(mutate, exc, match):
    keys, values, stats, queries, positions, seq_len = view()
    a = dict(keys=keys, values=values, stats=stats, queries=queries, positions=positions, seq_len=seq_len,
             num_protected=4, num_evict=8)
    mutate(a)
    with pytest.raises(exc, match=match):
        fkv.Policy.foresight(fkv.ScorerCheckpoint.random(2, 1, 2, 8, 16, 8), seed=1).choose_victims(**a)


def test_official_layout_round_trip(tmp_path):
    import json

    ck = fkv.ScorerCheckpoint.random(2, 2, 2, 8, 32, 16, seed=9, std=0.4)
    model = tmp_path / "model"
    model.mkdir()
    ck.save_official(model / "model-00001-of-00001.safetensors")
    (model / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}))
    back = fkv.ScorerCheckpoint.from_official(model, 32, 16)
    assert ck.stats_mode == "paper" and back.stats_mode == "official"
    assert back.config == {**ck.config, "stats_mode": "official"}
    for layer in range(2):
        a, b = ck.layer_weights(layer), back.layer_weights(layer)
        for name in a:
            assert a[name][0] == b[name][0] and list(a[name][1]) == list(b[name][1]), name
    (model / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}))
    with pytest.raises(fkv.FormatError, match="layers.2"):
        fkv.ScorerCheckpoint.from_official(model, 32, 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(fkv.FileError, match="config.json"):
        fkv.ScorerCheckpoint.from_official(empty, 32, 16)
    (empty / "config.json").write_text((model / "config.json").read_text())
    with pytest.raises(fkv.FormatError, match="no \\*.safetensors shards"):
        fkv.ScorerCheckpoint.from_official(empty, 32, 16)


def test_checkpoints_carry_their_stats_mode(tmp_path):
    ck = fkv.ScorerCheckpoint.random(1, 1, 2, 8, 32, 8, seed=3, stats_mode="official")
    assert ck.stats_mode == "official" and ck.config["stats_mode"] == "official"
    ck.save(tmp_path / "ck")
    assert fkv.ScorerCheckpoint.load(tmp_path / "ck", stats_mode="official").stats_mode == "official"
    with pytest.raises(fkv.ConfigError, match="trained on 'official' statistics.*'paper' mode"):
        fkv.ScorerCheckpoint.load(tmp_path / "ck", stats_mode="paper")
    with pytest.raises(fkv.InvalidArgumentError, match="daily"):
        fkv.ScorerCheckpoint.load(tmp_path / "ck", stats_mode="daily")
    policy = fkv.Policy.foresight(ck)
    assert policy.stats_mode == "official" and fkv.Policy.h2o().stats_mode is None
    trace = fkv.Trace.synthetic(1, 2, 1, 8, 80, seed=2)
    # The scorer's own mode by default; another mode is refused with both named.
    assert fkv.simulate(trace, policy, 32, 8)["fidelity"]["evictions"] > 0
    with pytest.raises(fkv.ConfigError, match="'official'.*'paper'"):
        fkv.simulate(trace, policy, 32, 8, stats_mode="paper")

"""The testbed on a tiny random Llama built from a config (always runs; seconds): the simulator
without eviction reproduces the model's own full-cache cross-entropy, its features are the serving
step's, Golden's victims are the lowest future scores, and the hooks are validated."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import importlib

import foresightkv as fkv
from foresightkv.engine import EngineConfig, EvictionEngine

from foresightkv.testbed.model import ModelShape, full_forward_logits, token_losses

# the module (``foresightkv.testbed.simulate`` the attribute is the function)
sim = importlib.import_module("foresightkv.testbed.simulate")


# one torch thread for the whole module (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0, layers: int = 2):
    """A random Llama: 2 layers, 4 query / 2 KV heads, head_dim 16, vocab 300."""
    from foresightkv.testbed.model import _register
    from transformers import LlamaConfig, LlamaForCausalLM

    _register()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    )
    m = LlamaForCausalLM(cfg).eval()
    # sharper attention than the default init, so that eviction matters
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return m


def run_sim(m, x, policy, *, prompt_len=0, budget=32, interval=16, **kw):
    """``sim.simulate`` of ``policy`` from position 0 with B = 32, L = 16 unless told otherwise."""
    return sim.simulate(m, x, prompt_len=prompt_len, policy=policy, budget=budget, interval=interval, **kw)


def ids(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n,), generator=g)


def test_no_eviction_reproduces_full_cache_ce():
    m = tiny_llama()
    x = ids(200)
    ref_ce, ref_ent = token_losses(full_forward_logits(m, x), x)
    # full policy, chunked: no eviction
    r = sim.simulate(m, x, prompt_len=50, policy="full", budget=64, interval=16)
    assert r.evictions == 0
    torch.testing.assert_close(r.ce, ref_ce, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r.entropy, ref_ent, atol=1e-4, rtol=1e-4)
    # an evicting policy whose budget is never reached: no eviction either
    r2 = sim.simulate(m, x, prompt_len=50, policy="h2o", budget=256, interval=16)
    assert r2.evictions == 0
    torch.testing.assert_close(r2.ce, ref_ce, atol=1e-4, rtol=1e-4)


def test_eviction_changes_loss_and_keeps_budget():
    m = tiny_llama()
    x = ids(200)
    full = run_sim(m, x, "full")
    for p in ("h2o", "snapkv", "tova", "rkv", "streaming", "random"):
        r = run_sim(m, x, p)
        assert r.evictions == (200 - 32) // 16, p
        # before the first eviction the cache is full: identical losses
        torch.testing.assert_close(
            r.ce[: 32 + 16], full.ce[: 32 + 16], atol=1e-5, rtol=1e-5
        )
        assert not torch.allclose(r.ce, full.ce, atol=1e-3), p
        for kept in r.kept:
            # per head, ascending original positions, newest L kept, 200 - 32k entries live
            assert kept.shape[0] == 2
            assert (kept[:, 1:] > kept[:, :-1]).all()
            assert (kept[:, -16:] == torch.arange(200 - 16, 200)).all()
        if p == "streaming":
            # StreamingLLM keeps the sinks and the recent window: the same set in every head
            assert torch.equal(r.kept[0][0], r.kept[0][1])


def _window_rows(batch, j, cache):
    """Rows of request ``j``'s evictable window of ``cache``, read slot by slot through its table row."""
    bs, row = batch.block_size, batch.block_tables[j].tolist()
    start, end = int(batch.live_starts[j]), int(batch.seq_lens[j])
    return torch.stack([cache[row[p // bs], p % bs] for p in range(start, end)])


def test_features_equal_serving_step():
    m = tiny_llama()
    x = ids(160)
    b, interval = 32, 16
    # the plain serving step (EvictionEngine) driven through the same chunked forward, its inputs
    # of every eviction recorded through the engine's on_evict hook
    seen = []

    def record(batch):
        for j in range(batch.num_seqs):
            seen.append(
                dict(
                    layer=batch.layer,
                    eviction=batch.evictions[j],
                    seq_len=batch.lengths[j],
                    num_evict=batch.num_evict_host[j],
                    keys=_window_rows(batch, j, batch.key_cache).float(),
                    values=_window_rows(batch, j, batch.value_cache).float(),
                    stats=_window_rows(batch, j, batch.stats).float(),
                    positions=batch.positions[j, :, : batch.live[j]].clone(),
                )
            )
        return None

    engine = EvictionEngine(EngineConfig(budget=b, interval=interval, policy="h2o"), block_size=1, on_evict=record)
    ce_engine, _ = sim.run_chunked(m, x, engine, b, interval)
    events = []
    r = sim.simulate(
        m, x, prompt_len=0, policy="h2o", budget=b, interval=interval, capture=events.append
    )
    # capturing does not change the run
    assert torch.equal(r.ce, ce_engine)
    by_key = {(c["layer"], c["eviction"]): c for c in seen}
    assert len(by_key) == len(events) == len(seen) and events
    for ev in events:
        n = ev.keys.shape[1]
        assert (
            ev.num_kv_heads == 2
            and ev.num_protected == interval
            and ev.num_evict == interval
            and n == b
        )
        c = by_key[(ev.layer, ev.eviction)]
        assert c["seq_len"] == ev.seq_len and c["num_evict"] == ev.num_evict
        for kh in range(ev.num_kv_heads):
            assert torch.equal(ev.keys[kh], c["keys"][:n, kh])
            assert torch.equal(ev.values[kh], c["values"][:n, kh])
            assert torch.equal(ev.stats[kh], c["stats"][:n, kh])
            assert ev.positions[kh].tolist() == c["positions"][kh, :n].tolist()
        assert ev.stats.shape == (2, n, 2, fkv.NUM_STATS)
        assert ev.future is None


def test_foresight_kernel_path_equals_per_head_path():
    m = tiny_llama()
    x = ids(160)
    shape = ModelShape.of(m)
    ck = fkv.ScorerCheckpoint.random(
        shape.num_layers,
        shape.num_kv_heads,
        shape.group,
        shape.head_dim,
        32,
        16,
        seed=3,
    )
    kernel = run_sim(m, x, "foresight", scorer=ck)
    events = []
    per_head = run_sim(m, x, "foresight", scorer=ck, capture=events.append)
    assert events and kernel.evictions == per_head.evictions
    for a, c in zip(kernel.kept, per_head.kept):
        assert torch.equal(a, c)
    torch.testing.assert_close(kernel.ce, per_head.ce, atol=1e-5, rtol=1e-5)


def test_golden_victims_are_lowest_future_scores():
    m = tiny_llama()
    x = ids(160)
    events = []
    r = run_sim(m, x, "golden", capture=events.append)
    assert r.evictions == (160 - 32) // 16 and events
    kept_after = {}
    for ev in events:
        if ev.seq_len == 160:
            # Golden makes no eviction at the end of the sequence (nothing follows it)
            assert ev.future is None
            continue
        assert ev.future is not None and ev.future.shape == ev.positions.shape
        kept_after[(ev.layer, ev.eviction)] = ev
    # at each eviction the Golden victims are the num_evict lowest future scores: every survivor
    # among the candidates scores at least as high as every victim
    assert all(ev.future is not None for ev in events[:-2])
    for (layer, e), ev in kept_after.items():
        nxt = kept_after.get((layer, e + 1))
        if nxt is None:
            continue
        for kh in range(ev.num_kv_heads):
            cand = ev.positions[kh].tolist()
            surv = set(nxt.positions[kh].tolist()) & set(cand)
            vic = [i for i, p in enumerate(cand) if p not in surv]
            keep = [i for i, p in enumerate(cand) if p in surv]
            assert len(vic) == ev.num_evict
            assert (
                float(ev.future[kh, vic].max())
                <= float(ev.future[kh, keep].min()) + 1e-7
            )
    # Golden beats random on this model
    rnd = run_sim(m, x, "random")
    assert r.ce[48:].mean() < rnd.ce[48:].mean()


def test_victims_override_is_obeyed_and_validated():
    m = tiny_llama()
    x = ids(112)
    seen = []

    def oldest(ev):
        seen.append(ev.positions.clone())
        return [list(range(ev.num_evict)) for _ in range(ev.num_kv_heads)]

    r = run_sim(m, x, "h2o", victims_override=oldest)
    # evicting the oldest candidates every time leaves the newest budget entries: a sliding window
    for kept in r.kept:
        assert (kept == torch.arange(112 - kept.shape[1], 112)).all()
    assert seen
    with pytest.raises(fkv.InvalidArgumentError):
        run_sim(m, x, "h2o", victims_override=lambda ev: [[0] * ev.num_evict] * ev.num_kv_heads)
    with pytest.raises(fkv.ShapeError):
        run_sim(m, x, "h2o", victims_override=lambda ev: [[0]])
    with pytest.raises(fkv.ConfigError):
        run_sim(m, x, "nope")
    with pytest.raises(fkv.ConfigError):
        run_sim(m, x, "foresight")


def test_generation_through_engine_full_equals_hf_greedy():
    from foresightkv.testbed.generate import generate, prefill
    from foresightkv.testbed.traces import generate_greedy

    m = tiny_llama()
    p = ids(90)
    ref, _ = generate_greedy(m, p, 8, [])
    pre = prefill(m, p)
    out = generate(
        m, pre, policy="full", budget=32, interval=16, max_new=8, stop_ids=[]
    )
    assert out == ref.tolist()
    # with eviction the prompt is compressed to the budget and decoding still runs
    out2 = generate(
        m, pre, policy="snapkv", budget=32, interval=16, max_new=8, stop_ids=[]
    )
    assert len(out2) == 8


def test_packed_runs_equal_their_own_simulations():
    """simulate_many packs runs of different sequences, policies, budgets and seeds into one forward
    per step; each run's losses and kept positions equal its own simulate, capture hooks see the
    same events, and Golden follows its own sequence's trajectory."""
    m = tiny_llama()
    a, b = ids(150, seed=1), ids(131, seed=2)
    ga = sim.GoldenRun(sim.record_full(m, a)[0], 32, 16)
    specs = [
        (a, "h2o", 32, 16, 0),
        (b, "h2o", 32, 16, 0),  # same engine as the first: two requests of one batch
        (a, "snapkv", 48, 16, 0),
        (b, "random", 32, 8, 3),
        (a, "random", 32, 8, 3),
        (a, "golden", 32, 16, 0),
        (b, "full", 32, 16, 0),
    ]
    events_solo, events_packed = [], []
    solo = []
    for i, (x, p, bud, iv, seed) in enumerate(specs):
        cap = events_solo.append if i == 0 else None
        solo.append(sim.simulate(m, x, prompt_len=0, policy=p, budget=bud, interval=iv, seed=seed,
                                 capture=cap, golden=ga if p == "golden" else None))
    runs = [
        sim.SimRun(x, 0, p, bud, iv, seed=seed, capture=events_packed.append if i == 0 else None,
                   golden=ga if p == "golden" else None)
        for i, (x, p, bud, iv, seed) in enumerate(specs)
    ]
    packed = sim.simulate_many(m, runs)
    for (x, p, bud, _, _), r, q in zip(specs, solo, packed):
        assert r.ce.shape == q.ce.shape == (x.numel() - 1,)
        torch.testing.assert_close(q.ce, r.ce, atol=1e-4, rtol=1e-4)
        assert r.evictions == q.evictions and (p == "full") == (r.evictions == 0)
        assert len(r.kept) == len(q.kept)
        for ka, kb in zip(r.kept, q.kept):
            assert torch.equal(ka, kb), (p, bud)
    # the capture hook of a packed run sees what it sees alone
    assert len(events_solo) == len(events_packed) > 0
    for ea, eb in zip(events_solo, events_packed):
        assert (ea.layer, ea.eviction, ea.seq_len) == (eb.layer, eb.eviction, eb.seq_len)
        torch.testing.assert_close(ea.stats, eb.stats, atol=1e-5, rtol=1e-4)
        assert torch.equal(ea.positions, eb.positions)


def test_packed_generation_equals_one_at_a_time():
    from foresightkv.testbed.generate import GenSpec, generate, generate_many, prefill

    m = tiny_llama()
    p = ids(90)
    pre = prefill(m, p)
    specs = [GenSpec("full", 32, 16), GenSpec("snapkv", 32, 16), GenSpec("h2o", 48, 8), GenSpec("random", 32, 16, seed=5)]
    many = generate_many(m, pre, specs, max_new=8, stop_ids=[7, 11])
    for sp, out in zip(specs, many):
        one = generate(m, pre, policy=sp.policy, budget=sp.budget, interval=sp.interval, max_new=8,
                       stop_ids=[7, 11], seed=sp.seed)
        assert out == one, sp


@pytest.mark.parametrize("device, why", [("tpu", "is not a torch device"), ("meta", "runs on cpu or cuda")])
def test_load_model_refuses_a_bad_device_before_reading_weights(device, why, tmp_path):
    """``load_model(..., device=)`` checks the device first, with a typed error naming it."""
    from foresightkv.testbed.model import load_model

    with pytest.raises(fkv.ConfigError, match=f"device '{device}'.*{why}"):
        load_model(str(tmp_path), device=device)

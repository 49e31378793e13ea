"""The engine-neutral step (``foresightkv.engine``) on its own: its plans (the core's batched
``WindowPlanner``) against the Rust core's ``KvCacheManager``, the release ledger's arithmetic, and the step over a vLLM-like paged cache
(block size 16) against the dense reference, so the next engine plugin can reuse it unchanged."""

import random

import pytest
import torch
from reference import RequestRef

import foresightkv
from foresightkv.engine import EngineConfig, EvictionEngine, StepRequest
from foresightkv.errors import ConfigError, ShapeError
from foresightkv_sglang.ledger import SlotLedger, subtract


def align_up(x, bs):
    return -(-x // bs) * bs


def _core_and_engine(seed, protect):
    """A random schedule (block size, interval, budget) of ``seed``, the core's ``KvCacheManager``
    holding one sequence (id 1) with a random prompt, and an ``EvictionEngine`` of the same schedule
    (h2o); returns ``(rng, bs, budget, interval, manager, engine, prompt length)``."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 16])
    interval = bs * rng.randint(1, 4)
    budget = interval * rng.randint(1, 4)
    mgr = foresightkv.KvCacheManager(
        foresightkv.CacheConfig(bs, 4096, eviction=foresightkv.EvictionConfig(budget, interval, protect_prompt=protect))
    )
    eng = EvictionEngine(
        EngineConfig(budget=budget, interval=interval, policy="h2o", protect_prompt=protect), block_size=bs
    )
    prompt = rng.randint(1, 3 * budget)
    mgr.add_sequence(1, list(range(prompt)))
    return rng, bs, budget, interval, mgr, eng, prompt


@pytest.mark.parametrize("protect", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_schedule_matches_the_core_manager(seed, protect):
    """The engine's plans (prompt as one prefill, then one token per step) evict exactly when and
    where the core manager does, one step late."""
    rng, bs, budget, interval, mgr, eng, prompt = _core_and_engine(seed, protect)
    protected = align_up(prompt, bs) if protect else 0
    assert mgr.protected_len(1) == protected
    length, n, first = prompt, prompt, True
    for _ in range(6 * (budget + interval)):
        step = eng.begin_step([StepRequest(key=7, seq_len=length, num_new=n, prefill=first, reset=first)])
        assert step.live_starts == [mgr.live_start(1)] and step.protected_lens == [protected]
        plan = mgr.eviction_due(1)
        assert step.evict_to == [plan.live_start_after if plan else None]
        if plan:
            mgr.compact(1)
        mgr.append(1, [length])
        length, n, first = length + 1, 1, False


@pytest.mark.parametrize("seed", range(16))
def test_step_plan_matches_the_core_manager_in_protect_mode(seed):
    """``EvictionEngine.begin_step`` in protect mode (the prompt in random chunks, then one token per
    step) plans exactly the core manager's evictions, protected prefix and released positions."""
    rng, bs, budget, interval, mgr, eng, prompt = _core_and_engine(seed, protect=True)
    chunks, done = [], 0
    while done < prompt:
        chunks.append(min(rng.randint(1, budget + interval), prompt - done))
        done += chunks[-1]
    length, freed = 0, []
    steps = [(n, True) for n in chunks] + [(1, False)] * (6 * (budget + interval))
    for i, (n, prefill) in enumerate(steps):
        length += n
        if not prefill:
            mgr.append(1, [length - 1])
        plan = eng.begin_step([StepRequest(key=0, seq_len=length, num_new=n, prefill=prefill, reset=i == 0)])
        for a in plan.released:
            assert a.protected_len == mgr.protected_len(1) and a.evicted_from >= a.protected_len
            freed += range(a.evicted_from, a.new_live_start)
        assert plan.protected_lens == [align_up(min(length, prompt), bs)]
        due = mgr.eviction_due(1) if length == mgr.seq_len(1) else None
        assert plan.evict_to[0] == (due.live_start_after if due else None)
        if due:
            mgr.compact(1)
        assert eng.protected_len(0) == align_up(min(length, prompt), bs)
    for a in eng.begin_step([]).released:
        freed += range(a.evicted_from, a.new_live_start)
    assert sorted(freed) == list(range(mgr.protected_len(1), mgr.live_start(1)))
    assert len(freed) == len(set(freed)) and mgr.live_start(1) > mgr.protected_len(1)


@pytest.mark.parametrize("seed", range(40))
def test_ledger_frees_each_position_once(seed):
    rng = random.Random(seed)
    led = SlotLedger()
    key = (1, 1)
    led.track([key])
    freed = []
    protected = rng.choice([0, rng.randint(1, 30)])
    start, length = 0, protected
    released = False
    for _ in range(rng.randint(1, 12)):
        length += rng.randint(1, 20)
        new = rng.randint(max(start, protected), length)
        if rng.random() < 0.3:
            # the request is released while this eviction is still pending, then the commit comes
            for s, e in led.clip_release(key, [(0, length)]):
                freed += range(s, e)
            released = True
        for s, e in led.take(key, max(start, protected), new):
            assert s >= protected, "a protected position was taken"
            freed += range(s, e)
        if not released:
            assert led.taken(key) == ([(protected, new)] if new > protected else [])
        start = new
        if released:
            break
    if not released:
        for s, e in led.clip_release(key, [(0, length)]):
            freed += range(s, e)
    assert sorted(freed) == list(range(length))


def test_subtract():
    assert subtract((0, 10), [(2, 4), (6, 7)]) == [(0, 2), (4, 6), (7, 10)]
    assert subtract((3, 5), [(0, 10)]) == []
    assert subtract((3, 5), []) == [(3, 5)]


def test_config_round_trip_and_typed_errors(tmp_path):
    cfg = EngineConfig.from_dict({"budget": 64, "interval": 16, "policy": "snapkv", "kernel": 5})
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="multiple of block_size"):
        EngineConfig.from_dict({"budget": 64, "interval": 8, "policy": "h2o"}, block_size=16)
    with pytest.raises(ConfigError, match="must be an integer"):
        EngineConfig.from_dict({"budget": "64", "interval": 16, "policy": "h2o"})
    with pytest.raises(ConfigError, match="JSON object"):
        EngineConfig.from_dict([1, 2])
    p = tmp_path / "c.json"
    p.write_text('{"foresightkv": {"budget": 32, "interval": 16, "policy": "random", "seed": 4}}')
    assert EngineConfig.from_json_file(p).seed == 4
    assert EngineConfig.from_env(env={"FORESIGHTKV_CONFIG": str(p)}).budget == 32


def _saved_random_foresight(tmp_path, dims, budget, interval, ck_seed, **options):
    """A random ForesightKV scorer (model ``dims`` = layers, query heads, KV heads, head dim; seed
    ``ck_seed``) saved in ``tmp_path / "ck"``, and the ``EngineConfig`` of policy ``foresight`` that
    loads it (``options``: its other fields)."""
    layers, hq, h, d = dims
    foresightkv.ScorerCheckpoint.random(layers, h, hq // h, d, budget, interval, seed=ck_seed).save(tmp_path / "ck")
    return EngineConfig(
        budget=budget, interval=interval, policy="foresight", checkpoint=str(tmp_path / "ck"), **options
    )


@pytest.mark.parametrize("protect", [False, True])
@pytest.mark.parametrize("policy", ["h2o", "foresight_topl"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_block16_step_matches_the_dense_reference(policy, seed, protect, tmp_path):
    bs, budget, interval, hq, h, d, layers = 16, 32, 16, 4, 2, 64, 2
    if policy == "h2o":
        cfg = EngineConfig(budget=budget, interval=interval, policy="h2o", protect_prompt=protect)
    else:
        cfg = _saved_random_foresight(
            tmp_path, (layers, hq, h, d), budget, interval, seed, sample=False, protect_prompt=protect
        )
    eng = EvictionEngine(cfg, block_size=bs)
    g = torch.Generator().manual_seed(seed)
    num_blocks, max_len = 64, 160
    kc = [torch.zeros(num_blocks, bs, h, d) for _ in range(layers)]
    vc = [torch.zeros(num_blocks, bs, h, d) for _ in range(layers)]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.tensor([perm[:10], perm[10:20]], dtype=torch.int32)
    scale = d**-0.5

    class S:
        pass

    streams, refs, lens = [], [], [0, 0]
    for i in range(2):
        s = S()
        s.q = torch.randn(layers, max_len, hq, d, generator=g)
        s.k = torch.randn(layers, max_len, h, d, generator=g)
        s.v = torch.randn(layers, max_len, h, d, generator=g)
        streams.append(s)
        refs.append(
            RequestRef(
                s,
                i,
                budget=budget,
                interval=interval,
                policy=eng.policy,
                num_layers=layers,
                hq=hq,
                h=h,
                scale=scale,
                block_size=bs,
                protect_prompt=protect,
            )
        )
    rng = random.Random(seed)
    plan_steps = [[rng.randint(20, 60), rng.randint(2, 40)]] + [[1, 1]] * 70
    for new in plan_steps:
        reqs = [StepRequest(key=i, seq_len=lens[i] + n, num_new=n, prefill=n > 1) for i, n in enumerate(new)]
        plan = eng.begin_step(reqs)
        for a in plan.released:
            assert a.new_live_start % bs == 0 and a.new_live_start > a.evicted_from >= a.old_live_start
            assert a.evicted_from == max(a.old_live_start, refs[a.key].protected_len)
        for layer in range(layers):
            qs, ks, vs, slots = [], [], [], []
            for i, n in enumerate(new):
                pos = torch.arange(lens[i], lens[i] + n)
                qs.append(streams[i].q[layer, pos])
                ks.append(streams[i].k[layer, pos])
                vs.append(streams[i].v[layer, pos])
                slots.append(tables[i, pos // bs].long() * bs + pos % bs)
            foresightkv.reshape_and_cache(torch.cat(ks), torch.cat(vs), kc[layer], vc[layer], torch.cat(slots))
            q = torch.cat(qs)
            out = torch.empty_like(q)
            eng.attend(plan, layer, q, kc[layer], vc[layer], tables, out, scale=scale)
            outs = torch.split(out, new)
            if layer == 0:
                ref_outs = [refs[i].step(n, prefill=n > 1) for i, n in enumerate(new)]
            for i in range(2):
                torch.testing.assert_close(outs[i], ref_outs[i][layer], rtol=2e-5, atol=2e-5)
        for i, n in enumerate(new):
            lens[i] += n
            pending = eng.pending_live_start(i)
            assert (eng.live_start(i) if pending is None else pending) == refs[i].live_start
            assert eng.protected_len(i) == refs[i].protected_len
    assert all(eng.live_start(i) > eng.protected_len(i) for i in range(2))


def test_step_rejects_inconsistent_inputs():
    eng = EvictionEngine(EngineConfig(budget=8, interval=4, policy="h2o"), block_size=1)
    plan = eng.begin_step([StepRequest(key=1, seq_len=3, num_new=3, prefill=True)])
    kc = torch.zeros(16, 1, 2, 64)
    with pytest.raises(ShapeError, match="tokens"):
        eng.attend(
            plan,
            0,
            torch.zeros(2, 4, 64),
            kc,
            kc.clone(),
            torch.zeros(1, 3, dtype=torch.int32),
            torch.zeros(2, 4, 64),
            scale=0.1,
        )
    with pytest.raises(ShapeError):
        eng.begin_step([StepRequest(key=1, seq_len=2, num_new=3, prefill=True)])


@pytest.mark.parametrize("policy", ["h2o", "tova", "foresight_topl", "foresight_sample"])
@pytest.mark.parametrize("prompt", [5, 40])
def test_step_keeps_what_the_core_simulation_keeps(policy, prompt, tmp_path):
    """One request replayed through the engine (prompt as one prefill, then one token per step) keeps,
    per (layer, KV head), exactly the tokens the Rust core's ``simulate`` keeps on the same trace."""
    from safetensors.torch import load_file

    # 121 tokens: the last eviction is due at length 120, so both sides make it. At a length where an
    # eviction falls due on the very last token the core's simulate skips it (nothing later could
    # measure it), while a serving step, which does not know the request ends there, makes it.
    layers, hq, h, d, length, budget, interval = 2, 4, 2, 64, 121, 24, 8
    trace = foresightkv.Trace.synthetic(layers, hq, h, d, length, seed=5)
    trace.save(tmp_path / "trace.safetensors")
    t = load_file(str(tmp_path / "trace.safetensors"))
    if policy.startswith("foresight"):
        cfg = _saved_random_foresight(
            tmp_path, (layers, hq, h, d), budget, interval, 2, sample=policy == "foresight_sample", seed=9
        )
    else:
        cfg = EngineConfig(budget=budget, interval=interval, policy=policy)
    eng = EvictionEngine(cfg, block_size=1)
    sim = foresightkv.simulate(trace, eng.policy, budget, interval, record=True, prompt_len=prompt)
    kc = [torch.zeros(length + 1, 1, h, d) for _ in range(layers)]
    vc = [torch.zeros(length + 1, 1, h, d) for _ in range(layers)]
    table = torch.arange(1, length + 1, dtype=torch.int32).unsqueeze(0)
    pos, advances = 0, 0
    for n in [prompt] + [1] * (length - prompt):
        plan = eng.begin_step([StepRequest(key=0, seq_len=pos + n, num_new=n, prefill=n > 1)])
        advances += len(plan.released)
        for layer in range(layers):
            k = t[f"layers.{layer}.keys"][pos : pos + n]
            v = t[f"layers.{layer}.values"][pos : pos + n]
            q = t[f"layers.{layer}.queries"][pos : pos + n].contiguous()
            foresightkv.reshape_and_cache(k, v, kc[layer], vc[layer], table[0, pos : pos + n].long())
            eng.attend(plan, layer, q, kc[layer], vc[layer], table, torch.empty_like(q), scale=d**-0.5)
        pos += n
    advances += len(eng.begin_step([]).released)
    victims = {}
    for rec in sim["records"]:
        victims.setdefault((rec["layer"], rec["kv_head"]), set()).update(rec["victims"])
    for layer in range(layers):
        kept = eng.kept_positions(0, layer, h)
        assert kept.shape[1] == length - eng.live_start(0)
        for kh in range(h):
            assert set(kept[kh].tolist()) == set(range(length)) - victims.get((layer, kh), set()), (layer, kh)
    assert advances > 0 and len(sim["records"]) == advances * layers * h

"""Victim choice on the device (``foresightkv.engine.victims``): for every policy, on random shapes
(requests of different lengths joining at different steps, GQA, block sizes, protect mode, repeated
evictions), the survivors the engine's batched path chooses are exactly those of the core's per-head
``Policy.choose_victims`` (the CPU reference; for ForesightKV with sampling, the core's CPU sampler
draw), and its scores are the core's ``Policy.score``; the scores compute on the ``meta`` device, so
no key, value, statistic or query is read back to the host."""

import random

import pytest
import torch
from conftest import cuda_only

import foresightkv as fkv
from foresightkv.engine import EngineConfig, EvictionBatch, EvictionEngine, StepBatch, request_rng_key
from foresightkv.engine import victims as vic
from foresightkv.errors import ShapeError

#: (engine policy, its options) for every policy that evicts.
POLICIES = [
    ("streaming_llm", {}),
    ("streaming_llm", {"sinks": 3}),
    ("h2o", {}),
    ("snapkv", {}),
    ("snapkv", {"kernel": 3}),
    ("tova", {}),
    ("rkv", {}),
    ("rkv", {"lam": 0.3, "kernel": 5}),
    ("random", {"seed": 12345678901}),
    ("foresight", {"sample": True, "seed": 2**63 + 5}),
    ("foresight", {"sample": True, "seed": 3, "temperature": 0.5}),
    ("foresight", {"sample": False}),
]

#: Policies whose scores the batched path computes in the core's exact order (bit-identical).
EXACT = ("streaming", "h2o", "random", "foresight", "foresight-top")


# one torch thread for the whole module (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _engine(policy, opts, budget, interval, bs, protect, dims, on_evict):
    layers, hq, h, d = dims
    ck = None
    if policy == "foresight":
        ck = fkv.ScorerCheckpoint.random(layers, h, hq // h, d, budget, interval, seed=11)
        opts = dict(opts, checkpoint="<in memory>")
    cfg = EngineConfig(budget=budget, interval=interval, policy=policy, protect_prompt=protect, **opts)
    return EvictionEngine(cfg, block_size=bs, checkpoint=ck, on_evict=on_evict)


def _window(batch: EvictionBatch, j: int, cache: torch.Tensor) -> torch.Tensor:
    """Rows of request ``j``'s evictable window of ``cache``, read slot by slot through its table row
    (independently of ``EvictionBatch.gather``)."""
    bs = batch.block_size
    start, end = int(batch.live_starts[j]), int(batch.seq_lens[j])
    row = batch.block_tables[j].tolist()
    return torch.stack([cache[row[p // bs], p % bs] for p in range(start, end)])


def _reference(policy, batch: EvictionBatch):
    """Per (request, KV head): the core's victims (``Policy.choose_victims``) and scores
    (``Policy.score``) on float32 host copies of the batch's inputs."""
    h, g = batch.num_kv_heads, batch.group
    out = []
    for j in range(batch.num_seqs):
        keys = _window(batch, j, batch.key_cache).float()
        values = _window(batch, j, batch.value_cache).float()
        stats = _window(batch, j, batch.stats).float()
        q = batch.queries[j, : batch.num_queries_host[j]].float()
        assert keys.shape[0] == batch.live[j]
        heads = []
        for kh in range(h):
            args = (
                keys[:, kh].contiguous(),
                values[:, kh].contiguous(),
                stats[:, kh].contiguous(),
                q[:, kh * g : (kh + 1) * g].contiguous(),
                batch.positions[j, kh, : batch.live[j]].tolist(),
                batch.lengths[j],
            )
            kw = dict(
                layer=batch.layer,
                kv_head=kh,
                eviction=batch.evictions[j],
                request=batch.requests[j],
                scale=batch.scale,
            )
            victims = policy.choose_victims(
                *args, num_protected=batch.num_protected, num_evict=batch.num_evict_host[j], **kw
            )
            heads.append((victims, policy.score(*args, **kw)))
        out.append(heads)
    return out


class Checker:
    """The ``on_evict`` hook of the test: compares the batched choice with the core's per head and
    remembers the expected kept positions; returns None, so the engine makes its own choice."""

    def __init__(self):
        self.engine = None
        self.expected = {}
        self.evictions = {}
        self.rng_keys = {}
        self.calls = 0
        self.rows = 0

    def __call__(self, batch: EvictionBatch):
        eng = self.engine
        self.calls += 1
        self.rows += batch.num_seqs
        h = batch.num_kv_heads
        weights = lambda: eng._layer_weights(batch.layer, h, batch.group, batch.key_cache.shape[3], "cpu")  # noqa: E731
        got = vic.choose_survivors(eng.policy, batch, weights=weights)
        scores = vic.policy_scores(eng.policy, batch, weights=weights)
        ref = _reference(eng.policy, batch)
        for j in range(batch.num_seqs):
            key, live, ne = batch.keys[j], batch.live[j], batch.num_evict_host[j]
            assert batch.requests[j] == self.rng_keys[key]
            assert batch.evictions[j] == self.evictions.get((key, batch.layer), 0)
            self.evictions[(key, batch.layer)] = batch.evictions[j] + 1
            kept = []
            for kh in range(h):
                victims, want_scores = ref[j][kh]
                want = [i for i in range(live) if i not in set(victims)]
                assert len(victims) == ne
                assert got[j, kh, : live - ne].tolist() == want, (eng.policy.name, j, kh)
                s, w = scores[j, kh, :live], torch.tensor(want_scores)
                if eng.policy.name in EXACT:
                    assert torch.equal(s, w)
                else:
                    torch.testing.assert_close(s, w, rtol=1e-5, atol=1e-7)
                kept.append(batch.positions[j, kh, want])
            self.expected[(key, batch.layer)] = torch.stack(kept)
        return None


def _run(policy, opts, seed, protect, steps=None):
    """Drives an engine over a random multi-request workload; checks every eviction with the hook and
    the kept positions after each layer's step."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    interval = bs * rng.randint(1, 3)
    budget = interval * rng.randint(1, 3)
    hq, h = rng.choice([(4, 2), (2, 2), (6, 3), (8, 2)])
    layers, d = 2, rng.choice([8, 16])
    check = Checker()
    eng = _engine(policy, opts, budget, interval, bs, protect, (layers, hq, h, d), check)
    check.engine = eng
    g = torch.Generator().manual_seed(seed)
    n_req = rng.randint(2, 4)
    max_len = 4 * (budget + interval) + 40
    width = -(-max_len // bs)
    num_blocks = n_req * width
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm.view(n_req, width).to(torch.int32)
    kc = [torch.randn(num_blocks, bs, h, d, generator=g) for _ in range(layers)]
    vc = [torch.randn(num_blocks, bs, h, d, generator=g) for _ in range(layers)]
    scale = d**-0.5
    joins = [rng.randint(0, 6) for _ in range(n_req)]
    prompts = [rng.randint(1, 2 * (budget + interval) + 3) for _ in range(n_req)]
    lens = [0] * n_req
    names = [f"req-{seed}-{i}" for i in range(n_req)]
    check.rng_keys = {i: request_rng_key(names[i], seed=i if i % 2 else None) for i in range(n_req)}
    steps = steps or 3 * (budget + interval)
    for step in range(steps):
        rows = [i for i in range(n_req) if joins[i] <= step and lens[i] < max_len - 1]
        new = [prompts[i] if lens[i] == 0 else 1 for i in rows]
        batch = StepBatch(
            keys=rows,
            seq_lens=[lens[i] + n for i, n in zip(rows, new)],
            num_new=new,
            prefill=[lens[i] == 0 for i in rows],
            reset=[lens[i] == 0 for i in rows],
            prompt_lens=[prompts[i] for i in rows],
            rng_keys=[check.rng_keys[i] for i in rows],
        )
        plan = eng.begin_step(batch)
        for i, n in zip(rows, new):
            lens[i] += n
        if not rows:
            continue
        table = tables[torch.tensor(rows)]
        for layer in range(layers):
            q = torch.randn(sum(new), hq, d, generator=g)
            check.expected.clear()
            eng.attend(plan, layer, q, kc[layer], vc[layer], table, torch.empty_like(q), scale=scale)
            for (key, lay), want in check.expected.items():
                kept = eng.kept_positions(key, lay, h)
                assert torch.equal(kept[:, kept.shape[1] - want.shape[1] :], want)
    return check


@pytest.mark.parametrize("protect", [False, True])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("policy,opts", POLICIES, ids=lambda x: str(x) if isinstance(x, str) else None)
def test_batched_choice_equals_the_core_per_head(policy, opts, seed, protect):
    check = _run(policy, opts, seed * 7 + (1 if protect else 0) + len(opts), protect)
    # repeated evictions of several requests, some due together in one batch
    assert check.calls > 0 and max(check.evictions.values()) >= 2


def test_some_batches_hold_several_requests():
    """The workload of the property test does batch evictions (several requests due in one call)."""
    many = 0
    for seed in range(4):
        check = _run("h2o", {}, seed, False)
        many += check.rows > check.calls
    assert many


def test_policy_params_are_the_cores_defaults():
    assert fkv.Policy.streaming_llm().params == {"sinks": 4}
    assert fkv.Policy.snapkv().params == {"kernel": 7, "window": 8}
    p = fkv.Policy.rkv().params
    assert p["kernel"] == 7 and p["window"] == 8 and p["threshold"] == 0.5
    assert torch.tensor(p["lam"], dtype=torch.float32) == torch.tensor(0.1, dtype=torch.float32)
    assert fkv.Policy.random(2**64 - 1).params == {"seed": 2**64 - 1}
    assert fkv.Policy.h2o().params == {} and fkv.Policy.tova().params == {}


def test_philox_known_answers():
    """Random123's ``kat_vectors`` (philox4x32 10) through the int64 tensor Philox."""
    kat = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for ctr, key, want in kat:
        out = vic.philox4x32_10([torch.tensor([c], dtype=torch.int64) for c in ctr], tuple(key))
        assert [int(w) for w in out] == want


def test_random_scores_are_the_cores_uniforms():
    """The random policy's scores equal ``Policy.random(seed).score`` for extreme keys."""
    for seed, request, layer, eviction in [(0, 0, 0, 0), (2**64 - 1, 2**32 - 1, 65535, 2**32 - 1), (77, 5, 3, 9)]:
        got = vic.random_scores(seed, [request], layer, [eviction], 3, 40, "cpu")
        pol = fkv.Policy.random(seed)
        for kh in range(3):
            want = pol.score(
                torch.zeros(40, 4),
                torch.zeros(40, 4),
                torch.zeros(40, 1, fkv.NUM_STATS),
                torch.zeros(1, 1, 4),
                list(range(40)),
                40,
                layer=layer,
                kv_head=kh,
                eviction=eviction,
                request=request,
            )
            assert got[0, kh].tolist() == want


def _meta_batch(s=3, h=2, g=2, d=8, ml=24, bs=4, maxq=12):
    """An ``EvictionBatch`` whose tensors are all on the ``meta`` device (no data at all)."""
    meta = "meta"
    nb = s * (-(-ml // bs)) + 1
    i32 = dict(dtype=torch.int32, device=meta)
    live = [ml, ml - 3, ml - 7]
    return EvictionBatch(
        layer=1,
        key_cache=torch.empty(nb, bs, h, d, device=meta, dtype=torch.bfloat16),
        value_cache=torch.empty(nb, bs, h, d, device=meta, dtype=torch.bfloat16),
        stats=torch.empty(nb, bs, h, g, fkv.NUM_STATS, device=meta),
        block_tables=torch.empty(s, -(-ml // bs) + 1, **i32),
        seq_lens=torch.empty(s, **i32),
        live_starts=torch.empty(s, **i32),
        num_evict=torch.empty(s, **i32),
        queries=torch.empty(s, maxq, h * g, d, device=meta, dtype=torch.bfloat16),
        num_queries=torch.empty(s, **i32),
        positions=torch.empty(s, h, ml, dtype=torch.int64, device=meta),
        live=live,
        num_evict_host=[4] * s,
        num_queries_host=[maxq, 4, 9],
        lengths=[100, 90, 80],
        evictions=[0, 3, 1],
        requests=[1, 2**32 - 1, 7],
        keys=[0, 1, 2],
        num_protected=4,
        scale=d**-0.5,
        block_size=bs,
    )


@pytest.mark.parametrize("policy,opts", [p for p in POLICIES if p[0] != "foresight"])
def test_scores_read_nothing_back_to_the_host(policy, opts):
    """Every baseline's scores compute over tensors on the ``meta`` device, where any host read
    (``.cpu()``, ``.item()``, ``.tolist()``, a data-dependent shape) raises: the batched path moves
    no K, V, statistic or query to the host."""
    pol = EngineConfig(budget=16, interval=4, policy=policy, **opts).build_policy()
    batch = _meta_batch()
    scores = vic.policy_scores(pol, batch)
    assert scores.device.type == "meta" and scores.shape == (3, 2, 24) and scores.dtype == torch.float32


def test_on_evict_survivors_are_used_and_checked():
    """A hook's survivors replace the policy's (the oldest go: a sliding window); a wrong shape is a
    ShapeError naming both shapes."""

    def oldest(batch):
        out = torch.zeros(tuple(batch.positions.shape), dtype=torch.int32)
        for j in range(batch.num_seqs):
            keep = batch.live[j] - batch.num_evict_host[j]
            out[j, :, :keep] = torch.arange(batch.num_evict_host[j], batch.live[j], dtype=torch.int32)
        return out

    eng = EvictionEngine(EngineConfig(budget=8, interval=4, policy="h2o"), block_size=1, on_evict=oldest)
    kc, vc = torch.randn(64, 1, 2, 8), torch.randn(64, 1, 2, 8)
    table = torch.arange(64, dtype=torch.int32).unsqueeze(0)
    for n in [5] + [1] * 20:
        ln = (eng._planner.state(0) or (0, 0))[1] + n
        plan = eng.begin_step(StepBatch([0], [ln], [n], [n > 1], [n == 5]))
        q = torch.randn(n, 4, 8)
        eng.attend(plan, 0, q, kc, vc, table, torch.empty_like(q), scale=0.3)
    kept = eng.kept_positions(0, 0, 2)
    assert torch.equal(kept, torch.arange(25 - kept.shape[1], 25).expand(2, -1))

    eng = EvictionEngine(
        EngineConfig(budget=8, interval=4, policy="h2o"),
        block_size=1,
        on_evict=lambda b: torch.zeros(1, 1, 1, dtype=torch.int32),
    )
    with pytest.raises(ShapeError, match="on_evict"):
        for n in [12, 1]:
            ln = (eng._planner.state(0) or (0, 0))[1] + n
            plan = eng.begin_step(StepBatch([0], [ln], [n], [n > 1], [n == 12]))
            q = torch.randn(n, 4, 8)
            eng.attend(plan, 0, q, kc, vc, table, torch.empty_like(q), scale=0.3)


@cuda_only
@pytest.mark.parametrize("policy,opts", POLICIES)
def test_cuda_eviction_moves_nothing_to_the_host(policy, opts):
    """On CUDA, the eviction of a layer issues no device-to-host copy and no scalar read of a CUDA
    tensor through torch (counted with a TorchDispatchMode), and keeps what the CPU step keeps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            ins = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            from_cuda = any(t.is_cuda for t in ins)
            outs = out if isinstance(out, (tuple, list)) else [out]
            to_host = any(isinstance(o, torch.Tensor) and not o.is_cuda and o.device.type != "meta" for o in outs)
            if func is torch.ops.aten._local_scalar_dense.default and from_cuda:
                self.reads.append(str(func))
            elif from_cuda and to_host:
                self.reads.append(str(func))
            return out

    layers, hq, h, d, bs, budget, interval = 1, 4, 2, 16, 4, 16, 8
    results, counted = [], []
    for device in ("cpu", "cuda"):
        eng = _engine(policy, opts, budget, interval, bs, False, (layers, hq, h, d), None)
        if device == "cuda":
            evict = eng._evict

            def watched(*args, evict=evict):
                with Count() as c:
                    evict(*args)
                counted.append(c.reads)

            eng._evict = watched
        g = torch.Generator().manual_seed(0)
        kc = torch.randn(40, bs, h, d, generator=g).to(device)
        vc = torch.randn(40, bs, h, d, generator=g).to(device)
        tables = torch.arange(40, dtype=torch.int32).view(2, 20).to(device)
        lens = [0, 0]
        for step in range(30):
            new = [30, 27] if step == 0 else [1, 1]
            lens = [a + b for a, b in zip(lens, new)]
            plan = eng.begin_step(StepBatch([0, 1], list(lens), new, [step == 0] * 2, [step == 0] * 2))
            q = torch.randn(sum(new), hq, d, generator=g).to(device)
            eng.attend(plan, 0, q, kc, vc, tables, torch.empty_like(q), scale=d**-0.5)
        results.append([eng.kept_positions(k, 0, h) for k in (0, 1)])
    assert counted and all(r == [] for r in counted), counted
    for a, b in zip(*results):
        assert torch.equal(a, b)

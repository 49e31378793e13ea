"""The engine-neutral step (``foresightkv.engine.EvictionEngine``) on CPU: chunked prefill independent
of the chunking, the bounded query rings (streaming fold) against one ``window_stats`` call over every
query, the lower-right causal prefill attention against the explicit mask it replaces, and the start-up
reservation and its typed refusal."""

import pytest
import torch
import torch.nn.functional as F

import foresightkv as fkv
from foresightkv.engine import EngineConfig, EvictionEngine, StepRequest
from foresightkv.engine.step import _causal_attention

HKV, G, D, BS = 2, 2, 16, 4
LAYERS = 2


def _checkpoint_config(tmp_path, head_dim=D, **kw):
    ck = fkv.ScorerCheckpoint.random(LAYERS, HKV, G, head_dim, kw.get("budget", 16), kw.get("interval", 8), seed=3)
    path = tmp_path / "ck"
    ck.save(path)
    return EngineConfig(policy="foresight", checkpoint=str(path), **kw)


class Rig:
    """One request through an engine over a paged cache of block size ``BS``, with K, V and queries
    of every position fixed in advance (so two rigs given the same tensors see the same model), on
    ``device`` (the tensors are drawn on the CPU, then moved: a CUDA rig sees a CPU rig's model)."""

    def __init__(self, config, total, seed=0, ring=None, device="cpu", head_dim=D):
        self.engine = EvictionEngine(config, block_size=BS)
        if ring is not None:
            self.engine.ring = ring
        gen = torch.Generator().manual_seed(seed)
        d, self.device = head_dim, device
        self.q = torch.randn(total, HKV * G, d, generator=gen).to(device)
        self.k = torch.randn(LAYERS, total, HKV, d, generator=gen).to(device)
        self.v = torch.randn(LAYERS, total, HKV, d, generator=gen).to(device)
        nb = -(-total // BS) + 2
        self.caches = [
            (torch.zeros(nb, BS, HKV, d, device=device), torch.zeros(nb, BS, HKV, d, device=device)) for _ in range(LAYERS)
        ]
        self.table = torch.arange(nb, dtype=torch.int32, device=device).view(1, nb)
        self.stats = [torch.zeros(nb, BS, HKV, G, 8, device=device) for _ in range(LAYERS)]
        self.len = 0

    def step(self, n, prefill, prompt_len=None):
        """Adds ``n`` tokens as one row; returns the attention output ``[LAYERS, n, Hq, D]``."""
        s, e = self.len, self.len + n
        plan = self.engine.begin_step([StepRequest(0, e, n, prefill, reset=s == 0, prompt_len=prompt_len)])
        outs = []
        for layer in range(LAYERS):
            kc, vc = self.caches[layer]
            fkv.reshape_and_cache(
                self.k[layer, s:e].contiguous(), self.v[layer, s:e].contiguous(), kc, vc,
                torch.arange(s, e, device=self.device),
            )
            out = torch.empty(n, HKV * G, self.q.shape[-1], device=self.device)
            self.engine.attend(
                plan, layer, self.q[s:e].contiguous(), kc, vc, self.table, out, scale=0.25, stats=self.stats[layer]
            )
            outs.append(out)
        self.len = e
        return torch.stack(outs)

    def kept(self):
        return [self.engine.kept_positions(0, layer, HKV) for layer in range(LAYERS)]


POLICY_CONFIGS = {
    "h2o": dict(policy="h2o"),
    "snapkv": dict(policy="snapkv"),
    "random": dict(policy="random", seed=5),
}


def _config(name, tmp_path, head_dim=D, **kw):
    if name.startswith("foresight"):
        return _checkpoint_config(
            tmp_path, head_dim=head_dim, budget=16, interval=8, sample=name == "foresight_sample", **kw
        )
    return EngineConfig(budget=16, interval=8, **POLICY_CONFIGS[name], **kw)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "random", "foresight_topl", "foresight_sample"])
def test_a_prompt_in_three_chunks_gives_what_one_chunk_gives(name, tmp_path):
    """The method compresses once, after the whole prompt: with the prompt's length given, the kept
    positions and every output match a single-chunk prefill, whatever the chunking."""
    prompt, decode = 45, 14
    one = Rig(_config(name, tmp_path), prompt + decode)
    three = Rig(_config(name, tmp_path), prompt + decode)
    out_one = one.step(prompt, True, prompt_len=prompt)
    out_three = torch.cat(
        [three.step(20, True, prompt_len=prompt), three.step(13, True, prompt_len=prompt), three.step(12, True)], dim=1
    )
    assert torch.allclose(out_three, out_one, atol=1e-5, rtol=1e-5)
    for _ in range(decode):
        a, b = one.step(1, False), three.step(1, False)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        for ka, kb in zip(one.kept(), three.kept()):
            assert torch.equal(ka, kb)
    assert one.engine.evictions(0) >= 2
    for sa, sb in zip(one.stats, three.stats):
        assert torch.allclose(sa, sb, atol=1e-6)


@pytest.mark.parametrize("name", ["h2o", "random", "foresight_topl", "foresight_sample"])
@pytest.mark.parametrize("protect", [False, True])
def test_bounded_rings_give_what_every_query_gives(name, protect, tmp_path):
    """A ring of ``max(L, 8)`` queries per request (older ones folded into the statistics as they
    leave it) gives bit for bit the statistics, kept positions and outputs of keeping every query
    since the last eviction (a ring deep enough never to fold: the unbounded buffer it replaces)."""
    cfg = _config(name, tmp_path, protect_prompt=protect)
    total = 130
    bounded, unbounded = Rig(cfg, total, seed=1), Rig(cfg, total, seed=1, ring=1024)
    assert bounded.engine.ring == 8
    # A prompt shorter than the budget: the first eviction reads B + L queries (24, 16 folded).
    for rig in (bounded, unbounded):
        rig.step(5, True, prompt_len=5)
    compared = 0
    for _ in range(total - 5):
        done = bounded.engine.evictions(0)
        a, b = bounded.step(1, False), unbounded.step(1, False)
        assert torch.equal(a, b)
        for ka, kb in zip(bounded.kept(), unbounded.kept()):
            assert torch.equal(ka, kb)
        if bounded.engine.evictions(0) > done:
            # Right after an eviction (between evictions the sum column holds the running fold).
            for sa, sb in zip(bounded.stats, unbounded.stats):
                assert torch.equal(sa, sb)
            compared += 1
    assert compared >= 5


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_window_stats_streaming_fold_is_one_call(mode):
    """Fold-only calls over the oldest rows, then the eviction's call over the rest, write bit for bit
    what one call over every row writes (the running fold continues in the same row order)."""
    gen = torch.Generator().manual_seed(4)
    nb, n, live, hq = 20, 37, 60, HKV * G
    kc = torch.randn(nb, BS, HKV, D, generator=gen)
    table = torch.randperm(nb, generator=gen)[: -(-live // BS)].int().view(1, -1)
    q = torch.randn(1, n, hq, D, generator=gen)
    old = torch.rand(nb, BS, HKV, G, 8, generator=gen)
    start = torch.tensor([0], dtype=torch.int32)
    one = old.clone()
    fkv.window_stats(
        q, torch.tensor([n], dtype=torch.int32), kc, table, torch.tensor([live], dtype=torch.int32), start, one,
        window=8, mode=mode,
    )
    streamed = old.clone()
    done = 0
    for cut in (9, 21, 29):
        fkv.window_stats(
            q[:, done:cut].contiguous(), torch.tensor([cut - done], dtype=torch.int32), kc, table,
            torch.tensor([live - n + cut], dtype=torch.int32), start, streamed, window=8, mode=mode,
            folded=torch.tensor([done], dtype=torch.int32), fold_only=True,
        )
        done = cut
    fkv.window_stats(
        q[:, done:].contiguous(), torch.tensor([n - done], dtype=torch.int32), kc, table,
        torch.tensor([live], dtype=torch.int32), start, streamed, window=8, mode=mode,
        folded=torch.tensor([done], dtype=torch.int32),
    )
    assert torch.equal(streamed, one)
    with pytest.raises(fkv.InvalidArgumentError, match="folded"):
        fkv.window_stats(
            q, torch.tensor([n], dtype=torch.int32), kc, table, torch.tensor([live], dtype=torch.int32), start,
            streamed, folded=torch.tensor([live - n + 1], dtype=torch.int32),
        )


@pytest.mark.parametrize("n,live,hq,h", [(5, 23, 4, 2), (7, 7, 4, 1), (1, 9, 2, 2), (12, 40, 8, 2)])
def test_lower_right_causal_prefill_equals_the_masked_attention(n, live, hq, h):
    """The lower-right causal bias gives what the explicit boolean mask with GQA (the math kernel) gave."""
    gen = torch.Generator().manual_seed(n + live)
    q = torch.randn(n, hq, D, generator=gen)
    k = torch.randn(live, h, D, generator=gen)
    v = torch.randn(live, h, D, generator=gen)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    mask = torch.arange(live).unsqueeze(0) <= torch.arange(n).unsqueeze(1) + (live - n)
    want = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=0.3, enable_gqa=hq != h)
    got = _causal_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.3)[0]
    assert torch.allclose(got, want.squeeze(0).transpose(0, 1), atol=1e-6, rtol=1e-5)
    # rows batched together give each row's own attention
    q2, k2, v2 = torch.randn(n, hq, D, generator=gen), torch.randn(live, h, D, generator=gen), torch.randn(live, h, D, generator=gen)
    both = _causal_attention(torch.stack([q, q2]), torch.stack([k, k2]), torch.stack([v, v2]), 0.3)
    assert torch.allclose(both[0], got, atol=1e-6, rtol=1e-5)
    assert torch.allclose(both[1], _causal_attention(q2[None], k2[None], v2[None], 0.3)[0], atol=1e-6, rtol=1e-5)


def test_reserve_sizes_the_rings_and_refuses_more_requests():
    """``reserve`` allocates every layer's ring at start-up and returns its bytes; a forward with more
    requests holding state than reserved is refused with CapacityError, and nothing changed."""
    engine = EvictionEngine(EngineConfig(budget=16, interval=8, policy="h2o"), block_size=BS)
    got = engine.reserve(max_requests=3, layers=LAYERS, num_q_heads=HKV * G, head_dim=D, dtype=torch.float16, device="cpu")
    assert got == LAYERS * 3 * 8 * HKV * G * D * 2 == engine.reserved_bytes()
    engine.begin_step([StepRequest(k, 4, 4, True) for k in range(3)])
    with pytest.raises(fkv.CapacityError, match="3 request slots"):
        engine.begin_step([StepRequest(k, 5, 1, False) for k in range(3)] + [StepRequest(9, 4, 4, True)])
    assert sorted(engine.keys()) == [0, 1, 2]
    engine.release(1)
    engine.begin_step([StepRequest(9, 4, 4, True)])
    assert sorted(engine.keys()) == [0, 2, 9]
    assert EvictionEngine(EngineConfig(budget=16, interval=8, policy="full_cache"), block_size=BS).reserve(
        max_requests=3, layers=2, num_q_heads=4, head_dim=D, dtype=torch.float16, device="cpu"
    ) == 0


def test_adopted_rings_are_used_in_place_bounded_or_grown():
    """``adopt_rings`` takes rings the caller allocated (vLLM: at model construction): the step
    records its queries into those very tensors; bound, a forward past their slots is refused with
    CapacityError; unbound (Model Runner V2), the ring grows past them on demand; a ring of the
    wrong shape, dtype or device is refused naming both."""
    cfg = EngineConfig(budget=16, interval=8, policy="h2o")
    shape = (2, 8, HKV * G, D)

    def step(engine, keys):
        k, v = torch.randn(8, BS, HKV, D), torch.randn(8, BS, HKV, D)
        plan = engine.begin_step([StepRequest(key, 4, 4, True) for key in keys])
        tables = torch.arange(len(keys), dtype=torch.int32).view(-1, 1)
        q = torch.randn(4 * len(keys), HKV * G, D)
        engine.attend(plan, 0, q, k, v, tables, torch.empty_like(q), scale=0.25)
        return q

    rings = {0: torch.zeros(shape)}
    engine = EvictionEngine(cfg, block_size=BS)
    engine.adopt_rings(rings, max_requests=2, num_q_heads=HKV * G, head_dim=D, dtype=torch.float32, device="cpu")
    q = step(engine, [0, 1])
    assert engine._rings[0] is rings[0] and engine.reserved_bytes() == rings[0].numel() * 4
    assert torch.equal(rings[0][1, :4], q[4:8])  # slot 1's first four queries, in place
    with pytest.raises(fkv.CapacityError):
        step(engine, [0, 1, 2])
    free = EvictionEngine(cfg, block_size=BS)
    free.adopt_rings({0: torch.zeros(shape)}, max_requests=2, num_q_heads=HKV * G, head_dim=D,
                     dtype=torch.float32, device="cpu", bound=False)
    step(free, [0, 1, 2])
    assert free._rings[0].shape[0] >= 3
    with pytest.raises(fkv.ShapeError, match=r"layer 0 is \(2, 8, 4, 16\) torch.float16 on cpu"):
        EvictionEngine(cfg, block_size=BS).adopt_rings(
            {0: torch.zeros(shape, dtype=torch.float16)}, max_requests=2, num_q_heads=HKV * G, head_dim=D,
            dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("seed", range(6))
def test_kept_positions_over_random_batched_steps(seed):
    """Many requests in one engine, random steps (new prompts of 1-40 tokens, decodes, releases,
    resets that start a request over), victims chosen at random through the ``on_evict`` hook. At
    every eviction the positions the engine hands the hook (batched for all due requests) are, per
    request and head, those it kept at its previous eviction then the tokens written since (all of
    ``[0, len)`` before its first), -1 past its live count; after every step ``kept_positions`` and
    ``evictions`` agree with that per-request model, and a released or reset request starts fresh."""
    import random

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    budget, interval, max_len, max_keys = 16, 8, 96, 60
    blocks = -(-max_len // BS)
    ref = {}  # (key, layer) -> (kept [H, n] positions, length they run to)
    evictions = {}  # key -> evictions of layer 0
    counts = {"evictions": 0}

    def hook(batch):
        out = torch.zeros(tuple(batch.positions.shape), dtype=torch.int32)
        # the host mirrors the kernels read instead of the device arrays are those arrays
        assert torch.equal(batch.seq_lens_host, batch.seq_lens.cpu())
        assert torch.equal(batch.live_starts_host, batch.live_starts.cpu())
        assert batch.num_evict_host == batch.num_evict.tolist()
        for j, key in enumerate(batch.keys):
            live, end = batch.live[j], batch.lengths[j]
            kept = ref.get((key, batch.layer))
            want = torch.arange(end - live, end).expand(HKV, -1) if kept is None else torch.cat(
                [kept[0], torch.arange(kept[1], end).expand(HKV, -1)], dim=1
            )
            assert torch.equal(batch.positions[j, :, :live], want), (key, batch.layer)
            assert bool((batch.positions[j, :, live:] == -1).all())
            n, k = live - batch.num_protected, batch.num_evict_host[j]
            rows = []
            for kh in range(HKV):
                gone = set(rng.sample(range(n), k))
                keep = [i for i in range(live) if i not in gone]
                out[j, kh, : len(keep)] = torch.tensor(keep, dtype=torch.int32)
                rows.append(want[kh, keep])
            ref[(key, batch.layer)] = (torch.stack(rows), end)
            if batch.layer == 0:
                evictions[key] = evictions.get(key, 0) + 1
                counts["evictions"] += 1
        return out

    engine = EvictionEngine(EngineConfig(budget=budget, interval=interval, policy="h2o"), block_size=BS, on_evict=hook)
    caches = [(torch.zeros(max_keys * blocks, BS, HKV, D), torch.zeros(max_keys * blocks, BS, HKV, D)) for _ in range(LAYERS)]
    stats = [torch.zeros(max_keys * blocks, BS, HKV, G, 8) for _ in range(LAYERS)]
    lengths = {}  # live requests: key -> length
    next_key, due_batches = 0, 0
    for _ in range(120):
        for key in [k for k in lengths if rng.random() < 0.05]:  # finished
            engine.release(key)
            del lengths[key]
            for layer in range(LAYERS):
                ref.pop((key, layer), None)
            evictions.pop(key, None)
        reqs = []
        for key in list(lengths):
            if lengths[key] >= max_len - 1 or rng.random() < 0.2:
                continue  # not scheduled this step
            if rng.random() < 0.04:  # recomputed from scratch (a preemption)
                n = rng.randint(1, 40)
                reqs.append(StepRequest(key, n, n, True, reset=True))
                for layer in range(LAYERS):
                    ref.pop((key, layer), None)
                evictions.pop(key, None)
            else:
                reqs.append(StepRequest(key, lengths[key] + 1, 1, False))
        while next_key < max_keys and len(lengths) + sum(1 for r in reqs if r.key not in lengths) < 14 and rng.random() < 0.6:
            n = rng.randint(1, 40)
            reqs.append(StepRequest(next_key, n, n, True, reset=True))
            next_key += 1
        if not reqs:
            continue
        plan = engine.begin_step(reqs)
        due_batches += sum(1 for t in plan.field("evict_to") if t >= 0) > 1
        table = torch.stack([torch.arange(r.key * blocks, (r.key + 1) * blocks, dtype=torch.int32) for r in reqs])
        slots = torch.cat([torch.arange(r.key * blocks * BS + r.seq_len - r.num_new, r.key * blocks * BS + r.seq_len) for r in reqs])
        total = sum(r.num_new for r in reqs)
        for layer in range(LAYERS):
            kc, vc = caches[layer]
            k, v = torch.randn(total, HKV, D, generator=gen), torch.randn(total, HKV, D, generator=gen)
            fkv.reshape_and_cache(k, v, kc, vc, slots)
            out = torch.empty(total, HKV * G, D)
            q = torch.randn(total, HKV * G, D, generator=gen)
            engine.attend(plan, layer, q, kc, vc, table, out, scale=0.25, stats=stats[layer])
        for r in reqs:
            lengths[r.key] = r.seq_len
        for key, length in lengths.items():
            assert engine.evictions(key) == evictions.get(key, 0), key
            for layer in range(LAYERS):
                kept = ref.get((key, layer))
                want = torch.arange(0, length).expand(HKV, -1) if kept is None else torch.cat(
                    [kept[0], torch.arange(kept[1], length).expand(HKV, -1)], dim=1
                )
                assert torch.equal(engine.kept_positions(key, layer, HKV), want), (key, layer)
    assert counts["evictions"] > 20 and due_batches > 3  # evictions of several requests at once

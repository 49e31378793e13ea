"""The trainer's math against definitions: the ranking loss against a brute-force pair loop, the
torch scorer against the core's scorer and under gradcheck, the Plackett-Luce log-probability
against enumeration of the sampler's draws, the GRPO advantages and clipped objective against
hand-computed values, and the reward against its definition."""

import itertools
import math

import foresightkv as fkv
import pytest
import torch
from foresightkv.train import losses
from foresightkv.train.scorer import TorchScorer, features, mlp_rows


def brute_hinge(scores, oracle, mask, margin):
    rows = []
    for s, o, m in zip(scores.tolist(), oracle.tolist(), mask.tolist()):
        terms = []
        for i in range(len(s)):
            for j in range(len(s)):
                if m[i] and m[j] and o[i] > o[j]:
                    terms.append(max(0.0, margin - (s[i] - s[j])))
        if terms:
            rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows) if rows else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_hinge_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(5, 9, generator=g, dtype=torch.float64) * 0.02
    oracle = torch.randint(0, 4, (5, 9), generator=g).double()  # ties on purpose
    mask = torch.rand(5, 9, generator=g) > 0.2
    mask[3] = False
    mask[3, 0] = True  # a row with one candidate: no pair, skipped
    got = losses.pairwise_hinge(scores, oracle, mask, margin=0.01).item()
    assert got == pytest.approx(brute_hinge(scores, oracle, mask, 0.01), rel=1e-12, abs=1e-15)


def test_pairwise_hinge_sampled_pairs_converge_to_exact():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 200, generator=g, dtype=torch.float64) * 0.05
    oracle = torch.randn(3, 200, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 200, dtype=torch.bool)
    mask[1, 150:] = False
    exact = brute_hinge(scores, oracle, mask, 0.01)
    # 200^2 = 40000 pairs per row > max_pairs: sampled
    est = losses.pairwise_hinge(scores, oracle, mask, margin=0.01, max_pairs=39_999, generator=g).item()
    assert est != exact
    assert est == pytest.approx(exact, rel=0.02)
    small = losses.pairwise_hinge(scores, oracle, mask, margin=0.01, max_pairs=500, generator=g).item()
    assert small != est and small == pytest.approx(exact, rel=0.2)


def test_top_overlap_counts_golden_victims_in_top_l():
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0, 9.0]])
    victims = torch.tensor([[0, 3], [4, 3]])
    mask = torch.tensor([[True] * 5, [True, True, True, True, False]])
    assert losses.top_overlap(scores, victims, mask).tolist() == [0.5, 0.5]


def test_torch_scorer_equals_the_core_scorer_on_random_inputs():
    nl, h, gsz, d, n = 2, 3, 2, 8, 17
    ck = fkv.ScorerCheckpoint.random(nl, h, gsz, d, 32, 8, seed=11, std=0.4)
    m = TorchScorer.from_checkpoint(ck)
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(h, n, d, generator=gen)
    values = torch.randn(h, n, d, generator=gen)
    stats = torch.rand(h, n, gsz, 8, generator=gen) * 3
    queries = torch.randn(4, h * gsz, d, generator=gen)
    pol = fkv.Policy.foresight(ck, sample=False)
    for layer in range(nl):
        ours = m.score_layer(layer, features(keys, values, stats))
        for kh in range(h):
            core = pol.score(
                keys[kh].contiguous(), values[kh].contiguous(), stats[kh].contiguous(),
                queries[:, kh * gsz:(kh + 1) * gsz].contiguous(), list(range(n)), n, layer=layer, kv_head=kh,
            )
            assert torch.allclose(ours[kh], torch.tensor(core), atol=2e-5, rtol=1e-5)


def test_scorer_gradcheck_float64():
    """Gradients of the scorer with respect to its inputs and all four weight tensors."""
    m = TorchScorer(2, 2, 1, 3, seed=1).double()
    mean = torch.randn(2, 2, m.in_dim, dtype=torch.float64)
    scale = torch.rand(2, 2, m.in_dim, dtype=torch.float64) + 0.5
    x = torch.randn(3, 4, m.in_dim, dtype=torch.float64, requires_grad=True)
    layer, head = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])
    params = [p.detach().clone().requires_grad_(True) for p in (m.w1, m.b1, m.w2, m.b2)]

    def f(x, w1, b1, w2, b2):
        return mlp_rows(x, layer, head, w1, b1, w2, b2, mean, scale)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)
    m.set_normalizer(mean, scale)
    assert torch.allclose(m.score(x, layer, head), f(x, *params))


def test_saved_scorer_reloads_through_the_core_and_scores_identically(tmp_path):
    m = TorchScorer(3, 2, 2, 4, seed=5)
    gen = torch.Generator().manual_seed(9)
    m.set_normalizer(torch.randn(3, 2, m.in_dim, generator=gen), torch.rand(3, 2, m.in_dim, generator=gen) + 0.1)
    ck = m.save(tmp_path / "sc", budget=16, interval=4, extra={"seed": 5})
    assert ck.config["budget"] == 16 and ck.config["interval"] == 4
    again = fkv.ScorerCheckpoint.load(tmp_path / "sc")
    ck.check_model(3, 2, 2, 4)
    keys, values = torch.randn(2, 10, 4, generator=gen), torch.randn(2, 10, 4, generator=gen)
    stats = torch.rand(2, 10, 2, 8, generator=gen)
    pol = fkv.Policy.foresight(again, sample=False)
    x = features(keys, values, stats)
    for layer in range(3):
        ours = m.score_layer(layer, x).detach()
        back = TorchScorer.from_checkpoint(again).score_layer(layer, x).detach()
        assert torch.allclose(ours, back, atol=1e-5, rtol=1e-5)
        for kh in range(2):
            core = pol.score(keys[kh].contiguous(), values[kh].contiguous(), stats[kh].contiguous(),
                             torch.randn(2, 2, 4), list(range(10)), 10, layer=layer, kv_head=kh)
            assert torch.allclose(ours[kh], torch.tensor(core), atol=1e-4, rtol=1e-4)
    with pytest.raises(fkv.ConfigError):
        again.check_model(3, 2, 2, 8)


def test_restandardize_keeps_every_score_and_sets_the_normaliser():
    """A scorer loaded from a checkpoint (identity normaliser) re-standardised with feature statistics
    scores every input as before, holds the new mean/scale (the first layer then sees inputs of mean 0
    and std 1) and exports the same checkpoint weights."""
    gen = torch.Generator().manual_seed(4)
    m = TorchScorer(2, 2, 2, 4, seed=3).double()
    m.set_normalizer(torch.randn(2, 2, m.in_dim, generator=gen).double(), (torch.rand(2, 2, m.in_dim, generator=gen) + 0.2).double())
    x = (torch.randn(2, 7, m.in_dim, generator=gen) * 50 + 3).double()
    before = [m.score_layer(layer, x).detach() for layer in range(2)]
    folded = m.folded()
    mean = x.mean(1).unsqueeze(0).expand(2, -1, -1).contiguous()
    scale = x.std(1).unsqueeze(0).expand(2, -1, -1).contiguous()
    m.restandardize(mean, scale)
    assert torch.equal(m.mean, mean) and torch.equal(m.scale, scale)
    for layer in range(2):
        assert torch.allclose(m.score_layer(layer, x).detach(), before[layer], atol=1e-9, rtol=1e-9)
    for k, v in m.folded().items():
        assert torch.allclose(v, folded[k], atol=1e-5, rtol=1e-5)
    # the standardised inputs of the first layer have mean 0 and std 1 over these candidates
    z = (x - m.mean[0].unsqueeze(1)) / m.scale[0].unsqueeze(1)
    assert torch.allclose(z.mean(1), torch.zeros_like(z.mean(1)), atol=1e-9)
    assert torch.allclose(z.std(1), torch.ones_like(z.std(1)), atol=1e-9)


def test_plackett_luce_equals_enumeration_of_the_core_sampler():
    """The log-probability of each ordered draw equals its frequency under the core's sampler, and
    the probabilities of all ordered draws from the pool sum to one."""
    scores = [0.3, -1.0, 1.2, 0.0, 0.9, 2.0, -0.4]  # slot 6 is protected (num_protected = 1)
    n_evict, prot = 2, 1
    counts = {}
    trials = 6000
    pool = None
    for r in range(trials):
        pool, order = fkv.evict.sample_victims(scores, num_protected=prot, num_evict=n_evict, seed=123, request=r, layer=1, head=0, eviction=2)
        counts[tuple(order)] = counts.get(tuple(order), 0) + 1
    assert pool == sorted(sorted(range(6), key=lambda i: -scores[i])[: 2 * n_evict])
    ps = torch.tensor([scores[i] for i in pool], dtype=torch.float64).unsqueeze(0)
    total = 0.0
    for perm in itertools.permutations(range(len(pool)), n_evict):
        lp = losses.plackett_luce_logprobs(ps, torch.tensor([perm])).sum().item()
        # by hand: sequential softmax without replacement
        z = [math.exp(s) for s in ps[0].tolist()]
        hand, rest = 1.0, sum(z)
        for k in perm:
            hand *= z[k] / rest
            rest -= z[k]
        assert math.exp(lp) == pytest.approx(hand, rel=1e-12)
        total += hand
        freq = counts.get(tuple(pool[k] for k in perm), 0) / trials
        assert abs(freq - hand) < 4 * math.sqrt(hand * (1 - hand) / trials) + 1e-3
    assert total == pytest.approx(1.0, rel=1e-12)


def test_sample_victims_agrees_with_the_policy_sampler():
    ck = fkv.ScorerCheckpoint.random(2, 1, 1, 2, 8, 2, seed=2, std=1.0)
    pol = fkv.Policy.foresight(ck, seed=77)
    g = torch.Generator().manual_seed(0)
    keys, values, stats = torch.randn(12, 2, generator=g), torch.randn(12, 2, generator=g), torch.rand(12, 1, 8, generator=g)
    q = torch.randn(3, 1, 2, generator=g)
    scores = pol.score(keys, values, stats, q, list(range(12)), 12, layer=1, kv_head=0)
    for ev in range(5):
        want = pol.choose_victims(keys, values, stats, q, list(range(12)), 12, num_protected=3, num_evict=3,
                                  layer=1, kv_head=0, eviction=ev, request=4)
        _, order = fkv.evict.sample_victims(scores, num_protected=3, num_evict=3, seed=77, request=4, layer=1, head=0, eviction=ev)
        assert sorted(order) == want


def test_group_advantages_and_clipped_objective_by_hand():
    r = torch.tensor([-4.0, 0.0, -1.0, -3.0], dtype=torch.float64)
    mean, std = -2.0, math.sqrt((4 + 4 + 1 + 1) / 4)
    adv = losses.group_advantages(r)
    assert adv.tolist() == pytest.approx([(x - mean) / (std + 1e-8) for x in r.tolist()], rel=1e-12)
    # two trajectories x two draws; ratios 1.5 (clipped for A > 0), 0.5 (clipped for A < 0), 1.0, 1.1
    old = torch.zeros(2, 2, dtype=torch.float64)
    new = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.1]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[1.0, 2.0], [1.0, 1.0]], dtype=torch.float64))
    a = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    t = losses.grpo_objective(new, old, ref, a, clip_eps=0.2, kl_weight=0.05)
    # -min(rA, clip(r)A): [1.5*1 vs 1.2*1 -> 1.2], [1*1 -> 1], [0.5*-2=-1 vs 0.8*-2=-1.6 -> -1.6], [1.1*-2=-2.2 vs -2.2]
    policy = -(1.2 + 1.0 - 1.6 - 2.2) / 4
    kl = [(1 / 1.5) - math.log(1 / 1.5) - 1, 2 - math.log(2) - 1, 2 - math.log(2) - 1, (1 / 1.1) - math.log(1 / 1.1) - 1]
    assert t.policy.item() == pytest.approx(policy, rel=1e-12)
    assert t.kl.item() == pytest.approx(sum(kl) / 4, rel=1e-12)
    assert t.loss.item() == pytest.approx(policy + 0.05 * sum(kl) / 4, rel=1e-12)
    assert t.clip_fraction.item() == pytest.approx(0.5)
    # gradient of the clipped terms is zero, of the unclipped ones A * ratio / N
    new.requires_grad_(True)
    losses.grpo_objective(new, old, ref, a, clip_eps=0.2, kl_weight=0.0).loss.backward()
    assert new.grad.flatten().tolist() == pytest.approx([0.0, -1.0 / 4, 0.0, 2.0 * 1.1 / 4], rel=1e-12)


def test_reward_is_minus_squared_large_increases_on_low_entropy_tokens():
    ce_full = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    ce = ce_full + torch.tensor([2.0, 1.0, 3.0, 0.0, 1.6, 0.0, 0.0, 0.0, 0.0, 5.0])
    entropy = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])  # token 9 and 8 are the top 20 %
    got = losses.low_entropy_reward(ce, ce_full, entropy).item()
    assert got == pytest.approx(-(2.0**2 + 3.0**2 + 1.6**2), rel=1e-5)


def test_schedules():
    assert losses.kl_schedule(0, 100) == 0.05 and losses.kl_schedule(40, 100) == 0.0
    assert losses.kl_schedule(20, 100) == pytest.approx(0.025)
    assert losses.warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert losses.warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert losses.warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert losses.warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_plackett_luce_when_every_pool_entry_is_drawn():
    """Pool of exactly L: the set has probability 1, the order does not; gradients stay finite."""
    s = torch.tensor([[0.5, -0.2, 1.0]], dtype=torch.float64, requires_grad=True)
    order = torch.tensor([[2, 0, 1]])
    lp = losses.plackett_luce_logprobs(s, order)
    z = [math.exp(v) for v in (1.0, 0.5, -0.2)]
    hand = [math.log(z[0] / sum(z)), math.log(z[1] / (z[1] + z[2])), 0.0]
    assert lp[0].tolist() == pytest.approx(hand, abs=1e-12)
    lp.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_grpo_raises_the_expected_reward_of_a_toy_eviction_problem():
    """The whole RL stage (``train_rl``: the core's sampler, Plackett-Luce log-probabilities, group
    advantages, the clipped objective, Adam) on a problem whose answer is known: evicting a candidate
    whose first feature is positive costs 1. The policy's expected reward, estimated by 200 fresh
    sampled evictions, goes from what a random scorer gets to nearly 0."""
    from foresightkv.evict import sample_victims
    from foresightkv.train.rl import Decision, RlConfig, Trajectory, train_rl

    torch.manual_seed(0)
    sc = TorchScorer(1, 1, 1, 4, seed=0)
    xs = [torch.randn(1, 16, sc.in_dim) for _ in range(8)]
    cost = [(x[0, :, 0] > 0).float() for x in xs]

    def rollout(scorer, items, seed):
        out = []
        for ti, req in items:
            with torch.no_grad():
                s = scorer.score_layer(0, xs[ti]).float()
            pool, order = sample_victims(s[0].tolist(), num_protected=0, num_evict=4, seed=seed, request=req,
                                         layer=0, head=0, eviction=0, temperature=1.0)
            where = {c: i for i, c in enumerate(pool)}
            pool_t = torch.tensor([pool])
            xp = torch.gather(xs[ti], 1, pool_t.unsqueeze(2).expand(-1, -1, sc.in_dim))
            d = Decision(0, xp, torch.tensor([[where[v] for v in order]]), pool_t, None)
            out.append(Trajectory([d], -float(sum(cost[ti][v] for v in order))))
        return out

    def expected_reward(scorer):
        return sum(rollout(scorer, [(k % 8, 10**6 + k)], 123)[0].reward for k in range(200)) / 200

    before = expected_reward(sc)
    cfg = RlConfig(steps=60, group=8, traces_per_step=4, lr=1e-2, warmup=2, kl_start=0.0, ppo_epochs=2)
    hist = train_rl(sc, 8, rollout, cfg, progress=False)
    after = expected_reward(sc)
    assert before < -1.5 and after > -0.25, (before, after)
    assert hist[-1]["reward_mean"] > hist[0]["reward_mean"]

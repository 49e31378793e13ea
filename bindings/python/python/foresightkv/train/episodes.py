"""The trainer's two uses of the eviction simulator (``foresightkv.testbed.simulate``):

- ``golden_labels``: run a trace along its Golden Eviction trajectory and keep, at the chosen
  evictions, every layer's candidates (the serving features) with Golden's future scores and
  victims: the supervised labels;
- ``sampled_rollout``: run a trace with victims drawn by the project's sampler from the current
  scorer's scores (``foresightkv.evict.sample_victims``: top 2L, then L by Gumbel top-k keyed by
  (seed, request, layer, head, eviction)), keeping each decision's pool features and draw order,
  and reward it on the low-entropy tokens.

The candidates are the live entries minus the newest ``interval`` (protected), so the sampler runs
with ``num_protected = 0`` over them and its Philox entry index is the candidate's live slot, the
same slot the serving step's sampler keys on."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..evict import sample_victims
from .labels import EvictionLabels
from .losses import low_entropy_reward
from .rl import Decision, Trajectory
from .scorer import TorchScorer, features


def pick_evictions(total: int, keep: Optional[int], seed: int) -> List[int]:
    """``keep`` eviction indices of ``0 .. total`` drawn without replacement (seeded), ascending;
    all of them when ``keep`` is None or not smaller."""
    if keep is None or keep >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=g)[:keep].tolist())


def num_evictions(length: int, budget: int, interval: int) -> int:
    """Evictions of a sequence of ``length`` tokens in the simulator's schedule (the first at
    ``budget + interval``, then every ``interval``, none at ``length`` itself)."""
    return 0 if length <= budget + interval else (length - 1 - budget) // interval


def golden_labels(
    model: Any, input_ids: torch.Tensor, prompt_len: int, *, budget: int, interval: int, keep: Optional[int], seed: int
) -> List[EvictionLabels]:
    """Supervised labels of one sequence at one schedule: for ``keep`` evictions of its Golden
    trajectory (seeded choice), all layers' candidates, future scores and Golden's victims."""
    return golden_labels_many(model, [LabelJob(input_ids, prompt_len, budget, seed)], interval=interval, keep=keep)[0]


@dataclass
class LabelJob:
    """One (sequence, budget) of ``golden_labels_many``; ``seed`` picks its kept evictions."""

    input_ids: torch.Tensor
    prompt_len: int
    budget: int
    seed: int


def golden_labels_many(
    model: Any, jobs: Sequence[LabelJob], *, interval: int, keep: Optional[int]
) -> List[List[EvictionLabels]]:
    """``golden_labels`` of every job: their full-cache passes in one packed forward per chunk, then
    their Golden trajectories likewise (``simulate_many``)."""
    from ..testbed.simulate import GoldenRun, SimRun, record_full_many, simulate_many

    prepared = []
    for job in jobs:
        ids, prompt_len, budget = job.input_ids, job.prompt_len, job.budget
        t = int(ids.numel())
        if t >= budget + interval and (t - budget) % interval == 0:
            # The schedule would evict at the very last token, after which nothing is predicted: Golden
            # has no record there (the core skips that eviction), so the sequence stops one token short.
            ids = ids[:-1]
            prompt_len = min(prompt_len, int(ids.numel()))
        chosen = set(pick_evictions(num_evictions(int(ids.numel()), budget, interval), keep, job.seed))
        prepared.append((ids, prompt_len, budget, chosen))
    out: List[List[EvictionLabels]] = [[] for _ in jobs]
    live = [k for k, p in enumerate(prepared) if p[3]]
    # one packed full pass per budget (record_full_many runs one chunk schedule)
    goldens: Dict[int, GoldenRun] = {}
    for budget in sorted({prepared[k][2] for k in live}):
        ks = [k for k in live if prepared[k][2] == budget]
        for k, (trace, _) in zip(ks, record_full_many(model, [prepared[k][0] for k in ks], budget=budget, interval=interval)):
            goldens[k] = GoldenRun(trace, budget, interval)
            del trace
    per: Dict[int, Dict[int, Dict[int, EvictionLabels]]] = {k: {} for k in live}

    def capture_for(k):
        golden, chosen = goldens[k], prepared[k][3]

        def capture(ev) -> None:
            if ev.eviction not in chosen:
                return
            if ev.future is None:
                raise RuntimeError(f"layer {ev.layer} eviction {ev.eviction}: no Golden future scores on the Golden run")
            victims = torch.tensor(golden.victims(ev), dtype=torch.int64)
            per[k].setdefault(ev.eviction, {})[ev.layer] = EvictionLabels(
                torch.cat([ev.keys, ev.values], dim=-1).to(torch.float16),
                ev.stats.reshape(ev.stats.shape[0], ev.stats.shape[1], -1).float(),
                ev.future.float(),
                victims,
            )

        return capture

    runs = [
        SimRun(prepared[k][0], prepared[k][1], "golden", prepared[k][2], interval, golden=goldens[k], capture=capture_for(k))
        for k in live
    ]
    simulate_many(model, runs)
    for k in live:
        for e in sorted(per[k]):
            layers = per[k][e]
            order = [layers[i] for i in sorted(layers)]
            out[k].append(
                EvictionLabels(
                    torch.stack([x.kv for x in order]),
                    torch.stack([x.stats for x in order]),
                    torch.stack([x.future for x in order]),
                    torch.stack([x.victims for x in order]),
                )
            )
    return out


def reward_tokens(length: int, prompt_len: int, budget: int, interval: int) -> slice:
    """The positions ``t`` of the simulator's ``ce[t]`` (loss of token ``t + 1``) the reward looks
    at: every prediction made after the first eviction (queries from ``budget + interval`` on), as
    the official code (``entropy[window + budget:]``); earlier ones cannot change."""
    return slice(min(budget + interval, length - 1), length - 1)


@dataclass
class RolloutJob:
    """One trajectory of ``sampled_rollouts``: the sequence, its full-cache per-token arrays aligned
    with the input (entry ``i`` = token ``i``), the budget and the request part of the sampler key."""

    input_ids: torch.Tensor
    prompt_len: int
    ce_full: torch.Tensor
    entropy_full: torch.Tensor
    budget: int
    request: int


def sampled_rollout(
    model: Any,
    scorer: TorchScorer,
    input_ids: torch.Tensor,
    prompt_len: int,
    ce_full: torch.Tensor,
    entropy_full: torch.Tensor,
    *,
    budget: int,
    request: int,
    **options: Any,
) -> Trajectory:
    """One trajectory of a sequence with victims sampled from ``scorer`` (``sampled_rollouts`` of
    one job; ``options``: its keyword arguments, ``interval`` and ``seed`` required)."""
    job = RolloutJob(input_ids, prompt_len, ce_full, entropy_full, budget, request)
    return sampled_rollouts(model, scorer, [job], **options)[0]


def sampled_rollouts(
    model: Any,
    scorer: TorchScorer,
    jobs: Sequence[RolloutJob],
    *,
    interval: int,
    seed: int,
    temperature: float = 1.0,
    keep_fraction: float = 0.8,
    threshold: float = 1.5,
    diagnose_every: int = 8,
) -> List[Trajectory]:
    """One trajectory per job with victims sampled from ``scorer``, all in one packed simulation
    (``simulate_many``; each trajectory's victims depend only on its own sequence, ``seed`` and
    ``request``). Every ``diagnose_every``-th decision also keeps all candidates' features (for the
    pool-change diagnostic)."""
    from ..testbed.simulate import SimRun, simulate_many

    dev = scorer.w1.device

    def chooser(job: RolloutJob, decisions: List[Decision]):
        def choose(ev) -> Sequence[Sequence[int]]:
            x = features(ev.keys.clone(), ev.values.clone(), ev.stats.clone())
            with torch.no_grad():
                s = scorer.score_layer(ev.layer, x.to(dev)).float().cpu()
            victims, pools, orders = [], [], []
            for h in range(ev.num_kv_heads):
                pool, order = sample_victims(
                    s[h].tolist(),
                    num_protected=0,
                    num_evict=ev.num_evict,
                    seed=seed,
                    request=job.request,
                    layer=ev.layer,
                    head=h,
                    eviction=ev.eviction,
                    temperature=temperature,
                )
                where = {c: i for i, c in enumerate(pool)}
                victims.append(order)
                pools.append(pool)
                orders.append([where[v] for v in order])
            pool_t = torch.tensor(pools, dtype=torch.int64)
            xp = torch.gather(x, 1, pool_t.unsqueeze(2).expand(-1, -1, x.shape[2]))
            keep_all = diagnose_every > 0 and len(decisions) % diagnose_every == 0
            decisions.append(Decision(ev.layer, xp, torch.tensor(orders, dtype=torch.int64), pool_t, x if keep_all else None))
            return victims

        def override(ev) -> Sequence[Sequence[int]]:
            # The simulator runs under inference_mode; the stored features must be ordinary tensors
            # that the RL update can differentiate through.
            with torch.inference_mode(False):
                return choose(ev)

        return override

    all_decisions: List[List[Decision]] = [[] for _ in jobs]
    runs = [
        SimRun(job.input_ids, job.prompt_len, "random", job.budget, interval, seed=seed,
               victims_override=chooser(job, all_decisions[k]), request=job.request)
        for k, job in enumerate(jobs)
    ]
    out = []
    for job, decisions, res in zip(jobs, all_decisions, simulate_many(model, runs)):
        span = reward_tokens(int(job.input_ids.numel()), job.prompt_len, job.budget, interval)
        ce = res.ce[span]
        full = job.ce_full[span.start + 1 : span.stop + 1]
        ent = job.entropy_full[span.start + 1 : span.stop + 1]
        reward = float(low_entropy_reward(ce, full, ent, keep_fraction=keep_fraction, threshold=threshold))
        delta = ce.double() - full.double()
        info = {
            "mean_ce_increase": float(delta.mean()) if delta.numel() else 0.0,
            "tokens_over_threshold": int((delta > threshold).sum()),
            "loss_ratio": float(ce.double().mean() / full.double().mean()) if delta.numel() else 1.0,
        }
        out.append(Trajectory(decisions, reward, info))
    return out

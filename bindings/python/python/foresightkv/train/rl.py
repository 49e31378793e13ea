"""The RL stage (the paper's MDP, GRPO): for each training trace, a group of eviction trajectories
sampled by the project's sampler (top 2L by the current scorer, then L by Gumbel top-k with the
Philox key, i.e. a sequential softmax without replacement over the pool), each rewarded by minus
the squared cross-entropy increases above 1.5 nats on the 80% lowest-entropy tokens; advantages
normalised within the group; the clipped objective per draw with the Plackett-Luce probability of
the draw (the distribution the sampler really draws from) and a KL penalty to the supervised scorer,
its weight annealed from 0.05 to 0. The whole group runs in this process, one trajectory after the
other.

The log-probability of a draw is taken over the pool the sampler used (the top 2L by the scores at
rollout time). The pool itself is a deterministic top-k of the scores, piecewise constant in the
weights (zero gradient), so the probability of the draw given the pool is the differentiable part;
how often an update moves a row's top-2L pool is logged (``pool_change``)."""

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .losses import (
    group_advantages,
    grpo_objective,
    kl_schedule,
    plackett_luce_logprobs,
    warmup_cosine,
)
from .scorer import TorchScorer


@dataclass
class RlConfig:
    """Hyper-parameters of the RL stage (official run: lr 3e-4, 250 steps, KL 0.05 for 100 steps,
    clip 0.2)."""

    steps: int = 20
    group: int = 4
    traces_per_step: int = 2
    lr: float = 3e-4
    warmup: int = 2
    clip_eps: float = 0.2
    kl_start: float = 0.05
    kl_anneal_fraction: float = 0.4
    ppo_epochs: int = 2
    temperature: float = 1.0
    keep_fraction: float = 0.8
    threshold: float = 1.5
    max_norm: float = 1.0
    seed: int = 0


@dataclass
class Decision:
    """One (eviction, layer) of a trajectory: the pool's features ``x [H, P, in]``, the draws
    ``order [H, L]`` (pool indices, first drawn first), and the pool slots ``pool [H, P]`` among
    the candidates (for the pool-change diagnostic, with the candidates' scores at rollout)."""

    layer: int
    x: torch.Tensor
    order: torch.Tensor
    pool: torch.Tensor
    candidates: Optional[torch.Tensor] = None


@dataclass
class Trajectory:
    """A sampled trajectory: its decisions and its reward."""

    decisions: List[Decision]
    reward: float
    info: Dict[str, float] = field(default_factory=dict)


def decision_logprobs(scorer: TorchScorer, d: Decision, temperature: float) -> torch.Tensor:
    """Per-draw log-probabilities ``[H, L]`` of decision ``d`` under ``scorer``."""
    dev = scorer.w1.device
    s = scorer.score_layer(d.layer, d.x.to(dev))
    return plackett_luce_logprobs(s, d.order.to(dev), temperature)


def pool_change(scorer: TorchScorer, d: Decision) -> float:
    """Fraction of heads of ``d`` whose top-|pool| candidates under ``scorer`` differ from the pool
    the sampler used (needs the candidates' features)."""
    if d.candidates is None:
        return float("nan")
    with torch.no_grad():
        s = scorer.score_layer(d.layer, d.candidates.to(scorer.w1.device)).cpu()
    p = d.pool.shape[1]
    top = torch.topk(s, p, dim=1).indices.sort(dim=1).values
    return (top != d.pool.sort(dim=1).values).any(1).float().mean().item()


RolloutFn = Callable[[TorchScorer, Sequence[Tuple[int, int]], int], List[Trajectory]]
"""``rollouts(scorer, [(trace_index, request), ...], seed) -> [Trajectory, ...]``: one sampled
trajectory of a training trace per item (the simulator with the sampler's victims), rewarded; a
step's whole set in one call, so that the simulator runs them as one packed batch."""


def train_rl(
    scorer: TorchScorer,
    num_traces: int,
    rollout: RolloutFn,
    cfg: RlConfig,
    *,
    device="cpu",
    log: Optional[Callable[[Dict], None]] = None,
    progress: bool = True,
) -> List[Dict]:
    """GRPO on ``scorer`` in place (the reference is a frozen copy of it as given: the supervised
    scorer); returns one log entry per step."""
    from tqdm import tqdm

    scorer.to(device).train()
    reference = copy.deepcopy(scorer).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    params = [scorer.w1, scorer.b1, scorer.w2, scorer.b2]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: List[Dict] = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="rl", disable=not progress)
    for step in bar:
        kl_w = kl_schedule(step, cfg.steps, cfg.kl_start, cfg.kl_anneal_fraction)
        traces = torch.randint(0, num_traces, (cfg.traces_per_step,), generator=gen).tolist()
        groups = []
        t_roll = time.time()
        scorer.eval()
        items = [
            (ti, (step * cfg.traces_per_step + k) * cfg.group + g) for k, ti in enumerate(traces) for g in range(cfg.group)
        ]
        with torch.no_grad():
            done = rollout(scorer, items, cfg.seed)
        if len(done) != len(items):
            raise ValueError(f"rollouts returned {len(done)} trajectories for {len(items)} items")
        for k in range(len(traces)):
            trajs = done[k * cfg.group : (k + 1) * cfg.group]
            rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
            adv = group_advantages(rewards)
            with torch.no_grad():
                old = [[decision_logprobs(scorer, d, cfg.temperature) for d in t.decisions] for t in trajs]
                ref = [[decision_logprobs(reference, d, cfg.temperature) for d in t.decisions] for t in trajs]
            groups.append((trajs, adv, old, ref, rewards))
        scorer.train()
        t_update = time.time()
        stats = {"policy": 0.0, "kl": 0.0, "clip_fraction": 0.0, "n": 0}
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(groups), generator=gen).tolist()
            for gi in order:
                trajs, adv, old, ref, _ = groups[gi]
                if float(adv.abs().max()) == 0.0 and kl_w == 0.0:
                    continue
                opt.zero_grad(set_to_none=True)
                draws = sum(o.numel() for lo in old for o in lo)
                for t, a, lo, lr_ in zip(trajs, adv.tolist(), old, ref):
                    for d, o, r in zip(t.decisions, lo, lr_):
                        lp = decision_logprobs(scorer, d, cfg.temperature)
                        terms = grpo_objective(lp, o, r, torch.tensor(a, dtype=lp.dtype, device=lp.device), clip_eps=cfg.clip_eps, kl_weight=kl_w)
                        w = lp.numel() / draws
                        (terms.loss * w).backward()
                        stats["policy"] += terms.policy.item() * w
                        stats["kl"] += terms.kl.item() * w
                        stats["clip_fraction"] += terms.clip_fraction.item() * w
                torch.nn.utils.clip_grad_norm_(params, cfg.max_norm)
                opt.step()
                stats["n"] += 1
        sched.step()
        n = max(stats.pop("n"), 1)
        changes = [pool_change(scorer, d) for trajs, *_ in groups for t in trajs for d in t.decisions[:: max(1, len(t.decisions) // 8)]]
        changes = [c for c in changes if not math.isnan(c)]
        entry = {
            "step": step + 1,
            "kl_weight": kl_w,
            "reward_mean": float(torch.cat([g[4] for g in groups]).mean()),
            "reward_spread_groups": sum(float(g[4].std(unbiased=False)) > 0 for g in groups) / len(groups),
            "rollout_seconds": t_update - t_roll,
            "update_seconds": time.time() - t_update,
            "seconds": time.time() - t0,
            "pool_change": sum(changes) / len(changes) if changes else float("nan"),
            **{k: v / n for k, v in stats.items()},
        }
        history.append(entry)
        bar.set_postfix(reward=f"{entry['reward_mean']:.3g}", kl=f"{entry['kl']:.2g}")
        if log is not None:
            log(entry)
    return history


def save_history(path: Path, cfg: RlConfig, history: Sequence[Dict]) -> None:
    """Writes the stage's config and log as JSON."""
    path.write_text(json.dumps({"config": asdict(cfg), "log": list(history)}, indent=2))

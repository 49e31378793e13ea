"""The training objectives: the supervised pairwise hinge ranking loss and its top-L overlap
metric, and the RL pieces: the reward on low-entropy tokens, group-normalised advantages, the
Plackett-Luce log-probability of the sampler's draws and the clipped GRPO objective with a KL
penalty to the supervised scorer.

Conventions: a higher scorer output means "evict first"; the Golden ``oracle`` of a candidate is
minus its future score (higher = should go first), as in the official code."""

from dataclasses import dataclass
from typing import Optional

import torch


def pairwise_hinge(
    scores: torch.Tensor,
    oracle: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    margin: float = 0.01,
    max_pairs: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Mean over rows of the mean over ordered pairs ``(i, j)`` with ``oracle_i > oracle_j`` of
    ``max(0, margin - (s_i - s_j))`` (the paper's pairwise ranking loss). ``scores``/``oracle``
    ``[R, N]``; ``mask [R, N]`` marks real candidates (padding excluded). Rows without a valid pair
    are skipped (zero loss if none has one).

    When ``max_pairs`` is set and a row has more than ``max_pairs`` candidate pairs, each row uses
    ``max_pairs`` pairs ``(i, j)`` drawn uniformly with replacement among its real candidates
    (ties and ``i = j`` dropped, each pair oriented by the oracle): every valid unordered pair is
    equally likely, so the row mean estimates the exact one (a ratio estimator, consistent in
    ``max_pairs``)."""
    if scores.shape != oracle.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and oracle {tuple(oracle.shape)} must be the same [R, N]")
    r, n = scores.shape
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    if max_pairs is None or n * n <= max_pairs:
        valid = (oracle.unsqueeze(2) > oracle.unsqueeze(1)) & mask.unsqueeze(2) & mask.unsqueeze(1)
        hinge = torch.clamp(margin - (scores.unsqueeze(2) - scores.unsqueeze(1)), min=0.0)
        count = valid.sum(dim=(1, 2))
        total = (hinge * valid).sum(dim=(1, 2))
    else:
        counts = mask.sum(1)
        gen_device = generator.device if generator is not None else scores.device
        u = torch.rand((r, 2, max_pairs), generator=generator, device=gen_device).to(scores.device)
        # The k-th real candidate of each row, drawn uniformly.
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        pick = (u * counts.view(r, 1, 1)).long().clamp(max=n - 1)
        pick = torch.minimum(pick, (counts.view(r, 1, 1) - 1).clamp(min=0))
        idx = torch.gather(order.unsqueeze(1).expand(r, 2, n), 2, pick)
        oi, oj = torch.gather(oracle, 1, idx[:, 0]), torch.gather(oracle, 1, idx[:, 1])
        si, sj = torch.gather(scores, 1, idx[:, 0]), torch.gather(scores, 1, idx[:, 1])
        sign = torch.sign(oi - oj)
        valid = sign != 0
        hinge = torch.clamp(margin - sign * (si - sj), min=0.0)
        count = valid.sum(1)
        total = (hinge * valid).sum(1)
    rows = count > 0
    if not rows.any():
        return scores.sum() * 0.0
    return (total[rows] / count[rows]).mean()


def top_overlap(scores: torch.Tensor, victims: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per row, the fraction of Golden's ``L`` victims (``victims [R, L]``, candidate indices) among
    the ``L`` highest scores (padding ``mask == False`` never chosen): ``[R]`` in [0, 1]."""
    if mask is not None:
        scores = scores.masked_fill(~mask.bool(), float("-inf"))
    k = victims.shape[1]
    top = torch.topk(scores, k, dim=1).indices
    hit = (top.unsqueeze(2) == victims.unsqueeze(1)).any(2)
    return hit.float().mean(1)


def low_entropy_reward(
    ce: torch.Tensor,
    ce_full: torch.Tensor,
    entropy: torch.Tensor,
    *,
    keep_fraction: float = 0.8,
    threshold: float = 1.5,
) -> torch.Tensor:
    """The paper's reward of one trajectory: minus the sum, over the ``keep_fraction`` of scored
    tokens with the lowest full-cache entropy, of the squared cross-entropy increase
    ``delta = ce - ce_full`` for the tokens where ``delta > threshold`` nats (1-D tensors over the
    same tokens). Which tokens are kept depends on the trace only, so every trajectory of a group
    is judged on the same tokens."""
    if not (ce.shape == ce_full.shape == entropy.shape) or ce.dim() != 1:
        raise ValueError(f"ce {tuple(ce.shape)}, ce_full {tuple(ce_full.shape)}, entropy {tuple(entropy.shape)}")
    n = ce.numel()
    keep = round(n * keep_fraction)
    if keep == 0:
        return ce.new_zeros(())
    low = torch.argsort(entropy.double(), stable=True)[:keep]
    delta = (ce.double() - ce_full.double())[low]
    return -(delta.square() * (delta > threshold)).sum().to(ce.dtype)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """GRPO advantages of one group ``[G]``: ``(r - mean) / (std + eps)`` with the population std
    (as the official code)."""
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + eps)).to(rewards.dtype)


def plackett_luce_logprobs(pool_scores: torch.Tensor, order: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities ``[R, L]`` of each draw of a sequential softmax without replacement over a
    pool: ``pool_scores [R, P]``, ``order [R, L]`` the distinct pool indices drawn, first drawn
    first; entry ``k`` is ``log p(order_k | order_<k) = z_k - logsumexp(z_j, j not yet drawn)``
    with ``z = s / T``. Their row sum is the Plackett-Luce log-probability of the ordered draw, the
    exact distribution of Gumbel top-k (the core's sampler) over the pool.

    The not-yet-drawn set at draw ``k`` is the draws ``k..L-1`` plus the undrawn rest of the pool,
    so its log-sum-exp is a reverse cumulative log-sum-exp over the draws combined with that of the
    rest (no loop over draws)."""
    if pool_scores.dim() != 2 or order.dim() != 2 or order.shape[0] != pool_scores.shape[0]:
        raise ValueError(f"pool_scores {tuple(pool_scores.shape)}, order {tuple(order.shape)}")
    z = pool_scores / temperature
    drawn = z.gather(1, order)
    rest = z.scatter(1, order, float("-inf"))
    lse_rest = torch.logsumexp(rest, dim=1, keepdim=True)
    tail = torch.logcumsumexp(drawn.flip(1), dim=1).flip(1)
    return drawn - torch.logaddexp(tail, lse_rest)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """The non-negative KL estimator ``exp(ref - new) - (ref - new) - 1`` per draw (as the official
    code and GRPO), evaluated on the sampled draws."""
    d = logp_ref - logp
    return d.exp() - d - 1


@dataclass
class GrpoTerms:
    """The clipped GRPO objective of a batch of draws and its parts (means over the draws)."""

    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor


def grpo_objective(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    kl_weight: float = 0.05,
) -> GrpoTerms:
    """``mean(-min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)) + kl_weight mean(KL_k3(new, ref))``
    over draws, ``ratio = exp(logp - logp_old)`` per draw (one draw of the sampler is one "token" of
    the trajectory; the trajectory's advantage ``A`` applies to each of its draws, broadcast from
    ``advantages``)."""
    adv = torch.broadcast_to(advantages, logp.shape)
    ratio = torch.exp(logp - logp_old)
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    policy = -torch.minimum(surr1, surr2).mean()
    kl = kl_k3(logp, logp_ref).mean()
    clipped = ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).float().mean()
    return GrpoTerms(policy + kl_weight * kl, policy.detach(), kl.detach(), clipped)


def kl_schedule(step: int, total: int, start: float = 0.05, anneal_fraction: float = 0.4) -> float:
    """KL weight at RL step ``step`` of ``total``: ``start`` annealed linearly to 0 over the first
    ``anneal_fraction`` of the steps (the official run: 0.05 for 100 of 250 steps, then 0)."""
    span = max(1.0, anneal_fraction * total)
    return max(0.0, start * (1.0 - step / span))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * min(1.0, progress))).item()))

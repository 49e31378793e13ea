"""The train command's closing check: the loss ratio after eviction (summed cross-entropy under
the simulator / under the full cache, over every prediction after the first eviction, and over the
20% of those tokens with the lowest full-cache entropy) of the trained scorers and H2O on held-out
sequences, at every budget. The testbed's ``eval`` harness is the full comparison; this is what the
command prints when it finishes."""

from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from .episodes import reward_tokens


def loss_ratios(
    model: Any,
    heldout: Any,
    scorers: Mapping[str, Any],
    budgets: Sequence[int],
    interval: int,
    *,
    limit: Optional[int] = None,
    baselines: Sequence[str] = ("h2o",),
    progress: bool = True,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{policy: {budget: {"loss_ratio", "low_entropy_loss_ratio", "sequences"}}}``."""
    from tqdm import tqdm

    from ..testbed.simulate import simulate

    n = len(heldout) if limit is None else min(limit, len(heldout))
    runs = [(name, {"policy": "foresight", "scorer": str(path)}) for name, path in scorers.items()]
    runs += [(b, {"policy": b}) for b in baselines]
    acc: Dict[str, Dict[str, list]] = {}
    jobs = [(i, b, name, kw) for i in range(n) for b in budgets for name, kw in runs]
    for i, b, name, kw in tqdm(jobs, desc="eval", disable=not progress):
        seq = heldout.sequence(i)
        t = len(seq)
        if t <= b + interval + 1:
            continue
        span = reward_tokens(t, seq.prompt_len, b, interval)
        res = simulate(model, seq.input_ids, prompt_len=seq.prompt_len, budget=b, interval=interval, **kw)
        ce = res.ce[span].double()
        full = seq.ce[span.start + 1 : span.stop + 1].double()
        ent = seq.entropy[span.start + 1 : span.stop + 1]
        low = torch.argsort(ent.double(), stable=True)[: max(1, int(round(0.2 * ent.numel())))]
        slot = acc.setdefault(name, {}).setdefault(str(b), [0.0, 0.0, 0.0, 0.0, 0])
        slot[0] += float(ce.sum())
        slot[1] += float(full.sum())
        slot[2] += float(ce[low].sum())
        slot[3] += float(full[low].sum())
        slot[4] += 1
    return {
        name: {
            b: {"loss_ratio": v[0] / v[1], "low_entropy_loss_ratio": v[2] / v[3], "sequences": v[4]}
            for b, v in per.items()
        }
        for name, per in acc.items()
    }

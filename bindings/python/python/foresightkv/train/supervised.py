"""The supervised stage: distil Golden Eviction into the scorer with the pairwise hinge ranking
loss (margin 0.01) over each row's candidates, Adam with linear warmup then cosine decay, the top-L
overlap with Golden's victims logged on held-out rows."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .labels import LabelSet, RowBatch, rows_of
from .losses import pairwise_hinge, top_overlap, warmup_cosine
from .scorer import TorchScorer


@dataclass
class SupervisedConfig:
    """Hyper-parameters of the supervised stage (paper: lr 1e-2, 1000 steps, 4 traces per step)."""

    steps: int = 300
    lr: float = 1e-2
    warmup: int = 10
    evictions_per_step: int = 8
    margin: float = 0.01
    max_pairs: Optional[int] = 16384
    max_norm: float = 1.0
    eval_every: int = 50
    seed: int = 0


def evaluate(scorer: TorchScorer, data: LabelSet, device, margin: float = 0.01) -> Dict[str, float]:
    """Mean ranking loss (exact pairs) and top-L overlap with Golden's victims over every row of
    ``data``."""
    scorer.eval()
    loss, overlap, rows = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in data.iter_rows():
            b = batch.to(device)
            s = scorer.score(b.x, b.layer, b.head)
            n = b.x.shape[0]
            loss += pairwise_hinge(s, b.oracle, margin=margin).item() * n
            overlap += top_overlap(s, b.victims).sum().item()
            rows += n
    scorer.train()
    return {"loss": loss / max(rows, 1), "top_l_overlap": overlap / max(rows, 1), "rows": rows}


def train_supervised(
    scorer: TorchScorer,
    train: LabelSet,
    held_out: LabelSet,
    cfg: SupervisedConfig,
    *,
    device="cpu",
    log: Optional[Callable[[Dict], None]] = None,
    progress: bool = True,
) -> List[Dict]:
    """Trains ``scorer`` in place; returns the log (one dict per evaluation). A step averages the
    loss of ``evictions_per_step`` evictions drawn uniformly from ``train`` (every layer and KV head
    of each: one row per (layer, head))."""
    from tqdm import tqdm

    if len(train) == 0:
        raise ValueError("no supervised labels to train on")
    gen = torch.Generator().manual_seed(cfg.seed)
    mean, std = train.normalizer(generator=gen)
    scorer.set_normalizer(mean.to(scorer.mean.device), std.to(scorer.mean.device))
    scorer.to(device).train()
    opt = torch.optim.Adam([scorer.w1, scorer.b1, scorer.w2, scorer.b2], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    history: List[Dict] = []

    def record(step: int, train_loss: float, t0: float) -> None:
        ev = evaluate(scorer, held_out, device, cfg.margin) if len(held_out) else {}
        entry = {"step": step, "train_loss": train_loss, "seconds": time.time() - t0, **{f"held_out_{k}": v for k, v in ev.items()}}
        history.append(entry)
        if log is not None:
            log(entry)

    t0 = time.time()
    record(0, float("nan"), t0)
    bar = tqdm(range(cfg.steps), desc="supervised", disable=not progress)
    running = 0.0
    for step in bar:
        picks = torch.randint(0, len(train), (cfg.evictions_per_step,), generator=gen).tolist()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in picks:
            b: RowBatch = rows_of(train.events[i]).to(device)
            s = scorer.score(b.x, b.layer, b.head)
            loss = pairwise_hinge(s, b.oracle, margin=cfg.margin, max_pairs=cfg.max_pairs, generator=gen) / len(picks)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_([scorer.w1, scorer.b1, scorer.w2, scorer.b2], cfg.max_norm)
        opt.step()
        sched.step()
        running = total if step == 0 else 0.9 * running + 0.1 * total
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record(step + 1, total, t0)
    return history


def save_history(path: Path, cfg: SupervisedConfig, history: List[Dict]) -> None:
    """Writes the stage's config and log as JSON."""
    path.write_text(json.dumps({"config": asdict(cfg), "log": history}, indent=2))

"""Supervised labels on disk: along the Golden Eviction trajectory of a trace, each eviction's
candidates (per layer and KV head: key, value, the 8 statistics exactly as the serving step feeds
``scorer_mlp``) with their Golden future scores and Golden's victims, one safetensors file per
(trace, budget), so the supervised stage never reruns the LLM.

File ``{name}.safetensors``, for each stored eviction ``j`` (``0 .. count``):

- ``kv.{j}``: float16 ``[layers, H, N_j, 2 D]`` (key then value; the model's fp32 K/V rounded to
  fp16, a relative error below 1e-3 the scorer does not notice),
- ``stats.{j}``: float32 ``[layers, H, N_j, 8 G]`` (query head major, as ``scorer_mlp`` reads),
- ``future.{j}``: float32 ``[layers, H, N_j]``, Golden's future score of each candidate,
- ``victims.{j}``: int64 ``[layers, H, L]``, the candidates Golden evicted;

and metadata (strings): ``count``, ``budget``, ``interval``, ``trace``, ``evictions`` (the indices
of the stored evictions in the trajectory, JSON)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..errors import FormatError


@dataclass
class EvictionLabels:
    """One eviction of one trace: all layers' and heads' candidates."""

    kv: torch.Tensor
    stats: torch.Tensor
    future: torch.Tensor
    victims: torch.Tensor

    @property
    def num_candidates(self) -> int:
        """Candidates per (layer, head) at this eviction."""
        return int(self.kv.shape[2])

    def x(self) -> torch.Tensor:
        """Scorer inputs ``[layers, H, N, 2D + 8G]`` float32."""
        return torch.cat([self.kv.float(), self.stats.float()], dim=-1)


def write_labels(path: Path, events: Sequence[EvictionLabels], meta: Dict[str, object]) -> None:
    """Writes ``events`` to ``path`` atomically (a partial file never looks finished)."""
    from safetensors.torch import save_file

    tensors = {}
    for j, e in enumerate(events):
        tensors[f"kv.{j}"] = e.kv.to(torch.float16).contiguous()
        tensors[f"stats.{j}"] = e.stats.to(torch.float32).contiguous()
        tensors[f"future.{j}"] = e.future.to(torch.float32).contiguous()
        tensors[f"victims.{j}"] = e.victims.to(torch.int64).contiguous()
    metadata = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    metadata["count"] = str(len(events))
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_labels(path: Path) -> List[EvictionLabels]:
    """All evictions stored in ``path``."""
    from safetensors import safe_open

    out = []
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "count" not in meta:
            raise FormatError(f"{path}: not a label file (no 'count' metadata)")
        for j in range(int(meta["count"])):
            out.append(
                EvictionLabels(
                    f.get_tensor(f"kv.{j}"), f.get_tensor(f"stats.{j}"), f.get_tensor(f"future.{j}"), f.get_tensor(f"victims.{j}")
                )
            )
    return out


def read_meta(path: Path) -> Dict[str, str]:
    """The metadata of a label file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@dataclass
class RowBatch:
    """A batch of ranking rows: ``x [R, N, in]``, ``oracle [R, N]`` (minus future: higher = evict
    first), ``victims [R, L]``, the (layer, head) of each row."""

    x: torch.Tensor
    oracle: torch.Tensor
    victims: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor

    def to(self, device) -> "RowBatch":
        """The batch on ``device``."""
        return RowBatch(*(t.to(device) for t in (self.x, self.oracle, self.victims, self.layer, self.head)))


def rows_of(e: EvictionLabels) -> RowBatch:
    """Every (layer, KV head) row of one eviction."""
    nl, h, n, _ = e.kv.shape
    layer = torch.arange(nl).repeat_interleave(h)
    head = torch.arange(h).repeat(nl)
    return RowBatch(
        e.x().reshape(nl * h, n, -1), -e.future.reshape(nl * h, n), e.victims.reshape(nl * h, -1), layer, head
    )


class LabelSet:
    """The evictions of a set of label files, held in memory (what the supervised stage samples)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self.events: List[EvictionLabels] = []
        self.source: List[int] = []
        for i, p in enumerate(self.paths):
            for e in read_labels(p):
                self.events.append(e)
                self.source.append(i)

    def __len__(self) -> int:
        return len(self.events)

    def shape(self) -> Optional[torch.Size]:
        """``(layers, H)`` of the stored rows (None when empty)."""
        return None if not self.events else self.events[0].kv.shape[:2]

    def normalizer(self, max_events: int = 64, generator: Optional[torch.Generator] = None):
        """Per-(layer, head, feature) mean and std ``[layers, H, in]`` over the candidates of up to
        ``max_events`` evictions."""
        idx = torch.randperm(len(self.events), generator=generator)[:max_events].tolist()
        xs = [self.events[i].x() for i in idx]
        total = sum(x.shape[2] for x in xs)
        s1 = sum(x.double().sum(2) for x in xs) / total
        s2 = sum(x.double().square().sum(2) for x in xs) / total
        std = (s2 - s1.square()).clamp(min=0).sqrt()
        return s1.float(), std.float()

    def iter_rows(self) -> Iterator[RowBatch]:
        """Row batches of every eviction, in order."""
        for e in self.events:
            yield rows_of(e)

"""The ForesightKV scorer in PyTorch, equal to the core's ``scorer_mlp``: per (layer, KV head)
``concat(k, v, stats) -> Linear(16) -> GELU -> Linear(1)``, higher output = evicted first.

Training runs on standardised inputs (a fixed per-(layer, head, feature) mean and scale measured on
the training rows, for conditioning at the paper's learning rate); the standardisation is folded
into the first layer when the scorer is exported (``W' = W / s``, ``b' = b - W' m``), so the saved
checkpoint is the plain MLP the core runs on the raw serving features."""

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._native import NUM_STATS, SCORER_HIDDEN, ScorerCheckpoint
from ..errors import ShapeError

PathLike = Union[str, "os.PathLike[str]"]


def in_dim_of(head_dim: int, group_size: int) -> int:
    """Input width of the scorer: ``2 * head_dim + 8 * group_size``."""
    return 2 * head_dim + NUM_STATS * group_size


def features(keys: torch.Tensor, values: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Scorer inputs ``[..., N, 2D + 8G]`` from keys and values ``[..., N, D]`` and statistics
    ``[..., N, G, 8]`` (or already flat ``[..., N, 8G]``, query head major), in the order the core's
    ``scorer_mlp`` reads them: key, value, statistics."""
    if keys.shape != values.shape:
        raise ShapeError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    if stats.dim() == keys.dim() + 1:
        stats = stats.reshape(*stats.shape[:-2], stats.shape[-2] * stats.shape[-1])
    if stats.shape[:-1] != keys.shape[:-1] or stats.shape[-1] % NUM_STATS:
        raise ShapeError(f"stats {tuple(stats.shape)} do not fit keys {tuple(keys.shape)}")
    return torch.cat([keys.float(), values.float(), stats.float()], dim=-1)


def mlp_rows(x, layer, head, w1, b1, w2, b2, mean, scale) -> torch.Tensor:
    """The scorer as a function of its weights: row ``r`` of ``x [R, N, in]`` through the MLP of
    (``layer[r]``, ``head[r]``) on ``(x - mean) / scale``: ``gelu(x W1^T + b1) w2 + b2``, ``[R, N]``."""
    layer, head = layer.long(), head.long()
    x = (x.to(w1.dtype) - mean[layer, head].unsqueeze(1)) / scale[layer, head].unsqueeze(1)
    hid = torch.bmm(x, w1[layer, head].transpose(1, 2)) + b1[layer, head].unsqueeze(1)
    return torch.bmm(F.gelu(hid), w2[layer, head].unsqueeze(2)).squeeze(2) + b2[layer, head].unsqueeze(1)


class TorchScorer(nn.Module):
    """All layers' scorers: ``w1 [layers, H, 16, in]``, ``b1 [layers, H, 16]``, ``w2 [layers, H,
    16]``, ``b2 [layers, H]``, the checkpoint's layout; ``mean``/``scale`` buffers ``[layers, H, in]``
    standardise the inputs (identity until ``set_normalizer``)."""

    def __init__(self, num_layers: int, num_kv_heads: int, group_size: int, head_dim: int, *, seed: int = 0):
        super().__init__()
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("group_size", group_size), ("head_dim", head_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ShapeError(f"{name} = {v!r} must be a positive integer")
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.group_size, self.head_dim = group_size, head_dim
        i, h = in_dim_of(head_dim, group_size), SCORER_HIDDEN
        self.in_dim = i
        gen = torch.Generator().manual_seed(seed)
        # nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        def uni(shape, fan_in):
            return (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
        self.w1 = nn.Parameter(uni((num_layers, num_kv_heads, h, i), i))
        self.b1 = nn.Parameter(uni((num_layers, num_kv_heads, h), i))
        self.w2 = nn.Parameter(uni((num_layers, num_kv_heads, h), h))
        self.b2 = nn.Parameter(uni((num_layers, num_kv_heads), h))
        self.register_buffer("mean", torch.zeros(num_layers, num_kv_heads, i))
        self.register_buffer("scale", torch.ones(num_layers, num_kv_heads, i))

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(num_layers, num_kv_heads, group_size, head_dim)``."""
        return (self.num_layers, self.num_kv_heads, self.group_size, self.head_dim)

    def set_normalizer(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Sets the input standardisation ``(x - mean) / scale`` (``[layers, H, in]``; scales below
        1e-6 become 1: a constant feature is left as is)."""
        want = (self.num_layers, self.num_kv_heads, self.in_dim)
        if tuple(mean.shape) != want or tuple(scale.shape) != want:
            raise ShapeError(f"normaliser {tuple(mean.shape)} / {tuple(scale.shape)}, expected {want}")
        scale = torch.where(scale.abs() < 1e-6, torch.ones_like(scale), scale)
        self.mean.copy_(mean)
        self.scale.copy_(scale)

    def restandardize(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Sets the input standardisation to ``(mean, scale)`` and rewrites the first layer so that
        every score stays what it was (the same function, new parameters): a scorer loaded from a
        checkpoint (standardisation folded in, identity normaliser) then trains in standardised units,
        where an optimiser's step means the same for every feature."""
        with torch.no_grad():
            w1, b1 = self._folded_first_layer()
            self.set_normalizer(mean.to(self.mean), scale.to(self.scale))
            self.b1.copy_(b1 + (w1 * self.mean.double().unsqueeze(2)).sum(-1))
            self.w1.copy_(w1 * self.scale.double().unsqueeze(2))

    def score(self, x: torch.Tensor, layer: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Scores ``[R, N]`` of rows ``x [R, N, in]`` where row ``r`` belongs to (``layer[r]``,
        ``head[r]``) (int64 ``[R]``)."""
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ShapeError(f"x {tuple(x.shape)}, expected [rows, N, {self.in_dim}]")
        return mlp_rows(x, layer, head, self.w1, self.b1, self.w2, self.b2, self.mean, self.scale)

    def score_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Scores ``[H, N]`` of one layer's candidates ``x [H, N, in]`` (head ``h`` through MLP ``h``)."""
        heads = torch.arange(x.shape[0], device=x.device)
        return self.score(x, torch.full_like(heads, layer), heads)

    def _folded_first_layer(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w1, b1)`` in float64 with the standardisation folded in (what acts on raw inputs)."""
        w1 = self.w1.double() / self.scale.double().unsqueeze(2)
        return w1, self.b1.double() - (w1 * self.mean.double().unsqueeze(2)).sum(-1)

    def folded(self) -> Dict[str, torch.Tensor]:
        """The plain-MLP weights (standardisation folded into the first layer), float32 on CPU:
        ``w1, b1, w2, b2`` in the checkpoint's layout."""
        with torch.no_grad():
            w1, b1 = self._folded_first_layer()
            return {
                "w1": w1.float().cpu().contiguous(),
                "b1": b1.float().cpu().contiguous(),
                "w2": self.w2.detach().float().cpu().contiguous(),
                "b2": self.b2.detach().float().cpu().contiguous(),
            }

    def save(self, path: PathLike, *, budget: int, interval: int, extra: Optional[Dict[str, Any]] = None) -> ScorerCheckpoint:
        """Writes a scorer-only checkpoint (``config.json`` + ``scorer.safetensors``) in the core's
        format and returns it as loaded back through the core's validating loader. The config is the
        core's own (taken from a checkpoint the core builds for this shape, so every field it
        stamps, the statistics definition included, is the current one); ``extra`` goes to
        ``training.json`` beside it (the core ignores that file)."""
        from safetensors.torch import save_file

        path = Path(path)
        nl, nkv, g, d = self.shape
        template = ScorerCheckpoint.random(nl, nkv, g, d, budget, interval, seed=0)
        config = dict(template.config)
        w = self.folded()
        tensors = {}
        for layer in range(nl):
            for name in ("w1", "b1", "w2", "b2"):
                tensors[f"layers.{layer}.{name}"] = w[name][layer].contiguous()
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path) as tmp:
            save_file(tensors, os.path.join(tmp, "scorer.safetensors"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            ck = ScorerCheckpoint.load(tmp)
            ck.check_model(nl, nkv, g, d)
            os.replace(os.path.join(tmp, "scorer.safetensors"), path / "scorer.safetensors")
            os.replace(os.path.join(tmp, "config.json"), path / "config.json")
        if extra is not None:
            with open(path / "training.json", "w") as f:
                json.dump(extra, f, indent=2, sort_keys=True)
        return ScorerCheckpoint.load(path)

    @classmethod
    def from_checkpoint(cls, ck: ScorerCheckpoint) -> "TorchScorer":
        """A scorer with the weights of a core checkpoint (identity normaliser)."""
        from ..evict import scorer_weights

        c = ck.config
        m = cls(c["num_layers"], c["num_kv_heads"], c["group_size"], c["head_dim"])
        with torch.no_grad():
            for layer in range(c["num_layers"]):
                w1, b1, w2, b2 = scorer_weights(ck, layer)
                m.w1[layer].copy_(w1)
                m.b1[layer].copy_(b1)
                m.w2[layer].copy_(w2)
                m.b2[layer].copy_(b2)
        return m

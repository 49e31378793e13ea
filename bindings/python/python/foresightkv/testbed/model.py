"""Loading a Hugging Face decoder (Llama, Qwen2, Qwen3, or any model whose attention modules call
transformers' ``AttentionInterface``) and routing its attention through foresightkv.

``load_model(path)`` reads a plain HF directory (safetensors + config.json) in float32 on the CPU (or
the ``device`` given: every testbed forward then runs there, ``model_device(model)``);
``ModelShape.of(model)`` gives the dimensions the eviction code needs. ``routed_attention(model,
fn)`` is a context manager under which every attention module of ``model`` calls ``fn(module, q, k,
v, scaling)`` instead of its own kernel, with ``q`` ``[T, Hq, D]`` and ``k``/``v`` ``[T, H, D]`` of
the forward's new tokens (RoPE already applied at the positions the caller passed, Qwen3's q/k norms
already applied), returning ``[T, Hq, D]``. Nothing in here is model-specific: projections, norms,
RoPE and the MLP stay the model's own code."""

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from ..errors import ConfigError, ShapeError

#: Name under which the routed attention is registered in transformers' ``AttentionInterface``.
ATTN_IMPL = "foresightkv"

#: Environment variable naming the testbed model directory (default: the setup script's output).
MODEL_ENV = "FORESIGHTKV_MODEL"

_local = threading.local()


def default_model_dir() -> str:
    """``$FORESIGHTKV_MODEL``, else the directory ``scripts/setup_model.sh`` writes."""
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return env
    cache = os.environ.get("FORESIGHTKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "foresightkv",
    )
    return os.path.join(cache, "models", "smollm2-135m-instruct")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder that eviction needs."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_q_heads // self.num_kv_heads

    @staticmethod
    def of(model: Any) -> "ModelShape":
        """Reads the shape from ``model.config`` (``head_dim`` when given, else hidden / heads)."""
        c = model.config
        hq = int(c.num_attention_heads)
        h = int(getattr(c, "num_key_value_heads", None) or hq)
        d = getattr(c, "head_dim", None) or c.hidden_size // hq
        if hq % h:
            raise ConfigError(f"{hq} query heads are not a multiple of {h} KV heads")
        return ModelShape(int(c.num_hidden_layers), hq, h, int(d), int(c.vocab_size))


def load_model(
    path: str, *, dtype: torch.dtype = torch.float32, threads: Optional[int] = None, device: Optional[str] = None
) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` from a HF directory, in eval mode on ``device`` (default the CPU) with
    ``dtype`` weights; an unknown or unavailable device is a ``ConfigError`` naming it."""
    dev = _device(device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(
            f"{path} is not a Hugging Face model directory (no config.json); run scripts/setup_model.sh "
            f"or set {MODEL_ENV}"
        )
    if threads:
        torch.set_num_threads(threads)
    _register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    if dev.type != "cpu":
        model.to(dev)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _device(device: Optional[str]) -> torch.device:
    """``device`` as a torch device, checked before any weight is read."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: torch sees no CUDA device (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: the testbed runs on cpu or cuda")
    return dev


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s weights (where the testbed's forwards and paged caches go)."""
    return next(model.parameters()).device


def _register() -> None:
    """Registers the routed attention with transformers (idempotent). No mask function is registered,
    so transformers builds no mask for it: the routed function owns causality."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, _routed)


def _routed(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """The function transformers calls: ``query`` ``[1, Hq, T, D]``, ``key``/``value`` ``[1, H, T, D]``."""
    fn = getattr(_local, "fn", None)
    if fn is None:
        raise ConfigError("foresightkv attention was called outside routed_attention()")
    if query.shape[0] != 1:
        raise ShapeError(
            f"routed attention runs one sequence at a time, got a batch of {query.shape[0]}"
        )
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    out = fn(module, q, k, v, scale)
    return out.unsqueeze(0), None


def _configs(model: Any) -> list:
    """Every distinct config object the model's modules hold (attention modules read their own)."""
    seen, out = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation"):
            seen.add(id(c))
            out.append(c)
    return out


@contextlib.contextmanager
def routed_attention(model: Any, fn: Callable) -> Iterator[None]:
    """Within the block, the attention of ``model`` calls ``fn(module, q, k, v, scale)`` (see the
    module docstring); the model's own implementation is restored afterwards."""
    _register()
    configs = _configs(model)
    saved = [c._attn_implementation for c in configs]
    prev = getattr(_local, "fn", None)
    _local.fn = fn
    try:
        for c in configs:
            c._attn_implementation = ATTN_IMPL
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s
        _local.fn = prev


def layer_index(module: Any) -> int:
    """The decoder layer an attention module belongs to (its ``layer_idx``)."""
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        raise ConfigError(f"attention module {type(module).__name__} has no layer_idx")
    return int(idx)


def full_forward_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, V]`` (float32) of one full-cache forward of ``input_ids`` ``[T]`` with the
    model's own attention (the reference the simulator is checked against)."""
    with torch.inference_mode():
        out = model(input_ids=input_ids.view(1, -1).to(model_device(model)), use_cache=False)
    return out.logits[0].float().cpu()


def token_losses(
    logits: torch.Tensor, input_ids: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ce, entropy)``, each ``[T - 1]`` float32: ``ce[t]`` = -log p(token ``t + 1`` | tokens
    ``<= t``), ``entropy[t]`` the entropy (nats) of that predictive distribution."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    tgt = input_ids[1:].long().view(-1, 1)
    ce = -lp.gather(1, tgt).squeeze(1)
    ent = -(lp.exp() * lp).sum(-1)
    return ce, ent

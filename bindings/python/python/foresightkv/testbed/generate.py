"""Generation with eviction through the serving step (``foresightkv.engine.EvictionEngine``), as an
engine runs it: the whole prompt prefilled in one step (full attention, then compressed to the
budget right after prefill when longer), then one token per step through the paged decode kernel,
evicting whenever the live window reaches ``budget + interval``.

The prefill's hidden states do not depend on the policy (the prompt attends to itself in full;
compression happens after each layer's attention), so ``prefill(model, prompt_ids)`` runs the model
once and records each layer's queries, keys and values and the first answer token, and
``generate(model, pre, policy=...)`` replays only the attention + eviction of the prefill through a
fresh engine per policy (the same ``attend`` call an engine makes) before decoding with the model.
Golden Eviction here is the offline teacher of the prompt compression: its future scores come from
the full-cache trace of the prompt followed by the model's full-cache answer (``golden=``)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from .. import kernels
from ..engine import StepRequest
from .model import ModelShape, layer_index, routed_attention
from .simulate import GoldenRun, _engine_config, _SimEngine


@dataclass
class Prefill:
    """A recorded full-cache prefill: per layer (q ``[P, Hq, D]``, k, v ``[P, H, D]``), the first
    answer token (argmax of the last prompt position) and the prompt length."""

    layers: List[tuple]
    first_token: int
    prompt_len: int
    scale: float


def prefill(model: Any, prompt_ids: torch.Tensor) -> Prefill:
    """Runs the prompt once with full attention (the model's own SDPA over the fresh K/V, routed so
    that the post-RoPE q/k/v are recorded)."""
    import torch.nn.functional as F

    ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    shape = ModelShape.of(model)
    rec: List[Optional[tuple]] = [None] * shape.num_layers
    scales = []

    def attend(module, q, k, v, scale):
        rec[layer_index(module)] = (q.clone(), k.clone(), v.clone())
        scales.append(scale)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return o[0].transpose(0, 1)

    with routed_attention(model, attend), torch.inference_mode():
        logits = model(
            input_ids=ids.view(1, -1),
            position_ids=torch.arange(ids.numel()).view(1, -1),
            use_cache=False,
        )
    return Prefill(rec, int(logits.logits[0, -1].argmax()), int(ids.numel()), scales[0])


def generate(
    model: Any,
    pre: Prefill,
    *,
    policy: str,
    budget: int,
    interval: int,
    max_new: int,
    stop_ids: Sequence[int],
    scorer: Any = None,
    seed: int = 0,
    golden: Optional[GoldenRun] = None,
) -> List[int]:
    """Greedy answer tokens after ``pre``'s prompt under ``policy`` at ``budget``/``interval``,
    through the serving step (stops after a token in ``stop_ids`` or ``max_new`` tokens)."""
    cfg, checkpoint = _engine_config(policy, budget, interval, scorer, seed)
    override = golden.victims if policy == "golden" else None
    if policy == "golden" and golden is None:
        raise ValueError(
            "policy 'golden' needs golden= (a GoldenRun over the full-cache prompt + answer)"
        )
    engine = _SimEngine(
        cfg, checkpoint=checkpoint, capture=None, override=override, golden=golden
    )
    shape = ModelShape.of(model)
    p = pre.prompt_len
    cap = p + max_new + 1
    dtype = pre.layers[0][1].dtype
    caches = [
        (
            torch.zeros((cap, 1, shape.num_kv_heads, shape.head_dim), dtype=dtype),
            torch.zeros((cap, 1, shape.num_kv_heads, shape.head_dim), dtype=dtype),
        )
        for _ in range(shape.num_layers)
    ]
    table = torch.arange(cap, dtype=torch.int32).view(1, cap)
    plan = engine.begin_step([StepRequest(key=0, seq_len=p, num_new=p, prefill=True)])
    slots = torch.arange(p, dtype=torch.int64)
    for layer, (q, k, v) in enumerate(pre.layers):
        kc, vc = caches[layer]
        kernels.reshape_and_cache(k.contiguous(), v.contiguous(), kc, vc, slots)
        out = torch.empty_like(q)
        engine.attend(plan, layer, q.contiguous(), kc, vc, table, out, scale=pre.scale)
    answer = [pre.first_token]
    tok = pre.first_token
    while tok not in stop_ids and len(answer) < max_new:
        pos = p + len(answer) - 1
        plan = engine.begin_step(
            [StepRequest(key=0, seq_len=pos + 1, num_new=1, prefill=False)]
        )
        slot = torch.tensor([pos], dtype=torch.int64)

        def attend(module, q, k, v, scale, plan=plan, slot=slot):
            layer = layer_index(module)
            kc, vc = caches[layer]
            kernels.reshape_and_cache(k.contiguous(), v.contiguous(), kc, vc, slot)
            q = q.contiguous()
            out = torch.empty_like(q)
            engine.attend(plan, layer, q, kc, vc, table, out, scale=scale)
            return out

        with routed_attention(model, attend), torch.inference_mode():
            logits = model(
                input_ids=torch.tensor([[tok]]),
                position_ids=torch.tensor([[pos]]),
                use_cache=False,
            ).logits
        tok = int(logits[0, -1].argmax())
        answer.append(tok)
    return answer

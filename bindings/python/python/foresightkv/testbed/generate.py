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
from .model import ModelShape, layer_index, model_device, routed_attention
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

    dev = model_device(model)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().to(dev)
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
            position_ids=torch.arange(ids.numel(), device=dev).view(1, -1),
            use_cache=False,
        )
    return Prefill(rec, int(logits.logits[0, -1].argmax()), int(ids.numel()), scales[0])


@dataclass
class GenSpec:
    """One policy and schedule for ``generate_many`` (the arguments of ``generate``)."""

    policy: str
    budget: int
    interval: int
    scorer: Any = None
    seed: int = 0
    golden: Optional[GoldenRun] = None


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
    spec = GenSpec(policy, budget, interval, scorer, seed, golden)
    return generate_many(model, pre, [spec], max_new=max_new, stop_ids=stop_ids)[0]


def generate_many(
    model: Any, pre: Prefill, specs: Sequence[GenSpec], *, max_new: int, stop_ids: Sequence[int]
) -> List[List[int]]:
    """``generate`` under every spec at once: each spec's prefill replay and compression through its
    own engine, then one packed decoding forward per step over every unfinished spec (one token each,
    each attending to its own paged cache)."""
    shape = ModelShape.of(model)
    p = pre.prompt_len
    cap = p + max_new + 1
    dtype, dev = pre.layers[0][1].dtype, pre.layers[0][1].device
    stops = set(int(s) for s in stop_ids)
    lanes = []
    for sp in specs:
        cfg, checkpoint = _engine_config(sp.policy, sp.budget, sp.interval, sp.scorer, sp.seed)
        if sp.policy == "golden" and sp.golden is None:
            raise ValueError("policy 'golden' needs golden= (a GoldenRun over the full-cache prompt + answer)")
        override = sp.golden.victims if sp.policy == "golden" else None
        engine = _SimEngine(cfg, checkpoint=checkpoint, hooks={0: (None, override, sp.golden)})
        caches = [
            (
                torch.zeros((cap, 1, shape.num_kv_heads, shape.head_dim), dtype=dtype, device=dev),
                torch.zeros((cap, 1, shape.num_kv_heads, shape.head_dim), dtype=dtype, device=dev),
            )
            for _ in range(shape.num_layers)
        ]
        plan = engine.begin_step([StepRequest(key=0, seq_len=p, num_new=p, prefill=True)])
        slots = torch.arange(p, dtype=torch.int64, device=dev)
        table = torch.arange(cap, dtype=torch.int32, device=dev).view(1, cap)
        for layer, (q, k, v) in enumerate(pre.layers):
            kc, vc = caches[layer]
            kernels.reshape_and_cache(k.contiguous(), v.contiguous(), kc, vc, slots)
            out = torch.empty_like(q)
            engine.attend(plan, layer, q.contiguous(), kc, vc, table, out, scale=pre.scale)
        lanes.append((engine, caches, table))
    answers = [[pre.first_token] for _ in specs]
    while True:
        active = [j for j, a in enumerate(answers) if a[-1] not in stops and len(a) < max_new]
        if not active:
            break
        steps = []
        for j in active:
            engine, caches, table = lanes[j]
            pos = p + len(answers[j]) - 1
            plan = engine.begin_step([StepRequest(key=0, seq_len=pos + 1, num_new=1, prefill=False)])
            steps.append((engine, plan, caches, table, torch.tensor([pos], dtype=torch.int64, device=dev)))

        def attend(module, q, k, v, scale, steps=steps):
            layer = layer_index(module)
            q = q.contiguous()
            out = torch.empty_like(q)
            for r, (engine, plan, caches, table, slot) in enumerate(steps):
                kc, vc = caches[layer]
                kernels.reshape_and_cache(k[r : r + 1].contiguous(), v[r : r + 1].contiguous(), kc, vc, slot)
                engine.attend(plan, layer, q[r : r + 1], kc, vc, table, out[r : r + 1], scale=scale)
            return out

        ids = torch.tensor([[answers[j][-1] for j in active]], device=dev)
        positions = torch.tensor([[p + len(answers[j]) - 1 for j in active]], device=dev)
        with routed_attention(model, attend), torch.inference_mode():
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        for r, j in enumerate(active):
            answers[j].append(int(logits[r].argmax()))
    return answers

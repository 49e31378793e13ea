"""The foresightkv attention backend for vLLM 0.32: the backend class vLLM resolves ``CUSTOM`` to, the
KV cache spec it hands vLLM's KV manager (a sliding window of budget + interval tokens, so vLLM frees
the blocks before each request's live window itself; in protect mode an R-SWA spec that keeps the
original prompt and frees the gap between it and the window), and the metadata builder and impl that run
``foresightkv.engine.EvictionEngine`` over vLLM's paged cache in place."""

from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional, Tuple

import torch

from foresightkv.engine import EvictionEngine, StepBatch, StepPlan, StepRequest
from foresightkv.errors import ConfigError
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, RSWASpec, SlidingWindowSpec, replace_as
from vllm.v1.kv_cache_layout import KVCacheLayout

from . import config as plugin_config
from .config import BLOCK_SIZE_MULTIPLE, SUPPORTED_HEAD_SIZES, SUPPORTED_KV_CACHE_DTYPES, PluginSettings


def live_window_spec(spec: AttentionSpec, settings: PluginSettings) -> AttentionSpec:
    """The spec vLLM's KV manager should use for a full-attention layer under foresightkv: a
    ``SlidingWindowSpec`` of ``budget + interval`` tokens, so the manager frees every block before
    ``align_down(n - W + 1)`` while the engine's schedule keeps ``live_start`` at or after it. In protect
    mode an ``RSWASpec`` of window ``W``: vLLM's ``RSWAManager`` keeps the blocks of the original prompt
    ``[0, cdiv(P, bs))`` and frees those in ``[cdiv(P, bs), align_down(max(P, n - W)))``, while the
    engine keeps its evictable window from ``align_up(P)`` under ``W`` tokens. Other specs, and every spec
    under the ``full_cache`` policy (which never evicts, so attention reads the whole sequence), are
    returned unchanged; the page size never changes."""
    if type(spec) is not FullAttentionSpec or settings.engine.policy == "full_cache":
        return spec
    if settings.engine.protect_prompt:
        return replace_as(spec, RSWASpec, rswa_window=settings.window)
    return replace_as(
        spec, SlidingWindowSpec, drop=("attention_chunk_size", "non_causal"), sliding_window=settings.window
    )


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[num_blocks, block_size, H, D]`` over vLLM's per-layer cache ``[num_blocks, H,
    block_size, 2 * D]`` (K = first ``D`` elements of each slot's content, V = the next ``D``, the
    convention of vLLM's Triton backend), in place."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ConfigError(
            f"foresightkv expects a KV cache [blocks, heads, block_size, 2 * {head_size}], got {tuple(kv_cache.shape)}"
        )
    k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return k, v


@dataclass
class ForesightKVMetadata:
    """Per-step metadata: the engine's plan (live windows, due evictions), the block table (one row per
    engine request of the plan; entry ``i`` = block of positions ``[i * block_size, (i + 1) *
    block_size)``; entries before a live window, after the protected prompt, are stale and never read)
    and the slot mapping of the new tokens, and the engine of the builder that planned it (one per vLLM
    engine: per-request state never crosses from one engine of a process to another)."""

    num_actual_tokens: int
    plan: StepPlan
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    engine: Optional[EvictionEngine] = None


def step_requests(
    key: int, seq_len: int, num_new: int, prefill: bool, prompt_len: Optional[int]
) -> List[StepRequest]:
    """The engine's requests for one vLLM request of a step (a reset when nothing is computed yet).
    Without ``prompt_len`` one request with vLLM's own prefill flag. In protect mode (``prompt_len``,
    the ORIGINAL prompt length) the new tokens are prompt tokens exactly where they lie before
    ``prompt_len``: a chunk that crosses it (a request resumed after preemption re-prefills prompt
    and generated tokens as one prefill) becomes two requests of the same key, the prompt part then
    the generated part, so the engine protects ``align_up(prompt_len)``, what vLLM's ``RSWAManager``
    keeps, never the re-prefilled length."""
    computed = seq_len - num_new
    reset = computed == 0
    if prompt_len is None:
        return [StepRequest(key=key, seq_len=seq_len, num_new=num_new, prefill=prefill, reset=reset)]
    if computed < prompt_len < seq_len:
        return [
            StepRequest(key=key, seq_len=prompt_len, num_new=prompt_len - computed, prefill=True, reset=reset),
            StepRequest(key=key, seq_len=seq_len, num_new=seq_len - prompt_len, prefill=False),
        ]
    return [StepRequest(key=key, seq_len=seq_len, num_new=num_new, prefill=seq_len <= prompt_len, reset=reset)]


class ForesightKVMetadataBuilder(AttentionMetadataBuilder[ForesightKVMetadata]):
    """Builds ``ForesightKVMetadata`` once per step: per request a stable key (model runner V2's
    ``req_idx``), a reset when the request starts over (nothing computed yet), in protect mode its
    original prompt length (``rswa_prefix_lens``), and the engine's plan."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: List[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.settings = plugin_config.load_settings(vllm_config)
        plugin_config.activate(self.settings)
        #: This vLLM engine's eviction engine (per-request state of every layer), handed to the
        #: layers' impls through the metadata; never shared with another vLLM engine of the process.
        self.engine = EvictionEngine(self.settings.engine, block_size=kv_cache_spec.block_size)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> ForesightKVMetadata:
        """The step's plan from vLLM's per-batch metadata (requires ``req_idx``)."""
        cm = common_attn_metadata
        if cm.req_idx is None:
            raise ConfigError(
                "foresightkv needs a stable per-request index (CommonAttentionMetadata.req_idx), which only "
                "vLLM's model runner V2 provides"
            )
        n = cm.num_reqs
        qsl_t = cm.query_start_loc_cpu[: n + 1]
        num_new_t = qsl_t[1:] - qsl_t[:-1]
        seq_lens_t = cm.seq_lens[:n].cpu()
        keys = [int(k) for k in cm.req_idx[:n].tolist()]
        seq_lens, num_new = seq_lens_t.tolist(), num_new_t.tolist()
        if cm.is_prefilling is not None:
            prefilling = cm.is_prefilling[:n].cpu().tolist()
        else:
            prefilling = (num_new_t > 1).tolist()
        rows: List[int] = []
        if self.settings.engine.protect_prompt:
            if cm.rswa_prefix_lens is None:
                raise ConfigError(
                    "foresightkv's protect_prompt needs each request's prompt length "
                    "(CommonAttentionMetadata.rswa_prefix_lens), which model runner V2 passes when the model "
                    f"config has an R-SWA window (--hf-overrides '{{\"rswa_window\": {self.settings.window}}}')"
                )
            prompt_lens = [int(p) for p in cm.rswa_prefix_lens[:n].cpu().tolist()]
            requests = []
            for i in range(n):
                parts = step_requests(keys[i], seq_lens[i], num_new[i], bool(prefilling[i]), prompt_lens[i])
                requests.extend(parts)
                rows.extend([i] * len(parts))
            batch = StepBatch.of(requests)
        else:
            batch = StepBatch(keys, seq_lens, num_new, prefilling, (seq_lens_t == num_new_t).tolist())
        plan = self.engine.begin_step(batch)
        table = cm.block_table_tensor[:n]
        if rows and len(rows) != n:
            table = table.index_select(0, torch.tensor(rows, dtype=torch.long, device=table.device))
        return ForesightKVMetadata(
            num_actual_tokens=int(qsl_t[n]),
            plan=plan,
            block_table=table,
            slot_mapping=cm.slot_mapping[: cm.num_actual_tokens],
            engine=self.engine,
        )


class ForesightKVImpl(AttentionImpl[ForesightKVMetadata]):
    """One layer's attention: writes the new K/V into vLLM's cache, then runs the engine's attention
    over each request's live window and, when due, this layer's eviction (in place)."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: Optional[int] = None,
        alibi_slopes: Optional[List[float]] = None,
        sliding_window: Optional[int] = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: Optional[float] = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: Optional[str] = None,
        **extra: Any,
    ) -> None:
        problems = []
        if alibi_slopes is not None:
            problems.append("ALiBi")
        if sliding_window is not None:
            problems.append(f"a model sliding window ({sliding_window})")
        if logits_soft_cap:
            problems.append("logits soft-capping")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type}")
        if kv_sharing_target_layer_name is not None:
            problems.append("KV sharing between layers")
        if extra.get("sinks") is not None:
            problems.append("attention sinks")
        if problems:
            raise ConfigError(f"foresightkv does not support {', '.join(problems)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.settings = plugin_config.settings_for_current_config()

    def do_kv_cache_update(
        self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping
    ) -> None:
        """Writes the new tokens' K/V at ``slot_mapping`` (negative slots are padding and skipped).
        Plain torch indexing: foresightkv's ``reshape_and_cache`` refuses K and V views that share one
        allocation, which vLLM's page (K and V interleaved per slot) always is."""
        k_cache, v_cache = split_kv_cache(kv_cache, self.head_size)
        n = slot_mapping.shape[0]
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        bs = k_cache.shape[1]
        blocks, offs = slots // bs, slots % bs
        k_cache[blocks, offs] = key[:n][valid].to(k_cache.dtype)
        v_cache[blocks, offs] = value[:n][valid].to(v_cache.dtype)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Optional[ForesightKVMetadata],
        output: torch.Tensor,
        output_scale: Optional[torch.Tensor] = None,
        output_block_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention of the step's queries over the live windows, then this layer's due evictions."""
        if output_scale is not None or output_block_scale is not None:
            raise ConfigError("foresightkv does not support fused output quantization")
        if attn_metadata is None:
            return output
        from vllm.model_executor.models.utils import extract_layer_index

        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        k_cache, v_cache = split_kv_cache(kv_cache, self.head_size)
        attn_metadata.engine.attend(
            attn_metadata.plan,
            extract_layer_index(layer.layer_name),
            q,
            k_cache,
            v_cache,
            attn_metadata.block_table,
            out,
            scale=self.scale,
        )
        return output


class ForesightKVBackend(AttentionBackend):
    """foresightkv's vLLM attention backend (registered as ``CUSTOM``): attention over each request's
    live window, learned eviction, and a sliding-window KV spec so vLLM returns evicted blocks."""

    supported_dtypes: ClassVar[List[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[List[str]] = list(SUPPORTED_KV_CACHE_DTYPES)
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        """``CUSTOM``: vLLM maps the name back to the enum member the layer stores."""
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        """The per-layer attention implementation."""
        return ForesightKVImpl

    @staticmethod
    def get_builder_cls():
        """The per-step metadata builder."""
        return ForesightKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        """Block sizes that are multiples of 16."""
        return [MultipleOf(BLOCK_SIZE_MULTIPLE)]

    @classmethod
    def get_supported_head_sizes(cls) -> List[int]:
        """The head sizes foresightkv's kernels are built for."""
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supported_kv_cache_layouts(cls):
        """(block, token, head) order, so K and V views have the strides the kernels take."""
        return (KVCacheLayout.LBNHC,)

    @classmethod
    def supports_rswa(cls) -> bool:
        """True: protect mode asks for vLLM's R-SWA window (only so that model runner V2 passes prompt
        lengths); the backend then protects each request's prompt itself."""
        return True

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """The live-window spec of ``spec`` for this process's configuration (``live_window_spec``)."""
        return live_window_spec(spec, plugin_config.settings_for_current_config())

"""The plugin configuration inside vLLM: the ``foresightkv`` entry of ``--additional-config`` (vLLM's
documented channel for out-of-tree configuration; ``$FORESIGHTKV_CONFIG`` is the fallback), checked
against the model and engine settings the backend supports, and cached per process for the calls vLLM
makes without a current config (``customize_spec``)."""

import os
import threading
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

import torch

from foresightkv.engine import CONFIG_ENV, EngineConfig
from foresightkv.errors import ConfigError, Error

#: Key of the plugin's entry in vLLM's ``additional_config``.
CONFIG_KEY = "foresightkv"

#: Head sizes the foresightkv kernels are built for.
SUPPORTED_HEAD_SIZES = (64, 128, 256)

#: Model dtypes the backend accepts on GPUs (float32 only on vLLM's CPU platform).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

#: ``--kv-cache-dtype`` values the backend accepts (compaction moves raw, unquantised K/V).
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")

#: vLLM block sizes must be a multiple of this (the paged kernels' granularity).
BLOCK_SIZE_MULTIPLE = 16

_EXAMPLE = (
    '--additional-config \'{"foresightkv": {"budget": 1024, "interval": 128, '
    '"policy": "foresight", "checkpoint": "/path/to/scorer"}}\''
)


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of the model being served: what the kernels and a scorer must fit."""

    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_size: int
    dtype: torch.dtype

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class PluginSettings:
    """Everything the backend needs from vLLM's configuration: the validated ``EngineConfig``, the
    block size it was validated for, and the model's attention shape."""

    engine: EngineConfig
    block_size: int
    shape: ModelShape
    #: vLLM's bound on running requests (``--max-num-seqs``), the request slots of the query rings
    #: (0: not known)
    max_requests: int = 0

    @property
    def window(self) -> int:
        """The sliding window vLLM's KV manager keeps per request: budget B + interval L."""
        return self.engine.budget + self.engine.interval


_lock = threading.Lock()
_active: Optional[PluginSettings] = None
#: The last vLLM config ``settings_for_current_config`` validated, with its settings.
_for_config: Optional[Tuple[Any, PluginSettings]] = None


def raw_config(vllm_config: Any) -> Optional[Mapping[str, Any]]:
    """The ``foresightkv`` entry of ``vllm_config.additional_config``, or None when it has none."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, Mapping):
        return None
    return extra.get(CONFIG_KEY)


def model_shape(vllm_config: Any) -> ModelShape:
    """The attention shape of ``vllm_config``'s model (per tensor-parallel rank)."""
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    return ModelShape(
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=mc.get_num_kv_heads(pc),
        num_heads=mc.get_num_attention_heads(pc),
        head_size=mc.get_head_size(),
        dtype=mc.dtype,
    )


def load_settings(vllm_config: Any, *, env: Optional[Mapping[str, str]] = None) -> PluginSettings:
    """Reads and validates the plugin configuration for ``vllm_config``: every problem (missing or
    malformed options, unsupported head size, dtype, KV cache dtype, block size, prefix caching,
    speculative decoding, a model with its own sliding window, MLA or hybrid models, a scorer for
    another model shape, protect mode without the R-SWA window that carries prompt lengths) raises
    one ``ConfigError`` listing them all. Also refused: chunked prefill outside protect mode
    (``_chunking_problems``), full CUDA graphs and attention that is not a splitting op of the
    piecewise graphs (``_cudagraph_problems``), context parallelism and KV connectors."""
    env = os.environ if env is None else env
    block_size = vllm_config.cache_config.block_size
    problems: List[str] = []
    shape = model_shape(vllm_config)
    problems.extend(_engine_problems(vllm_config, shape, block_size))
    raw = raw_config(vllm_config)
    engine: Optional[EngineConfig] = None
    schedule_bs = block_size if isinstance(block_size, int) and block_size > 0 else 1
    try:
        if raw is not None:
            engine = EngineConfig.from_dict(raw, block_size=schedule_bs)
        elif env.get(CONFIG_ENV, "").strip():
            engine = EngineConfig.from_env(block_size=schedule_bs, env=env)
        else:
            problems.append(f"foresightkv needs its configuration: pass {_EXAMPLE} (or set {CONFIG_ENV})")
    except ConfigError as e:
        problems.append(str(e))
    if engine is not None:
        problems.extend(_protect_problems(vllm_config, engine))
        problems.extend(_chunking_problems(vllm_config, engine))
        problems.extend(_scorer_problems(engine, shape))
    if problems:
        raise ConfigError("foresightkv cannot serve this model: " + "; ".join(problems))
    assert engine is not None
    sched = getattr(vllm_config, "scheduler_config", None)
    max_requests = getattr(sched, "max_num_seqs", 0)
    max_requests = max_requests if isinstance(max_requests, int) and max_requests > 0 else 0
    return PluginSettings(engine=engine, block_size=block_size, shape=shape, max_requests=max_requests)


def _engine_problems(vllm_config: Any, shape: ModelShape, block_size: Optional[int]) -> List[str]:
    """Engine and model settings the backend does not support, as messages naming the fix."""
    from vllm.platforms import current_platform

    out = []
    cc = vllm_config.cache_config
    mc = vllm_config.model_config
    if shape.head_size not in SUPPORTED_HEAD_SIZES:
        out.append(f"head size {shape.head_size} is not supported (supported: {list(SUPPORTED_HEAD_SIZES)})")
    dtypes = SUPPORTED_DTYPES + ((torch.float32,) if current_platform.is_cpu() else ())
    if shape.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        out.append(
            f"model dtype {str(shape.dtype).replace('torch.', '')} is not supported (use --dtype with one of {names})"
        )
    if cc.cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        out.append(
            f"KV cache dtype '{cc.cache_dtype}' is not supported: eviction moves raw K/V "
            f"(use --kv-cache-dtype with one of {list(SUPPORTED_KV_CACHE_DTYPES)})"
        )
    if block_size is None or block_size % BLOCK_SIZE_MULTIPLE != 0:
        out.append(
            f"block size {block_size} is not supported (use --block-size with a multiple of {BLOCK_SIZE_MULTIPLE})"
        )
    if cc.enable_prefix_caching:
        out.append(
            "prefix caching must be off: eviction rewrites KV blocks in place, so a cached block would no "
            "longer hold what its hash says (add --no-enable-prefix-caching)"
        )
    if vllm_config.speculative_config is not None:
        out.append("speculative decoding is not supported (drop --speculative-config)")
    if mc.get_sliding_window() is not None:
        out.append(
            f"the model has its own sliding window ({mc.get_sliding_window()} tokens); foresightkv needs "
            "full-attention layers"
        )
    if mc.use_mla:
        out.append("MLA models are not supported")
    if mc.is_hybrid:
        out.append("hybrid models (Mamba or linear-attention layers next to attention) are not supported")
    pc = vllm_config.parallel_config
    for name, flag in (
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        size = getattr(pc, name, 1) or 1
        if size > 1:
            out.append(f"context parallelism is not supported (drop {flag} {size})")
    if getattr(pc, "enable_dbo", False) or (getattr(pc, "ubatch_size", 0) or 0) > 1:
        # Micro-batches run the same layers' attention interleaved: the one planned step per forward,
        # its query rings and its pending evictions would be shared between them.
        flag = "--enable-dbo" if getattr(pc, "enable_dbo", False) else f"--ubatch-size {pc.ubatch_size}"
        out.append(f"micro-batching (dual batch overlap) is not supported (drop {flag})")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        out.append(
            "KV connectors are not supported: KV written or read outside the backend bypasses eviction "
            "(drop --kv-transfer-config)"
        )
    out.extend(_cudagraph_problems(vllm_config))
    return out


def _cudagraph_problems(vllm_config: Any) -> List[str]:
    """CUDA-graph settings the backend cannot run under. Its attention step has data-dependent
    control flow (evictions, host-side plans), so it must run eagerly between vLLM's piecewise
    graphs: the builder declares ``AttentionCGSupport.NEVER``, vLLM then turns its default
    ``FULL_AND_PIECEWISE`` into ``PIECEWISE`` by itself, and the attention op must stay a splitting
    op. Full graphs for mixed batches (``FULL``) and a piecewise split without the attention op are
    refused here, naming the flag; ``--enforce-eager`` is never required."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return []
    out = []
    if mode.mixed_mode() == CUDAGraphMode.FULL:
        out.append(
            f"cudagraph_mode {mode.name} captures attention in full CUDA graphs, which foresightkv's eviction "
            "step cannot run in (use -cc '{\"cudagraph_mode\": \"PIECEWISE\"}', the default "
            "FULL_AND_PIECEWISE, or --enforce-eager)"
        )
    elif mode.has_piecewise_cudagraphs() and cc.mode == CompilationMode.VLLM_COMPILE:
        if not (cc.splitting_ops_contain_attention() or cc.use_inductor_graph_partition):
            out.append(
                "piecewise CUDA graphs must split at the attention op (vllm::unified_attention_with_output), "
                f"which the splitting ops {cc.splitting_ops} leave out (drop the custom splitting_ops from -cc)"
            )
    return out


def _chunking_problems(vllm_config: Any, engine: EngineConfig) -> List[str]:
    """Chunked prefill outside protect mode: the method compresses a prompt once, after the whole
    prompt, but vLLM's ``SlidingWindowManager`` frees every block before ``n - W + 1`` between two
    chunks of a prompt, so compression cannot wait for the last chunk; compressing at each chunk's
    end would make the kept set depend on how vLLM chunked the prompt (on load). So a prompt must
    arrive in one step: ``--no-enable-chunked-prefill`` (vLLM then needs ``--max-num-batched-tokens
    >= --max-model-len``) and no ``--long-prefill-token-threshold`` below the model length. Protect
    mode keeps and never compresses the prompt, so it allows chunked prefill; so does a model length
    within the budget (no prompt is ever compressed) and the ``full_cache`` policy."""
    max_len = vllm_config.model_config.max_model_len
    if engine.protect_prompt or engine.policy == "full_cache" or max_len <= engine.budget:
        return []
    sc = vllm_config.scheduler_config
    out = []
    if sc.enable_chunked_prefill:
        out.append(
            "chunked prefill is not supported outside protect mode: the prompt is compressed once after it "
            "is complete, and vLLM frees the blocks outside the window between chunks (add "
            f"--no-enable-chunked-prefill, with --max-num-batched-tokens >= --max-model-len {max_len}; or "
            "set 'protect_prompt': true)"
        )
    threshold = sc.long_prefill_token_threshold or 0
    if 0 < threshold < max_len:
        out.append(
            f"--long-prefill-token-threshold {threshold} splits prompts into chunks, which is not supported "
            "outside protect mode (use --long-prefill-token-threshold 0)"
        )
    return out


def _protect_problems(vllm_config: Any, engine: EngineConfig) -> List[str]:
    """Protect mode needs each request's original prompt length, which model runner V2 hands the
    attention backends (``CommonAttentionMetadata.rswa_prefix_lens``) only when the model config has
    an R-SWA window: it must be set, to the window the plugin gives vLLM's ``RSWAManager``."""
    window = engine.budget + engine.interval
    have = vllm_config.model_config.rswa_window
    if not engine.protect_prompt:
        if have is not None:
            return [
                f"the model config has an R-SWA window ({have}), which only 'protect_prompt' uses "
                "(drop 'rswa_window' from --hf-overrides or set 'protect_prompt': true)"
            ]
        return []
    if have != window:
        return [
            f"'protect_prompt' needs vLLM to pass each request's prompt length to the backend, which it does "
            f"for models with an R-SWA window: add --hf-overrides '{{\"rswa_window\": {window}}}' "
            f"(budget + interval; got {have})"
        ]
    return []


def _scorer_problems(engine: EngineConfig, shape: ModelShape) -> List[str]:
    """A scorer checkpoint that cannot be loaded or was trained for another model shape."""
    if engine.policy != "foresight":
        return []
    try:
        ck = engine.load_checkpoint()
    except ConfigError as e:
        return [str(e)]
    assert ck is not None
    try:
        ck.check_model(shape.num_layers, shape.num_kv_heads, shape.group, shape.head_size)
    except Error as e:
        return [
            f"scorer checkpoint {engine.checkpoint} does not fit the model ({shape.num_layers} layers, "
            f"{shape.num_kv_heads} KV heads, group {shape.group}, head size {shape.head_size}): {e}"
        ]
    return []


def activate(settings: PluginSettings) -> None:
    """Makes ``settings`` the process's configuration (read by ``customize_spec``)."""
    global _active
    with _lock:
        _active = settings


def active() -> Optional[PluginSettings]:
    """The process's configuration, if the backend has been set up in this process."""
    return _active


def settings_for_current_config() -> PluginSettings:
    """The settings of vLLM's current config (validated once per config object), else (no config is
    current, e.g. ``customize_spec`` called outside vLLM's config context) those last activated in this
    process; ``ConfigError`` when neither exists. The current config wins over the cache, so an engine
    made after another in the same process never gets the first one's settings."""
    global _for_config
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    if cfg is None:
        cached = _active
        if cached is None:
            raise ConfigError("foresightkv: no vLLM configuration is current and none was cached in this process")
        return cached
    with _lock:
        last = _for_config
    if last is not None and last[0] is cfg:
        return last[1]
    settings = load_settings(cfg)
    with _lock:
        _for_config = (cfg, settings)
    activate(settings)
    return settings

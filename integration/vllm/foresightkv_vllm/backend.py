"""The foresightkv attention backend for vLLM 0.32: the backend class vLLM resolves ``CUSTOM`` to, the
KV cache spec it hands vLLM's KV manager (a sliding window of budget + interval tokens, so vLLM frees
the blocks before each request's live window itself; in protect mode an R-SWA spec that keeps the
original prompt and frees the gap between it and the window; the window statistics packed into the same
page, so vLLM's KV sizing reserves them), and the metadata builder and impl that run
``foresightkv.engine.EvictionEngine`` over vLLM's paged cache in place."""

import logging
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import numpy as np
import torch

from foresightkv._native import NUM_STATS
from foresightkv.engine import EvictionEngine, StepBatch, StepPlan, StepRequest, request_rng_key, ring_rows
from foresightkv.errors import ConfigError, EvictionStateError
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
from . import lifecycle
from .config import BLOCK_SIZE_MULTIPLE, SUPPORTED_HEAD_SIZES, SUPPORTED_KV_CACHE_DTYPES, PluginSettings


def stats_content_bytes(settings: PluginSettings) -> int:
    """Bytes of window statistics per (block, slot, KV head) cell of the page: float32 ``[G, 8]``
    (``G`` query heads per KV head), 0 for a policy that never evicts (``full_cache``)."""
    if settings.engine.policy == "full_cache":
        return 0
    return settings.shape.group * NUM_STATS * 4


def live_window_spec(spec: AttentionSpec, settings: PluginSettings) -> AttentionSpec:
    """The spec vLLM's KV manager should use for a full-attention layer under foresightkv: a
    ``SlidingWindowSpec`` of ``budget + interval`` tokens, so the manager frees every block before
    ``align_down(n - W + 1)`` while the engine's schedule keeps ``live_start`` at or after it. In protect
    mode an ``RSWASpec`` of window ``W``: vLLM's ``RSWAManager`` keeps the blocks of the original prompt
    ``[0, cdiv(P, bs))`` and frees those in ``[cdiv(P, bs), align_down(max(P, n - W)))``, while the
    engine keeps its evictable window from ``align_up(P)`` under ``W`` tokens. Each (block, slot, KV
    head) cell holds K, V and then the float32 window statistics of that entry
    (``state_content_bytes``, vLLM's packing channel for backends): vLLM's page size, hence its
    KV sizing under ``--gpu-memory-utilization`` and its block count, includes them, and they are
    allocated with the KV cache at start-up. Other specs, and every spec under the ``full_cache``
    policy (which never evicts, so attention reads the whole sequence), are returned unchanged."""
    if type(spec) is not FullAttentionSpec or settings.engine.policy == "full_cache":
        return spec
    packed = {}
    extra = stats_content_bytes(settings)
    if extra:
        packed["state_content_bytes"] = spec.state_content_size_bytes + extra
    if settings.engine.protect_prompt:
        return replace_as(spec, RSWASpec, rswa_window=settings.window, **packed)
    return replace_as(
        spec,
        SlidingWindowSpec,
        drop=("attention_chunk_size", "non_causal"),
        sliding_window=settings.window,
        **packed,
    )


def split_kv_cache(
    kv_cache: torch.Tensor, head_size: int, group: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """K, V ``[num_blocks, block_size, H, D]`` and the statistics ``[num_blocks, block_size, H, G, 8]``
    (float32; None when ``group`` is 0, the page holds no statistics) as views over vLLM's per-layer
    cache ``[num_blocks, H, block_size, C]``, whose cell is K (``D`` elements), V (the next ``D``;
    the convention of vLLM's Triton backend), then the statistics' bytes, in place."""
    want = 2 * head_size + (group * NUM_STATS * 4) // kv_cache.element_size()
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != want:
        raise ConfigError(
            f"foresightkv expects a KV cache [blocks, heads, block_size, {want}] (K, V"
            f"{' and statistics' if group else ''} of head size {head_size}), got {tuple(kv_cache.shape)}"
        )
    cells = kv_cache.transpose(1, 2)
    k, v = cells[..., :head_size], cells[..., head_size : 2 * head_size]
    if not group:
        return k, v, None
    stats = cells[..., 2 * head_size :].view(torch.float32).unflatten(-1, (group, NUM_STATS))
    return k, v, stats


@dataclass
class ForesightKVMetadata:
    """Per-step metadata: the engine's plan (live windows, due evictions) for the step's real
    requests, None when the step has none (a dummy batch: DP busy loop, warm-up, profiling, graph
    capture), the block table (one row per engine request of the plan; entry ``i`` = block of
    positions ``[i * block_size, (i + 1) * block_size)``; entries before a live window, after the
    protected prompt, are stale and never read), the slot mapping of the new tokens, and, when some
    rows are dummies, the token indices of the real rows (``token_index``, on the table's device), and
    the engine of the builder that planned it (one per vLLM engine: per-request state never crosses
    from one engine of a process to another)."""

    num_actual_tokens: int
    plan: Optional[StepPlan]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    token_index: Optional[torch.Tensor] = None
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


#: Request part of the victim RNG key of every vLLM request (see ``RequestKeys``).
VLLM_RNG_KEY = request_rng_key("vllm")


class RequestKeys:
    """Each vLLM request's engine key, learned from the KV blocks it owns, so that it works under
    every model runner vLLM 0.32 can use (model runner V2, the V1 runner, the CPU runner, which
    condenses its rows every step and passes no ``req_idx``) and never mistakes a dummy row for a
    live request.

    A request's last written token sits in a block only that request holds (prefix caching is off,
    and vLLM's sliding-window and R-SWA managers never free the block of the newest token), so after
    each step the key is filed under that block with the request's length (its anchor). The next
    step finds a row with ``c > 0`` computed tokens by the block its table gives for position
    ``c - 1``; a row with nothing computed is a new request or one recomputed after preemption (a
    new key); a row whose new tokens have no KV slot (vLLM writes none for dummy batches:
    ``InputBatch.make_dummy``, the V1 runner's ``_dummy_run``, CUDA-graph padding) is not a
    request at all and gets no state.

    A finished, aborted or preempted request's blocks go back to vLLM's pool; when one of them
    reappears as a new block of another request, the old owner is gone and its state is
    released (``EvictionEngine.release``).

    vLLM hands attention backends neither request ids nor sampling seeds, and its request ids are
    randomized per engine (``InputProcessor.assign_request_id``), so the request part of the victim
    RNG key is ``VLLM_RNG_KEY`` for every request: victims depend on the configured seed, layer, head,
    eviction index and the request's own KV only, never on what the process served before.

    The table is two host arrays indexed by block id (the key anchored there, -1 for none, and its
    length), so a step resolves and files every row of the batch with a few array operations, not
    Python per request (numpy: a tenth of a torch CPU op's fixed cost, which dominates at these
    sizes)."""

    def __init__(self, engine: EvictionEngine, block_size: int) -> None:
        self.engine = engine
        self.block_size = block_size
        #: block id -> key of the request whose last token (after its last step) is there, or -1
        self._key = np.full(0, -1, dtype=np.int64)
        #: block id -> that request's length after the step
        self._len = np.zeros(0, dtype=np.int64)
        self._next = 0

    def __len__(self) -> int:
        return int(np.count_nonzero(self._key >= 0))

    def _fit(self, blocks: np.ndarray) -> None:
        """Grows the table to hold every block id of ``blocks`` (doubling)."""
        top = int(blocks.max()) + 1 if blocks.size else 0
        size = self._key.size
        if top > size:
            grow = max(top, 2 * size, 64) - size
            self._key = np.concatenate([self._key, np.full(grow, -1, dtype=np.int64)])
            self._len = np.concatenate([self._len, np.zeros(grow, dtype=np.int64)])

    def resolve(self, computed: np.ndarray, prev_blocks: np.ndarray) -> np.ndarray:
        """The keys of real rows (int64) with ``computed`` tokens computed (new keys, in row order,
        where 0); ``prev_blocks`` is the block each row's table gives for position ``computed - 1``."""
        at = np.maximum(prev_blocks, 0)
        self._fit(at)
        key, known = self._key[at], self._len[at]
        new = computed == 0
        bad = ~new & ((prev_blocks < 0) | (key < 0) | (known != computed))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            entry = None if key[i] < 0 else (int(key[i]), int(known[i]))
            raise EvictionStateError(
                f"foresightkv has no state for a request with {int(computed[i])} computed tokens whose last "
                f"token is in block {int(prev_blocks[i])} (known there: {entry}): its KV was written without "
                "the backend (prefix caching, a KV connector, or another backend), which foresightkv "
                "does not support"
            )
        fresh = int(np.count_nonzero(new))
        if fresh:
            key[new] = np.arange(self._next + 1, self._next + 1 + fresh, dtype=np.int64)
            self._next += fresh
        return key

    def claim(
        self,
        keys: np.ndarray,
        lengths: np.ndarray,
        prev_blocks: np.ndarray,
        new: np.ndarray,
        token_blocks: np.ndarray,
        token_keys: np.ndarray,
        last_blocks: np.ndarray,
    ) -> None:
        """Files each row's key (length ``lengths`` after the step) under ``last_blocks``, the block of
        its last token, in place of its previous anchor ``prev_blocks`` (rows not ``new``); releases
        every other request anchored in a block the batch's new tokens were written to
        (``token_blocks``, of requests ``token_keys``): vLLM freed it, so its previous owner is gone."""
        self._fit(token_blocks)
        owner = self._key[token_blocks]
        stale = (owner >= 0) & (owner != token_keys)
        if stale.any():
            for key in np.unique(owner[stale]).tolist():
                self.forget(key)
        self._key[prev_blocks[~new]] = -1
        self._key[last_blocks] = keys
        self._len[last_blocks] = lengths

    def release_anchored(self, blocks: np.ndarray, computed: int) -> int:
        """Releases the request whose key is anchored in ``blocks`` (a request's block table, in
        position order) at the block of its last token with more than ``computed`` tokens, looking
        only at ``blocks[computed // block_size:]`` (``lifecycle.release_anchored`` says why);
        returns 1 when one was released, else 0."""
        first = max(int(computed), 0) // self.block_size
        tail, index = blocks[first:], np.arange(first, max(blocks.size, first))
        ok = (tail >= 0) & (tail < self._key.size)
        tail, index = tail[ok], index[ok]
        if not tail.size:
            return 0
        key, length = self._key[tail], self._len[tail]
        hit = (key >= 0) & (length > computed) & ((length - 1) // self.block_size == index)
        if not hit.any():
            return 0
        self.forget(int(key[np.flatnonzero(hit)[0]]))
        return 1

    def key_at(self, block: int) -> Optional[int]:
        """The key of the request whose last token (after its last step) is in ``block``, if any."""
        if not 0 <= block < self._key.size or self._key[block] < 0:
            return None
        return int(self._key[block])

    def block_of(self, key: int) -> Optional[int]:
        """The block ``key`` is anchored in, if any."""
        at = np.flatnonzero(self._key == key)
        return int(at[0]) if at.size else None

    def forget(self, key: int) -> None:
        """Releases ``key``'s state in the engine and its anchor."""
        self._key[self._key == key] = -1
        self.engine.release(key)


_keys_lock = threading.Lock()
_keys: Dict[int, RequestKeys] = {}


def request_keys(engine: EvictionEngine, block_size: int) -> RequestKeys:
    """The ``RequestKeys`` of ``engine`` (one per engine, shared by every builder of the process)."""
    with _keys_lock:
        rk = _keys.get(id(engine))
        if rk is None or rk.engine is not engine:
            rk = _keys[id(engine)] = RequestKeys(engine, block_size)
        return rk


#: Under vLLM's ``vllm`` logger, so the start-up messages appear with vLLM's own.
logger = logging.getLogger("vllm.foresightkv")


class ForesightKVMetadataBuilder(AttentionMetadataBuilder[ForesightKVMetadata]):
    """Builds ``ForesightKVMetadata`` once per step: per real request its key (``RequestKeys``:
    by the blocks it owns, under every model runner), a reset when the request starts over (nothing
    computed yet), in protect mode its original prompt length (``rswa_prefix_lens``), and the
    engine's plan. Dummy rows (no KV slot) get no state and no plan row."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: List[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.settings = plugin_config.load_settings(vllm_config)
        plugin_config.activate(self.settings)
        #: This vLLM engine's eviction engine (per-request state of every layer), handed to the
        #: layers' impls through the metadata; never shared with another vLLM engine of the process.
        self.engine = EvictionEngine(self.settings.engine, block_size=kv_cache_spec.block_size)
        self.keys = request_keys(self.engine, kv_cache_spec.block_size)
        #: Whether vLLM's V1 runner releases finished, aborted and preempted requests' state (``lifecycle``;
        #: not Model Runner V2, where a request's state goes when its block is reused).
        self.releases_finished = lifecycle.install() and not getattr(vllm_config, "use_v2_model_runner", False)
        #: Bytes of the layers' query rings this engine took (allocated at model construction).
        self.ring_bytes = adopt_layer_rings(self.engine, vllm_config, layer_names, bound=self.releases_finished)
        per_block = stats_content_bytes(self.settings) * kv_cache_spec.block_size * self.settings.shape.num_kv_heads
        if per_block:
            blocks = getattr(vllm_config.cache_config, "num_gpu_blocks", None)
            total = "sized with the KV cache"
            if blocks:
                total = f"{per_block * blocks * len(layer_names)} bytes in all ({blocks} blocks x {len(layer_names)} layers)"
            logger.info(
                "foresightkv: window statistics reserved inside vLLM's KV cache pages: %d of %d bytes per "
                "block and layer, %s",
                per_block,
                kv_cache_spec.page_size_bytes,
                total,
            )

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> ForesightKVMetadata:
        """The step's plan from vLLM's per-batch metadata (any model runner)."""
        cm = common_attn_metadata
        n = cm.num_reqs
        bs = self.keys.block_size
        # Host arithmetic in numpy over vLLM's CPU mirrors (no Python per request; see RequestKeys).
        qsl = cm.query_start_loc_cpu[: n + 1].numpy().astype(np.int64)
        num_new = np.diff(qsl)
        num_tokens = int(qsl[n]) if n else 0
        if cm.seq_lens_cpu_upper_bound is not None:
            seq_lens = cm.seq_lens_cpu_upper_bound[:n].numpy().astype(np.int64)
        else:
            seq_lens = cm.seq_lens[:n].cpu().numpy().astype(np.int64)
        computed = seq_lens - num_new
        table = cm.block_table_tensor[:n]
        width = table.shape[1]
        # one host copy: every new token's slot, and the block of each row's last computed token
        cols = np.minimum(np.maximum(computed - 1, 0) // bs, max(width - 1, 0))
        flat = torch.from_numpy(np.arange(n) * width + cols).to(table.device)
        prev = table.reshape(-1).index_select(0, flat) if width else flat
        host = torch.cat([cm.slot_mapping[:num_tokens].long(), prev.long()]).cpu().numpy()
        slots, prev_blocks = host[:num_tokens], host[num_tokens:]
        # real rows: new tokens with a KV slot (vLLM writes none for dummy rows)
        if num_tokens:
            real_mask = (num_new > 0) & (slots[np.minimum(qsl[:-1], num_tokens - 1)] >= 0)
        else:
            real_mask = np.zeros(n, dtype=bool)
        meta = dict(
            num_actual_tokens=num_tokens, slot_mapping=cm.slot_mapping[: cm.num_actual_tokens], engine=self.engine
        )
        all_real = bool(real_mask.all())
        real = np.arange(n) if all_real else np.flatnonzero(real_mask)
        if not real.size:
            return ForesightKVMetadata(plan=None, block_table=table[:0], **meta)
        computed_r, seq_r, new_r = computed[real], seq_lens[real], num_new[real]
        fresh = computed_r == 0
        keys = self.keys.resolve(computed_r, prev_blocks[real])
        if cm.is_prefilling is not None:
            prefilling = np.asarray(cm.is_prefilling[:n].cpu())[real]
        else:
            prefilling = new_r > 1
        rows: Optional[List[int]] = None if all_real else real.tolist()
        if self.settings.engine.protect_prompt:
            if cm.rswa_prefix_lens is None:
                raise ConfigError(
                    "foresightkv's protect_prompt needs each request's prompt length "
                    "(CommonAttentionMetadata.rswa_prefix_lens), which vLLM passes when the model "
                    f"config has an R-SWA window (--hf-overrides '{{\"rswa_window\": {self.settings.window}}}')"
                )
            prompt_lens = np.asarray(cm.rswa_prefix_lens[:n].cpu())[real].tolist()
            requests: List[StepRequest] = []
            rows = []
            for key, i, s_len, k_new, pre, p in zip(
                keys.tolist(), real.tolist(), seq_r.tolist(), new_r.tolist(), prefilling.tolist(), prompt_lens
            ):
                parts = step_requests(key, s_len, k_new, bool(pre), int(p))
                requests.extend(replace_rng(r) for r in parts)
                rows.extend([i] * len(parts))
            batch = StepBatch.of(requests)
        else:
            # one plan row per real row, its columns handed over as CPU tensors (the binding reads them
            # in place; torch.from_numpy shares the memory)
            cols = (seq_r, new_r, prefilling.astype(np.int64), fresh.astype(np.int64))
            rng = torch.full((real.size,), VLLM_RNG_KEY, dtype=torch.int64)
            batch = StepBatch(keys.tolist(), *(torch.from_numpy(c) for c in cols), None, rng)
        plan = self.engine.begin_step(batch)
        # file each row under the block of its last token; the blocks the real rows' new tokens went to
        # (all tokens unless dummy rows are mixed in)
        keep = None if all_real else np.repeat(real_mask, num_new)
        token_blocks = (slots if keep is None else slots[keep]) // bs
        last_blocks = slots[qsl[1:][real] - 1] // bs
        self.keys.claim(keys, seq_r, prev_blocks[real], fresh, token_blocks, np.repeat(keys, new_r), last_blocks)
        if rows is not None and rows != list(range(n)):
            table = table.index_select(0, torch.tensor(rows, dtype=torch.long, device=table.device))
        token_index = None
        if keep is not None:
            token_index = torch.from_numpy(np.flatnonzero(keep)).to(cm.block_table_tensor.device)
        return ForesightKVMetadata(plan=plan, block_table=table, token_index=token_index, **meta)


def layer_rings(vllm_config, layer_names: List[str]) -> Dict[int, torch.Tensor]:
    """Layer index -> the query ring its ``ForesightKVImpl`` allocated at model construction, for the
    layers of ``layer_names`` that have one."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    out = {}
    for name, layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).items():
        ring = getattr(getattr(layer, "impl", None), "query_ring", None)
        if isinstance(ring, torch.Tensor):
            out[extract_layer_index(name)] = ring
    return out


def adopt_layer_rings(engine: EvictionEngine, vllm_config, layer_names: List[str], *, bound: bool) -> int:
    """Hands ``engine`` the query rings of its layers (``layer_rings``) and returns their bytes (0 when
    the layers have none). ``bound``: the requests holding state never exceed vLLM's
    ``max_num_seqs`` because the runner releases every finished, aborted and preempted request
    (``lifecycle``), so the engine refuses more (``CapacityError``) and never allocates past the
    rings; otherwise (Model Runner V2) the rings are where they start and grow on demand."""
    rings = layer_rings(vllm_config, layer_names)
    if not rings:
        return 0
    first = next(iter(rings.values()))
    engine.adopt_rings(rings, max_requests=first.shape[0], num_q_heads=first.shape[2], head_dim=first.shape[3],
                       dtype=first.dtype, device=first.device, bound=bound)
    total = sum(r.numel() * r.element_size() for r in rings.values())
    logger.info(
        "foresightkv: query rings reserved at model construction (inside vLLM's memory profile): %d bytes "
        "(%.3f GiB) for %d layers x %d request slots x %d queries%s",
        total, total / 2**30, len(rings), first.shape[0], first.shape[1],
        "" if bound else " (Model Runner V2: grown past it on demand)",
    )
    return total


def replace_rng(r: StepRequest) -> StepRequest:
    """``r`` with the request part of its victim RNG key set to ``VLLM_RNG_KEY``."""
    return StepRequest(r.key, r.seq_len, r.num_new, r.prefill, r.reset, r.prompt_len, VLLM_RNG_KEY)


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
        #: Query heads per KV head whose statistics the page packs (0: the page holds K/V only).
        self.stats_group = self.settings.shape.group if stats_content_bytes(self.settings) else 0
        #: This layer's recent-query ring, ``[max_num_seqs, ring_rows(L), num_heads, head_size]`` in the
        #: model dtype, allocated here: vLLM builds the model on its device before it profiles memory,
        #: so the ring counts as model memory and the KV cache is sized around it
        #: (``--gpu-memory-utilization`` holds). The builder hands it to the engine (``layer_rings``).
        #: None for a policy that never evicts or when vLLM's request bound is unknown.
        self.query_ring: Optional[torch.Tensor] = None
        if self.stats_group and self.settings.max_requests:
            shape = (self.settings.max_requests, ring_rows(self.settings.engine.interval), num_heads, head_size)
            self.query_ring = torch.zeros(shape, dtype=self.settings.shape.dtype)

    def do_kv_cache_update(
        self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping
    ) -> None:
        """Writes the new tokens' K/V at ``slot_mapping``; negative slots (padding) go to slot 0 of
        block 0, vLLM's null block, which no request owns or reads. No data-dependent shape and no
        host round trip, so the write can be captured in vLLM's piecewise CUDA graphs (vLLM does not
        split them at ``unified_kv_cache_update``). Plain torch indexing: foresightkv's
        ``reshape_and_cache`` refuses K and V views that share one allocation, which vLLM's page (K
        and V interleaved per slot) always is."""
        k_cache, v_cache, _ = split_kv_cache(kv_cache, self.head_size, self.stats_group)
        n = slot_mapping.shape[0]
        slots = slot_mapping.long().clamp(min=0)
        bs = k_cache.shape[1]
        blocks, offs = slots // bs, slots % bs
        k_cache[blocks, offs] = key[:n].to(k_cache.dtype)
        v_cache[blocks, offs] = value[:n].to(v_cache.dtype)

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
        out = output[:n].view(n, self.num_heads, self.head_size)
        plan = attn_metadata.plan
        if plan is None or attn_metadata.token_index is not None:
            out.zero_()  # dummy rows: no request, no attention
        if plan is None:
            return output
        q = query[:n].view(n, self.num_heads, self.head_size)
        idx = attn_metadata.token_index
        if idx is not None:
            q = q.index_select(0, idx)
        dst = out if idx is None else torch.empty_like(q)
        k_cache, v_cache, stats = split_kv_cache(kv_cache, self.head_size, self.stats_group)
        attn_metadata.engine.attend(
            plan,
            extract_layer_index(layer.layer_name),
            q,
            k_cache,
            v_cache,
            attn_metadata.block_table,
            dst,
            scale=self.scale,
            stats=stats,
        )
        if idx is not None:
            out.index_copy_(0, idx, dst)
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

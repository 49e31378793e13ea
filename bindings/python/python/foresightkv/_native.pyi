"""Type stubs of the native module ``foresightkv._native`` (PyO3). Tensors are ``torch.Tensor`` (CPU
or CUDA) or ``numpy.ndarray`` (CPU); they are read and written in place, never copied."""

import array
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

TensorLike = Any
"""A ``torch.Tensor`` or ``numpy.ndarray``."""
Tokens = Union[Sequence[int], TensorLike, Iterable[int]]
PathLike = Union[str, "os.PathLike[str]"]

__version__: str
NUM_STATS: int
SCORER_HIDDEN: int

class EvictionConfig:
    """Eviction schedule: keep ``budget`` live entries per (layer, KV head), evict ``interval`` at a time."""

    def __init__(self, budget: int, interval: int, *, protect_prompt: bool = False) -> None: ...
    @property
    def budget(self) -> int: ...
    @property
    def interval(self) -> int: ...
    @property
    def protect_prompt(self) -> bool: ...
    def __eq__(self, other: object) -> bool: ...

class CacheConfig:
    """Shape of the paged KV cache and its optional eviction schedule, validated on construction."""

    def __init__(
        self,
        block_size: int,
        num_blocks: int,
        *,
        enable_prefix_caching: bool = False,
        eviction: Optional[EvictionConfig] = None,
    ) -> None: ...
    @staticmethod
    def from_json(text: str) -> "CacheConfig": ...
    def to_json(self) -> str: ...
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def enable_prefix_caching(self) -> bool: ...
    @property
    def eviction(self) -> Optional[EvictionConfig]: ...
    def __eq__(self, other: object) -> bool: ...

class EvictionPlan:
    """What the next eviction of a sequence does."""

    len: int
    live_start_before: int
    live_start_after: int
    evicted_per_head: int
    released_blocks: int

class BlockTables:
    """Block tables of a batch as int32 buffers (``array.array('i')``)."""

    @property
    def num_seqs(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def table(self) -> "array.array[int]": ...
    @property
    def live_starts(self) -> "array.array[int]": ...
    @property
    def lens(self) -> "array.array[int]": ...
    @property
    def protected_lens(self) -> "array.array[int]": ...
    def as_numpy(self) -> Tuple[Any, Any, Any, Any]: ...
    def as_torch(self, device: Any = None) -> Tuple[Any, Any, Any, Any]: ...

class KvCacheManager:
    """The paged KV-cache manager; thread-safe, the GIL is released inside every call."""

    def __init__(self, config: CacheConfig) -> None: ...
    @property
    def config(self) -> CacheConfig: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_sequences(self) -> int: ...
    def max_blocks_held(self, prompt_len: int, max_len: int) -> int: ...
    def add_sequence(self, seq_id: int, prompt: Tokens) -> List[int]: ...
    def append(self, seq_id: int, tokens: Tokens) -> List[int]: ...
    def eviction_due(self, seq_id: int) -> Optional[EvictionPlan]: ...
    def compact(self, seq_id: int) -> List[int]: ...
    def fork(self, parent: int, child: int) -> None: ...
    def free(self, seq_id: int) -> None: ...
    def preempt(self, seq_id: int) -> List[int]: ...
    def take_copies(self) -> List[Tuple[int, int]]: ...
    STEP_OPS: Tuple[str, ...]
    def apply_step(
        self, ops: Sequence[int], seq_ids: Sequence[int], counts: Sequence[int], tokens: Tokens
    ) -> Tuple["array.array[int]", "array.array[int]", "array.array[int]", "array.array[int]", "array.array[int]"]: ...
    def seq_len(self, seq_id: int) -> int: ...
    def live_start(self, seq_id: int) -> int: ...
    def protected_len(self, seq_id: int) -> int: ...
    def live_tokens(self, seq_id: int) -> int: ...
    def blocks_held(self, seq_id: int) -> int: ...
    def block_tables(self, seq_ids: Iterable[int]) -> BlockTables: ...
    def snapshot(self) -> Dict[str, Any]: ...

class WindowPlanner:
    """The core's batched eviction planner: every request's live window keyed by an integer key,
    one ``plan`` call per engine forward, answered in flat ``array.array`` buffers."""

    FIELDS: Tuple[str, ...]
    RELEASED_FIELDS: Tuple[str, ...]
    def __init__(
        self,
        budget: int,
        interval: int,
        block_size: int,
        protect_prompt: bool = False,
        evicts: bool = True,
        max_slots: Optional[int] = None,
    ) -> None: ...
    max_slots: Optional[int]
    def set_max_slots(self, max_slots: Optional[int]) -> None: ...
    def plan(
        self,
        keys: Sequence[int],
        seq_lens: Sequence[int],
        num_new: Sequence[int],
        prefill: Sequence[bool],
        reset: Sequence[bool],
        prompt_lens: Optional[Sequence[int]] = None,
    ) -> Tuple["array.array[int]", "array.array[int]", "array.array[int]", "array.array[int]", int]: ...
    def state(self, key: int) -> Optional[Tuple[int, int, int, Optional[int], int, int]]: ...
    def keys(self) -> List[int]: ...
    def release(self, key: int) -> Optional[int]: ...
    def __len__(self) -> int: ...

class ScorerCheckpoint:
    """A validated ForesightKV scorer checkpoint (config.json + scorer.safetensors)."""

    @staticmethod
    def load(path: PathLike, stats_mode: Optional[str] = None) -> "ScorerCheckpoint": ...
    @staticmethod
    def random(
        num_layers: int,
        num_kv_heads: int,
        group_size: int,
        head_dim: int,
        budget: int,
        interval: int,
        *,
        seed: Optional[int] = None,
        std: Optional[float] = None,
        stats_mode: Optional[str] = None,
    ) -> "ScorerCheckpoint": ...
    @staticmethod
    def from_official(model_dir: PathLike, budget: int, interval: int) -> "ScorerCheckpoint": ...
    def save(self, path: PathLike) -> None: ...
    def save_official(self, path: PathLike) -> None: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def stats_mode(self) -> str: ...
    @property
    def in_dim(self) -> int: ...
    def check_model(self, num_layers: int, num_kv_heads: int, group_size: int, head_dim: int) -> None: ...
    def layer_weights(self, layer: int) -> Dict[str, Tuple[List[int], "array.array[float]"]]: ...

class Policy:
    """An eviction policy (ForesightKV scorer or a baseline) over one (layer, KV head)."""

    @staticmethod
    def full_cache() -> "Policy": ...
    @staticmethod
    def streaming_llm(sinks: Optional[int] = None) -> "Policy": ...
    @staticmethod
    def h2o() -> "Policy": ...
    @staticmethod
    def snapkv(kernel: Optional[int] = None) -> "Policy": ...
    @staticmethod
    def tova() -> "Policy": ...
    @staticmethod
    def rkv(lam: Optional[float] = None, kernel: Optional[int] = None) -> "Policy": ...
    @staticmethod
    def random(seed: Optional[int] = None) -> "Policy": ...
    @staticmethod
    def foresight(
        checkpoint: ScorerCheckpoint,
        *,
        sample: Optional[bool] = None,
        seed: Optional[int] = None,
        temperature: Optional[float] = None,
    ) -> "Policy": ...
    @property
    def name(self) -> str: ...
    @property
    def evicts(self) -> bool: ...
    @property
    def params(self) -> Dict[str, Any]: ...
    @property
    def stats_mode(self) -> Optional[str]: ...
    def score(
        self,
        keys: TensorLike,
        values: TensorLike,
        stats: TensorLike,
        queries: TensorLike,
        positions: Tokens,
        seq_len: int,
        *,
        layer: Optional[int] = None,
        kv_head: Optional[int] = None,
        eviction: Optional[int] = None,
        request: Optional[int] = None,
        scale: Optional[float] = None,
    ) -> List[float]: ...
    def choose_victims(
        self,
        keys: TensorLike,
        values: TensorLike,
        stats: TensorLike,
        queries: TensorLike,
        positions: Tokens,
        seq_len: int,
        *,
        num_protected: int,
        num_evict: int,
        layer: Optional[int] = None,
        kv_head: Optional[int] = None,
        eviction: Optional[int] = None,
        request: Optional[int] = None,
        scale: Optional[float] = None,
    ) -> List[int]: ...

class Trace:
    """A recorded or synthetic attention trace (queries, keys, values of every token, per layer)."""

    @staticmethod
    def load(path: PathLike) -> "Trace": ...
    @staticmethod
    def synthetic(
        num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, length: int, *, seed: Optional[int] = None
    ) -> "Trace": ...
    def save(self, path: PathLike) -> None: ...
    @property
    def shape(self) -> Dict[str, int]: ...

def simulate(
    trace: Trace,
    policy: Policy,
    budget: int,
    interval: int,
    *,
    request: Optional[int] = None,
    record: Optional[bool] = None,
    prompt_len: Optional[int] = None,
    stats_mode: Optional[str] = None,
) -> Dict[str, Any]: ...
def golden_eviction(trace: Trace, budget: int, interval: int, *, prompt_len: Optional[int] = None) -> Dict[str, Any]: ...
def sample_victims(
    scores: Sequence[float],
    *,
    num_protected: int,
    num_evict: int,
    seed: Optional[int] = None,
    request: Optional[int] = None,
    layer: Optional[int] = None,
    head: Optional[int] = None,
    eviction: Optional[int] = None,
    temperature: Optional[float] = None,
) -> Tuple[List[int], List[int]]: ...
def info() -> Dict[str, Any]: ...
def gpu_available() -> bool: ...
def kernels_compiled() -> bool: ...
def reshape_and_cache(
    key: TensorLike, value: TensorLike, key_cache: TensorLike, value_cache: TensorLike, slot_mapping: TensorLike
) -> None: ...
def paged_attention_decode(
    query: TensorLike,
    key_cache: TensorLike,
    value_cache: TensorLike,
    block_tables: TensorLike,
    seq_lens: TensorLike,
    live_starts: TensorLike,
    out: TensorLike,
    scale: Optional[float] = None,
    *,
    seq_lens_host: Optional[TensorLike] = None,
    live_starts_host: Optional[TensorLike] = None,
) -> None: ...
def window_stats(
    queries: TensorLike,
    num_queries: TensorLike,
    key_cache: TensorLike,
    block_tables: TensorLike,
    seq_lens: TensorLike,
    live_starts: TensorLike,
    stats: TensorLike,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    mode: Optional[str] = None,
    *,
    folded: Optional[TensorLike] = None,
    fold_only: bool = False,
    seq_lens_host: Optional[TensorLike] = None,
    live_starts_host: Optional[TensorLike] = None,
    num_queries_host: Optional[TensorLike] = None,
    folded_host: Optional[TensorLike] = None,
) -> None: ...
def scorer_mlp(
    key_cache: TensorLike,
    value_cache: TensorLike,
    block_tables: TensorLike,
    seq_lens: TensorLike,
    live_starts: TensorLike,
    stats: TensorLike,
    w1: TensorLike,
    b1: TensorLike,
    w2: TensorLike,
    b2: TensorLike,
    scores: TensorLike,
    *,
    seq_lens_host: Optional[TensorLike] = None,
    live_starts_host: Optional[TensorLike] = None,
) -> None: ...
def select_survivors(
    seq_lens: TensorLike,
    live_starts: TensorLike,
    scores: TensorLike,
    num_evict: TensorLike,
    survivors: TensorLike,
    num_protected: Optional[int] = None,
    *,
    seq_lens_host: Optional[TensorLike] = None,
    live_starts_host: Optional[TensorLike] = None,
    num_evict_host: Optional[TensorLike] = None,
) -> None: ...
def sample_survivors(
    seq_lens: TensorLike,
    live_starts: TensorLike,
    scores: TensorLike,
    num_evict: TensorLike,
    requests: TensorLike,
    evictions: TensorLike,
    survivors: TensorLike,
    *,
    layer: int,
    seed: int,
    temperature: Optional[float] = None,
    num_protected: Optional[int] = None,
    seq_lens_host: Optional[TensorLike] = None,
    live_starts_host: Optional[TensorLike] = None,
    num_evict_host: Optional[TensorLike] = None,
) -> None: ...
def compact(
    key_cache: TensorLike,
    value_cache: TensorLike,
    block_tables: TensorLike,
    seq_lens: TensorLike,
    live_starts: TensorLike,
    num_evict: TensorLike,
    survivors: TensorLike,
    stats: Optional[TensorLike] = None,
    *,
    seq_lens_host: Optional[TensorLike] = None,
    live_starts_host: Optional[TensorLike] = None,
    num_evict_host: Optional[TensorLike] = None,
) -> None: ...

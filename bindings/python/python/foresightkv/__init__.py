"""foresightkv: learned KV-cache eviction (ForesightKV) for paged-attention serving engines.

The Rust core does the work; this package is its Python face:

- ``CacheConfig`` / ``EvictionConfig``: validated configuration of the paged cache and its live window.
- ``KvCacheManager``: sequences, slot mappings, live windows, the eviction schedule, compaction,
  prefix sharing and copy-on-write; thread-safe, the GIL is released inside every call.
- ``WindowPlanner``: the same live window and schedule for engines, planned one forward per call.
- ``kernels``: the kernels as functions over ``torch.Tensor`` (CPU or CUDA) and ``numpy.ndarray``,
  read in place (no copies) after every argument was validated in Rust.
- ``evict``: eviction ``Policy`` (ForesightKV scorer and baselines), ``ScorerCheckpoint`` loading,
  attention ``Trace``s, ``simulate`` and ``golden_eviction`` (the offline teacher).
- ``errors``: ``Error`` and its subclasses, raised for every refused input.
"""

from . import errors, evict, kernels
from ._native import (
    NUM_STATS,
    SCORER_HIDDEN,
    BlockTables,
    CacheConfig,
    EvictionConfig,
    EvictionPlan,
    KvCacheManager,
    Policy,
    ScorerCheckpoint,
    Trace,
    WindowPlanner,
    __version__,
    golden_eviction,
    gpu_available,
    info,
    kernels_compiled,
    simulate,
)
from .errors import (
    ArgumentTypeError,
    ConfigError,
    CudaError,
    DeviceError,
    DTypeError,
    Error,
    EvictionStateError,
    FileError,
    FormatError,
    InvalidArgumentError,
    OutOfBlocksError,
    CapacityError,
    SequenceError,
    ShapeError,
)
from .evict import scorer_weights
from .kernels import *  # noqa: F403 (the kernel functions: the names of kernels.__all__, added to __all__ below)

__all__ = [
    "__version__",
    "NUM_STATS",
    "SCORER_HIDDEN",
    "BlockTables",
    "CacheConfig",
    "EvictionConfig",
    "EvictionPlan",
    "KvCacheManager",
    "Policy",
    "ScorerCheckpoint",
    "Trace",
    "WindowPlanner",
    "golden_eviction",
    "scorer_weights",
    "simulate",
    "gpu_available",
    "info",
    "kernels_compiled",
    "errors",
    "evict",
    "kernels",
    "Error",
    "ArgumentTypeError",
    "ConfigError",
    "CudaError",
    "DeviceError",
    "DTypeError",
    "EvictionStateError",
    "FileError",
    "FormatError",
    "InvalidArgumentError",
    "OutOfBlocksError",
    "CapacityError",
    "SequenceError",
    "ShapeError",
]
# the kernel functions, re-exported under the names ``kernels`` lists
__all__ += kernels.__all__

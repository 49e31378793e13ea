"""The ``sglang.srt.plugins`` entry point: makes ``--attention-backend foresightkv`` selectable and
installs the release-path hook. Idempotent, so it may run in every SGLang process and more than once."""

import threading

#: The backend name on SGLang's command line.
BACKEND_NAME = "foresightkv"

#: Dotted path of the function the release-path hook wraps (every tree cache inherits it).
FREE_KV_ROW = "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row"

#: The busy-time memory check's count of the slots running requests hold (foresightkv's frees come off it).
UNCACHED_SIZES = (
    "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._get_total_uncached_sizes"
)

#: Server-argument construction: the configuration is checked there, before any model is loaded.
SERVER_ARGS_INIT = "sglang.srt.server_args.ServerArgs.__post_init__"

_lock = threading.Lock()


def uses_foresightkv(server_args) -> bool:
    """Whether ``server_args`` select foresightkv for prefill or decode."""
    names = (getattr(server_args, f"{p}attention_backend", None) for p in ("", "prefill_", "decode_"))
    return BACKEND_NAME in names


def check_config_early(result, server_args, *args, **kwargs):
    """AFTER hook of ``ServerArgs.__post_init__``: when foresightkv is selected, reads and validates
    ``$FORESIGHTKV_CONFIG`` (policy name, schedule, options) right away, so that a bad value fails in
    the launching process, before the engine spawns its workers and loads the model."""
    if uses_foresightkv(server_args):
        from foresightkv.engine import EngineConfig

        EngineConfig.from_env(block_size=1)
    return result


def register() -> None:
    """Adds ``foresightkv`` to SGLang's attention-backend choices, registers the backend factory, and
    registers (applied by SGLang's ``load_plugins``, or by ``HookRegistry.apply_hooks``): an AROUND hook
    on ``BasePrefixCache.free_kv_row`` so that released requests never free a slot foresightkv already
    returned, an AROUND hook on the busy-time memory check's held-slot count (``ledger.uncached_sizes_hook``)
    and an AFTER hook on ``ServerArgs.__post_init__`` that validates the configuration before the model loads."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from .backend import create_foresightkv_backend
    from .ledger import free_kv_row_hook, uncached_sizes_hook

    with _lock:
        if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
            add_attention_backend_choices([BACKEND_NAME])
        ATTENTION_BACKENDS[BACKEND_NAME] = create_foresightkv_backend
        for target, hook, kind in (
            (FREE_KV_ROW, free_kv_row_hook, HookType.AROUND),
            (UNCACHED_SIZES, uncached_sizes_hook, HookType.AROUND),
            (SERVER_ARGS_INIT, check_config_early, HookType.AFTER),
        ):
            if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, [])):
                HookRegistry.register(target, hook, kind)

"""The ``sglang.srt.plugins`` entry point: makes ``--attention-backend foresightkv`` selectable and
installs the release-path hook and the scheduler / memory-sizing hooks (``hooks``). Idempotent, so it
may run in every SGLang process and more than once."""

import threading

#: The backend name on SGLang's command line.
BACKEND_NAME = "foresightkv"

#: Dotted path of the function the release-path hook wraps (every tree cache inherits it).
FREE_KV_ROW = "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row"

_lock = threading.Lock()


def register() -> None:
    """Adds ``foresightkv`` to SGLang's attention-backend choices, registers the backend factory, and
    registers (for SGLang's ``load_plugins``, or ``HookRegistry.apply_hooks``, to apply) an AROUND
    hook on ``BasePrefixCache.free_kv_row``, so that released requests never free a slot foresightkv
    already returned, and the hooks of ``foresightkv_sglang.hooks``."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from .backend import create_foresightkv_backend
    from .hooks import HOOKS
    from .ledger import free_kv_row_hook

    with _lock:
        if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
            add_attention_backend_choices([BACKEND_NAME])
        ATTENTION_BACKENDS[BACKEND_NAME] = create_foresightkv_backend
        for target, hook, kind in ((FREE_KV_ROW, free_kv_row_hook, "AROUND"),) + HOOKS:
            if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, [])):
                HookRegistry.register(target, hook, HookType[kind])

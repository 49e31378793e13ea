"""The ``vllm.general_plugins`` entry point: makes ``AttentionBackendEnum.CUSTOM`` resolve to the
foresightkv backend. Idempotent, so it may run in every vLLM process and more than once."""

import os
import threading

#: Import path of the backend class vLLM resolves ``CUSTOM`` (and opted-in ``CPU_ATTN``) to.
BACKEND_PATH = "foresightkv_vllm.backend.ForesightKVBackend"

#: Environment variable that, set to 1 on vLLM's CPU platform, also routes ``CPU_ATTN`` to foresightkv
#: (the CPU platform ignores ``--attention-backend`` and always picks ``CPU_ATTN``).
CPU_ENV = "FORESIGHTKV_VLLM_CPU"

_lock = threading.Lock()


def cpu_override_requested(env=None) -> bool:
    """Whether ``$FORESIGHTKV_VLLM_CPU`` asks for the ``CPU_ATTN`` override (``1``/``true``/``yes``)."""
    env = os.environ if env is None else env
    return env.get(CPU_ENV, "").strip().lower() in ("1", "true", "yes")


def register() -> None:
    """Registers the backend as ``AttentionBackendEnum.CUSTOM``; on the CPU platform, and only when
    ``$FORESIGHTKV_VLLM_CPU`` opts in, also as ``CPU_ATTN``. Re-registering stores the same path again."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    with _lock:
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
        if cpu_override_requested():
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)

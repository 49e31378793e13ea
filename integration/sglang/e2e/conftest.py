"""Fixtures of the SGLang end-to-end tests: the tiny random-weight Llama, the prompts, and the
``torch_native`` reference outputs every foresightkv run is compared with (one native engine per session)."""

import os
import random
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "testing"))

import harness  # noqa: E402
from tiny_model import build_tiny_llama  # noqa: E402

#: The schedule of the eviction runs: an eviction every L=8 tokens once the window holds B+L=40.
B, L = 32, 8
#: Tokens generated per request: well past B + L.
GEN = 4 * (B + L)
#: Prompt lengths of the eviction runs (each below B, so the first eviction comes during decode).
PROMPT_LENS = (12, 21, 29)


def pytest_configure(config):
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1" and "fkv_sglang_cpu_standin" not in sys.modules:
        raise pytest.UsageError(
            "run the SGLang end-to-end tests with the e2e interpreter: PY=$(scripts/e2e_env.sh sglang); "
            "$PY -m pytest integration/sglang/e2e"
        )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny random-weight Llama directory (float32 weights, BPE tokenizer, chat template)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


def prompt_ids(n: int, seed: int) -> list:
    """``n`` token ids of the tiny vocabulary past its special tokens (reproducible per seed)."""
    rng = random.Random(seed)
    return [rng.randrange(8, 384) for _ in range(n)]


@pytest.fixture(scope="session")
def prompts():
    """The prompts of the parity and eviction runs."""
    return [prompt_ids(n, seed=i) for i, n in enumerate(PROMPT_LENS)]


@pytest.fixture(scope="session")
def native(tiny_model, prompts, tmp_path_factory):
    """``torch_native`` greedy outputs (float32) of ``prompts``, ``GEN`` tokens each, plus the audit."""
    audit = tmp_path_factory.mktemp("audit-native")
    with harness.engine(tiny_model, "torch_native", audit_dir=audit, max_total_tokens=4096) as eng:
        out = harness.generate(eng, prompts, GEN)
        st = harness.wait_pool_full(audit)
    return {"outputs": out, "audit": st}

"""The testbed model (SmolLM2-135M-Instruct, scripts/setup_model.sh) with the shipped trained scorer
(scorers/smollm2-135m, B=128, L=32) through the whole engine: ``foresight`` matches ``torch_native``
until its first eviction, then generates far past B + L with finite logprobs; the pool returns to full,
no slot is freed twice. scripts/test_engine.sh sets ``FKV_TESTBED_MODEL``."""

import json
import os
from pathlib import Path

import harness
import pytest

SCORER = Path(__file__).resolve().parents[3] / "scorers" / "smollm2-135m"
PROMPT = "Explain, step by step, how a key-value cache speeds up the decoding of a transformer language model."


@pytest.fixture(scope="module")
def testbed():
    path = os.environ.get("FKV_TESTBED_MODEL")
    if not path:
        pytest.skip("FKV_TESTBED_MODEL is not set (scripts/test_engine.sh sets it from scripts/setup_model.sh)")
    return Path(path)


def test_foresight_with_the_shipped_scorer(testbed, tmp_path):
    ck = json.loads((SCORER / "config.json").read_text())
    b, iv = ck["budget"], ck["interval"]
    gen = b + iv + 96
    kw = dict(max_total_tokens=2048, max_running_requests=2)
    with harness.engine(testbed, "torch_native", None, tmp_path / "native", **kw) as eng:
        ids = eng.tokenizer_manager.tokenizer.encode(PROMPT)
        ref = harness.generate(eng, [ids], gen)[0]
    fkv = {"budget": b, "interval": iv, "policy": "foresight", "checkpoint": str(SCORER), "seed": 0}
    with harness.engine(testbed, "foresightkv", fkv, tmp_path / "fkv", **kw) as eng:
        out = harness.generate(eng, [ids], gen)[0]
        st = harness.wait_pool_full(tmp_path / "fkv")
    exact = b + iv - len(ids) + 1
    assert exact > 0
    assert out["tokens"][:exact] == ref["tokens"][:exact]
    assert len(out["tokens"]) == gen
    assert harness.all_finite(out["logprobs"])
    assert st["violations"] == [] and st["held"] == 0, st
    assert st["max_held"] <= b + 2 * iv + 1, st

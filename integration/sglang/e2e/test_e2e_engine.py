"""Whole SGLang 0.5.23 (``sglang.Engine``, in-process) on CPU with foresightkv against its own
``torch_native`` backend, on a tiny random-weight Llama in float32, with SGLang's strict memory checks
on and the allocator audited (cpu_standin/fkv_sglang_audit.py).

- without eviction the greedy tokens equal ``torch_native``'s, token for token;
- with eviction (each policy, protect mode, foresight with a scorer fitted to the model) the tokens
  before the first eviction equal ``torch_native``'s, generation goes on far past B + L with finite
  logprobs, the pool returns to full and no slot is freed twice;
- two engines started one after the other in this process each use their own configuration."""

import foresightkv
import harness
import pytest
from conftest import B, GEN, PROMPT_LENS, L
from foresightkv.errors import ConfigError
from tiny_model import TINY_CONFIG

POOL = 4096


def check_audit(st: dict, bound: int) -> None:
    """The pool came back to full, nothing was freed twice, at most ``bound`` slots were ever held."""
    assert st["violations"] == [], st
    assert st["held"] == 0, f"the pool did not return to full: {st}"
    assert st["max_held"] <= bound, f"held {st['max_held']} slots at once, more than {bound}: {st}"


def test_native_reference_is_sound(native):
    """The reference run itself: full length, finite logprobs, pool back to full, no double free."""
    for out in native["outputs"]:
        assert len(out["tokens"]) == GEN
        assert harness.all_finite(out["logprobs"])
    check_audit(native["audit"], sum(PROMPT_LENS) + 3 * GEN)


def _scorer(tmp_path_factory):
    """A random foresight scorer fitted to the tiny model (2 layers, 2 KV heads, group 2, head dim 64)."""
    path = tmp_path_factory.mktemp("scorer") / "ck"
    foresightkv.ScorerCheckpoint.random(2, 2, 2, 64, 8, 4, seed=3).save(path)
    return str(path)


def check_eviction(fkv: dict, outs, native, st: dict) -> None:
    """Exact until the first eviction, then on to GEN tokens with finite logprobs; the pool returned to
    full, nothing was freed twice, no request held more than its window."""
    protect = fkv.get("protect_prompt", False)
    b, iv = fkv["budget"], fkv["interval"]
    for p, out, ref in zip(PROMPT_LENS, outs, native["outputs"]):
        # The forward whose window reaches B + L entries (generated entries in protect mode) still
        # attends over all of them; it produces generated token B + L - P + 1 (B + L + 1).
        exact = b + iv + 1 if protect else b + iv - p + 1
        assert out["tokens"][:exact] == ref["tokens"][:exact]
        assert len(out["tokens"]) == GEN
        assert harness.all_finite(out["logprobs"])
    # Per request at most B + L live entries plus the token being written (and its prompt when protected),
    # plus the slots of the one step SGLang's overlap keeps before they are returned.
    check_audit(st, sum((p if protect else 0) + b + 2 * iv + 1 for p in PROMPT_LENS))
    # The query rings were reserved at start-up for every request row SGLang allocated: per row, each of
    # the model's layers keeps max(L, 8) queries of its query heads x head dim in fp32.
    rings = st["rings"]
    cfg = TINY_CONFIG
    per_row = cfg["num_hidden_layers"] * max(iv, 8) * cfg["num_attention_heads"] * cfg["head_dim"] * 4
    assert rings is not None and rings["rows"] == rings["max_running_requests"] >= len(PROMPT_LENS)
    assert rings["bytes"] == rings["rows"] * per_row


#: One engine per entry (start-up dominates the suite's time): a representative set; every policy
#: (tova, rkv, random, foresight's kernel top-L, protect mode for each) also runs through SGLang's own
#: classes in integration/sglang/tests, and h2o runs in the two-engine test below.
POLICIES = {
    "snapkv": {"policy": "snapkv"},
    "streaming_llm": {"policy": "streaming_llm", "sinks": 4},
    "foresight": {"policy": "foresight", "seed": 7},
    "h2o_protect": {"policy": "h2o", "protect_prompt": True},
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_eviction(name, tiny_model, prompts, native, tmp_path, tmp_path_factory):
    """Each policy: exact until the first eviction, then on to GEN tokens with finite logprobs; the
    pool returns to full, no slot is freed twice, and no request holds more than its window."""
    fkv = {"budget": B, "interval": L, **POLICIES[name]}
    if fkv["policy"] == "foresight":
        fkv["checkpoint"] = _scorer(tmp_path_factory)
    with harness.engine(tiny_model, "foresightkv", fkv, tmp_path, max_total_tokens=POOL) as eng:
        outs = harness.generate(eng, prompts, GEN)
        st = harness.wait_pool_full(tmp_path)
    check_eviction(fkv, outs, native, st)


def test_two_engines_in_one_process_use_their_own_settings(tiny_model, prompts, native, tmp_path):
    """An evicting engine (h2o), then one with ``full_cache``, in the same process. The first is exact
    until its first eviction and holds no more than its window; the second generates torch_native's
    tokens exactly (float32) and holds every token: nothing of the first's configuration or state leaks."""
    fkv = {"budget": B, "interval": L, "policy": "h2o"}
    with harness.engine(tiny_model, "foresightkv", fkv, tmp_path / "a", max_total_tokens=POOL) as eng:
        first = harness.generate(eng, prompts, GEN)
        st_a = harness.wait_pool_full(tmp_path / "a")
    check_eviction(fkv, first, native, st_a)
    assert any(a["tokens"] != r["tokens"] for a, r in zip(first, native["outputs"]))
    full = {"budget": B, "interval": L, "policy": "full_cache"}
    with harness.engine(tiny_model, "foresightkv", full, tmp_path / "b", max_total_tokens=POOL) as eng:
        second = harness.generate(eng, prompts, GEN)
        st_b = harness.wait_pool_full(tmp_path / "b")
    for out, ref in zip(second, native["outputs"]):
        assert out["tokens"] == ref["tokens"]
        diff = max(abs(a - b) for a, b in zip(out["logprobs"], ref["logprobs"]))
        assert diff < 1e-4, f"max |dlogprob| {diff}"
    check_audit(st_b, sum(PROMPT_LENS) + 3 * GEN)
    assert st_b["max_held"] >= sum(PROMPT_LENS) + 3 * (GEN - 1), st_b


def test_bad_policy_is_refused_before_the_model_loads(tiny_model, tmp_path):
    """A misspelt policy fails in the launching process with foresightkv's ConfigError naming it,
    when SGLang resolves its server arguments (no scheduler is spawned, no model loaded)."""
    with pytest.raises(ConfigError, match="h2 0"):
        with harness.engine(tiny_model, "foresightkv", {"budget": B, "interval": L, "policy": "h2 0"}, tmp_path):
            pass

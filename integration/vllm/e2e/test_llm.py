"""Whole vLLM 0.32.0 on CPU (``vllm.LLM``, V1 model runner) with foresightkv against vLLM's native CPU
attention on the same model, workload and greedy decoding:

- without eviction (``full_cache``, or a budget above every length) the tokens equal native's;
- with eviction (every policy, protect mode, ``foresight`` with the shipped scorer on the testbed
  model) the tokens before the first eviction equal native's, generation goes on well past B + L with
  finite logprobs, each request holds at most ``cdiv(B + L, block) + 1`` blocks (native: its whole
  length), vLLM's block pool is full again afterwards and no block was freed twice;
- a mixed workload (staggered arrivals, prompt lengths, a prompt over ``max_model_len`` refused by
  name, an abort, preemptions forced by a small pool) completes with the same invariants;
- two engines made one after the other in this process, with different settings, each use their own.
"""

import math
import pathlib
import random

import pytest

from harness import BlockLedger, Req, all_finite, make_llm, model_runner, run, run_once, shutdown

BS = 32  # vLLM's block size in these tests (CPU_ATTN needs a multiple of 32)
B, L = 64, 32  # budget and interval: window W = 96 tokens, 3 blocks
W = B + L
GEN = 128  # tokens generated per request: lengths reach 150-200, about twice W
SCORER = pathlib.Path(__file__).resolve().parents[3] / "scorers" / "smollm2-135m"


def prompt(n: int, seed: int, vocab: int = 384):
    """``n`` deterministic token ids below ``vocab`` (the tiny model's; past its special tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(8, vocab) for _ in range(n)]


#: The standard workload: three requests of different prompt lengths, all arriving at once.
WORKLOAD = [Req(f"r{i}", prompt(n, i), GEN) for i, n in enumerate((24, 45, 70))]


@pytest.fixture()
def ledger():
    """vLLM's ``BlockPool`` instrumented for the engines made during the test."""
    led = BlockLedger().install()
    yield led
    led.uninstall()


@pytest.fixture(scope="module")
def native(tiny_model):
    """vLLM's native CPU attention on the standard workload (the reference)."""
    return run_once(tiny_model, WORKLOAD)


def check_invariants(res, ledger, reqs, *, max_blocks=None):
    """Every request generated all its tokens with finite logprobs, held at most ``max_blocks``
    blocks in decode, the pool is full again, the ledger saw no double free, and foresightkv holds
    no request's state once the runner has seen every finish, after each step none beyond the
    requests that step scheduled (finished, aborted and preempted requests are released:
    ``foresightkv_vllm.lifecycle``), so never more than vLLM's bound on running requests, which sizes
    the query rings at model construction; the rings held after the run are those taken at start-up."""
    for r in reqs:
        if r.abort_at is not None:
            continue
        assert len(res.tokens[r.rid]) == r.max_tokens, (r.rid, len(res.tokens[r.rid]))
        assert all_finite(res.logprobs[r.rid]), r.rid
        if max_blocks is not None:
            assert res.decode_blocks[r.rid] <= max_blocks, (r.rid, res.decode_blocks[r.rid], max_blocks)
    assert res.free_after == res.pool_blocks, f"{res.pool_blocks - res.free_after} blocks still held"
    assert ledger.errors == []
    assert ledger.allocated > 0 and ledger.freed == ledger.allocated
    if res.states_after is not None:
        assert res.states_after == 0, (res.states_after, res.preemptions)
        assert res.max_states <= res.max_running, (res.max_states, res.max_running)
        assert res.max_unscheduled_states <= 0, res.max_unscheduled_states
        # the query rings were taken at start-up and never grew
        assert res.ring_bytes_after == res.ring_bytes, (res.ring_bytes, res.ring_bytes_after)


def test_native_reference_holds_whole_lengths(native):
    """The reference itself: native attention keeps every token, so a request holds its whole length."""
    for r in WORKLOAD:
        assert len(native.tokens[r.rid]) == GEN
        assert native.max_blocks[r.rid] == math.ceil((len(r.prompt) + GEN - 1) / BS)


@pytest.mark.parametrize(
    "fkv",
    [
        {"budget": B, "interval": L, "policy": "full_cache"},
        {"budget": 256, "interval": L, "policy": "h2o"},  # budget above every length: never evicts
    ],
    ids=["full_cache", "h2o-budget-above-length"],
)
def test_without_eviction_equals_native(tiny_model, native, ledger, fkv):
    """Greedy tokens equal vLLM's native CPU attention token for token, logprobs to float32 noise."""
    res = run_once(tiny_model, WORKLOAD, fkv)
    for r in WORKLOAD:
        assert res.tokens[r.rid] == native.tokens[r.rid], r.rid
        worst = max(abs(a - b) for a, b in zip(res.logprobs[r.rid], native.logprobs[r.rid]))
        assert worst < 1e-3, (r.rid, worst)
        assert res.max_blocks[r.rid] == native.max_blocks[r.rid]
    check_invariants(res, ledger, WORKLOAD)


def first_evicted_step(prompt_len: int, protect: bool) -> int:
    """Output tokens computed before the first eviction can change anything: the eviction is due in
    the step whose length reaches the window (``W``, or ``align_up(P) + W`` in protect mode) and applies
    after that step's attention, so tokens ``0 ..= that length - P`` are computed over the whole context."""
    start = math.ceil(prompt_len / BS) * BS if protect else 0
    return start + W - prompt_len + 1


POLICIES = ["h2o", "tova", "snapkv", "streaming_llm", "random", "rkv"]


@pytest.mark.parametrize("policy", POLICIES)
def test_eviction_policies(tiny_model, native, ledger, policy):
    """Each policy: native tokens up to the first eviction, then bounded KV to the end."""
    res = run_once(tiny_model, WORKLOAD, {"budget": B, "interval": L, "policy": policy})
    for r in WORKLOAD:
        k = first_evicted_step(len(r.prompt), protect=False)
        assert res.tokens[r.rid][:k] == native.tokens[r.rid][:k], r.rid
    check_invariants(res, ledger, WORKLOAD, max_blocks=math.ceil(W / BS) + 1)


def test_protect_prompt_chunked_prefill(tiny_model, ledger):
    """Protect mode (``--hf-overrides rswa_window``), with a prompt long enough to be prefilled in
    chunks: native tokens up to the first eviction, the prompt's blocks kept plus the window."""
    gen = 160  # past align_up(P) + W + a block for both prompts, so the window must bound them
    reqs = [Req("short", prompt(40, 10), gen), Req("long", prompt(150, 11), gen)]
    kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=64)
    ref = run_once(tiny_model, reqs, **kw)
    res = run_once(tiny_model, reqs, {"budget": B, "interval": L, "policy": "h2o", "protect_prompt": True}, **kw)
    for r in reqs:
        k = first_evicted_step(len(r.prompt), protect=True)
        assert k < gen
        assert res.tokens[r.rid][:k] == ref.tokens[r.rid][:k], r.rid
        bound = math.ceil(len(r.prompt) / BS) + math.ceil(W / BS) + 1
        assert res.max_blocks[r.rid] <= bound, (r.rid, res.max_blocks[r.rid], bound)
        assert res.max_blocks[r.rid] < ref.max_blocks[r.rid]
    check_invariants(res, ledger, reqs)


def test_foresight_shipped_scorer_on_testbed(testbed, ledger):
    """``foresight`` with the shipped scorer (scorers/smollm2-135m) on the testbed model it was trained
    for: native tokens up to the first eviction, bounded KV, finite logprobs to the end."""
    reqs = [Req("a", prompt(30, 20, 49152), 112), Req("b", prompt(50, 21, 49152), 112)]
    ref = run_once(str(testbed), reqs, max_model_len=512, max_num_batched_tokens=512)
    fkv = {"budget": B, "interval": L, "policy": "foresight", "checkpoint": str(SCORER)}
    res = run_once(str(testbed), reqs, fkv, max_model_len=512, max_num_batched_tokens=512)
    for r in reqs:
        k = first_evicted_step(len(r.prompt), protect=False)
        assert res.tokens[r.rid][:k] == ref.tokens[r.rid][:k], r.rid
    check_invariants(res, ledger, reqs, max_blocks=math.ceil(W / BS) + 1)


def test_mixed_workload(tiny_model, ledger):
    """Staggered arrivals, prompt lengths from 5 to 200 tokens, one request aborted mid-generation,
    and a pool of 12 blocks (vLLM's minimum for one request here is 11) for up to 6 running
    requests of 4 blocks each, so vLLM preempts and
    recomputes; a prompt over ``max_model_len`` is refused by vLLM naming the limit (320)."""
    from vllm import SamplingParams

    lens = [5, 200, 33, 64, 96, 17]
    reqs = [Req(f"m{i}", prompt(n, 30 + i), 100 + 10 * i, arrive=7 * i) for i, n in enumerate(lens)]
    reqs[2].abort_at = 40
    llm = make_llm(
        tiny_model,
        {"budget": B, "interval": L, "policy": "tova"},
        num_blocks=13,
        max_model_len=320,
        max_num_batched_tokens=320,
        max_num_seqs=6,
    )
    try:
        with pytest.raises(Exception, match="maximum context length is 320"):
            llm.llm_engine.add_request(
                "too-long", {"prompt_token_ids": prompt(600, 99)}, SamplingParams(max_tokens=4)
            )
        res = run(llm, reqs)
    finally:
        shutdown(llm)
    assert res.finished["m2"] == "abort" and 0 < len(res.tokens["m2"]) < reqs[2].max_tokens
    assert res.preemptions > 0, "the small pool forced no preemption"
    assert res.ring_bytes > 0  # tova evicts: every layer's query ring was taken at start-up
    check_invariants(res, ledger, reqs, max_blocks=math.ceil(W / BS) + 1)


def test_two_engines_one_process_keep_their_own_settings(tiny_model, ledger):
    """Two engines made one after the other in this process with different settings (window 96 vs
    160 tokens, policy, budget): each engine's KV spec, builder settings and block use are its own,
    also while both are alive and serve requests in turn."""
    first = make_llm(tiny_model, {"budget": B, "interval": L, "policy": "streaming_llm"})
    second = None
    try:
        second = make_llm(tiny_model, {"budget": 128, "interval": L, "policy": "h2o"})
        for llm, window, policy in ((first, W, "streaming_llm"), (second, 160, "h2o"), (first, W, "streaming_llm")):
            runner = model_runner(llm)
            spec = runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec
            assert spec.sliding_window == window
            builder = runner.attn_groups[0][0].get_metadata_builder()
            assert builder.settings.engine.policy == policy and builder.settings.window == window
            assert builder.engine.config.policy == policy
            reqs = [Req(r.rid, r.prompt, 100) for r in WORKLOAD[:2]]  # lengths 124 and 145, past W = 96
            res = run(llm, reqs)
            for r in reqs:
                assert len(res.tokens[r.rid]) == r.max_tokens
                assert res.max_blocks[r.rid] <= math.ceil(window / BS) + 1
            assert res.free_after == res.pool_blocks
            assert res.states_after == 0  # each engine released its own finished requests
    finally:
        shutdown(first)
        if second is not None:
            shutdown(second)
    assert ledger.errors == []

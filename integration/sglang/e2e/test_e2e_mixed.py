"""A mixed workload through the whole engine with foresightkv evicting: staggered arrivals, different
prompt lengths, a prompt longer than the prefill chunk (chunked prefill, compressed as it goes), a
streamed request aborted midway, and a small pool. Everything completes with SGLang's strict memory checks
on, the pool returns to full, no slot is freed twice. A small pool alone forces no retraction (with
eviction no request outgrows B + L + 1 slots, and SGLang admits ``ignore_eos`` requests only when their
whole ``max_new_tokens`` fits, so it never runs out mid-decode), so the retraction test uses SGLang's own
retraction test mode (``SGLANG_TEST_RETRACT``: the scheduler's ``retract_decode`` every few steps, the
path it takes when the pool runs out)."""

import asyncio

import harness
from conftest import prompt_ids

B, L = 48, 8
#: Small: SGLang admits the requests a few at a time.
POOL = 360
CHUNK = 64
GEN = 160


def test_mixed_workload(tiny_model, tmp_path):
    fkv = {"budget": B, "interval": L, "policy": "h2o"}
    # 150: chunked prefill (3 chunks of CHUNK), compressed to B; prompt + GEN stays under SGLang's own
    # request-length cap for a POOL-token pool (it clips max_new_tokens of longer requests)
    lens = [9, 40, 17, 150, 33, 70, 12, 25]
    results, aborted = {}, {}
    with harness.engine(
        tiny_model, "foresightkv", fkv, tmp_path, max_total_tokens=POOL, chunked_prefill_size=CHUNK,
        max_running_requests=8, schedule_conservativeness=0.3,
    ) as eng:  # fmt: skip

        async def one(i, n):
            await asyncio.sleep(0.15 * i)
            out = await eng.async_generate(
                input_ids=prompt_ids(n, seed=100 + i), sampling_params=harness.greedy(GEN), return_logprob=True,
                rid=f"mixed-{i}",
            )  # fmt: skip
            results[i] = out

        async def aborted_stream():
            await asyncio.sleep(0.3)
            gen = await eng.async_generate(
                input_ids=prompt_ids(30, seed=99), sampling_params=harness.greedy(GEN), stream=True, rid="mixed-abort"
            )
            chunks = 0
            async for chunk in gen:
                chunks += 1
                aborted["last"] = chunk
                if chunks == 5:
                    eng.tokenizer_manager.abort_request("mixed-abort")
            aborted["chunks"] = chunks

        async def main():
            await asyncio.gather(*(one(i, n) for i, n in enumerate(lens)), aborted_stream())

        eng.loop.run_until_complete(main())
        st = harness.wait_pool_full(tmp_path)
    assert sorted(results) == list(range(len(lens)))
    for i, out in results.items():
        lp = out["meta_info"]["output_token_logprobs"]
        assert len(lp) == GEN, (i, out["meta_info"].get("finish_reason"))
        assert harness.all_finite([float(t[0]) for t in lp])
    fin = aborted["last"]["meta_info"]["finish_reason"]
    assert fin is not None and fin.get("type") == "abort", fin
    assert st["violations"] == [], st
    assert st["held"] == 0, st
    assert st["max_held"] <= POOL, st


def first_evicted_step(prompt_len: int) -> int:
    """Output tokens computed over the whole context: a prompt longer than B is compressed right after
    its prefill (so only the first token is), else the first eviction is due in the step whose length
    reaches B + L and applies after that step's attention (page size 1)."""
    return 1 if prompt_len > B else B + L - prompt_len + 1


def test_forced_retraction(tiny_model, tmp_path):
    """Decode requests retracted by SGLang's scheduler (``retract_decode``, forced every 7 forward steps
    by ``SGLANG_TEST_RETRACT``), recomputed from prompt + output and evicting again: every request
    generates all its tokens with finite logprobs, the tokens before the first eviction equal
    ``torch_native``'s (a recomputation before it changes nothing), SGLang's strict memory checks
    pass, no slot is freed twice and the pool returns to full."""
    fkv = {"budget": B, "interval": L, "policy": "h2o"}
    lens = (20, 35, 50, 12)
    prompts = [prompt_ids(n, seed=200 + i) for i, n in enumerate(lens)]
    retract = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "7"}
    with harness.engine(tiny_model, "torch_native", max_total_tokens=POOL * 4) as eng:
        ref = harness.generate(eng, prompts, GEN)
    with harness.engine(
        tiny_model, "foresightkv", fkv, tmp_path, env=retract, max_total_tokens=POOL, max_running_requests=4,
    ) as eng:  # fmt: skip
        outs = harness.generate(eng, prompts, GEN)
        st = harness.wait_pool_full(tmp_path)
    assert st["retracted"] > 0, st
    diverged = {}
    for n, out, r in zip(lens, outs, ref):
        assert len(out["tokens"]) == GEN and harness.all_finite(out["logprobs"])
        diverged[n] = next((i for i, (a, b) in enumerate(zip(out["tokens"], r["tokens"])) if a != b), GEN)
    assert all(diverged[n] >= first_evicted_step(n) for n in lens), (diverged, st)
    assert st["violations"] == [], st
    assert st["held"] == 0, st
    assert st["max_held"] <= POOL, st

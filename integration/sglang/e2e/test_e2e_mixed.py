"""A mixed workload through the whole engine with foresightkv evicting: staggered arrivals, different
prompt lengths, a prompt longer than the prefill chunk (chunked prefill, compressed as it goes), a
streamed request aborted midway, and a small pool. Everything completes with SGLang's strict memory checks
on, the pool returns to full, no slot is freed twice. (A retraction is not forced here: with eviction no
request outgrows B + L + 1 slots, and SGLang admits ``ignore_eos`` requests only when their whole
``max_new_tokens`` fits, so it never runs out mid-decode; retraction through SGLang's ``release_req`` is
covered in integration/sglang/tests.)"""

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

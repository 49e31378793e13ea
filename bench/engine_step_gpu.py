#!/usr/bin/env python3
"""The engine step on a GPU, kernels and all: device time of one decode forward of
``foresightkv.engine.EvictionEngine`` (``begin_step``, then for every layer the KV write and
``attend``: decode attention over the live window, the query ring, and at the interval the eviction:
statistics, scorer, victim sampling, compaction) at Qwen3-4B shapes (36 layers, 32 query / 8 KV
heads, head dim 128, bf16, block 16), against the same decode kernel over the full cache. A
benchmark (prints figures and writes JSON), not a test; scripts/gpu_check.sh runs it.

The requests had prompts of ``--prompt`` tokens, compressed to the budget at their end with
planner-only steps (K/V are random: the kernels' cost does not depend on the values), then a
staggered number of decode steps, so evictions fall on different steps as in steady serving
(``--sync`` makes every request due on the same step, the worst case). Measured: ``--steps``
decode forwards, each timed with CUDA events from ``begin_step`` to the last layer's ``attend``,
split into steps with and without an eviction due; the full-cache reference is 36 layers of
``paged_attention_decode`` over each request's whole context (what a full cache attends to at that
length, with the same kernel), and the live KV and statistics bytes of each.

Usage: PYTHONPATH=<package dir> python bench/engine_step_gpu.py [--batch 64] [--steps 256] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

import foresightkv
from foresightkv.engine import EngineConfig, EvictionEngine, StepBatch

LAYERS, HQ, HKV, HEAD_DIM, BLOCK = 36, 32, 8, 128, 16


def make_engine(tmp, args, device):
    """The engine under test and the bytes of the query rings it reserved."""
    kw = dict(budget=args.budget, interval=args.interval, policy=args.policy)
    if args.policy == "foresight":
        ck = foresightkv.ScorerCheckpoint.random(LAYERS, HKV, HQ // HKV, HEAD_DIM, args.budget, args.interval, seed=1)
        ck.save(f"{tmp}/ck")
        kw.update(checkpoint=f"{tmp}/ck", sample=not args.topl)
    engine = EvictionEngine(EngineConfig(**kw), block_size=BLOCK)
    reserved = engine.reserve(
        max_requests=args.batch, layers=LAYERS, num_q_heads=HQ, head_dim=HEAD_DIM, dtype=torch.bfloat16, device=device
    )
    return engine, reserved


def batch(keys, lens, prefill):
    n = len(keys)
    num_new = [lens[k] for k in keys] if prefill else [1] * n
    return StepBatch(
        list(keys), [lens[k] for k in keys], num_new, [prefill] * n, [prefill] * n,
        [lens[k] for k in keys] if prefill else None,
    )


def timed(fn, reps=1):
    """Device milliseconds of ``fn`` (CUDA events) or host milliseconds on the CPU."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens per request before compression")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--interval", type=int, default=128)
    ap.add_argument("--policy", default="foresight", choices=["foresight", "h2o", "snapkv", "random"])
    ap.add_argument("--topl", action="store_true", help="foresight without sampling (top-L victims)")
    ap.add_argument("--steps", type=int, default=256, help="measured decode forwards")
    ap.add_argument("--sync", action="store_true", help="every request due on the same step")
    ap.add_argument("--layers", type=int, default=LAYERS, help="layers to run (shapes stay Qwen3-4B's)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("engine_step_gpu: torch sees no CUDA device", file=sys.stderr)
        return 2
    layers = args.layers
    n, L = args.batch, args.interval
    total = args.prompt + L + args.steps + 2
    per_req = -(-total // BLOCK)
    nb = n * per_req
    kv_bytes = 2 * nb * BLOCK * HKV * HEAD_DIM * 2
    stats_bytes = nb * BLOCK * HKV * (HQ // HKV) * 8 * 4
    gen = torch.Generator(device=device).manual_seed(0)
    caches = [
        (torch.randn(nb, BLOCK, HKV, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16),
         torch.randn(nb, BLOCK, HKV, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16))
        for _ in range(layers)
    ]
    stats = [torch.zeros(nb, BLOCK, HKV, HQ // HKV, 8, device=device) for _ in range(layers)]
    tables = torch.arange(nb, dtype=torch.int32, device=device).view(n, per_req)
    query = torch.randn(n, HQ, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
    new_k = torch.randn(n, HKV, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(query)
    base = torch.arange(n, device=device, dtype=torch.int64) * per_req * BLOCK

    with tempfile.TemporaryDirectory() as tmp:
        engine, reserved = make_engine(tmp, args, device)
    lens = {k: args.prompt for k in range(n)}
    engine.begin_step(batch(range(n), lens, True))  # the prompts, compressed at their end (planner only)
    # Staggered start: request k runs k * L // n planner-only decode steps more than request 0.
    lead = [0] * n if args.sync else [k * L // n for k in range(n)]
    for s in range(max(lead) + 1):
        keys = [k for k in range(n) if lead[k] >= s]
        for k in keys:
            lens[k] += 1
        engine.begin_step(batch(keys, lens, False))

    def forward():
        for k in lens:
            lens[k] += 1
        plan = engine.begin_step(batch(range(n), lens, False))
        slots = base + torch.tensor([lens[k] - 1 for k in range(n)], device=device)
        for layer in range(layers):
            kc, vc = caches[layer]
            foresightkv.reshape_and_cache(new_k, new_k, kc, vc, slots)
            engine.attend(plan, layer, query, kc, vc, tables, out, scale=HEAD_DIM**-0.5, stats=stats[layer])
        return plan

    for _ in range(3):  # warm-up (kernel loads, allocator)
        forward()
    plain, evicting, due_rows = [], [], 0
    t_wall = time.perf_counter()
    plans = []
    for _ in range(args.steps):
        ms = timed(lambda: plans.append(forward()))
        due = sum(1 for t in plans.pop().evict_to if t is not None)
        due_rows += due
        (evicting if due else plain).append(ms)
    wall = time.perf_counter() - t_wall

    live = [engine.kept_positions(k, 0, HKV).shape[1] for k in range(n)]
    seq = torch.tensor([lens[k] for k in range(n)], dtype=torch.int32)
    zeros = torch.zeros(n, dtype=torch.int32)
    seq_dev, zeros_dev = seq.to(device), zeros.to(device)  # outside the clock

    def full_attention():
        for layer in range(layers):
            kc, vc = caches[layer]
            foresightkv.paged_attention_decode(
                query, kc, vc, tables, seq_dev, zeros_dev, scale=HEAD_DIM**-0.5, out=out,
                seq_lens_host=seq, live_starts_host=zeros,
            )

    full_attention()
    full_ms = timed(full_attention, reps=5)
    mean_ms = statistics.fmean(plain + evicting)
    res = {
        "bench": "engine_step_gpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "foresightkv": foresightkv.__version__,
        "command": " ".join(sys.argv),
        "shape": dict(batch=n, layers=layers, hq=HQ, hkv=HKV, head_dim=HEAD_DIM, block=BLOCK, dtype="bfloat16"),
        "policy": args.policy + ("" if args.policy != "foresight" else (" top-L" if args.topl else " sampled")),
        "budget": args.budget, "interval": L, "prompt": args.prompt, "staggered": not args.sync,
        "steps": args.steps, "steps_with_eviction": len(evicting), "evicting_rows": due_rows,
        "step_ms_no_eviction_median": statistics.median(plain) if plain else None,
        "step_ms_with_eviction_median": statistics.median(evicting) if evicting else None,
        "step_ms_max": max(plain + evicting),
        "step_ms_mean": mean_ms,
        "wall_s": wall,
        "full_cache_attention_ms": full_ms,
        "full_cache_context_mean": statistics.fmean(lens.values()),
        "live_tokens_mean": statistics.fmean(live),
        "kv_bytes_full": int(sum(lens.values()) * 2 * HKV * HEAD_DIM * 2 * layers),
        "kv_bytes_live": int(sum(live) * 2 * HKV * HEAD_DIM * 2 * layers),
        "stats_bytes_reserved_per_token": HKV * (HQ // HKV) * 8 * 4 * layers,
        "ring_bytes": reserved,
        "kv_bytes_allocated_for_bench": kv_bytes * layers,
        "stats_bytes_allocated_for_bench": stats_bytes * layers,
    }
    print(f"engine step on {res['machine']}: batch {n} x {layers} layers (Qwen3-4B shapes, bf16), {res['policy']}, "
          f"B={args.budget}, L={L}, prompt {args.prompt}, {'staggered' if not args.sync else 'synchronised'} evictions")
    print(f"  decode forward, no eviction due: median {res['step_ms_no_eviction_median'] or float('nan'):.3f} ms "
          f"({len(plain)} steps)")
    print(f"  decode forward with an eviction: median {res['step_ms_with_eviction_median'] or float('nan'):.3f} ms "
          f"({len(evicting)} steps, {due_rows} request evictions)")
    print(f"  mean over all {args.steps} steps: {mean_ms:.3f} ms (max {res['step_ms_max']:.3f} ms)")
    print(f"  full-cache decode attention at context {res['full_cache_context_mean']:.0f}: {full_ms:.3f} ms per forward "
          f"(attention only; live window {res['live_tokens_mean']:.0f} tokens)")
    print(f"  KV held: {res['kv_bytes_live'] / 2**30:.2f} GiB live vs {res['kv_bytes_full'] / 2**30:.2f} GiB full cache; "
          f"rings {reserved / 2**20:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

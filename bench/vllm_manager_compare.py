#!/usr/bin/env python3
"""Peer comparison of block managers on one operation sequence.

The sequence comes from the replay (`foresightkv replay --export-ops ops.csv`): the real
operations its scheduler issued to our KvCacheManager (add, append, compact, free, preempt).
This script applies the same sequence, in one run,

  * to vLLM 0.32's own KVCacheManager (its Python classes, no GPU): `add` and `append` become
    `allocate_slots`, `free` and `preempt` become `free`; with eviction the cache is described to
    vLLM as a sliding window of B + L + block_size tokens, which frees out-of-window blocks inside
    `allocate_slots` (the same way our vLLM plugin maps the live window), so `compact` has no call
    of its own there;
  * to ours through the Python bindings (`foresightkv.KvCacheManager`), when they are installed, in
    two modes: `per-op` (one binding call per operation) and `batched` (one `apply_step` call per
    scheduler step, as an engine drives it: the step's operations as flat columns; a step ends
    where a sequence would be added to or appended to a second time);

and reports operations per second for each and the ratios (ours / vLLM). The batched mode is timed
twice: with each step's columns prepared beforehand (an engine has them as arrays already), and
with the columns built from the operation list inside the timed loop.

Usage:
  foresightkv replay --export-ops ops.csv --requests 200
  python3 bench/vllm_manager_compare.py --ops ops.csv --num-blocks 54100 --budget 1024
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One block-manager operation of the exported sequence."""

    kind: str
    seq: int
    arg: int


KINDS = ("add", "append", "compact", "free", "preempt")


def load_ops(path: str, limit: int | None) -> list[Op]:
    """Reads the replay's `op,seq,arg` CSV, checking every row (errors name the line)."""
    ops: list[Op] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["op", "seq", "arg"]:
            raise ValueError(f"{path}: line 1: expected header op,seq,arg, got {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 3 or row[0] not in KINDS:
                raise ValueError(f"{path}: line {line}: bad row {row}")
            needs_arg = row[0] in ("add", "append", "compact")
            try:
                seq = int(row[1])
                arg = int(row[2]) if needs_arg else 0
            except ValueError:
                raise ValueError(f"{path}: line {line}: bad number in {row}") from None
            if needs_arg and row[0] != "compact" and arg <= 0:
                raise ValueError(f"{path}: line {line}: {row[0]} needs a positive token count")
            ops.append(Op(row[0], seq, arg))
            if limit is not None and len(ops) >= limit:
                break
    return ops


def run_vllm(ops: list[Op], args: argparse.Namespace) -> float:
    """Applies the sequence to vLLM's KVCacheManager; returns the seconds it took."""
    import torch
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        SlidingWindowSpec,
    )
    from vllm.v1.request import Request

    common = dict(block_size=args.block_size, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    if args.budget:
        spec = SlidingWindowSpec(sliding_window=args.budget + args.interval + args.block_size, **common)
    else:
        spec = FullAttentionSpec(**common)
    # vLLM keeps one null block out of the pool: give it one more so both managers have the same capacity.
    config = KVCacheConfig(
        num_blocks=args.num_blocks + 1,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
    )
    manager = KVCacheManager(
        config,
        max_model_len=args.max_model_len,
        scheduler_block_size=args.block_size,
        hash_block_size=args.block_size,
        enable_caching=False,
    )
    requests: dict[int, Request] = {}
    params = SamplingParams(max_tokens=args.max_model_len)
    start = time.perf_counter()
    for op in ops:
        if op.kind == "add":
            req = Request(str(op.seq), [0] * op.arg, params, None)
            requests[op.seq] = req
            if manager.allocate_slots(req, op.arg) is None:
                raise RuntimeError(f"vLLM refused to admit sequence {op.seq} ({op.arg} tokens)")
            req.num_computed_tokens = op.arg
        elif op.kind == "append":
            req = requests[op.seq]
            req.append_output_token_ids([0] * op.arg)
            if manager.allocate_slots(req, op.arg) is None:
                raise RuntimeError(f"vLLM ran out of blocks appending to sequence {op.seq}")
            req.num_computed_tokens += op.arg
        elif op.kind in ("free", "preempt"):
            manager.free(requests.pop(op.seq))
    return time.perf_counter() - start


def run_ours(ops: list[Op], args: argparse.Namespace) -> float:
    """Applies the sequence to our KvCacheManager through the Python bindings; returns the seconds."""
    manager = _our_manager(args)
    start = time.perf_counter()
    for op in ops:
        if op.kind == "add":
            manager.add_sequence(op.seq, [0] * op.arg)
        elif op.kind == "append":
            manager.append(op.seq, [0] * op.arg)
        elif op.kind == "compact":
            manager.compact(op.seq)
        elif op.kind == "free":
            manager.free(op.seq)
        else:
            manager.preempt(op.seq)
    return time.perf_counter() - start


#: Operation codes of `KvCacheManager.apply_step` (its `STEP_OPS`).
OP_CODES = {name: i for i, name in enumerate(KINDS)}


def split_steps(ops: list[Op]) -> list[list[Op]]:
    """The sequence cut into scheduler steps: a step ends before an add or append of a sequence that
    the step already added or appended to (each running sequence gets one allocation per step)."""
    steps: list[list[Op]] = []
    cur: list[Op] = []
    grown: set[int] = set()
    for op in ops:
        if op.kind in ("add", "append") and op.seq in grown:
            steps.append(cur)
            cur, grown = [], set()
        if op.kind in ("add", "append"):
            grown.add(op.seq)
        cur.append(op)
    if cur:
        steps.append(cur)
    return steps


def step_columns(step: list[Op]) -> tuple[list[int], list[int], list[int], list[int]]:
    """`(ops, seq_ids, counts, tokens)` of one step for `KvCacheManager.apply_step` (token ids 0)."""
    codes = [OP_CODES[o.kind] for o in step]
    seqs = [o.seq for o in step]
    counts = [o.arg if o.kind in ("add", "append") else 0 for o in step]
    return codes, seqs, counts, [0] * sum(counts)


def _our_manager(args: argparse.Namespace):
    import foresightkv

    eviction = (
        foresightkv.EvictionConfig(budget=args.budget, interval=args.interval, protect_prompt=False)
        if args.budget
        else None
    )
    return foresightkv.KvCacheManager(
        foresightkv.CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            enable_prefix_caching=False,
            eviction=eviction,
        )
    )


def run_ours_batched(ops: list[Op], args: argparse.Namespace) -> float:
    """The sequence as one `apply_step` call per scheduler step, columns prepared beforehand."""
    manager = _our_manager(args)
    columns = [step_columns(s) for s in split_steps(ops)]
    start = time.perf_counter()
    for cols in columns:
        manager.apply_step(*cols)
    return time.perf_counter() - start


def run_ours_batched_build(ops: list[Op], args: argparse.Namespace) -> float:
    """As `run_ours_batched`, building each step's columns inside the timed loop."""
    manager = _our_manager(args)
    steps = split_steps(ops)
    start = time.perf_counter()
    for s in steps:
        manager.apply_step(*step_columns(s))
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the cache must match the replay run that exported the ops)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", required=True, help="CSV written by `foresightkv replay --export-ops`")
    p.add_argument("--num-blocks", type=int, required=True, help="blocks in the pool (the replay's table header)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--budget", type=int, default=0, help="budget B of the exported run, 0 for the full cache")
    p.add_argument("--interval", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=65536)
    p.add_argument("--limit", type=int, default=None, help="apply only the first N operations")
    p.add_argument(
        "--mode",
        choices=("both", "per-op", "batched"),
        default="both",
        help="how ours is driven: one call per operation, one call per scheduler step, or both",
    )
    p.add_argument("--skip-vllm", action="store_true", help="run ours only")
    a = p.parse_args(argv)
    for name in ("num_blocks", "block_size", "interval", "max_model_len"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.budget < 0 or a.budget % a.block_size or a.interval % a.block_size:
        p.error("--budget and --interval must be non-negative multiples of --block-size")
    if a.limit is not None and a.limit <= 0:
        p.error("--limit must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    """Runs both managers on the sequence and prints operations per second and the ratio."""
    args = parse_args(argv)
    ops = load_ops(args.ops, args.limit)
    steps = split_steps(ops)
    print(f"{len(ops)} operations from {args.ops}, {len(steps)} scheduler steps ({len(ops) / len(steps):.1f} ops/step)")
    runs = [] if args.skip_vllm else [("vllm", run_vllm)]
    if args.mode in ("both", "per-op"):
        runs.append(("foresightkv per-op", run_ours))
    if args.mode in ("both", "batched"):
        runs += [("foresightkv batched", run_ours_batched), ("foresightkv batched+build", run_ours_batched_build)]
    results: dict[str, float] = {}
    for name, fn in runs:
        try:
            seconds = fn(ops, args)
        except ImportError as e:
            print(f"{name:26s} not available ({e})")
            continue
        results[name] = len(ops) / seconds
        print(f"{name:26s} {results[name]:>14,.0f} ops/s ({seconds:.3f} s)")
    if "vllm" in results:
        for name, rate in results.items():
            if name != "vllm":
                print(f"ratio {name} / vllm: {rate / results['vllm']:.2f}x")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())

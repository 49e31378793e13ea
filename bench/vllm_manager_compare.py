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
  * to ours through the Python bindings (`foresightkv.KvCacheManager`), when they are installed;

and reports operations per second for each and the ratio (ours / vLLM).

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
    import foresightkv

    eviction = (
        foresightkv.EvictionConfig(budget=args.budget, interval=args.interval, protect_prompt=False)
        if args.budget
        else None
    )
    manager = foresightkv.KvCacheManager(
        foresightkv.CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            enable_prefix_caching=False,
            eviction=eviction,
        )
    )
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
    print(f"{len(ops)} operations from {args.ops}")
    results: dict[str, float] = {}
    for name, fn in (("vllm", run_vllm), ("foresightkv", run_ours)):
        try:
            seconds = fn(ops, args)
        except ImportError as e:
            print(f"{name:12s} not available ({e})")
            continue
        results[name] = len(ops) / seconds
        print(f"{name:12s} {results[name]:>14,.0f} ops/s ({seconds:.3f} s)")
    if len(results) == 2:
        print(f"ratio foresightkv / vllm: {results['foresightkv'] / results['vllm']:.2f}x")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())

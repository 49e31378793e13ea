#!/usr/bin/env python3
"""Host-device synchronisations of a decode step in which evictions are due: the engine step
(``foresightkv.engine.EvictionEngine``) at batch 256 x 36 layers (Qwen3-4B shapes, ForesightKV with
sampling, budget 1024, interval 128), every request due at once, counted as ``bench/engine_step.py``
counts them (device tensors on PyTorch's ``meta`` device, one ``TorchDispatchMode`` over the step).
A benchmark (prints figures), not a test. Run it once per version of the package (``PYTHONPATH``
naming the package) to compare before and after.

The kernels are stubbed (``foresightkv.kernels``: decode, window_stats, scorer_mlp, sample/select,
compact): each stub adds the synchronisations its binding makes on a GPU, one ``.cpu()`` of every
length array (``seq_lens``, ``live_starts``, ``num_evict``, ``num_queries``, ``folded``) the caller
passed without its host mirror. A host-to-device copy made through ``foresightkv.engine.transfer.to_device``
(pinned memory, ``non_blocking``: queued on the stream on a GPU) is counted apart from the blocking ones.

Usage: PYTHONPATH=<package dir> python bench/evict_step_syncs.py [--label after]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from collections import Counter

import torch

import foresightkv
from foresightkv import kernels

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import engine_step as es  # noqa: E402  (the same shapes, engine and counting rules)

#: Per stubbed kernel: its positional parameters, and the (array, host mirror) pairs its binding reads.
SIGNATURES = {
    "paged_attention_decode": (
        ["query", "key_cache", "value_cache", "block_tables", "seq_lens", "live_starts"],
        [("seq_lens", "seq_lens_host"), ("live_starts", "live_starts_host")],
    ),
    "window_stats": (
        ["queries", "num_queries", "key_cache", "block_tables", "seq_lens", "live_starts", "stats"],
        [("seq_lens", "seq_lens_host"), ("live_starts", "live_starts_host"),
         ("num_queries", "num_queries_host"), ("folded", "folded_host")],
    ),
    "scorer_mlp": (
        ["key_cache", "value_cache", "block_tables", "seq_lens", "live_starts", "stats"],
        [("seq_lens", "seq_lens_host"), ("live_starts", "live_starts_host")],
    ),
    "select_survivors": (
        ["seq_lens", "live_starts", "scores", "num_evict", "survivors"],
        [("seq_lens", "seq_lens_host"), ("live_starts", "live_starts_host"), ("num_evict", "num_evict_host")],
    ),
    "sample_survivors": (
        ["seq_lens", "live_starts", "scores", "num_evict", "requests", "evictions", "survivors"],
        [("seq_lens", "seq_lens_host"), ("live_starts", "live_starts_host"), ("num_evict", "num_evict_host")],
    ),
    "compact": (
        ["key_cache", "value_cache", "block_tables", "seq_lens", "live_starts", "num_evict", "survivors"],
        [("seq_lens", "seq_lens_host"), ("live_starts", "live_starts_host"), ("num_evict", "num_evict_host")],
    ),
}
READS = Counter()


def stub(name):
    params, pairs = SIGNATURES[name]

    def run(*args, **kw):
        given = dict(zip(params, args), **kw)
        for array, mirror in pairs:
            t = given.get(array)
            if isinstance(t, torch.Tensor) and t.device.type != "cpu" and given.get(mirror) is None:
                READS[f"{name}: {array}"] += 1
        out = given.get("out")
        return out if out is not None else (torch.empty_like(given["query"]) if "query" in given else None)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    for name in SIGNATURES:
        setattr(kernels, name, stub(name))
    es.patch_to_device()
    es.BUDGET, es.INTERVAL = 1024, 128
    with tempfile.TemporaryDirectory() as tmp:
        engine, _ = es.make_engine(tmp)
    dev, n = es.DEVICE, es.BATCH
    lens = [2048 + (i % 8) * 16 for i in range(n)]
    engine.begin_step(es.batch(lens, True, lens))
    width = max(lens) // es.BLOCK + 16
    tables = torch.zeros((n, width), dtype=torch.int32, device=dev)
    kc = torch.empty((64, es.BLOCK, es.HKV, es.HEAD_DIM), dtype=torch.bfloat16, device=dev)
    vc = torch.empty_like(kc)
    stats = [torch.empty((64, es.BLOCK, es.HKV, es.HQ // es.HKV, 8), device=dev) for _ in range(es.LAYERS)]
    query = torch.empty((n, es.HQ, es.HEAD_DIM), dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(query)
    for _ in range(2 * es.INTERVAL + 2):
        lens = [x + 1 for x in lens]
        plan = engine.begin_step(es.batch(lens, False, [1] * n))
        due = sum(1 for t in plan.evict_to if t is not None)
        if not due:
            for layer in range(es.LAYERS):
                engine.attend(plan, layer, query, kc, vc, tables, out, scale=es.HEAD_DIM**-0.5, stats=stats[layer])
            continue
        READS.clear()
        with es.Count() as c:
            for layer in range(es.LAYERS):
                engine.attend(plan, layer, query, kc, vc, tables, out, scale=es.HEAD_DIM**-0.5, stats=stats[layer])
        break
    else:
        print("no eviction fell due", file=sys.stderr)
        return 1
    blocking = sum(c.syncs.values())
    reads = sum(READS.values())
    print(f"## {args.label or 'run'}: foresightkv {foresightkv.__version__} from {inspect.getfile(foresightkv)}")
    print(f"batch {n} x {es.LAYERS} layers, decode step with {due} requests' evictions due in every layer "
          f"(ForesightKV sampled, B = {es.BUDGET}, L = {es.INTERVAL}), kernels stubbed")
    print(f"host-device synchronisations in the step: {blocking + reads} "
          f"({blocking} by torch ops: {dict((k, v) for k, v in c.syncs.items() if v)}; "
          f"{reads} by kernel bindings reading device arrays: {dict(READS)})")
    print(f"  per layer: {(blocking + reads) / es.LAYERS:.1f}; host-to-device copies queued without a "
          f"synchronisation (pinned, non-blocking): {c.queued}")
    print(f"torch ops in the step: {sum(c.ops.values())} ({c.device_ops} on the device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Host cost of one decode step of the engine step (``foresightkv.engine.EvictionEngine``): host
time, torch operations and host-device synchronisations per forward, at batch 256 x 36 layers
(Qwen3-4B shapes: 32 query heads, 8 KV heads, head dim 128, block 16; budget 1024, interval 128),
with attention stubbed, no eviction due. A benchmark (prints figures), not a test. Run it once per
version of the package (``PYTHONPATH`` naming the package to measure) to compare before and after.

What runs: ``begin_step`` once, then ``attend`` for each of the 36 layers, as a plugin calls them.
The device tensors (query, caches, block tables, output) live on PyTorch's ``meta`` device: every
torch operation on them goes through the dispatcher as on a GPU but computes nothing, so the host
time is the engine's own (Python, dispatch, planner), the kernels excluded. The decode attention
kernel is stubbed (``foresightkv.kernels.paged_attention_decode``; it returns ``out`` untouched).
The requests are warmed up with planner-only steps: each had a prompt of 2,048 to 2,160 tokens,
compressed to the budget, and a few decode steps, so no eviction is due in the measured steps.

How operations and synchronisations are counted (one ``TorchDispatchMode`` over the whole step):
every aten operation is one torch op ("device" when one of its tensors is on ``meta``). A
synchronisation is an operation that makes the host wait for the GPU: a device-to-host read
(``_local_scalar_dense``: ``.item()``, ``bool()``, ``int()``; ``tolist``/``.cpu()`` as a copy to
the host), an op whose output size depends on device data (``nonzero``, ``masked_select``, indexing
with a boolean mask), and any copy between host and device in either direction (``_to_copy`` /
``copy_`` between ``cpu`` and ``meta``, which covers ``torch.tensor(list, device=...)`` and
``.to(device)``: PyTorch's copy from pageable host memory waits for the stream). The stubbed
kernel adds the synchronisations its binding would make on a GPU: one ``.cpu()`` of each of
``seq_lens`` and ``live_starts`` unless the caller passes their host mirrors (``seq_lens_host``,
``live_starts_host``, as the engine step now does).

Usage: PYTHONPATH=<package dir> python bench/engine_step.py [--label after] [--steps 5]
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import foresightkv
from foresightkv import kernels
from foresightkv.engine import EngineConfig, EvictionEngine, StepBatch

BATCH, LAYERS, HQ, HKV, HEAD_DIM, BLOCK = 256, 36, 32, 8, 128, 16
BUDGET, INTERVAL = 1024, 128
DEVICE = torch.device("meta")

STUB_SYNCS = [0]
#: True while the package's ``engine.transfer.to_device`` runs (its copies are pinned and non-blocking).
QUEUED = [False]


def patch_to_device():
    """Marks the copies made inside the package's ``to_device`` (absent in versions before it), which
    on a GPU go through pinned memory with ``non_blocking=True``: queued, not a synchronisation."""
    for mod_name in ("foresightkv.engine.step", "foresightkv.engine.victims"):
        mod = sys.modules.get(mod_name)
        orig = getattr(mod, "to_device", None)
        if orig is None:
            continue

        def wrapped(*a, _orig=orig, **k):
            QUEUED[0] = True
            try:
                return _orig(*a, **k)
            finally:
                QUEUED[0] = False

        mod.to_device = wrapped


def stub_decode(query, key_cache, value_cache, block_tables, seq_lens, live_starts, *, scale=None, out=None, **kw):
    """The decode kernel, stubbed: counts the device reads its binding makes without host mirrors."""
    for name, t in (("seq_lens_host", seq_lens), ("live_starts_host", live_starts)):
        if kw.get(name) is None and t.device.type != "cpu":
            STUB_SYNCS[0] += 1
    return out if out is not None else torch.empty_like(query)


class Count(TorchDispatchMode):
    """Counts aten ops, device ops and synchronisations (rules in the module doc)."""

    SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.nonzero_static"}

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.syncs = Counter()
        self.device_ops = 0
        self.queued = 0  # host-to-device copies through to_device (not synchronisations)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__qualname__) if hasattr(func, "overloadpacket") else str(func)
        name = "aten." + name.split(".")[-1] if not name.startswith("aten.") else name
        self.ops[name] += 1
        tensors = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        on_dev = any(t.device.type == "meta" for t in tensors)
        if on_dev:
            self.device_ops += 1
        if on_dev and name in self.SYNC_OPS:
            self.syncs[name] += 1
        if name == "aten.index" and on_dev:
            idx = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or []):
                self.syncs["aten.index (boolean mask)"] += 1
        out = func(*args, **kwargs)
        if name in ("aten._to_copy", "aten.copy_"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst = args[0] if name == "aten.copy_" else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                if QUEUED[0] and src.device.type == "cpu":
                    self.queued += 1
                else:
                    self.syncs[f"{name} {src.device.type}->{dst.device.type}"] += 1
        return out


def _flat(xs):
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flat(x))
        else:
            out.append(x)
    return out


def make_engine(tmp):
    ck = foresightkv.ScorerCheckpoint.random(LAYERS, HKV, HQ // HKV, HEAD_DIM, BUDGET, INTERVAL, seed=1)
    ck.save(f"{tmp}/ck")
    cfg = EngineConfig(budget=BUDGET, interval=INTERVAL, policy="foresight", checkpoint=f"{tmp}/ck")
    engine = EvictionEngine(cfg, block_size=BLOCK)
    reserved = 0
    if hasattr(engine, "reserve"):
        reserved = engine.reserve(
            max_requests=BATCH, layers=LAYERS, num_q_heads=HQ, head_dim=HEAD_DIM, dtype=torch.bfloat16, device=DEVICE
        )
    return engine, reserved


def batch(lens, prefill, num_new):
    n = len(lens)
    return StepBatch(
        list(range(n)), list(lens), list(num_new), [prefill] * n, [prefill] * n, list(lens) if prefill else None
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    kernels.paged_attention_decode = stub_decode
    patch_to_device()
    with tempfile.TemporaryDirectory() as tmp:
        engine, reserved = make_engine(tmp)
    lens = [2048 + (i % 8) * 16 for i in range(BATCH)]
    engine.begin_step(batch(lens, True, lens))  # the prompts, compressed at their end (not attended)
    for _ in range(3):  # commit the compression, then a few planner-only decode steps
        lens = [n + 1 for n in lens]
        engine.begin_step(batch(lens, False, [1] * BATCH))
    width = max(lens) // BLOCK + 8
    tables = torch.zeros((BATCH, width), dtype=torch.int32, device=DEVICE)
    kc = torch.empty((64, BLOCK, HKV, HEAD_DIM), dtype=torch.bfloat16, device=DEVICE)
    vc = torch.empty_like(kc)
    query = torch.empty((BATCH, HQ, HEAD_DIM), dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty_like(query)

    def step(lens):
        plan = engine.begin_step(batch(lens, False, [1] * BATCH))
        assert all(t is None for t in plan.evict_to), "an eviction is due: not the path measured"
        for layer in range(LAYERS):
            engine.attend(plan, layer, query, kc, vc, tables, out, scale=HEAD_DIM**-0.5)

    times = []
    for i in range(args.steps + 1):
        lens = [n + 1 for n in lens]
        if i == 0:
            STUB_SYNCS[0] = 0
            with Count() as c:
                step(lens)
            stub_syncs = STUB_SYNCS[0]
            continue
        t0 = time.perf_counter()
        step(lens)
        times.append(time.perf_counter() - t0)
    syncs = sum(c.syncs.values()) + stub_syncs
    sig = "reserve() available" if hasattr(engine, "reserve") else "no reserve()"
    print(f"## {args.label or 'run'}: foresightkv {foresightkv.__version__} from {inspect.getfile(foresightkv)}")
    print(f"batch {BATCH} x {LAYERS} layers, decode, no eviction due, attention stubbed ({sig}; rings {reserved} B)")
    print(f"host time per step: median {statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms over {len(times)} steps")
    print(f"torch ops per step: {sum(c.ops.values())} ({c.device_ops} on the device)")
    top = ", ".join(f"{k.removeprefix('aten.')} {v}" for k, v in c.ops.most_common(8))
    print(f"  most frequent: {top}")
    detail = ", ".join(f"{k} {v}" for k, v in c.syncs.items())
    print(f"host-device synchronisations per step: {syncs} (binding reads of device arrays {stub_syncs}"
          + (f"; {detail}" if detail else "") + f"); host-to-device copies queued (pinned, non-blocking): {c.queued}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

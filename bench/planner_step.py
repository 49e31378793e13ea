#!/usr/bin/env python3
"""Host time of planning one engine forward: the core's batched planner through the binding
(``EvictionEngine.begin_step`` over a ``StepBatch``, and the bare ``WindowPlanner.plan`` call)
against the Python planner the engine step used before (``BEFORE`` below, a verbatim copy of
``EvictionEngine.begin_step`` and ``engine/schedule.py`` at commit e64ef89, kept here only as the
baseline), in one run, at batch 1, 64, 256 and 1024.

The workload is a steady decode step: every request adds one token, with lengths spread so that
some request's eviction falls due in most steps (budget 256, interval 64, block 16), after one
prefill step that admits them all. Each measured call is one forward; figures are the median and
the minimum over the calls, in microseconds. This is a benchmark (prints figures), not a test.

Usage: python bench/planner_step.py [--steps 300] [--batches 1,64,256,1024]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence

import torch

from foresightkv import WindowPlanner, __version__
from foresightkv.engine import EngineConfig, EvictionEngine, StepBatch

BUDGET, INTERVAL, BLOCK = 256, 64, 16

# ---------------------------------------------------------------------------------------------------
# BEFORE: the Python planner of foresightkv.engine before the batched planner (commit e64ef89):
# engine/schedule.py's next_live_start and EvictionEngine.begin_step with its state classes, copied
# verbatim (only the policy and config lookups are reduced to the attributes begin_step reads).
# It is the baseline of this benchmark and nothing else uses it.
# ---------------------------------------------------------------------------------------------------


def _before_align_down(x: int, block_size: int) -> int:
    return x // block_size * block_size


def _before_align_up(x: int, block_size: int) -> int:
    return -(-x // block_size) * block_size


def _before_next_live_start(
    budget: int,
    interval: int,
    block_size: int,
    seq_len: int,
    live_start: int,
    *,
    protected_len: int = 0,
    compress: bool = False,
) -> Optional[int]:
    base = max(live_start, protected_len)
    if seq_len <= base:
        return None
    due = seq_len - base >= budget + interval or compress
    after = _before_align_down(max(seq_len - budget, 0), block_size)
    if not due or after <= base:
        return None
    return after


@dataclass(frozen=True)
class BeforeStepRequest:
    key: Hashable
    seq_len: int
    num_new: int
    prefill: bool
    reset: bool = False


@dataclass(frozen=True)
class BeforeAdvance:
    key: Hashable
    old_live_start: int
    new_live_start: int
    protected_len: int = 0


@dataclass
class BeforeRequestState:
    serial: int
    length: int = 0
    live_start: int = 0
    pending: Optional[int] = None
    layers: Dict[int, object] = field(default_factory=dict)
    protected_len: int = 0


@dataclass
class BeforeStepPlan:
    requests: List[BeforeStepRequest]
    states: List[BeforeRequestState]
    seq_lens: List[int]
    live_starts: List[int]
    query_starts: List[int]
    evict_to: List[Optional[int]]
    released: List[BeforeAdvance]
    protected_lens: List[int] = field(default_factory=list)


class _BeforePolicy:
    evicts = True


class BeforeEngine:
    """The planning half of the old ``EvictionEngine`` (its ``begin_step``, verbatim)."""

    def __init__(self, config, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.policy = _BeforePolicy()
        self._states: Dict[Hashable, BeforeRequestState] = {}
        self._serials = itertools.count()

    def begin_step(self, requests: Sequence[BeforeStepRequest]) -> BeforeStepPlan:
        released = []
        for key, st in self._states.items():
            if st.pending is not None:
                released.append(BeforeAdvance(key, st.live_start, st.pending, st.protected_len))
                st.live_start, st.pending = st.pending, None
        cfg = self.config
        protect = cfg.protect_prompt
        states, lens, starts, qstarts, evict_to, protected = [], [], [], [], [], []
        offset = 0
        for r in requests:
            if r.num_new < 0 or r.seq_len < r.num_new:
                raise ValueError(f"request {r.key!r}: {r.num_new} new tokens for a length of {r.seq_len}")
            st = None if r.reset else self._states.get(r.key)
            if st is None:
                st = BeforeRequestState(serial=next(self._serials))
                self._states[r.key] = st
            if r.seq_len - r.num_new < st.live_start:
                raise ValueError(
                    f"request {r.key!r}: its new tokens start at {r.seq_len - r.num_new}, before its live window "
                    f"[{st.live_start}, ...); the engine must reset a request it recomputes"
                )
            if protect and r.prefill and r.num_new:
                if st.live_start:
                    raise ValueError(
                        f"request {r.key!r}: prompt tokens after an eviction in protect mode; the engine must "
                        "reset a request it recomputes"
                    )
                st.protected_len = max(st.protected_len, _before_align_up(r.seq_len, self.block_size))
            target = None
            if self.policy.evicts:
                target = _before_next_live_start(
                    cfg.budget,
                    cfg.interval,
                    self.block_size,
                    r.seq_len,
                    st.live_start,
                    protected_len=st.protected_len,
                    compress=not protect and r.prefill and r.num_new > 1,
                )
            st.pending = target
            st.length = r.seq_len
            states.append(st)
            lens.append(r.seq_len)
            starts.append(st.live_start)
            qstarts.append(offset)
            evict_to.append(target)
            protected.append(st.protected_len)
            offset += r.num_new
        return BeforeStepPlan(list(requests), states, lens, starts, qstarts, evict_to, released, protected)


# ---------------------------------------------------------------------------------------------------
# the workload and the measurement
# ---------------------------------------------------------------------------------------------------


def workload(batch: int, steps: int):
    """Per step the columns (keys, seq_lens, num_new, prefill, reset) of the batch: step 0 prefills
    every request (prompt lengths spread over [16, 1500]), the rest decode one token each."""
    prompts = [16 + (i * 977) % 1485 for i in range(batch)]
    keys = list(range(batch))
    out = [(keys, list(prompts), list(prompts), [True] * batch, [True] * batch)]
    lens = list(prompts)
    for _ in range(steps):
        lens = [n + 1 for n in lens]
        out.append((keys, lens, [1] * batch, [False] * batch, [False] * batch))
    return out


def measure(fn, inputs) -> List[float]:
    """Microseconds of each ``fn(x)`` over ``inputs`` (the first, the prefill, is not counted), with
    the garbage collector off (the prepared inputs of every variant are alive at once, and full
    collections over them would land in whichever call happens to trigger one)."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for i, x in enumerate(inputs):
            t0 = time.perf_counter_ns()
            fn(x)
            dt = (time.perf_counter_ns() - t0) / 1e3
            if i:
                times.append(dt)
    finally:
        gc.enable()
    return times


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="decode steps measured per batch size")
    p.add_argument("--batches", default="1,64,256,1024")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    cfg = EngineConfig(budget=BUDGET, interval=INTERVAL, policy="h2o")
    print(f"# planning one engine forward: host time per call (us), median / min over {a.steps} decode steps")
    print(f"# foresightkv {__version__}, torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    print(f"# budget {BUDGET}, interval {INTERVAL}, block {BLOCK}; rows = requests of the batch, 1 new token each")
    print("# A: begin_step alone (before: StepRequest objects built beforehand; after: StepBatch of lists)")
    print("# B: from the engine's per-batch CPU tensors (before: tolist + StepRequest objects + begin_step, the")
    print("#    old plugins' path; after: begin_step(StepBatch of the tensors), read in place by the binding)")
    print(f"{'batch':>6} {'A before':>17} {'A after':>17} {'bare plan':>17} {'A x':>6} "
          f"{'B before':>17} {'B after':>17} {'B x':>6} {'evictions/step':>15}")
    for batch in batches:
        steps = workload(batch, a.steps)
        # before: the old engine over StepRequest objects built beforehand (as the plugins built them)
        before = BeforeEngine(cfg, BLOCK)
        reqs = [
            [BeforeStepRequest(k, n, q, pf, rs) for k, n, q, pf, rs in zip(*cols)]
            for cols in steps
        ]
        t_before = measure(before.begin_step, reqs)
        # after: the engine over StepBatch columns (what the plugins now pass)
        engine = EvictionEngine(cfg, block_size=BLOCK)
        batches_in = [StepBatch(*cols) for cols in steps]
        evictions = []

        def after(b, engine=engine, evictions=evictions):
            plan = engine.begin_step(b)
            evictions.append(len(plan.released))

        t_after = measure(after, batches_in)
        planner = WindowPlanner(BUDGET, INTERVAL, BLOCK)
        t_bare = measure(lambda cols, p=planner: p.plan(*cols), steps)
        # the plans agree (same targets and committed windows), so the figures compare like with like
        check_b, check_e = BeforeEngine(cfg, BLOCK), EvictionEngine(cfg, block_size=BLOCK)
        for cols, r in zip(steps, reqs):
            pb, pe = check_b.begin_step(r), check_e.begin_step(StepBatch(*cols))
            assert pb.evict_to == pe.evict_to and pb.live_starts == pe.live_starts
            assert [(x.key, x.new_live_start) for x in pb.released] == [(x.key, x.new_live_start) for x in pe.released]
        # B: from the engine's tensors (keys, lengths, new tokens, prefill and reset as int64 CPU tensors)
        tens = [tuple(torch.tensor(c, dtype=torch.int64) for c in cols) for cols in steps]
        before_b = BeforeEngine(cfg, BLOCK)

        def old_plugin(t, engine=before_b):
            keys, lens, new, pre, res = (c.tolist() for c in t)
            engine.begin_step([BeforeStepRequest(k, n, q, bool(p), bool(r)) for k, n, q, p, r in zip(keys, lens, new, pre, res)])

        t_before_b = measure(old_plugin, tens)
        engine_b = EvictionEngine(cfg, block_size=BLOCK)
        t_after_b = measure(lambda t, e=engine_b: e.begin_step(StepBatch(*t)), tens)
        med = [statistics.median(t) for t in (t_before, t_after, t_bare, t_before_b, t_after_b)]
        mins = [min(t) for t in (t_before, t_after, t_bare, t_before_b, t_after_b)]
        cells = [f"{m:>8.1f} /{lo:>7.1f}" for m, lo in zip(med, mins)]
        print(f"{batch:>6} {cells[0]} {cells[1]} {cells[2]} {med[0] / med[1]:>5.1f}x "
              f"{cells[3]} {cells[4]} {med[3] / med[4]:>5.1f}x {statistics.mean(evictions[1:]):>15.1f}")
    print("# cells: median / min microseconds per forward; x = before / after of the medians")
    return 0


if __name__ == "__main__":
    sys.exit(main())

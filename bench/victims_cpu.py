"""Host time of the victim choice of one layer's eviction in the engine step (the part between
``window_stats`` and ``compact``), per policy, for S requests due together, and of the whole eviction:
``python bench/victims_cpu.py [S] [B] [L]`` (CPU, float32; Qwen3-4B's heads: 8 KV heads, group 4,
head_dim 128). Runs against the per-head host path (``EvictionEngine._choose``, before) or the batched
path (``victims.choose_survivors``, after), whichever the checkout has."""

import sys
import time

import torch

import foresightkv as fkv
from foresightkv.engine import EngineConfig, EvictionEngine, StepBatch

S = int(sys.argv[1]) if len(sys.argv) > 1 else 8
B = int(sys.argv[2]) if len(sys.argv) > 2 else 512
L = int(sys.argv[3]) if len(sys.argv) > 3 else 64
H, G, D = 8, 4, 128


def run(policy, opts):
    ck = None
    if policy == "foresight":
        ck = fkv.ScorerCheckpoint.random(1, H, G, D, B, L, seed=1)
        opts = dict(opts, checkpoint="<mem>")
    eng = EvictionEngine(EngineConfig(budget=B, interval=L, policy=policy, **opts), block_size=1, checkpoint=ck)
    g = torch.Generator().manual_seed(0)
    width = B + L
    kc = torch.randn(S * width, 1, H, D, generator=g)
    vc = torch.randn(S * width, 1, H, D, generator=g)
    tables = torch.arange(S * width, dtype=torch.int32).view(S, width)
    # a prompt of B + L tokens: compressed to B at its end (L victims per request and KV head)
    prompt = B + L
    plan = eng.begin_step(StepBatch(list(range(S)), [prompt] * S, [prompt] * S, [True] * S, [True] * S))
    win = eng._windows(plan, tables)
    assert len(win.due) == S
    q = torch.randn(S * prompt, H * G, D, generator=g)
    # record the queries as attend does, then time the eviction alone
    for i, serial in enumerate(plan.serials):
        eng._layer_state(serial, 0).queries.append(q[i * prompt : (i + 1) * prompt].clone())
    stats = eng._layer_stats(0, kc, G)
    spent = [0.0]
    if hasattr(eng, "_choose"):
        inner = eng._choose
        eng._use_kernels = False  # the old engine's per-head path (every policy but foresight-top)
        if policy == "foresight" and not opts["sample"]:
            return float("nan"), float("nan")
    else:
        import foresightkv.engine.step as step

        inner = step.choose_survivors

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        spent[0] += time.perf_counter() - t0
        return out

    if hasattr(eng, "_choose"):
        eng._choose = timed
    else:
        step.choose_survivors = timed
    t = time.perf_counter()
    try:
        eng._evict(plan, win, win.due, 0, kc, vc, stats, D**-0.5)
    finally:
        if not hasattr(eng, "_choose"):
            step.choose_survivors = inner
    return spent[0], time.perf_counter() - t


print(f"one layer's eviction, {S} requests due, B={B} L={L}, H={H} G={G} D={D}, CPU float32, torch threads {torch.get_num_threads()}")
for policy, opts in [
    ("foresight", {"sample": True}),
    ("foresight", {"sample": False}),
    ("h2o", {}),
    ("snapkv", {}),
    ("tova", {}),
    ("rkv", {}),
    ("streaming_llm", {}),
    ("random", {}),
]:
    name = policy + ("" if policy != "foresight" else ("-sample" if opts["sample"] else "-top"))
    choice, total = run(policy, opts)
    print(f"{name:16s} choice {choice * 1e3:9.1f} ms   whole eviction {total * 1e3:9.1f} ms")

"""Per-call cost of the Python bindings (argument validation, GIL release, conversions), printed as
microseconds per call. Run with the package installed: python bindings/python/bench/overhead.py"""

import time

import numpy as np
import torch

import foresightkv as fkv


def per_call(fn, min_time=0.3):
    """Median-of-5 microseconds per call of `fn`, each batch running at least `min_time` / 5 s."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > min_time / 5:
            break
        n *= 2
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(runs)[2]


def main():
    m = fkv.KvCacheManager(fkv.CacheConfig(16, 1 << 16))
    for i in range(64):
        m.add_sequence(i, list(range(1000)))
    state = {"n": 0}

    def append_one():
        m.append(state["n"] % 64, [1])
        state["n"] += 1

    rows = [
        ("manager.append (1 token)", append_one),
        ("manager.seq_len", lambda: m.seq_len(3)),
        ("manager.block_tables (64 seqs) + as_torch", lambda: m.block_tables(range(64)).as_torch()),
    ]
    k = torch.randn(1, 8, 128, dtype=torch.float16)
    kc = torch.zeros(256, 16, 8, 128, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    slot = torch.tensor([17])
    rows.append(("reshape_and_cache (1 token, 8 heads x 128, CPU fp16)", lambda: fkv.reshape_and_cache(k, k, kc, vc, slot)))
    kn, kcn, vcn, sn = k.float().numpy(), kc.float().numpy(), vc.float().numpy(), slot.numpy()
    rows.append(("reshape_and_cache (same, numpy fp32)", lambda: fkv.reshape_and_cache(kn, kn, kcn, vcn, sn)))
    q = torch.randn(1, 32, 128, dtype=torch.float16)
    bt = torch.arange(4, dtype=torch.int32)[None]
    sl, ls = torch.tensor([64], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    out = torch.empty_like(q)
    rows.append(("paged_attention_decode (1 seq, 64 live, 32q/8kv x 128, CPU fp16)",
                 lambda: fkv.paged_attention_decode(q, kc, vc, bt, sl, ls, out=out)))
    rows.append(("call refused (wrong dtype), exception included", lambda: _refused(k.double(), kc, vc, slot)))
    print(f"foresightkv {fkv.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    for name, fn in rows:
        print(f"{per_call(fn):10.2f} us/call  {name}")


def _refused(k, kc, vc, slot):
    try:
        fkv.reshape_and_cache(k, k, kc, vc, slot)
    except fkv.DTypeError:
        pass


if __name__ == "__main__":
    main()

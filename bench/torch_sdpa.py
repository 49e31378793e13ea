#!/usr/bin/env python3
"""Side-by-side decode attention: PyTorch scaled_dot_product_attention on contiguous K/V against
`foresightkv bench-kernels` (paged decode) on the same grid, in one run, on one GPU.

    python bench/torch_sdpa.py --bin target/release/foresightkv [--batches 1,32,128] [--lives 1024,4096]

PyTorch gets the K/V already contiguous ([batch, kv_heads, live, head_dim], GQA through
enable_gqa), which is its best case; foresightkv reads the paged cache in place. Prints a table
(time in us, GB/s of K/V read, foresightkv / torch time ratio) and writes JSON with --json.
"""
import argparse
import json
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F


def parse_list(s):
    return [int(x) for x in s.split(",") if x]


def time_sdpa(batch, live, q_heads, kv_heads, head_dim, dtype, iters):
    """Mean seconds per SDPA call of one decode step (one query per sequence)."""
    dev = torch.device("cuda")
    k = torch.randn(batch, kv_heads, live, head_dim, device=dev, dtype=dtype)
    v = torch.randn(batch, kv_heads, live, head_dim, device=dev, dtype=dtype)
    q = torch.randn(batch, q_heads, 1, head_dim, device=dev, dtype=dtype)
    gqa = q_heads != kv_heads

    def step(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    for _ in range(3):
        step(q, k, v)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step(q, k, v)
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1e3 / iters
    del k, v, q
    torch.cuda.empty_cache()
    return secs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/foresightkv", help="the foresightkv binary")
    ap.add_argument("--batches", type=parse_list, default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--lives", type=parse_list, default=[1024, 4096, 8192, 16384, 32768])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=["f16", "bf16"], default="bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--mem-fraction", type=float, default=0.4,
                    help="skip configurations whose K/V exceed this fraction of device memory")
    ap.add_argument("--json", help="write the combined report here")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_sdpa.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]

    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [a.bin, "bench-kernels", "--batches", ",".join(map(str, a.batches)),
               "--lives", ",".join(map(str, a.lives)), "--q-heads", str(a.q_heads),
               "--kv-heads", str(a.kv_heads), "--head-dim", str(a.head_dim), "--dtype", a.dtype,
               "--iters", str(a.iters), "--evict-batches", "1", "--budgets", "1024",
               "--mem-fraction", str(a.mem_fraction), "--json", tmp.name]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        fkv = json.load(open(tmp.name))
    ours = {(r["batch"], r["live"]): r for r in fkv["decode"]}

    total = torch.cuda.get_device_properties(0).total_memory
    esize = torch.finfo(dtype).bits // 8
    rows = []
    print(f"device {torch.cuda.get_device_name(0)} | torch {torch.__version__} | {a.dtype} | "
          f"{a.q_heads} q heads, {a.kv_heads} kv heads, dim {a.head_dim} | copy {fkv['copy_gbps']:.0f} GB/s")
    print(f"{'batch':>6} {'live':>7} {'torch us':>10} {'torch GB/s':>11} {'fkv us':>10} {'fkv GB/s':>9} {'fkv/torch':>10}")
    for batch in a.batches:
        for live in a.lives:
            kv_bytes = 2 * batch * live * a.kv_heads * a.head_dim * esize
            r = ours.get((batch, live))
            if kv_bytes > a.mem_fraction * total or r is None or r["time_us"] is None:
                print(f"{batch:>6} {live:>7} skipped (memory)")
                continue
            t = time_sdpa(batch, live, a.q_heads, a.kv_heads, a.head_dim, dtype, a.iters)
            row = {"batch": batch, "live": live, "kv_bytes": kv_bytes, "torch_us": t * 1e6,
                   "torch_gbps": kv_bytes / t / 1e9, "fkv_us": r["time_us"], "fkv_gbps": r["gbps"],
                   "fkv_over_torch_time": r["time_us"] / (t * 1e6)}
            rows.append(row)
            print(f"{batch:>6} {live:>7} {row['torch_us']:>10.1f} {row['torch_gbps']:>11.0f} "
                  f"{row['fkv_us']:>10.1f} {row['fkv_gbps']:>9.0f} {row['fkv_over_torch_time']:>10.2f}")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": a.dtype,
              "copy_gbps": fkv["copy_gbps"], "rows": rows, "foresightkv": fkv}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

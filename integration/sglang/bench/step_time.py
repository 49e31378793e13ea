"""Prints the time of one decode step (every layer, including ``init_forward_metadata``) on CPU with
SGLang's real pools and layers: ``torch_native`` against foresightkv without eviction (budget above
the context) and with eviction, for a few batch sizes. CPU figures: they show the plugin's
per-step overhead, not GPU serving speed.

    FORESIGHTKV_CACHE=... $(scripts/engine_env.sh sglang) integration/sglang/bench/step_time.py
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402


def main() -> None:
    """Runs the measurement and prints one line per (backend, batch size)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--interval", type=int, default=64)
    a = ap.parse_args()

    from rig import Rig
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.runtime_context import publish, reset_context
    from sglang.srt.server_args import ServerArgs

    from foresightkv.engine import EngineConfig
    from foresightkv_sglang.backend import ForesightKVAttnBackend
    from foresightkv_sglang.plugin import register

    register()
    reset_context()
    args = ServerArgs(
        model_path="dummy", device="cpu", attention_backend="foresightkv", disable_radix_cache=True, page_size=1
    )
    publish(args, role="scheduler")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    total = a.context + a.steps + 8
    print(
        f"decode step time on CPU ({torch.get_num_threads()} threads), {a.layers} layers, Hq 8, H 2, D 128, fp32, "
        f"context {a.context}, {a.steps} steps"
    )
    for bs in a.batch:
        for name in ("torch_native", "foresightkv-full", "foresightkv-evict"):
            rig = Rig(args, size=bs * total + 8, rows=bs, max_ctx=total, hq=8, h=2, d=128, layers=a.layers)
            if name == "torch_native":
                backend = TorchNativeAttnBackend(rig.runner)
            elif name == "foresightkv-full":
                backend = ForesightKVAttnBackend(
                    rig.runner, EngineConfig(budget=total, interval=a.interval, policy="h2o")
                )
            else:
                backend = ForesightKVAttnBackend(
                    rig.runner, EngineConfig(budget=a.budget, interval=a.interval, policy="h2o")
                )
            reqs = [rig.add(f"r{i}") for i in range(bs)]
            rig.run(backend, rig.batch(reqs, [a.context] * bs))
            start = time.perf_counter()
            for _ in range(a.steps):
                rig.run(backend, rig.batch(reqs, [1] * bs))
            ms = (time.perf_counter() - start) / a.steps * 1e3
            free = rig.alloc.available_size()
            print(f"  batch {bs:3d}  {name:18s} {ms:9.2f} ms/step   free slots after: {free}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Host time of one engine forward's planning inside each plugin, the way the engine calls it: vLLM's
``ForesightKVMetadataBuilder.build`` over a real ``CommonAttentionMetadata``, SGLang's
``ForesightKVAttnBackend.init_forward_metadata`` over a real ``ForwardBatch`` of the CPU test rig
(real ``ReqToTokenPool``, ``TokenToKVPoolAllocator``, release path). Everything the plugin does on the
host per forward is inside the clock: request identity (vLLM's block anchors, SGLang's row
generations), the core's planner, committing the last step's evictions (SGLang: slots back to its
allocator), the block table. Attention is not run (no layer is called).

Workload: ``--batch`` requests prefilled once (prompt lengths spread over [16, 1500]), then
``--steps`` decode forwards of one token each; policy h2o, budget 256, interval 64, so some
request's eviction falls due in most steps. Prints median / min microseconds per forward.

Run it in each engine's venv with the tree to measure on PYTHONPATH (the package, the plugin, and for
SGLang integration/sglang/tests for the rig); to compare two trees, run it once per tree (--label).

Usage: python bench/plugin_plan.py --engine vllm|sglang [--batches 1,64,256,1024] [--steps 100]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

BUDGET, INTERVAL, BLOCK = 256, 64, 16
POLICY = {"budget": BUDGET, "interval": INTERVAL, "policy": "h2o"}


#: Contexts kept entered for the whole run.
_KEEP = []


def prompts(batch: int):
    return [16 + (i * 977) % 1485 for i in range(batch)]


def vllm_forwards(batch: int, steps: int):
    """(builder.build, [metadata per forward]): the prefill forward first, then the decodes."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from foresightkv_vllm.backend import ForesightKVBackend

    model = tempfile.mkdtemp()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "torch_dtype": "float32"}
    pathlib.Path(model, "config.json").write_text(json.dumps(config))
    cfg = EngineArgs(
        model=model, skip_tokenizer_init=True, dtype="float32", attention_backend="CUSTOM",
        enable_prefix_caching=False, max_model_len=4096, block_size=BLOCK, enable_chunked_prefill=False,
        max_num_batched_tokens=4096, additional_config={"foresightkv": POLICY},
    ).create_engine_config()
    ctx = set_current_vllm_config(cfg)  # current for the whole run, as in a vLLM worker
    ctx.__enter__()
    _KEEP.append(ctx)
    spec = ForesightKVBackend.customize_spec(
        FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)
    )
    builder = ForesightKVBackend.get_builder_cls()(spec, ["l0"], cfg, torch.device("cpu"))
    per = (1500 + steps) // BLOCK + 2
    table = torch.arange(1, batch * per + 1, dtype=torch.int32).view(batch, per)
    lens = [0] * batch

    def forward(new):
        seq = [n + k for n, k in zip(lens, new)]
        qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
        slots = [int(table[i, p // BLOCK]) * BLOCK + p % BLOCK for i in range(batch) for p in range(lens[i], seq[i])]
        lens[:] = seq
        return CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq, dtype=torch.int32),
            num_reqs=batch, num_actual_tokens=int(qsl[-1]), max_query_len=max(new), max_seq_len=max(seq),
            block_table_tensor=table, slot_mapping=torch.tensor(slots, dtype=torch.int64),
            is_prefilling=torch.tensor([k > 1 for k in new]), req_idx=None, rswa_prefix_lens=None,
        )

    metas = [forward(prompts(batch))] + [forward([1] * batch) for _ in range(steps)]
    return (lambda m: builder.build(0, m)), metas


@functools.lru_cache(maxsize=None)
def sglang_server_args():
    """The plugin registered and SGLang's context published once per process (as in a scheduler)."""
    os.environ["FORESIGHTKV_CONFIG"] = json.dumps(POLICY)
    from foresightkv_sglang.plugin import register
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import publish, reset_context
    from sglang.srt.server_args import ServerArgs

    register()
    HookRegistry.apply_hooks()
    reset_context()
    args = ServerArgs(
        model_path="dummy", device="cpu", attention_backend="foresightkv", disable_radix_cache=True, page_size=1
    )
    publish(args, role="scheduler")
    return args


def sglang_forwards(batch: int, steps: int):
    """(backend.init_forward_metadata, [ForwardBatch per forward]) over the CPU rig."""
    from foresightkv_sglang.backend import create_foresightkv_backend
    from rig import Rig

    args = sglang_server_args()
    ctx = 1500 + steps + 1
    rig = Rig(args, size=batch * ctx, rows=batch + 1, max_ctx=ctx, layers=1, h=1, hq=1)
    backend = create_foresightkv_backend(rig.runner)
    lives = [rig.add(f"r{i}", p) for i, p in enumerate(prompts(batch))]
    first = rig.batch(lives, prompts(batch))
    # slots are allocated as the batches are made: run each forward's planning right after making it
    return backend.init_forward_metadata, [first] + [lambda: rig.batch(lives, [1] * batch)] * steps


def measure(engine: str, batch: int, steps: int):
    make = vllm_forwards if engine == "vllm" else sglang_forwards
    plan, inputs = make(batch, steps)
    times = []
    gc.collect()
    for i, x in enumerate(inputs):
        x = x() if callable(x) else x
        t = time.perf_counter()
        plan(x)
        if i:  # the prefill forward is not counted
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["vllm", "sglang"], required=True)
    ap.add_argument("--batches", default="1,64,256,1024")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    import foresightkv
    import torch

    # One intra-op thread: on a small shared machine torch's thread pool turns a 100 us copy into
    # milliseconds whenever another process holds the other core, which would measure the machine.
    torch.set_num_threads(1)

    print(f"# {a.engine} plugin planning, one forward: host time (us), median / min over {a.steps} decode forwards"
          f"{' [' + a.label + ']' if a.label else ''}")
    print(f"# foresightkv from {os.path.dirname(foresightkv.__file__)}; torch {torch.__version__}, Python "
          f"{platform.python_version()}, {platform.machine()}, load average {os.getloadavg()[0]:.2f}, torch threads 1")
    print(f"# policy h2o, budget {BUDGET}, interval {INTERVAL}; rows = requests, one new token each")
    print(" batch      median         min")
    for b in (int(x) for x in a.batches.split(",")):
        med, lo = measure(a.engine, b, a.steps)
        print(f"{b:6d} {med:11.1f} {lo:11.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

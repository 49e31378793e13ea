"""Seconds of one Golden Eviction oracle pass (the core's ``golden_eviction`` through ``GoldenRun``) on
held-out trace 0 of the committed testbed traces, B = 256, L = 32 (the figure the README quotes):

    python bench/golden_cost.py [MODEL_DIR]"""

import sys
import time

import torch

from foresightkv.testbed.model import default_model_dir, load_model
from foresightkv.testbed.simulate import GoldenRun, record_full
from foresightkv.testbed.traces import load_split

torch.set_num_threads(2)
model, _ = load_model(sys.argv[1] if len(sys.argv) > 1 else default_model_dir(), dtype=torch.bfloat16)
seq = load_split("data/testbed/smollm2-1536/heldout.safetensors").sequence(0)
trace, _ = record_full(model, seq.input_ids)
t, c = time.time(), time.process_time()
g = GoldenRun(trace, 256, 32)
print(f"GoldenRun: {time.time() - t:.1f} s wall, {time.process_time() - c:.1f} s CPU; mass kept {g.fidelity['mass']:.6f}")

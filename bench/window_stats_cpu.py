"""CPU time per call of the ``window_stats`` CPU reference at the simulator's B = 256 shape (one
sequence, 32 queries, 288 live entries, 9 query / 3 KV heads, head_dim 64), the figure the notes quote:

    RAYON_NUM_THREADS=1 python bench/window_stats_cpu.py"""

import time

import torch

import foresightkv.kernels as K

torch.manual_seed(0)
h, g, d, n, live, nb = 3, 3, 64, 32, 288, 300
kc = torch.randn(nb, 1, h, d)
q = torch.randn(1, n, h * g, d)
bt = torch.arange(nb, dtype=torch.int32).view(1, -1)
st = torch.zeros(nb, 1, h, g, 8)
args = (torch.tensor([n], dtype=torch.int32), kc, bt, torch.tensor([live], dtype=torch.int32),
        torch.tensor([0], dtype=torch.int32), st)
for _ in range(3):
    K.window_stats(q, *args, scale=0.125, window=32)
t = time.process_time()
for _ in range(200):
    K.window_stats(q, *args, scale=0.125, window=32)
print(f"window_stats CPU reference: {(time.process_time() - t) * 5:.2f} ms CPU per call")

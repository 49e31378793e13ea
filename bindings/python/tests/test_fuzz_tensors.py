"""Property-based fuzzing of every kernel entry point over random dtypes, shapes, strides (negative,
zero, overlapping, huge), aliasing between arguments and memory owners (torch, numpy, numpy over a
bytearray or an mmap, DLPack-only objects, non-tensors). Each kernel runs in its own interpreter
(fuzz_tensors_driver.py), so a crash is a counted failure; FORESIGHTKV_FUZZ_EXAMPLES sets the number
of examples per kernel (default 60, one to two minutes in all on 2 idle cores)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = ["compact", "paged_attention_decode", "reshape_and_cache", "scorer_mlp", "select_survivors",
           "window_stats"]
EXAMPLES = int(os.environ.get("FORESIGHTKV_FUZZ_EXAMPLES", "60"))


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_survives_hostile_tensors(kernel):
    driver = Path(__file__).with_name("fuzz_tensors_driver.py")
    proc = subprocess.run([sys.executable, str(driver), kernel, str(EXAMPLES)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (
        f"{kernel}: exit {proc.returncode} (negative = killed by a signal)\n"
        f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-6000:]}"
    )
    assert f"{EXAMPLES} examples ok" in proc.stdout

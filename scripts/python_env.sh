#!/usr/bin/env bash
# Creates (or refreshes) the cached Python test environment of the bindings, outside the clone:
# ${FORESIGHTKV_CACHE:-$HOME/.cache/foresightkv}/venv-test, holding torch, numpy, pytest and maturin at
# pinned versions. Idempotent: a second run only compares a stamp of the pins and exits.
# Prints the venv's python interpreter path on stdout (logs go to stderr).
#
#   PY="$(scripts/python_env.sh)"
#
# torch comes from PyPI (the only index reachable here), so the wheel brings its CUDA runtime
# packages along; the first run downloads a few GiB, later runs reuse the venv (and pip's cache).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

VENV="$CACHE/venv-test"
# torch 2.11 matches the device machine's; numpy 2.x for the DLPack/array protocol tests; ruff for the lint
# gate; hypothesis for the property suites; transformers + gguf load the testbed model (and any HF
# Llama/Qwen directory); safetensors, tqdm and matplotlib for traces, progress bars and plots.
PINS=(torch==2.11.0 numpy==2.4.6 pytest==9.2.0 maturin==1.16.0 ruff==0.17.6 hypothesis==6.170.17
      transformers==5.24.0 gguf==0.19.0 safetensors==0.8.0 tqdm==4.70.1 matplotlib==3.11.2)
fkv_venv python_env "$VENV" "${PYTHON:-python3}" "torch, numpy, pytest" "${PINS[@]}"
echo "$VENV/bin/python"

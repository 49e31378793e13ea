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

CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"
VENV="$CACHE/venv-test"
BASE_PY="${PYTHON:-python3}"
# torch 2.11 matches the device machine's; numpy 2.x for the DLPack/array protocol tests; ruff for the lint
# gate; hypothesis for the property suites; transformers + gguf load the testbed model (and any HF
# Llama/Qwen directory); safetensors, tqdm and matplotlib for traces, progress bars and plots.
PINS=(torch==2.11.0 numpy==2.4.6 pytest==9.2.0 maturin==1.16.0 ruff==0.17.6 hypothesis==6.170.17
      transformers==5.24.0 gguf==0.19.0 safetensors==0.8.0 tqdm==4.70.1 matplotlib==3.11.2)
STAMP="$VENV/.stamp-$(echo "${PINS[*]} $("$BASE_PY" -c 'import sys; print(sys.version)')" | md5sum | cut -c1-12)"

log() { echo "python_env: $*" >&2; }

if [ ! -f "$STAMP" ]; then
  log "creating $VENV with ${PINS[*]}"
  start=$(date +%s)
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$BASE_PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
  "$VENV/bin/python" -c 'import torch, numpy, pytest' >&2
  touch "$STAMP"
  log "done in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
fi
echo "$VENV/bin/python"

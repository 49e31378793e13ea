#!/usr/bin/env bash
# Tests one engine plugin against the real engine on CPU: `scripts/test_engine.sh sglang` (sglang==0.5.23)
# or `scripts/test_engine.sh vllm` (vllm==0.32.0). Builds the foresightkv wheel (maturin, release, abi3),
# ensures the engine's cached venv (scripts/engine_env.sh ENGINE, which also installs integration/ENGINE
# editable so the engine sees its entry point), installs the wheel there, and runs integration/ENGINE/tests
# with that venv's pytest; for sglang also the whole-engine tests integration/sglang/e2e (scripts/e2e_env.sh).
#
# Prints pytest's summary, then one line `ENGINE tests: P passed, F failed, S skipped`.
# Exit status: 0 when every test passed (skips allowed), non-zero otherwise.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$FKV_ROOT"
ENGINE="${1:-}"
case "$ENGINE" in
  sglang) GROUP="sglang.srt.plugins" ;;
  # the PyPI vllm wheel is a CUDA build: without VLLM_TARGET_DEVICE it picks no platform on a GPU-less machine
  vllm) GROUP="vllm.general_plugins"; export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}" ;;
  *) echo "usage: scripts/test_engine.sh sglang|vllm (got '$ENGINE')" >&2; exit 2 ;;
esac
fkv_build_env
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
fail() { fkv_fail_summary "$ENGINE" "$*"; }

echo "--- $ENGINE environment"
# One run at a time per engine venv (the wheel is force-reinstalled into it): worktrees of one machine queue here.
mkdir -p "$CACHE"
exec 9>"$CACHE/venv-$ENGINE.lock"
flock 9
PY="$(scripts/engine_env.sh "$ENGINE" 2>"$WORK/env.err")" || { cat "$WORK/env.err"; fail "scripts/engine_env.sh $ENGINE failed"; }
"$PY" -m pip show --quiet maturin >/dev/null 2>&1 || "$PY" -m pip install --quiet --disable-pip-version-check "maturin>=1.9.4,<2"

echo "--- building the foresightkv wheel (maturin, release, abi3)"
start=$(date +%s)
WHEEL="$(fkv_wheel "$PY" "$WORK/wheels")"
[ -n "$WHEEL" ] || fail "no wheel was built"
echo "built $(basename "$WHEEL") in $(( $(date +%s) - start )) s"

echo "--- installing foresightkv and foresightkv-$ENGINE into $(dirname "$(dirname "$PY")")"
"$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps -e "integration/$ENGINE" 2>"$WORK/pip.err" \
  || { cat "$WORK/pip.err"; fail "installing integration/$ENGINE failed"; }
"$PY" - "$ENGINE" "$GROUP" <<'PYEOF' || fail "the installed packages do not import"
import importlib, importlib.metadata, os, sys
engine, group = sys.argv[1], sys.argv[2]
import foresightkv, foresightkv.engine
importlib.import_module(f"foresightkv_{engine}")
mod = importlib.import_module(engine)
eps = [e for e in importlib.metadata.entry_points(group=group) if e.name == "foresightkv"]
assert eps, f"entry point {group}:foresightkv is not installed"
print(f"foresightkv {foresightkv.__version__} ({os.path.dirname(foresightkv.__file__)}); "
      f"{engine} {mod.__version__}; plugin {eps[0].value}")
PYEOF

echo "--- pytest (integration/$ENGINE/tests)"
status=0
(cd "integration/$ENGINE" && "$PY" -m pytest -q -rs -p no:cacheprovider tests 2>&1) | tee "$WORK/pytest.txt" || status=$?
if [ "$ENGINE" != sglang ]; then
  fkv_pytest_summary "$ENGINE" "$WORK/pytest.txt" || status=1
  exit $status
fi

# The whole engine on CPU: sglang.Engine and launch_server with foresightkv against torch_native
# (integration/sglang/e2e; its interpreter layers the CPU stand-in and the allocator audit over the venv).
echo "--- end-to-end: whole SGLang on CPU (integration/sglang/e2e)"
start=$(date +%s)
e2e_extra=0
if ! E2E_PY="$(scripts/e2e_env.sh sglang 2>"$WORK/e2e-env.err")"; then
  cat "$WORK/e2e-env.err"; echo "FAIL: scripts/e2e_env.sh sglang"; e2e_extra=1; echo "0 passed" > "$WORK/e2e.txt"
else
  if MODEL_DIR="$(scripts/setup_model.sh 2>"$WORK/model.err")"; then export FKV_TESTBED_MODEL="$MODEL_DIR"; else
    cat "$WORK/model.err"; echo "FAIL: scripts/setup_model.sh (the testbed-model end-to-end test fails)"; fi
  (cd integration/sglang && "$E2E_PY" -m pytest -q -rs -p no:cacheprovider e2e 2>&1) | tee "$WORK/e2e.txt" || status=$?
fi
echo "end-to-end: $(( $(date +%s) - start )) s"
fkv_pytest_summary "sglang-plugin" "$WORK/pytest.txt" || status=1
fkv_pytest_summary "sglang-e2e" "$WORK/e2e.txt" "$e2e_extra" || status=1
# the line scripts/test.sh adds up: both parts together
counts() { fkv_pytest_summary x "$@" | awk '{ print $3, $5, $7 }'; }
read -r p1 f1 s1 < <(counts "$WORK/pytest.txt" || true)
read -r p2 f2 s2 < <(counts "$WORK/e2e.txt" "$e2e_extra" || true)
p=$((p1 + p2)); f=$((f1 + f2)); s=$((s1 + s2))
echo "sglang tests: $p passed, $f failed, $s skipped"
exit $status

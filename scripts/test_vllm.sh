#!/usr/bin/env bash
# Tests the vLLM plugin against the real vllm==0.32.0 on CPU: builds the foresightkv wheel (maturin,
# release, abi3), ensures the cached vLLM venv (scripts/engine_env.sh vllm, which also installs
# integration/vllm editable so vLLM sees its entry point), installs the wheel there, and runs
# integration/vllm/tests with that venv's pytest.
#
# Prints pytest's summary, then one line `vllm tests: P passed, F failed, S skipped`.
# Exit status: 0 when every test passed (skips allowed), non-zero otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
# the PyPI vllm wheel is a CUDA build: without this it picks no platform on a GPU-less machine
export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; echo "vllm tests: 0 passed, 1 failed, 0 skipped"; exit 1; }

echo "--- vLLM environment"
PY="$(scripts/engine_env.sh vllm 2>"$WORK/env.err")" || { cat "$WORK/env.err"; fail "scripts/engine_env.sh vllm failed"; }
"$PY" -m pip show --quiet maturin >/dev/null 2>&1 || "$PY" -m pip install --quiet --disable-pip-version-check "maturin>=1.9.4,<2"

echo "--- building the foresightkv wheel (maturin, release, abi3)"
start=$(date +%s)
"$PY" -m maturin build --release --quiet -m bindings/python/Cargo.toml -i "$PY" --out "$WORK/wheels" 2>&1 \
  | grep -v -e '^\s*Compiling' -e '^\s*Finished' || true
WHEEL="$(ls "$WORK"/wheels/foresightkv-*.whl 2>/dev/null | head -n1 || true)"
[ -n "$WHEEL" ] || fail "no wheel was built"
echo "built $(basename "$WHEEL") in $(( $(date +%s) - start )) s"

echo "--- installing foresightkv and foresightkv-vllm into $(dirname "$(dirname "$PY")")"
"$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps -e integration/vllm 2>"$WORK/pip.err" \
  || { cat "$WORK/pip.err"; fail "installing integration/vllm failed"; }
"$PY" - <<'PYEOF' || fail "the installed packages do not import"
import importlib.metadata, os
import foresightkv, foresightkv.engine, foresightkv_vllm, vllm
eps = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "foresightkv"]
assert eps, "entry point vllm.general_plugins:foresightkv is not installed"
print(f"foresightkv {foresightkv.__version__} ({os.path.dirname(foresightkv.__file__)}); "
      f"vllm {vllm.__version__}; plugin {eps[0].value}")
PYEOF

echo "--- pytest (integration/vllm/tests)"
status=0
(cd integration/vllm && "$PY" -m pytest -q -rs -p no:cacheprovider tests 2>&1) | tee "$WORK/pytest.txt" || status=$?
summary="$(tail -n 1 "$WORK/pytest.txt")"
count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
passed=$(count passed); failed=$(( $(count failed) + $(count error) )); skipped=$(count skipped)
[ "$passed" -gt 0 ] || { status=1; failed=$((failed + 1)); }
[ "$failed" -eq 0 ] || status=1
echo "vllm tests: $passed passed, $failed failed, $skipped skipped"
exit $status

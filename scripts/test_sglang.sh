#!/usr/bin/env bash
# Tests the SGLang plugin against the real sglang==0.5.23 on CPU: builds the foresightkv wheel (maturin,
# release, abi3), ensures the cached SGLang venv (scripts/engine_env.sh sglang, which also installs
# integration/sglang editable so SGLang sees its entry point), installs the wheel there, and runs
# integration/sglang/tests with that venv's pytest.
#
# Prints pytest's summary, then one line `sglang tests: P passed, F failed, S skipped`.
# Exit status: 0 when every test passed (skips allowed), non-zero otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; echo "sglang tests: 0 passed, 1 failed, 0 skipped"; exit 1; }

echo "--- SGLang environment"
PY="$(scripts/engine_env.sh sglang 2>"$WORK/env.err")" || { cat "$WORK/env.err"; fail "scripts/engine_env.sh sglang failed"; }
"$PY" -m pip show --quiet maturin >/dev/null 2>&1 || "$PY" -m pip install --quiet --disable-pip-version-check "maturin>=1.9.4,<2"

echo "--- building the foresightkv wheel (maturin, release, abi3)"
start=$(date +%s)
"$PY" -m maturin build --release --quiet -m bindings/python/Cargo.toml -i "$PY" --out "$WORK/wheels" 2>&1 \
  | grep -v -e '^\s*Compiling' -e '^\s*Finished' || true
WHEEL="$(ls "$WORK"/wheels/foresightkv-*.whl 2>/dev/null | head -n1 || true)"
[ -n "$WHEEL" ] || fail "no wheel was built"
echo "built $(basename "$WHEEL") in $(( $(date +%s) - start )) s"

echo "--- installing foresightkv and foresightkv-sglang into $(dirname "$(dirname "$PY")")"
"$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps -e integration/sglang 2>"$WORK/pip.err" \
  || { cat "$WORK/pip.err"; fail "installing integration/sglang failed"; }
"$PY" - <<'PYEOF' || fail "the installed packages do not import"
import importlib.metadata, os
import foresightkv, foresightkv.engine, foresightkv_sglang, sglang
eps = [e for e in importlib.metadata.entry_points(group="sglang.srt.plugins") if e.name == "foresightkv"]
assert eps, "entry point sglang.srt.plugins:foresightkv is not installed"
print(f"foresightkv {foresightkv.__version__} ({os.path.dirname(foresightkv.__file__)}); "
      f"sglang {sglang.__version__}; plugin {eps[0].value}")
PYEOF

echo "--- pytest (integration/sglang/tests)"
status=0
(cd integration/sglang && "$PY" -m pytest -q -rs -p no:cacheprovider tests 2>&1) | tee "$WORK/pytest.txt" || status=$?
summary="$(tail -n 1 "$WORK/pytest.txt")"
count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
passed=$(count passed); failed=$(( $(count failed) + $(count error) )); skipped=$(count skipped)
[ "$passed" -gt 0 ] || { status=1; failed=$((failed + 1)); }
[ "$failed" -eq 0 ] || status=1
echo "sglang tests: $passed passed, $failed failed, $skipped skipped"
exit $status

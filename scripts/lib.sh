# Shell code the scripts share; sourced (`source "$(dirname "$0")/lib.sh"`), never run. Defines the
# cache folder, the build environment, the cached virtual environments, the wheel build and the
# test-count lines every test script prints and scripts/test.sh adds up.

FKV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"

# nvcc and libclang from scripts/setup.sh, and the shared Cargo target folder (unless one is set).
fkv_build_env() {
  eval "$("$FKV_ROOT/scripts/setup.sh")"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
}

# fkv_venv NAME VENV BASE_PY IMPORTS PIN...: creates VENV from BASE_PY with the pinned packages
# unless its stamp (pins + interpreter version) is there; checks that IMPORTS (comma-separated
# modules) import. Logs to stderr as NAME.
fkv_venv() {
  local name="$1" venv="$2" base_py="$3" imports="$4"
  shift 4
  local stamp
  stamp="$venv/.stamp-$(echo "$* $("$base_py" -c 'import sys; print(sys.version)')" | md5sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  echo "$name: creating $venv with $*" >&2
  local start
  start=$(date +%s)
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$base_py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
  "$venv/bin/python" -c "import $imports" >&2
  touch "$stamp"
  echo "$name: done in $(( $(date +%s) - start )) s ($(du -sh "$venv" | cut -f1))" >&2
}

# fkv_source_hash: one hash of the sources a GPU bundle is built from (Rust core, kernels, bindings,
# Python package), so a GPU machine can tell a stale bundle from the tree it runs in.
fkv_source_hash() {
  (cd "$FKV_ROOT" && find src csrc bindings/python/src bindings/python/python build.rs Cargo.toml Cargo.lock \
      bindings/python/Cargo.toml -type f \( -name '*.rs' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \
      -o -name '*.py' -o -name '*.pyi' -o -name '*.toml' -o -name 'Cargo.lock' \) -not -path '*/__pycache__/*' \
    | LC_ALL=C sort | xargs cat | md5sum | cut -c1-16)
}

# fkv_wheel PY OUT: builds the foresightkv wheel (maturin, release, abi3) with interpreter PY into
# OUT; prints the wheel's path (empty when none was built).
fkv_wheel() {
  local py="$1" out="$2"
  "$py" -m maturin build --release --quiet -m "$FKV_ROOT/bindings/python/Cargo.toml" -i "$py" --out "$out" 2>&1 \
    | grep -v -e '^\s*Compiling' -e '^\s*Finished' >&2 || true
  ls "$out"/foresightkv-*.whl 2>/dev/null | head -n1 || true
}

# fkv_pytest_summary LABEL LOG [EXTRA_FAILED]: from pytest's last line in LOG, prints
# `LABEL tests: P passed, F failed, S skipped` (errors count as failed; no test passing is a
# failure); returns 0 when nothing failed.
fkv_pytest_summary() {
  local label="$1" log="$2" extra="${3:-0}" summary passed failed skipped
  summary="$(tail -n 1 "$log")"
  _count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
  passed=$(_count passed)
  failed=$(( $(_count failed) + $(_count error) + extra ))
  skipped=$(_count skipped)
  [ "$passed" -gt 0 ] || failed=$((failed + 1))
  echo "$label tests: $passed passed, $failed failed, $skipped skipped"
  [ "$failed" -eq 0 ]
}

# fkv_fail_summary LABEL WHY: a test script that could not run its tests: says why, prints a
# summary line of one failure, exits 1.
fkv_fail_summary() {
  echo "FAIL: $2"
  echo "$1 tests: 0 passed, 1 failed, 0 skipped"
  exit 1
}

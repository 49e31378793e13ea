#!/usr/bin/env bash
# The GPU check: everything scripts/test.sh cannot run without a CUDA GPU, on a machine with one.
#
#   1. the Rust GPU tests (`#[ignore = "needs a CUDA GPU"]`) with `cargo test -- --ignored`;
#   2. the Python package's CUDA tests (bindings/python/tests/test_cuda.py), none may skip;
#   3. `foresightkv bench-kernels` (decode bandwidth, eviction-step share), table and JSON;
#   4. bench/engine_step_gpu.py (the engine decode step with evictions, against full-cache attention)
#      and bench/torch_sdpa.py (the decode kernel against PyTorch SDPA on contiguous K/V);
#   5. compute-sanitizer memcheck and racecheck over the kernel test binaries' GPU tests.
#
# Everything it prints goes to bench/results/gpu/ (one log per step, plus summary.txt with the
# machine, date and the command lines). Exits non-zero when any step fails, and at once, saying
# why, when there is no GPU, no driver or no compute-sanitizer.
#
#   scripts/gpu_check.sh                       # all five steps
#   GPU_CHECK_QUICK=1 scripts/gpu_check.sh     # smaller bench-kernels grid and fewer sanitizer cases
#   FKV_GPU_BUNDLE=.gpu scripts/gpu_check.sh   # a GPU machine without Rust or network: the binaries
#                                              # and wheel scripts/gpu_bundle.sh built elsewhere, the
#                                              # Python tests under python3 (which must hold torch)
#   GPU_CHECK_OUT=DIR                          # logs to DIR instead of bench/results/gpu
#   GPU_CHECK_SANITIZER_TIMEOUT=SECONDS        # bound each sanitizer run (a timeout fails the step)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BUNDLE=""
if [ -n "${FKV_GPU_BUNDLE:-}" ]; then # resolved from the caller's folder, before the cd below
  BUNDLE="$(cd "$FKV_GPU_BUNDLE" 2>/dev/null && pwd)" \
    || { echo "gpu_check: FKV_GPU_BUNDLE=$FKV_GPU_BUNDLE is not a folder (build it with scripts/gpu_bundle.sh)" >&2; exit 1; }
fi
cd "$FKV_ROOT"
OUT="${GPU_CHECK_OUT:-$FKV_ROOT/bench/results/gpu}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
die() { echo "gpu_check: $*" | tee -a "$SUMMARY" >&2; exit 1; }

{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || cat "$BUNDLE/commit.txt" 2>/dev/null || echo '?')${BUNDLE:+ (prebuilt bundle of $(cat "$BUNDLE/commit.txt" 2>/dev/null || echo '?'))}"
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
} > "$SUMMARY"

command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi: this machine has no NVIDIA driver (run this on a GPU machine)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpus.txt" 2>&1 \
  || die "nvidia-smi sees no GPU: $(cat "$OUT/gpus.txt")"
[ -s "$OUT/gpus.txt" ] || die "nvidia-smi lists no GPU"
echo "gpus: $(paste -sd';' "$OUT/gpus.txt")" >> "$SUMMARY"

[ -z "$BUNDLE" ] && fkv_build_env
SANITIZER="$(command -v compute-sanitizer || true)"
for dir in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin /opt/cuda/bin; do
  [ -n "$SANITIZER" ] || { [ -x "$dir/compute-sanitizer" ] && SANITIZER="$dir/compute-sanitizer"; } || true
done
[ -n "$SANITIZER" ] || die "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): install the CUDA toolkit's sanitizer"

status=0
step() { # step NAME LOG COMMAND...: runs one step, logging to LOG, recording the outcome
  local name="$1" log="$2"
  shift 2
  echo "--- $name: $*" | tee -a "$SUMMARY"
  if "$@" > "$log" 2>&1; then
    echo "ok: $name" | tee -a "$SUMMARY"
  else
    tail -n 30 "$log"
    echo "FAIL: $name (log: ${log#"$FKV_ROOT"/})" | tee -a "$SUMMARY"
    status=1
  fi
}

if [ -n "$BUNDLE" ]; then
  BIN="$BUNDLE/bin/foresightkv"
  [ -x "$BIN" ] || die "no $BIN: build the bundle with scripts/gpu_bundle.sh"
  [ "$(cat "$BUNDLE/sources.txt" 2>/dev/null)" = "$(fkv_source_hash)" ] \
    || die "the bundle in $BUNDLE was built from other sources than this tree's: rebuild it with scripts/gpu_bundle.sh"
else
  echo "--- build (release)"
  cargo build --workspace --all-targets --release > "$OUT/build.txt" 2>&1 || die "build failed: $(tail -n 20 "$OUT/build.txt")"
  BIN="$CARGO_TARGET_DIR/release/foresightkv"
fi
"$BIN" info > "$OUT/info.txt" 2>&1 || die "foresightkv info failed: $(cat "$OUT/info.txt")"
grep -q '^gpu: ' "$OUT/info.txt" || die "foresightkv sees no GPU: $(cat "$OUT/info.txt")"

# 1. Rust GPU tests: only the ignored ones (the rest ran in scripts/test.sh).
rust_gpu_bundle() { # the bundle's kernel test binaries, each with --ignored
  local bin rc=0
  for bin in "$BUNDLE"/tests/*; do "$bin" --ignored --test-threads 1 || rc=1; done
  return $rc
}
if [ -n "$BUNDLE" ]; then
  step "Rust GPU tests (bundle, --ignored)" "$OUT/rust_gpu_tests.txt" rust_gpu_bundle
else
  step "Rust GPU tests (--ignored)" "$OUT/rust_gpu_tests.txt" \
    cargo test --workspace --release -- --ignored
fi
grep -E '^test result:' "$OUT/rust_gpu_tests.txt" | tee -a "$SUMMARY" || true

# 2. Python CUDA tests in a fresh venv over the cached test venv (as scripts/test_python.sh does).
FKV_PY=()  # the python that holds the package just built (set by python_cuda, used by the engine bench)
python_cuda() { # (runs inside `if`, where set -e is off: every step checks its own status)
  local py venv wheel site rc=0
  if [ -n "$BUNDLE" ]; then # the bundle's wheel into a fresh folder on python3's path
    site="$(mktemp -d)/site"
    python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$site" \
      "$BUNDLE"/wheel/*.whl || return 1
    FKV_PY=(env "PYTHONPATH=$site" python3)
  else
    py="$(scripts/python_env.sh)" || return 1
    venv="$(mktemp -d)/venv"
    wheel="$(fkv_wheel "$py" "$(dirname "$venv")/wheels")"
    [ -n "$wheel" ] || { echo "no wheel was built"; return 1; }
    "$py" -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index "$wheel" || return 1
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    "$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/zz_foresightkv_test_deps.pth" || return 1
    FKV_PY=("$venv/bin/python")
  fi
  "${FKV_PY[@]}" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"' || return 1
  (cd bindings/python && "${FKV_PY[@]}" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py) || rc=$?
  [ "$rc" -eq 0 ] || return 1
}
step "Python CUDA tests (tests/test_cuda.py)" "$OUT/python_cuda_tests.txt" python_cuda
# Every CUDA test must run here: a skip is a failure of the check.
if tail -n 1 "$OUT/python_cuda_tests.txt" | grep -q skipped; then
  echo "FAIL: Python CUDA tests skipped some tests: $(tail -n 1 "$OUT/python_cuda_tests.txt")" | tee -a "$SUMMARY"
  status=1
fi

# 3. The kernel benchmark: table on stdout, JSON beside it.
BENCH_ARGS=()
[ -z "${GPU_CHECK_QUICK:-}" ] || BENCH_ARGS=(--batches 1,32,256 --lives 1024,8192,32768 --evict-batches 1,128)
step "foresightkv bench-kernels ${BENCH_ARGS[*]}" "$OUT/bench_kernels.txt" \
  "$BIN" bench-kernels "${BENCH_ARGS[@]}" --json "$OUT/bench_kernels.json"

# 4. The engine step on the GPU (bench/engine_step_gpu.py): staggered and synchronised evictions.
engine_bench() {
  [ "${#FKV_PY[@]}" -gt 0 ] || { echo "the Python step did not build the package"; return 1; }
  "${FKV_PY[@]}" bench/engine_step_gpu.py --json "$OUT/engine_step_gpu.json" || return 1
  "${FKV_PY[@]}" bench/engine_step_gpu.py --sync --json "$OUT/engine_step_gpu_sync.json" || return 1
  "${FKV_PY[@]}" bench/engine_step_gpu.py --batch 16 --json "$OUT/engine_step_gpu_b16.json" || return 1
}
step "engine step on the GPU (bench/engine_step_gpu.py)" "$OUT/engine_step_gpu.txt" engine_bench
sdpa_bench() { # PyTorch SDPA on contiguous K/V against the paged decode kernel, same grid
  [ "${#FKV_PY[@]}" -gt 0 ] || { echo "the Python step did not build the package"; return 1; }
  "${FKV_PY[@]}" bench/torch_sdpa.py --bin "$BIN" --batches 1,32,256 --lives 1024,8192,32768 \
    --json "$OUT/torch_sdpa.json"
}
step "decode attention against torch SDPA (bench/torch_sdpa.py)" "$OUT/torch_sdpa.txt" sdpa_bench

# 5. compute-sanitizer over the kernel test binaries' GPU tests (few proptest cases: the sanitizer
#    slows kernels down by orders of magnitude).
export FORESIGHTKV_PROPTEST_CASES="${GPU_CHECK_SANITIZER_CASES:-4}"
if [ -n "$BUNDLE" ]; then
  TEST_BINS=("$BUNDLE"/tests/*)
else
  mapfile -t TEST_BINS < <(cargo test --release --no-run --message-format=json \
    --test cuda_kernels --test cuda_sampling --test reshape_and_cache 2>/dev/null \
  | "$(scripts/python_env.sh)" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
fi
[ "${#TEST_BINS[@]}" -eq 3 ] || die "expected 3 kernel test binaries, found ${#TEST_BINS[@]}"
for tool in memcheck racecheck; do
  for bin in "${TEST_BINS[@]}"; do
    name="$(basename "$bin" | sed 's/-[0-9a-f]*$//')"
    step "compute-sanitizer --tool $tool $name --ignored" "$OUT/sanitizer_${tool}_${name}.txt" \
      timeout "${GPU_CHECK_SANITIZER_TIMEOUT:-0}" "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all "$bin" --ignored --test-threads 1
  done
done

echo "gpu_check: $([ "$status" -eq 0 ] && echo "all steps passed" || echo "some steps FAILED"); logs in ${OUT#"$FKV_ROOT"/}/" \
  | tee -a "$SUMMARY"
exit $status

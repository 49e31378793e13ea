#!/usr/bin/env bash
# Runs every test of the project on a fresh machine (the README's test command; .ci/run calls it).
# Installs what it needs (nvcc 13.0 and libclang from Python packages, into a cache outside the clone),
# builds the CUDA kernels (no GPU needed), runs the Rust tests, checks that a build without nvcc still
# works and fails CUDA calls with a typed error, runs the Python package's tests and the SGLang and
# vLLM plugins' tests (each engine in its own cached virtual environment), and prints the total count.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
eval "$(scripts/setup.sh)"
CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
export FORESIGHTKV_PROPTEST_CASES="${FORESIGHTKV_PROPTEST_CASES:-1000}"
LOG="$(mktemp -d)"
trap 'rm -rf "$LOG"' EXIT

passed=0; failed=0; skipped=0
count_cargo() { # adds up cargo test's "test result:" lines of a log
  read -r p f i < <(awk '/^test result:/ { for (k = 1; k <= NF; k++) {
      if ($k ~ /^passed/) p += $(k-1); if ($k ~ /^failed/) f += $(k-1); if ($k ~ /^ignored/) i += $(k-1) } }
    END { print p + 0, f + 0, i + 0 }' "$1")
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + i))
}
section() { echo; echo "=== $* ==="; }
status=0

section "build (kernels compiled for sm_80, sm_90 + compute_90 PTX)"
if ! cargo build --workspace --all-targets --release > "$LOG/build.txt" 2>&1; then
  tail -n 60 "$LOG/build.txt"; echo "FAIL: release build"; echo "total: 0 passed, 1 failed, 0 skipped"; exit 1
fi
tail -n 1 "$LOG/build.txt"
"$CARGO_TARGET_DIR/release/foresightkv" info | tee "$LOG/info.txt"
for arch in sm_80 sm_90; do
  grep -q "$arch" "$LOG/info.txt" || { echo "FAIL: $arch not embedded"; status=1; failed=$((failed + 1)); }
done

section "Rust tests"
# --show-output prints what passing tests wrote, so the GPU tests' "skipped: <why>" lines are seen and
# those tests are counted as skipped, not passed.
if cargo test --workspace --release -- --show-output > "$LOG/cargo.txt" 2>&1; then :; else status=1; fi
grep -E '^(test |test result:|running |failures:|---- |thread .* panicked)' "$LOG/cargo.txt" | grep -v ' \.\.\. ok$' || true
count_cargo "$LOG/cargo.txt"
gpu_skips=$(grep -c 'skipped: ' "$LOG/cargo.txt" || true)
echo "tests that skipped (counted as skipped):"; grep 'skipped: ' "$LOG/cargo.txt" | sort | uniq -c || true
passed=$((passed - gpu_skips)); skipped=$((skipped + gpu_skips))
[ "$status" -eq 0 ] || tail -n 80 "$LOG/cargo.txt"

section "fuzz: every parser of outside data, short pass (scripts/fuzz.sh, libFuzzer + AddressSanitizer)"
if scripts/fuzz.sh 2>&1 | tee "$LOG/fuzz.txt"; then :; else status=1; fi
read -r p f s < <(awk '/^fuzz tests:/ { p = $3; f = $5; s = $7 } END { print p + 0, (f == "" ? 1 : f), s + 0 }' "$LOG/fuzz.txt")
passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))

section "build without nvcc: warns, builds, and CUDA calls fail with a typed error"
NOCUDA_PATH="$(echo "$PATH" | tr ':' '\n' | grep -v -e '/cuda' -e 'nvidia' | paste -sd: -)"
# Forget the cached build-script run so its warning is printed again.
rm -rf "$CACHE"/target-nonvcc/debug/build/foresightkv-*
if env -u NVCC -u CUDA_HOME PATH="$NOCUDA_PATH" CARGO_TARGET_DIR="$CACHE/target-nonvcc" \
     cargo build > "$LOG/nonvcc.txt" 2>&1 && grep -q "nvcc not found" "$LOG/nonvcc.txt"; then
  echo "ok: build without nvcc warned and succeeded"
else
  tail -n 20 "$LOG/nonvcc.txt"; echo "FAIL: no warning or build failed without nvcc"; status=1; failed=$((failed + 1))
fi
if env -u NVCC -u CUDA_HOME PATH="$NOCUDA_PATH" CARGO_TARGET_DIR="$CACHE/target-nonvcc" FORESIGHTKV_EXPECT_NO_KERNELS=1 \
     cargo test --test reshape_and_cache -- cuda_call 2>&1 | tee "$LOG/nonvcc-test.txt"; then :; else status=1; fi
count_cargo "$LOG/nonvcc-test.txt"
"$CACHE/target-nonvcc/debug/foresightkv" info | grep "not compiled in" || { echo "FAIL: info claims kernels"; status=1; }

section "Python package: abi3 wheel, fresh venv, pytest"
if scripts/test_python.sh 2>&1 | tee "$LOG/python.txt"; then :; else status=1; fi
read -r p f s < <(awk '/^python tests:/ { p = $3; f = $5; s = $7 } END { print p + 0, (f == "" ? 1 : f), s + 0 }' "$LOG/python.txt")
passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))

section "SGLang plugin: real sglang 0.5.23 on CPU (its own cached venv)"
if scripts/test_engine.sh sglang 2>&1 | tee "$LOG/sglang.txt"; then :; else status=1; fi
read -r p f s < <(awk '/^sglang tests:/ { p = $3; f = $5; s = $7 } END { print p + 0, (f == "" ? 1 : f), s + 0 }' "$LOG/sglang.txt")
passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))

section "vLLM plugin: real vLLM 0.32.0 on CPU (its own cached venv)"
if scripts/test_engine.sh vllm 2>&1 | tee "$LOG/vllm.txt"; then :; else status=1; fi
read -r p f s < <(awk '/^vllm tests:/ { p = $3; f = $5; s = $7 } END { print p + 0, (f == "" ? 1 : f), s + 0 }' "$LOG/vllm.txt")
passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))

echo
echo "total: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] || status=1
exit $status

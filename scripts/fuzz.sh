#!/usr/bin/env bash
# Fuzzes every parser of outside data (fuzz/fuzz_targets/*.rs) with cargo-fuzz / libFuzzer under
# AddressSanitizer, with debug assertions (integer overflow is a crash), a 10 s per-input timeout (a
# slow input is a crash) and a 1 GiB malloc limit (the core's own allocation bound is set to 512 MiB,
# so any allocation past it is a missing bound). Installs cargo-fuzz into the cache if missing; the
# toolchain is stable, so the nightly flags cargo-fuzz needs are enabled with RUSTC_BOOTSTRAP=1.
#
#   scripts/fuzz.sh                       short pass, FUZZ_SECONDS (default 15) per target (test.sh)
#   scripts/fuzz.sh --runs 1000000 --seconds 3600 --record bench/results/fuzz.txt
#                                         the long run (stops at 1M executions or the time cap)
#   scripts/fuzz.sh --seconds 600 --targets "trace_csv attention_trace"
#   FUZZ_PARALLEL=1 scripts/fuzz.sh ...  runs the targets at once (one process each)
#
# Seeds are fuzz/seeds/<target> (committed, small); the growing corpus lives in the cache. Prints one
# line per target and "fuzz tests: P passed, F failed, 0 skipped" (a crash, timeout or build failure
# is a failed test); crashing inputs are kept under $CACHE/fuzz/artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-15}"
RUNS=""
RECORD=""
TARGETS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_TARGET="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --record) RECORD="$2"; shift 2 ;;
    --targets) TARGETS="$2"; shift 2 ;;
    *) echo "usage: scripts/fuzz.sh [--seconds N | --runs N] [--targets \"a b\"] [--record FILE]" >&2; exit 2 ;;
  esac
done
[ -n "$TARGETS" ] || TARGETS="$(cd fuzz/fuzz_targets && ls ./*.rs | sed 's|^\./||; s|\.rs$||' | sort | tr '\n' ' ')"

# libclang for bindgen (csrc/include parameter structs); no nvcc: the kernels are not fuzzed here.
eval "$(scripts/setup.sh)" > /dev/null
unset NVCC CUDA_HOME
export PATH="$(echo "$PATH" | tr ':' '\n' | grep -v -e '/cuda' -e 'nvidia' | paste -sd: -)"
export PATH="$CACHE/cargo-fuzz/bin:$PATH"
if ! command -v cargo-fuzz > /dev/null; then
  echo "installing cargo-fuzz into $CACHE/cargo-fuzz"
  cargo install --locked cargo-fuzz --root "$CACHE/cargo-fuzz" > "$CACHE/cargo-fuzz-install.log" 2>&1 ||
    { tail -n 20 "$CACHE/cargo-fuzz-install.log"; echo "fuzz tests: 0 passed, 1 failed, 0 skipped"; exit 1; }
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$CACHE/target-fuzz"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
WORK="$CACHE/fuzz"
mkdir -p "$WORK/artifacts"

echo "building fuzz targets (cargo fuzz build -a, AddressSanitizer, RUSTC_BOOTSTRAP=1)"
if ! (cd fuzz && nice cargo fuzz build -a) > "$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log"
  echo "FAIL: fuzz build"
  echo "fuzz tests: 0 passed, 1 failed, 0 skipped"
  exit 1
fi

export FORESIGHTKV_MAX_ALLOC_BYTES=$((512 << 20))
# Runs one target; writes its figures to $WORK/<target>.row ("verdict executions crashes seconds corpus").
run_target() {
  local t="$1" bin="$CARGO_TARGET_DIR/$TRIPLE/release/$1" corpus="$WORK/corpus/$1" log="$WORK/$1.log"
  mkdir -p "$corpus"
  local budget=(-max_total_time="$SECONDS_PER_TARGET")
  [ -z "$RUNS" ] || budget+=(-runs="$RUNS")
  local start rc=0
  start=$(date +%s.%N)
  nice "$bin" "$corpus" "fuzz/seeds/$t" "${budget[@]}" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=1024 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$WORK/artifacts/$t-" > "$log" 2>&1 || rc=$?
  local secs execs crashes verdict=ok
  secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.0f", e - s }')
  execs=$(awk '/stat::number_of_executed_units:/ { n = $2 } END { print n + 0 }' "$log")
  crashes=$(grep -c 'Test unit written to' "$log" || true)
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    verdict=FAIL
    [ "$crashes" -gt 0 ] || crashes=1
  fi
  echo "$verdict $execs $crashes $secs $(find "$corpus" -type f | wc -l)" > "$WORK/$t.row"
}

for t in $TARGETS; do rm -f "$WORK/$t.row"; done
if [ -n "${FUZZ_PARALLEL:-}" ]; then
  for t in $TARGETS; do run_target "$t" & done
  wait
else
  for t in $TARGETS; do run_target "$t"; done
fi

passed=0; failed=0
rows=()
for t in $TARGETS; do
  read -r verdict execs crashes secs corpus_n < "$WORK/$t.row" || { verdict=FAIL; execs=0; crashes=1; secs=0; corpus_n=0; }
  if [ "$verdict" = ok ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$WORK/$t.log" | head -n 8 || tail -n 8 "$WORK/$t.log"
  fi
  printf 'fuzz %-20s %s: %d executions in %d s, %d crashes, corpus %d\n' "$t" "$verdict" "$execs" "$secs" "$crashes" "$corpus_n"
  rows+=("$(printf '%-20s %12d %8d %8d %8d' "$t" "$execs" "$crashes" "$secs" "$corpus_n")")
done

if [ -n "$RECORD" ]; then
  {
    echo "# Fuzz figures: ${FUZZ_PARALLEL:+FUZZ_PARALLEL=1 }scripts/fuzz.sh ${RUNS:+--runs $RUNS }--seconds $SECONDS_PER_TARGET (libFuzzer via cargo-fuzz $(cargo-fuzz --version | awk '{print $2}'), AddressSanitizer, debug assertions)"
    echo "# machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), shared with other jobs), $(awk '/MemTotal/ { printf "%d GiB", $2 / 1048576 }' /proc/meminfo); $(rustc --version); date $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "# commit $(git -C "$ROOT" rev-parse --short HEAD); seeds fuzz/seeds/<target>, corpus grown from them in the cache"
    printf '%-20s %12s %8s %8s %8s\n' target executions crashes seconds corpus
    printf '%s\n' "${rows[@]}"
  } > "$RECORD"
  echo "figures written to $RECORD"
fi
echo "fuzz tests: $passed passed, $failed failed, 0 skipped"
[ "$failed" -eq 0 ]

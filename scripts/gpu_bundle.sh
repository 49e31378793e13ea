#!/usr/bin/env bash
# Builds, on this machine, everything scripts/gpu_check.sh needs on a GPU machine that has no Rust
# toolchain and no network (nvcc here, from scripts/setup.sh): the release `foresightkv` binary, the
# kernel test binaries and the abi3 Python wheel with the kernels embedded, into one folder (default
# .gpu/, ignored by git) to copy or carry there. Prints the folder and its size.
#
#   scripts/gpu_bundle.sh [DIR]
#   FKV_GPU_BUNDLE=DIR scripts/gpu_check.sh     # on the GPU machine: uses DIR instead of building
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$FKV_ROOT"
fkv_build_env
DIR="${1:-$FKV_ROOT/.gpu}"
rm -rf "$DIR"
mkdir -p "$DIR/bin" "$DIR/tests" "$DIR/wheel"

LOGF="$(mktemp)"
trap 'rm -f "$LOGF"' EXIT
cargo build --release --bin foresightkv > "$LOGF" 2>&1 || { cat "$LOGF" >&2; echo "gpu_bundle: build failed" >&2; exit 1; }
cp "$CARGO_TARGET_DIR/release/foresightkv" "$DIR/bin/"
info="$("$DIR/bin/foresightkv" info)"
grep -q '^kernels:  embedded' <<< "$info" || { echo "gpu_bundle: the binary has no kernels (nvcc missing?): $info" >&2; exit 1; }
cargo test --release --no-run --message-format=json \
    --test cuda_kernels --test cuda_sampling --test reshape_and_cache 2>"$LOGF" \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' \
  | while read -r name exe; do cp "$exe" "$DIR/tests/$name"; done
[ "$(ls "$DIR/tests" | wc -l)" -eq 3 ] || { cat "$LOGF" >&2; echo "gpu_bundle: expected 3 kernel test binaries" >&2; exit 1; }
strip "$DIR/bin/"* "$DIR/tests/"* 2>/dev/null || true
wheel="$(fkv_wheel "$(scripts/python_env.sh)" "$DIR/wheel")"
[ -n "$wheel" ] || { echo "gpu_bundle: no wheel was built" >&2; exit 1; }
unzip -l "$wheel" | grep -q '_native' || { echo "gpu_bundle: $wheel has no native module" >&2; exit 1; }
git describe --always --dirty > "$DIR/commit.txt" 2>/dev/null || true
fkv_source_hash > "$DIR/sources.txt"
echo "$DIR ($(du -sh "$DIR" | cut -f1))"

#!/usr/bin/env bash
# The README's main command: builds foresightkv (with its CUDA kernels; no GPU needed) and runs the
# offline replay of the bundled Azure production trace. Arguments go to `foresightkv replay`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$FKV_ROOT"
fkv_build_env
cargo build --release --bin foresightkv 2>&1 | tail -n 1 >&2
exec "$CARGO_TARGET_DIR/release/foresightkv" replay "$@"

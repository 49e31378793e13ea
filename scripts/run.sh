#!/usr/bin/env bash
# The README's main command: builds foresightkv (with its CUDA kernels; no GPU needed) and runs the
# offline replay of the bundled Azure production trace. Arguments go to `foresightkv replay`.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
cargo build --release --bin foresightkv 2>&1 | tail -n 1 >&2
exec "$CARGO_TARGET_DIR/release/foresightkv" replay "$@"

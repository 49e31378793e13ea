#!/usr/bin/env bash
# Installs what the build and the tests need, into a cache outside the clone, and prints
# the environment to use it. Idempotent: a second run only checks stamps.
#
#   eval "$(scripts/setup.sh)"         # toolchain + libclang (Rust build)
#   eval "$(scripts/setup.sh --python)" # also the Python test venv (torch CPU, maturin, pytest)
set -euo pipefail

CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"
CUDA_DIR="$CACHE/cuda-13.0"
CLANG_DIR="$CACHE/libclang-18"
PY="${PYTHON:-python3}"
# One 13.0 release for every part: a newer nvidia-nvvm emits PTX that nvcc 13.0's ptxas rejects.
CUDA_PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
           nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85)
CUDA_STAMP="$CUDA_DIR/.stamp-$(echo "${CUDA_PKGS[*]}" | md5sum | cut -c1-12)"
mkdir -p "$CACHE"

log() { echo "setup: $*" >&2; }

if [ ! -f "$CUDA_STAMP" ]; then
  log "installing nvcc 13.0 from Python packages into $CUDA_DIR"
  rm -rf "$CUDA_DIR"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$CUDA_DIR/site" "${CUDA_PKGS[@]}" >&2
  # The wheels spread one CUDA tree over several packages; merge them into one CUDA_HOME.
  root="$CUDA_DIR/site/nvidia/cu13"
  [ -d "$root" ] || root="$(dirname "$(find "$CUDA_DIR/site" -type f -name nvcc | head -n1)")/.."
  ln -sfn "$(cd "$root" && pwd)" "$CUDA_DIR/home"
  touch "$CUDA_STAMP"
fi
CUDA_HOME_DIR="$(cd "$CUDA_DIR/home" && pwd)"
chmod +x "$CUDA_HOME_DIR"/bin/* "$CUDA_HOME_DIR"/nvvm/bin/* 2>/dev/null || true

if [ ! -f "$CLANG_DIR/.stamp" ]; then
  log "installing libclang (for bindgen) into $CLANG_DIR"
  rm -rf "$CLANG_DIR"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$CLANG_DIR" libclang==18.1.1 >&2
  touch "$CLANG_DIR/.stamp"
fi
LIBCLANG_DIR="$CLANG_DIR/clang/native"

echo "export CUDA_HOME='$CUDA_HOME_DIR'"
echo "export NVCC='$CUDA_HOME_DIR/bin/nvcc'"
echo "export LIBCLANG_PATH='$LIBCLANG_DIR'"

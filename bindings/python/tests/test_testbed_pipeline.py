"""The whole testbed pipeline on a tiny random Llama saved as a HF directory (always runs): the
``traces`` command writes the splits, ``eval --quick`` evaluates every policy from them and writes
the table, JSON and plot; under 3 minutes. A last test reads the real model when it is cached."""

import json
import os
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")


def byte_tokenizer():
    """A byte-level tokenizer without merges (every byte a token) plus an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def run_cli(*args, timeout=170):
    # one thread each: on a busy machine OpenMP/rayon spin barriers make a tiny model 30x slower
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "foresightkv", *args, "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_traces_then_eval_quick(tiny_dir, tmp_path):
    start = time.time()
    out = tmp_path / "traces"
    r = run_cli(
        "traces", "--model", tiny_dir, "--out", str(out), "--heldout", "2", "--train", "1",
        "--text", "1", "--tokens", "160", "--tasks", "needle,kv_retrieval", "--max-new", "4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from foresightkv.testbed.traces import HELDOUT_SEED, load_split

    held = load_split(str(out / "heldout.safetensors"))
    train = load_split(str(out / "train.safetensors"))
    text = load_split(str(out / "text.safetensors"))
    assert len(held) == 2 and len(train) == 1 and len(text) == 1
    assert [e["seed"] for e in held.examples] == [HELDOUT_SEED, HELDOUT_SEED + 1]
    assert [e["seed"] for e in train.examples] == [0]
    s = held.sequence(0)
    assert 150 <= s.prompt_len <= 160 and len(s) > s.prompt_len
    assert torch.isnan(s.ce[0]) and torch.isfinite(s.ce[1:]).all() and (s.entropy[1:] >= 0).all()
    # the stored CE is the model's own full-cache CE
    from foresightkv.testbed.model import full_forward_logits, load_model, token_losses

    model, _ = load_model(tiny_dir)
    ce, _ = token_losses(full_forward_logits(model, s.input_ids), s.input_ids)
    torch.testing.assert_close(s.ce[1:], ce, atol=1e-4, rtol=1e-4)

    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    r = run_cli(
        "eval", "--model", tiny_dir, "--traces", str(out), "--quick", "--budgets", "32", "--interval", "16",
        "--max-new", "4", "--text-limit", "1", "--json", str(js), "--plot", str(png),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loss ratio" in r.stdout and "golden" in r.stdout
    res = json.loads(js.read_text())
    assert os.path.getsize(png) > 1000
    lr = res["loss_ratio"]["heldout/all"]["32"]
    assert lr["full"] == pytest.approx(1.0)
    for p in ("golden", "h2o", "snapkv", "tova", "rkv", "streaming", "random"):
        assert lr[p] is not None and lr[p] > 0, p
    assert res["done"]["heldout"] == 2 and res["done"]["accuracy"] == 2 and res["done"]["mass"] == 1
    assert "text/all" in res["loss_ratio"]
    m = res["mass_kept"]["32"]
    assert 0 < m["random"] <= 1 and m["golden"] >= m["random"]
    # a later range of the split (--start), and a length floor no sequence reaches (--min-tokens)
    js2 = tmp_path / "eval2.json"
    r = run_cli(
        "eval", "--model", tiny_dir, "--traces", str(out), "--budgets", "32", "--interval", "16", "--start", "1",
        "--policies", "h2o", "--accuracy-limit", "0", "--mass-limit", "0", "--json", str(js2),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res2 = json.loads(js2.read_text())
    assert [row["index"] for row in res2["per_sequence"]] == [1] and res2["selection"]["start"] == 1
    r = run_cli(
        "eval", "--model", tiny_dir, "--traces", str(out), "--budgets", "32", "--interval", "16",
        "--min-tokens", "100000", "--policies", "h2o", "--json", str(js2),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(js2.read_text())["done"]["heldout"] == 0
    assert time.time() - start < 180


@pytest.mark.skipif(
    not os.path.isfile(
        os.path.join(
            os.environ.get("FORESIGHTKV_CACHE", os.path.expanduser("~/.cache/foresightkv")),
            "models",
            "smollm2-135m-instruct",
            "config.json",
        )
    ),
    reason="the testbed model is not in the cache (scripts/setup_model.sh)",
)
def test_real_model_no_eviction_matches_its_own_forward():
    import importlib

    from foresightkv.testbed.model import default_model_dir, full_forward_logits, load_model, token_losses

    sim = importlib.import_module("foresightkv.testbed.simulate")
    model, tok = load_model(default_model_dir())
    assert model.config.rope_theta if hasattr(model.config, "rope_theta") else True
    x = torch.tensor(tok("The quick brown fox jumps over the lazy dog. " * 6)["input_ids"])
    ref, _ = token_losses(full_forward_logits(model, x), x)
    r = sim.simulate(model, x, prompt_len=0, policy="full", budget=32, interval=16)
    torch.testing.assert_close(r.ce, ref, atol=2e-4, rtol=2e-4)

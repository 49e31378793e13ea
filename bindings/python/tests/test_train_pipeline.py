"""The whole ``foresightkv train`` command on a tiny random Llama (built from a config here):
traces -> Golden labels -> supervised -> GRPO -> checkpoint -> eval, then a rerun that skips every
stage, and the saved scorer served through the core's loader and the simulator's foresight policy."""

import json
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tqdm")

import foresightkv as fkv


def tiny_model_dir(tmp_path, head_dim=8):
    """A random 2-layer Llama (4 query / 2 KV heads, ``head_dim`` 8; the CUDA kernels' smallest is 64)
    with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(60)}
    vocab.update({"<unk>": 60, "<s>": 61, "</s>": 62, "<pad>": 63})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024, bos_token_id=61, eos_token_id=62,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model


def tiny_traces(tmp_path, model):
    """Train and held-out splits of random token sequences with their full-cache CE/entropy."""
    from foresightkv.testbed.model import full_forward_logits, token_losses
    from foresightkv.testbed.traces import TraceSeq, save_split

    g = torch.Generator().manual_seed(1)
    out = tmp_path / "traces"
    for split, n in (("train", 6), ("heldout", 2)):
        seqs = []
        for i in range(n):
            ids = torch.randint(0, 60, (120,), generator=g)
            ce, ent = token_losses(full_forward_logits(model, ids), ids)
            nan = torch.full((1,), float("nan"))
            seqs.append(TraceSeq(ids, 40, torch.cat([nan, ce]), torch.cat([nan, ent]), False, {"task": "random", "seed": i}))
        save_split(str(out / f"{split}.safetensors"), split, "tiny", seqs)
    return out


def train_command(model_dir, traces, out, work, *extra):
    """The tiny pipeline's ``foresightkv train`` command line (every stage, a few steps each)."""
    return [
        sys.executable, "-m", "foresightkv", "train", "--model", str(model_dir), "--out", str(out), "--work", str(work),
        "--traces", str(traces / "train.safetensors"), "--budgets", "32,48", "--interval", "8", "--label-evictions", "3",
        "--sl-steps", "12", "--sl-batch", "2", "--rl-steps", "2", "--rl-traces", "1", "--group", "3", "--eval-count", "2",
        "--quiet", *extra,
    ]


def test_train_command_end_to_end_and_resume(tmp_path):
    model_dir, model = tiny_model_dir(tmp_path)
    traces = tiny_traces(tmp_path, model)
    out, work = tmp_path / "scorer", tmp_path / "work"
    cmd = train_command(model_dir, traces, out, work, "--threads", "1")
    t0 = time.time()
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stderr[-4000:]
    assert time.time() - t0 < 180
    ck = fkv.ScorerCheckpoint.load(out)
    ck.check_model(2, 2, 2, 8)
    info = json.loads((out / "training.json").read_text())
    assert info["stage"] == "rl"
    ratios = info["eval"]["loss_ratio"]["heldout/all"]
    assert set(ratios) == {"32", "48"}
    for b in ("32", "48"):
        assert set(ratios[b]) == {"full", "foresight-sl", "foresight-sl+rl", "h2o"}
        assert ratios[b]["full"] == 1.0 and all(v > 0 for v in ratios[b].values())
    sl = json.loads((work / "sl" / "history.json").read_text())["log"]
    assert 0.0 <= sl[-1]["held_out_top_l_overlap"] <= 1.0
    rl = json.loads((work / "rl" / "history.json").read_text())["log"]
    assert len(rl) == 2 and all(e["reward_mean"] <= 0 for e in rl)
    labels = sorted((work / "labels").glob("*.safetensors"))
    assert len(labels) == 12
    stamp = {p: p.stat().st_mtime_ns for p in labels + [work / "sl" / "state.pt", work / "rl" / "state.pt"]}
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=170)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "supervised stage done" in again.stderr and "RL stage done" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp

    # RL from an existing supervised scorer (--init-scorer): no labels, no SL stage of its own.
    out2, work2 = tmp_path / "scorer2", tmp_path / "work2"
    init = ["--init-scorer", str(work / "sl" / "scorer"), "--threads", "1", "--kl-start", "0.1", "--kl-anneal-fraction", "1"]
    cmd2 = train_command(model_dir, traces, out2, work2, *init)
    cmd2[cmd2.index("--rl-steps") + 1], cmd2[cmd2.index("--eval-count") + 1] = "1", "1"
    run2 = subprocess.run(cmd2, check=False, capture_output=True, text=True, timeout=170)
    assert run2.returncode == 0, run2.stderr[-4000:]
    assert "labels and SL skipped" in run2.stderr
    assert not (work2 / "labels").exists() and not (work2 / "sl").exists()
    hist2 = json.loads((work2 / "rl" / "history.json").read_text())
    assert len(hist2["log"]) == 1 and hist2["log"][0]["kl_weight"] == 0.1
    assert hist2["config"]["kl_start"] == 0.1 and hist2["config"]["kl_anneal_fraction"] == 1.0
    info2 = json.loads((out2 / "training.json").read_text())
    assert info2["stage"] == "rl" and info2["label_files"] == 0
    assert set(info2["eval"]["loss_ratio"]["heldout/all"]["32"]) == {"full", "foresight-sl", "foresight-sl+rl", "h2o"}
    fkv.ScorerCheckpoint.load(out2).check_model(2, 2, 2, 8)
    # refused by name: no RL to start, or a scorer of another model
    for bad, needle in (
        (["--rl-steps", "0"], "give --rl-steps > 0"),
        (["--init-scorer", str(tmp_path / "missing")], "--init-scorer"),
        (["--rl-steps", "1", "--kl-anneal-fraction", "1.5"], "--kl-anneal-fraction 1.5"),
    ):
        args = [c for c in cmd2]
        for flag, value in zip(bad[::2], bad[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        r = subprocess.run(args, check=False, capture_output=True, text=True, timeout=170)
        assert r.returncode == 2 and needle in r.stderr and "ConfigError" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr

    # The saved scorer serves: the simulator's foresight policy (the serving step) runs on it and the
    # core's scores equal the torch scorer's.
    from foresightkv.testbed.model import load_model
    from foresightkv.testbed.simulate import simulate
    from foresightkv.train.scorer import TorchScorer, features

    m, _ = load_model(str(model_dir))
    seen = []
    ids = torch.randint(0, 60, (90,), generator=torch.Generator().manual_seed(5))
    res = simulate(m, ids, prompt_len=10, policy="foresight", scorer=str(out), budget=32, interval=8, capture=seen.append)
    assert res.evictions > 0 and seen
    ts = TorchScorer.from_checkpoint(ck)
    pol = fkv.Policy.foresight(ck, sample=False)
    ev = seen[0]
    ours = ts.score_layer(ev.layer, features(ev.keys, ev.values, ev.stats)).detach()
    for kh in range(ev.num_kv_heads):
        core = pol.score(
            ev.keys[kh].contiguous(), ev.values[kh].contiguous(), ev.stats[kh].contiguous(),
            ev.queries[-ev.keys.shape[1]:, kh * 2:(kh + 1) * 2].contiguous(), ev.positions[kh].tolist(), ev.seq_len,
            layer=ev.layer, kv_head=kh,
        )
        assert torch.allclose(ours[kh], torch.tensor(core), atol=1e-4, rtol=1e-4)


def test_batched_labels_and_rollouts_equal_one_at_a_time(tmp_path):
    """Labels of several (sequence, budget) jobs and a GRPO group of rollouts simulated together
    (one packed forward per step) equal each job simulated alone: same candidates, futures and
    victims; same sampled victims, draw orders and rewards."""
    from foresightkv.testbed.model import full_forward_logits, token_losses
    from foresightkv.train.episodes import (
        LabelJob, RolloutJob, golden_labels, golden_labels_many, sampled_rollout, sampled_rollouts,
    )
    from foresightkv.train.scorer import TorchScorer

    _, model = tiny_model_dir(tmp_path)
    model.eval()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 60, (n,), generator=g) for n in (80, 70)]
    jobs = [LabelJob(seqs[0], 30, 32, 5), LabelJob(seqs[1], 30, 24, 6), LabelJob(seqs[1], 30, 32, 7)]
    many = golden_labels_many(model, jobs, interval=8, keep=3)
    for job, got in zip(jobs, many):
        want = golden_labels(model, job.input_ids, job.prompt_len, budget=job.budget, interval=8, keep=3, seed=job.seed)
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            assert torch.equal(a.victims, b.victims)
            torch.testing.assert_close(a.future, b.future)
            torch.testing.assert_close(a.stats, b.stats, atol=1e-5, rtol=1e-4)
    scorer = TorchScorer(2, 2, 2, 8, seed=1)
    rjobs = []
    for k, x in enumerate(seqs):
        ce, ent = token_losses(full_forward_logits(model, x), x)
        nan = torch.full((1,), float("nan"))
        for r in range(2):
            rjobs.append(RolloutJob(x, 30, torch.cat([nan, ce]), torch.cat([nan, ent]), 32, 10 * k + r))
    together = sampled_rollouts(model, scorer, rjobs, interval=8, seed=4)
    for job, got in zip(rjobs, together):
        alone = sampled_rollout(model, scorer, job.input_ids, job.prompt_len, job.ce_full, job.entropy_full,
                                budget=job.budget, interval=8, seed=4, request=job.request)
        assert len(got.decisions) == len(alone.decisions) > 0
        for a, b in zip(got.decisions, alone.decisions):
            assert a.layer == b.layer and torch.equal(a.order, b.order) and torch.equal(a.pool, b.pool)
        assert got.reward == pytest.approx(alone.reward, rel=1e-5, abs=1e-6)
    # requests differ, so the group's trajectories differ
    assert not all(torch.equal(a.order, b.order) for a, b in zip(together[0].decisions, together[1].decisions))

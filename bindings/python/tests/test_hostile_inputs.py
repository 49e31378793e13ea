"""Hostile input never kills the interpreter or corrupts memory (issue 16). Each test is one class
of defect found by a hostile-input run; the calls that used to abort or segfault run in a
subprocess, so a crash is a failed test, not a dead test run."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import foresightkv as fkv
from foresightkv.engine import EngineConfig


def isolated(code: str, timeout: float = 120) -> str:
    """Runs `code` in a fresh interpreter; returns its stdout; fails on a crash (signal, abort)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr[-2000:]}"
    return proc.stdout


def raises_in_subprocess(body: str) -> str:
    """Runs `body` (which must raise a foresightkv.Error) isolated; returns 'ErrorClass: message'."""
    body = textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")
    out = isolated("import foresightkv as fkv, numpy as np, torch, json, sys\ntry:\n" + body
                   + "\nexcept fkv.Error as e:\n    print(f'RAISED {type(e).__name__}: {e}')\n"
                   + "else:\n    print('NO ERROR')\n")
    assert "RAISED" in out, out
    return out


# ------------------------------------------------------------------ allocation aborts


def small_checkpoint(path):
    fkv.ScorerCheckpoint.random(1, 1, 1, 2, 16, 8, seed=1).save(str(path))


@pytest.mark.parametrize("key, value", [("num_layers", 10**12), ("num_kv_heads", 10**12), ("head_dim", 2**62),
                                        ("num_layers", 10**7)])
def test_native_checkpoint_config_with_huge_sizes_raises(tmp_path, key, value):
    small_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = raises_in_subprocess(f"fkv.ScorerCheckpoint.load({str(tmp_path)!r})")
    assert "FormatError" in out or "ConfigError" in out, out


def test_official_checkpoint_with_a_trillion_layers_raises(tmp_path):
    fkv.ScorerCheckpoint.random(1, 1, 2, 2, 16, 8).save_official(str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 10**12, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2}))
    out = raises_in_subprocess(f"fkv.ScorerCheckpoint.from_official({str(tmp_path)!r}, 16, 8)")
    assert "bytes" in out, out


def test_random_checkpoint_with_large_dimensions_raises():
    out = raises_in_subprocess("fkv.ScorerCheckpoint.random(65536, 65536, 4096, 4096, 16, 8)")
    assert "bytes" in out, out


def test_random_checkpoint_std_that_overflows_float32_raises_and_what_random_writes_loads(tmp_path):
    for std in (1e39, 1e38, -1.0):
        with pytest.raises(fkv.Error, match="std"):
            fkv.ScorerCheckpoint.random(1, 1, 1, 2, 16, 8, std=std)
    ck = fkv.ScorerCheckpoint.random(1, 1, 1, 2, 16, 8, std=1e30)
    ck.save(str(tmp_path))
    assert fkv.ScorerCheckpoint.load(str(tmp_path)).config == ck.config


def test_checkpoint_with_interval_above_budget_is_refused(tmp_path):
    with pytest.raises(fkv.Error, match="interval 32 exceeds budget 16"):
        fkv.ScorerCheckpoint.random(1, 1, 1, 2, 16, 32)
    small_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["interval"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fkv.Error, match="interval 64 exceeds budget 16"):
        fkv.ScorerCheckpoint.load(str(tmp_path))


# ------------------------------------------------------------------ silent misconfiguration


def test_cache_config_json_typo_is_refused_with_the_closest_key():
    good = {"block_size": 16, "num_blocks": 64, "enable_prefix_caching": False,
            "eviction": {"budget": 64, "interval": 32, "protect_prompt": False}}
    assert fkv.CacheConfig.from_json(json.dumps(good)).eviction is not None
    typo = dict(good)
    typo["evicton"] = typo.pop("eviction")
    with pytest.raises(fkv.ConfigError, match=r"`evicton`.*did you mean `eviction`"):
        fkv.CacheConfig.from_json(json.dumps(typo))
    nested = json.loads(json.dumps(good))
    nested["eviction"]["protect_promt"] = nested["eviction"].pop("protect_prompt")
    with pytest.raises(fkv.ConfigError, match="did you mean `protect_prompt`"):
        fkv.CacheConfig.from_json(json.dumps(nested))


def test_checkpoint_config_with_an_unknown_key_is_refused(tmp_path):
    small_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_layer"] = cfg.pop("num_layers")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fkv.Error, match="did you mean `num_layers`"):
        fkv.ScorerCheckpoint.load(str(tmp_path))


@pytest.mark.parametrize("fields, match", [
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(policy="rkv", lam=math.nan), "lam"),
    (dict(policy="rkv", lam=2.0), "lam"),
    (dict(policy="snapkv", kernel=4), "kernel"),
    (dict(policy="snapkv", kernel=-1), "kernel"),
    (dict(policy="streaming_llm", sinks=-1), "sinks"),
    (dict(policy="streaming_llm", sinks=2**40), "sinks"),
    (dict(policy="h2o", sinks=4), "only applies"),
    (dict(policy="random", seed=-1), "seed"),
    (dict(policy="random", seed=2**64), "seed"),
    (dict(policy="nope"), "unknown"),
    (dict(policy="h2o", budget=16, interval=32), "schedule"),
    (dict(policy="h2o", budget=0), "schedule"),
    (dict(policy="h2o", budget=True), "integer"),
    (dict(policy="h2o", budget="16"), "integer"),
    (dict(policy="h2o", sample="yes"), "boolean"),
    (dict(checkpoint=None), "checkpoint"),
    (dict(policy="h2o", checkpoint="/ck"), "only applies"),
])
def test_engine_config_is_validated_at_construction(fields, match):
    base = dict(budget=16, interval=8, policy="foresight", checkpoint="/ck")
    base.update(fields)
    if base["policy"] != "foresight" and "checkpoint" not in fields:
        base["checkpoint"] = None
    with pytest.raises(fkv.ConfigError, match=match):
        EngineConfig(**base)


def test_engine_config_unknown_key_suggests_the_closest():
    with pytest.raises(fkv.ConfigError, match=r"'intervl' \(did you mean 'interval'\?\)"):
        EngineConfig.from_dict({"budget": 16, "intervl": 8, "policy": "h2o"})
    cfg = EngineConfig(budget=16, interval=8, policy="rkv", lam=0.5, kernel=3)
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------ aliasing and stride 0

BS, NB, H, D = 2, 4, 2, 4


def compact_args(kc, vc, stats=None):
    bt = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    surv = torch.tensor([[[1, 3, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0]]], dtype=torch.int32)
    return dict(key_cache=kc, value_cache=vc, block_tables=bt, seq_lens=torch.tensor([6], dtype=torch.int32),
                live_starts=torch.tensor([2], dtype=torch.int32), num_evict=torch.tensor([2], dtype=torch.int32),
                survivors=surv, stats=stats)


def test_compact_refuses_k_and_v_as_overlapping_views_and_writes_nothing():
    flat = torch.randn(NB * BS * H * D + D)
    kc = flat[: NB * BS * H * D].view(NB, BS, H, D)
    # The value view one head_dim after the key view, but with the key view's own (unfused) strides:
    # V of head h is K of head h + 1, the case the old fused-layout detection let through.
    vc = flat[D:].as_strided((NB, BS, H, D), kc.stride())
    before = flat.clone()
    with pytest.raises(fkv.InvalidArgumentError, match=r"not the fused K\|V layout"):
        fkv.compact(**compact_args(kc, vc))
    assert torch.equal(flat, before)
    with pytest.raises(fkv.InvalidArgumentError, match="shares memory"):
        fkv.compact(**compact_args(kc, kc))


def fused_cache():
    both = torch.randn(NB, BS, H, 2 * D)
    return both, both[..., :D], both[..., D:]


def test_fused_layout_is_one_contract_for_reshape_decode_and_compact():
    both, kc, vc = fused_cache()
    split_k, split_v = kc.clone(), vc.clone()
    key, value = torch.randn(3, H, D), torch.randn(3, H, D)
    slots = torch.tensor([0, 5, -1])
    fkv.reshape_and_cache(key, value, kc, vc, slots)
    fkv.reshape_and_cache(key, value, split_k, split_v, slots)
    assert torch.equal(kc, split_k) and torch.equal(vc, split_v)
    q = torch.randn(1, H, D)
    bt = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    sl, ls = torch.tensor([6], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    out_fused, out_split = torch.zeros(1, H, D), torch.zeros(1, H, D)
    fkv.paged_attention_decode(q, kc, vc, bt, sl, ls, out=out_fused)
    fkv.paged_attention_decode(q, split_k, split_v, bt, sl, ls, out=out_split)
    assert torch.equal(out_fused, out_split)
    fkv.compact(**compact_args(kc, vc))
    fkv.compact(**compact_args(split_k, split_v))
    assert torch.equal(kc, split_k) and torch.equal(vc, split_v)


def test_broadcast_outputs_are_refused_by_every_writer():
    key, value = torch.randn(3, H, D), torch.randn(3, H, D)
    slots = torch.tensor([0, 5, -1])
    kc = torch.zeros(NB, BS, H, D)
    broadcast = torch.zeros(1, 1, H, D).expand(NB, BS, H, D)
    with pytest.raises(fkv.ShapeError, match="more than once"):
        fkv.reshape_and_cache(key, value, kc, broadcast, slots)
    with pytest.raises(fkv.ShapeError, match="more than once"):
        fkv.reshape_and_cache(key, value, broadcast, kc, slots)
    stats = torch.zeros(1, BS, H, 2, 8).expand(NB, BS, H, 2, 8)
    bt = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    sl, ls = torch.tensor([6], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    with pytest.raises(fkv.ShapeError, match="more than once"):
        fkv.window_stats(torch.randn(1, 2, H * 2, D), torch.tensor([2], dtype=torch.int32), kc, bt, sl, ls, stats)
    with pytest.raises(fkv.ShapeError, match="more than once"):
        fkv.compact(**compact_args(kc, torch.zeros(NB, BS, H, D), stats=stats))
    with pytest.raises(fkv.ShapeError, match="more than once"):
        fkv.compact(**compact_args(broadcast, torch.zeros(NB, BS, H, D)))
    with pytest.raises(fkv.ShapeError, match="more than once"):
        fkv.paged_attention_decode(torch.randn(1, H, D), kc, kc.clone(), bt, sl, ls,
                                   out=torch.zeros(1, 1, D).expand(1, H, D))
    # Overlapping (not stride-0) strides are caught too.
    overlapping = torch.zeros(64).as_strided((NB, BS, H, D), (4, 4, 2, 1))
    with pytest.raises(fkv.ShapeError, match="more than once"):
        fkv.reshape_and_cache(key, value, kc, overlapping, slots)


# ------------------------------------------------------------------ memory owners


def test_numpy_view_over_a_bytearray_is_bounds_checked_not_a_segfault():
    out = raises_in_subprocess("""
        buf = bytearray(64)
        base = np.frombuffer(buf, dtype=np.float32)
        forged = np.lib.stride_tricks.as_strided(base, shape=(3, 1, 4), strides=(1 << 30, 16, 4))
        kc = np.zeros((2, 2, 1, 4), np.float32)
        fkv.reshape_and_cache(forged, forged, kc, kc.copy(), np.zeros(3, np.int64))
    """)
    assert "ShapeError" in out and "outside the buffer" in out, out
    # The same view inside its buffer works.
    buf = bytearray(64)
    base = np.frombuffer(buf, dtype=np.float32)
    inside = np.lib.stride_tricks.as_strided(base, shape=(3, 1, 4), strides=(16, 16, 4))
    kc = np.zeros((2, 2, 1, 4), np.float32)
    fkv.reshape_and_cache(inside, inside, kc, kc.copy(), np.zeros(3, np.int64))


def test_numpy_views_over_mmap_and_memoryview_are_bounds_checked():
    out = raises_in_subprocess("""
        import mmap
        m = mmap.mmap(-1, 4096)
        base = np.frombuffer(m, dtype=np.float32)
        forged = np.lib.stride_tricks.as_strided(base, shape=(3, 1, 4), strides=(1 << 20, 16, 4))
        kc = np.zeros((2, 2, 1, 4), np.float32)
        fkv.reshape_and_cache(forged, forged, kc, kc.copy(), np.zeros(3, np.int64))
    """)
    assert "ShapeError" in out, out
    out = raises_in_subprocess("""
        mv = memoryview(bytearray(64))
        base = np.frombuffer(mv, dtype=np.float32)
        forged = np.lib.stride_tricks.as_strided(base, shape=(3, 1, 4), strides=(1 << 20, 16, 4))
        fkv.paged_attention_decode(np.zeros((1, 1, 4), np.float32), np.zeros((2, 2, 1, 4), np.float32), forged[None],
                                   np.zeros((1, 1), np.int32), np.ones(1, np.int32), np.zeros(1, np.int32),
                                   out=np.zeros((1, 1, 4), np.float32))
    """)
    assert "Error" in out, out


# ------------------------------------------------------------------ found here: unbounded token lists


@pytest.mark.parametrize("prompt", [range(10**12), range(2**70)])
def test_a_prompt_of_a_trillion_tokens_is_refused_before_iterating(prompt):
    m = fkv.KvCacheManager(fkv.CacheConfig(4, 8))
    with pytest.raises(fkv.InvalidArgumentError, match="token ids, more than"):
        m.add_sequence(1, prompt)
    assert m.num_sequences == 0


def test_statistics_packed_after_k_and_v_in_each_cell_are_accepted_and_equal_split_buffers():
    """vLLM packs a backend's per-slot state after K and V in each (block, slot, head) cell
    (``state_content_bytes``): K, V and the float32 statistics [G, 8] interleave in one tensor
    without sharing a byte, so ``compact`` accepts them and moves them as it moves split buffers; a
    statistics view that really overlaps the key view is still refused."""
    g = 1
    cell = 2 * D + g * 8  # float32 elements per (block, slot, head)
    page = torch.randn(NB, BS, H, cell)
    kc, vc = page[..., :D], page[..., D : 2 * D]
    stats = page[..., 2 * D :].unflatten(-1, (g, 8))
    split = [kc.clone(), vc.clone(), stats.clone()]
    fkv.compact(**compact_args(kc, vc, stats))
    fkv.compact(**compact_args(*split))
    assert torch.equal(kc, split[0]) and torch.equal(vc, split[1]) and torch.equal(stats, split[2])
    overlapping = page[..., D - 4 : D + 4].unflatten(-1, (g, 8))
    before = page.clone()
    with pytest.raises(fkv.InvalidArgumentError, match="shares memory"):
        fkv.compact(**compact_args(kc, vc, overlapping))
    assert torch.equal(page, before)

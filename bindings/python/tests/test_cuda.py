"""CUDA tensors: the kernels on the GPU against the CPU path, on PyTorch's current stream, and the
device checks. Skipped (with the reason) where no GPU, CUDA torch or compiled kernels exist."""

import pytest
import torch

import foresightkv as fkv
from conftest import cuda_only

pytestmark = cuda_only


def cache_write_case(dtype, gen):
    t, h, d, nb, bs = 37, 4, 128, 16, 16
    key = torch.randn(t, h, d, generator=gen).to(dtype)
    value = torch.randn(t, h, d, generator=gen).to(dtype)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[5] = -1
    return key, value, slots, (nb, h, bs, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reshape_and_cache_cuda_matches_cpu_on_head_major_views(dtype):
    gen = torch.Generator().manual_seed(0)
    key, value, slots, shape = cache_write_case(dtype, gen)
    kc_cpu, vc_cpu = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    fkv.reshape_and_cache(key, value, kc_cpu.permute(0, 2, 1, 3), vc_cpu.permute(0, 2, 1, 3), slots)
    kc, vc = kc_cpu.new_zeros(shape).cuda(), vc_cpu.new_zeros(shape).cuda()
    fkv.reshape_and_cache(key.cuda(), value.cuda(), kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3), slots.cuda())
    torch.cuda.synchronize()
    assert torch.equal(kc.cpu(), kc_cpu) and torch.equal(vc.cpu(), vc_cpu)


def test_reshape_and_cache_runs_on_the_current_stream():
    gen = torch.Generator().manual_seed(1)
    key, value, slots, shape = cache_write_case(torch.float16, gen)
    side = torch.cuda.Stream()
    kc = torch.zeros(shape, dtype=torch.float16, device="cuda")
    vc = torch.zeros_like(kc)
    k, v, s = key.cuda(), value.cuda(), slots.cuda()
    torch.cuda.current_stream().synchronize()
    with torch.cuda.stream(side):
        fkv.reshape_and_cache(k, v, kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3), s)
        ready = torch.cuda.Event()
        ready.record(side)
    ready.synchronize()
    expect = torch.zeros(shape, dtype=torch.float16)
    fkv.reshape_and_cache(key, value, expect.permute(0, 2, 1, 3), torch.zeros_like(expect).permute(0, 2, 1, 3), slots)
    assert torch.equal(kc.cpu(), expect)


def test_mixed_devices_raise_device_error_naming_the_argument():
    gen = torch.Generator().manual_seed(2)
    key, value, slots, shape = cache_write_case(torch.float16, gen)
    kc = torch.zeros(shape, dtype=torch.float16, device="cuda").permute(0, 2, 1, 3)
    vc = torch.zeros(shape, dtype=torch.float16, device="cuda").permute(0, 2, 1, 3)
    with pytest.raises(fkv.DeviceError, match="slot_mapping is on cpu"):
        fkv.reshape_and_cache(key.cuda(), value.cuda(), kc, vc, slots)
    with pytest.raises(fkv.DeviceError, match="key_cache is on cuda:0 but key is on cpu"):
        fkv.reshape_and_cache(key, value, kc, vc, slots)


def eviction_case(dtype, seed):
    """A batch on a paged cache (head_dim 128, GQA 4) with live windows, for every eviction kernel."""
    gen = torch.Generator().manual_seed(seed)
    bs, nb, hkv, g, d = 16, 64, 2, 4, 128
    lens, starts = [200, 37, 96], [32, 0, 16]
    width = max(-(-n // bs) for n in lens)
    perm = torch.randperm(nb, generator=gen).tolist()
    table = torch.full((3, width), -1, dtype=torch.int32)
    for s, n in enumerate(lens):
        for b in range(-(-n // bs)):
            table[s, b] = perm.pop()
    return dict(
        kc=torch.randn(nb, bs, hkv, d, generator=gen).to(dtype),
        vc=torch.randn(nb, bs, hkv, d, generator=gen).to(dtype),
        stats=torch.rand(nb, bs, hkv, g, 8, generator=gen),
        bt=table,
        sl=torch.tensor(lens, dtype=torch.int32),
        ls=torch.tensor(starts, dtype=torch.int32),
        q=torch.randn(3, hkv * g, d, generator=gen).to(dtype),
        queries=torch.randn(3, 32, hkv * g, d, generator=gen).to(dtype),
        nq=torch.tensor([32, 5, 0], dtype=torch.int32),
        w=(torch.randn(hkv, 16, 2 * d + 8 * g, generator=gen) * 0.05, torch.randn(hkv, 16, generator=gen),
           torch.randn(hkv, 16, generator=gen), torch.randn(hkv, generator=gen)),
    )


def on_cuda(case):
    return {k: (tuple(x.cuda() for x in v) if isinstance(v, tuple) else v.cuda()) for k, v in case.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_cuda_matches_cpu(dtype):
    c = eviction_case(dtype, 3)
    cpu = fkv.paged_attention_decode(c["q"], c["kc"], c["vc"], c["bt"], c["sl"], c["ls"])
    g = on_cuda(c)
    gpu = fkv.paged_attention_decode(g["q"], g["kc"], g["vc"], g["bt"], g["sl"], g["ls"])
    torch.cuda.synchronize()
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu().float(), cpu.float(), atol=2e-2, rtol=2e-2)


def test_window_stats_scorer_select_compact_cuda_match_cpu():
    c = eviction_case(torch.float16, 4)
    g = on_cuda(c)
    fkv.window_stats(c["queries"], c["nq"], c["kc"], c["bt"], c["sl"], c["ls"], c["stats"])
    fkv.window_stats(g["queries"], g["nq"], g["kc"], g["bt"], g["sl"], g["ls"], g["stats"])
    torch.cuda.synchronize()
    assert torch.allclose(g["stats"].cpu(), c["stats"], atol=1e-3, rtol=1e-3)
    g["stats"].copy_(c["stats"])
    scores_c = torch.zeros(3, 2, 200)
    scores_g = scores_c.cuda()
    fkv.scorer_mlp(c["kc"], c["vc"], c["bt"], c["sl"], c["ls"], c["stats"], *c["w"], scores_c)
    fkv.scorer_mlp(g["kc"], g["vc"], g["bt"], g["sl"], g["ls"], g["stats"], *g["w"], scores_g)
    torch.cuda.synchronize()
    assert torch.allclose(scores_g.cpu(), scores_c, atol=1e-3, rtol=1e-3)
    scores_g.copy_(scores_c)
    evict = torch.tensor([32, 16, 16], dtype=torch.int32)
    surv_c = torch.zeros(3, 2, 200, dtype=torch.int32)
    surv_g = surv_c.cuda()
    fkv.select_survivors(c["sl"], c["ls"], scores_c, evict, surv_c, num_protected=16)
    fkv.select_survivors(g["sl"], g["ls"], scores_g, evict.cuda(), surv_g, num_protected=16)
    torch.cuda.synchronize()
    live = (c["sl"] - c["ls"]).tolist()
    for s in range(3):
        keep = live[s] - int(evict[s])
        assert torch.equal(surv_g[s, :, :keep].cpu(), surv_c[s, :, :keep])
    fkv.compact(c["kc"], c["vc"], c["bt"], c["sl"], c["ls"], evict, surv_c, c["stats"])
    fkv.compact(g["kc"], g["vc"], g["bt"], g["sl"], g["ls"], evict.cuda(), surv_g, g["stats"])
    torch.cuda.synchronize()
    assert torch.equal(g["kc"].cpu(), c["kc"]) and torch.equal(g["vc"].cpu(), c["vc"])
    assert torch.equal(g["stats"].cpu(), c["stats"])


def test_sample_survivors_cuda_is_the_cpu_sampler_bit_for_bit():
    gen = torch.Generator().manual_seed(12)
    lens = torch.tensor([700, 300, 129], dtype=torch.int32)
    starts = torch.tensor([64, 0, 16], dtype=torch.int32)
    scores = torch.randn(3, 4, 700, generator=gen)
    scores[0, 0, :50] = 1.5  # ties
    num_evict = torch.tensor([128, 64, 32], dtype=torch.int32)
    req = torch.tensor([5, 6, 7], dtype=torch.int32)
    evictions = torch.tensor([0, 3, 9], dtype=torch.int32)
    surv_c = torch.full((3, 4, 700), -1, dtype=torch.int32)
    surv_g = surv_c.cuda()
    fkv.sample_survivors(lens, starts, scores, num_evict, req, evictions, surv_c, layer=2, seed=99, num_protected=32)
    fkv.sample_survivors(lens.cuda(), starts.cuda(), scores.cuda(), num_evict.cuda(), req.cuda(), evictions.cuda(),
                         surv_g, layer=2, seed=99, num_protected=32)
    torch.cuda.synchronize()
    live = (lens - starts).tolist()
    for s in range(3):
        keep = live[s] - int(num_evict[s])
        assert torch.equal(surv_g[s, :, :keep].cpu(), surv_c[s, :, :keep])


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_window_stats_streaming_fold_cuda_is_one_call(mode):
    """On the GPU, fold-only calls then the eviction's call write what one call over every row writes
    (the running fold continues in row order), and what the CPU reference writes."""
    gen = torch.Generator().manual_seed(12)
    nb, bs, hkv, g, d, n, live = 24, 16, 2, 4, 128, 70, 150
    kc = torch.randn(nb, bs, hkv, d, generator=gen).half()
    table = torch.randperm(nb, generator=gen)[: -(-live // bs)].int().view(1, -1)
    q = torch.randn(1, n, hkv * g, d, generator=gen).half()
    old = torch.rand(nb, bs, hkv, g, 8, generator=gen)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    start = i32(0)
    cpu = old.clone()
    fkv.window_stats(q, i32(n), kc, table, i32(live), start, cpu, window=16, mode=mode)
    one, streamed = old.cuda(), old.cuda()
    args = (kc.cuda(), table.cuda())
    fkv.window_stats(q.cuda(), i32(n).cuda(), *args, i32(live).cuda(), start.cuda(), one, window=16, mode=mode)
    done = 0
    for cut in (13, 40):
        fkv.window_stats(
            q[:, done:cut].contiguous().cuda(), i32(cut - done).cuda(), *args, i32(live - n + cut).cuda(),
            start.cuda(), streamed, window=16, mode=mode, folded=i32(done).cuda(), fold_only=True,
        )
        done = cut
    fkv.window_stats(
        q[:, done:].contiguous().cuda(), i32(n - done).cuda(), *args, i32(live).cuda(), start.cuda(), streamed,
        window=16, mode=mode, folded=i32(done).cuda(), seq_lens_host=i32(live), live_starts_host=start,
        num_queries_host=i32(n - done), folded_host=i32(done),
    )
    torch.cuda.synchronize()
    assert torch.equal(streamed.cpu(), one.cpu())
    assert torch.allclose(one.cpu(), cpu, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "random", "foresight_topl", "foresight_sample"])
@pytest.mark.parametrize("protect", [False, True])
def test_engine_step_on_cuda_keeps_what_the_cpu_step_keeps(name, protect, tmp_path):
    """The engine step (``EvictionEngine``: chunked prefill, decode, query rings, statistics, scorer,
    victim choice, compaction) on CUDA tensors against the same step on the CPU: a prompt in three
    chunks on the GPU against one chunk on the CPU, then decode steps with several evictions; the kept
    positions equal after every step, the outputs and statistics agree to float32 accumulation order."""
    from test_engine_step import Rig, _config

    prompt, decode, d = 45, 64, 64
    cfg = _config(name, tmp_path, head_dim=d, protect_prompt=protect)
    cpu = Rig(cfg, prompt + decode, seed=7, head_dim=d)
    gpu = Rig(cfg, prompt + decode, seed=7, head_dim=d, device="cuda")
    out_c = cpu.step(prompt, True, prompt_len=prompt)
    out_g = torch.cat(
        [gpu.step(20, True, prompt_len=prompt), gpu.step(13, True, prompt_len=prompt), gpu.step(12, True)], dim=1
    )
    torch.cuda.synchronize()
    assert torch.allclose(out_g.cpu(), out_c, atol=1e-4, rtol=1e-4)
    for step in range(decode):
        a, b = cpu.step(1, False), gpu.step(1, False)
        torch.cuda.synchronize()
        assert torch.allclose(b.cpu(), a, atol=1e-4, rtol=1e-4), step
        for layer, (kc, kg) in enumerate(zip(cpu.kept(), gpu.kept())):
            assert torch.equal(kg.cpu(), kc), (step, layer)
    assert cpu.engine.evictions(0) >= 3 and gpu.engine.evictions(0) == cpu.engine.evictions(0)
    for sc, sg in zip(cpu.stats, gpu.stats):
        assert torch.allclose(sg.cpu(), sc, atol=1e-4, rtol=1e-4)


def test_train_command_runs_unchanged_on_cuda(tmp_path):
    """``foresightkv train --device cuda`` (the model's simulator runs, labels, rollouts and eval, and
    the scorer's supervised and GRPO stages, all on the GPU) on the tiny random Llama of the CPU
    pipeline test (head dim 64, the CUDA kernels' smallest): it finishes, and the scorer it saves
    loads and fits."""
    import json
    import subprocess

    pytest.importorskip("transformers")
    from test_train_pipeline import tiny_model_dir, tiny_traces, train_command

    model_dir, model = tiny_model_dir(tmp_path, head_dim=64)
    traces = tiny_traces(tmp_path, model)
    out, work = tmp_path / "scorer", tmp_path / "work"
    cmd = train_command(model_dir, traces, out, work, "--threads", "4", "--device", "cuda")
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    fkv.ScorerCheckpoint.load(out).check_model(2, 2, 2, 64)
    info = json.loads((out / "training.json").read_text())
    assert info["stage"] == "rl"
    assert all(v > 0 for v in info["eval"]["loss_ratio"]["heldout/all"]["32"].values())


@pytest.mark.parametrize("name", ["h2o", "random", "foresight_sample"])
def test_engine_step_queues_no_blocking_transfer(name, tmp_path):
    """A decode step with an eviction due, on CUDA, makes the host wait for the GPU nowhere: every
    host-to-device copy is from pinned memory and non-blocking, and nothing is read back (no
    ``.item()``, ``nonzero`` or device-to-host copy) — so the eviction's kernels queue behind the
    forward's instead of draining the stream once per copy and layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from test_engine_step import Rig, _config

    class Blocking(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            op = str(func.overloadpacket.__name__)
            src = args[1] if op == "copy_" else args[0] if args else None
            out = func(*args, **kwargs)
            if op in ("_to_copy", "copy_") and isinstance(src, torch.Tensor):
                dst = args[0] if op == "copy_" else out
                if src.device.type == "cpu" and dst.device.type == "cuda":
                    if not (src.is_pinned() and (kwargs.get("non_blocking") or (op == "copy_" and len(args) > 2 and args[2]))):
                        self.seen.append(f"blocking {op} host->device {tuple(src.shape)}")
                elif src.device.type == "cuda" and dst.device.type == "cpu":
                    self.seen.append(f"{op} device->host {tuple(src.shape)}")
            elif op in ("_local_scalar_dense", "nonzero", "masked_select"):
                if any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args):
                    self.seen.append(op)
            return out

    rig = Rig(_config(name, tmp_path, head_dim=64), 45 + 64, seed=3, head_dim=64, device="cuda")
    rig.step(45, True, prompt_len=45)
    checked = 0
    for _ in range(64):
        before = rig.engine.evictions(0)
        mode = Blocking()
        # torch's own sync check too: it sees what the dispatch mode cannot (torch.tensor(list,
        # device=) copies below the Python dispatch key, syncs inside torch kernels)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with mode:
                rig.step(1, False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        if rig.engine.evictions(0) > before:
            assert mode.seen == [], mode.seen
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("policy", ["full", "h2o", "random", "golden"])
def test_simulator_on_cuda_keeps_what_it_keeps_on_the_cpu(policy, tmp_path):
    """The testbed's chunked forward with eviction (``simulate``) with the model on CUDA (``load_model(...,
    device="cuda")``: its paged caches and the engine step there too) against the same run on the
    CPU: the same evictions and kept positions, per-token CE within float tolerance."""
    from foresightkv.testbed.model import load_model
    from foresightkv.testbed.simulate import simulate
    from test_train_pipeline import tiny_model_dir

    model_dir, _ = tiny_model_dir(tmp_path, head_dim=64)
    ids = torch.randint(0, 60, (120,), generator=torch.Generator().manual_seed(2))
    cpu, _ = load_model(str(model_dir))
    gpu, _ = load_model(str(model_dir), device="cuda")
    a = simulate(cpu, ids, prompt_len=10, policy=policy, budget=32, interval=8)
    b = simulate(gpu, ids, prompt_len=10, policy=policy, budget=32, interval=8)
    assert b.evictions == a.evictions and (policy == "full" or a.evictions > 0)
    for ka, kb in zip(a.kept, b.kept):
        assert torch.equal(kb.cpu(), ka.cpu())
    assert torch.allclose(b.ce, a.ce, atol=1e-3, rtol=1e-3)

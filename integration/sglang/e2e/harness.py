"""Whole-engine harness of the SGLang end-to-end tests: starts ``sglang.Engine`` (in-process) or
``python -m sglang.launch_server`` (a subprocess on 127.0.0.1) on CPU with foresightkv or SGLang's
``torch_native`` backend, with SGLang's own strict memory checks on, and reads the allocator audit
that ``cpu_standin/fkv_sglang_audit.py`` writes from the scheduler process."""

import contextlib
import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, MutableMapping, Optional, Sequence

from engine_server import free_port, wait_healthy

#: SGLang's own checks, on in every run: the busy-time and idle-time pool accounting (a leak raises)
#: and the page invariants (no row names a free slot, no slot twice on the free list).
STRICT_ENV = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
}

#: The CPU route: SGLang's CPU platform (the kernel package's CPU ops come from the stand-in).
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}

#: Flags every run uses (foresightkv requires page size 1 and no radix cache; native runs use the same).
COMMON = dict(device="cpu", page_size=1, disable_radix_cache=True, random_seed=0, skip_server_warmup=True)


@contextlib.contextmanager
def patched_env(values: Dict[str, Optional[str]]) -> Iterator[None]:
    """Sets (value) or removes (None) environment variables for the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        apply_env(os.environ, values)
        yield
    finally:
        apply_env(os.environ, old)


def apply_env(env: MutableMapping[str, str], values: Dict[str, Optional[str]]) -> None:
    """Sets (value) or removes (None) each variable of ``values`` in ``env``."""
    for k, v in values.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v


def run_env(fkv: Optional[dict], audit_dir: Optional[Path], extra: Optional[dict] = None) -> Dict[str, Optional[str]]:
    """The environment of one engine run: CPU route, strict checks, foresightkv's configuration
    (removed for native runs) and the audit directory."""
    env: Dict[str, Optional[str]] = {**CPU_ENV, **STRICT_ENV}
    env["FORESIGHTKV_CONFIG"] = None if fkv is None else json.dumps(fkv)
    env["FKV_E2E_AUDIT"] = None if audit_dir is None else str(audit_dir)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def engine(
    model: Path, backend: str, fkv: Optional[dict] = None, audit_dir: Optional[Path] = None,
    env: Optional[Dict[str, Optional[str]]] = None, **kw,
):  # fmt: skip
    """An in-process ``sglang.Engine`` on CPU with ``backend`` (``foresightkv`` or ``torch_native``);
    ``fkv`` is foresightkv's configuration (``$FORESIGHTKV_CONFIG`` while the engine starts), ``env``
    more variables for its processes (e.g. SGLang's ``SGLANG_TEST_RETRACT``)."""
    import sglang

    args = dict(COMMON, model_path=str(model), attention_backend=backend, dtype="float32", log_level="error")
    args.update(kw)
    with patched_env(run_env(fkv, audit_dir, env)):
        eng = sglang.Engine(**args)
    try:
        yield eng
    finally:
        eng.shutdown()


def greedy(max_new: int, **extra) -> dict:
    """Greedy sampling parameters that generate exactly ``max_new`` tokens."""
    return {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True, **extra}


def generate(eng, prompts: Sequence[List[int]], max_new: int) -> List[dict]:
    """Greedy generation of ``max_new`` tokens for each prompt (one batch); each result has
    ``tokens`` and ``logprobs`` (SGLang's ``output_token_logprobs``)."""
    outs = eng.generate(input_ids=[list(p) for p in prompts], sampling_params=greedy(max_new), return_logprob=True)
    res = []
    for o in outs:
        lp = o["meta_info"]["output_token_logprobs"]
        res.append({"tokens": [int(t[1]) for t in lp], "logprobs": [float(t[0]) for t in lp], "raw": o})
    return res


def all_finite(values: Sequence[float]) -> bool:
    """Whether every value is a finite float."""
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def read_audit(audit_dir: Path) -> dict:
    """The allocator audit of the run's scheduler (the process whose allocator was cleared, i.e.
    built): size, held, max_held, frees, retracted, violations."""
    states = []
    for path in glob.glob(str(Path(audit_dir) / "alloc-*.json")):
        with open(path) as f:
            st = json.load(f)
        if st["size"] > 0:
            states.append(st)
    assert len(states) == 1, f"expected one scheduler audit in {audit_dir}, found {states}"
    return states[0]


def wait_pool_full(audit_dir: Path, timeout: float = 30.0) -> dict:
    """Waits until the audited allocator holds no slot (every request's slots came back), returns
    the audit; fails with the last audit after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_audit(audit_dir)
        if st["held"] == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


@contextlib.contextmanager
def server(model: Path, backend: str, fkv: Optional[dict], audit_dir: Path, log: Path, extra: Sequence[str] = ()):
    """``python -m sglang.launch_server`` on 127.0.0.1 (a free port) with ``backend``; yields the base
    URL once ``/health`` answers; stops the server's process group afterwards."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
        "--attention-backend", backend, "--page-size", "1", "--disable-radix-cache", "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(port), "--random-seed", "0", *extra,
    ]  # fmt: skip
    env = dict(os.environ)
    apply_env(env, run_env(fkv, audit_dir))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, name="launch_server", timeout_s=900, poll_s=1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()

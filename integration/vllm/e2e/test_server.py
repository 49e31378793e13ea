"""vLLM's OpenAI server (``vllm serve``'s) on 127.0.0.1 with foresightkv (integration/vllm/README.md's launch flags, adapted to
CPU: ``FORESIGHTKV_VLLM_CPU=1``, float32, 32-token blocks), and one streamed completion through its
OpenAI-compatible API, long enough to evict."""

import json
import os
import subprocess
import sys

import pytest

from engine_server import free_port, wait_healthy

STARTUP_S = 900  # whole-server start on a loaded 2-core machine (imports dominate)


def serve_command(model: str, port: int, fkv: dict):
    """The README's ``vllm serve`` command for ``model`` on CPU, through vLLM's OpenAI server module:
    the ``vllm`` script of the ``vllm-cpu`` package exits at start (``importlib.metadata.version("vllm")``
    in ``vllm/entrypoints/cli/main.py``; its distribution is named ``vllm-cpu``), and
    ``python -m vllm.entrypoints.openai.api_server`` runs the same server with the same flags."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--attention-backend",
        "CUSTOM",
        "--block-size",
        "32",
        "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--max-num-batched-tokens",
        "512",
        "--max-num-seqs",
        "4",
        "--additional-config",
        json.dumps({"foresightkv": fkv}),
    ]


@pytest.fixture()
def server(tiny_model, tmp_path):
    """A running ``vllm serve`` with foresightkv (h2o, B=64, L=32); yields (base url, log path)."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, FORESIGHTKV_VLLM_CPU="1", VLLM_LOGGING_LEVEL="INFO")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = serve_command(tiny_model, port, {"budget": 64, "interval": 32, "policy": "h2o"})
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, log, name="vllm serve", timeout_s=STARTUP_S, poll_s=2)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_streamed_completion_through_openai_server(server, tiny_model):
    """A streamed /v1/completions request of 200 greedy tokens (past B + L = 96): many SSE chunks, all
    200 tokens, a normal finish, and the server's KV manager ran foresightkv's sliding window."""
    import requests

    base, log = server
    body = {
        "model": tiny_model,
        "prompt": "The quick brown fox jumps over the lazy dog. " * 3,
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, text, finish, usage = 0, "", None, None
    with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=900) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if not line or not line.startswith(b"data: "):
                continue
            data = line[len(b"data: ") :]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                chunks += 1
                text += choice.get("text", "")
                finish = choice.get("finish_reason") or finish
    assert chunks > 10 and text
    assert finish == "length"
    assert usage is not None and usage["completion_tokens"] == 200
    logged = log.read_text()
    assert "foresightkv" in logged, "the server log does not mention foresightkv"

"""``python -m sglang.launch_server`` on 127.0.0.1 with foresightkv evicting (the README's command,
on CPU): OpenAI completions, chat completions, a streamed completion, and a client that hangs up in the
middle of a stream; the server keeps serving, its pool returns to full, no slot is freed twice."""

import json

import harness
import requests

B, L = 32, 8
GEN = 120


def test_openai_server(tiny_model, tmp_path):
    fkv = {"budget": B, "interval": L, "policy": "snapkv"}
    log = tmp_path / "server.log"
    audit = tmp_path / "audit"
    with harness.server(tiny_model, "foresightkv", fkv, audit, log, ["--max-total-tokens", "2048"]) as url:
        model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        # completion, greedy, far past B + L
        r = requests.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "The quick brown fox", "max_tokens": GEN, "temperature": 0,
                  "ignore_eos": True, "logprobs": 1},
            timeout=300,
        )  # fmt: skip
        r.raise_for_status()
        body = r.json()
        assert body["usage"]["completion_tokens"] == GEN
        assert all(isinstance(x, float) for x in body["choices"][0]["logprobs"]["token_logprobs"])
        # chat, through the model's chat template
        r = requests.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "what is a key-value cache?"}],
                  "max_tokens": 64, "temperature": 0, "ignore_eos": True},
            timeout=300,
        )  # fmt: skip
        r.raise_for_status()
        chat = r.json()
        assert chat["usage"]["completion_tokens"] == 64
        assert chat["choices"][0]["message"]["role"] == "assistant"
        # streamed completion: the same greedy text as the plain one, in pieces
        pieces = []
        with requests.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "The quick brown fox", "max_tokens": GEN, "temperature": 0,
                  "ignore_eos": True, "stream": True},
            stream=True, timeout=300,
        ) as r:  # fmt: skip
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :]
                if data == b"[DONE]":
                    break
                pieces.append(json.loads(data)["choices"][0]["text"])
        assert len(pieces) > 1
        assert "".join(pieces) == body["choices"][0]["text"]
        # a client that hangs up mid-stream: the server aborts the request and frees its slots
        with requests.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "Eviction keeps", "max_tokens": 2000, "temperature": 0,
                  "ignore_eos": True, "stream": True},
            stream=True, timeout=300,
        ) as r:  # fmt: skip
            for i, _ in enumerate(r.iter_lines()):
                if i > 10:
                    break
        st = harness.wait_pool_full(audit, timeout=60)
        assert st["held"] == 0, st
        assert st["violations"] == [], st
        # and it still serves
        r = requests.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "Numbers:", "max_tokens": 50, "temperature": 0, "ignore_eos": True},
            timeout=300,
        )
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == 50
        st = harness.wait_pool_full(audit, timeout=60)
        assert st["held"] == 0 and st["violations"] == [], st
    assert "Mem Leak" not in log.read_text()

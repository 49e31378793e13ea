"""The entry point, SGLang's own plugin loading and argument parsing, and the backend factory's
validation."""

import argparse
import importlib.metadata
import json

import pytest
import torch
from rig import Rig

import foresightkv
from foresightkv.errors import ConfigError


def _ours():
    return [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "foresightkv"]


def test_entry_point_is_installed():
    eps = _ours()
    assert len(eps) == 1
    assert eps[0].value == "foresightkv_sglang.plugin:register"


def test_load_plugins_registers_backend_choice_and_release_hook(server_args):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    from foresightkv_sglang.backend import create_foresightkv_backend
    from foresightkv_sglang.ledger import free_kv_row_hook
    from foresightkv_sglang.plugin import FREE_KV_ROW, register

    load_plugins()
    register()
    register()
    assert ATTENTION_BACKENDS["foresightkv"] is create_foresightkv_backend
    assert ATTENTION_BACKEND_CHOICES.count("foresightkv") == 1
    from sglang.srt.plugins.hook_registry import HookRegistry

    ours = [h for _, h, _ in HookRegistry._hooks[FREE_KV_ROW] if h is free_kv_row_hook]
    assert len(ours) == 1
    assert FREE_KV_ROW in HookRegistry._patched
    assert UnifiedRadixCache.free_kv_row is BasePrefixCache.free_kv_row


def test_sglang_argument_parsing_accepts_the_backend(server_args):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    # the launch flags of the README, verbatim
    flags = (
        "--model-path Qwen/Qwen3-4B --attention-backend foresightkv --page-size 1 --disable-radix-cache "
        "--cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled"
    ).split()
    ns = parser.parse_args(flags)
    assert ns.attention_backend == "foresightkv"
    args = ServerArgs.from_cli_args(ns)
    assert args.attention_backend == "foresightkv" and args.disable_radix_cache and args.page_size == 1
    for phase in ("decode", "prefill"):
        assert str(getattr(args, f"cuda_graph_backend_{phase}")).lower().endswith("disabled")
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "m", "--attention-backend", "no-such-backend"])


def _runner(args, **over):
    rig = Rig(args, size=64, rows=2, max_ctx=32)
    for k, v in over.items():
        setattr(rig.runner, k, v)
    return rig.runner


def test_factory_reads_and_validates_the_configuration(server_args, monkeypatch, tmp_path):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from foresightkv_sglang.backend import ForesightKVAttnBackend

    factory = ATTENTION_BACKENDS["foresightkv"]
    monkeypatch.delenv("FORESIGHTKV_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="FORESIGHTKV_CONFIG"):
        factory(_runner(server_args))

    path = tmp_path / "fkv.json"
    path.write_text(json.dumps({"foresightkv": {"budget": 16, "interval": 8, "policy": "h2o"}}))
    monkeypatch.setenv("FORESIGHTKV_CONFIG", str(path))
    backend = factory(_runner(server_args))
    assert isinstance(backend, ForesightKVAttnBackend)
    assert backend.engine.config.budget == 16 and backend.engine.policy.name

    monkeypatch.setenv("FORESIGHTKV_CONFIG", '{"budget": 16, "interval": 8, "policy": "tova"}')
    assert factory(_runner(server_args)).engine.config.policy == "tova"
    monkeypatch.setenv("FORESIGHTKV_CONFIG", '{"budget": 16, "interval": 8, "policy": "h2o", "protect_prompt": true}')
    assert factory(_runner(server_args)).engine.config.protect_prompt

    for bad, msg in [
        ('{"budget": 8, "interval": 16, "policy": "h2o"}', "interval"),
        ('{"budget": 16, "interval": 8}', "checkpoint"),
        ('{"budget": 16, "interval": 8, "policy": "h2o", "bogus": 1}', "bogus"),
        ('{"budget": 16, "interval": 8, "policy": "h2o", "protect_prompt": "yes"}', "protect_prompt"),
        ("{not json", "JSON"),
    ]:
        monkeypatch.setenv("FORESIGHTKV_CONFIG", bad)
        with pytest.raises(ConfigError, match=msg):
            factory(_runner(server_args))
    monkeypatch.setenv("FORESIGHTKV_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="cannot read"):
        factory(_runner(server_args))


def test_factory_refuses_unsupported_server_setups(server_args, monkeypatch):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ServerArgs

    monkeypatch.setenv("FORESIGHTKV_CONFIG", '{"budget": 16, "interval": 8, "policy": "h2o"}')
    factory = ATTENTION_BACKENDS["foresightkv"]
    with pytest.raises(ConfigError, match="--disable-radix-cache"):
        factory(_runner(server_args, server_args=ServerArgs(model_path="dummy", device="cpu")))
    with pytest.raises(ConfigError, match="--page-size 1"):
        factory(_runner(server_args, page_size=16))
    mixed = ServerArgs(
        model_path="dummy",
        device="cpu",
        disable_radix_cache=True,
        attention_backend="foresightkv",
        prefill_attention_backend="torch_native",
    )
    with pytest.raises(ConfigError, match="prefill and decode"):
        factory(_runner(server_args, server_args=mixed))
    fp8 = Rig(server_args, size=64, rows=2, max_ctx=32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ConfigError, match="--kv-cache-dtype"):
        factory(fp8.runner)


def test_cuda_graphs_are_refused_naming_the_flags(server_args):
    from foresightkv.engine import EngineConfig
    from foresightkv_sglang.backend import ForesightKVAttnBackend

    backend = ForesightKVAttnBackend(_runner(server_args), EngineConfig(budget=16, interval=8, policy="h2o"))
    for call in (lambda: backend.init_cuda_graph_state(8, 8), backend.get_cuda_graph_seq_len_fill_value):
        with pytest.raises(RuntimeError, match="--cuda-graph-backend-decode disabled"):
            call()


def test_checkpoint_option_loads_and_checks_the_scorer(server_args, monkeypatch, tmp_path):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    ck = foresightkv.ScorerCheckpoint.random(2, 2, 2, 64, 16, 8, seed=3)
    ck.save(tmp_path / "scorer")
    monkeypatch.setenv(
        "FORESIGHTKV_CONFIG",
        json.dumps(
            {
                "budget": 16,
                "interval": 8,
                "policy": "foresight",
                "checkpoint": str(tmp_path / "scorer"),
                "sample": False,
            }
        ),
    )
    backend = ATTENTION_BACKENDS["foresightkv"](_runner(server_args))
    assert backend.engine.policy.name
    monkeypatch.setenv(
        "FORESIGHTKV_CONFIG",
        json.dumps({"budget": 16, "interval": 8, "policy": "foresight", "checkpoint": str(tmp_path / "none")}),
    )
    with pytest.raises(ConfigError, match="checkpoint"):
        ATTENTION_BACKENDS["foresightkv"](_runner(server_args))


def test_checkpoint_is_checked_against_sglangs_model_config(server_args, monkeypatch, tmp_path):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 256,
                "intermediate_size": 512,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 1000,
                "max_position_embeddings": 512,
                "torch_dtype": "float32",
            }
        )
    )
    mc = ModelConfig(str(model))
    for layers, ok in ((2, True), (3, False)):
        ck = foresightkv.ScorerCheckpoint.random(layers, 2, 2, 64, 16, 8, seed=1)
        ck.save(tmp_path / f"ck{layers}")
        monkeypatch.setenv(
            "FORESIGHTKV_CONFIG",
            json.dumps(
                {"budget": 16, "interval": 8, "policy": "foresight", "checkpoint": str(tmp_path / f"ck{layers}")}
            ),
        )
        runner = _runner(server_args, model_config=mc)
        if ok:
            backend = ATTENTION_BACKENDS["foresightkv"](runner)
            # statistics reserved at start-up: 2 layers x (64 + 1) slots x 2 KV heads x group 2 x 8 floats
            assert backend.engine.stats_bytes() == 2 * 65 * 2 * 2 * 8 * 4
        else:
            with pytest.raises(ConfigError, match="does not fit the model"):
                ATTENTION_BACKENDS["foresightkv"](runner)


def test_a_bad_configuration_fails_when_the_server_arguments_are_built(server_args, monkeypatch):
    """The configuration is validated in the launching process, while SGLang builds its ServerArgs
    (before workers spawn and the model loads), not ~30 s later in the backend factory (issue 19)."""
    from sglang.srt.server_args import ServerArgs

    flags = dict(model_path="dummy", device="cpu", attention_backend="foresightkv", disable_radix_cache=True, page_size=1)
    monkeypatch.setenv("FORESIGHTKV_CONFIG", '{"budget": 16, "interval": 8, "policy": "h2 0"}')
    with pytest.raises(ConfigError, match="h2 0"):
        ServerArgs(**flags)
    monkeypatch.delenv("FORESIGHTKV_CONFIG")
    with pytest.raises(ConfigError, match="FORESIGHTKV_CONFIG"):
        ServerArgs(**flags)
    # a run without foresightkv is left alone
    assert ServerArgs(model_path="dummy", device="cpu", attention_backend="torch_native").attention_backend


def test_cpu_graphs_are_refused_naming_the_flag(server_args, monkeypatch):
    """``--enable-torch-compile`` on CPU (SGLang's CPU graph runner) is refused when the backend is
    built, naming the flag, and the CPU-graph entry points raise the same (issue 19: an AttributeError
    from ``CPUGraphRunner`` before)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ServerArgs

    monkeypatch.setenv("FORESIGHTKV_CONFIG", '{"budget": 16, "interval": 8, "policy": "h2o"}')
    factory = ATTENTION_BACKENDS["foresightkv"]
    compiled = ServerArgs(
        model_path="dummy", device="cpu", attention_backend="foresightkv", disable_radix_cache=True, page_size=1,
        enable_torch_compile=True,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="remove --enable-torch-compile"):
        factory(_runner(server_args, server_args=compiled))
    backend = factory(_runner(server_args))
    for call in (lambda: backend.init_cpu_graph_state(4, 4), backend.get_cpu_graph_seq_len_fill_value):
        with pytest.raises(ConfigError, match="remove --enable-torch-compile"):
            call()

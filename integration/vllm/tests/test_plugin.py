"""The entry point, vLLM's own plugin loading, ``--attention-backend CUSTOM`` on vLLM's command line,
and vLLM's selector resolving it to the foresightkv backend."""

import importlib.metadata
import json

import pytest

BACKEND = {"budget": 64, "interval": 16, "policy": "h2o"}


def _ours():
    return [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "foresightkv"]


@pytest.fixture
def no_overrides():
    """CUSTOM and CPU_ATTN start (and end) without any registered override."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for member in (AttentionBackendEnum.CUSTOM, AttentionBackendEnum.CPU_ATTN):
        member.clear_override()
    yield
    for member in (AttentionBackendEnum.CUSTOM, AttentionBackendEnum.CPU_ATTN):
        member.clear_override()


def test_entry_point_is_installed():
    eps = _ours()
    assert len(eps) == 1
    assert eps[0].value == "foresightkv_vllm.plugin:register"


def test_vllm_plugin_loading_registers_custom(no_overrides, monkeypatch):
    import vllm.plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from foresightkv_vllm.backend import ForesightKVBackend

    monkeypatch.delenv("FORESIGHTKV_VLLM_CPU", raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    with pytest.raises(ValueError, match="must be registered"):
        AttentionBackendEnum.CUSTOM.get_path()
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    vllm.plugins.load_general_plugins()
    assert AttentionBackendEnum.CUSTOM.get_class() is ForesightKVBackend
    # without the opt-in, vLLM's own CPU backend stays what CPU_ATTN means
    assert AttentionBackendEnum.CPU_ATTN.get_path() == AttentionBackendEnum.CPU_ATTN.value


def test_register_is_idempotent_and_cpu_override_is_opt_in(no_overrides, monkeypatch):
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    from foresightkv_vllm.plugin import BACKEND_PATH, register

    monkeypatch.delenv("FORESIGHTKV_VLLM_CPU", raising=False)
    register()
    register()
    assert _ATTN_OVERRIDES == {AttentionBackendEnum.CUSTOM: BACKEND_PATH}
    monkeypatch.setenv("FORESIGHTKV_VLLM_CPU", "1")
    register()
    register()
    assert _ATTN_OVERRIDES == {AttentionBackendEnum.CUSTOM: BACKEND_PATH, AttentionBackendEnum.CPU_ATTN: BACKEND_PATH}


def test_cli_flags_parse_and_selector_resolves_to_our_class(no_overrides, monkeypatch, model_dir):
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import _cached_get_attn_backend, get_attn_backend

    from foresightkv_vllm.backend import ForesightKVBackend
    from foresightkv_vllm.plugin import register

    monkeypatch.setenv("FORESIGHTKV_VLLM_CPU", "1")
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    # the README's launch flags (model path replaced by the local test model)
    flags = [
        model_dir,
        "--attention-backend",
        "CUSTOM",
        "--block-size",
        "16",
        "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--additional-config",
        json.dumps({"foresightkv": BACKEND}),
        "--skip-tokenizer-init",
        "--dtype",
        "float32",
        "--max-model-len",
        "4096",
    ]
    ns = parser.parse_args(["--model", *flags])
    cfg = EngineArgs.from_cli_args(ns).create_engine_config()
    assert cfg.attention_config.backend is AttentionBackendEnum.CUSTOM
    assert cfg.additional_config == {"foresightkv": BACKEND}
    register()
    _cached_get_attn_backend.cache_clear()
    with set_current_vllm_config(cfg):
        cls = get_attn_backend(64, cfg.model_config.dtype, "auto")
    assert cls is ForesightKVBackend
    assert cls.get_name() == "CUSTOM"
    assert AttentionBackendEnum[cls.get_name()] is AttentionBackendEnum.CUSTOM


def test_selector_keeps_vllm_cpu_backend_without_opt_in(no_overrides, monkeypatch, make_vllm_config):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.selector import _cached_get_attn_backend, get_attn_backend

    from foresightkv_vllm.backend import ForesightKVBackend
    from foresightkv_vllm.plugin import register

    monkeypatch.delenv("FORESIGHTKV_VLLM_CPU", raising=False)
    register()
    cfg = make_vllm_config(BACKEND)
    _cached_get_attn_backend.cache_clear()
    with set_current_vllm_config(cfg):
        cls = get_attn_backend(64, cfg.model_config.dtype, "auto")
    assert cls is not ForesightKVBackend
    assert cls.get_name() == "CPU_ATTN"


def test_the_readme_launch_command_parses_with_vllm_serve_parser():
    import pathlib
    import shlex

    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Launch", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["vllm", "serve"]
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[2:])
    assert ns.model_tag == "Qwen/Qwen3-4B"
    assert ns.attention_backend == "CUSTOM"
    assert ns.block_size == 16
    assert ns.enable_prefix_caching is False
    assert ns.enable_chunked_prefill is False
    # piecewise CUDA graphs work (the attention op is a splitting op): no --enforce-eager
    assert not ns.enforce_eager
    fkv = ns.additional_config["foresightkv"]
    assert (fkv["budget"], fkv["interval"], fkv["policy"]) == (1024, 128, "foresight")


def test_vllm_cuda_selector_validation_accepts_supported_and_names_the_rest():
    """``CudaPlatform`` calls ``validate_configuration`` on the selected class and raises with its
    reasons; the class attributes give vLLM's own reasons for what foresightkv cannot run."""
    import torch
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backend import AttentionType

    from foresightkv_vllm.backend import ForesightKVBackend

    def reasons(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, **kw):
        args = dict(
            use_mla=False,
            has_sink=False,
            use_sparse=False,
            use_mm_prefix=False,
            use_per_head_quant_scales=False,
            device_capability=DeviceCapability(9, 0),
            attn_type=AttentionType.DECODER,
        )
        args.update(kw)
        return ForesightKVBackend.validate_configuration(head_size, dtype, kv_cache_dtype, block_size, **args)

    assert reasons() == []
    assert reasons(head_size=64, dtype=torch.float16, block_size=32) == []
    assert reasons(head_size=80) == ["head_size not supported"]
    assert reasons(kv_cache_dtype="fp8") == ["kv_cache_dtype not supported"]
    assert reasons(block_size=8) == ["block_size not supported"]
    assert reasons(has_sliding_window=True) == ["sliding window not supported"]
    assert reasons(use_mla=True) == ["MLA not supported"]
    # protect mode's R-SWA window (which carries prompt lengths) passes vLLM's check
    assert reasons(use_rswa=True) == []

"""Two vLLM engines in one process (``vllm.LLM`` twice, or an engine core in-process next to another)
keep their own foresightkv settings and per-request state: nothing module-level of the plugin leaks
from the first engine into the second (the whole-engine version: integration/vllm/e2e)."""

import torch

FIRST = {"budget": 64, "interval": 32, "policy": "h2o"}
SECOND = {"budget": 128, "interval": 32, "policy": "streaming_llm"}


def _spec():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)


def _builder(cfg):
    from vllm.config import set_current_vllm_config

    from foresightkv_vllm.backend import ForesightKVBackend

    names = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    with set_current_vllm_config(cfg):
        return ForesightKVBackend.get_builder_cls()(_spec(), names, cfg, torch.device("cpu"))


def test_second_engine_gets_its_own_settings(make_vllm_config):
    """After a first engine's settings are cached, vLLM calls made under the second engine's config
    (its layers' impls, its KV spec) see the second engine's settings, not the cached first ones."""
    from vllm.config import set_current_vllm_config

    from foresightkv_vllm import config
    from foresightkv_vllm.backend import ForesightKVBackend

    first, second = make_vllm_config(FIRST), make_vllm_config(SECOND)
    _builder(first)
    with set_current_vllm_config(second):
        settings = config.settings_for_current_config()
        spec = ForesightKVBackend.customize_spec(_spec())
    assert settings.engine.policy == "streaming_llm" and settings.window == 160
    assert spec.sliding_window == 160
    with set_current_vllm_config(first):
        assert config.settings_for_current_config().window == 96
        assert ForesightKVBackend.customize_spec(_spec()).sliding_window == 96


def test_two_engines_with_equal_settings_do_not_share_state(make_vllm_config):
    """Two engines' builders (same settings) own distinct eviction engines, and each layer's impl runs
    the engine of the builder that planned its step (the metadata carries it)."""
    first, second = _builder(make_vllm_config(FIRST)), _builder(make_vllm_config(FIRST))
    assert first.engine is not second.engine
    assert first.engine.config == second.engine.config

"""``--additional-config '{"foresightkv": {...}}'`` read from vLLM's real ``VllmConfig`` objects and
validated at start: the settings a good configuration gives, and the message of each misconfiguration."""

import json

import pytest

from foresightkv.errors import ConfigError
from foresightkv_vllm.config import load_settings

GOOD = {"budget": 64, "interval": 16, "policy": "h2o"}


def test_good_configuration_gives_the_settings_and_window(make_vllm_config):
    s = load_settings(make_vllm_config(GOOD))
    assert (s.engine.budget, s.engine.interval, s.engine.policy) == (64, 16, "h2o")
    assert s.block_size == 16
    assert s.window == 80
    assert (s.shape.num_layers, s.shape.num_heads, s.shape.num_kv_heads, s.shape.head_size) == (2, 4, 2, 64)
    assert s.shape.group == 2


def test_missing_configuration_names_the_flag(make_vllm_config):
    with pytest.raises(ConfigError, match=r"--additional-config '\{\"foresightkv\""):
        load_settings(make_vllm_config(None), env={})


def test_env_fallback_reads_a_json_file(make_vllm_config, tmp_path):
    path = tmp_path / "fkv.json"
    path.write_text(json.dumps({"foresightkv": {"budget": 32, "interval": 16, "policy": "tova"}}))
    s = load_settings(make_vllm_config(None), env={"FORESIGHTKV_CONFIG": str(path)})
    assert (s.engine.budget, s.engine.policy, s.window) == (32, "tova", 48)


def test_unknown_option_is_named(make_vllm_config):
    # named, with the closest valid option suggested (EngineConfig's rule for unknown keys)
    with pytest.raises(ConfigError, match=r"unknown foresightkv option\(s\) 'budgett' \(did you mean 'budget'\?\)"):
        load_settings(make_vllm_config({"budgett": 64, "budget": 64, "interval": 16, "policy": "h2o"}))


def test_prefix_caching_on_is_rejected(make_vllm_config):
    with pytest.raises(ConfigError, match="prefix caching must be off.*--no-enable-prefix-caching"):
        load_settings(make_vllm_config(GOOD, enable_prefix_caching=True))


def test_block_size_not_multiple_of_16_is_rejected(make_vllm_config):
    with pytest.raises(ConfigError, match=r"block size 8 is not supported \(use --block-size with a multiple of 16\)"):
        load_settings(make_vllm_config({"budget": 64, "interval": 16, "policy": "h2o"}, block_size=8))


def test_schedule_not_fitting_the_block_size_is_rejected(make_vllm_config):
    # vLLM's CPU platform defaults to 128-token blocks: the budget must be a multiple of them
    with pytest.raises(ConfigError, match="budget 64 must be a positive multiple of block_size 128"):
        load_settings(make_vllm_config(GOOD, block_size=128))


def test_unsupported_head_size_is_rejected(make_vllm_config, tmp_path_factory):
    from conftest import write_model

    model = write_model(tmp_path_factory, "hd80", hidden_size=320, head_dim=80)
    with pytest.raises(ConfigError, match=r"head size 80 is not supported \(supported: \[64, 128, 256\]\)"):
        load_settings(make_vllm_config(GOOD, model=model))


def test_unsupported_kv_cache_dtype_is_rejected(make_vllm_config):
    try:
        cfg = make_vllm_config(GOOD, kv_cache_dtype="fp8")
    except Exception as e:  # vLLM itself may refuse fp8 on this platform; then there is nothing to check
        pytest.skip(f"vLLM refuses --kv-cache-dtype fp8 here: {e}")
    with pytest.raises(ConfigError, match="KV cache dtype 'fp8' is not supported: eviction moves raw K/V"):
        load_settings(cfg)


def test_model_sliding_window_is_rejected(make_vllm_config, tmp_path_factory):
    from conftest import write_model

    model = write_model(
        tmp_path_factory, "mistral", architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=512
    )
    with pytest.raises(ConfigError, match=r"the model has its own sliding window \(512 tokens\)"):
        load_settings(make_vllm_config(GOOD, model=model))


def test_scorer_for_another_model_shape_is_rejected(make_vllm_config, tmp_path):
    from foresightkv import ScorerCheckpoint

    # trained for head size 128 and 4 KV heads; the model has head size 64 and 2 KV heads
    ck = ScorerCheckpoint.random(2, 4, 2, 128, 64, 16, seed=1)
    ck.save(tmp_path / "scorer")
    cfg = make_vllm_config(
        {"budget": 64, "interval": 16, "policy": "foresight", "checkpoint": str(tmp_path / "scorer")}
    )
    with pytest.raises(
        ConfigError,
        match=r"scorer checkpoint .*scorer does not fit the model \(2 layers, 2 KV heads, group 2, head size 64\)",
    ):
        load_settings(cfg)


def test_scorer_of_the_right_shape_is_accepted(make_vllm_config, tmp_path):
    from foresightkv import ScorerCheckpoint

    ScorerCheckpoint.random(2, 2, 2, 64, 64, 16, seed=1).save(tmp_path / "scorer")
    s = load_settings(
        make_vllm_config({"budget": 64, "interval": 16, "policy": "foresight", "checkpoint": str(tmp_path / "scorer")})
    )
    assert s.engine.checkpoint == str(tmp_path / "scorer")


def test_all_problems_are_reported_together(make_vllm_config):
    with pytest.raises(ConfigError) as info:
        load_settings(make_vllm_config({"budget": 64, "interval": 16}, enable_prefix_caching=True, block_size=8))
    msg = str(info.value)
    assert "prefix caching must be off" in msg
    assert "block size 8 is not supported" in msg
    assert "policy 'foresight' needs 'checkpoint'" in msg


def test_protect_prompt_with_the_r_swa_window_gives_the_settings(make_vllm_config):
    s = load_settings(make_vllm_config({**GOOD, "protect_prompt": True}, hf_overrides={"rswa_window": 80}))
    assert s.engine.protect_prompt and s.window == 80


@pytest.mark.parametrize("overrides", [None, {"rswa_window": 64}])
def test_protect_prompt_without_the_matching_r_swa_window_names_the_flag(make_vllm_config, overrides):
    kw = {} if overrides is None else {"hf_overrides": overrides}
    with pytest.raises(ConfigError) as info:
        load_settings(make_vllm_config({**GOOD, "protect_prompt": True}, **kw))
    assert "--hf-overrides '{\"rswa_window\": 80}'" in str(info.value)
    assert f"got {None if overrides is None else 64}" in str(info.value)


def test_an_r_swa_window_without_protect_prompt_is_refused(make_vllm_config):
    with pytest.raises(ConfigError, match=r"R-SWA window \(80\), which only 'protect_prompt' uses"):
        load_settings(make_vllm_config(GOOD, hf_overrides={"rswa_window": 80}))


def test_unreadable_scorer_checkpoint_is_named(make_vllm_config, tmp_path):
    missing = tmp_path / "no-such-scorer"
    with pytest.raises(ConfigError, match=f"foresightkv checkpoint {missing}"):
        load_settings(
            make_vllm_config({"budget": 64, "interval": 16, "policy": "foresight", "checkpoint": str(missing)})
        )


def test_additional_config_wins_over_the_env_fallback(make_vllm_config, tmp_path):
    path = tmp_path / "fkv.json"
    path.write_text(json.dumps({"budget": 32, "interval": 16, "policy": "tova"}))
    s = load_settings(make_vllm_config(GOOD), env={"FORESIGHTKV_CONFIG": str(path)})
    assert (s.engine.budget, s.engine.policy) == (64, "h2o")


def test_impl_and_customize_spec_read_the_current_vllm_config(make_vllm_config):
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from foresightkv_vllm import config
    from foresightkv_vllm.backend import ForesightKVBackend

    cfg = make_vllm_config(GOOD)
    with set_current_vllm_config(cfg):
        ForesightKVBackend.get_impl_cls()(4, 64, 0.125, 2, None, None, "auto")
    assert config.active() is not None and config.active().window == 80
    # customize_spec runs outside any current config (docs/engines.md 1.5): it uses the cached settings
    spec = ForesightKVBackend.customize_spec(
        FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    )
    assert type(spec) is SlidingWindowSpec and spec.sliding_window == 80


def test_impl_rejects_what_the_backend_does_not_support(make_vllm_config):
    from vllm.config import set_current_vllm_config

    from foresightkv_vllm.backend import ForesightKVBackend

    with set_current_vllm_config(make_vllm_config(GOOD)):
        with pytest.raises(
            ConfigError, match=r"does not support ALiBi, a model sliding window \(256\), logits soft-capping"
        ):
            ForesightKVBackend.get_impl_cls()(4, 64, 0.125, 2, [0.5] * 4, 256, "auto", 30.0)


def test_hybrid_model_is_rejected(make_vllm_config, tmp_path_factory):
    from conftest import write_model

    model = write_model(
        tmp_path_factory,
        "jamba",
        architectures=["JambaForCausalLM"],
        model_type="jamba",
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=1,
        num_experts_per_tok=1,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=16,
    )
    with pytest.raises(ConfigError, match=r"hybrid models \(Mamba or linear-attention layers next to attention\)"):
        load_settings(make_vllm_config(GOOD, model=model))


def test_chunked_prefill_outside_protect_mode_is_refused_naming_the_flag(make_vllm_config):
    # vLLM's default: chunked prefill on (max_num_batched_tokens 2048 < max_model_len)
    cfg = make_vllm_config(GOOD, enable_chunked_prefill=True, max_num_batched_tokens=2048)
    assert cfg.scheduler_config.enable_chunked_prefill
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    msg = str(info.value)
    assert "chunked prefill is not supported outside protect mode" in msg
    assert "--no-enable-chunked-prefill" in msg and "--max-num-batched-tokens >= --max-model-len 4096" in msg


def test_long_prefill_threshold_outside_protect_mode_is_refused(make_vllm_config):
    cfg = make_vllm_config(GOOD, long_prefill_token_threshold=512)
    with pytest.raises(ConfigError, match=r"--long-prefill-token-threshold 512 splits prompts into chunks"):
        load_settings(cfg)


def test_chunked_prefill_is_allowed_where_chunking_cannot_change_the_kept_set(make_vllm_config):
    # protect mode never compresses the prompt; a model length within the budget never compresses at all
    chunked = dict(enable_chunked_prefill=True, max_num_batched_tokens=2048)
    s = load_settings(
        make_vllm_config({**GOOD, "protect_prompt": True}, hf_overrides={"rswa_window": 80}, **chunked)
    )
    assert s.engine.protect_prompt
    load_settings(make_vllm_config({"budget": 4096, "interval": 16, "policy": "h2o"}, **chunked))
    load_settings(make_vllm_config({**GOOD, "policy": "full_cache"}, **chunked))


def test_full_cuda_graphs_are_refused_and_piecewise_ones_accepted(make_vllm_config):
    from vllm.config import CompilationMode, CUDAGraphMode

    cfg = make_vllm_config(GOOD)
    cc = cfg.compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.splitting_ops = list(cc._attention_ops)
    for ok in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_AND_PIECEWISE):
        cc.cudagraph_mode = ok
        load_settings(cfg)
    cc.cudagraph_mode = CUDAGraphMode.FULL
    with pytest.raises(ConfigError, match=r"cudagraph_mode FULL captures attention.*\"cudagraph_mode\": \"PIECEWISE\""):
        load_settings(cfg)
    cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    cc.splitting_ops = []
    with pytest.raises(ConfigError, match=r"piecewise CUDA graphs must split at the attention op"):
        load_settings(cfg)


def test_vllm_resolves_its_default_graph_mode_to_piecewise_for_the_backend(make_vllm_config):
    """With the builder's ``AttentionCGSupport.NEVER`` vLLM's own resolution turns the default
    ``FULL_AND_PIECEWISE`` into ``PIECEWISE`` (attention runs eagerly between graphs): no
    ``--enforce-eager`` needed."""
    from vllm.config import CompilationMode, CUDAGraphMode

    from foresightkv_vllm.backend import ForesightKVMetadataBuilder

    cc = make_vllm_config(GOOD).compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.splitting_ops = list(cc._attention_ops)
    cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    mode = cc.resolve_cudagraph_mode_and_sizes(ForesightKVMetadataBuilder._cudagraph_support, "CUSTOM")
    assert mode == CUDAGraphMode.PIECEWISE


@pytest.mark.parametrize(
    "kw,flag",
    [
        ({"decode_context_parallel_size": 2}, "--decode-context-parallel-size 2"),
        ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}}, "--kv-transfer-config"),
    ],
)
def test_context_parallelism_and_kv_connectors_are_refused(make_vllm_config, kw, flag):
    try:
        cfg = make_vllm_config(GOOD, **kw)
    except Exception as e:  # vLLM itself may refuse the setting on this platform
        pytest.skip(f"vLLM refuses {kw} here: {e}")
    with pytest.raises(ConfigError, match=f"drop {flag}"):
        load_settings(cfg)


@pytest.mark.parametrize("attr,value,flag", [("enable_dbo", True, "--enable-dbo"), ("ubatch_size", 2, "--ubatch-size 2")])
def test_micro_batching_is_refused(make_vllm_config, attr, value, flag):
    """Dual batch overlap runs two micro-batches through the same layers interleaved; one planned step,
    its rings and pending evictions cannot be shared between them, so the setting is refused by name.
    Set on a built config: vLLM itself refuses DBO without its all-to-all backends on this platform."""
    cfg = make_vllm_config(GOOD)
    load_settings(cfg)  # accepted without micro-batching
    setattr(cfg.parallel_config, attr, value)
    assert cfg.parallel_config.use_ubatching
    with pytest.raises(ConfigError, match=f"drop {flag}"):
        load_settings(cfg)

//! Hostile files and arguments through the core's parsers: every one is a typed error naming what is
//! wrong, never an allocation abort, an hours-long run or a silently different configuration.
//! (Issue 16; each test failed on the code before it: abort, hang or accepted input.)

use foresightkv::block::CacheConfig;
use foresightkv::evict::convert::{convert_official, OfficialTensors};
use foresightkv::evict::tensors::{serialize, OwnedTensor};
use foresightkv::evict::{ModelShape, ScorerCheckpoint, ScorerConfig, Trace as AttnTrace};
use foresightkv::replay::Trace;

fn shape(num_layers: usize, num_kv_heads: usize, group_size: usize, head_dim: usize) -> ModelShape {
    ModelShape {
        num_layers,
        num_kv_heads,
        group_size,
        head_dim,
    }
}

fn small_checkpoint() -> (Vec<u8>, Vec<u8>) {
    let ck = ScorerCheckpoint::random(ScorerConfig::new(shape(1, 1, 1, 2), 16, 8), 1, 0.1)
        .expect("a small random checkpoint");
    ck.to_bytes().expect("serialises")
}

/// The message of the error `from_bytes` refuses a hostile checkpoint with.
fn refusal(json: &[u8], weights: &[u8]) -> String {
    ScorerCheckpoint::from_bytes(json, weights, "hostile")
        .unwrap_err()
        .to_string()
}

fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (json, _) = small_checkpoint();
    let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn checkpoint_config_with_a_trillion_layers_is_an_error_not_an_abort() {
    let (_, weights) = small_checkpoint();
    for (key, value) in [
        ("num_layers", 1_000_000_000_000u64),
        ("num_kv_heads", 1_000_000_000_000),
        ("head_dim", u64::MAX / 4),
        ("group_size", 1 << 40),
    ] {
        let json = config_with(|v| v[key] = value.into());
        let err = ScorerCheckpoint::from_bytes(&json, &weights, "hostile").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("bytes") || msg.contains("weights"),
            "{key}: {msg}"
        );
    }
    // Many layers that would fit in memory but not in this 1-layer weights file: refused before
    // the per-layer vector is allocated.
    let json = config_with(|v| v["num_layers"] = 10_000_000u64.into());
    let msg = refusal(&json, &weights);
    assert!(msg.contains("only"), "{msg}");
}

#[test]
fn random_checkpoint_with_huge_dimensions_or_std_is_an_error() {
    let err = ScorerCheckpoint::random(
        ScorerConfig::new(shape(1 << 16, 1 << 16, 1 << 12, 1 << 12), 16, 8),
        0,
        0.1,
    )
    .unwrap_err();
    assert!(err.to_string().contains("bytes"), "{err}");
    // std = 1e39 is infinite as f32; 1e38 overflows once multiplied by a normal draw.
    for std in [1e39f64 as f32, 1e38, f32::NAN, -1.0] {
        let err = ScorerCheckpoint::random(ScorerConfig::new(shape(1, 1, 1, 2), 16, 8), 0, std)
            .unwrap_err();
        assert!(err.to_string().contains("std"), "{std}: {err}");
    }
    // What random() writes, load() reads back.
    let ck = ScorerCheckpoint::random(ScorerConfig::new(shape(1, 1, 1, 2), 16, 8), 0, 1e30)
        .expect("large finite std");
    let (json, weights) = ck.to_bytes().unwrap();
    assert_eq!(
        ScorerCheckpoint::from_bytes(&json, &weights, "round trip").unwrap(),
        ck
    );
}

#[test]
fn checkpoint_with_interval_above_budget_is_refused() {
    let (_, weights) = small_checkpoint();
    let json = config_with(|v| {
        v["budget"] = 16.into();
        v["interval"] = 32.into();
    });
    let msg = refusal(&json, &weights);
    assert!(msg.contains("interval 32 exceeds budget 16"), "{msg}");
    assert!(
        ScorerCheckpoint::random(ScorerConfig::new(shape(1, 1, 1, 2), 16, 32), 0, 0.1).is_err()
    );
}

#[test]
fn checkpoint_config_with_an_unknown_key_names_it_and_suggests_the_closest() {
    let (_, weights) = small_checkpoint();
    let json = config_with(|v| {
        let budget = v["budget"].take();
        let obj = v.as_object_mut().unwrap();
        obj.remove("budget");
        obj.insert("budgt".into(), budget);
    });
    let msg = refusal(&json, &weights);
    assert!(
        msg.contains("`budgt`") && msg.contains("did you mean `budget`"),
        "{msg}"
    );
    let json = config_with(|v| v["stats_verison"] = 1.into());
    let msg = refusal(&json, &weights);
    assert!(msg.contains("did you mean `stats_version`"), "{msg}");
}

#[test]
fn cache_config_json_with_a_typo_is_refused_not_a_full_cache() {
    let good = r#"{"block_size": 16, "num_blocks": 64, "enable_prefix_caching": false,
                  "eviction": {"budget": 64, "interval": 32, "protect_prompt": false}}"#;
    let c: CacheConfig = serde_json::from_str(good).unwrap();
    assert!(c.eviction.is_some());
    let typo = good.replace("\"eviction\"", "\"evicton\"");
    let err = serde_json::from_str::<CacheConfig>(&typo).unwrap_err();
    let msg = foresightkv::config_keys::explain(&err);
    assert!(
        msg.contains("`evicton`") && msg.contains("did you mean `eviction`"),
        "{msg}"
    );
    let nested = good.replace("\"interval\"", "\"intreval\"");
    let err = serde_json::from_str::<CacheConfig>(&nested).unwrap_err();
    assert!(
        foresightkv::config_keys::explain(&err).contains("did you mean `interval`"),
        "{err}"
    );
}

#[test]
fn official_layout_with_a_trillion_layers_is_an_error_not_an_abort() {
    let mut official = OfficialTensors::default();
    let t = serialize(
        &[(
            "model.layers.0.self_attn.judge_model.fc1.bias".to_string(),
            OwnedTensor::f32(vec![1, 16], &[0.0; 16]),
        )],
        "<test>",
    )
    .unwrap();
    official.add_shard("shard", &t).unwrap();
    for s in [
        shape(1_000_000_000_000, 1, 1, 2),
        shape(1, 1 << 40, 1, 2),
        shape(1, 1, 1, usize::MAX / 2),
        shape(10_000_000, 1, 1, 2),
    ] {
        let err = convert_official(&official, s, 16, 8).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
    // interval > budget is refused by the converter too.
    assert!(convert_official(&official, shape(1, 1, 1, 2), 8, 16).is_err());
}

#[test]
fn model_config_json_with_a_trillion_layers_is_refused_by_the_converter_entry() {
    let dir = std::env::temp_dir().join(format!("fkv-hostile-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"num_hidden_layers": 1000000000000, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64}"#,
    )
    .unwrap();
    let shape = foresightkv::evict::convert::model_shape_from_hf_config(&cfg).unwrap();
    let err = convert_official(&OfficialTensors::default(), shape, 16, 8).unwrap_err();
    assert!(err.to_string().contains("bytes"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn replay_trace_rows_with_billions_of_tokens_are_refused_at_parse_time() {
    for row in ["0,10,3000000000", "0,3000000000,10", "0,10,4194305"] {
        let csv = format!("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,10\n{row}\n");
        let err = Trace::from_reader("hostile", csv.as_bytes()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("per request"), "{row}: {msg}");
    }
    // The largest allowed request still parses.
    let csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n0,4194304,4194304\n";
    assert_eq!(
        Trace::from_reader("ok", csv.as_bytes())
            .unwrap()
            .requests
            .len(),
        1
    );
}

#[test]
fn replay_trace_total_output_is_bounded() {
    let mut csv = String::from("TIMESTAMP,ContextTokens,GeneratedTokens\n");
    for i in 0..1100 {
        csv.push_str(&format!("{i},1,4194304\n"));
    }
    let msg = Trace::from_reader("hostile", csv.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("in all"), "{msg}");
}

#[test]
fn bench_kernels_json_with_nan_or_infinite_figures_is_refused() {
    let p = std::path::Path::new("timings.json");
    let ok = r#"{"decode": [{"live": 2048, "kv_bytes": 1e6, "time_us": 10.0}]}"#;
    assert!(foresightkv::replay::MeasuredTimings::parse(ok, p).is_ok());
    for bad in [
        r#"{"decode": [{"live": 2048, "kv_bytes": 1e999, "time_us": 10.0}]}"#,
        r#"{"decode": [{"live": 2048, "kv_bytes": 1e6, "time_us": 1e999}]}"#,
        r#"{"evict": [{"budget": 1, "interval": 1, "batch": 1, "total_us": 1e999}]}"#,
    ] {
        assert!(
            foresightkv::replay::MeasuredTimings::parse(bad, p).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn attention_trace_with_a_layer_larger_than_memory_is_refused() {
    // A header-only claim is caught by safetensors itself (data length); a real file whose
    // dimensions multiply past memory can only be tested through the bound directly.
    let err =
        foresightkv::limits::check_elems("one layer", &[1 << 31, 1 << 20, 1 << 12], 4).unwrap_err();
    assert!(err.to_string().contains("one layer"), "{err}");
    let bytes = serialize(
        &[(
            "layers.0.queries".to_string(),
            OwnedTensor::f32(vec![1, 1, 1], &[0.0]),
        )],
        "<test>",
    )
    .unwrap();
    assert!(AttnTrace::from_bytes(bytes, "hostile").is_err());
}

#[test]
fn replay_scenarios_with_hostile_sizes_are_refused_before_running() {
    use foresightkv::replay::{OutputLengths, ScenarioKind, ScenarioSpec};
    let trace = Trace::bundled(foresightkv::replay::BundledTrace::Conversation).unwrap();
    let spec = |kind, requests, output: OutputLengths, paper_output| ScenarioSpec {
        kind,
        requests,
        rate_scale: 1.0,
        output,
        paper_prompt: 128,
        paper_output,
        seed: 0,
    };
    let long = OutputLengths {
        min: 3_000_000_000,
        max: 4_000_000_000,
        ..OutputLengths::default()
    };
    for (s, why) in [
        (
            spec(
                ScenarioKind::Paper,
                2,
                OutputLengths::default(),
                4_000_000_000,
            ),
            "per request",
        ),
        (
            spec(
                ScenarioKind::Paper,
                100_000_000_000,
                OutputLengths::default(),
                128,
            ),
            "2^24",
        ),
        (
            spec(
                ScenarioKind::Paper,
                1 << 20,
                OutputLengths::default(),
                1 << 20,
            ),
            "in all",
        ),
        (spec(ScenarioKind::Reasoning, 2, long, 1), "per request"),
    ] {
        let msg = s.build(&trace).unwrap_err().to_string();
        assert!(msg.contains(why), "{s:?}: {msg}");
    }
}

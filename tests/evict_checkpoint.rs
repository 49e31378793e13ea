//! Scorer checkpoints: save/load round trip, typed errors for bad checkpoints, the official-layout
//! converter's round trip and its agreement with the official forward.

mod common;

use foresightkv::evict::convert::{
    convert_official, export_official, official_column, OfficialTensors, OFFICIAL_STAT_POSITION,
};
use foresightkv::evict::tensors::{serialize, OwnedTensor};
use foresightkv::evict::{
    EvictError, EvictionPolicy, EvictionView, ForesightPolicy, ModelShape, SampleKey,
    ScorerCheckpoint, ScorerConfig, StatsMode, VictimMode,
};
use foresightkv::kernels::{gelu, NUM_STATS, SCORER_HIDDEN};
use proptest::prelude::*;
use std::sync::Arc;

fn shape() -> ModelShape {
    ModelShape {
        num_layers: 2,
        num_kv_heads: 2,
        group_size: 3,
        head_dim: 8,
    }
}

fn checkpoint(seed: u64) -> ScorerCheckpoint {
    ScorerCheckpoint::random(ScorerConfig::new(shape(), 256, 32), seed, 0.5).unwrap()
}

/// The checkpoint's tensors with `edit` applied, serialized.
fn edited(
    ck: &ScorerCheckpoint,
    edit: impl Fn(&mut Vec<(String, OwnedTensor)>),
) -> (Vec<u8>, Vec<u8>) {
    let (json, weights) = ck.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let mut tensors: Vec<(String, OwnedTensor)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                OwnedTensor {
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            )
        })
        .collect();
    edit(&mut tensors);
    (json, serialize(&tensors, "test").unwrap())
}

#[test]
fn save_load_round_trip() {
    let ck = checkpoint(1);
    let dir = std::env::temp_dir().join(format!("fkv-ck-{}", std::process::id()));
    ck.save(&dir).unwrap();
    let back = ScorerCheckpoint::load_for(&dir, &shape()).unwrap();
    assert_eq!(back, ck);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let ck = checkpoint(2);
    let (json, w) = edited(&ck, |t| t.retain(|(n, _)| n != "layers.1.b2"));
    match ScorerCheckpoint::from_bytes(&json, &w, "ck") {
        Err(EvictError::BadCheckpoint { why, .. }) => {
            assert!(why.contains("missing tensor layers.1.b2"), "{why}")
        }
        other => panic!("expected BadCheckpoint, got {other:?}"),
    }
}

#[test]
fn wrong_shape_is_named() {
    let ck = checkpoint(3);
    let (json, w) = edited(&ck, |t| {
        for (n, x) in t.iter_mut() {
            if n == "layers.0.w1" {
                let len = x.bytes.len() / 4;
                *x = OwnedTensor::f32(
                    vec![2, SCORER_HIDDEN, len / (2 * SCORER_HIDDEN) - 1],
                    &vec![0.0; len - 32],
                );
            }
        }
    });
    match ScorerCheckpoint::from_bytes(&json, &w, "ck") {
        Err(EvictError::BadCheckpoint { why, .. }) => {
            assert!(
                why.contains("layers.0.w1") && why.contains("expected [2, 16, 40]"),
                "{why}"
            )
        }
        other => panic!("expected BadCheckpoint, got {other:?}"),
    }
}

#[test]
fn unexpected_tensor_is_refused() {
    let ck = checkpoint(4);
    let (json, w) = edited(&ck, |t| {
        t.push(("layers.2.w1".into(), OwnedTensor::f32(vec![1], &[0.0])))
    });
    assert!(
        matches!(ScorerCheckpoint::from_bytes(&json, &w, "ck"), Err(EvictError::BadCheckpoint { why, .. }) if why.contains("unexpected"))
    );
}

#[test]
fn truncated_file_is_a_safetensors_error() {
    let (json, w) = checkpoint(5).to_bytes().unwrap();
    for cut in [0, 7, 20, w.len() / 2, w.len() - 1] {
        let r = ScorerCheckpoint::from_bytes(&json, &w[..cut], "ck");
        assert!(
            matches!(r, Err(EvictError::SafeTensors { .. })),
            "cut {cut}: {r:?}"
        );
    }
}

#[test]
fn bad_configs_are_refused() {
    let (json, w) = checkpoint(6).to_bytes().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&json).unwrap();
    cfg["hidden"] = 32.into();
    cfg["stats_version"] = 1.into();
    let r = ScorerCheckpoint::from_bytes(&serde_json::to_vec(&cfg).unwrap(), &w, "ck");
    match r {
        Err(EvictError::BadCheckpoint { why, .. }) => assert!(
            why.contains("hidden is 32") && why.contains("stats_version is 1"),
            "{why}"
        ),
        other => panic!("expected BadCheckpoint, got {other:?}"),
    }
    assert!(matches!(
        ScorerCheckpoint::from_bytes(b"{not json", &w, "ck"),
        Err(EvictError::Json { .. })
    ));
}

#[test]
fn model_mismatch_lists_every_difference() {
    let ck = checkpoint(7);
    let model = ModelShape {
        num_layers: 2,
        num_kv_heads: 2,
        group_size: 4,
        head_dim: 16,
    };
    match ck.check_model(&model) {
        Err(EvictError::CheckpointMismatch(v)) => {
            assert_eq!(v.len(), 2, "{v:?}");
            assert!(v[0].contains("group_size") && v[0].contains("checkpoint 3, model 4"));
            assert!(v[1].contains("head_dim: checkpoint 8, model 16"));
        }
        other => panic!("expected CheckpointMismatch, got {other:?}"),
    }
}

#[test]
fn missing_files_are_io_errors() {
    let r = ScorerCheckpoint::load(std::path::Path::new("/nonexistent/foresightkv-scorer"));
    assert!(matches!(r, Err(EvictError::Io { .. })));
}

fn official_bytes(ck: &ScorerCheckpoint) -> Vec<u8> {
    serialize(&export_official(ck), "official").unwrap()
}

#[test]
fn converter_round_trip() {
    let ck = checkpoint(8);
    let mut off = OfficialTensors::default();
    off.add_shard("shard", &official_bytes(&ck)).unwrap();
    let back = convert_official(&off, shape(), 256, 32).unwrap();
    assert_eq!(back, stamped_official(ck));
}

/// What the converter makes of `ck`'s weights: the same checkpoint stamped official.
fn stamped_official(ck: ScorerCheckpoint) -> ScorerCheckpoint {
    ScorerCheckpoint {
        config: ck.config.clone().with_stats_mode(StatsMode::Official),
        ..ck
    }
}

#[test]
fn converter_reads_split_shards_and_names_missing_tensors() {
    let ck = checkpoint(9);
    let all = export_official(&ck);
    let (a, b): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _)| n.contains("layers.0."));
    let mut off = OfficialTensors::default();
    off.add_shard("a", &serialize(&a, "a").unwrap()).unwrap();
    let missing = convert_official(&off, shape(), 256, 32);
    assert!(
        matches!(missing, Err(EvictError::BadCheckpoint { why, .. }) if why.contains("layers.1") && why.contains("fc1.weight"))
    );
    off.add_shard("b", &serialize(&b, "b").unwrap()).unwrap();
    assert_eq!(
        convert_official(&off, shape(), 256, 32).unwrap(),
        stamped_official(ck)
    );
}

#[test]
fn converter_rejects_wrong_official_shape() {
    let ck = checkpoint(10);
    let mut t = export_official(&ck);
    for (n, x) in t.iter_mut() {
        if n.ends_with("layers.1.self_attn.judge_model.fc2.weight") {
            *x = OwnedTensor::f32(vec![2, 16], &[0.0; 32]);
        }
    }
    let mut off = OfficialTensors::default();
    off.add_shard("s", &serialize(&t, "s").unwrap()).unwrap();
    let r = convert_official(&off, shape(), 256, 32);
    assert!(
        matches!(r, Err(EvictError::BadCheckpoint { why, .. }) if why.contains("fc2.weight") && why.contains("[2, 16, 1]"))
    );
}

/// The official SelectionModel forward on its own feature order, from the exported tensors.
fn official_forward(
    t: &[(String, OwnedTensor)],
    layer: usize,
    kh: usize,
    x_official: &[f32],
) -> f32 {
    let get = |suffix: &str| -> Vec<f32> {
        let name = format!("model.layers.{layer}.self_attn.judge_model.{suffix}");
        let (_, x) = t.iter().find(|(n, _)| *n == name).unwrap();
        x.bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (fc1, b1, fc2, b2) = (
        get("fc1.weight"),
        get("fc1.bias"),
        get("fc2.weight"),
        get("fc2.bias"),
    );
    let i = x_official.len();
    let mut out = b2[kh];
    for u in 0..SCORER_HIDDEN {
        let mut h = b1[kh * SCORER_HIDDEN + u];
        for (c, x) in x_official.iter().enumerate() {
            h += x * fc1[(kh * i + c) * SCORER_HIDDEN + u];
        }
        out += gelu(h) * fc2[kh * SCORER_HIDDEN + u];
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Our scorer on our feature order equals the official forward on the official order.
    #[test]
    fn converted_scorer_matches_official_forward(seed in any::<u64>(), layer in 0usize..2, kh in 0usize..2, n in 1usize..12) {
        let ck = Arc::new(checkpoint(seed));
        let s = shape();
        let (d, g) = (s.head_dim, s.group_size);
        let vals = |k: usize, salt: usize| -> Vec<f32> { (0..k).map(|j| (((j * 7 + salt * 13 + seed as usize) % 17) as f32 - 8.0) / 8.0).collect() };
        let keys = vals(n * d, 1);
        let values = vals(n * d, 2);
        let stats = vals(n * g * NUM_STATS, 3);
        let positions: Vec<u32> = (0..n as u32).collect();
        let view = EvictionView {
            key: SampleKey { seed: 0, request: 0, layer: layer as u32, head: kh as u32, eviction: 0 },
            head_dim: d, group_size: g, scale: 1.0, seq_len: n, keys: &keys, values: &values, stats: &stats,
            queries: &[], positions: &positions,
        };
        let mut ours = vec![0f32; n];
        ForesightPolicy::new(ck.clone(), VictimMode::TopL).score(&view, &mut ours).unwrap();
        let off = export_official(&ck);
        let in_dim = 2 * d + NUM_STATS * g;
        for i in 0..n {
            let mut x_ours = keys[i * d..(i + 1) * d].to_vec();
            x_ours.extend_from_slice(&values[i * d..(i + 1) * d]);
            x_ours.extend_from_slice(&stats[i * g * NUM_STATS..(i + 1) * g * NUM_STATS]);
            let mut x_off = vec![0f32; in_dim];
            for c in 0..in_dim {
                x_off[official_column(c, d, g)] = x_ours[c];
            }
            let want = official_forward(&off, layer, kh, &x_off);
            prop_assert!((ours[i] - want).abs() <= 1e-4 * want.abs().max(1.0), "entry {i}: {} vs {want}", ours[i]);
        }
    }

    #[test]
    fn official_column_is_a_permutation(d in 1usize..20, g in 1usize..9) {
        let i = 2 * d + NUM_STATS * g;
        let mut seen = vec![false; i];
        for c in 0..i {
            let o = official_column(c, d, g);
            prop_assert!(!seen[o]);
            seen[o] = true;
        }
        prop_assert_eq!(OFFICIAL_STAT_POSITION[3], 4);
    }
}

#[test]
fn foresight_policy_refuses_a_mismatched_view() {
    let ck = Arc::new(checkpoint(11));
    let keys = vec![0.0; 4 * 4];
    let stats = vec![0.0; 4 * 3 * NUM_STATS];
    let positions = [0, 1, 2, 3];
    let view = EvictionView {
        key: SampleKey::default(),
        head_dim: 4,
        group_size: 3,
        scale: 1.0,
        seq_len: 4,
        keys: &keys,
        values: &keys,
        stats: &stats,
        queries: &[],
        positions: &positions,
    };
    let mut s = vec![0.0; 4];
    let r = ForesightPolicy::new(ck, VictimMode::TopL).score(&view, &mut s);
    assert!(matches!(r, Err(EvictError::CheckpointMismatch(v)) if v[0].contains("head_dim")));
}

#[test]
fn convert_scorer_command_end_to_end() {
    let ck = checkpoint(12);
    let dir = std::env::temp_dir().join(format!("fkv-official-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hf = serde_json::json!({
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 48
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&hf).unwrap()).unwrap();
    let mut official = export_official(&ck);
    // Unrelated model weights and the sibling `reference` scorer must be ignored.
    official.push((
        "model.embed_tokens.weight".into(),
        OwnedTensor::f32(vec![4, 48], &[0.5; 192]),
    ));
    official.push((
        "model.layers.0.self_attn.reference.fc1.weight".into(),
        OwnedTensor::f32(vec![2, 40, 16], &[9.0; 1280]),
    ));
    let (a, b): (Vec<_>, Vec<_>) = official
        .into_iter()
        .partition(|(n, _)| n.contains("layers.1."));
    std::fs::write(
        dir.join("model-00001-of-00002.safetensors"),
        serialize(&a, "a").unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("model-00002-of-00002.safetensors"),
        serialize(&b, "b").unwrap(),
    )
    .unwrap();
    let out = dir.join("scorer");
    let (converted, _, shards) =
        foresightkv::evict::convert::convert_official_dir(&dir, 256, 32).unwrap();
    assert_eq!(shards, 2);
    converted.save(&out).unwrap();
    assert_eq!(
        ScorerCheckpoint::load_for(&out, &shape()).unwrap(),
        stamped_official(ck)
    );
    // The JSON says which features the scorer was trained on; paper-mode consumers refuse it.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["stats_mode"], "official");
    assert!(ScorerCheckpoint::load_with_mode(&out, StatsMode::Official).is_ok());
    let err = ScorerCheckpoint::load_with_mode(&out, StatsMode::Paper).unwrap_err();
    common::assert_official_scorer_refused(&err);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Our own checkpoints record their mode (paper by default) and keep it through save and load;
/// a config without the field, or with an unknown mode, is refused.
#[test]
fn checkpoints_record_their_stats_mode() {
    let dir = std::env::temp_dir().join(format!("fkv-ck-mode-{}", std::process::id()));
    for mode in [StatsMode::Paper, StatsMode::Official] {
        let cfg = ScorerConfig::new(shape(), 256, 32).with_stats_mode(mode);
        let ck = ScorerCheckpoint::random(cfg, 3, 0.5).unwrap();
        ck.save(&dir).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(json["stats_mode"], mode.name());
        assert_eq!(ScorerCheckpoint::load_with_mode(&dir, mode).unwrap(), ck);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let (json, w) = checkpoint(4).to_bytes().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&json).unwrap();
    cfg["stats_mode"] = "daily".into();
    assert!(matches!(
        ScorerCheckpoint::from_bytes(&serde_json::to_vec(&cfg).unwrap(), &w, "ck"),
        Err(EvictError::Json { .. })
    ));
    cfg.as_object_mut().unwrap().remove("stats_mode");
    let err =
        ScorerCheckpoint::from_bytes(&serde_json::to_vec(&cfg).unwrap(), &w, "ck").unwrap_err();
    assert!(err.to_string().contains("stats_mode"), "{err}");
}

/// The official feature code only builds its features for G <= 8: the converter refuses larger
/// groups instead of stamping features no official scorer was trained on.
#[test]
fn converter_refuses_groups_the_official_code_cannot_run() {
    let big = ModelShape {
        num_layers: 1,
        num_kv_heads: 1,
        group_size: 16,
        head_dim: 4,
    };
    let ck = ScorerCheckpoint::random(ScorerConfig::new(big, 64, 16), 1, 0.5).unwrap();
    let mut off = OfficialTensors::default();
    off.add_shard("s", &official_bytes(&ck)).unwrap();
    let r = convert_official(&off, big, 64, 16);
    assert!(
        matches!(&r, Err(EvictError::BadCheckpoint { why, .. }) if why.contains("G <= 8")),
        "{r:?}"
    );
}

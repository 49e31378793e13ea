//! Converter from the official ForesightKV checkpoint layout (RUCAIBox/ForesightKV) to our
//! scorer-only checkpoint, and the inverse export (for round trips and for training code that
//! still speaks the official layout).
//!
//! Official layout (from `reinforcment_learning/qwen3.py`, class `SelectionModel`, attribute
//! `judge_model` of each `Qwen3Attention`): in the model's safetensors shards, per layer `l`,
//! `model.layers.{l}.self_attn.judge_model.fc1.weight` `[kv_heads, in_dim, 16]` and `.bias`
//! `[kv_heads, 16]` (a head-wise linear `einsum('...hi,hio->...ho')`), `fc2.weight`
//! `[kv_heads, 16, 1]` and `.bias` `[kv_heads, 1]`, `feature_norm.weight` / `.bias` `[in_dim]`.
//! The forward is `fc2(GELU(fc1(cat(k, v, attn_info))))`; `feature_norm` (a LayerNorm) is built but
//! never applied, so it is checked for shape and not carried over. Any tensor name containing
//! `layers.{l}.` and ending in `judge_model.<fc1|fc2|feature_norm>.<weight|bias>` is accepted
//! (the sibling `reference` model is ignored).
//!
//! Feature order: the official `attn_info` is statistic major, `[max, min, sum, sum16, sum8,
//! sum32, cumulative, decayed]` each over the G query heads (`evaluation/rkv/compression/
//! foresightkv.py`: `attn_weights_sum2` = last 16 comes before `attn_weights_sum1` = last 8); ours
//! is query head major `g * 8 + k` with `k` in `[max, min, sum, sum8, sum16, sum32, cumulative,
//! decayed]`. The converter permutes the fc1 input columns accordingly.
//!
//! Features: the official training code (`supervised_training/cache.py` and
//! `reinforcment_learning/cache.py`, `KVCluster.update_kv`) slices `[:, :, -8:]` (and -16, -32) on
//! the GQA axis of its `[bsz, kv_heads, G, q, k]` attention, so for `G <= 8` its sum8, sum16 and
//! sum32 are the plain sum over the `L`-query chunk; it decays the 0.9 statistic once per eviction
//! interval. Converted checkpoints are therefore stamped [`StatsMode::Official`], which
//! `kernels::window_stats` reproduces exactly; loading them for paper-mode statistics is refused.
//! With `G > 8` the official code cannot build its `8 G` features (the slices keep 8, 16 and 32
//! heads), so no official checkpoint exists for such a model and the converter refuses it.

use super::checkpoint::{LayerWeights, ModelShape, ScorerCheckpoint, ScorerConfig};
use super::tensors::{read_file, to_f32, OwnedTensor};
use super::EvictError;
use crate::kernels::{StatsMode, NUM_STATS, SCORER_HIDDEN};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Position in the official statistic-major order of each of our statistics `k`.
pub const OFFICIAL_STAT_POSITION: [usize; NUM_STATS] = [0, 1, 2, 4, 3, 5, 6, 7];

/// fc1 input column in the official layout of our input column `c` (`in_dim = 2 d + 8 G`).
pub fn official_column(c: usize, head_dim: usize, group_size: usize) -> usize {
    if c < 2 * head_dim {
        return c;
    }
    let s = c - 2 * head_dim;
    let (g, k) = (s / NUM_STATS, s % NUM_STATS);
    2 * head_dim + OFFICIAL_STAT_POSITION[k] * group_size + g
}

/// The six tensors of one layer's official judge model, as f32 with their shapes.
#[derive(Debug, Clone, Default)]
struct OfficialLayer {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// The suffixes of the official tensors, all required.
const OFFICIAL_PARTS: [&str; 6] = [
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "feature_norm.weight",
    "feature_norm.bias",
];

/// Layer index and part of an official judge-model tensor name, if it is one.
fn parse_official_name(name: &str) -> Option<(usize, &'static str)> {
    let part = OFFICIAL_PARTS
        .iter()
        .find(|p| name.ends_with(&format!("judge_model.{p}")))?;
    let at = name.find("layers.")? + "layers.".len();
    let digits: String = name[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((digits.parse().ok()?, part))
}

/// Judge-model tensors gathered from the shards, per layer.
#[derive(Debug, Clone, Default)]
pub struct OfficialTensors {
    layers: BTreeMap<usize, OfficialLayer>,
    sources: Vec<String>,
}

impl OfficialTensors {
    /// Adds the judge-model tensors of one shard (`label` names it in errors); other tensors are
    /// skipped, so shards can be read one at a time.
    pub fn add_shard(&mut self, label: &str, bytes: &[u8]) -> Result<(), EvictError> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|source| {
            EvictError::SafeTensors {
                path: label.to_string(),
                source,
            }
        })?;
        for (name, view) in st.iter() {
            let Some((l, part)) = parse_official_name(name) else {
                continue;
            };
            let values = to_f32(&view).ok_or_else(|| {
                EvictError::bad_checkpoint(
                    label,
                    format!(
                        "tensor {name} has dtype {:?}, expected F32, F16 or BF16",
                        view.dtype()
                    ),
                )
            })?;
            self.layers
                .entry(l)
                .or_default()
                .tensors
                .insert(part.to_string(), (view.shape().to_vec(), values));
        }
        self.sources.push(label.to_string());
        Ok(())
    }
}

/// Largest GQA group the official feature code supports (its `-8:` slice of the group axis).
pub const OFFICIAL_MAX_GROUP: usize = 8;

/// Converts the gathered official judge-model tensors to our checkpoint for a
/// model of `shape` trained with `budget` and `interval`, stamped [`StatsMode::Official`]. Every
/// missing or misshapen tensor is an error naming it and the expected shape.
pub fn convert_official(
    official: &OfficialTensors,
    shape: ModelShape,
    budget: usize,
    interval: usize,
) -> Result<ScorerCheckpoint, EvictError> {
    let config = ScorerConfig::new(shape, budget, interval).with_stats_mode(StatsMode::Official);
    let label = official.sources.join(", ");
    let bad = |why: String| EvictError::bad_checkpoint(label.as_str(), why);
    if shape.group_size > OFFICIAL_MAX_GROUP {
        return Err(bad(format!(
            "the model has {} query heads per KV head; the official feature code slices the GQA \
             axis to 8/16/32 heads and only builds its 8 * G features for G <= {OFFICIAL_MAX_GROUP}",
            shape.group_size
        )));
    }
    // Sizes (from the model's config.json) are bounded before anything is allocated for them.
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(bad(problems.join("; ")));
    }
    let found = &official.layers;
    if let Some((&l, _)) = found.iter().find(|(&l, _)| l >= shape.num_layers) {
        return Err(bad(format!(
            "judge_model tensors for layer {l}, the model has {} layers",
            shape.num_layers
        )));
    }
    if let Some(l) = (0..shape.num_layers).find(|l| !found.contains_key(l)) {
        return Err(bad(format!(
            "missing tensor layers.{l}...judge_model.fc1.weight (no judge_model tensors for layer {l} of {})",
            shape.num_layers
        )));
    }
    let (kv, h, i) = (shape.num_kv_heads, SCORER_HIDDEN, config.in_dim());
    let mut layers = Vec::with_capacity(shape.num_layers);
    for l in 0..shape.num_layers {
        let empty = OfficialLayer::default();
        let layer = found.get(&l).unwrap_or(&empty);
        let want: [(&str, Vec<usize>); 6] = [
            ("fc1.weight", vec![kv, i, h]),
            ("fc1.bias", vec![kv, h]),
            ("fc2.weight", vec![kv, h, 1]),
            ("fc2.bias", vec![kv, 1]),
            ("feature_norm.weight", vec![i]),
            ("feature_norm.bias", vec![i]),
        ];
        for (part, shape) in &want {
            match layer.tensors.get(*part) {
                None => {
                    return Err(bad(format!(
                        "missing tensor layers.{l}...judge_model.{part}"
                    )))
                }
                Some((have, _)) if have != shape => {
                    return Err(bad(format!(
                    "tensor layers.{l}...judge_model.{part} has shape {have:?}, expected {shape:?}"
                )))
                }
                Some(_) => {}
            }
        }
        let fc1 = &layer.tensors["fc1.weight"].1;
        let mut w1 = vec![0f32; kv * h * i];
        for k in 0..kv {
            for u in 0..h {
                for c in 0..i {
                    let oc = official_column(c, shape.head_dim, shape.group_size);
                    w1[(k * h + u) * i + c] = fc1[(k * i + oc) * h + u];
                }
            }
        }
        layers.push(LayerWeights {
            w1,
            b1: layer.tensors["fc1.bias"].1.clone(),
            w2: layer.tensors["fc2.weight"].1.clone(),
            b2: layer.tensors["fc2.bias"].1.clone(),
        });
    }
    ScorerCheckpoint::new(config, layers)
}

/// The official-layout tensors of `ck` under the prefix `model.layers.{l}.self_attn.judge_model.`
/// (feature_norm as the identity LayerNorm: weight 1, bias 0), the inverse of the converter.
pub fn export_official(ck: &ScorerCheckpoint) -> Vec<(String, OwnedTensor)> {
    let c = &ck.config;
    let (kv, h, i) = (c.num_kv_heads, SCORER_HIDDEN, c.in_dim());
    let mut out = Vec::new();
    for (l, w) in ck.layers.iter().enumerate() {
        let p = format!("model.layers.{l}.self_attn.judge_model.");
        let mut fc1 = vec![0f32; kv * i * h];
        for k in 0..kv {
            for u in 0..h {
                for col in 0..i {
                    let oc = official_column(col, c.head_dim, c.group_size);
                    fc1[(k * i + oc) * h + u] = w.w1[(k * h + u) * i + col];
                }
            }
        }
        out.push((
            format!("{p}fc1.weight"),
            OwnedTensor::f32(vec![kv, i, h], &fc1),
        ));
        out.push((format!("{p}fc1.bias"), OwnedTensor::f32(vec![kv, h], &w.b1)));
        out.push((
            format!("{p}fc2.weight"),
            OwnedTensor::f32(vec![kv, h, 1], &w.w2),
        ));
        out.push((format!("{p}fc2.bias"), OwnedTensor::f32(vec![kv, 1], &w.b2)));
        out.push((
            format!("{p}feature_norm.weight"),
            OwnedTensor::f32(vec![i], &vec![1.0; i]),
        ));
        out.push((
            format!("{p}feature_norm.bias"),
            OwnedTensor::f32(vec![i], &vec![0.0; i]),
        ));
    }
    out
}

/// Reads the attention shape from a Hugging Face `config.json` (`num_hidden_layers`,
/// `num_attention_heads`, `num_key_value_heads`, `head_dim` or `hidden_size / num_attention_heads`).
pub fn model_shape_from_hf_config(path: &Path) -> Result<ModelShape, EvictError> {
    model_shape_from_hf_json(&read_file(path)?, &path.display().to_string())
}

/// [`model_shape_from_hf_config`] of the file's bytes (`label` names it in errors). Other keys of
/// the model's config are the model's business and are not checked.
pub fn model_shape_from_hf_json(bytes: &[u8], label: &str) -> Result<ModelShape, EvictError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| EvictError::Json {
            path: label.to_string(),
            source,
        })?;
    let bad = |why: String| EvictError::bad_checkpoint(label, why);
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
    let layers = get("num_hidden_layers").ok_or_else(|| bad("no num_hidden_layers".into()))?;
    let heads = get("num_attention_heads").ok_or_else(|| bad("no num_attention_heads".into()))?;
    let kv = get("num_key_value_heads").unwrap_or(heads);
    let head_dim = match get("head_dim") {
        Some(d) => d,
        None => {
            get("hidden_size").ok_or_else(|| bad("no head_dim nor hidden_size".into()))?
                / heads.max(1)
        }
    };
    if kv == 0 || heads % kv != 0 {
        return Err(bad(format!(
            "{heads} attention heads is not a multiple of {kv} KV heads"
        )));
    }
    Ok(ModelShape {
        num_layers: layers,
        num_kv_heads: kv,
        group_size: heads / kv,
        head_dim,
    })
}

/// Converts the official checkpoint in a Hugging Face model directory (`config.json` plus every
/// `*.safetensors` shard, read in name order) for a scorer trained with `budget` and `interval`;
/// returns the checkpoint, the model shape and how many shards were read. The one loader the
/// command line and the bindings share.
pub fn convert_official_dir(
    model_dir: &Path,
    budget: usize,
    interval: usize,
) -> Result<(ScorerCheckpoint, ModelShape, usize), EvictError> {
    let shape = model_shape_from_hf_config(&model_dir.join("config.json"))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(model_dir)
        .map_err(|e| EvictError::io(model_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EvictError::bad_checkpoint(
            model_dir.display().to_string(),
            "no *.safetensors shards",
        ));
    }
    let mut official = OfficialTensors::default();
    for p in &files {
        official.add_shard(&p.display().to_string(), &read_file(p)?)?;
    }
    let ck = convert_official(&official, shape, budget, interval)?;
    Ok((ck, shape, files.len()))
}

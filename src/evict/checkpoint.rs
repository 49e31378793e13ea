//! Scorer-only checkpoints of the ForesightKV MLP: a JSON config naming the model shape the scorer
//! was trained for, and a safetensors file of f32 weights; loading validates everything and says
//! precisely what does not match.
//!
//! Directory layout: `config.json` ([`ScorerConfig`]) and `scorer.safetensors` with, per layer `l`,
//! `layers.{l}.w1` `[kv_heads, 16, in_dim]`, `layers.{l}.b1` `[kv_heads, 16]`, `layers.{l}.w2`
//! `[kv_heads, 16]`, `layers.{l}.b2` `[kv_heads]` (f32; f16/bf16 accepted on load), with
//! `in_dim = 2 * head_dim + 8 * group_size` and input features ordered as `kernels::scorer_mlp`
//! reads them: key, value, then statistics query head major (`g * 8 + k`).
//!
//! The config records which statistics the scorer was trained on: `stats_version` (the definition
//! of `kernels::window_stats`) and `stats_mode` (`paper`, our own trained scorers by default, or
//! `official`, stamped by `convert-scorer` on converted official checkpoints). A scorer fed
//! statistics of another mode sees inputs it was never trained on, so every consumer that states
//! the mode it computes refuses a mismatch ([`EvictError::StatsModeMismatch`]).

use super::tensors::{read_file, serialize, to_f32, write_file, OwnedTensor};
use super::EvictError;
use crate::kernels::scorer_mlp::scorer_in_dim;
use crate::kernels::{ScorerWeights, StatsMode, SCORER_HIDDEN};
use crate::limits;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Value of [`ScorerConfig::format`].
pub const SCORER_FORMAT: &str = "foresightkv-scorer";
/// Version of the statistics definition the scorer expects, as computed by `kernels::window_stats`:
/// 2 = windows over the last `L` queries (earlier queries of the first eviction folded into the
/// cumulative statistics only), the 0.9 decay applied once per eviction interval. (Version 1
/// decayed once per query and windowed the first eviction over every query; it is refused.)
pub const STATS_VERSION: u32 = 2;
/// File name of the config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "scorer.safetensors";

/// The model shape and eviction schedule a scorer was trained for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScorerConfig {
    /// Always [`SCORER_FORMAT`].
    pub format: String,
    /// Transformer layers (one MLP set per layer).
    pub num_layers: usize,
    /// KV heads per layer (one MLP per KV head).
    pub num_kv_heads: usize,
    /// Query heads per KV head (G).
    pub group_size: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Hidden width of the MLP (must be 16).
    pub hidden: usize,
    /// Budget B the scorer was trained with.
    pub budget: usize,
    /// Eviction interval L the scorer was trained with.
    pub interval: usize,
    /// Statistics definition version (must be [`STATS_VERSION`]).
    pub stats_version: u32,
    /// Which statistics the scorer was trained on (`paper` or `official`).
    pub stats_mode: StatsMode,
}

/// The attention shape of the model a scorer is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Transformer layers.
    pub num_layers: usize,
    /// KV heads per layer.
    pub num_kv_heads: usize,
    /// Query heads per KV head.
    pub group_size: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl ScorerConfig {
    /// A config for `shape` trained with budget `budget` and interval `interval` on the paper's
    /// statistics ([`StatsMode::Paper`]; see [`ScorerConfig::with_stats_mode`]).
    pub fn new(shape: ModelShape, budget: usize, interval: usize) -> Self {
        Self {
            format: SCORER_FORMAT.into(),
            num_layers: shape.num_layers,
            num_kv_heads: shape.num_kv_heads,
            group_size: shape.group_size,
            head_dim: shape.head_dim,
            hidden: SCORER_HIDDEN,
            budget,
            interval,
            stats_version: STATS_VERSION,
            stats_mode: StatsMode::Paper,
        }
    }

    /// The same config trained on statistics of `mode`.
    pub fn with_stats_mode(mut self, mode: StatsMode) -> Self {
        self.stats_mode = mode;
        self
    }

    /// The model shape this scorer fits.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            group_size: self.group_size,
            head_dim: self.head_dim,
        }
    }

    /// Input width of each MLP.
    pub fn in_dim(&self) -> usize {
        scorer_in_dim(self.head_dim as i64, self.group_size as i64)
    }

    /// Checks the config on its own: format, hidden width, statistics version, positive sizes.
    pub fn validate(&self) -> Vec<String> {
        let mut bad = Vec::new();
        if self.format != SCORER_FORMAT {
            bad.push(format!(
                "format is {:?}, expected {SCORER_FORMAT:?}",
                self.format
            ));
        }
        if self.hidden != SCORER_HIDDEN {
            bad.push(format!(
                "hidden is {}, this build supports {SCORER_HIDDEN}",
                self.hidden
            ));
        }
        if self.stats_version != STATS_VERSION {
            bad.push(format!(
                "stats_version is {}, this build computes version {STATS_VERSION}",
                self.stats_version
            ));
        }
        for (name, v) in [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("group_size", self.group_size),
            ("head_dim", self.head_dim),
            ("budget", self.budget),
            ("interval", self.interval),
        ] {
            if v == 0 {
                bad.push(format!("{name} is 0"));
            }
        }
        if self.interval > self.budget {
            bad.push(format!(
                "interval {} exceeds budget {}: the L newest entries are protected, so L <= B",
                self.interval, self.budget
            ));
        }
        if let Err(e) = self.weight_count() {
            bad.push(e.to_string());
        }
        bad
    }

    /// Number of f32 weights of the whole scorer (`num_layers * num_kv_heads * (16 * in_dim + 33)`),
    /// checked against this machine's memory before anything is allocated.
    pub fn weight_count(&self) -> Result<usize, limits::LimitError> {
        let what = format!(
            "the scorer weights of num_layers {} x num_kv_heads {} (group_size {}, head_dim {})",
            self.num_layers, self.num_kv_heads, self.group_size, self.head_dim
        );
        let in_dim = 2 * self.head_dim as u128 + 8 * self.group_size as u128;
        let per_head = SCORER_HIDDEN as u128 * in_dim + 2 * SCORER_HIDDEN as u128 + 1;
        let per_head = usize::try_from(per_head).unwrap_or(usize::MAX);
        limits::check_elems(&what, &[self.num_layers, self.num_kv_heads, per_head], 4)
    }

    /// Every difference between this config's model shape and `model`, one message each.
    pub fn mismatches(&self, model: &ModelShape) -> Vec<String> {
        let mut bad = Vec::new();
        for (name, have, want) in [
            ("num_layers", self.num_layers, model.num_layers),
            ("num_kv_heads", self.num_kv_heads, model.num_kv_heads),
            (
                "group_size (query heads per KV head)",
                self.group_size,
                model.group_size,
            ),
            ("head_dim", self.head_dim, model.head_dim),
        ] {
            if have != want {
                bad.push(format!("{name}: checkpoint {have}, model {want}"));
            }
        }
        bad
    }
}

/// One layer's scorer weights, f32, in the layout `kernels::scorer_mlp` reads.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// `[kv_heads, 16, in_dim]`.
    pub w1: Vec<f32>,
    /// `[kv_heads, 16]`.
    pub b1: Vec<f32>,
    /// `[kv_heads, 16]`.
    pub w2: Vec<f32>,
    /// `[kv_heads]`.
    pub b2: Vec<f32>,
}

impl LayerWeights {
    /// Borrowed view of KV head `kh`'s MLP as one-head kernel weights.
    pub fn head(&self, kh: usize, in_dim: usize) -> ScorerWeights<'_> {
        let h = SCORER_HIDDEN;
        ScorerWeights {
            w1: &self.w1[kh * h * in_dim..(kh + 1) * h * in_dim],
            b1: &self.b1[kh * h..(kh + 1) * h],
            w2: &self.w2[kh * h..(kh + 1) * h],
            b2: &self.b2[kh..kh + 1],
        }
    }
}

/// A loaded, validated scorer checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ScorerCheckpoint {
    /// What it was trained for.
    pub config: ScorerConfig,
    /// One entry per layer.
    pub layers: Vec<LayerWeights>,
}

/// Expected shapes of layer `l`'s four tensors.
fn layer_shapes(c: &ScorerConfig, l: usize) -> [(String, Vec<usize>); 4] {
    let (h, k) = (SCORER_HIDDEN, c.num_kv_heads);
    [
        (format!("layers.{l}.w1"), vec![k, h, c.in_dim()]),
        (format!("layers.{l}.b1"), vec![k, h]),
        (format!("layers.{l}.w2"), vec![k, h]),
        (format!("layers.{l}.b2"), vec![k]),
    ]
}

impl ScorerCheckpoint {
    /// Builds and validates a checkpoint from a config and per-layer weights.
    pub fn new(config: ScorerConfig, layers: Vec<LayerWeights>) -> Result<Self, EvictError> {
        let bad = config.validate();
        if !bad.is_empty() {
            return Err(EvictError::bad_checkpoint("<memory>", bad.join("; ")));
        }
        if layers.len() != config.num_layers {
            return Err(EvictError::bad_checkpoint(
                "<memory>",
                format!(
                    "{} layers of weights, config says {}",
                    layers.len(),
                    config.num_layers
                ),
            ));
        }
        for (l, w) in layers.iter().enumerate() {
            let [(n1, s1), (n2, s2), (n3, s3), (n4, s4)] = layer_shapes(&config, l);
            for (name, shape, have) in [
                (n1, s1, w.w1.len()),
                (n2, s2, w.b1.len()),
                (n3, s3, w.w2.len()),
                (n4, s4, w.b2.len()),
            ] {
                let want: usize = shape.iter().product();
                if have != want {
                    return Err(EvictError::bad_checkpoint(
                        "<memory>",
                        format!("{name} has {have} floats, shape {shape:?} needs {want}"),
                    ));
                }
            }
            for (name, values) in [("w1", &w.w1), ("b1", &w.b1), ("w2", &w.w2), ("b2", &w.b2)] {
                if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                    return Err(EvictError::bad_checkpoint(
                        "<memory>",
                        format!("layers.{l}.{name} has a non-finite value at flat index {i}"),
                    ));
                }
            }
        }
        Ok(Self { config, layers })
    }

    /// Parses a checkpoint from its config JSON and safetensors bytes (`label` names it in errors).
    pub fn from_bytes(config_json: &[u8], weights: &[u8], label: &str) -> Result<Self, EvictError> {
        let config: ScorerConfig = serde_json::from_slice(config_json).map_err(|source| {
            if crate::config_keys::is_unknown_field(&source) {
                EvictError::bad_checkpoint(
                    format!("{label} ({CONFIG_FILE})"),
                    crate::config_keys::explain(&source),
                )
            } else {
                EvictError::Json {
                    path: label.to_string(),
                    source,
                }
            }
        })?;
        let bad = config.validate();
        if !bad.is_empty() {
            return Err(EvictError::bad_checkpoint(label, bad.join("; ")));
        }
        let st = safetensors::SafeTensors::deserialize(weights).map_err(|source| {
            EvictError::SafeTensors {
                path: label.to_string(),
                source,
            }
        })?;
        let bad = |why: String| EvictError::bad_checkpoint(label, why);
        // Every weight takes at least 2 bytes (f16/bf16): a config claiming more than the file
        // holds is refused before anything is allocated for it.
        let floats = config.weight_count().map_err(|e| bad(e.to_string()))?;
        if floats as u128 * 2 > weights.len() as u128 {
            return Err(bad(format!(
                "config.json describes {floats} weights but {WEIGHTS_FILE} has only {} bytes",
                weights.len()
            )));
        }
        let mut layers =
            limits::try_vec(&format!("{} layers", config.num_layers), config.num_layers)
                .map_err(|e| bad(e.to_string()))?;
        let mut used = 0usize;
        for l in 0..config.num_layers {
            let mut got: Vec<Vec<f32>> = Vec::with_capacity(4);
            for (name, shape) in layer_shapes(&config, l) {
                let view = st
                    .tensor(&name)
                    .map_err(|_| bad(format!("missing tensor {name}")))?;
                if view.shape() != shape.as_slice() {
                    return Err(bad(format!(
                        "tensor {name} has shape {:?}, expected {shape:?}",
                        view.shape()
                    )));
                }
                let values = to_f32(&view).ok_or_else(|| {
                    bad(format!(
                        "tensor {name} has dtype {:?}, expected F32, F16 or BF16",
                        view.dtype()
                    ))
                })?;
                if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                    return Err(bad(format!(
                        "tensor {name} has a non-finite value at flat index {i}"
                    )));
                }
                got.push(values);
                used += 1;
            }
            let b2 = got.pop().unwrap_or_default();
            let w2 = got.pop().unwrap_or_default();
            let b1 = got.pop().unwrap_or_default();
            let w1 = got.pop().unwrap_or_default();
            layers.push(LayerWeights { w1, b1, w2, b2 });
        }
        if st.len() != used {
            let mut extra: Vec<&str> = st
                .names()
                .into_iter()
                .filter(|n| {
                    !(0..config.num_layers)
                        .any(|l| layer_shapes(&config, l).iter().any(|(e, _)| e == n))
                })
                .collect();
            extra.sort_unstable();
            return Err(bad(format!(
                "unexpected tensors {extra:?} (config says {} layers)",
                config.num_layers
            )));
        }
        Ok(Self { config, layers })
    }

    /// Loads `dir/config.json` and `dir/scorer.safetensors`.
    pub fn load(dir: &Path) -> Result<Self, EvictError> {
        let config = read_file(&dir.join(CONFIG_FILE))?;
        let weights = read_file(&dir.join(WEIGHTS_FILE))?;
        Self::from_bytes(&config, &weights, &dir.display().to_string())
    }

    /// Loads a checkpoint and checks it fits `model`; every mismatch is listed in the error.
    pub fn load_for(dir: &Path, model: &ModelShape) -> Result<Self, EvictError> {
        let ck = Self::load(dir)?;
        ck.check_model(model)?;
        Ok(ck)
    }

    /// Loads a checkpoint and checks it was trained on statistics of `mode` (the mode the caller
    /// computes); a mismatch is [`EvictError::StatsModeMismatch`] naming both.
    pub fn load_with_mode(dir: &Path, mode: StatsMode) -> Result<Self, EvictError> {
        let ck = Self::load(dir)?;
        ck.check_stats_mode(mode)?;
        Ok(ck)
    }

    /// Checks the checkpoint was trained on statistics of `mode`.
    pub fn check_stats_mode(&self, mode: StatsMode) -> Result<(), EvictError> {
        if self.config.stats_mode == mode {
            Ok(())
        } else {
            Err(EvictError::StatsModeMismatch {
                checkpoint: self.config.stats_mode,
                computed: mode,
            })
        }
    }

    /// Checks the checkpoint fits `model`.
    pub fn check_model(&self, model: &ModelShape) -> Result<(), EvictError> {
        let bad = self.config.mismatches(model);
        if bad.is_empty() {
            Ok(())
        } else {
            Err(EvictError::CheckpointMismatch(bad))
        }
    }

    /// The config JSON and safetensors bytes of this checkpoint.
    pub fn to_bytes(&self) -> Result<(Vec<u8>, Vec<u8>), EvictError> {
        let json = serde_json::to_vec_pretty(&self.config).map_err(|source| EvictError::Json {
            path: "<memory>".into(),
            source,
        })?;
        let mut tensors = Vec::with_capacity(4 * self.layers.len());
        for (l, w) in self.layers.iter().enumerate() {
            let shapes = layer_shapes(&self.config, l);
            for ((name, shape), values) in shapes.into_iter().zip([&w.w1, &w.b1, &w.w2, &w.b2]) {
                tensors.push((name, OwnedTensor::f32(shape, values)));
            }
        }
        Ok((json, serialize(&tensors, "<memory>")?))
    }

    /// Writes `dir/config.json` and `dir/scorer.safetensors` (creating `dir`).
    pub fn save(&self, dir: &Path) -> Result<(), EvictError> {
        std::fs::create_dir_all(dir).map_err(|e| EvictError::io(dir, e))?;
        let (json, weights) = self.to_bytes()?;
        write_file(&dir.join(CONFIG_FILE), &json)?;
        write_file(&dir.join(WEIGHTS_FILE), &weights)
    }

    /// A checkpoint with weights drawn from a seeded normal(0, std) (tests and demos only: an
    /// untrained scorer).
    pub fn random(config: ScorerConfig, seed: u64, std: f32) -> Result<Self, EvictError> {
        use rand::SeedableRng;
        let bad = config.validate();
        if !bad.is_empty() {
            return Err(EvictError::bad_checkpoint("<memory>", bad.join("; ")));
        }
        // Box-Muller draws reach |z| <= sqrt(-2 ln 1e-7) < 5.7: every weight stays finite.
        if !(std.is_finite() && std >= 0.0 && (std * 6.0).is_finite()) {
            return Err(EvictError::InvalidArgument {
                name: "std",
                why: format!(
                    "std = {std} must be finite, non-negative and at most {:e} (f32 weights)",
                    f32::MAX / 6.0
                ),
            });
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |n: usize| normals(&mut rng, n, std);
        let (h, k, i) = (SCORER_HIDDEN, config.num_kv_heads, config.in_dim());
        let layers = (0..config.num_layers)
            .map(|_| LayerWeights {
                w1: normal(k * h * i),
                b1: normal(k * h),
                w2: normal(k * h),
                b2: normal(k),
            })
            .collect();
        Self::new(config, layers)
    }
}

/// `n` draws of N(0, std^2) by Box-Muller (`u1` clamped to 1e-7, so |z| < 5.7 std), the weights of
/// [`ScorerCheckpoint::random`].
pub fn normals(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    use rand::RngExt;
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

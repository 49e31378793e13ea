//! Attention traces: per-layer queries, keys and values of one generation (full cache, RoPE applied),
//! read from and written to safetensors, and a synthetic generator with structured attention
//! (attention sinks, local windows, facts recalled far later) for tests and model-free demos.
//!
//! File layout: per layer `l`, `layers.{l}.queries` `[T, q_heads, head_dim]`, `layers.{l}.keys` and
//! `layers.{l}.values` `[T, kv_heads, head_dim]`, f32, f16 or bf16. The raw file is held in memory
//! and one layer at a time is converted to f32.

use super::tensors::{read_file, serialize, supported, to_f32, write_file, OwnedTensor};
use super::EvictError;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Dimensions of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceShape {
    /// Layers.
    pub num_layers: usize,
    /// Query heads per layer.
    pub num_q_heads: usize,
    /// KV heads per layer.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens (T).
    pub len: usize,
}

impl TraceShape {
    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_q_heads / self.num_kv_heads.max(1)
    }

    /// Attention softmax scale, 1/sqrt(head_dim).
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// One layer of a trace, f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTrace {
    /// `[T, q_heads, head_dim]`.
    pub queries: Vec<f32>,
    /// `[T, kv_heads, head_dim]`.
    pub keys: Vec<f32>,
    /// `[T, kv_heads, head_dim]`.
    pub values: Vec<f32>,
}

impl LayerTrace {
    /// Key row of token `t`, KV head `kh`.
    pub fn key(&self, s: &TraceShape, t: usize, kh: usize) -> &[f32] {
        let o = (t * s.num_kv_heads + kh) * s.head_dim;
        &self.keys[o..o + s.head_dim]
    }

    /// Value row of token `t`, KV head `kh`.
    pub fn value(&self, s: &TraceShape, t: usize, kh: usize) -> &[f32] {
        let o = (t * s.num_kv_heads + kh) * s.head_dim;
        &self.values[o..o + s.head_dim]
    }

    /// Query row of token `t`, query head `h`.
    pub fn query(&self, s: &TraceShape, t: usize, h: usize) -> &[f32] {
        let o = (t * s.num_q_heads + h) * s.head_dim;
        &self.queries[o..o + s.head_dim]
    }

    /// `[T, head_dim]` keys of KV head `kh`, contiguous.
    pub fn head_keys(&self, s: &TraceShape, kh: usize) -> Vec<f32> {
        (0..s.len)
            .flat_map(|t| self.key(s, t, kh).iter().copied())
            .collect()
    }
}

/// Where a trace's layers come from.
#[derive(Debug, Clone)]
enum Source {
    /// Already f32 in memory.
    Memory(Vec<LayerTrace>),
    /// A safetensors file's bytes.
    File { bytes: Vec<u8>, path: String },
}

/// A validated trace.
#[derive(Debug, Clone)]
pub struct Trace {
    shape: TraceShape,
    source: Source,
}

/// Tensor names of layer `l`.
fn names(l: usize) -> [String; 3] {
    [
        format!("layers.{l}.queries"),
        format!("layers.{l}.keys"),
        format!("layers.{l}.values"),
    ]
}

impl Trace {
    /// A trace from f32 layers, checked against `shape`.
    pub fn from_layers(shape: TraceShape, layers: Vec<LayerTrace>) -> Result<Self, EvictError> {
        check_shape(&shape, "<memory>")?;
        let bad = |why: String| EvictError::BadTrace {
            path: "<memory>".into(),
            why,
        };
        if layers.len() != shape.num_layers {
            return Err(bad(format!(
                "{} layers, shape says {}",
                layers.len(),
                shape.num_layers
            )));
        }
        let (t, d) = (shape.len, shape.head_dim);
        for (l, lt) in layers.iter().enumerate() {
            for (what, have, want) in [
                ("queries", lt.queries.len(), t * shape.num_q_heads * d),
                ("keys", lt.keys.len(), t * shape.num_kv_heads * d),
                ("values", lt.values.len(), t * shape.num_kv_heads * d),
            ] {
                if have != want {
                    return Err(bad(format!(
                        "layer {l} {what} has {have} floats, expected {want}"
                    )));
                }
            }
        }
        Ok(Self {
            shape,
            source: Source::Memory(layers),
        })
    }

    /// Parses a trace from safetensors bytes, checking every layer's tensors exist with
    /// consistent shapes (`label` names it in errors).
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<Self, EvictError> {
        let shape = {
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|source| {
                EvictError::SafeTensors {
                    path: label.to_string(),
                    source,
                }
            })?;
            let bad = |why: String| EvictError::BadTrace {
                path: label.to_string(),
                why,
            };
            let mut num_layers = 0;
            while st.tensor(&names(num_layers)[0]).is_ok() {
                num_layers += 1;
            }
            if num_layers == 0 {
                return Err(bad("no tensor layers.0.queries".into()));
            }
            let q0 = st
                .tensor(&names(0)[0])
                .map_err(|_| bad("missing layers.0.queries".into()))?;
            let k0 = st
                .tensor(&names(0)[1])
                .map_err(|_| bad("missing layers.0.keys".into()))?;
            let (qs, ks) = (q0.shape(), k0.shape());
            if qs.len() != 3 || ks.len() != 3 {
                return Err(bad(format!(
                    "layers.0 queries {qs:?} / keys {ks:?} are not [T, heads, head_dim]"
                )));
            }
            let shape = TraceShape {
                num_layers,
                num_q_heads: qs[1],
                num_kv_heads: ks[1],
                head_dim: qs[2],
                len: qs[0],
            };
            check_shape(&shape, label)?;
            for l in 0..num_layers {
                let want = [
                    [shape.len, shape.num_q_heads, shape.head_dim],
                    [shape.len, shape.num_kv_heads, shape.head_dim],
                    [shape.len, shape.num_kv_heads, shape.head_dim],
                ];
                for (name, w) in names(l).iter().zip(want) {
                    let v = st
                        .tensor(name)
                        .map_err(|_| bad(format!("missing tensor {name}")))?;
                    if v.shape() != w {
                        return Err(bad(format!(
                            "tensor {name} has shape {:?}, expected {w:?}",
                            v.shape()
                        )));
                    }
                    if !supported(v.dtype()) {
                        return Err(bad(format!(
                            "tensor {name} has dtype {:?}, expected F32, F16 or BF16",
                            v.dtype()
                        )));
                    }
                }
            }
            shape
        };
        Ok(Self {
            shape,
            source: Source::File {
                bytes,
                path: label.to_string(),
            },
        })
    }

    /// Reads a trace file.
    pub fn load(path: &Path) -> Result<Self, EvictError> {
        Self::from_bytes(read_file(path)?, &path.display().to_string())
    }

    /// The trace's dimensions.
    pub fn shape(&self) -> TraceShape {
        self.shape
    }

    /// Layer `l` as f32 (converted from the file on each call).
    pub fn layer(&self, l: usize) -> Result<LayerTrace, EvictError> {
        if l >= self.shape.num_layers {
            return Err(EvictError::arg(
                "layer",
                format!("{l} but the trace has {} layers", self.shape.num_layers),
            ));
        }
        match &self.source {
            Source::Memory(layers) => Ok(layers[l].clone()),
            Source::File { bytes, path } => {
                let st = safetensors::SafeTensors::deserialize(bytes).map_err(|source| {
                    EvictError::SafeTensors {
                        path: path.clone(),
                        source,
                    }
                })?;
                let mut out = Vec::with_capacity(3);
                for name in names(l) {
                    let v = st.tensor(&name).map_err(|source| EvictError::SafeTensors {
                        path: path.clone(),
                        source,
                    })?;
                    out.push(to_f32(&v).ok_or_else(|| EvictError::BadTrace {
                        path: path.clone(),
                        why: format!("tensor {name} has an unsupported dtype"),
                    })?);
                }
                let values = out.pop().unwrap_or_default();
                let keys = out.pop().unwrap_or_default();
                let queries = out.pop().unwrap_or_default();
                Ok(LayerTrace {
                    queries,
                    keys,
                    values,
                })
            }
        }
    }

    /// Serializes the trace as f32 safetensors.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EvictError> {
        let s = self.shape;
        let mut tensors = Vec::with_capacity(3 * s.num_layers);
        for l in 0..s.num_layers {
            let lt = self.layer(l)?;
            let [qn, kn, vn] = names(l);
            tensors.push((
                qn,
                OwnedTensor::f32(vec![s.len, s.num_q_heads, s.head_dim], &lt.queries),
            ));
            tensors.push((
                kn,
                OwnedTensor::f32(vec![s.len, s.num_kv_heads, s.head_dim], &lt.keys),
            ));
            tensors.push((
                vn,
                OwnedTensor::f32(vec![s.len, s.num_kv_heads, s.head_dim], &lt.values),
            ));
        }
        serialize(&tensors, "<trace>")
    }

    /// Writes the trace to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), EvictError> {
        write_file(path, &self.to_bytes()?)
    }
}

/// Checks sizes are positive and query heads are a multiple of KV heads.
fn check_shape(s: &TraceShape, label: &str) -> Result<(), EvictError> {
    let bad = |why: String| EvictError::BadTrace {
        path: label.to_string(),
        why,
    };
    if s.num_layers == 0
        || s.num_q_heads == 0
        || s.num_kv_heads == 0
        || s.head_dim == 0
        || s.len == 0
    {
        return Err(bad(format!("empty dimension in {s:?}")));
    }
    if !s.num_q_heads.is_multiple_of(s.num_kv_heads) {
        return Err(bad(format!(
            "{} query heads is not a multiple of {} KV heads",
            s.num_q_heads, s.num_kv_heads
        )));
    }
    if s.len > u32::MAX as usize / 2 {
        return Err(bad(format!("{} tokens is too long", s.len)));
    }
    // One layer converted to f32 must fit in memory (queries, keys and values of every token).
    let heads = s
        .num_q_heads
        .saturating_add(s.num_kv_heads.saturating_mul(2));
    crate::limits::check_elems(
        "one layer of the trace as f32",
        &[s.len, heads, s.head_dim],
        4,
    )
    .map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// Parameters of the synthetic trace generator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SyntheticConfig {
    /// Dimensions of the generated trace.
    pub shape: TraceShape,
    /// Seed of the generator.
    pub seed: u64,
    /// Leading tokens whose keys align with a direction every query shares (attention sinks).
    pub sinks: usize,
    /// Recent tokens each query leans toward (local window), with weights decaying 0.75 per step.
    pub local_window: usize,
    /// Probability that a token is a "fact" that may be recalled later.
    pub fact_rate: f32,
    /// Probability per token of starting a recall burst of an earlier fact.
    pub recall_rate: f32,
    /// Consecutive queries a recall burst lasts.
    pub burst: usize,
}

impl SyntheticConfig {
    /// Default structure for `shape` and `seed`: 4 sinks, window 16, 3% facts, bursts of 8.
    pub fn new(shape: TraceShape, seed: u64) -> Self {
        Self {
            shape,
            seed,
            sinks: 4,
            local_window: 16,
            fact_rate: 0.03,
            recall_rate: 0.04,
            burst: 8,
        }
    }
}

/// Standard normal sample (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-7);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Generates a structured trace. Keys and values are standard normal, sink keys share one
/// direction `u_s`; each query of a KV head's group is
/// `8 u_s + sum_{r=1..w} 5 * 0.75^(r-1) u_{t-r} + 9 u_f` plus standard normal noise (per query head), where `u` are unit key directions and
/// `u_f` is present during a recall burst of a uniformly chosen earlier fact (older than the local
/// window). Logits `q . k / sqrt(d)` are then about 8 on sinks, 5 on the previous token, 9 on a
/// recalled fact, and standard normal elsewhere, whatever the head dimension.
pub fn synthetic_trace(cfg: &SyntheticConfig) -> Result<Trace, EvictError> {
    let s = cfg.shape;
    check_shape(&s, "<synthetic>")?;
    if !(0.0..=1.0).contains(&cfg.fact_rate) || !(0.0..=1.0).contains(&cfg.recall_rate) {
        return Err(EvictError::arg(
            "synthetic",
            "fact_rate and recall_rate must be probabilities",
        ));
    }
    let (d, g) = (s.head_dim, s.group_size());
    let sd = (d as f32).sqrt();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut layers = Vec::with_capacity(s.num_layers);
    for _ in 0..s.num_layers {
        let mut lt = LayerTrace {
            queries: vec![0.0; s.len * s.num_q_heads * d],
            keys: vec![0.0; s.len * s.num_kv_heads * d],
            values: vec![0.0; s.len * s.num_kv_heads * d],
        };
        for kh in 0..s.num_kv_heads {
            let mut sink: Vec<f32> = (0..d).map(|_| normal(&mut rng)).collect();
            let norm = sink.iter().map(|x| x * x).sum::<f32>().sqrt();
            sink.iter_mut().for_each(|x| *x /= norm);
            let mut units: Vec<Vec<f32>> = Vec::with_capacity(s.len);
            let mut facts: Vec<usize> = Vec::new();
            let (mut recall, mut left) = (0usize, 0usize);
            for t in 0..s.len {
                let o = (t * s.num_kv_heads + kh) * d;
                let mut k: Vec<f32> = (0..d).map(|_| normal(&mut rng)).collect();
                if t < cfg.sinks {
                    k.iter_mut()
                        .zip(&sink)
                        .for_each(|(x, u)| *x = 0.2 * *x + sd * u);
                }
                let kn = k.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
                units.push(k.iter().map(|x| x / kn).collect());
                lt.keys[o..o + d].copy_from_slice(&k);
                for x in &mut lt.values[o..o + d] {
                    *x = normal(&mut rng);
                }
                if t >= cfg.sinks && rng.random::<f32>() < cfg.fact_rate {
                    facts.push(t);
                }
                if left == 0 && rng.random::<f32>() < cfg.recall_rate {
                    let old: Vec<usize> = facts
                        .iter()
                        .copied()
                        .filter(|&f| f + cfg.local_window < t)
                        .collect();
                    if !old.is_empty() {
                        recall = old[(rng.random::<f32>() * old.len() as f32) as usize % old.len()];
                        left = cfg.burst;
                    }
                }
                let mut base: Vec<f32> = sink.iter().map(|u| 8.0 * u).collect();
                let mut w = 5.0f32;
                for r in 1..=cfg.local_window.min(t) {
                    base.iter_mut()
                        .zip(&units[t - r])
                        .for_each(|(b, u)| *b += w * u);
                    w *= 0.75;
                }
                if left > 0 {
                    base.iter_mut()
                        .zip(&units[recall])
                        .for_each(|(b, u)| *b += 9.0 * u);
                    left -= 1;
                }
                for gi in 0..g {
                    let h = kh * g + gi;
                    let qo = (t * s.num_q_heads + h) * d;
                    for (x, b) in lt.queries[qo..qo + d].iter_mut().zip(&base) {
                        *x = b + normal(&mut rng);
                    }
                }
            }
        }
        layers.push(lt);
    }
    Trace::from_layers(s, layers)
}

//! Eviction policies, scorer checkpoints, attention traces and Golden Eviction for Python: every
//! policy of the core behind one `Policy` class, checkpoints loaded and validated in Rust, and the
//! long replays run with the GIL released.

use crate::args::{self, opt_float, py_fn};
use crate::errors::{detached, error, evict_error, Kind};
use crate::tensor::{ElemType, Raw, Tensor};
use foresightkv::evict::convert;
use foresightkv::evict::tensors::{serialize, write_file};
use foresightkv::evict::{
    self, choose_victims, EvictError, EvictionPolicy, EvictionView, ForesightPolicy, ModelShape,
    SampleKey, Schedule, ScorerCheckpoint, ScorerConfig, SimOptions, SyntheticConfig, Trace,
    TraceShape, VictimMode,
};
use foresightkv::kernels::{NUM_STATS, SCORER_HIDDEN};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use std::sync::Arc;

fn json_to_py<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value)
        .map_err(|e| error(Kind::Format, format!("cannot serialise: {e}")))?;
    py.import("json")?.call_method1("loads", (text,))
}

fn path_arg(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    obj.extract::<PathBuf>().map_err(|_| {
        error(
            Kind::ArgumentType,
            format!(
                "{name} must be a str or os.PathLike, got {}",
                args::type_name(obj)
            ),
        )
    })
}

fn f32_array<'py>(py: Python<'py>, values: &[f32]) -> PyResult<Bound<'py, PyAny>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let arr = py.import("array")?.getattr("array")?.call1(("f",))?;
    arr.call_method1("frombytes", (pyo3::types::PyBytes::new(py, &bytes),))?;
    Ok(arr)
}

/// A validated ForesightKV scorer checkpoint (config.json + scorer.safetensors).
#[pyclass(module = "foresightkv", name = "ScorerCheckpoint", frozen)]
pub struct PyScorerCheckpoint {
    inner: Arc<ScorerCheckpoint>,
}

#[pymethods]
impl PyScorerCheckpoint {
    /// Loads and validates `dir/config.json` and `dir/scorer.safetensors`; with `stats_mode`
    /// (`"paper"` / `"official"`, the mode the caller computes statistics in) a checkpoint trained
    /// on the other mode is refused (ConfigError naming both).
    #[staticmethod]
    #[pyo3(signature = (path, stats_mode = None))]
    fn load(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        stats_mode: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let dir = path_arg("path", path)?;
        let mode = match stats_mode.filter(|m| !m.is_none()) {
            Some(m) => Some(args::stats_mode("stats_mode", Some(m))?),
            None => None,
        };
        let ck = detached(py, "ScorerCheckpoint.load", evict_error, || match mode {
            Some(m) => ScorerCheckpoint::load_with_mode(&dir, m),
            None => ScorerCheckpoint::load(&dir),
        })?;
        Ok(Self {
            inner: Arc::new(ck),
        })
    }

    /// An untrained checkpoint with seeded normal(0, std) weights (tests and demos), recorded as
    /// trained on `stats_mode` statistics (default `"paper"`).
    #[staticmethod]
    #[pyo3(signature = (num_layers, num_kv_heads, group_size, head_dim, budget, interval, *, seed = None, std = None, stats_mode = None))]
    #[allow(clippy::too_many_arguments)]
    fn random(
        num_layers: &Bound<'_, PyAny>,
        num_kv_heads: &Bound<'_, PyAny>,
        group_size: &Bound<'_, PyAny>,
        head_dim: &Bound<'_, PyAny>,
        budget: &Bound<'_, PyAny>,
        interval: &Bound<'_, PyAny>,
        seed: Option<&Bound<'_, PyAny>>,
        std: Option<&Bound<'_, PyAny>>,
        stats_mode: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let shape = ModelShape {
            num_layers: bounded("num_layers", num_layers, 1 << 16)?,
            num_kv_heads: bounded("num_kv_heads", num_kv_heads, 1 << 16)?,
            group_size: bounded("group_size", group_size, 1 << 12)?,
            head_dim: bounded("head_dim", head_dim, 1 << 12)?,
        };
        let budget = args::size("budget", budget)?;
        let interval = args::size("interval", interval)?;
        let seed = args::opt_or("seed", seed, 0, args::seq_id)?;
        let std = opt_float("std", std)?.unwrap_or(0.1) as f32;
        let mode = args::stats_mode("stats_mode", stats_mode)?;
        let config = ScorerConfig::new(shape, budget, interval).with_stats_mode(mode);
        let ck = ScorerCheckpoint::random(config, seed, std)
            .map_err(|e| evict_error("ScorerCheckpoint.random", e))?;
        Ok(Self {
            inner: Arc::new(ck),
        })
    }

    /// Converts the official ForesightKV layout (the judge-model tensors in a Hugging Face model
    /// directory: `config.json` plus `*.safetensors` shards) for a scorer trained with `budget`
    /// and `interval`.
    #[staticmethod]
    fn from_official(
        py: Python<'_>,
        model_dir: &Bound<'_, PyAny>,
        budget: &Bound<'_, PyAny>,
        interval: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        const F: &str = "ScorerCheckpoint.from_official";
        let dir = path_arg("model_dir", model_dir)?;
        let budget = args::size("budget", budget)?;
        let interval = args::size("interval", interval)?;
        let (ck, _, _) = detached(py, F, evict_error, move || {
            convert::convert_official_dir(&dir, budget, interval)
        })?;
        Ok(Self {
            inner: Arc::new(ck),
        })
    }

    /// Writes the checkpoint in the official ForesightKV layout (judge-model tensors under
    /// `model.layers.{l}.self_attn.judge_model.`) as one safetensors file.
    fn save_official(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let p = path_arg("path", path)?;
        let ck = self.inner.clone();
        detached(
            py,
            "ScorerCheckpoint.save_official",
            evict_error,
            move || {
                let bytes = serialize(&convert::export_official(&ck), &p.display().to_string())?;
                write_file(&p, &bytes)
            },
        )
    }

    /// Writes `dir/config.json` and `dir/scorer.safetensors` (creating `dir`).
    fn save(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let dir = path_arg("path", path)?;
        let ck = self.inner.clone();
        detached(py, "ScorerCheckpoint.save", evict_error, move || {
            ck.save(&dir)
        })
    }

    /// The config (model shape, budget, interval, format and statistics version) as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.inner.config)
    }

    /// The statistics mode the scorer was trained on: `"paper"` or `"official"` (converted official
    /// checkpoints); compute the statistics in this mode (`window_stats(..., mode=...)`).
    #[getter]
    fn stats_mode(&self) -> &'static str {
        self.inner.config.stats_mode.name()
    }

    /// Input width of each MLP: `2 * head_dim + 8 * group_size`.
    #[getter]
    fn in_dim(&self) -> usize {
        self.inner.config.in_dim()
    }

    /// Raises ConfigError listing every difference from the model shape given.
    fn check_model(
        &self,
        num_layers: &Bound<'_, PyAny>,
        num_kv_heads: &Bound<'_, PyAny>,
        group_size: &Bound<'_, PyAny>,
        head_dim: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let model = ModelShape {
            num_layers: args::size("num_layers", num_layers)?,
            num_kv_heads: args::size("num_kv_heads", num_kv_heads)?,
            group_size: args::size("group_size", group_size)?,
            head_dim: args::size("head_dim", head_dim)?,
        };
        self.inner
            .check_model(&model)
            .map_err(|e| evict_error("check_model", e))
    }

    /// Layer `layer`'s weights as float32 buffers (`array.array('f')`) with their shapes:
    /// `{"w1": (shape, buf), "b1": ..., "w2": ..., "b2": ...}`, in the layout `scorer_mlp` reads.
    fn layer_weights<'py>(
        &self,
        py: Python<'py>,
        layer: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let l = args::size("layer", layer)?;
        let c = &self.inner.config;
        let w = self.inner.layers.get(l).ok_or_else(|| {
            error(
                Kind::InvalidArgument,
                format!(
                    "layer = {l} is out of range: the checkpoint has {} layers",
                    c.num_layers
                ),
            )
        })?;
        let (k, h) = (c.num_kv_heads, SCORER_HIDDEN);
        let out = PyDict::new(py);
        out.set_item("w1", (vec![k, h, c.in_dim()], f32_array(py, &w.w1)?))?;
        out.set_item("b1", (vec![k, h], f32_array(py, &w.b1)?))?;
        out.set_item("w2", (vec![k, h], f32_array(py, &w.w2)?))?;
        out.set_item("b2", (vec![k], f32_array(py, &w.b2)?))?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        let c = &self.inner.config;
        format!(
            "ScorerCheckpoint(num_layers={}, num_kv_heads={}, group_size={}, head_dim={}, budget={}, interval={}, stats_mode={:?})",
            c.num_layers, c.num_kv_heads, c.group_size, c.head_dim, c.budget, c.interval, c.stats_mode.name()
        )
    }
}

fn bounded(name: &str, obj: &Bound<'_, PyAny>, max: usize) -> PyResult<usize> {
    let v = args::size(name, obj)?;
    if v == 0 || v > max {
        return Err(error(
            Kind::InvalidArgument,
            format!("{name} = {v} is out of range: must be in [1, {max}]"),
        ));
    }
    Ok(v)
}

/// An eviction policy: ForesightKV's learned scorer or a baseline, scoring the live entries of one
/// (layer, KV head) and choosing victims outside the newest protected ones.
#[pyclass(module = "foresightkv", name = "Policy", frozen)]
pub struct PyPolicy {
    inner: Arc<dyn EvictionPolicy>,
    /// The policy's parameters as constructed (defaults filled in), for `Policy.params`.
    params: serde_json::Value,
}

impl PyPolicy {
    fn new(p: impl EvictionPolicy + 'static, params: serde_json::Value) -> Self {
        Self {
            inner: Arc::new(p),
            params,
        }
    }

    /// Runs `f` with this policy over the view `v` without the GIL; its error names `func`.
    fn over_view<T: Send>(
        &self,
        py: Python<'_>,
        func: &str,
        v: &View<'_>,
        f: impl FnOnce(&dyn EvictionPolicy, &EvictionView<'_>) -> Result<T, EvictError> + Send,
    ) -> PyResult<T> {
        let (raws, meta, policy) = (v.raws(), &v.meta, self.inner.clone());
        detached(py, func, evict_error, || {
            // SAFETY: host float32 contiguous tensors (checked), alive for this call, only read.
            unsafe { with_view(meta, raws, |view| f(policy.as_ref(), view)) }
        })
    }
}

/// The float32 tensors of one eviction view, validated, and its plain-data description.
struct View<'py> {
    tensors: Vec<Tensor<'py>>,
    meta: ViewMeta,
}

/// Everything of a view but its tensors (sendable into code running without the GIL).
struct ViewMeta {
    positions: Vec<u32>,
    head_dim: usize,
    group_size: usize,
    seq_len: usize,
    key: SampleKey,
    scale: f32,
}

impl<'py> View<'py> {
    #[allow(clippy::too_many_arguments)]
    fn extract(
        keys: &Bound<'py, PyAny>,
        values: &Bound<'py, PyAny>,
        stats: &Bound<'py, PyAny>,
        queries: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
        seq_len: &Bound<'py, PyAny>,
        ids: [Option<&Bound<'py, PyAny>>; 4],
        scale: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Self> {
        let k = Tensor::extract("keys", keys)?;
        let v = Tensor::extract("values", values)?;
        let s = Tensor::extract("stats", stats)?;
        let q = Tensor::extract("queries", queries)?;
        for t in [&k, &v, &s, &q] {
            t.expect_cpu()?;
            t.expect_dtype(&[ElemType::F32])?;
            t.expect_contiguous()?;
        }
        k.expect_ndim(2)?;
        let (n, d) = (k.shape[0], k.shape[1]);
        v.expect_shape(&[n, d], "[live, head_dim] like keys")?;
        q.expect_ndim(3)?;
        q.expect_dim(2, d, "head_dim of keys")?;
        let g = q.shape[1];
        s.expect_shape(&[n, g, NUM_STATS as i64], "[live, group_size, 8]")?;
        let positions = args::tokens("positions", positions)?;
        if positions.len() as i64 != n {
            return Err(error(
                Kind::Shape,
                format!(
                    "positions has {} entries for {n} live entries",
                    positions.len()
                ),
            ));
        }
        if let Some(i) = (1..positions.len()).find(|&i| positions[i] <= positions[i - 1]) {
            return Err(error(
                Kind::InvalidArgument,
                format!(
                    "positions must be strictly ascending: positions[{i}] = {} after {}",
                    positions[i],
                    positions[i - 1]
                ),
            ));
        }
        let seq_len = args::size("seq_len", seq_len)?;
        let names = ["layer", "kv_head", "eviction", "request"];
        let mut vals = [0u32; 4];
        for ((slot, name), obj) in vals.iter_mut().zip(names).zip(ids) {
            if let Some(o) = obj {
                *slot = args::id32(name, o)?;
            }
        }
        if let Some(p) = positions.last() {
            if *p as usize >= seq_len {
                return Err(error(
                    Kind::InvalidArgument,
                    format!("positions reach {p} but seq_len = {seq_len}"),
                ));
            }
        }
        let scale = opt_float("scale", scale)?
            .map(|x| x as f32)
            .unwrap_or(1.0 / (d.max(1) as f32).sqrt());
        let key = SampleKey {
            seed: 0,
            request: vals[3],
            layer: vals[0],
            head: vals[1],
            eviction: vals[2],
        };
        let meta = ViewMeta {
            positions,
            head_dim: d as usize,
            group_size: g as usize,
            seq_len,
            key,
            scale,
        };
        Ok(Self {
            tensors: vec![k, v, s, q],
            meta,
        })
    }

    fn raws(&self) -> [Raw; 4] {
        [
            self.tensors[0].raw(),
            self.tensors[1].raw(),
            self.tensors[2].raw(),
            self.tensors[3].raw(),
        ]
    }
}

/// Runs `f` over the core view of `raws` (keys, values, stats, queries) without the GIL.
///
/// # Safety
/// `raws` must be alive, host, float32 buffers not written concurrently.
unsafe fn with_view<T>(v: &ViewMeta, raws: [Raw; 4], f: impl FnOnce(&EvictionView<'_>) -> T) -> T {
    let view = EvictionView {
        key: v.key,
        head_dim: v.head_dim,
        group_size: v.group_size,
        scale: v.scale,
        seq_len: v.seq_len,
        keys: raws[0].slice(),
        values: raws[1].slice(),
        stats: raws[2].slice(),
        queries: raws[3].slice(),
        positions: &v.positions,
    };
    f(&view)
}

#[pymethods]
impl PyPolicy {
    /// The statistics mode the policy's scores need: `"paper"` / `"official"` for a scorer (its
    /// checkpoint's), None for the baselines (any mode; pass it as `window_stats(..., mode=...)`).
    #[getter]
    fn stats_mode(&self) -> Option<&'static str> {
        self.inner.stats_mode().map(|m| m.name())
    }

    /// The full cache: never evicts.
    #[staticmethod]
    fn full_cache() -> Self {
        Self::new(evict::FullCache, serde_json::json!({}))
    }

    /// StreamingLLM: keep `sinks` attention sinks and the most recent entries.
    #[staticmethod]
    #[pyo3(signature = (sinks = None))]
    fn streaming_llm(sinks: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let sinks = args::opt_or("sinks", sinks, 4, args::id32)?;
        Ok(Self::new(
            evict::StreamingLlm { sinks },
            serde_json::json!({ "sinks": sinks }),
        ))
    }

    /// H2O: evict the lowest cumulative attention.
    #[staticmethod]
    fn h2o() -> Self {
        Self::new(evict::H2o, serde_json::json!({}))
    }

    /// SnapKV (as the R-KV code runs it): evict the lowest attention of the last 8 queries (max
    /// over the GQA group's logits, softmax, mean), max-pooled with an odd `kernel`.
    #[staticmethod]
    #[pyo3(signature = (kernel = None))]
    fn snapkv(kernel: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let p = evict::SnapKv {
            kernel: odd_kernel(kernel)?,
            ..Default::default()
        };
        let params = serde_json::json!({ "kernel": p.kernel, "window": p.window });
        Ok(Self::new(p, params))
    }

    /// TOVA: evict what the last query attends to least (averaged over the GQA group).
    #[staticmethod]
    fn tova() -> Self {
        Self::new(evict::Tova, serde_json::json!({}))
    }

    /// R-KV (its official normalisation): importance of the last 8 queries mixed with key
    /// redundancy (`lam` weighs importance).
    #[staticmethod]
    #[pyo3(signature = (lam = None, kernel = None))]
    fn rkv(lam: Option<&Bound<'_, PyAny>>, kernel: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let lambda = opt_float("lam", lam)?.unwrap_or(0.1) as f32;
        if !(0.0..=1.0).contains(&lambda) {
            return Err(error(
                Kind::InvalidArgument,
                format!("lam = {lambda} must be in [0, 1]"),
            ));
        }
        let p = evict::Rkv {
            lambda,
            kernel: odd_kernel(kernel)?,
            ..Default::default()
        };
        let params = serde_json::json!({
            "lam": p.lambda,
            "kernel": p.kernel,
            "window": p.window,
            "threshold": p.threshold,
        });
        Ok(Self::new(p, params))
    }

    /// Uniformly random victims, reproducible from `seed`.
    #[staticmethod]
    #[pyo3(signature = (seed = None))]
    fn random(seed: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let seed = args::opt_or("seed", seed, 0, args::seq_id)?;
        Ok(Self::new(
            evict::RandomEviction { seed },
            serde_json::json!({ "seed": seed }),
        ))
    }

    /// ForesightKV: the checkpoint's MLP scores; victims sampled as in the paper (top 2L, then L by
    /// softmax with Philox noise from `seed`), or the deterministic top L when `sample` is False.
    #[staticmethod]
    #[pyo3(signature = (checkpoint, *, sample = None, seed = None, temperature = None))]
    fn foresight(
        checkpoint: &Bound<'_, PyAny>,
        sample: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
        temperature: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let ck = checkpoint.cast::<PyScorerCheckpoint>().map_err(|_| {
            error(
                Kind::ArgumentType,
                format!(
                    "checkpoint must be a ScorerCheckpoint, got {}",
                    args::type_name(checkpoint)
                ),
            )
        })?;
        let sample = args::opt_or("sample", sample, true, args::flag)?;
        let seed = args::opt_or("seed", seed, 0, args::seq_id)?;
        let temperature = opt_float("temperature", temperature)?.unwrap_or(1.0) as f32;
        if temperature <= 0.0 || !temperature.is_finite() {
            return Err(error(
                Kind::InvalidArgument,
                format!("temperature = {temperature} must be positive"),
            ));
        }
        let mode = if sample {
            VictimMode::Sample { seed, temperature }
        } else {
            VictimMode::TopL
        };
        Ok(Self::new(
            ForesightPolicy::new(ck.get().inner.clone(), mode),
            serde_json::json!({ "sample": sample, "seed": seed, "temperature": temperature }),
        ))
    }

    /// Short name, as on the command line and in tables.
    #[getter]
    fn name(&self) -> String {
        self.inner.name()
    }

    /// Whether the policy evicts at all (False only for the full cache).
    #[getter]
    fn evicts(&self) -> bool {
        self.inner.evicts()
    }

    /// The parameters the policy runs with, defaults filled in (a dict: `sinks`; `kernel`,
    /// `window`; `lam`, `threshold`; `seed`; `sample`, `temperature`), so that a batched
    /// implementation of its scores reads them from the core rather than repeating them.
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.params)
    }

    /// Eviction scores (higher = evicted first) of the live entries of one (layer, KV head).
    ///
    /// `keys`, `values`: float32 `[live, head_dim]`; `stats`: float32 `[live, group_size, 8]`;
    /// `queries`: float32 `[m, group_size, head_dim]` since the last eviction (oldest first);
    /// `positions`: original positions of the live entries, ascending; `seq_len`: tokens so far.
    #[pyo3(signature = (keys, values, stats, queries, positions, seq_len, *, layer = None, kv_head = None, eviction = None, request = None, scale = None))]
    #[allow(clippy::too_many_arguments)]
    fn score<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        values: &Bound<'py, PyAny>,
        stats: &Bound<'py, PyAny>,
        queries: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
        seq_len: &Bound<'py, PyAny>,
        layer: Option<&Bound<'py, PyAny>>,
        kv_head: Option<&Bound<'py, PyAny>>,
        eviction: Option<&Bound<'py, PyAny>>,
        request: Option<&Bound<'py, PyAny>>,
        scale: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let v = View::extract(
            keys,
            values,
            stats,
            queries,
            positions,
            seq_len,
            [layer, kv_head, eviction, request],
            scale,
        )?;
        let n = v.meta.positions.len();
        let scores = self.over_view(py, "Policy.score", &v, |policy, view| {
            view.validate()?;
            let mut scores = vec![0f32; n];
            policy.score(view, &mut scores).map(|_| scores)
        })?;
        PyList::new(py, scores)
    }

    /// Victims (live slot indices, ascending) of one (layer, KV head): `num_evict` entries outside
    /// the newest `num_protected`, chosen by this policy's scores and victim mode.
    #[pyo3(signature = (keys, values, stats, queries, positions, seq_len, *, num_protected, num_evict, layer = None, kv_head = None, eviction = None, request = None, scale = None))]
    #[allow(clippy::too_many_arguments)]
    fn choose_victims<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        values: &Bound<'py, PyAny>,
        stats: &Bound<'py, PyAny>,
        queries: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
        seq_len: &Bound<'py, PyAny>,
        num_protected: &Bound<'py, PyAny>,
        num_evict: &Bound<'py, PyAny>,
        layer: Option<&Bound<'py, PyAny>>,
        kv_head: Option<&Bound<'py, PyAny>>,
        eviction: Option<&Bound<'py, PyAny>>,
        request: Option<&Bound<'py, PyAny>>,
        scale: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<usize>> {
        let v = View::extract(
            keys,
            values,
            stats,
            queries,
            positions,
            seq_len,
            [layer, kv_head, eviction, request],
            scale,
        )?;
        let num_protected = args::size("num_protected", num_protected)?;
        let num_evict = args::size("num_evict", num_evict)?;
        self.over_view(py, "Policy.choose_victims", &v, |policy, view| {
            choose_victims(policy, view, num_protected, num_evict)
        })
    }

    fn __repr__(&self) -> String {
        format!("Policy({})", self.inner.name())
    }
}

fn odd_kernel(kernel: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
    let k = args::opt_or("kernel", kernel, 7, args::size)?;
    if k % 2 == 0 || k > 1 << 16 {
        return Err(error(
            Kind::InvalidArgument,
            format!("kernel = {k} must be odd and at most 65536"),
        ));
    }
    Ok(k)
}

/// A recorded (or synthetic) attention trace: per layer, the queries, keys and values of every token.
#[pyclass(module = "foresightkv", name = "Trace", frozen)]
pub struct PyTrace {
    inner: Arc<Trace>,
}

#[pymethods]
impl PyTrace {
    /// Loads a trace file (safetensors, as written by `save` or the recorder).
    #[staticmethod]
    fn load(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<Self> {
        let p = path_arg("path", path)?;
        let t = detached(py, "Trace.load", evict_error, || Trace::load(&p))?;
        Ok(Self { inner: Arc::new(t) })
    }

    /// A structured synthetic trace (attention sinks, a local window, recalled facts), seeded.
    #[staticmethod]
    #[pyo3(signature = (num_layers, num_q_heads, num_kv_heads, head_dim, length, *, seed = None))]
    fn synthetic(
        py: Python<'_>,
        num_layers: &Bound<'_, PyAny>,
        num_q_heads: &Bound<'_, PyAny>,
        num_kv_heads: &Bound<'_, PyAny>,
        head_dim: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let shape = TraceShape {
            num_layers: bounded("num_layers", num_layers, 1 << 10)?,
            num_q_heads: bounded("num_q_heads", num_q_heads, 1 << 10)?,
            num_kv_heads: bounded("num_kv_heads", num_kv_heads, 1 << 10)?,
            head_dim: bounded("head_dim", head_dim, 1 << 12)?,
            len: bounded("length", length, 1 << 20)?,
        };
        let elems = shape.num_layers as u128
            * shape.len as u128
            * (shape.num_q_heads + 2 * shape.num_kv_heads) as u128
            * shape.head_dim as u128;
        if elems > 1 << 31 {
            return Err(error(
                Kind::InvalidArgument,
                format!("a synthetic trace of {elems} floats is too large (limit 2^31)"),
            ));
        }
        let seed = args::opt_or("seed", seed, 0, args::seq_id)?;
        let cfg = SyntheticConfig::new(shape, seed);
        let t = detached(py, "Trace.synthetic", evict_error, || {
            evict::synthetic_trace(&cfg)
        })?;
        Ok(Self { inner: Arc::new(t) })
    }

    /// Writes the trace as safetensors.
    fn save(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let p = path_arg("path", path)?;
        let t = self.inner.clone();
        detached(py, "Trace.save", evict_error, move || t.save(&p))
    }

    /// Dimensions: num_layers, num_q_heads, num_kv_heads, head_dim, len.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.inner.shape())
    }

    fn __repr__(&self) -> String {
        let s = self.inner.shape();
        format!(
            "Trace(num_layers={}, num_q_heads={}, num_kv_heads={}, head_dim={}, len={})",
            s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim, s.len
        )
    }
}

fn trace_arg(obj: &Bound<'_, PyAny>) -> PyResult<Arc<Trace>> {
    obj.cast::<PyTrace>()
        .map(|t| t.get().inner.clone())
        .map_err(|_| {
            error(
                Kind::ArgumentType,
                format!("trace must be a Trace, got {}", args::type_name(obj)),
            )
        })
}

fn schedule_arg(
    budget: &Bound<'_, PyAny>,
    interval: &Bound<'_, PyAny>,
    prompt_len: Option<&Bound<'_, PyAny>>,
) -> PyResult<Schedule> {
    let s = Schedule {
        budget: args::size("budget", budget)?,
        interval: args::size("interval", interval)?,
        prompt_len: args::opt_or("prompt_len", prompt_len, 0, args::size)?,
    };
    s.validate().map_err(|e| evict_error("schedule", e))?;
    Ok(s)
}

py_fn! {
    /// Replays `trace` through `policy` with budget and interval; returns the fidelity (attention mass
    /// kept, relative output error, queries, evictions) and, with `record`, every eviction.
    /// `stats_mode` (`"paper"` / `"official"`) is the statistics definition computed; None = the
    /// policy's scorer's mode (paper for the baselines); a scorer of another mode is a ConfigError.
    #[pyfunction]
    #[pyo3(signature = (trace, policy, budget, interval, *, request = None, record = None, prompt_len = None, stats_mode = None))]
    pub fn simulate(
        py;
        trace, policy, budget, interval, request?, record?, prompt_len?, stats_mode?,
    ) -> PyResult<Bound<'py, PyAny>> {
        let t = trace_arg(trace)?;
        let p = policy
            .cast::<PyPolicy>()
            .map(|p| p.get().inner.clone())
            .map_err(|_| {
                error(
                    Kind::ArgumentType,
                    format!("policy must be a Policy, got {}", args::type_name(policy)),
                )
            })?;
        let schedule = schedule_arg(budget, interval, prompt_len)?;
        let request = args::opt_or("request", request, 0, args::id32)?;
        let record = args::opt_or("record", record, false, args::flag)?;
        let stats_mode = match stats_mode.filter(|m| !m.is_none()) {
            Some(m) => args::stats_mode("stats_mode", Some(m))?,
            None => p.stats_mode().unwrap_or_default(),
        };
        let opts = SimOptions {
            schedule,
            request,
            record,
            stats_mode,
        };
        let result = detached(py, F, evict_error, || evict::simulate(&t, p.as_ref(), &opts))?;
        sim_to_py(py, &result)
    }
}

py_fn! {
    /// ForesightKV's victim draw of one (layer, KV head) with its pool and order: the top
    /// `min(2 num_evict, unprotected)` slots of `scores` (the newest `num_protected` excluded), then
    /// `num_evict` of them by Gumbel top-k with the Philox key (seed, request, layer, head, eviction),
    /// exactly the draw of `Policy.foresight(sample=True)`. Returns `(pool ascending, victims in draw
    /// order)`, the draw order being that of a sequential softmax without replacement.
    #[pyfunction]
    #[pyo3(signature = (scores, *, num_protected, num_evict, seed = None, request = None, layer = None, head = None, eviction = None, temperature = None))]
    pub fn sample_victims(
        py;
        scores: Vec<f32>, num_protected, num_evict, seed?, request?, layer?, head?, eviction?,
        temperature?,
    ) -> PyResult<(Vec<usize>, Vec<usize>)> {
        let num_protected = args::size("num_protected", num_protected)?;
        let num_evict = args::size("num_evict", num_evict)?;
        let seed = args::opt_or("seed", seed, 0, args::seq_id)?;
        let mut ids = [0u32; 4];
        for (slot, (name, obj)) in ids.iter_mut().zip([
            ("request", request),
            ("layer", layer),
            ("head", head),
            ("eviction", eviction),
        ]) {
            if let Some(o) = obj {
                *slot = args::id32(name, o)?;
            }
        }
        if let Some(i) = scores.iter().position(|x| !x.is_finite()) {
            return Err(error(
                Kind::InvalidArgument,
                format!("scores[{i}] = {} is not finite", scores[i]),
            ));
        }
        let temperature = opt_float("temperature", temperature)?.unwrap_or(1.0) as f32;
        let req = evict::VictimRequest {
            num_protected,
            num_evict,
            key: SampleKey {
                seed,
                request: ids[0],
                layer: ids[1],
                head: ids[2],
                eviction: ids[3],
            },
        };
        let drawn = detached(py, F, evict_error, || {
            evict::sample_victims(&scores, &req, seed, temperature)
        })?;
        Ok((drawn.pool, drawn.victims))
    }
}

fn sim_to_py<'py>(py: Python<'py>, r: &evict::SimResult) -> PyResult<Bound<'py, PyAny>> {
    let out = json_to_py(py, r)?;
    let fid = out.get_item("fidelity")?;
    fid.set_item("mass", r.fidelity.mass())?;
    fid.set_item("rel_err", r.fidelity.rel_err())?;
    Ok(out)
}

py_fn! {
    /// Golden Eviction (the offline teacher) of a whole trace: the fidelity and the record of every
    /// greedy eviction (candidates' positions and scores, victims) of every (layer, KV head).
    #[pyfunction]
    #[pyo3(signature = (trace, budget, interval, *, prompt_len = None))]
    pub fn golden_eviction(
        py;
        trace, budget, interval, prompt_len?,
    ) -> PyResult<Bound<'py, PyAny>> {
        let t = trace_arg(trace)?;
        let schedule = schedule_arg(budget, interval, prompt_len)?;
        let (_, result) = detached(py, F, evict_error, || evict::golden_eviction(&t, schedule))?;
        sim_to_py(py, &result)
    }
}

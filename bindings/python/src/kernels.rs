//! The kernels as Python functions over tensors. This file only extracts: every tensor is checked
//! (type, dtype, device, shape, strides, aliasing) and turned into the layout and [`Buf`]s of its
//! op in `foresightkv::ops`, which validates the call once and runs the CPU reference for host
//! tensors or the CUDA launcher on PyTorch's current stream for CUDA ones, with the GIL released.
//! Errors become `foresightkv.Error` subclasses naming the function and the offending value.

use crate::args::{self, py_fn};
use crate::errors::{cuda_error, detached, error, op_error, Kind};
use crate::tensor::{
    check_outputs, kv_relation, same_device, torch_stream, Device, ElemType, KvRelation, Tensor,
    FLOATS,
};
use foresightkv::cuda::CudaError;
use foresightkv::kernels::{
    CacheWriteLayout, DecodeArgs, PagedKvLayout, SampleArgs, SelectArgs, StatsLayout,
    WindowStatsArgs, NUM_STATS, SCORER_HIDDEN,
};
use foresightkv::ops::{self, scorer_mlp::ScorerBufs, Buf, Cache, Place};
use foresightkv::DType;
use pyo3::prelude::*;

/// Where the tensors of a call live: every tensor on one device; for CUDA, the kernels must be
/// compiled in, and the call goes to PyTorch's current stream of that device.
fn place(py: Python<'_>, func: &str, tensors: &[&Tensor<'_>]) -> PyResult<Place> {
    match same_device(tensors)? {
        Device::Cpu => Ok(Place::Host),
        Device::Cuda(ordinal) => {
            match foresightkv::cuda::embedded_fatbin() {
                Ok(_) => {}
                Err(e @ (CudaError::KernelsNotCompiled | CudaError::FeatureDisabled)) => {
                    let t = tensors[0];
                    return Err(error(
                        Kind::Device,
                        format!("{func}: {} is a CUDA tensor ({}) but {e}", t.name, t.device),
                    ));
                }
                Err(e) => return Err(cuda_error(func, e)),
            }
            Ok(Place::Cuda {
                ordinal,
                stream: torch_stream(py, ordinal)?,
            })
        }
    }
}

/// Where a call runs ([`place`]) once its written tensors pass [`check_outputs`] against `all`
/// (`fused`: the K/V pair allowed to interleave): the checks every kernel makes before its op.
fn launch_place(
    py: Python<'_>,
    func: &str,
    all: &[&Tensor<'_>],
    outputs: &[&Tensor<'_>],
    fused: Option<(&Tensor<'_>, &Tensor<'_>)>,
) -> PyResult<Place> {
    let at = place(py, func, all)?;
    check_outputs(outputs, all, fused)?;
    Ok(at)
}

/// A tensor's memory as an op takes it.
fn buf(t: &Tensor<'_>) -> Buf {
    Buf::new(t.ptr as u64, t.extent)
}

/// The cache element type of a float tensor.
fn cache_dtype(t: &Tensor<'_>) -> PyResult<DType> {
    t.dtype.cache_dtype().ok_or_else(|| {
        error(
            Kind::DType,
            format!("{} has dtype {}, not a cache dtype", t.name, t.dtype_name),
        )
    })
}

/// The values of an int32 vector on the host: read in place, or copied from the device with
/// `.cpu()` (which waits for the device): the host copies an op validates before a launch.
fn host_i32(t: &Tensor<'_>) -> PyResult<Vec<i32>> {
    if t.device == Device::Cpu {
        // SAFETY: host int32 1-D tensor (checked by the caller).
        return Ok(unsafe { t.read_strided::<i32>() });
    }
    let cpu = t.obj.call_method0("cpu")?;
    let h = Tensor::extract(&t.name, &cpu)?;
    // SAFETY: `.cpu()` of an int32 1-D tensor is a host int32 1-D tensor.
    Ok(unsafe { h.read_strided::<i32>() })
}

/// The host values of the int32 vector `t`: from `mirror` when the caller passes one (a CPU int32
/// `[n]` tensor it keeps equal to `t`: no device read, no synchronisation), else [`host_i32`]. The
/// ops bound their reads by these values, so a mirror must equal its array: checked when `t` is on
/// the host too (free there); for a device array it is the caller's contract (the engine step's
/// mirrors are the same plan rows it copies to the device).
fn host_or_mirror(t: &Tensor<'_>, mirror: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<i32>> {
    match mirror.filter(|m| !m.is_none()) {
        Some(m) => {
            let name = format!("{}_host", t.name);
            let h = int32_vector(&name, m, t.shape[0], "the entries of its device array")?;
            h.expect_cpu()?;
            // SAFETY: host int32 1-D tensor (checked above).
            let values = unsafe { h.read_strided::<i32>() };
            if t.device == Device::Cpu {
                // SAFETY: host int32 1-D tensor (checked by the caller).
                let actual = unsafe { t.read_strided::<i32>() };
                if let Some(i) = (0..values.len()).find(|&i| values[i] != actual[i]) {
                    return Err(error(
                        Kind::InvalidArgument,
                        format!(
                            "{name}[{i}] is {} but {}[{i}] is {}: a host mirror must equal its array",
                            values[i], t.name, actual[i]
                        ),
                    ));
                }
            }
            Ok(values)
        }
        None => host_i32(t),
    }
}

/// A float32 workspace of `len` elements at `place`, from PyTorch's allocator (none on the host or
/// when `len` is 0); the tensor is returned so the caller keeps it alive over the call.
fn workspace<'py>(
    py: Python<'py>,
    place: Place,
    len: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, Buf)> {
    let Place::Cuda { ordinal, .. } = place else {
        return Ok((None, Buf::default()));
    };
    if len == 0 {
        return Ok((None, Buf::default()));
    }
    let torch = py.import("torch")?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("dtype", torch.getattr("float32")?)?;
    kwargs.set_item("device", format!("cuda:{ordinal}"))?;
    let t = torch.call_method("empty", (len,), Some(&kwargs))?;
    let ptr: u64 = t.call_method0("data_ptr")?.extract()?;
    Ok((Some(t), Buf::new(ptr, len)))
}

/// Extracts one paged cache `[num_blocks, block_size, num_kv_heads, head_dim]` (any strides,
/// head_dim contiguous) of a float dtype.
fn cache_tensor<'py>(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Tensor<'py>> {
    let t = Tensor::extract(name, obj)?;
    t.expect_dtype(FLOATS)?;
    t.expect_ndim(4)?;
    t.expect_inner_contiguous(1)?;
    Ok(t)
}

/// Extracts a K/V cache pair (see [`cache_tensor`]) of one dtype and shape: separate tensors or the
/// K and V views of one fused `[..., 2 * head_dim]` tensor, the same contract for every kernel
/// ([`kv_relation`]; anything else sharing memory is refused).
fn cache_pair<'py>(
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
) -> PyResult<(Tensor<'py>, Tensor<'py>, PagedKvLayout, KvRelation)> {
    let k = cache_tensor("key_cache", key)?;
    let v = cache_tensor("value_cache", value)?;
    v.expect_same_dtype(&k)?;
    v.expect_shape(&k.shape, "the shape of key_cache")?;
    let relation = kv_relation(&k, &v, k.shape[3])?;
    let layout = paged_layout(&k, &v);
    Ok((k, v, layout, relation))
}

/// The layout of the paged caches `k` and `v` (checked by [`cache_tensor`], of one shape).
fn paged_layout(k: &Tensor<'_>, v: &Tensor<'_>) -> PagedKvLayout {
    PagedKvLayout {
        num_blocks: k.shape[0],
        block_size: k.shape[1],
        num_kv_heads: k.shape[2],
        head_dim: k.shape[3],
        key_strides: [k.stride(0), k.stride(1), k.stride(2)],
        value_strides: [v.stride(0), v.stride(1), v.stride(2)],
    }
}

/// The pair [`check_outputs`] lets interleave: the K/V views of a fused cache.
fn fused_pair<'a, 'py>(
    k: &'a Tensor<'py>,
    v: &'a Tensor<'py>,
    relation: KvRelation,
) -> Option<(&'a Tensor<'py>, &'a Tensor<'py>)> {
    (relation == KvRelation::Fused).then_some((k, v))
}

/// The op view of a cache pair; `relation` (from [`kv_relation`], the one K/V contract) says
/// whether the op may take the two views as one fused K|V tensor.
fn cache(k: &Tensor<'_>, v: &Tensor<'_>, relation: KvRelation) -> Cache {
    Cache {
        key: buf(k),
        value: buf(v),
        fused: relation == KvRelation::Fused,
    }
}

/// An int32 vector `[n]`, contiguous.
fn int32_vector<'py>(
    name: &str,
    obj: &Bound<'py, PyAny>,
    n: i64,
    what: &str,
) -> PyResult<Tensor<'py>> {
    let t = Tensor::extract(name, obj)?;
    t.expect_dtype(&[ElemType::I32])?;
    t.expect_ndim(1)?;
    t.expect_contiguous()?;
    t.expect_dim(0, n, what)?;
    Ok(t)
}

/// Block tables `[num_seqs, width]` (optional), `seq_lens` and `live_starts` `[num_seqs]`, int32,
/// contiguous.
struct Windows<'py> {
    block_tables: Option<Tensor<'py>>,
    seq_lens: Tensor<'py>,
    live_starts: Tensor<'py>,
}

impl<'py> Windows<'py> {
    fn extract(
        block_tables: Option<&Bound<'py, PyAny>>,
        seq_lens: &Bound<'py, PyAny>,
        live_starts: &Bound<'py, PyAny>,
        num_seqs: i64,
    ) -> PyResult<Self> {
        let bt = block_tables
            .map(|obj| {
                let bt = Tensor::extract("block_tables", obj)?;
                bt.expect_dtype(&[ElemType::I32])?;
                bt.expect_ndim(2)?;
                bt.expect_contiguous()?;
                bt.expect_dim(0, num_seqs, "one row per sequence")?;
                Ok::<_, PyErr>(bt)
            })
            .transpose()?;
        let what = "one entry per sequence";
        Ok(Self {
            block_tables: bt,
            seq_lens: int32_vector("seq_lens", seq_lens, num_seqs, what)?,
            live_starts: int32_vector("live_starts", live_starts, num_seqs, what)?,
        })
    }

    fn tensors(&self) -> Vec<&Tensor<'py>> {
        let mut all: Vec<&Tensor<'py>> = self.block_tables.iter().collect();
        all.extend([&self.seq_lens, &self.live_starts]);
        all
    }

    /// The windows as plain numbers with their host copies, for the op: the copies the caller keeps
    /// (`seq_lens_host`, `live_starts_host`: CPU int32 tensors equal to the device arrays) where
    /// given, else read from the device arrays (which waits for the device).
    fn host_with(
        &self,
        seq_lens_host: Option<&Bound<'py, PyAny>>,
        live_starts_host: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<HostWindows> {
        let (bt, stride) = match &self.block_tables {
            Some(t) => (buf(t), t.shape[1]),
            None => (Buf::default(), 0),
        };
        Ok(HostWindows {
            block_tables: bt,
            stride,
            seq_lens: buf(&self.seq_lens),
            live_starts: buf(&self.live_starts),
            lens: host_or_mirror(&self.seq_lens, seq_lens_host)?,
            starts: host_or_mirror(&self.live_starts, live_starts_host)?,
        })
    }
}

/// [`Windows`] without the GIL: buffers plus host copies of the lengths.
struct HostWindows {
    block_tables: Buf,
    stride: i64,
    seq_lens: Buf,
    live_starts: Buf,
    lens: Vec<i32>,
    starts: Vec<i32>,
}

impl HostWindows {
    fn get(&self) -> ops::Windows<'_> {
        ops::Windows {
            block_tables: self.block_tables,
            block_table_stride: self.stride,
            seq_lens: self.seq_lens,
            live_starts: self.live_starts,
            seq_lens_host: &self.lens,
            live_starts_host: &self.starts,
        }
    }
}

/// A float32 statistics buffer `[num_blocks, block_size, num_kv_heads, group_size, 8]` whose last
/// two axes are contiguous.
fn stats_buffer<'py>(obj: &Bound<'py, PyAny>) -> PyResult<(Tensor<'py>, StatsLayout)> {
    let s = Tensor::extract("stats", obj)?;
    s.expect_dtype(&[ElemType::F32])?;
    s.expect_ndim(5)?;
    s.expect_dim(4, NUM_STATS as i64, "the 8 statistics")?;
    s.expect_inner_contiguous(2)?;
    let layout = StatsLayout {
        num_blocks: s.shape[0],
        block_size: s.shape[1],
        num_kv_heads: s.shape[2],
        group_size: s.shape[3],
        strides: [s.stride(0), s.stride(1), s.stride(2)],
    };
    Ok((s, layout))
}

/// A float32 per-slot matrix `[num_seqs, num_kv_heads, max_live]`, contiguous.
fn slot_matrix<'py>(name: &str, obj: &Bound<'py, PyAny>, dtype: ElemType) -> PyResult<Tensor<'py>> {
    let t = Tensor::extract(name, obj)?;
    t.expect_dtype(&[dtype])?;
    t.expect_ndim(3)?;
    t.expect_contiguous()?;
    Ok(t)
}

/// The softmax scale: the given one, or `1 / sqrt(head_dim)`.
fn scale_or_default(scale: Option<&Bound<'_, PyAny>>, head_dim: i64) -> PyResult<f32> {
    Ok(args::opt_float("scale", scale)?
        .map(|s| s as f32)
        .unwrap_or_else(|| 1.0 / (head_dim.max(1) as f32).sqrt()))
}

py_fn! {
    /// Writes each token's K/V rows into the cache slots `slot_mapping` names (negative = padding).
    ///
    /// `key`, `value`: `[num_tokens, num_kv_heads, head_dim]`; `key_cache`, `value_cache`:
    /// `[num_blocks, block_size, num_kv_heads, head_dim]` (any strides, head_dim contiguous, so a
    /// permuted view of vLLM's head-major cache works in place); `slot_mapping`: int64 `[num_tokens]`.
    /// CPU tensors run the reference; CUDA tensors launch on PyTorch's current stream.
    #[pyfunction]
    pub fn reshape_and_cache(py; key, value, key_cache, value_cache, slot_mapping) -> PyResult<()> {
        let k = Tensor::extract("key", key)?;
        let v = Tensor::extract("value", value)?;
        for t in [&k, &v] {
            t.expect_dtype(FLOATS)?;
            t.expect_ndim(3)?;
            t.expect_inner_contiguous(1)?;
        }
        v.expect_same_dtype(&k)?;
        v.expect_shape(&k.shape, "the shape of key")?;
        let (kc, vc, kv, relation) = cache_pair(key_cache, value_cache)?;
        kc.expect_same_dtype(&k)?;
        kc.expect_dim(2, k.shape[1], "num_kv_heads of key")?;
        kc.expect_dim(3, k.shape[2], "head_dim of key")?;
        let sm = Tensor::extract("slot_mapping", slot_mapping)?;
        sm.expect_dtype(&[ElemType::I64])?;
        sm.expect_ndim(1)?;
        sm.expect_contiguous()?;
        sm.expect_dim(0, k.shape[0], "one slot per token")?;
        let all = [&k, &v, &kc, &vc, &sm];
        let at = launch_place(py, F, &all, &[&kc, &vc], fused_pair(&kc, &vc, relation))?;
        let layout = CacheWriteLayout {
            cache: kv,
            num_tokens: k.shape[0],
            key_strides: [k.stride(0), k.stride(1)],
            value_strides: [v.stride(0), v.stride(1)],
        };
        let (dtype, c, kb, vb, sb) = (
            cache_dtype(&k)?,
            cache(&kc, &vc, relation),
            buf(&k),
            buf(&v),
            buf(&sm),
        );
        detached(py, F, op_error, move || {
            // SAFETY: every buffer is a tensor of `at` with the dtype and extent checked above,
            // kept alive by the caller's references; the caches overlap no input (check_outputs)
            // and each other only as the fused K|V layout (kv_relation), which the op takes as one
            // buffer; on CUDA the stream is PyTorch's current one, so its caching allocator orders
            // reuse after it.
            unsafe { ops::reshape_and_cache::reshape_and_cache(at, dtype, &layout, c, kb, vb, sb) }
        })
    }
}

py_fn! {
    /// Decode attention: each sequence's query (all heads) over its live window of the paged cache.
    ///
    /// `query`, `out`: `[num_seqs, num_q_heads, head_dim]`; caches as in `reshape_and_cache`;
    /// `block_tables`: int32 `[num_seqs, width]`; `seq_lens`, `live_starts`: int32 `[num_seqs]`;
    /// `seq_lens_host`, `live_starts_host`: optional CPU int32 copies the caller keeps equal to them
    /// (read instead of copying the device arrays to the host, which waits for the device).
    #[pyfunction]
    #[pyo3(signature = (query, key_cache, value_cache, block_tables, seq_lens, live_starts, out, scale = None, *, seq_lens_host = None, live_starts_host = None))]
    pub fn paged_attention_decode(
        py;
        query, key_cache, value_cache, block_tables, seq_lens, live_starts, out, scale?,
        seq_lens_host?, live_starts_host?,
    ) -> PyResult<()> {
        let q = Tensor::extract("query", query)?;
        q.expect_dtype(FLOATS)?;
        q.expect_ndim(3)?;
        q.expect_inner_contiguous(1)?;
        let (kc, vc, kv, relation) = cache_pair(key_cache, value_cache)?;
        kc.expect_same_dtype(&q)?;
        kc.expect_dim(3, q.shape[2], "head_dim of query")?;
        let w = Windows::extract(Some(block_tables), seq_lens, live_starts, q.shape[0])?;
        let o = Tensor::extract("out", out)?;
        o.expect_same_dtype(&q)?;
        o.expect_shape(&q.shape, "the shape of query")?;
        o.expect_inner_contiguous(1)?;
        let mut all = vec![&q, &kc, &vc, &o];
        all.extend(w.tensors());
        let at = launch_place(py, F, &all, &[&o], None)?;
        let args = DecodeArgs {
            num_q_heads: q.shape[1],
            query_strides: [q.stride(0), q.stride(1)],
            out_strides: [o.stride(0), o.stride(1)],
            scale: scale_or_default(scale, q.shape[2])?,
        };
        let hw = w.host_with(seq_lens_host, live_starts_host)?;
        let ws_len =
            ops::paged_attention_decode::workspace_len(at, &kv, args.num_q_heads, &hw.get())
                .map_err(|e| op_error(F, e))?;
        let (_ws_keep, ws) = workspace(py, at, ws_len)?;
        let (dtype, c, qb, ob) = (
            cache_dtype(&q)?,
            cache(&kc, &vc, relation),
            buf(&q),
            buf(&o),
        );
        detached(py, F, op_error, move || {
            // SAFETY: as in reshape_and_cache; the host copies of the windows were read from the
            // window tensors; `out` overlaps nothing; the workspace tensor lives until this
            // returns.
            unsafe {
                ops::paged_attention_decode::paged_attention_decode(
                    at,
                    dtype,
                    &kv,
                    c,
                    &hw.get(),
                    &args,
                    qb,
                    ob,
                    ws,
                )
            }
        })
    }
}

py_fn! {
    /// Updates the 8 ForesightKV statistics of every live entry from the queries since the last eviction.
    ///
    /// `queries`: `[num_seqs, max_queries, num_q_heads, head_dim]`; `num_queries`: int32 `[num_seqs]`;
    /// `stats`: float32 `[num_blocks, block_size, num_kv_heads, group_size, 8]` (written in place).
    /// `window`: the eviction interval L (the last `min(n, L)` rows are the statistics window, earlier
    /// rows are folded into the cumulative statistics; None or 0 = every row); `mode`: `"paper"`
    /// (default) or `"official"` (the official training features: sum8/16/32 = sum).
    ///
    /// Streaming fold (bounded query buffers): `folded` (int32 `[num_seqs]`, optional) counts the rows
    /// earlier `fold_only` calls took since each sequence's last eviction (their running fold, kept in
    /// the statistics' `sum` column, is continued); `fold_only=True` folds every row and writes only
    /// that running fold. `*_host`: optional CPU int32 copies of `seq_lens`, `live_starts`,
    /// `num_queries`, `folded` the caller keeps equal to them (no device read).
    #[pyfunction]
    #[pyo3(signature = (queries, num_queries, key_cache, block_tables, seq_lens, live_starts, stats, scale = None, window = None, mode = None, *, folded = None, fold_only = false, seq_lens_host = None, live_starts_host = None, num_queries_host = None, folded_host = None))]
    pub fn window_stats(
        py;
        queries, num_queries, key_cache, block_tables, seq_lens, live_starts, stats, scale?,
        window?, mode?, folded?, fold_only: bool, seq_lens_host?, live_starts_host?,
        num_queries_host?, folded_host?,
    ) -> PyResult<()> {
        let window = match window.filter(|w| !w.is_none()) {
            Some(w) => args::size("window", w)? as i64,
            None => 0,
        };
        let mode = args::stats_mode("mode", mode)?;
        let q = Tensor::extract("queries", queries)?;
        q.expect_dtype(FLOATS)?;
        q.expect_ndim(4)?;
        q.expect_inner_contiguous(1)?;
        let what = "one count per sequence";
        let nq = int32_vector("num_queries", num_queries, q.shape[0], what)?;
        let kc = cache_tensor("key_cache", key_cache)?;
        let kv = paged_layout(&kc, &kc);
        kc.expect_same_dtype(&q)?;
        kc.expect_dim(3, q.shape[3], "head_dim of queries")?;
        let w = Windows::extract(Some(block_tables), seq_lens, live_starts, q.shape[0])?;
        let (st, stats_layout) = stats_buffer(stats)?;
        let fd = folded
            .filter(|f| !f.is_none())
            .map(|f| int32_vector("folded", f, q.shape[0], what))
            .transpose()?;
        let mut all = vec![&q, &nq, &kc, &st];
        all.extend(fd.iter());
        all.extend(w.tensors());
        let at = launch_place(py, F, &all, &[&st], None)?;
        let args = WindowStatsArgs {
            num_q_heads: q.shape[2],
            max_queries: q.shape[1],
            query_strides: [q.stride(0), q.stride(1), q.stride(2)],
            scale: scale_or_default(scale, q.shape[3])?,
            window,
            mode,
            fold_only,
        };
        let (hw, counts) = (
            w.host_with(seq_lens_host, live_starts_host)?,
            host_or_mirror(&nq, num_queries_host)?,
        );
        let fold = match &fd {
            Some(t) => Some((buf(t), host_or_mirror(t, folded_host)?)),
            None => None,
        };
        let (_ws_keep, ws) = workspace(
            py,
            at,
            ops::window_stats::workspace_len(at, &args, &hw.get()),
        )?;
        let (dtype, kb, qb, nb, sb) = (cache_dtype(&q)?, buf(&kc), buf(&q), buf(&nq), buf(&st));
        detached(py, F, op_error, move || {
            // SAFETY: as in paged_attention_decode; `stats` overlaps nothing.
            unsafe {
                ops::window_stats::window_stats_folded(
                    at,
                    dtype,
                    &kv,
                    kb,
                    &hw.get(),
                    &args,
                    qb,
                    nb,
                    &counts,
                    fold.as_ref().map(|(b, h)| (*b, &h[..])),
                    &stats_layout,
                    sb,
                    ws,
                )
            }
        })
    }
}

py_fn! {
    /// Scores every live entry with the per-KV-head MLP `concat(k, v, stats) -> Linear(16) -> GELU -> Linear(1)`.
    ///
    /// Weights (float32, contiguous): `w1` `[num_kv_heads, 16, 2 * head_dim + 8 * group_size]`, `b1`
    /// `[num_kv_heads, 16]`, `w2` `[num_kv_heads, 16]`, `b2` `[num_kv_heads]`; `scores`: float32
    /// `[num_seqs, num_kv_heads, max_live]` (written; slots past a live window untouched);
    /// `seq_lens_host`, `live_starts_host` as in `paged_attention_decode`.
    #[pyfunction]
    #[pyo3(signature = (key_cache, value_cache, block_tables, seq_lens, live_starts, stats, w1, b1, w2, b2, scores, *, seq_lens_host = None, live_starts_host = None))]
    pub fn scorer_mlp(
        py;
        key_cache, value_cache, block_tables, seq_lens, live_starts, stats, w1, b1, w2, b2, scores,
        seq_lens_host?, live_starts_host?,
    ) -> PyResult<()> {
        let (kc, vc, kv, relation) = cache_pair(key_cache, value_cache)?;
        let sc = slot_matrix("scores", scores, ElemType::F32)?;
        sc.expect_dim(1, kv.num_kv_heads, "num_kv_heads of the cache")?;
        let w = Windows::extract(Some(block_tables), seq_lens, live_starts, sc.shape[0])?;
        let (st, stats_layout) = stats_buffer(stats)?;
        let h = kv.num_kv_heads;
        let in_dim = 2 * kv.head_dim + NUM_STATS as i64 * stats_layout.group_size;
        let hidden = SCORER_HIDDEN as i64;
        let mut weights = Vec::new();
        for (name, obj, shape) in [
            ("w1", w1, vec![h, hidden, in_dim]),
            ("b1", b1, vec![h, hidden]),
            ("w2", w2, vec![h, hidden]),
            ("b2", b2, vec![h]),
        ] {
            let t = Tensor::extract(name, obj)?;
            t.expect_dtype(&[ElemType::F32])?;
            t.expect_shape(&shape, "[num_kv_heads, 16, 2 * head_dim + 8 * group_size] / [num_kv_heads, 16] / [num_kv_heads]")?;
            t.expect_contiguous()?;
            weights.push(t);
        }
        let mut all = vec![&kc, &vc, &st, &sc];
        all.extend(w.tensors());
        all.extend(weights.iter());
        let at = launch_place(py, F, &all, &[&sc], None)?;
        let wb = ScorerBufs {
            w1: buf(&weights[0]),
            b1: buf(&weights[1]),
            w2: buf(&weights[2]),
            b2: buf(&weights[3]),
        };
        let (hw, max_live) = (w.host_with(seq_lens_host, live_starts_host)?, sc.shape[2]);
        let (dtype, c, stb, scb) = (
            cache_dtype(&kc)?,
            cache(&kc, &vc, relation),
            buf(&st),
            buf(&sc),
        );
        detached(py, F, op_error, move || {
            // SAFETY: as in paged_attention_decode; `scores` overlaps nothing.
            unsafe {
                ops::scorer_mlp::scorer_mlp(
                    at,
                    dtype,
                    &kv,
                    c,
                    &hw.get(),
                    &stats_layout,
                    stb,
                    wb,
                    max_live,
                    scb,
                )
            }
        })
    }
}

/// The tensors every survivor selection reads and writes: scores and survivors `[num_seqs,
/// num_kv_heads, max_live]`, the windows' lengths and `num_evict` `[num_seqs]`.
struct Selection<'py> {
    scores: Tensor<'py>,
    survivors: Tensor<'py>,
    windows: Windows<'py>,
    num_evict: Tensor<'py>,
    args: SelectArgs,
}

impl<'py> Selection<'py> {
    fn extract(
        seq_lens: &Bound<'py, PyAny>,
        live_starts: &Bound<'py, PyAny>,
        scores: &Bound<'py, PyAny>,
        num_evict: &Bound<'py, PyAny>,
        survivors: &Bound<'py, PyAny>,
        num_protected: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Self> {
        let sc = slot_matrix("scores", scores, ElemType::F32)?;
        let n = sc.shape[0];
        let windows = Windows::extract(None, seq_lens, live_starts, n)?;
        let ne = int32_vector("num_evict", num_evict, n, "one count per sequence")?;
        let sv = slot_matrix("survivors", survivors, ElemType::I32)?;
        sv.expect_shape(&sc.shape, "the shape of scores")?;
        let num_protected = match num_protected {
            None => 0,
            Some(p) => args::int::<i64>("num_protected", p, "[0, 2^63)")?,
        };
        let args = SelectArgs {
            num_kv_heads: sc.shape[1],
            max_live: sc.shape[2],
            num_protected,
        };
        Ok(Self {
            scores: sc,
            survivors: sv,
            windows,
            num_evict: ne,
            args,
        })
    }

    fn tensors(&self) -> Vec<&Tensor<'py>> {
        let mut all = vec![&self.scores, &self.survivors, &self.num_evict];
        all.extend(self.windows.tensors());
        all
    }

    /// Checks these tensors and the call's `extra` ones (read) for one device and `survivors` (the
    /// one written, see [`launch_place`]); then reads the host copies of the lengths (from the
    /// caller's host mirrors where given: no device read).
    fn launch(
        &self,
        py: Python<'_>,
        func: &str,
        extra: &[&Tensor<'py>],
        mirrors: HostMirrors<'_, 'py>,
    ) -> PyResult<HostSelection> {
        let mut all = self.tensors();
        all.extend(extra.iter().copied());
        let at = launch_place(py, func, &all, &[&self.survivors], None)?;
        Ok(HostSelection {
            at,
            windows: self
                .windows
                .host_with(mirrors.seq_lens, mirrors.live_starts)?,
            evict: host_or_mirror(&self.num_evict, mirrors.num_evict)?,
            scores: buf(&self.scores),
            num_evict: buf(&self.num_evict),
            survivors: buf(&self.survivors),
        })
    }
}

/// The optional CPU int32 copies of `seq_lens`, `live_starts` and `num_evict` a caller keeps (the
/// engine step's plan has them), read instead of the device arrays.
#[derive(Clone, Copy, Default)]
struct HostMirrors<'a, 'py> {
    seq_lens: Option<&'a Bound<'py, PyAny>>,
    live_starts: Option<&'a Bound<'py, PyAny>>,
    num_evict: Option<&'a Bound<'py, PyAny>>,
}

/// [`Selection`] without the GIL: where it runs, its buffers, the host copies of its lengths.
struct HostSelection {
    at: Place,
    windows: HostWindows,
    evict: Vec<i32>,
    scores: Buf,
    num_evict: Buf,
    survivors: Buf,
}

py_fn! {
    /// Deterministic top-k eviction choice: per (sequence, KV head), evicts the `num_evict[s]`
    /// highest-scoring unprotected entries and writes the survivors, ascending, to `survivors`.
    ///
    /// `scores`: float32 `[num_seqs, num_kv_heads, max_live]`; `survivors`: int32, same shape
    /// (written); `num_evict`: int32 `[num_seqs]`; the newest `num_protected` slots are never evicted.
    /// `seq_lens_host`, `live_starts_host`, `num_evict_host`: optional CPU int32 copies the caller
    /// keeps equal to them (read instead of the device arrays, which waits for the device).
    #[pyfunction]
    #[pyo3(signature = (seq_lens, live_starts, scores, num_evict, survivors, num_protected = None, *, seq_lens_host = None, live_starts_host = None, num_evict_host = None))]
    pub fn select_survivors(
        py;
        seq_lens, live_starts, scores, num_evict, survivors, num_protected?,
        seq_lens_host?, live_starts_host?, num_evict_host?,
    ) -> PyResult<()> {
        let s = Selection::extract(
            seq_lens,
            live_starts,
            scores,
            num_evict,
            survivors,
            num_protected,
        )?;
        let mirrors = HostMirrors {
            seq_lens: seq_lens_host,
            live_starts: live_starts_host,
            num_evict: num_evict_host,
        };
        let (h, args) = (s.launch(py, F, &[], mirrors)?, s.args);
        detached(py, F, op_error, move || {
            // SAFETY: as in paged_attention_decode; `survivors` overlaps nothing.
            unsafe {
                ops::select_survivors::select_survivors(
                    h.at,
                    &h.windows.get(),
                    &args,
                    h.scores,
                    h.num_evict,
                    &h.evict,
                    h.survivors,
                )
            }
        })
    }
}

py_fn! {
    /// ForesightKV's reproducible victim sampling: per (sequence `s`, KV head `kh`), the candidates are
    /// the top `min(2 n, unprotected)` scores, `n = num_evict[s]` of them are drawn by
    /// softmax(score / temperature) as Gumbel top-k with Philox noise keyed by `(seed, requests[s],
    /// layer, kh, evictions[s])`, and the survivors are written, ascending, to `survivors`. Bit for bit
    /// the same on CPU and CUDA tensors.
    ///
    /// As `select_survivors`, plus `requests` and `evictions`: int32 `[num_seqs]` (read as unsigned
    /// 32-bit), `layer` below 65536, `temperature` positive (default 1.0).
    #[pyfunction]
    #[pyo3(signature = (seq_lens, live_starts, scores, num_evict, requests, evictions, survivors, *, layer, seed, temperature = None, num_protected = None, seq_lens_host = None, live_starts_host = None, num_evict_host = None))]
    pub fn sample_survivors(
        py;
        seq_lens, live_starts, scores, num_evict, requests, evictions, survivors, layer, seed,
        temperature?, num_protected?, seq_lens_host?, live_starts_host?, num_evict_host?,
    ) -> PyResult<()> {
        let s = Selection::extract(
            seq_lens,
            live_starts,
            scores,
            num_evict,
            survivors,
            num_protected,
        )?;
        let n = s.scores.shape[0];
        let rq = int32_vector("requests", requests, n, "one request id per sequence")?;
        let ev = int32_vector("evictions", evictions, n, "one count per sequence")?;
        let args = SampleArgs {
            select: s.args,
            layer: args::int::<u32>("layer", layer, "[0, 65536)")?,
            seed: args::int::<u64>("seed", seed, "[0, 2^64)")?,
            temperature: args::opt_float("temperature", temperature)?.unwrap_or(1.0) as f32,
        };
        let mirrors = HostMirrors {
            seq_lens: seq_lens_host,
            live_starts: live_starts_host,
            num_evict: num_evict_host,
        };
        let (h, rqb, evb) = (s.launch(py, F, &[&rq, &ev], mirrors)?, buf(&rq), buf(&ev));
        detached(py, F, op_error, move || {
            // SAFETY: as in paged_attention_decode; int32 `requests` / `evictions` are read as the
            // u32 the op takes (same size, any bit pattern valid); `survivors` overlaps nothing.
            unsafe {
                ops::sample_survivors::sample_survivors(
                    h.at,
                    &h.windows.get(),
                    &args,
                    h.scores,
                    h.num_evict,
                    &h.evict,
                    rqb,
                    evb,
                    h.survivors,
                )
            }
        })
    }
}

py_fn! {
    /// In-place compaction: per (sequence, KV head), moves the survivors' K, V (and statistics rows
    /// when `stats` is given) to the tail of the live window, keeping their order.
    ///
    /// `survivors`: int32 `[num_seqs, num_kv_heads, max_live]` (strictly ascending live slots first);
    /// `num_evict`: int32 `[num_seqs]`, multiples of the block size. `key_cache`/`value_cache` are
    /// separate tensors, or the K and V halves of one fused `[..., 2 * head_dim]` tensor;
    /// `*_host` as in `select_survivors`.
    #[pyfunction]
    #[pyo3(signature = (key_cache, value_cache, block_tables, seq_lens, live_starts, num_evict, survivors, stats = None, *, seq_lens_host = None, live_starts_host = None, num_evict_host = None))]
    pub fn compact(
        py;
        key_cache, value_cache, block_tables, seq_lens, live_starts, num_evict, survivors, stats?,
        seq_lens_host?, live_starts_host?, num_evict_host?,
    ) -> PyResult<()> {
        let (kc, vc, kv, relation) = cache_pair(key_cache, value_cache)?;
        let sv = slot_matrix("survivors", survivors, ElemType::I32)?;
        sv.expect_dim(1, kv.num_kv_heads, "num_kv_heads of the cache")?;
        let n = sv.shape[0];
        let w = Windows::extract(Some(block_tables), seq_lens, live_starts, n)?;
        let ne = int32_vector("num_evict", num_evict, n, "one count per sequence")?;
        let st = stats.map(stats_buffer).transpose()?;
        let mut all = vec![&kc, &vc, &ne, &sv];
        all.extend(w.tensors());
        all.extend(st.as_ref().map(|(s, _)| s));
        let mut outputs = vec![&kc, &vc];
        outputs.extend(st.as_ref().map(|(s, _)| s));
        let at = launch_place(py, F, &all, &outputs, fused_pair(&kc, &vc, relation))?;
        let (dtype, c) = (cache_dtype(&kc)?, cache(&kc, &vc, relation));
        let (hw, evict, max_live) = (
            w.host_with(seq_lens_host, live_starts_host)?,
            host_or_mirror(&ne, num_evict_host)?,
            sv.shape[2],
        );
        let (neb, svb) = (buf(&ne), buf(&sv));
        let stb = st.as_ref().map(|(s, l)| (*l, buf(s)));
        detached(py, F, op_error, move || {
            // SAFETY: as in paged_attention_decode; the written buffers overlap no input (a fused
            // cache's two views only each other, which the op handles as one tensor).
            unsafe {
                ops::compact::compact(
                    at,
                    dtype,
                    &kv,
                    c,
                    &hw.get(),
                    max_live,
                    neb,
                    &evict,
                    svb,
                    stb.as_ref().map(|(l, b)| (l, *b)),
                )
            }
        })
    }
}

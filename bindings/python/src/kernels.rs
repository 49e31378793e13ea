//! The kernels as Python functions over tensors: every argument is validated (type, dtype, device,
//! shape, strides, aliasing) before memory is touched, then the kernel runs with the GIL released:
//! the CPU reference for host tensors, the CUDA launcher on PyTorch's current stream for CUDA ones.

use crate::args;
use crate::errors::{cuda_error, error, kernel_error, Kind};
use crate::tensor::{
    check_outputs, kv_relation, same_device, torch_stream, Device, ElemType, KvRelation, Raw,
    Tensor, FLOATS,
};
use foresightkv::cuda::reshape_and_cache::{
    launch_reshape_and_cache, CacheWriteLens, CacheWritePtrs,
};
use foresightkv::cuda::{
    launch_compact, launch_paged_attention_decode, launch_scorer_mlp, launch_select_survivors,
    launch_window_stats, plan_decode, window_stats_workspace_len, CudaError, DeviceArray,
    DeviceCache, DeviceScorerWeights, DeviceWindows,
};
use foresightkv::kernels::{
    self, CacheWriteLayout, DecodeArgs, KvCacheMut, LiveWindows, PagedKvLayout, ScorerWeights,
    SelectArgs, StatsLayout, WindowStatsArgs, NUM_STATS, SCORER_HIDDEN,
};
use half::{bf16, f16};
use pyo3::prelude::*;

/// Runs `$body` with `$T` bound to the Rust element type of float dtype `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            ElemType::F32 => {
                type $T = f32;
                $body
            }
            ElemType::F16 => {
                type $T = f16;
                $body
            }
            ElemType::Bf16 => {
                type $T = bf16;
                $body
            }
            other => Err(error(
                Kind::DType,
                format!("unsupported cache dtype {}", other.name()),
            )),
        }
    };
}

/// Where a kernel call runs: the CPU reference, or CUDA device `ordinal` on PyTorch's current stream.
enum Target {
    Host,
    Cuda { ordinal: usize, stream: u64 },
}

/// Requires every tensor on one device; for CUDA, requires the kernels and fetches the stream.
fn target(py: Python<'_>, func: &str, tensors: &[&Tensor<'_>]) -> PyResult<Target> {
    match same_device(tensors)? {
        Device::Cpu => Ok(Target::Host),
        Device::Cuda(ordinal) => {
            require_kernels(func, tensors[0])?;
            Ok(Target::Cuda {
                ordinal,
                stream: torch_stream(py, ordinal)?,
            })
        }
    }
}

/// The address and element count of a tensor, as a CUDA launcher takes it.
fn dev(t: &Tensor<'_>) -> DeviceArray {
    DeviceArray::new(t.ptr as u64, t.extent)
}

/// The values of an int32 vector on the host: read in place, or copied from the device with
/// `.cpu()` (which waits for the device).
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

/// A float32 workspace of `len` elements on CUDA device `ordinal`, from PyTorch's allocator.
fn workspace<'py>(
    py: Python<'py>,
    ordinal: usize,
    len: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, DeviceArray)> {
    if len == 0 {
        return Ok((None, DeviceArray::default()));
    }
    let torch = py.import("torch")?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("dtype", torch.getattr("float32")?)?;
    kwargs.set_item("device", format!("cuda:{ordinal}"))?;
    let t = torch.call_method("empty", (len,), Some(&kwargs))?;
    let ptr: u64 = t.call_method0("data_ptr")?.extract()?;
    Ok((Some(t), DeviceArray::new(ptr, len)))
}

/// Requires the CUDA kernels to be compiled in; names the tensor that asked for them.
fn require_kernels(func: &str, t: &Tensor<'_>) -> PyResult<()> {
    match foresightkv::cuda::embedded_fatbin() {
        Ok(_) => Ok(()),
        Err(e @ CudaError::KernelsNotCompiled) | Err(e @ CudaError::FeatureDisabled) => Err(error(
            Kind::Device,
            format!("{func}: {} is a CUDA tensor ({}) but {e}", t.name, t.device),
        )),
        Err(e) => Err(cuda_error(func, e)),
    }
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
    let layout = PagedKvLayout {
        num_blocks: k.shape[0],
        block_size: k.shape[1],
        num_kv_heads: k.shape[2],
        head_dim: k.shape[3],
        key_strides: [k.stride(0), k.stride(1), k.stride(2)],
        value_strides: [v.stride(0), v.stride(1), v.stride(2)],
    };
    Ok((k, v, layout, relation))
}

/// The pair [`check_outputs`] lets interleave: the K/V views of a fused cache.
fn fused_pair<'a, 'py>(
    k: &'a Tensor<'py>,
    v: &'a Tensor<'py>,
    relation: KvRelation,
) -> Option<(&'a Tensor<'py>, &'a Tensor<'py>)> {
    (relation == KvRelation::Fused).then_some((k, v))
}

/// The host memory a cache pair's kernels write: two buffers, or one covering both fused views.
#[derive(Clone, Copy)]
struct RawCache {
    key: Raw,
    value: Raw,
    fused: Option<Raw>,
}

impl RawCache {
    fn new(k: &Tensor<'_>, v: &Tensor<'_>, relation: KvRelation, head_dim: i64) -> Self {
        let fused = (relation == KvRelation::Fused).then(|| Raw {
            ptr: k.ptr,
            len: k.extent.max(v.extent + head_dim as usize),
        });
        Self {
            key: k.raw(),
            value: v.raw(),
            fused,
        }
    }

    /// # Safety
    /// The tensors must be alive, on the host, of element type `T`, and overlap no other slice.
    unsafe fn get<'a, T>(self) -> KvCacheMut<'a, T> {
        match self.fused {
            Some(all) => KvCacheMut::Fused(all.slice_mut::<T>()),
            None => KvCacheMut::Split {
                key: self.key.slice_mut::<T>(),
                value: self.value.slice_mut::<T>(),
            },
        }
    }
}

/// Block tables `[num_seqs, width]`, `seq_lens` and `live_starts` `[num_seqs]`, int32, contiguous.
struct Windows<'py> {
    block_tables: Tensor<'py>,
    seq_lens: Tensor<'py>,
    live_starts: Tensor<'py>,
}

impl<'py> Windows<'py> {
    fn extract(
        block_tables: &Bound<'py, PyAny>,
        seq_lens: &Bound<'py, PyAny>,
        live_starts: &Bound<'py, PyAny>,
        num_seqs: i64,
    ) -> PyResult<Self> {
        let bt = Tensor::extract("block_tables", block_tables)?;
        let sl = Tensor::extract("seq_lens", seq_lens)?;
        let ls = Tensor::extract("live_starts", live_starts)?;
        bt.expect_dtype(&[ElemType::I32])?;
        bt.expect_ndim(2)?;
        bt.expect_contiguous()?;
        bt.expect_dim(0, num_seqs, "one row per sequence")?;
        for t in [&sl, &ls] {
            t.expect_dtype(&[ElemType::I32])?;
            t.expect_ndim(1)?;
            t.expect_contiguous()?;
            t.expect_dim(0, num_seqs, "one entry per sequence")?;
        }
        Ok(Self {
            block_tables: bt,
            seq_lens: sl,
            live_starts: ls,
        })
    }

    fn tensors(&self) -> [&Tensor<'py>; 3] {
        [&self.block_tables, &self.seq_lens, &self.live_starts]
    }

    fn raw(&self) -> RawWindows {
        RawWindows {
            block_tables: self.block_tables.raw(),
            stride: self.block_tables.shape[1],
            seq_lens: self.seq_lens.raw(),
            live_starts: self.live_starts.raw(),
        }
    }
}

/// [`Windows`] as plain numbers, for code running without the GIL.
#[derive(Clone, Copy)]
struct RawWindows {
    block_tables: Raw,
    stride: i64,
    seq_lens: Raw,
    live_starts: Raw,
}

impl RawWindows {
    /// # Safety
    /// The tensors must be alive, on the host, int32, and not written concurrently.
    unsafe fn get<'a>(self) -> LiveWindows<'a> {
        LiveWindows {
            block_tables: self.block_tables.slice(),
            block_table_stride: self.stride,
            seq_lens: self.seq_lens.slice(),
            live_starts: self.live_starts.slice(),
        }
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

fn scale_or_default(scale: Option<f64>, head_dim: i64) -> f32 {
    scale
        .map(|s| s as f32)
        .unwrap_or_else(|| 1.0 / (head_dim.max(1) as f32).sqrt())
}

/// Writes each token's K/V rows into the cache slots `slot_mapping` names (negative = padding).
///
/// `key`, `value`: `[num_tokens, num_kv_heads, head_dim]`; `key_cache`, `value_cache`:
/// `[num_blocks, block_size, num_kv_heads, head_dim]` (any strides, head_dim contiguous, so a
/// permuted view of vLLM's head-major cache works in place); `slot_mapping`: int64 `[num_tokens]`.
/// CPU tensors run the reference; CUDA tensors launch on PyTorch's current stream.
#[pyfunction]
pub fn reshape_and_cache<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    key_cache: &Bound<'py, PyAny>,
    value_cache: &Bound<'py, PyAny>,
    slot_mapping: &Bound<'py, PyAny>,
) -> PyResult<()> {
    const F: &str = "reshape_and_cache";
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
    let device = same_device(&all)?;
    check_outputs(&[&kc, &vc], &all, fused_pair(&kc, &vc, relation))?;
    let layout = CacheWriteLayout {
        num_tokens: k.shape[0],
        num_kv_heads: k.shape[1],
        head_dim: k.shape[2],
        block_size: kv.block_size,
        num_blocks: kv.num_blocks,
        key_strides: [k.stride(0), k.stride(1)],
        value_strides: [v.stride(0), v.stride(1)],
        key_cache_strides: kv.key_strides,
        value_cache_strides: kv.value_strides,
    };
    match device {
        Device::Cpu => {
            let (rk, rv, rs) = (k.raw(), v.raw(), sm.raw());
            let rc = RawCache::new(&kc, &vc, relation, kv.head_dim);
            with_float!(k.dtype, T => py
                .detach(move || {
                    // SAFETY: host tensors of dtype T (checked), alive for this call; the caches are
                    // disjoint from every input and from each other, or one fused buffer
                    // (check_outputs, kv_relation).
                    unsafe {
                        kernels::reshape_and_cache_into::<T>(
                            &layout,
                            rk.slice(),
                            rv.slice(),
                            rc.get::<T>(),
                            rs.slice(),
                        )
                    }
                })
                .map_err(|e| kernel_error(F, e)))
        }
        Device::Cuda(ordinal) => {
            require_kernels(F, &kc)?;
            let dtype = k
                .dtype
                .cache_dtype()
                .ok_or_else(|| error(Kind::DType, "unsupported dtype"))?;
            let stream = torch_stream(py, ordinal)?;
            let ptrs = CacheWritePtrs {
                key: k.ptr as u64,
                value: v.ptr as u64,
                key_cache: kc.ptr as u64,
                value_cache: vc.ptr as u64,
                slot_mapping: sm.ptr as u64,
            };
            let lens = CacheWriteLens {
                key: k.extent,
                value: v.extent,
                key_cache: kc.extent,
                value_cache: vc.extent,
            };
            py.detach(move || {
                // SAFETY: CUDA tensors of `ordinal` with the extents computed from their own shapes
                // and strides, kept alive by the caller's references; the stream is PyTorch's
                // current stream of that device, so the caching allocator orders reuse after it.
                unsafe { launch_reshape_and_cache(ordinal, stream, dtype, &layout, ptrs, lens) }
            })
            .map_err(|e| cuda_error(F, e))
        }
    }
}

/// Decode attention: each sequence's query (all heads) over its live window of the paged cache.
///
/// `query`, `out`: `[num_seqs, num_q_heads, head_dim]`; caches as in `reshape_and_cache`;
/// `block_tables`: int32 `[num_seqs, width]`; `seq_lens`, `live_starts`: int32 `[num_seqs]`.
#[pyfunction]
#[pyo3(signature = (query, key_cache, value_cache, block_tables, seq_lens, live_starts, out, scale = None))]
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_decode<'py>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    key_cache: &Bound<'py, PyAny>,
    value_cache: &Bound<'py, PyAny>,
    block_tables: &Bound<'py, PyAny>,
    seq_lens: &Bound<'py, PyAny>,
    live_starts: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    scale: Option<&Bound<'py, PyAny>>,
) -> PyResult<()> {
    const F: &str = "paged_attention_decode";
    let q = Tensor::extract("query", query)?;
    q.expect_dtype(FLOATS)?;
    q.expect_ndim(3)?;
    q.expect_inner_contiguous(1)?;
    let (kc, vc, kv, _) = cache_pair(key_cache, value_cache)?;
    kc.expect_same_dtype(&q)?;
    kc.expect_dim(3, q.shape[2], "head_dim of query")?;
    let w = Windows::extract(block_tables, seq_lens, live_starts, q.shape[0])?;
    let o = Tensor::extract("out", out)?;
    o.expect_same_dtype(&q)?;
    o.expect_shape(&q.shape, "the shape of query")?;
    o.expect_inner_contiguous(1)?;
    let [bt, sl, ls] = w.tensors();
    let all = [&q, &kc, &vc, bt, sl, ls, &o];
    let tgt = target(py, F, &all)?;
    check_outputs(&[&o], &all, None)?;
    let args = DecodeArgs {
        num_q_heads: q.shape[1],
        query_strides: [q.stride(0), q.stride(1)],
        out_strides: [o.stride(0), o.stride(1)],
        scale: scale_or_default(args::opt_float("scale", scale)?, q.shape[2]),
    };
    if let Target::Cuda { ordinal, stream } = tgt {
        let (lens, starts) = (host_i32(sl)?, host_i32(ls)?);
        let max_live = lens
            .iter()
            .zip(&starts)
            .map(|(l, s)| (l - s).max(0) as usize)
            .max()
            .unwrap_or(0);
        let plan = plan_decode(&kv, args.num_q_heads, lens.len(), max_live)
            .map_err(|e| kernel_error(F, e))?;
        let (_ws_keep, ws) = workspace(py, ordinal, plan.workspace_len)?;
        let dtype = q
            .dtype
            .cache_dtype()
            .ok_or_else(|| error(Kind::DType, "unsupported dtype"))?;
        let cache = DeviceCache {
            key: dev(&kc),
            value: dev(&vc),
        };
        let (bt_ptr, sl_ptr, ls_ptr, stride) =
            (bt.ptr as u64, sl.ptr as u64, ls.ptr as u64, bt.shape[1]);
        let (qa, oa) = (dev(&q), dev(&o));
        return py
            .detach(move || {
                let windows = DeviceWindows {
                    block_tables: bt_ptr,
                    seq_lens: sl_ptr,
                    live_starts: ls_ptr,
                    block_table_stride: stride,
                    seq_lens_host: &lens,
                    live_starts_host: &starts,
                };
                // SAFETY: CUDA tensors of `ordinal` with extents from their own shapes and strides,
                // alive while the caller holds them; host mirrors copied from the device tensors.
                unsafe {
                    launch_paged_attention_decode(
                        ordinal, stream, dtype, &kv, cache, &windows, &args, qa, oa, ws,
                    )
                }
            })
            .map(|_| ())
            .map_err(|e| cuda_error(F, e));
    }
    let (rq, rk, rv, ro, rw) = (q.raw(), kc.raw(), vc.raw(), o.raw(), w.raw());
    with_float!(q.dtype, T => py
        .detach(move || {
            // SAFETY: host tensors of the checked dtypes, alive for this call; `out` overlaps nothing.
            unsafe {
                kernels::paged_attention_decode::<T>(&kv, &rw.get(), &args, rq.slice(), rk.slice(), rv.slice(), ro.slice_mut())
            }
        })
        .map_err(|e| kernel_error(F, e)))
}

/// Updates the 8 ForesightKV statistics of every live entry from the queries since the last eviction.
///
/// `queries`: `[num_seqs, max_queries, num_q_heads, head_dim]`; `num_queries`: int32 `[num_seqs]`;
/// `stats`: float32 `[num_blocks, block_size, num_kv_heads, group_size, 8]` (written in place).
#[pyfunction]
#[pyo3(signature = (queries, num_queries, key_cache, block_tables, seq_lens, live_starts, stats, scale = None))]
#[allow(clippy::too_many_arguments)]
pub fn window_stats<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    num_queries: &Bound<'py, PyAny>,
    key_cache: &Bound<'py, PyAny>,
    block_tables: &Bound<'py, PyAny>,
    seq_lens: &Bound<'py, PyAny>,
    live_starts: &Bound<'py, PyAny>,
    stats: &Bound<'py, PyAny>,
    scale: Option<&Bound<'py, PyAny>>,
) -> PyResult<()> {
    const F: &str = "window_stats";
    let q = Tensor::extract("queries", queries)?;
    q.expect_dtype(FLOATS)?;
    q.expect_ndim(4)?;
    q.expect_inner_contiguous(1)?;
    let nq = int32_vector(
        "num_queries",
        num_queries,
        q.shape[0],
        "one count per sequence",
    )?;
    let kc = cache_tensor("key_cache", key_cache)?;
    let kv = PagedKvLayout {
        num_blocks: kc.shape[0],
        block_size: kc.shape[1],
        num_kv_heads: kc.shape[2],
        head_dim: kc.shape[3],
        key_strides: [kc.stride(0), kc.stride(1), kc.stride(2)],
        value_strides: [kc.stride(0), kc.stride(1), kc.stride(2)],
    };
    kc.expect_same_dtype(&q)?;
    kc.expect_dim(3, q.shape[3], "head_dim of queries")?;
    let w = Windows::extract(block_tables, seq_lens, live_starts, q.shape[0])?;
    let (st, stats_layout) = stats_buffer(stats)?;
    let [bt, sl, ls] = w.tensors();
    let all = [&q, &nq, &kc, bt, sl, ls, &st];
    let tgt = target(py, F, &all)?;
    check_outputs(&[&st], &all, None)?;
    let args = WindowStatsArgs {
        num_q_heads: q.shape[2],
        max_queries: q.shape[1],
        query_strides: [q.stride(0), q.stride(1), q.stride(2)],
        scale: scale_or_default(args::opt_float("scale", scale)?, q.shape[3]),
    };
    if let Target::Cuda { ordinal, stream } = tgt {
        let (lens, starts, counts) = (host_i32(sl)?, host_i32(ls)?, host_i32(&nq)?);
        let max_live = lens
            .iter()
            .zip(&starts)
            .map(|(l, s)| (l - s).max(0) as usize)
            .max()
            .unwrap_or(0);
        let ws_len = window_stats_workspace_len(
            lens.len(),
            args.num_q_heads as usize,
            args.max_queries as usize,
            max_live,
        );
        let (_ws_keep, ws) = workspace(py, ordinal, ws_len)?;
        let dtype = q
            .dtype
            .cache_dtype()
            .ok_or_else(|| error(Kind::DType, "unsupported dtype"))?;
        let cache = DeviceCache {
            key: dev(&kc),
            value: dev(&kc),
        };
        let (bt_ptr, sl_ptr, ls_ptr, stride) =
            (bt.ptr as u64, sl.ptr as u64, ls.ptr as u64, bt.shape[1]);
        let (qa, na, sa) = (dev(&q), dev(&nq), dev(&st));
        return py
            .detach(move || {
                let windows = DeviceWindows {
                    block_tables: bt_ptr,
                    seq_lens: sl_ptr,
                    live_starts: ls_ptr,
                    block_table_stride: stride,
                    seq_lens_host: &lens,
                    live_starts_host: &starts,
                };
                // SAFETY: as in paged_attention_decode.
                unsafe {
                    launch_window_stats(
                        ordinal,
                        stream,
                        dtype,
                        &kv,
                        cache,
                        &windows,
                        &args,
                        qa,
                        na,
                        &counts,
                        &stats_layout,
                        sa,
                        ws,
                    )
                }
            })
            .map_err(|e| cuda_error(F, e));
    }
    let (rq, rn, rk, rs, rw) = (q.raw(), nq.raw(), kc.raw(), st.raw(), w.raw());
    with_float!(q.dtype, T => py
        .detach(move || {
            // SAFETY: host tensors of the checked dtypes, alive for this call; `stats` overlaps nothing.
            unsafe {
                kernels::window_stats::<T>(&kv, &rw.get(), &args, rq.slice(), rn.slice(), rk.slice(), &stats_layout, rs.slice_mut())
            }
        })
        .map_err(|e| kernel_error(F, e)))
}

/// Scores every live entry with the per-KV-head MLP `concat(k, v, stats) -> Linear(16) -> GELU -> Linear(1)`.
///
/// Weights (float32, contiguous): `w1` `[num_kv_heads, 16, 2 * head_dim + 8 * group_size]`, `b1`
/// `[num_kv_heads, 16]`, `w2` `[num_kv_heads, 16]`, `b2` `[num_kv_heads]`; `scores`: float32
/// `[num_seqs, num_kv_heads, max_live]` (written; slots past a live window untouched).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn scorer_mlp<'py>(
    py: Python<'py>,
    key_cache: &Bound<'py, PyAny>,
    value_cache: &Bound<'py, PyAny>,
    block_tables: &Bound<'py, PyAny>,
    seq_lens: &Bound<'py, PyAny>,
    live_starts: &Bound<'py, PyAny>,
    stats: &Bound<'py, PyAny>,
    w1: &Bound<'py, PyAny>,
    b1: &Bound<'py, PyAny>,
    w2: &Bound<'py, PyAny>,
    b2: &Bound<'py, PyAny>,
    scores: &Bound<'py, PyAny>,
) -> PyResult<()> {
    const F: &str = "scorer_mlp";
    let (kc, vc, kv, _) = cache_pair(key_cache, value_cache)?;
    let sc = Tensor::extract("scores", scores)?;
    sc.expect_dtype(&[ElemType::F32])?;
    sc.expect_ndim(3)?;
    sc.expect_contiguous()?;
    sc.expect_dim(1, kv.num_kv_heads, "num_kv_heads of the cache")?;
    let w = Windows::extract(block_tables, seq_lens, live_starts, sc.shape[0])?;
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
    let [bt, sl, ls] = w.tensors();
    let mut all = vec![&kc, &vc, bt, sl, ls, &st, &sc];
    all.extend(weights.iter());
    let tgt = target(py, F, &all)?;
    check_outputs(&[&sc], &all, None)?;
    let max_live = sc.shape[2];
    if let Target::Cuda { ordinal, stream } = tgt {
        let (lens, starts) = (host_i32(sl)?, host_i32(ls)?);
        let dtype = kc
            .dtype
            .cache_dtype()
            .ok_or_else(|| error(Kind::DType, "unsupported dtype"))?;
        let cache = DeviceCache {
            key: dev(&kc),
            value: dev(&vc),
        };
        let (bt_ptr, sl_ptr, ls_ptr, stride) =
            (bt.ptr as u64, sl.ptr as u64, ls.ptr as u64, bt.shape[1]);
        let dw = DeviceScorerWeights {
            w1: dev(&weights[0]),
            b1: dev(&weights[1]),
            w2: dev(&weights[2]),
            b2: dev(&weights[3]),
        };
        let (sa, sca) = (dev(&st), dev(&sc));
        return py
            .detach(move || {
                let windows = DeviceWindows {
                    block_tables: bt_ptr,
                    seq_lens: sl_ptr,
                    live_starts: ls_ptr,
                    block_table_stride: stride,
                    seq_lens_host: &lens,
                    live_starts_host: &starts,
                };
                // SAFETY: as in paged_attention_decode.
                unsafe {
                    launch_scorer_mlp(
                        ordinal,
                        stream,
                        dtype,
                        &kv,
                        cache,
                        &windows,
                        &stats_layout,
                        sa,
                        dw,
                        max_live,
                        sca,
                    )
                }
            })
            .map_err(|e| cuda_error(F, e));
    }
    let (rk, rv, rs, rsc, rw) = (kc.raw(), vc.raw(), st.raw(), sc.raw(), w.raw());
    let rws: Vec<Raw> = weights.iter().map(Tensor::raw).collect();
    with_float!(kc.dtype, T => py
        .detach(move || {
            // SAFETY: host tensors of the checked dtypes, alive for this call; `scores` overlaps nothing.
            unsafe {
                let weights = ScorerWeights { w1: rws[0].slice(), b1: rws[1].slice(), w2: rws[2].slice(), b2: rws[3].slice() };
                kernels::scorer_mlp::<T>(&kv, &rw.get(), rk.slice(), rv.slice(), &stats_layout, rs.slice(), &weights, max_live, rsc.slice_mut())
            }
        })
        .map_err(|e| kernel_error(F, e)))
}

/// Deterministic top-k eviction choice: per (sequence, KV head), evicts the `num_evict[s]`
/// highest-scoring unprotected entries and writes the survivors, ascending, to `survivors`.
///
/// `scores`: float32 `[num_seqs, num_kv_heads, max_live]`; `survivors`: int32, same shape
/// (written); `num_evict`: int32 `[num_seqs]`; the newest `num_protected` slots are never evicted.
#[pyfunction]
#[pyo3(signature = (seq_lens, live_starts, scores, num_evict, survivors, num_protected = None))]
pub fn select_survivors<'py>(
    py: Python<'py>,
    seq_lens: &Bound<'py, PyAny>,
    live_starts: &Bound<'py, PyAny>,
    scores: &Bound<'py, PyAny>,
    num_evict: &Bound<'py, PyAny>,
    survivors: &Bound<'py, PyAny>,
    num_protected: Option<&Bound<'py, PyAny>>,
) -> PyResult<()> {
    const F: &str = "select_survivors";
    let sc = Tensor::extract("scores", scores)?;
    sc.expect_dtype(&[ElemType::F32])?;
    sc.expect_ndim(3)?;
    sc.expect_contiguous()?;
    let n = sc.shape[0];
    let sl = int32_vector("seq_lens", seq_lens, n, "one entry per sequence")?;
    let ls = int32_vector("live_starts", live_starts, n, "one entry per sequence")?;
    let ne = int32_vector("num_evict", num_evict, n, "one count per sequence")?;
    let sv = Tensor::extract("survivors", survivors)?;
    sv.expect_dtype(&[ElemType::I32])?;
    sv.expect_shape(&sc.shape, "the shape of scores")?;
    sv.expect_contiguous()?;
    let num_protected = match num_protected {
        None => 0,
        Some(p) => args::int::<i64>("num_protected", p, "[0, 2^63)")?,
    };
    let all = [&sc, &sl, &ls, &ne, &sv];
    let tgt = target(py, F, &all)?;
    check_outputs(&[&sv], &all, None)?;
    let sargs = SelectArgs {
        num_kv_heads: sc.shape[1],
        max_live: sc.shape[2],
        num_protected,
    };
    if let Target::Cuda { ordinal, stream } = tgt {
        let (lens, starts, evict) = (host_i32(&sl)?, host_i32(&ls)?, host_i32(&ne)?);
        let (sl_ptr, ls_ptr) = (sl.ptr as u64, ls.ptr as u64);
        let (sca, na, sva) = (dev(&sc), dev(&ne), dev(&sv));
        return py
            .detach(move || {
                let windows = DeviceWindows {
                    block_tables: 0,
                    seq_lens: sl_ptr,
                    live_starts: ls_ptr,
                    block_table_stride: 0,
                    seq_lens_host: &lens,
                    live_starts_host: &starts,
                };
                // SAFETY: as in paged_attention_decode.
                unsafe {
                    launch_select_survivors(ordinal, stream, &windows, &sargs, sca, na, &evict, sva)
                }
            })
            .map_err(|e| cuda_error(F, e));
    }
    let (rsl, rls, rsc, rne, rsv) = (sl.raw(), ls.raw(), sc.raw(), ne.raw(), sv.raw());
    py.detach(move || {
        // SAFETY: host tensors of the checked dtypes, alive for this call; `survivors` overlaps nothing.
        unsafe {
            kernels::select_survivors(
                rsl.slice(),
                rls.slice(),
                &sargs,
                rsc.slice(),
                rne.slice(),
                rsv.slice_mut(),
            )
        }
    })
    .map_err(|e| kernel_error(F, e))
}

/// In-place compaction: per (sequence, KV head), moves the survivors' K, V (and statistics rows
/// when `stats` is given) to the tail of the live window, keeping their order.
///
/// `survivors`: int32 `[num_seqs, num_kv_heads, max_live]` (strictly ascending live slots first);
/// `num_evict`: int32 `[num_seqs]`, multiples of the block size. `key_cache`/`value_cache` are
/// separate tensors, or the K and V halves of one fused `[..., 2 * head_dim]` tensor.
#[pyfunction]
#[pyo3(signature = (key_cache, value_cache, block_tables, seq_lens, live_starts, num_evict, survivors, stats = None))]
#[allow(clippy::too_many_arguments)]
pub fn compact<'py>(
    py: Python<'py>,
    key_cache: &Bound<'py, PyAny>,
    value_cache: &Bound<'py, PyAny>,
    block_tables: &Bound<'py, PyAny>,
    seq_lens: &Bound<'py, PyAny>,
    live_starts: &Bound<'py, PyAny>,
    num_evict: &Bound<'py, PyAny>,
    survivors: &Bound<'py, PyAny>,
    stats: Option<&Bound<'py, PyAny>>,
) -> PyResult<()> {
    const F: &str = "compact";
    let (kc, vc, kv, relation) = cache_pair(key_cache, value_cache)?;
    let sv = Tensor::extract("survivors", survivors)?;
    sv.expect_dtype(&[ElemType::I32])?;
    sv.expect_ndim(3)?;
    sv.expect_contiguous()?;
    sv.expect_dim(1, kv.num_kv_heads, "num_kv_heads of the cache")?;
    let n = sv.shape[0];
    let w = Windows::extract(block_tables, seq_lens, live_starts, n)?;
    let ne = int32_vector("num_evict", num_evict, n, "one count per sequence")?;
    let st = stats.map(stats_buffer).transpose()?;
    let [bt, sl, ls] = w.tensors();
    let mut all = vec![&kc, &vc, bt, sl, ls, &ne, &sv];
    if let Some((s, _)) = &st {
        all.push(s);
    }
    let tgt = target(py, F, &all)?;
    let mut outputs = vec![&kc, &vc];
    if let Some((s, _)) = &st {
        outputs.push(s);
    }
    check_outputs(&outputs, &all, fused_pair(&kc, &vc, relation))?;
    let max_live = sv.shape[2];
    if let Target::Cuda { ordinal, stream } = tgt {
        let (lens, starts, evict) = (host_i32(sl)?, host_i32(ls)?, host_i32(&ne)?);
        let dtype = kc
            .dtype
            .cache_dtype()
            .ok_or_else(|| error(Kind::DType, "unsupported dtype"))?;
        let cache = DeviceCache {
            key: dev(&kc),
            value: dev(&vc),
        };
        let (bt_ptr, sl_ptr, ls_ptr, stride) =
            (bt.ptr as u64, sl.ptr as u64, ls.ptr as u64, bt.shape[1]);
        let (na, sva) = (dev(&ne), dev(&sv));
        let stats_dev = st.as_ref().map(|(s, l)| (*l, dev(s)));
        return py
            .detach(move || {
                let windows = DeviceWindows {
                    block_tables: bt_ptr,
                    seq_lens: sl_ptr,
                    live_starts: ls_ptr,
                    block_table_stride: stride,
                    seq_lens_host: &lens,
                    live_starts_host: &starts,
                };
                let stats = stats_dev.as_ref().map(|(l, a)| (l, *a));
                // SAFETY: as in paged_attention_decode.
                unsafe {
                    launch_compact(
                        ordinal, stream, dtype, &kv, cache, &windows, max_live, na, &evict, sva,
                        stats,
                    )
                }
            })
            .map_err(|e| cuda_error(F, e));
    }
    let rc = RawCache::new(&kc, &vc, relation, kv.head_dim);
    let (rne, rsv, rw) = (ne.raw(), sv.raw(), w.raw());
    let rst = st.as_ref().map(|(s, l)| (*l, s.raw()));
    with_float!(kc.dtype, T => py
        .detach(move || {
            // SAFETY: host tensors of the checked dtypes, alive for this call; the written buffers
            // overlap no input, and a fused cache is passed as one slice covering both views.
            unsafe {
                let cache = rc.get::<T>();
                let stats = rst.as_ref().map(|(l, r)| (l, r.slice_mut::<f32>()));
                kernels::compact::<T>(&kv, &rw.get(), max_live, rne.slice(), rsv.slice(), cache, stats)
            }
        })
        .map_err(|e| kernel_error(F, e)))
}

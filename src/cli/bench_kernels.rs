//! `foresightkv bench-kernels`: GPU benchmark of paged decode attention (time and achieved K/V
//! bandwidth against the device's copy bandwidth measured in the same run) and of the eviction
//! step (window_stats + scorer_mlp + sample_survivors + compact; select_survivors timed beside
//! it) as a fraction of the decode time it amortises over. Prints a table and JSON. Needs a GPU: without one it returns
//! [`BenchKernelsError::NoGpu`].

use crate::cuda::CudaError;
use crate::kernels::CUDA_HEAD_DIMS;
use crate::ops::OpError;
use crate::DType;
use serde::Serialize;
use std::path::PathBuf;
use thiserror::Error;

/// Arguments of `foresightkv bench-kernels`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchKernelsArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Batch sizes of the decode grid.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128,256")]
    pub batches: Vec<usize>,
    /// Live lengths (tokens per sequence) of the decode grid.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,4096,8192,16384,32768"
    )]
    pub lives: Vec<usize>,
    /// Query heads (Qwen3-4B: 32).
    #[arg(long, default_value_t = 32)]
    pub q_heads: usize,
    /// KV heads (Qwen3-4B: 8).
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    /// Head dim (64, 128 or 256).
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Cache element type: f32, f16 or bf16.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Timed iterations per measurement (after 3 warm-up runs).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Eviction budgets B of the eviction-step measurement.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    pub budgets: Vec<usize>,
    /// Eviction interval L (queries per eviction, entries evicted).
    #[arg(long, default_value_t = 128)]
    pub interval: usize,
    /// Batch sizes of the eviction-step measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    pub evict_batches: Vec<usize>,
    /// Largest fraction of device memory one configuration may allocate; larger ones are skipped.
    #[arg(long, default_value_t = 0.8)]
    pub mem_fraction: f64,
    /// Write the JSON report here instead of printing it after the table.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::Bf16),
        other => Err(format!("unknown dtype {other:?} (f32, f16, bf16)")),
    }
}

/// Why the benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchKernelsError {
    /// No usable GPU: the benchmark measures device kernels only.
    #[error("bench-kernels needs a CUDA GPU: {0}")]
    NoGpu(String),
    /// A CUDA call or kernel argument failed.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// A kernel op refused its arguments or could not run.
    #[error(transparent)]
    Op(#[from] OpError),
    /// An argument is out of range.
    #[error("invalid bench-kernels argument: {0}")]
    BadArgs(String),
    /// The JSON report could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// Destination.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The report could not be serialised.
    #[error("serialising the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// One decode measurement.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    /// Sequences.
    pub batch: usize,
    /// Live tokens per sequence.
    pub live: usize,
    /// Partitions per (sequence, KV head).
    pub partitions: i64,
    /// Mean time per call in microseconds (None when skipped).
    pub time_us: Option<f64>,
    /// K and V bytes read per call.
    pub kv_bytes: u64,
    /// Achieved bandwidth, GB/s.
    pub gbps: Option<f64>,
    /// Achieved bandwidth over the measured copy bandwidth.
    pub frac_of_copy: Option<f64>,
    /// Why it was skipped, if it was.
    pub skipped: Option<String>,
}

/// One eviction-step measurement (per layer; the decode comparison is per layer too).
#[derive(Debug, Clone, Serialize)]
pub struct EvictRow {
    /// Sequences.
    pub batch: usize,
    /// Budget B.
    pub budget: usize,
    /// Interval L.
    pub interval: usize,
    /// window_stats time, microseconds.
    pub window_stats_us: f64,
    /// scorer_mlp time, microseconds.
    pub scorer_us: f64,
    /// select_survivors time (deterministic top-L), microseconds.
    pub select_us: f64,
    /// sample_survivors time (ForesightKV's sampled victims, the default), microseconds.
    pub sample_us: f64,
    /// compact time, microseconds.
    pub compact_us: f64,
    /// The default eviction step: window_stats + scorer + sample_survivors + compact.
    pub total_us: f64,
    /// One decode step at live B + L/2, microseconds.
    pub decode_step_us: f64,
    /// total_us / (L * decode_step_us): the eviction step's share of the decode it amortises over.
    pub fraction_of_decode: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchKernelsReport {
    /// Device name.
    pub device: String,
    /// Date (UTC, seconds since the epoch).
    pub unix_time: u64,
    /// Element type.
    pub dtype: DType,
    /// Query heads, KV heads, head dim, block size.
    pub heads: (usize, usize, usize, usize),
    /// Device-to-device copy bandwidth (read + write bytes / time), GB/s.
    pub copy_gbps: f64,
    /// Decode grid.
    pub decode: Vec<DecodeRow>,
    /// Eviction steps.
    pub evict: Vec<EvictRow>,
}

/// Runs the benchmark and prints the table (and JSON, or writes it to `--json`).
pub fn run(args: &BenchKernelsArgs) -> Result<(), BenchKernelsError> {
    check_args(args)?;
    crate::cuda::embedded_fatbin()?;
    match crate::cuda::runtime::device_count() {
        Ok(0) => return Err(BenchKernelsError::NoGpu("no CUDA device is visible".into())),
        Ok(n) if args.device >= n => {
            return Err(CudaError::NoSuchDevice {
                ordinal: args.device,
                count: n,
            }
            .into());
        }
        Ok(_) => {}
        Err(e @ (CudaError::NoDriver | CudaError::FeatureDisabled)) => {
            return Err(BenchKernelsError::NoGpu(e.to_string()))
        }
        Err(e) => return Err(e.into()),
    }
    let report = imp::measure(args)?;
    print_table(&report);
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(path) => std::fs::write(path, json).map_err(|source| BenchKernelsError::Io {
            path: path.clone(),
            source,
        })?,
        None => println!("{json}"),
    }
    Ok(())
}

fn check_args(a: &BenchKernelsArgs) -> Result<(), BenchKernelsError> {
    let bad = |m: String| Err(BenchKernelsError::BadArgs(m));
    if a.kv_heads == 0 || a.q_heads == 0 || !a.q_heads.is_multiple_of(a.kv_heads) {
        return bad(format!(
            "{} query heads is not a positive multiple of {} KV heads",
            a.q_heads, a.kv_heads
        ));
    }
    if !CUDA_HEAD_DIMS.contains(&(a.head_dim as i64)) {
        return bad(format!(
            "head dim {} (the kernels are built for {CUDA_HEAD_DIMS:?})",
            a.head_dim
        ));
    }
    if a.block_size == 0 || a.interval == 0 || !a.interval.is_multiple_of(a.block_size) {
        return bad(format!(
            "interval {} must be a positive multiple of block size {}",
            a.interval, a.block_size
        ));
    }
    if a.iters == 0 || !(0.0..=1.0).contains(&a.mem_fraction) {
        return bad("iters must be >= 1 and mem_fraction in [0, 1]".into());
    }
    if a.batches.contains(&0)
        || a.evict_batches.contains(&0)
        || a.lives.contains(&0)
        || a.budgets.contains(&0)
    {
        return bad("batches, lives and budgets must be positive".into());
    }
    Ok(())
}

fn print_table(r: &BenchKernelsReport) {
    println!(
        "device {} | {} | {} q heads, {} kv heads, dim {}, block {} | copy bandwidth {:.0} GB/s",
        r.device, r.dtype, r.heads.0, r.heads.1, r.heads.2, r.heads.3, r.copy_gbps
    );
    println!(
        "{:>6} {:>7} {:>5} {:>11} {:>12} {:>9} {:>8}",
        "batch", "live", "parts", "time (us)", "KV bytes", "GB/s", "of copy"
    );
    for d in &r.decode {
        match (d.time_us, d.gbps, d.frac_of_copy) {
            (Some(t), Some(g), Some(f)) => println!(
                "{:>6} {:>7} {:>5} {:>11.1} {:>12} {:>9.0} {:>7.1}%",
                d.batch,
                d.live,
                d.partitions,
                t,
                d.kv_bytes,
                g,
                100.0 * f
            ),
            _ => println!(
                "{:>6} {:>7} skipped: {}",
                d.batch,
                d.live,
                d.skipped.as_deref().unwrap_or("")
            ),
        }
    }
    println!(
        "{:>6} {:>6} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>9}",
        "batch",
        "B",
        "L",
        "stats us",
        "scorer us",
        "select us",
        "sample us",
        "compact us",
        "total us",
        "decode us/st",
        "fraction"
    );
    for e in &r.evict {
        println!(
            "{:>6} {:>6} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>8.2}%",
            e.batch,
            e.budget,
            e.interval,
            e.window_stats_us,
            e.scorer_us,
            e.select_us,
            e.sample_us,
            e.compact_us,
            e.total_us,
            e.decode_step_us,
            100.0 * e.fraction_of_decode
        );
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{BenchKernelsArgs, BenchKernelsError, BenchKernelsReport, DecodeRow, EvictRow};
    use crate::cuda::{CudaError, DeviceBuffer, Runtime};
    use crate::kernels::{
        DecodeArgs, PagedKvLayout, SampleArgs, SelectArgs, StatsLayout, WindowStatsArgs, NUM_STATS,
        SCORER_HIDDEN,
    };
    use crate::ops::{self, scorer_mlp::ScorerBufs, Buf, Cache, OpError, Place, Windows};
    use std::time::Instant;

    const WARMUP: usize = 3;

    fn driver(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
        move |e| CudaError::Driver {
            op,
            message: e.to_string(),
        }
    }

    /// Mean seconds per call of `f` (enqueued back to back, then one synchronisation).
    fn time_it<E: From<CudaError>>(
        rt: &Runtime,
        iters: usize,
        mut f: impl FnMut() -> Result<(), E>,
    ) -> Result<f64, E> {
        for _ in 0..WARMUP {
            f()?;
        }
        rt.context()
            .synchronize()
            .map_err(driver("cuCtxSynchronize"))?;
        let t0 = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        rt.context()
            .synchronize()
            .map_err(driver("cuCtxSynchronize"))?;
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    }

    /// Batch windows: sequence b owns blocks `b * per .. (b + 1) * per`, live from 0.
    struct Batch {
        tables: DeviceBuffer,
        lens: DeviceBuffer,
        starts: DeviceBuffer,
        lens_host: Vec<i32>,
        starts_host: Vec<i32>,
        per: usize,
    }

    impl Batch {
        fn new(dev: usize, batch: usize, live: usize, bs: usize) -> Result<Self, CudaError> {
            let per = live.div_ceil(bs);
            let tables: Vec<i32> = (0..(batch * per) as i32).collect();
            let lens_host = vec![live as i32; batch];
            let starts_host = vec![0i32; batch];
            Ok(Self {
                tables: DeviceBuffer::from_host(dev, &tables)?,
                lens: DeviceBuffer::from_host(dev, &lens_host)?,
                starts: DeviceBuffer::from_host(dev, &starts_host)?,
                lens_host,
                starts_host,
                per,
            })
        }
        fn windows(&self) -> Windows<'_> {
            let n = self.lens_host.len();
            Windows {
                block_tables: Buf::new(self.tables.ptr(), n * self.per),
                block_table_stride: self.per as i64,
                seq_lens: Buf::new(self.lens.ptr(), n),
                live_starts: Buf::new(self.starts.ptr(), n),
                seq_lens_host: &self.lens_host,
                live_starts_host: &self.starts_host,
            }
        }
    }

    /// A zeroed K/V cache of `blocks` blocks.
    fn cache(
        dev: usize,
        kv: &PagedKvLayout,
        esize: usize,
    ) -> Result<(DeviceBuffer, DeviceBuffer, Cache), CudaError> {
        let elems = kv.extent(&kv.key_strides);
        let k = DeviceBuffer::zeros(dev, elems * esize)?;
        let v = DeviceBuffer::zeros(dev, elems * esize)?;
        let c = Cache {
            key: Buf::new(k.ptr(), elems),
            value: Buf::new(v.ptr(), elems),
            fused: false,
        };
        Ok((k, v, c))
    }

    /// Times one decode call of `batch` sequences of `live` tokens; seconds per call.
    fn decode_time(
        a: &BenchKernelsArgs,
        rt: &Runtime,
        batch: usize,
        live: usize,
    ) -> Result<(f64, i64), OpError> {
        let (dev, bs, hd) = (a.device, a.block_size, a.head_dim);
        let at = Place::Cuda {
            ordinal: dev,
            stream: 0,
        };
        let b = Batch::new(dev, batch, live, bs)?;
        let kv = PagedKvLayout::contiguous(
            (batch * b.per) as i64,
            bs as i64,
            a.kv_heads as i64,
            hd as i64,
        );
        let esize = a.dtype.size();
        let (_k, _v, c) = cache(dev, &kv, esize)?;
        let args = DecodeArgs::contiguous(a.q_heads as i64, hd as i64);
        let n = batch * a.q_heads * hd;
        let q = DeviceBuffer::zeros(dev, n * esize)?;
        let out = DeviceBuffer::zeros(dev, n * esize)?;
        let plan = crate::cuda::plan_decode(&kv, a.q_heads as i64, batch, live)?;
        let w = b.windows();
        let ws_len = ops::paged_attention_decode::workspace_len(at, &kv, a.q_heads as i64, &w)?;
        let ws = DeviceBuffer::zeros(dev, ws_len.max(1) * 4)?;
        let t = time_it(rt, a.iters, || {
            // SAFETY: every buffer above is alive and sized as declared, on this device.
            unsafe {
                ops::paged_attention_decode::paged_attention_decode(
                    at,
                    a.dtype,
                    &kv,
                    c,
                    &w,
                    &args,
                    Buf::new(q.ptr(), n),
                    Buf::new(out.ptr(), n),
                    Buf::new(ws.ptr(), ws_len),
                )
            }
        })?;
        Ok((t, plan.num_partitions))
    }

    /// Device-to-device copy bandwidth (read + write) over a buffer of `bytes`, GB/s.
    fn copy_bandwidth(
        rt: &Runtime,
        dev: usize,
        bytes: usize,
        iters: usize,
    ) -> Result<f64, CudaError> {
        let src = DeviceBuffer::zeros(dev, bytes)?;
        let dst = DeviceBuffer::zeros(dev, bytes)?;
        let t = time_it(rt, iters, || {
            // SAFETY: both buffers hold `bytes` bytes on this device; stream 0 is the legacy stream.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst.ptr(),
                    src.ptr(),
                    bytes,
                    std::ptr::null_mut(),
                )
                .map_err(driver("cuMemcpyDtoDAsync"))
            }
        })?;
        Ok(2.0 * bytes as f64 / t / 1e9)
    }

    /// Times the eviction kernels (window_stats, scorer_mlp, select_survivors, sample_survivors,
    /// compact) for `batch` sequences at budget `budget`; microseconds each.
    fn evict_times(
        a: &BenchKernelsArgs,
        rt: &Runtime,
        batch: usize,
        budget: usize,
    ) -> Result<[f64; 5], OpError> {
        let (dev, bs, hd, l) = (a.device, a.block_size, a.head_dim, a.interval);
        let at = Place::Cuda {
            ordinal: dev,
            stream: 0,
        };
        let live = budget + l;
        let g = a.q_heads / a.kv_heads;
        let b = Batch::new(dev, batch, live, bs)?;
        let nb = (batch * b.per) as i64;
        let kv = PagedKvLayout::contiguous(nb, bs as i64, a.kv_heads as i64, hd as i64);
        let (_k, _v, c) = cache(dev, &kv, a.dtype.size())?;
        let w = b.windows();
        let sl = StatsLayout::contiguous(nb, bs as i64, a.kv_heads as i64, g as i64);
        let stats_len = nb as usize * bs * a.kv_heads * g * NUM_STATS;
        let stats = DeviceBuffer::zeros(dev, stats_len * 4)?;
        let wargs = WindowStatsArgs::contiguous(a.q_heads as i64, l as i64, hd as i64);
        let qn = batch * l * a.q_heads * hd;
        let queries = DeviceBuffer::zeros(dev, qn * a.dtype.size())?;
        let nq_host = vec![l as i32; batch];
        let nq = DeviceBuffer::from_host(dev, &nq_host)?;
        let wl = ops::window_stats::workspace_len(at, &wargs, &w);
        let ws = DeviceBuffer::zeros(dev, wl * 4)?;
        let in_dim = 2 * hd + NUM_STATS * g;
        let w1 = DeviceBuffer::zeros(dev, a.kv_heads * SCORER_HIDDEN * in_dim * 4)?;
        let b1 = DeviceBuffer::zeros(dev, a.kv_heads * SCORER_HIDDEN * 4)?;
        let w2 = DeviceBuffer::zeros(dev, a.kv_heads * SCORER_HIDDEN * 4)?;
        let b2 = DeviceBuffer::zeros(dev, a.kv_heads * 4)?;
        let weights = ScorerBufs {
            w1: Buf::new(w1.ptr(), a.kv_heads * SCORER_HIDDEN * in_dim),
            b1: Buf::new(b1.ptr(), a.kv_heads * SCORER_HIDDEN),
            w2: Buf::new(w2.ptr(), a.kv_heads * SCORER_HIDDEN),
            b2: Buf::new(b2.ptr(), a.kv_heads),
        };
        let slots = batch * a.kv_heads * live;
        let scores = DeviceBuffer::zeros(dev, slots * 4)?;
        let survivors = DeviceBuffer::zeros(dev, slots * 4)?;
        let evict_host = vec![l as i32; batch];
        let evict = DeviceBuffer::from_host(dev, &evict_host)?;
        let st = Buf::new(stats.ptr(), stats_len);
        let (scores_buf, survivors_buf, evict_buf) = (
            Buf::new(scores.ptr(), slots),
            Buf::new(survivors.ptr(), slots),
            Buf::new(evict.ptr(), batch),
        );
        let sel = SelectArgs {
            num_kv_heads: a.kv_heads as i64,
            max_live: live as i64,
            num_protected: l as i64,
        };
        let us = |t: f64| t * 1e6;
        // SAFETY (all four closures): every buffer above is alive and sized as declared.
        let t_stats = time_it(rt, a.iters, || unsafe {
            ops::window_stats::window_stats_folded(
                at,
                a.dtype,
                &kv,
                c.key,
                &w,
                &wargs,
                Buf::new(queries.ptr(), qn),
                Buf::new(nq.ptr(), batch),
                &nq_host,
                None,
                &sl,
                st,
                Buf::new(ws.ptr(), wl),
            )
        })?;
        let t_scorer = time_it(rt, a.iters, || unsafe {
            ops::scorer_mlp::scorer_mlp(
                at,
                a.dtype,
                &kv,
                c,
                &w,
                &sl,
                st,
                weights,
                live as i64,
                scores_buf,
            )
        })?;
        let t_select = time_it(rt, a.iters, || unsafe {
            ops::select_survivors::select_survivors(
                at,
                &w,
                &sel,
                scores_buf,
                evict_buf,
                &evict_host,
                survivors_buf,
            )
        })?;
        let keys = DeviceBuffer::zeros(dev, batch * 4)?;
        let sample = SampleArgs {
            select: sel,
            layer: 0,
            seed: 0,
            temperature: 1.0,
        };
        let t_sample = time_it(rt, a.iters, || unsafe {
            ops::sample_survivors::sample_survivors(
                at,
                &w,
                &sample,
                scores_buf,
                evict_buf,
                &evict_host,
                Buf::new(keys.ptr(), batch),
                Buf::new(keys.ptr(), batch),
                survivors_buf,
            )
        })?;
        let t_compact = time_it(rt, a.iters, || unsafe {
            ops::compact::compact(
                at,
                a.dtype,
                &kv,
                c,
                &w,
                live as i64,
                evict_buf,
                &evict_host,
                survivors_buf,
                Some((&sl, st)),
            )
        })?;
        Ok([
            us(t_stats),
            us(t_scorer),
            us(t_select),
            us(t_sample),
            us(t_compact),
        ])
    }

    /// Runs every measurement.
    pub fn measure(a: &BenchKernelsArgs) -> Result<BenchKernelsReport, BenchKernelsError> {
        let rt = Runtime::get(a.device)?;
        let ctx = rt.context();
        let name = ctx.name().map_err(driver("cuDeviceGetName"))?;
        let total = ctx.total_mem().map_err(driver("cuDeviceTotalMem"))?;
        let limit = (total as f64 * a.mem_fraction) as u64;
        let copy_bytes = (total / 16).min(1 << 30);
        let copy_gbps = copy_bandwidth(&rt, a.device, copy_bytes, a.iters)?;
        let esize = a.dtype.size() as u64;
        let row_bytes = (a.kv_heads * a.head_dim) as u64 * esize;
        let mut decode = Vec::new();
        for &batch in &a.batches {
            for &live in &a.lives {
                let kv_bytes = 2 * (batch * live) as u64 * row_bytes;
                let alloc =
                    2 * (batch * live.div_ceil(a.block_size) * a.block_size) as u64 * row_bytes;
                let mut row = DecodeRow {
                    batch,
                    live,
                    partitions: 0,
                    time_us: None,
                    kv_bytes,
                    gbps: None,
                    frac_of_copy: None,
                    skipped: None,
                };
                if alloc > limit {
                    row.skipped = Some(format!("needs {alloc} bytes, limit {limit}"));
                } else {
                    let (t, parts) = decode_time(a, &rt, batch, live)?;
                    let gbps = kv_bytes as f64 / t / 1e9;
                    row.partitions = parts;
                    row.time_us = Some(t * 1e6);
                    row.gbps = Some(gbps);
                    row.frac_of_copy = Some(gbps / copy_gbps);
                }
                decode.push(row);
            }
        }
        let mut evict = Vec::new();
        for &batch in &a.evict_batches {
            for &budget in &a.budgets {
                let live = budget + a.interval;
                let alloc =
                    2 * (batch * live.div_ceil(a.block_size) * a.block_size) as u64 * row_bytes;
                if alloc > limit {
                    continue;
                }
                let t = evict_times(a, &rt, batch, budget)?;
                let mid = (budget + a.interval / 2).div_ceil(a.block_size) * a.block_size;
                let (dt, _) = decode_time(a, &rt, batch, mid)?;
                let total_us = t[0] + t[1] + t[3] + t[4];
                evict.push(EvictRow {
                    batch,
                    budget,
                    interval: a.interval,
                    window_stats_us: t[0],
                    scorer_us: t[1],
                    select_us: t[2],
                    sample_us: t[3],
                    compact_us: t[4],
                    total_us,
                    decode_step_us: dt * 1e6,
                    fraction_of_decode: total_us / (a.interval as f64 * dt * 1e6),
                });
            }
        }
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(BenchKernelsReport {
            device: name,
            unix_time,
            dtype: a.dtype,
            heads: (a.q_heads, a.kv_heads, a.head_dim, a.block_size),
            copy_gbps,
            decode,
            evict,
        })
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{BenchKernelsArgs, BenchKernelsError, BenchKernelsReport};
    use crate::cuda::CudaError;

    /// Without the `cuda` feature there is nothing to measure.
    pub fn measure(_a: &BenchKernelsArgs) -> Result<BenchKernelsReport, BenchKernelsError> {
        Err(CudaError::FeatureDisabled.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchKernelsArgs,
    }

    #[test]
    fn defaults_are_the_issue_grid_and_valid() {
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.args.batches, vec![1, 8, 32, 64, 128, 256]);
        assert_eq!(
            (
                cli.args.q_heads,
                cli.args.kv_heads,
                cli.args.head_dim,
                cli.args.dtype
            ),
            (32, 8, 128, DType::Bf16)
        );
        check_args(&cli.args).unwrap();
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let mut a = Cli::parse_from(["x"]).args;
        a.q_heads = 12;
        a.kv_heads = 8;
        assert!(matches!(run(&a), Err(BenchKernelsError::BadArgs(_))));
        let mut a = Cli::parse_from(["x", "--interval", "100"]).args;
        assert!(matches!(check_args(&a), Err(BenchKernelsError::BadArgs(_))));
        a.interval = 128;
        a.head_dim = 96;
        assert!(matches!(check_args(&a), Err(BenchKernelsError::BadArgs(_))));
        assert!(Cli::try_parse_from(["x", "--dtype", "f8"]).is_err());
    }

    #[test]
    fn without_a_usable_gpu_it_is_a_typed_error() {
        // Device 4096 exists nowhere: without kernels or a GPU the run stops there, with GPUs it
        // is a missing device, and no benchmark runs in a unit test either way.
        let a =
            Cli::parse_from(["x", "--batches", "1", "--lives", "1024", "--device", "4096"]).args;
        match run(&a) {
            Err(BenchKernelsError::NoGpu(_))
            | Err(BenchKernelsError::Cuda(
                CudaError::KernelsNotCompiled | CudaError::NoSuchDevice { .. },
            )) => {}
            other => panic!("expected a typed no-GPU error, got {other:?}"),
        }
    }
}

//! Launcher of `fkv_sample_survivors` (csrc/sample_survivors.cu): ForesightKV's reproducible victim
//! sampling on the device, choosing exactly what its CPU reference
//! [`crate::kernels::sample_survivors()`] chooses.

use super::paged::{grid_dim, launch_kernel, DeviceArray, DeviceWindows, Launch};
use super::params::FKV_SAMPLE_THREADS;
use super::{CudaError, Runtime};
use crate::kernels::sample_survivors::{validate_sample, SampleArgs};
use crate::kernels::{KernelError, SelectArgs};

/// What one sampled selection of one layer reads on the device: the twin of
/// [`crate::evict::BatchSelect`] (windows apart) plus the mode's seed and temperature.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSample<'a> {
    /// Heads, row stride, protected window.
    pub args: SelectArgs,
    /// `[num_seqs, num_kv_heads, max_live]` f32 eviction scores (higher = evicted first).
    pub scores: DeviceArray,
    /// `[num_seqs]` int32 victims per sequence.
    pub num_evict: DeviceArray,
    /// Host copy of `num_evict` (validated before launch).
    pub num_evict_host: &'a [i32],
    /// `[num_seqs]` u32 request id of each sequence (sampling key).
    pub requests: DeviceArray,
    /// `[num_seqs]` u32 evictions each sequence has done before this one (sampling key).
    pub evictions: DeviceArray,
    /// Layer of this call (sampling key, below 65536).
    pub layer: u32,
    /// Global seed of the Philox stream.
    pub seed: u64,
    /// Softmax temperature (positive, finite).
    pub temperature: f32,
}

impl DeviceSample<'_> {
    /// The shape and sampling key, as the CPU reference takes them.
    pub fn sample_args(&self) -> SampleArgs {
        SampleArgs {
            select: self.args,
            layer: self.layer,
            seed: self.seed,
            temperature: self.temperature,
        }
    }
}

/// Checks everything a sampled selection needs that does not touch the device: the windows' host
/// mirrors, the arguments of [`validate_sample`] and the device addresses.
fn validate_device_sample(
    windows: &DeviceWindows<'_>,
    batch: &DeviceSample<'_>,
    survivors: &DeviceArray,
) -> Result<(), KernelError> {
    windows.validate(1, false)?;
    validate_sample(
        windows.seq_lens_host,
        windows.live_starts_host,
        &batch.sample_args(),
        batch.num_evict_host,
        batch.requests.len,
        batch.evictions.len,
        batch.scores.len,
        survivors.len,
    )?;
    let n = windows.num_seqs();
    if n == 0 {
        return Ok(());
    }
    batch.scores.non_null("scores")?;
    survivors.non_null("survivors")?;
    for (name, a) in [
        ("num_evict", &batch.num_evict),
        ("requests", &batch.requests),
        ("evictions", &batch.evictions),
    ] {
        a.holding(name, n)?;
    }
    Ok(())
}

/// Enqueues the sampled victim selection on `stream` of device `ordinal`: per (sequence `s`, KV
/// head `kh`) the `live - num_evict[s]` survivors, ascending, to the front of row
/// `s * num_kv_heads + kh` of `survivors` (`[num_seqs, num_kv_heads, max_live]` int32), bit for bit
/// what [`crate::evict::select_survivors_batch`] writes for
/// `VictimMode::Sample { seed, temperature }` with key `(seed, requests[s], layer, kh,
/// evictions[s])`. Only `windows`' lengths are used (block tables may be 0). Every argument is
/// checked (typed [`KernelError`]s) before anything touches the device.
///
/// # Safety
/// The pointers must be device memory of `ordinal` holding the lengths given, alive until the
/// kernel completes; the device `num_evict` and window lengths must match their host mirrors;
/// `stream` must belong to that device.
pub unsafe fn launch_sample_survivors(
    ordinal: usize,
    stream: u64,
    windows: &DeviceWindows<'_>,
    batch: &DeviceSample<'_>,
    survivors: DeviceArray,
) -> Result<(), CudaError> {
    validate_device_sample(windows, batch, &survivors)?;
    let n = windows.num_seqs();
    if n == 0 {
        return Ok(());
    }
    let p = super::params::fkv_sample_params {
        win: windows.raw(),
        scores: batch.scores.ptr as *const f32,
        num_evict: batch.num_evict.ptr as *const i32,
        requests: batch.requests.ptr as *const u32,
        evictions: batch.evictions.ptr as *const u32,
        survivors: survivors.ptr as *mut i32,
        num_kv_heads: batch.args.num_kv_heads,
        max_live: batch.args.max_live,
        num_protected: batch.args.num_protected,
        seed: batch.seed,
        layer: batch.layer,
        temperature: batch.temperature,
    };
    let rt = Runtime::get(ordinal)?;
    let cfg = Launch {
        grid: (batch.args.num_kv_heads as u32, grid_dim("num_seqs", n)?, 1),
        threads: FKV_SAMPLE_THREADS,
        shared: 0,
    };
    launch_kernel(&rt, stream, "fkv_sample_survivors", cfg, &p)
}

//! Launcher of `fkv_select_survivors` (csrc/select_survivors.cu) over caller-owned device memory.

use super::paged::{grid_dim, launch_kernel, DeviceArray, DeviceWindows, Launch};
use super::params::FKV_SELECT_THREADS;
use super::{CudaError, Runtime};
use crate::kernels::select_survivors::validate_select;
use crate::kernels::SelectArgs;

/// Enqueues `select_survivors` on `stream` of device `ordinal`: same contract as
/// [`crate::kernels::select_survivors`]. Only `windows`' lengths are used (block tables may be 0);
/// `num_evict_host` mirrors the device `num_evict` (int32).
///
/// # Safety
/// The pointers must be device memory of `ordinal` holding the lengths given, alive until the
/// kernel completes; the device arrays must match their host mirrors; `stream` must belong to
/// that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_select_survivors(
    ordinal: usize,
    stream: u64,
    windows: &DeviceWindows<'_>,
    args: &SelectArgs,
    scores: DeviceArray,
    num_evict: DeviceArray,
    num_evict_host: &[i32],
    survivors: DeviceArray,
) -> Result<(), CudaError> {
    windows.validate(1, false)?;
    validate_select(
        windows.seq_lens_host,
        windows.live_starts_host,
        args,
        num_evict_host,
        scores.len,
        survivors.len,
    )?;
    let n = windows.num_seqs();
    if n == 0 {
        return Ok(());
    }
    scores.non_null("scores")?;
    num_evict.holding("num_evict", n)?;
    survivors.non_null("survivors")?;
    let p = super::params::fkv_select_params {
        win: windows.raw(),
        scores: scores.ptr as *const f32,
        num_evict: num_evict.ptr as *const i32,
        survivors: survivors.ptr as *mut i32,
        num_kv_heads: args.num_kv_heads,
        max_live: args.max_live,
        num_protected: args.num_protected,
    };
    let rt = Runtime::get(ordinal)?;
    let cfg = Launch {
        grid: (args.num_kv_heads as u32, grid_dim("num_seqs", n)?, 1),
        threads: FKV_SELECT_THREADS,
        shared: 0,
    };
    launch_kernel(&rt, stream, "fkv_select_survivors", cfg, &p)
}

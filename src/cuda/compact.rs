//! Launcher of `fkv_compact` (csrc/compact.cu) over caller-owned device memory.

use super::paged::{grid_dim, raw_stats, DeviceArray, Launch, PagedLaunch};
use super::CudaError;
use crate::kernels::compact::validate_num_evict;
use crate::kernels::scorer_mlp::validate_slot_matrix;
use crate::kernels::{KernelError, StatsLayout};

use super::params::{FKV_COMPACT_STAGE, FKV_COMPACT_THREADS};

/// Floats one block stages per chunk.
const STAGE_FLOATS: usize = FKV_COMPACT_STAGE as usize;

/// Enqueues `compact` on `at`'s stream and device: same contract as
/// [`crate::kernels::compact()`] (`stats` optional). Survivor lists are bounds-checked on the device
/// (an out-of-range entry is skipped) but not checked for order, since they are produced there.
///
/// # Safety
/// The pointers must be device memory of `at.ordinal` holding the lengths given, alive until the
/// kernel completes; the device arrays must match their host mirrors; `at.stream` must belong to
/// that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_compact(
    at: &PagedLaunch<'_>,
    max_live: i64,
    num_evict: DeviceArray,
    num_evict_host: &[i32],
    survivors: DeviceArray,
    stats: Option<(&StatsLayout, DeviceArray)>,
) -> Result<(), CudaError> {
    at.validate()?;
    let (kv, windows) = (at.kv, at.windows);
    validate_num_evict(
        windows.seq_lens_host,
        windows.live_starts_host,
        num_evict_host,
        kv.block_size,
    )?;
    let n = windows.num_seqs();
    validate_slot_matrix(
        "survivors",
        windows.max_live(),
        max_live,
        n,
        kv.num_kv_heads,
        survivors.len,
    )?;
    let stats_row = match stats {
        Some((layout, buf)) => {
            layout.validate(kv, layout.group_size * kv.num_kv_heads, buf.len)?;
            buf.non_null("stats")?;
            layout.row()
        }
        None => 0,
    };
    if 2 * kv.head_dim as usize + stats_row > STAGE_FLOATS {
        return Err(KernelError::InvalidArgument {
            name: "stats",
            why: format!("a K + V + statistics row of more than {STAGE_FLOATS} floats does not fit the compact kernel's staging buffer"),
        }
        .into());
    }
    if n == 0 {
        return Ok(());
    }
    survivors.non_null("survivors")?;
    num_evict.holding("num_evict", n)?;
    let p = super::params::fkv_compact_params {
        kv: at.raw_cache(),
        win: windows.raw(),
        st: raw_stats(stats),
        survivors: survivors.ptr as *const i32,
        num_evict: num_evict.ptr as *const i32,
        max_live,
    };
    let cfg = Launch {
        grid: (kv.num_kv_heads as u32, grid_dim("num_seqs", n)?, 1),
        threads: FKV_COMPACT_THREADS,
        shared: 0,
    };
    at.launch("fkv_compact", cfg, &p)
}

//! Launcher of `fkv_window_stats_{partial,lse,reduce}` (csrc/window_stats.cu) over caller-owned
//! device memory.

use super::paged::{
    grid_dim, launch_kernel, raw_cache, raw_stats, validate_cache, DeviceArray, DeviceCache,
    DeviceWindows, Launch,
};
use super::{CudaError, Runtime};
use crate::kernels::{KernelError, PagedKvLayout, StatsLayout, WindowStatsArgs};
use crate::DType;

/// Live slots per tile of the window_stats kernels (WS_TILE).
const TILE: usize = 32;
/// Threads per block of the tile kernels.
const THREADS: u32 = 128;

/// f32 workspace elements a window_stats call needs:
/// `num_seqs * num_q_heads * max_queries * (2 * ceil(max_live / 32) + 1)`.
pub fn window_stats_workspace_len(
    num_seqs: usize,
    num_q_heads: usize,
    max_queries: usize,
    max_live: usize,
) -> usize {
    let tiles = max_live.div_ceil(TILE).max(1);
    num_seqs
        .saturating_mul(num_q_heads)
        .saturating_mul(max_queries)
        .saturating_mul(tiles.saturating_mul(2).saturating_add(1))
}

/// Enqueues `window_stats` on `stream` of device `ordinal`: same contract as
/// [`crate::kernels::window_stats()`]. `cache.value` is not read (pass the key view twice if you
/// like). `num_queries_host` mirrors the device `num_queries` (int32). `workspace` (f32) must hold
/// [`window_stats_workspace_len`] elements.
///
/// # Safety
/// The pointers must be device memory of `ordinal` holding the lengths given, alive until the
/// kernels complete; the device arrays must match their host mirrors; `stream` must belong to
/// that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_window_stats(
    ordinal: usize,
    stream: u64,
    dtype: DType,
    kv: &PagedKvLayout,
    cache: DeviceCache,
    windows: &DeviceWindows<'_>,
    args: &WindowStatsArgs,
    queries: DeviceArray,
    num_queries: DeviceArray,
    num_queries_host: &[i32],
    stats_layout: &StatsLayout,
    stats: DeviceArray,
    workspace: DeviceArray,
) -> Result<(), CudaError> {
    validate_cache(kv, &cache)?;
    windows.validate(kv.block_size, true)?;
    args.validate(
        kv,
        stats_layout,
        num_queries_host,
        windows.seq_lens_host,
        windows.live_starts_host,
        queries.len,
        stats.len,
    )?;
    let n = windows.num_seqs();
    if n == 0 || num_queries_host.iter().all(|&q| q == 0) {
        return Ok(());
    }
    queries.non_null("queries")?;
    num_queries.non_null("num_queries")?;
    stats.non_null("stats")?;
    if num_queries.len < n {
        return Err(KernelError::BufferTooSmall {
            name: "num_queries",
            have: num_queries.len,
            need: n,
        }
        .into());
    }
    let max_live = windows.max_live();
    let need = window_stats_workspace_len(
        n,
        args.num_q_heads as usize,
        args.max_queries as usize,
        max_live,
    );
    workspace.non_null("workspace")?;
    if workspace.len < need {
        return Err(KernelError::BufferTooSmall {
            name: "workspace",
            have: workspace.len,
            need,
        }
        .into());
    }
    let tiles = max_live.div_ceil(TILE).max(1);
    let p = super::params::fkv_window_stats_params {
        kv: raw_cache(kv, &cache, dtype),
        win: windows.raw(),
        st: raw_stats(Some((stats_layout, stats))),
        queries: queries.ptr as *const _,
        num_queries: num_queries.ptr as *const i32,
        workspace: workspace.ptr as *mut f32,
        q_stride_seq: args.query_strides[0],
        q_stride_query: args.query_strides[1],
        q_stride_head: args.query_strides[2],
        num_q_heads: args.num_q_heads,
        max_queries: args.max_queries,
        num_tiles: tiles as i64,
        window: args.window,
        mode: args.mode.raw(),
        scale: args.scale,
    };
    let grid = (
        kv.num_kv_heads as u32,
        grid_dim("num_seqs", n)?,
        grid_dim("live tiles", tiles)?,
    );
    let rt = Runtime::get(ordinal)?;
    let tile_launch = Launch {
        grid,
        threads: THREADS,
        shared: 0,
    };
    launch_kernel(&rt, stream, "fkv_window_stats_partial", tile_launch, &p)?;
    let lse = Launch {
        grid: (n as u32, 1, 1),
        threads: 256,
        shared: 0,
    };
    launch_kernel(&rt, stream, "fkv_window_stats_lse", lse, &p)?;
    launch_kernel(&rt, stream, "fkv_window_stats_reduce", tile_launch, &p)
}

//! Launcher of `fkv_window_stats_{partial,lse,reduce}` (csrc/window_stats.cu) over caller-owned
//! device memory.

use super::paged::{grid_dim, raw_stats, DeviceArray, Launch, PagedLaunch};
use super::CudaError;
use crate::kernels::{StatsLayout, WindowStatsArgs};

use super::params::{
    FKV_WINDOW_STATS_LSE_THREADS, FKV_WINDOW_STATS_THREADS, FKV_WINDOW_STATS_TILE,
};

/// Live slots per tile of the window_stats kernels.
const TILE: usize = FKV_WINDOW_STATS_TILE as usize;

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

/// Enqueues `window_stats` on `at`'s stream and device: same contract as
/// [`crate::kernels::window_stats_folded()`] (`folded` `None`: [`crate::kernels::window_stats()`]).
/// `cache.value` is not read (pass the key view twice if you like). `num_queries_host` mirrors the
/// device `num_queries` (int32); `folded` is the device int32 `[num_seqs]` array and its host
/// mirror. `workspace` (f32) must hold [`window_stats_workspace_len`] elements.
///
/// # Safety
/// The pointers must be device memory of `at.ordinal` holding the lengths given, alive until the
/// kernels complete; the device arrays must match their host mirrors; `at.stream` must belong to
/// that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_window_stats_folded(
    at: &PagedLaunch<'_>,
    args: &WindowStatsArgs,
    queries: DeviceArray,
    num_queries: DeviceArray,
    num_queries_host: &[i32],
    folded: Option<(DeviceArray, &[i32])>,
    stats_layout: &StatsLayout,
    stats: DeviceArray,
    workspace: DeviceArray,
) -> Result<(), CudaError> {
    at.validate()?;
    let (kv, windows) = (at.kv, at.windows);
    args.validate_folded(
        kv,
        stats_layout,
        num_queries_host,
        folded.map(|f| f.1),
        windows.seq_lens_host,
        windows.live_starts_host,
        queries.len,
        stats.len,
    )?;
    if let Some((f, _)) = folded {
        f.holding("folded", windows.num_seqs())?;
    }
    let n = windows.num_seqs();
    if n == 0 || num_queries_host.iter().all(|&q| q == 0) {
        return Ok(());
    }
    queries.non_null("queries")?;
    num_queries.holding("num_queries", n)?;
    stats.non_null("stats")?;
    let max_live = windows.max_live();
    let need = window_stats_workspace_len(
        n,
        args.num_q_heads as usize,
        args.max_queries as usize,
        max_live,
    );
    workspace.holding("workspace", need)?;
    let tiles = max_live.div_ceil(TILE).max(1);
    let p = super::params::fkv_window_stats_params {
        kv: at.raw_cache(),
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
        folded: folded.map_or(std::ptr::null(), |f| f.0.ptr as *const i32),
        fold_only: i64::from(args.fold_only),
        scale: args.scale,
    };
    let grid = (
        kv.num_kv_heads as u32,
        grid_dim("num_seqs", n)?,
        grid_dim("live tiles", tiles)?,
    );
    let tile_launch = Launch {
        grid,
        threads: FKV_WINDOW_STATS_THREADS,
        shared: 0,
    };
    at.launch("fkv_window_stats_partial", tile_launch, &p)?;
    let lse = Launch {
        grid: (n as u32, 1, 1),
        threads: FKV_WINDOW_STATS_LSE_THREADS,
        shared: 0,
    };
    at.launch("fkv_window_stats_lse", lse, &p)?;
    at.launch("fkv_window_stats_reduce", tile_launch, &p)
}

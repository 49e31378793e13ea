//! `window_stats`: the 8 ForesightKV statistics of every live entry from the queries since the
//! last eviction.

use super::{paged, with_elem, Buf, Cache, OpError, Place, Windows};
use crate::cuda::{launch_window_stats_folded, window_stats_workspace_len};
use crate::kernels::{self, PagedKvLayout, StatsLayout, WindowStatsArgs};
use crate::DType;

/// f32 workspace elements a call needs at `place` (0 on the host).
pub fn workspace_len(place: Place, args: &WindowStatsArgs, windows: &Windows<'_>) -> usize {
    match place {
        Place::Host => 0,
        Place::Cuda { .. } => window_stats_workspace_len(
            windows.seq_lens_host.len(),
            args.num_q_heads.max(0) as usize,
            args.max_queries.max(0) as usize,
            windows.max_live(),
        ),
    }
}

/// Updates `stats` in place, contract of [`kernels::window_stats_folded()`] (`folded` `None`:
/// [`kernels::window_stats()`]); `queries` and `key_cache` in `dtype`, `num_queries` int32 with its
/// host copy `num_queries_host`, `folded` the int32 `[num_seqs]` buffer of rows earlier fold-only
/// calls took, with its host copy; `workspace` f32 of at least [`workspace_len`] elements. Only the
/// key view of the cache is read.
///
/// # Safety
/// As the [module contract](super).
#[allow(clippy::too_many_arguments)]
pub unsafe fn window_stats_folded(
    place: Place,
    dtype: DType,
    kv: &PagedKvLayout,
    key_cache: Buf,
    windows: &Windows<'_>,
    args: &WindowStatsArgs,
    queries: Buf,
    num_queries: Buf,
    num_queries_host: &[i32],
    folded: Option<(Buf, &[i32])>,
    stats_layout: &StatsLayout,
    stats: Buf,
    workspace: Buf,
) -> Result<(), OpError> {
    match place {
        Place::Host => with_elem!(dtype, T => Ok(kernels::window_stats_folded::<T>(
            kv,
            &windows.on_host(),
            args,
            queries.host(),
            num_queries_host,
            folded.map(|f| f.1),
            key_cache.host(),
            stats_layout,
            stats.host_mut(),
        )?)),
        Place::Cuda { ordinal, stream } => {
            let cache = Cache {
                key: key_cache,
                value: key_cache,
                fused: false,
            };
            Ok(launch_window_stats_folded(
                &paged((ordinal, stream), dtype, kv, cache, &windows.on_device()),
                args,
                queries.device(),
                num_queries.device(),
                num_queries_host,
                folded.map(|f| (f.0.device(), f.1)),
                stats_layout,
                stats.device(),
                workspace.device(),
            )?)
        }
    }
}

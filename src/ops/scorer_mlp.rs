//! `scorer_mlp`: the per-KV-head MLP `concat(k, v, stats) -> Linear(16) -> GELU -> Linear(1)` over
//! every live entry.

use super::{paged, with_elem, Buf, Cache, OpError, Place, Windows};
use crate::cuda::{launch_scorer_mlp, DeviceScorerWeights};
use crate::kernels::{self, PagedKvLayout, ScorerWeights, StatsLayout};
use crate::DType;

/// One layer's scorer weights (f32, layouts of [`ScorerWeights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScorerBufs {
    /// `[num_kv_heads, 16, in_dim]`.
    pub w1: Buf,
    /// `[num_kv_heads, 16]`.
    pub b1: Buf,
    /// `[num_kv_heads, 16]`.
    pub w2: Buf,
    /// `[num_kv_heads]`.
    pub b2: Buf,
}

/// Writes `scores` (f32 `[num_seqs, num_kv_heads, max_live]`), contract of
/// [`kernels::scorer_mlp()`]; the cache in `dtype`.
///
/// # Safety
/// As the [module contract](super).
#[allow(clippy::too_many_arguments)]
pub unsafe fn scorer_mlp(
    place: Place,
    dtype: DType,
    kv: &PagedKvLayout,
    cache: Cache,
    windows: &Windows<'_>,
    stats_layout: &StatsLayout,
    stats: Buf,
    weights: ScorerBufs,
    max_live: i64,
    scores: Buf,
) -> Result<(), OpError> {
    match place {
        Place::Host => {
            let w = ScorerWeights {
                w1: weights.w1.host(),
                b1: weights.b1.host(),
                w2: weights.w2.host(),
                b2: weights.b2.host(),
            };
            with_elem!(dtype, T => Ok(kernels::scorer_mlp::<T>(
                kv,
                &windows.on_host(),
                cache.key.host(),
                cache.value.host(),
                stats_layout,
                stats.host(),
                &w,
                max_live,
                scores.host_mut(),
            )?))
        }
        Place::Cuda { ordinal, stream } => {
            let w = DeviceScorerWeights {
                w1: weights.w1.device(),
                b1: weights.b1.device(),
                w2: weights.w2.device(),
                b2: weights.b2.device(),
            };
            Ok(launch_scorer_mlp(
                &paged((ordinal, stream), dtype, kv, cache, &windows.on_device()),
                stats_layout,
                stats.device(),
                w,
                max_live,
                scores.device(),
            )?)
        }
    }
}

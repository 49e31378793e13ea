//! `compact`: per (sequence, KV head), the survivors' K, V and statistics rows moved to the tail of
//! the live window, in place.

use super::{paged, with_elem, Buf, Cache, OpError, Place, Windows};
use crate::cuda::launch_compact;
use crate::kernels::{self, KvCacheMut, PagedKvLayout, StatsLayout};
use crate::DType;

/// Compacts in place, contract of [`kernels::compact()`]; the cache in `dtype` (split or fused, see
/// [`Cache::fused`]), `survivors` int32 `[num_seqs, num_kv_heads, max_live]`, `num_evict` int32
/// `[num_seqs]` with its host copy, `stats` the optional f32 statistics buffer moved along.
///
/// # Safety
/// As the [module contract](super); a fused cache's two views may overlap each other (and only
/// each other).
#[allow(clippy::too_many_arguments)]
pub unsafe fn compact(
    place: Place,
    dtype: DType,
    kv: &PagedKvLayout,
    cache: Cache,
    windows: &Windows<'_>,
    max_live: i64,
    num_evict: Buf,
    num_evict_host: &[i32],
    survivors: Buf,
    stats: Option<(&StatsLayout, Buf)>,
) -> Result<(), OpError> {
    match place {
        Place::Host => {
            let fused = cache.fused;
            let whole = cache.whole(dtype);
            with_elem!(dtype, T => {
                let c = if fused {
                    KvCacheMut::Fused(whole.host_mut::<T>())
                } else {
                    KvCacheMut::Split {
                        key: cache.key.host_mut::<T>(),
                        value: cache.value.host_mut::<T>(),
                    }
                };
                let st = stats.map(|(l, b)| (l, b.host_mut::<f32>()));
                Ok(kernels::compact::<T>(
                    kv,
                    &windows.on_host(),
                    max_live,
                    num_evict_host,
                    survivors.host(),
                    c,
                    st,
                )?)
            })
        }
        Place::Cuda { ordinal, stream } => Ok(launch_compact(
            &paged((ordinal, stream), dtype, kv, cache, &windows.on_device()),
            max_live,
            num_evict.device(),
            num_evict_host,
            survivors.device(),
            stats.map(|(l, b)| (l, b.device())),
        )?),
    }
}

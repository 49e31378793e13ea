//! `reshape_and_cache`: new K/V rows into the cache slots a slot mapping names (negative = padding).

use super::{with_elem, Buf, Cache, OpError, Place};
use crate::cuda::reshape_and_cache::launch_reshape_and_cache;
use crate::kernels::{self, CacheWriteLayout, KvCacheMut};
use crate::DType;

/// Writes token `i`'s rows of `key` / `value` (`dtype`) to slot `slot_mapping[i]` (int64) of the
/// caches, split or fused (see [`Cache::fused`]); contract of
/// [`kernels::reshape_and_cache_into()`].
///
/// # Safety
/// As the [module contract](super): every buffer in `place`'s memory with the lengths given; the
/// caches overlap no input, and each other only as a fused cache.
pub unsafe fn reshape_and_cache(
    place: Place,
    dtype: DType,
    layout: &CacheWriteLayout,
    cache: Cache,
    key: Buf,
    value: Buf,
    slot_mapping: Buf,
) -> Result<(), OpError> {
    match place {
        Place::Host => {
            let whole = cache.whole(dtype);
            with_elem!(dtype, T => {
                let c = if cache.fused {
                    KvCacheMut::Fused(whole.host_mut::<T>())
                } else {
                    KvCacheMut::Split {
                        key: cache.key.host_mut::<T>(),
                        value: cache.value.host_mut::<T>(),
                    }
                };
                Ok(kernels::reshape_and_cache_into::<T>(
                    layout,
                    key.host(),
                    value.host(),
                    c,
                    slot_mapping.host(),
                )?)
            })
        }
        Place::Cuda { ordinal, stream } => Ok(launch_reshape_and_cache(
            ordinal,
            stream,
            dtype,
            layout,
            cache.device(),
            key.device(),
            value.device(),
            slot_mapping.device(),
        )?),
    }
}

//! Launcher of `fkv_reshape_and_cache` (csrc/reshape_and_cache.cu) over caller-owned device memory.

use super::paged::{launch_kernel, raw_cache, DeviceArray, DeviceCache, Launch};
use super::params::{fkv_reshape_and_cache_params, FKV_RESHAPE_THREADS_MAX};
use super::{CudaError, Runtime};
use crate::kernels::{CacheWriteLayout, KernelError};
use crate::DType;

/// Enqueues `reshape_and_cache` on `stream` (raw CUstream; 0 = legacy default) of device `ordinal`:
/// same contract as [`crate::kernels::reshape_and_cache()`], `key` and `value` in `dtype`,
/// `slot_mapping` int64.
///
/// Validates the layout against the buffer lengths first; slot values are bounds-checked on the
/// device (slots past the cache are skipped), since reading them on the host would synchronise.
///
/// # Safety
/// The pointers must be device memory of `ordinal` holding the lengths given, alive until the
/// kernel completes; `stream` must belong to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_reshape_and_cache(
    ordinal: usize,
    stream: u64,
    dtype: DType,
    layout: &CacheWriteLayout,
    cache: DeviceCache,
    key: DeviceArray,
    value: DeviceArray,
    slot_mapping: DeviceArray,
) -> Result<(), CudaError> {
    layout.validate(
        key.len,
        value.len,
        cache.key.len,
        cache.value.len,
        slot_mapping.len,
    )?;
    if layout.num_tokens == 0 {
        return Ok(());
    }
    for (name, a) in [
        ("key", key),
        ("value", value),
        ("key_cache", cache.key),
        ("value_cache", cache.value),
        ("slot_mapping", slot_mapping),
    ] {
        a.non_null(name)?;
    }
    let p = fkv_reshape_and_cache_params {
        kv: raw_cache(&layout.cache, &cache, dtype),
        key: key.ptr as *const _,
        value: value.ptr as *const _,
        slot_mapping: slot_mapping.ptr as *const i64,
        num_tokens: layout.num_tokens,
        key_stride_token: layout.key_strides[0],
        key_stride_head: layout.key_strides[1],
        value_stride_token: layout.value_strides[0],
        value_stride_head: layout.value_strides[1],
    };
    // One block per token along grid x (up to 2^31 - 1 blocks).
    let tokens = u32::try_from(layout.num_tokens)
        .ok()
        .filter(|&t| t <= i32::MAX as u32)
        .ok_or(KernelError::InvalidSize {
            name: "num_tokens",
            value: layout.num_tokens,
            why: "at most 2^31 - 1 per launch",
        })?;
    let row = layout.cache.num_kv_heads * layout.cache.head_dim;
    let cfg = Launch {
        grid: (tokens, 1, 1),
        threads: row.clamp(32, FKV_RESHAPE_THREADS_MAX as i64) as u32,
        shared: 0,
    };
    let rt = Runtime::get(ordinal)?;
    launch_kernel(&rt, stream, "fkv_reshape_and_cache", cfg, &p)
}

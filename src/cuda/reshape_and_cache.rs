//! Launcher of `fkv_reshape_and_cache` (csrc/reshape_and_cache.cu) over caller-owned device memory.

use super::{CudaError, Runtime};
use crate::kernels::CacheWriteLayout;
use crate::DType;

/// Device pointers of one `reshape_and_cache` call (addresses as integers, e.g. `tensor.data_ptr()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheWritePtrs {
    /// New keys.
    pub key: u64,
    /// New values.
    pub value: u64,
    /// Key cache.
    pub key_cache: u64,
    /// Value cache.
    pub value_cache: u64,
    /// int64 slot per token.
    pub slot_mapping: u64,
}

/// Buffer lengths (in elements) the caller vouches for, checked against the layout before launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheWriteLens {
    /// Elements in the key buffer.
    pub key: usize,
    /// Elements in the value buffer.
    pub value: usize,
    /// Elements in the key cache.
    pub key_cache: usize,
    /// Elements in the value cache.
    pub value_cache: usize,
}

/// Enqueues `reshape_and_cache` on `stream` (raw CUstream; 0 = legacy default) of device `ordinal`.
///
/// Validates the layout against `lens` first; slot values are bounds-checked on the device (slots past
/// the cache are skipped), since reading them on the host would synchronise.
///
/// # Safety
/// The pointers must be device memory of `ordinal` holding at least `lens` elements of `dtype` (and
/// `num_tokens` int64 slots), alive until the kernel completes; `stream` must belong to that device.
pub unsafe fn launch_reshape_and_cache(
    ordinal: usize,
    stream: u64,
    dtype: DType,
    layout: &CacheWriteLayout,
    ptrs: CacheWritePtrs,
    lens: CacheWriteLens,
) -> Result<(), CudaError> {
    layout.validate(
        lens.key,
        lens.value,
        lens.key_cache,
        lens.value_cache,
        layout.num_tokens as usize,
    )?;
    let rt = Runtime::get(ordinal)?;
    launch(&rt, stream, dtype, layout, ptrs)
}

#[cfg(feature = "cuda")]
unsafe fn launch(
    rt: &Runtime,
    stream: u64,
    dtype: DType,
    l: &CacheWriteLayout,
    ptrs: CacheWritePtrs,
) -> Result<(), CudaError> {
    use super::params::fkv_reshape_and_cache_params;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    if l.num_tokens == 0 {
        return Ok(());
    }
    let p = fkv_reshape_and_cache_params {
        key: ptrs.key as *const _,
        value: ptrs.value as *const _,
        key_cache: ptrs.key_cache as *mut _,
        value_cache: ptrs.value_cache as *mut _,
        slot_mapping: ptrs.slot_mapping as *const i64,
        num_tokens: l.num_tokens,
        num_kv_heads: l.num_kv_heads,
        head_dim: l.head_dim,
        block_size: l.block_size,
        num_blocks: l.num_blocks,
        key_stride_token: l.key_strides[0],
        key_stride_head: l.key_strides[1],
        value_stride_token: l.value_strides[0],
        value_stride_head: l.value_strides[1],
        kc_stride_block: l.key_cache_strides[0],
        kc_stride_token: l.key_cache_strides[1],
        kc_stride_head: l.key_cache_strides[2],
        vc_stride_block: l.value_cache_strides[0],
        vc_stride_token: l.value_cache_strides[1],
        vc_stride_head: l.value_cache_strides[2],
        dtype: dtype.code(),
    };
    let func = rt.function("fkv_reshape_and_cache")?;
    let stream = rt.borrow_stream(stream)?;
    let threads = (l.num_kv_heads * l.head_dim).clamp(32, 512) as u32;
    let cfg = LaunchConfig {
        grid_dim: (l.num_tokens as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    stream
        .launch_builder(&func)
        .arg(&p)
        .launch(cfg)
        .map_err(|e| CudaError::Driver {
            op: "cuLaunchKernel",
            message: e.to_string(),
        })?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
unsafe fn launch(
    _rt: &Runtime,
    _stream: u64,
    _dtype: DType,
    _l: &CacheWriteLayout,
    _ptrs: CacheWritePtrs,
) -> Result<(), CudaError> {
    Err(CudaError::FeatureDisabled)
}

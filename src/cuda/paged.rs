//! Device-side arguments shared by the paged-cache launchers (decode, window_stats, scorer_mlp,
//! select_survivors, compact): raw device pointers with the lengths the caller vouches for, the
//! host mirrors of the window lengths used for validation, and the one launch helper.

use super::params::{fkv_live_windows, fkv_paged_kv, fkv_stats_buf, FKV_MAX_GRID_YZ};
use super::{CudaError, Runtime};
use crate::kernels::paged::{validate_starts, validate_window_lengths};
use crate::kernels::{KernelError, PagedKvLayout, StatsLayout};
use crate::DType;

/// A device array: address (e.g. `tensor.data_ptr()`) and length in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceArray {
    /// Device address.
    pub ptr: u64,
    /// Elements it holds.
    pub len: usize,
}

impl DeviceArray {
    /// An array of `len` elements at `ptr`.
    pub fn new(ptr: u64, len: usize) -> Self {
        Self { ptr, len }
    }

    /// Fails with `NullPointer` when the address is 0.
    pub fn non_null(&self, name: &'static str) -> Result<u64, KernelError> {
        if self.ptr == 0 {
            Err(KernelError::NullPointer(name))
        } else {
            Ok(self.ptr)
        }
    }

    /// Fails with `NullPointer` when the address is 0, `BufferTooSmall` when it holds fewer than
    /// `need` elements.
    pub fn holding(&self, name: &'static str, need: usize) -> Result<u64, KernelError> {
        if self.len < need {
            return Err(KernelError::BufferTooSmall {
                name,
                have: self.len,
                need,
            });
        }
        self.non_null(name)
    }
}

/// The key and value views of a paged cache on the device (may share one fused tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCache {
    /// Key view.
    pub key: DeviceArray,
    /// Value view.
    pub value: DeviceArray,
}

/// Live windows on the device, with host mirrors of the lengths (engines keep both) so every
/// length is validated before launch without a device synchronisation.
#[derive(Debug, Clone, Copy)]
pub struct DeviceWindows<'a> {
    /// `[num_seqs, block_table_stride]` int32 block ids on the device.
    pub block_tables: u64,
    /// `[num_seqs]` int32 lengths on the device.
    pub seq_lens: u64,
    /// `[num_seqs]` int32 live starts on the device.
    pub live_starts: u64,
    /// Entries per block table row.
    pub block_table_stride: i64,
    /// Host copy of `seq_lens`.
    pub seq_lens_host: &'a [i32],
    /// Host copy of `live_starts`.
    pub live_starts_host: &'a [i32],
}

impl DeviceWindows<'_> {
    /// Sequences in the batch.
    pub fn num_seqs(&self) -> usize {
        self.seq_lens_host.len()
    }

    /// Longest live window (from the host mirrors).
    pub fn max_live(&self) -> usize {
        crate::kernels::paged::max_live(self.seq_lens_host, self.live_starts_host)
    }

    /// Validates lengths (host mirrors) and pointers; block ids are bounds-checked on the device.
    pub fn validate(&self, block_size: i64, need_tables: bool) -> Result<(), KernelError> {
        let n = self.num_seqs();
        if need_tables {
            validate_window_lengths(
                self.seq_lens_host,
                self.live_starts_host,
                self.block_table_stride,
                n * self.block_table_stride.max(0) as usize,
                block_size,
            )?;
        } else {
            validate_starts(self.seq_lens_host, self.live_starts_host, 1)?;
        }
        if n > 0 {
            if need_tables && self.block_tables == 0 {
                return Err(KernelError::NullPointer("block_tables"));
            }
            if self.seq_lens == 0 {
                return Err(KernelError::NullPointer("seq_lens"));
            }
            if self.live_starts == 0 {
                return Err(KernelError::NullPointer("live_starts"));
            }
        }
        if n > FKV_MAX_GRID_YZ as usize {
            return Err(KernelError::InvalidSize {
                name: "num_seqs",
                value: n as i64,
                why: "at most 65535 per launch",
            });
        }
        Ok(())
    }

    /// The C view.
    pub(crate) fn raw(&self) -> fkv_live_windows {
        fkv_live_windows {
            block_tables: self.block_tables as *const i32,
            seq_lens: self.seq_lens as *const i32,
            live_starts: self.live_starts as *const i32,
            block_table_stride: self.block_table_stride,
            num_seqs: self.num_seqs() as i64,
        }
    }
}

/// What every paged-cache launch shares: the device and the caller's stream (raw `CUstream`; 0 =
/// legacy default), the cache's element type, layout and device views, and the live windows.
#[derive(Debug, Clone, Copy)]
pub struct PagedLaunch<'a> {
    /// Device ordinal.
    pub ordinal: usize,
    /// The caller's stream on that device.
    pub stream: u64,
    /// Element type of the cache (and of the queries and outputs of the attention kernels).
    pub dtype: DType,
    /// Shape and strides of the cache.
    pub kv: &'a PagedKvLayout,
    /// The cache on the device.
    pub cache: DeviceCache,
    /// The live windows on the device, with their host mirrors.
    pub windows: &'a DeviceWindows<'a>,
}

impl<'a> PagedLaunch<'a> {
    /// A launch on device `ordinal`, stream `stream`, over a `dtype` cache laid out as `kv`.
    pub fn new(
        (ordinal, stream): (usize, u64),
        dtype: DType,
        kv: &'a PagedKvLayout,
        cache: DeviceCache,
        windows: &'a DeviceWindows<'a>,
    ) -> Self {
        Self {
            ordinal,
            stream,
            dtype,
            kv,
            cache,
            windows,
        }
    }

    /// Validates the cache for the CUDA kernels and the windows against it.
    pub(crate) fn validate(&self) -> Result<(), KernelError> {
        validate_cache(self.kv, &self.cache)?;
        self.windows.validate(self.kv.block_size, true)
    }

    /// The C view of the cache.
    pub(crate) fn raw_cache(&self) -> fkv_paged_kv {
        raw_cache(self.kv, &self.cache, self.dtype)
    }

    /// Enqueues kernel `name` with `params` on the call's device and stream.
    ///
    /// # Safety
    /// As [`launch_kernel`].
    pub(crate) unsafe fn launch<P: KernelParams>(
        &self,
        name: &'static str,
        cfg: Launch,
        params: &P,
    ) -> Result<(), CudaError> {
        let rt = Runtime::get(self.ordinal)?;
        launch_kernel(&rt, self.stream, name, cfg, params)
    }
}

/// Validates a cache layout for the CUDA kernels (head dim 64/128/256, buffer lengths, pointers).
pub(crate) fn validate_cache(kv: &PagedKvLayout, cache: &DeviceCache) -> Result<(), KernelError> {
    kv.validate(cache.key.len, cache.value.len)?;
    kv.validate_cuda_head_dim()?;
    cache.key.non_null("key_cache")?;
    cache.value.non_null("value_cache")?;
    if kv.num_kv_heads > FKV_MAX_GRID_YZ as i64 {
        return Err(KernelError::InvalidSize {
            name: "num_kv_heads",
            value: kv.num_kv_heads,
            why: "at most 65535 per launch",
        });
    }
    Ok(())
}

/// The C view of a cache.
pub(crate) fn raw_cache(kv: &PagedKvLayout, cache: &DeviceCache, dtype: DType) -> fkv_paged_kv {
    fkv_paged_kv {
        key_cache: cache.key.ptr as *mut _,
        value_cache: cache.value.ptr as *mut _,
        num_blocks: kv.num_blocks,
        block_size: kv.block_size,
        num_kv_heads: kv.num_kv_heads,
        head_dim: kv.head_dim,
        k_stride_block: kv.key_strides[0],
        k_stride_token: kv.key_strides[1],
        k_stride_head: kv.key_strides[2],
        v_stride_block: kv.value_strides[0],
        v_stride_token: kv.value_strides[1],
        v_stride_head: kv.value_strides[2],
        dtype: dtype.code(),
    }
}

/// The C view of a statistics buffer (null when absent).
pub(crate) fn raw_stats(stats: Option<(&StatsLayout, DeviceArray)>) -> fkv_stats_buf {
    match stats {
        Some((l, a)) => fkv_stats_buf {
            stats: a.ptr as *mut f32,
            stride_block: l.strides[0],
            stride_token: l.strides[1],
            stride_head: l.strides[2],
            group_size: l.group_size,
        },
        None => fkv_stats_buf {
            stats: std::ptr::null_mut(),
            stride_block: 0,
            stride_token: 0,
            stride_head: 0,
            group_size: 0,
        },
    }
}

/// A kernel's by-value parameter struct (the bindgen structs of csrc/include/fkv_params.h).
#[cfg(feature = "cuda")]
pub(crate) trait KernelParams: cudarc::driver::DeviceRepr {}
#[cfg(feature = "cuda")]
impl<P: cudarc::driver::DeviceRepr> KernelParams for P {}
/// A kernel's by-value parameter struct (without the `cuda` feature nothing launches).
#[cfg(not(feature = "cuda"))]
pub(crate) trait KernelParams {}
#[cfg(not(feature = "cuda"))]
impl<P> KernelParams for P {}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launch {
    /// Grid dimensions.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory in bytes.
    pub shared: u32,
}

/// Enqueues kernel `name` with one by-value parameter struct on the caller's stream.
///
/// # Safety
/// `params` must point only at device memory valid for the kernel; `stream` must belong to the
/// runtime's device.
#[cfg(feature = "cuda")]
pub(crate) unsafe fn launch_kernel<P: KernelParams>(
    rt: &Runtime,
    stream: u64,
    name: &'static str,
    cfg: Launch,
    params: &P,
) -> Result<(), CudaError> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    if cfg.grid.0 == 0 || cfg.grid.1 == 0 || cfg.grid.2 == 0 {
        return Ok(());
    }
    let func = rt.function(name)?;
    let stream = rt.borrow_stream(stream)?;
    let lc = LaunchConfig {
        grid_dim: cfg.grid,
        block_dim: (cfg.threads, 1, 1),
        shared_mem_bytes: cfg.shared,
    };
    stream
        .launch_builder(&func)
        .arg(params)
        .launch(lc)
        .map_err(|e| CudaError::Driver {
            op: "cuLaunchKernel",
            message: e.to_string(),
        })?;
    Ok(())
}

/// Without the `cuda` feature nothing can launch.
///
/// # Safety
/// Never launches.
#[cfg(not(feature = "cuda"))]
pub(crate) unsafe fn launch_kernel<P: KernelParams>(
    _rt: &Runtime,
    _stream: u64,
    _name: &'static str,
    _cfg: Launch,
    _params: &P,
) -> Result<(), CudaError> {
    Err(CudaError::FeatureDisabled)
}

/// Converts a grid dimension, failing on overflow.
pub(crate) fn grid_dim(name: &'static str, v: usize) -> Result<u32, KernelError> {
    if v > FKV_MAX_GRID_YZ as usize {
        return Err(KernelError::InvalidSize {
            name,
            value: v as i64,
            why: "grid dimension above 65535",
        });
    }
    Ok(v as u32)
}

//! One entry per kernel: the call a binding, the CLI or an embedding engine makes, on host or CUDA
//! memory alike. Each op checks its arguments once, through the one validation function of its
//! kernel in [`crate::kernels`] (the CPU reference and the CUDA launcher share it), then runs the
//! CPU reference for [`Place::Host`] or enqueues the CUDA launcher of [`crate::cuda`] on the
//! caller's stream for [`Place::Cuda`]. Tensors are passed as [`Buf`]s (address and element
//! count) the caller owns; nothing is copied or allocated here.
//!
//! Ops are `unsafe`: the caller vouches that every buffer lives in the memory of the call's place,
//! holds the element type and length it names, stays alive until the call (or, on CUDA, the
//! kernel) completes, and that an output overlaps no other buffer of the call. Everything else is
//! checked and reported as a typed [`OpError`].

pub mod compact;
pub mod paged_attention_decode;
pub mod reshape_and_cache;
pub mod sample_survivors;
pub mod scorer_mlp;
pub mod select_survivors;
pub mod window_stats;

use crate::cuda::{CudaError, DeviceArray, DeviceCache, DeviceWindows, PagedLaunch};
use crate::kernels::{KernelError, LiveWindows};
use thiserror::Error;

/// Where one call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The CPU reference, on host memory, on the calling thread.
    Host,
    /// The CUDA kernel on device `ordinal`, enqueued on `stream` (raw `CUstream`; 0 = legacy default).
    Cuda {
        /// Device ordinal.
        ordinal: usize,
        /// The caller's stream (e.g. PyTorch's current stream).
        stream: u64,
    },
}

/// One tensor argument: the address of element 0 (host or device, as the call's [`Place`]) and the
/// number of elements addressed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Buf {
    /// Address of element 0 (0 only when `len` is 0).
    pub addr: u64,
    /// Elements addressed.
    pub len: usize,
}

impl Buf {
    /// A buffer of `len` elements at `addr`.
    pub fn new(addr: u64, len: usize) -> Self {
        Self { addr, len }
    }

    /// A host slice as a buffer.
    pub fn of<T>(s: &[T]) -> Self {
        Self::new(s.as_ptr() as u64, s.len())
    }

    /// The same buffer as a CUDA launcher takes it.
    pub fn device(self) -> DeviceArray {
        DeviceArray::new(self.addr, self.len)
    }

    /// The host memory as a slice (empty when `len` is 0).
    ///
    /// # Safety
    /// `addr` must be host memory holding `len` elements of `T`, alive and not written for `'a`.
    pub unsafe fn host<'a, T>(self) -> &'a [T] {
        if self.len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.addr as usize as *const T, self.len)
    }

    /// The host memory as a mutable slice (empty when `len` is 0).
    ///
    /// # Safety
    /// As [`Buf::host`], and no other live reference may overlap it for `'a`.
    pub unsafe fn host_mut<'a, T>(self) -> &'a mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.addr as usize as *mut T, self.len)
    }
}

/// The key and value views of a paged cache (may be the two halves of one fused tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cache {
    /// Key view.
    pub key: Buf,
    /// Value view.
    pub value: Buf,
    /// The two views are one fused K|V tensor: the value view starts `head_dim` elements after the
    /// key view, with the same strides, and no element is in both (the caller proves it, e.g. the
    /// bindings' `kv_relation`); the CPU references then take them as one buffer. When false, an op
    /// that writes the cache needs the views not to overlap (read-only ops accept any).
    pub fused: bool,
}

impl Cache {
    /// The one buffer of `dtype` elements a fused cache spans: from the key view's start to the end
    /// of the value view (or of the key view, if that ends later).
    fn whole(self, dtype: crate::DType) -> Buf {
        let shift = self.value.addr.saturating_sub(self.key.addr) / dtype.size() as u64;
        let value_end = (shift as usize).saturating_add(self.value.len);
        Buf::new(self.key.addr, self.key.len.max(value_end))
    }

    fn device(self) -> DeviceCache {
        DeviceCache {
            key: self.key.device(),
            value: self.value.device(),
        }
    }
}

/// The live windows of a batch: int32 block tables `[num_seqs, block_table_stride]`, `seq_lens`
/// and `live_starts` `[num_seqs]`, and host copies of the two length vectors (every length is
/// checked on the host before a launch, without a device synchronisation). On [`Place::Host`] the
/// host copies are what is read, and `seq_lens` / `live_starts` may be empty.
#[derive(Debug, Clone, Copy)]
pub struct Windows<'a> {
    /// Block ids.
    pub block_tables: Buf,
    /// Entries per block table row.
    pub block_table_stride: i64,
    /// Lengths, in the call's memory.
    pub seq_lens: Buf,
    /// Live starts, in the call's memory.
    pub live_starts: Buf,
    /// Host copy of `seq_lens`.
    pub seq_lens_host: &'a [i32],
    /// Host copy of `live_starts`.
    pub live_starts_host: &'a [i32],
}

impl<'a> Windows<'a> {
    /// Host windows over slices (block tables may be empty for ops that read only the lengths).
    pub fn host(
        block_tables: &[i32],
        block_table_stride: i64,
        seq_lens: &'a [i32],
        live_starts: &'a [i32],
    ) -> Self {
        Self {
            block_tables: Buf::of(block_tables),
            block_table_stride,
            seq_lens: Buf::of(seq_lens),
            live_starts: Buf::of(live_starts),
            seq_lens_host: seq_lens,
            live_starts_host: live_starts,
        }
    }

    /// Longest live window (from the host copies; 0 for an empty batch).
    pub fn max_live(&self) -> usize {
        crate::kernels::paged::max_live(self.seq_lens_host, self.live_starts_host)
    }

    /// The windows as the CPU references read them.
    ///
    /// # Safety
    /// `block_tables` must be host memory (as [`Buf::host`]).
    unsafe fn on_host(&self) -> LiveWindows<'a> {
        LiveWindows {
            block_tables: self.block_tables.host(),
            block_table_stride: self.block_table_stride,
            seq_lens: self.seq_lens_host,
            live_starts: self.live_starts_host,
        }
    }

    /// The windows as the CUDA launchers take them.
    pub(crate) fn on_device(&self) -> DeviceWindows<'a> {
        DeviceWindows {
            block_tables: self.block_tables.addr,
            seq_lens: self.seq_lens.addr,
            live_starts: self.live_starts.addr,
            block_table_stride: self.block_table_stride,
            seq_lens_host: self.seq_lens_host,
            live_starts_host: self.live_starts_host,
        }
    }
}

/// The device call of a paged-cache op on CUDA device and stream `at` (ordinal, raw stream).
fn paged<'a>(
    at: (usize, u64),
    dtype: crate::DType,
    kv: &'a crate::kernels::PagedKvLayout,
    cache: Cache,
    windows: &'a DeviceWindows<'a>,
) -> PagedLaunch<'a> {
    PagedLaunch::new(at, dtype, kv, cache.device(), windows)
}

/// Why an op was refused or failed.
#[derive(Debug, Error)]
pub enum OpError {
    /// An argument was rejected (host or CUDA alike) before anything ran.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The CUDA side could not run the kernel (no kernels compiled in, no driver, driver error).
    #[error(transparent)]
    Cuda(CudaError),
}

impl From<CudaError> for OpError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Kernel(k) => OpError::Kernel(k),
            other => OpError::Cuda(other),
        }
    }
}

/// Runs `$body` with `$T` bound to the Rust element type of cache dtype `$dtype` ([`crate::DType`]).
macro_rules! with_elem {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::DType::Bf16 => {
                type $T = half::bf16;
                $body
            }
        }
    };
}
pub(crate) use with_elem;

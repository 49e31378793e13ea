//! Device memory owned by foresightkv itself (tests and benchmarks); engines pass their own pointers.

use super::CudaError;
use bytemuck::Pod;

#[cfg(feature = "cuda")]
mod imp {
    use super::{CudaError, Pod};
    use crate::cuda::Runtime;
    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
    use std::sync::Arc;

    fn driver(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
        move |e| CudaError::Driver {
            op,
            message: e.to_string(),
        }
    }

    /// A byte buffer on one device, allocated and copied on that device's default stream.
    pub struct DeviceBuffer {
        slice: CudaSlice<u8>,
        stream: Arc<CudaStream>,
    }

    impl DeviceBuffer {
        /// Copies `data` to device `ordinal`.
        pub fn from_host<T: Pod>(ordinal: usize, data: &[T]) -> Result<Self, CudaError> {
            let rt = Runtime::get(ordinal)?;
            let stream = rt.context().default_stream();
            let bytes: &[u8] = bytemuck::cast_slice(data);
            let slice = if bytes.is_empty() {
                stream.alloc_zeros::<u8>(1).map_err(driver("cuMemAlloc"))?
            } else {
                stream.clone_htod(bytes).map_err(driver("cuMemcpyHtoD"))?
            };
            Ok(Self { slice, stream })
        }

        /// `bytes` zeroed bytes on device `ordinal`.
        pub fn zeros(ordinal: usize, bytes: usize) -> Result<Self, CudaError> {
            let rt = Runtime::get(ordinal)?;
            let stream = rt.context().default_stream();
            let slice = stream
                .alloc_zeros::<u8>(bytes.max(1))
                .map_err(driver("cuMemAlloc"))?;
            Ok(Self { slice, stream })
        }

        /// The device address, to pass to a launcher.
        pub fn ptr(&self) -> u64 {
            let (p, _sync) = self.slice.device_ptr(&self.stream);
            p
        }

        /// Size in bytes.
        pub fn len_bytes(&self) -> usize {
            self.slice.len()
        }

        /// Waits for the device, then copies the buffer back as `T`s.
        pub fn to_host<T: Pod>(&self) -> Result<Vec<T>, CudaError> {
            self.stream
                .context()
                .synchronize()
                .map_err(driver("cuCtxSynchronize"))?;
            let bytes = self
                .stream
                .clone_dtoh(&self.slice)
                .map_err(driver("cuMemcpyDtoH"))?;
            let n = bytes.len() / std::mem::size_of::<T>();
            let mut out = vec![T::zeroed(); n];
            bytemuck::cast_slice_mut::<T, u8>(&mut out)
                .copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
            Ok(out)
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{CudaError, Pod};

    /// Device buffer of a build without the `cuda` feature: every constructor fails.
    pub struct DeviceBuffer;

    impl DeviceBuffer {
        /// Always `FeatureDisabled`.
        pub fn from_host<T: Pod>(_ordinal: usize, _data: &[T]) -> Result<Self, CudaError> {
            Err(CudaError::FeatureDisabled)
        }
        /// Always `FeatureDisabled`.
        pub fn zeros(_ordinal: usize, _bytes: usize) -> Result<Self, CudaError> {
            Err(CudaError::FeatureDisabled)
        }
        /// Never reached.
        pub fn ptr(&self) -> u64 {
            0
        }
        /// Never reached.
        pub fn len_bytes(&self) -> usize {
            0
        }
        /// Always `FeatureDisabled`.
        pub fn to_host<T: Pod>(&self) -> Result<Vec<T>, CudaError> {
            Err(CudaError::FeatureDisabled)
        }
    }
}

pub use imp::DeviceBuffer;

//! The cudarc runtime: the primary context of a device (the one PyTorch uses), the embedded fatbin
//! loaded once per device, and borrowed streams for launching on the caller's stream.

use super::{embedded_fatbin, CudaError};

/// A visible GPU, as `foresightkv info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// (major, minor) compute capability.
    pub compute_capability: (i32, i32),
    /// Total memory in bytes.
    pub total_mem: usize,
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{embedded_fatbin, CudaError, DeviceInfo};
    use cudarc::driver::{
        result, sys, CudaContext, CudaFunction, CudaModule, CudaStream, DriverError,
    };
    use parking_lot::Mutex;
    use std::collections::HashMap;
    use std::sync::{Arc, OnceLock};

    fn driver(op: &'static str) -> impl Fn(DriverError) -> CudaError {
        move |e| CudaError::Driver {
            op,
            message: e.to_string(),
        }
    }

    /// Loads libcuda and initialises the driver, once.
    fn init() -> Result<(), CudaError> {
        static INIT: OnceLock<Result<(), String>> = OnceLock::new();
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        INIT.get_or_init(|| result::init().map_err(|e| e.to_string()))
            .clone()
            .map_err(|message| CudaError::Driver {
                op: "cuInit",
                message,
            })
    }

    /// Number of visible CUDA devices.
    pub fn device_count() -> Result<usize, CudaError> {
        init()?;
        Ok(result::device::get_count().map_err(driver("cuDeviceGetCount"))? as usize)
    }

    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub fn driver_version() -> Result<i32, CudaError> {
        init()?;
        let mut v = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(driver("cuDriverGetVersion"))?;
        Ok(v)
    }

    /// Every visible device.
    pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
        (0..device_count()?)
            .map(|ordinal| {
                let ctx = CudaContext::new(ordinal).map_err(driver("cuDevicePrimaryCtxRetain"))?;
                Ok(DeviceInfo {
                    ordinal,
                    name: ctx.name().map_err(driver("cuDeviceGetName"))?,
                    compute_capability: ctx
                        .compute_capability()
                        .map_err(driver("cuDeviceGetAttribute"))?,
                    total_mem: ctx.total_mem().map_err(driver("cuDeviceTotalMem"))?,
                })
            })
            .collect()
    }

    /// The embedded kernels loaded on one device's primary context.
    pub struct Runtime {
        ctx: Arc<CudaContext>,
        module: Arc<CudaModule>,
        functions: Mutex<HashMap<&'static str, CudaFunction>>,
    }

    impl Runtime {
        /// The runtime of device `ordinal`, created (context retained, fatbin loaded) on first use.
        pub fn get(ordinal: usize) -> Result<Arc<Runtime>, CudaError> {
            static RUNTIMES: OnceLock<Mutex<HashMap<usize, Arc<Runtime>>>> = OnceLock::new();
            let fatbin = embedded_fatbin()?;
            let count = device_count()?;
            if ordinal >= count {
                return Err(CudaError::NoSuchDevice { ordinal, count });
            }
            let mut map = RUNTIMES.get_or_init(Default::default).lock();
            if let Some(rt) = map.get(&ordinal) {
                return Ok(rt.clone());
            }
            let ctx = CudaContext::new(ordinal).map_err(driver("cuDevicePrimaryCtxRetain"))?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
                .map_err(driver("cuModuleLoadData"))?;
            let rt = Arc::new(Runtime {
                ctx,
                module,
                functions: Mutex::new(HashMap::new()),
            });
            map.insert(ordinal, rt.clone());
            Ok(rt)
        }

        /// The kernel named `name` in the embedded fatbin.
        pub fn function(&self, name: &'static str) -> Result<CudaFunction, CudaError> {
            let mut f = self.functions.lock();
            if let Some(func) = f.get(name) {
                return Ok(func.clone());
            }
            let func = self
                .module
                .load_function(name)
                .map_err(driver("cuModuleGetFunction"))?;
            f.insert(name, func.clone());
            Ok(func)
        }

        /// Wraps a stream the caller owns (e.g. PyTorch's current stream; 0 is the legacy default
        /// stream) without taking ownership of it.
        ///
        /// # Safety
        /// `raw` must be a valid stream of this device's primary context, alive while it is used.
        pub unsafe fn borrow_stream(&self, raw: u64) -> Result<Arc<CudaStream>, CudaError> {
            self.ctx
                .bind_to_thread()
                .map_err(driver("cuCtxSetCurrent"))?;
            Ok(self.ctx.wrap_borrowed_stream(raw as sys::CUstream))
        }

        /// The primary context this runtime launches in.
        pub fn context(&self) -> &Arc<CudaContext> {
            &self.ctx
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{embedded_fatbin, CudaError, DeviceInfo};

    /// Number of visible CUDA devices.
    pub fn device_count() -> Result<usize, CudaError> {
        Err(CudaError::FeatureDisabled)
    }
    /// The driver's CUDA version.
    pub fn driver_version() -> Result<i32, CudaError> {
        Err(CudaError::FeatureDisabled)
    }
    /// Every visible device.
    pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
        Err(CudaError::FeatureDisabled)
    }
    /// Placeholder runtime of a build without the `cuda` feature: every call fails with a typed error.
    pub struct Runtime;
    impl Runtime {
        /// Always an error: kernels missing, or the feature off.
        pub fn get(_ordinal: usize) -> Result<std::sync::Arc<Runtime>, CudaError> {
            embedded_fatbin()?;
            Err(CudaError::FeatureDisabled)
        }
    }
}

pub use imp::{device_count, devices, driver_version, Runtime};

/// Whether a usable GPU is visible (driver present and at least one device).
pub fn gpu_available() -> bool {
    matches!(device_count(), Ok(n) if n > 0)
}

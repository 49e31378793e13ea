//! Typed errors of the CUDA runtime and launchers.

use crate::kernels::KernelError;
use thiserror::Error;

/// Why a CUDA operation could not run.
#[derive(Debug, Error)]
pub enum CudaError {
    /// The crate was built without nvcc, so no kernels are embedded.
    #[error(
        "CUDA kernels were not compiled into this build of foresightkv (nvcc was not found at build \
         time); run `eval \"$(scripts/setup.sh)\"` and rebuild, or set NVCC / CUDA_HOME"
    )]
    KernelsNotCompiled,
    /// The crate was built without its `cuda` feature.
    #[error("foresightkv was built without the `cuda` feature; rebuild with --features cuda")]
    FeatureDisabled,
    /// libcuda could not be loaded (no driver, no GPU).
    #[error(
        "the CUDA driver library (libcuda) could not be loaded: no NVIDIA driver on this machine"
    )]
    NoDriver,
    /// The requested device does not exist.
    #[error("CUDA device {ordinal} does not exist ({count} visible)")]
    NoSuchDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices visible.
        count: usize,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {message}")]
    Driver {
        /// The operation that failed.
        op: &'static str,
        /// The driver's description.
        message: String,
    },
    /// The embedded fatbin is malformed.
    #[error("embedded fatbin is malformed: {0}")]
    Fatbin(String),
    /// An argument was rejected before any launch.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

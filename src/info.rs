//! What this build and this machine offer (version, embedded kernel
//! architectures read from the fatbin itself, visible GPUs, cudarc and driver versions).

use crate::cuda::{self, CudaError, FatbinEntry};
use serde::Serialize;

/// Everything `info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// Crate version.
    pub version: String,
    /// Whether the build embedded a fatbin.
    pub kernels_embedded: bool,
    /// Images in the fatbin, e.g. "sm_80", "compute_90 (PTX)".
    pub architectures: Vec<String>,
    /// Size of the embedded fatbin in bytes.
    pub fatbin_bytes: usize,
    /// The cudarc version this build uses.
    pub cudarc_version: &'static str,
    /// Whether the `cuda` feature (cudarc runtime) is compiled in.
    pub cuda_feature: bool,
    /// Driver CUDA version, e.g. "13.0", or why none.
    pub driver: Result<String, String>,
    /// Visible GPUs, or why none.
    pub gpus: Result<Vec<String>, String>,
}

/// cudarc version pinned in Cargo.toml.
pub const CUDARC_VERSION: &str = "0.19";

/// Collects the report.
pub fn collect() -> Result<Info, CudaError> {
    let (kernels_embedded, architectures, fatbin_bytes) = match cuda::embedded_fatbin() {
        Ok(bytes) => {
            let entries = cuda::fatbin::parse_fatbin(bytes)?;
            (
                true,
                entries.iter().map(FatbinEntry::to_string).collect(),
                bytes.len(),
            )
        }
        Err(CudaError::KernelsNotCompiled) => (false, Vec::new(), 0),
        Err(e) => return Err(e),
    };
    let driver = cuda::runtime::driver_version()
        .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
        .map_err(|e| e.to_string());
    let gpus = cuda::runtime::devices()
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    format!(
                        "{}: {} (sm_{}{}, {:.1} GiB)",
                        d.ordinal,
                        d.name,
                        d.compute_capability.0,
                        d.compute_capability.1,
                        d.total_mem as f64 / (1u64 << 30) as f64
                    )
                })
                .collect()
        })
        .map_err(|e| e.to_string());
    Ok(Info {
        version: crate::VERSION.to_string(),
        kernels_embedded,
        architectures,
        fatbin_bytes,
        cudarc_version: CUDARC_VERSION,
        cuda_feature: cfg!(feature = "cuda"),
        driver,
        gpus,
    })
}

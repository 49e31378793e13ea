//! Python bindings of the foresightkv core (the `foresightkv._native` module): configuration
//! objects, the thread-safe `KvCacheManager`, and the kernels as functions over PyTorch tensors and
//! numpy arrays, with every argument validated in Rust and the GIL released around the work.

pub mod args;
pub mod config;
pub mod errors;
pub mod evict;
pub mod kernels;
pub mod manager;
pub mod planner;
pub mod tensor;

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// What this build and machine offer, as `foresightkv info --json` reports it.
#[pyfunction]
fn info<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let info = errors::detached(py, "info", errors::cuda_error, foresightkv::info::collect)?;
    let out = PyDict::new(py);
    out.set_item("version", &info.version)?;
    out.set_item("kernels_embedded", info.kernels_embedded)?;
    out.set_item("architectures", &info.architectures)?;
    out.set_item("fatbin_bytes", info.fatbin_bytes)?;
    out.set_item("cudarc_version", info.cudarc_version)?;
    out.set_item("cuda_feature", info.cuda_feature)?;
    let (driver, driver_error) = split(info.driver);
    out.set_item("driver", driver)?;
    out.set_item("driver_error", driver_error)?;
    let (gpus, gpus_error) = split(info.gpus);
    out.set_item("gpus", gpus.unwrap_or_default())?;
    out.set_item("gpus_error", gpus_error)?;
    Ok(out)
}

fn split<T>(r: Result<T, String>) -> (Option<T>, Option<String>) {
    match r {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    }
}

/// Whether a usable GPU is visible to the CUDA driver.
#[pyfunction]
fn gpu_available(py: Python<'_>) -> bool {
    py.detach(foresightkv::cuda::runtime::gpu_available)
}

/// Whether this build embeds the CUDA kernels (nvcc was found at build time).
#[pyfunction]
fn kernels_compiled() -> bool {
    foresightkv::cuda::embedded_fatbin().is_ok()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", foresightkv::VERSION)?;
    m.add("NUM_STATS", foresightkv::kernels::NUM_STATS)?;
    m.add("SCORER_HIDDEN", foresightkv::kernels::SCORER_HIDDEN)?;
    m.add_class::<config::PyEvictionConfig>()?;
    m.add_class::<config::PyCacheConfig>()?;
    m.add_class::<manager::PyEvictionPlan>()?;
    m.add_class::<manager::PyBlockTables>()?;
    m.add_class::<manager::PyKvCacheManager>()?;
    m.add_class::<planner::PyWindowPlanner>()?;
    m.add_class::<evict::PyScorerCheckpoint>()?;
    m.add_class::<evict::PyPolicy>()?;
    m.add_class::<evict::PyTrace>()?;
    m.add_function(wrap_pyfunction!(evict::simulate, m)?)?;
    m.add_function(wrap_pyfunction!(evict::golden_eviction, m)?)?;
    m.add_function(wrap_pyfunction!(evict::sample_victims, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_available, m)?)?;
    m.add_function(wrap_pyfunction!(kernels_compiled, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::reshape_and_cache, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::paged_attention_decode, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::window_stats, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::scorer_mlp, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::select_survivors, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::sample_survivors, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::compact, m)?)?;
    Ok(())
}

//! `CacheConfig` and `EvictionConfig`: immutable, validated configuration objects with JSON round trips.

use crate::args::{flag, opt_or, size_or};
use crate::errors::{block_error, error, Kind};
use foresightkv::block::{CacheConfig as CoreCache, EvictionConfig as CoreEviction};
use pyo3::prelude::*;

/// Eviction schedule: keep `budget` live entries per (layer, KV head), evict `interval` at a time.
#[pyclass(module = "foresightkv", name = "EvictionConfig", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyEvictionConfig {
    /// The core configuration.
    pub inner: CoreEviction,
}

#[pymethods]
impl PyEvictionConfig {
    #[new]
    #[pyo3(signature = (budget, interval, *, protect_prompt = None))]
    fn new(
        budget: &Bound<'_, PyAny>,
        interval: &Bound<'_, PyAny>,
        protect_prompt: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let protect_prompt = opt_or("protect_prompt", protect_prompt, false, flag)?;
        let budget = size_or(Kind::Config, "budget", budget)?;
        let interval = size_or(Kind::Config, "interval", interval)?;
        if budget == 0 || interval == 0 || interval > budget {
            return Err(error(
                Kind::Config,
                format!("eviction budget {budget} and interval {interval} must be positive with interval <= budget"),
            ));
        }
        Ok(Self {
            inner: CoreEviction {
                budget,
                interval,
                protect_prompt,
            },
        })
    }

    /// Live entries per (layer, KV head) kept after an eviction (B).
    #[getter]
    fn budget(&self) -> usize {
        self.inner.budget
    }

    /// Entries evicted at once (L).
    #[getter]
    fn interval(&self) -> usize {
        self.inner.interval
    }

    /// Whether prompt blocks are never evicted.
    #[getter]
    fn protect_prompt(&self) -> bool {
        self.inner.protect_prompt
    }

    fn __repr__(&self) -> String {
        let e = &self.inner;
        format!(
            "EvictionConfig(budget={}, interval={}, protect_prompt={})",
            e.budget,
            e.interval,
            if e.protect_prompt { "True" } else { "False" }
        )
    }
}

/// Shape of the paged KV cache and its optional eviction schedule, validated on construction.
#[pyclass(module = "foresightkv", name = "CacheConfig", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyCacheConfig {
    /// The core configuration.
    pub inner: CoreCache,
}

#[pymethods]
impl PyCacheConfig {
    #[new]
    #[pyo3(signature = (block_size, num_blocks, *, enable_prefix_caching = None, eviction = None))]
    fn new(
        block_size: &Bound<'_, PyAny>,
        num_blocks: &Bound<'_, PyAny>,
        enable_prefix_caching: Option<&Bound<'_, PyAny>>,
        eviction: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let enable_prefix_caching =
            opt_or("enable_prefix_caching", enable_prefix_caching, false, flag)?;
        let block_size = size_or(Kind::Config, "block_size", block_size)?;
        let num_blocks = size_or(Kind::Config, "num_blocks", num_blocks)?;
        let eviction = match eviction.filter(|e| !e.is_none()) {
            None => None,
            Some(e) => Some(
                e.cast::<PyEvictionConfig>()
                    .map_err(|_| {
                        error(
                            Kind::ArgumentType,
                            format!(
                                "eviction must be an EvictionConfig or None, got {}",
                                crate::args::type_name(e)
                            ),
                        )
                    })?
                    .get()
                    .inner
                    .clone(),
            ),
        };
        let inner = CoreCache {
            block_size,
            num_blocks,
            enable_prefix_caching,
            eviction,
        };
        inner.validate().map_err(block_error)?;
        Ok(Self { inner })
    }

    /// Parses the JSON form written by `to_json` (the core's serde format) and validates it.
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        let inner: CoreCache = serde_json::from_str(text).map_err(|e| {
            error(
                Kind::Config,
                format!(
                    "cache configuration JSON is invalid: {}",
                    foresightkv::config_keys::explain(&e)
                ),
            )
        })?;
        inner.validate().map_err(block_error)?;
        Ok(Self { inner })
    }

    /// The configuration as JSON (the core's serde format, shared with the CLI).
    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner)
            .map_err(|e| error(Kind::Config, format!("cannot serialise: {e}")))
    }

    /// Tokens per block.
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// Blocks in the pool.
    #[getter]
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks
    }

    /// Whether full blocks are shared by token-content hash.
    #[getter]
    fn enable_prefix_caching(&self) -> bool {
        self.inner.enable_prefix_caching
    }

    /// The eviction schedule, or None for a full cache.
    #[getter]
    fn eviction(&self) -> Option<PyEvictionConfig> {
        self.inner
            .eviction
            .clone()
            .map(|inner| PyEvictionConfig { inner })
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        let ev = match &c.eviction {
            None => "None".to_string(),
            Some(e) => PyEvictionConfig { inner: e.clone() }.__repr__(),
        };
        format!(
            "CacheConfig(block_size={}, num_blocks={}, enable_prefix_caching={}, eviction={ev})",
            c.block_size,
            c.num_blocks,
            if c.enable_prefix_caching {
                "True"
            } else {
                "False"
            }
        )
    }
}

//! foresightkv: learned KV-cache eviction (ForesightKV) for paged-attention serving engines.
//!
//! The core owns block tables and the live window of every sequence ([`block`]), chooses what to
//! evict ([`evict`]), and runs the attention and eviction kernels, as CPU references ([`kernels`])
//! and as CUDA kernels embedded in the crate ([`cuda`]). [`replay`] drives it all from production
//! traces. See ARCHITECTURE.md for how the pieces fit.

#![warn(missing_docs)]

pub mod bench_kernels;
pub mod block;
pub mod config_keys;
pub mod cuda;
pub mod dtype;
pub mod evict;
pub mod info;
pub mod kernels;
pub mod limits;
pub mod replay;

pub use dtype::{DType, Element};

/// Version of this crate, as printed by `foresightkv info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

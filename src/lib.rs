//! foresightkv: learned KV-cache eviction (ForesightKV) for paged-attention serving engines.
//!
//! The core owns block tables and the live window of every sequence ([`block`]), chooses what to
//! evict ([`evict`]), and runs the attention and eviction kernels through [`ops`], one entry per
//! kernel that validates once and runs the CPU reference ([`kernels`]) or the CUDA kernel embedded
//! in the crate ([`cuda`]). [`replay`] drives it all from production traces; `cli` (feature `cli`,
//! on by default) is the `foresightkv` command line. See ARCHITECTURE.md for how the pieces fit.

#![warn(missing_docs)]

pub mod block;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config_keys;
pub mod cuda;
pub mod dtype;
pub mod evict;
pub mod info;
pub mod kernels;
pub mod limits;
pub mod ops;
pub mod replay;

pub use dtype::{DType, Element};

/// Version of this crate, as printed by `foresightkv info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

//! CPU references of every kernel: the same contract as the CUDA kernels in csrc/, so everything
//! runs (and is tested) without a GPU, and the CUDA kernels are checked against these.

pub mod error;
pub mod layout;
pub mod reshape_and_cache;

pub use error::KernelError;
pub use layout::CacheWriteLayout;
pub use reshape_and_cache::reshape_and_cache;

//! The CUDA side: the fatbin embedded at build time, the cudarc runtime that loads it on the primary
//! context (shared with PyTorch), and launchers that run kernels on a caller-given stream over raw
//! device pointers the caller owns.
//!
//! Every entry point returns [`CudaError`]; without nvcc at build time, or without the `cuda` feature,
//! they return [`CudaError::KernelsNotCompiled`] / [`CudaError::FeatureDisabled`] instead of failing to build.

pub mod buffer;
pub mod compact;
pub mod error;
pub mod fatbin;
pub mod paged;
pub mod paged_attention_decode;
pub mod params;
pub mod reshape_and_cache;
pub mod runtime;
pub mod sample_survivors;
pub mod scorer_mlp;
pub mod select_survivors;
pub mod window_stats;

pub use buffer::DeviceBuffer;
pub use error::CudaError;
pub use fatbin::{embedded_fatbin, FatbinEntry, FatbinKind};
pub use runtime::{DeviceInfo, Runtime};

pub use compact::launch_compact;
pub use paged::{DeviceArray, DeviceCache, DeviceWindows, PagedLaunch};
pub use paged_attention_decode::{launch_paged_attention_decode, plan_decode, DecodePlan};
pub use sample_survivors::{launch_sample_survivors, DeviceSample};
pub use scorer_mlp::{launch_scorer_mlp, DeviceScorerWeights};
pub use select_survivors::launch_select_survivors;
pub use window_stats::{launch_window_stats_folded, window_stats_workspace_len};

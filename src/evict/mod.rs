//! Eviction decisions: the policy interface over what one (layer, KV head) eviction step sees,
//! the shared victim selection (deterministic top-L or reproducible Philox/Gumbel sampling), the
//! ForesightKV scorer and its checkpoints, the baselines, Golden Eviction, and fidelity replay of
//! recorded or synthetic attention traces.
//!
//! Flow of one eviction step (per layer, KV head): `kernels::window_stats` updates the statistics
//! -> an [`EvictionPolicy`] scores the live entries (higher = evicted first) -> [`select_victims`]
//! picks `L` victims outside the newest `L` -> compaction. [`simulate`] runs exactly this over a
//! [`Trace`]; `foresightkv fidelity` ([`fidelity`]) tabulates it per policy and budget.

pub mod baselines;
pub mod checkpoint;
pub mod convert;
pub mod error;
pub mod fidelity;
pub mod foresight;
pub mod golden;
pub mod philox;
pub mod policy;
pub mod select;
pub mod simulate;
pub mod tensors;
pub mod trace;
pub mod view;

pub use crate::kernels::StatsMode;
pub use baselines::{FullCache, H2o, RandomEviction, Rkv, SnapKv, StreamingLlm, Tova};
pub use checkpoint::{
    normals, LayerWeights, ModelShape, ScorerCheckpoint, ScorerConfig, STATS_VERSION,
};
pub use error::EvictError;
pub use foresight::ForesightPolicy;
pub use golden::{brute_force_future, GoldenPolicy, GoldenScores, Schedule};
pub use philox::{philox4x32_10, SampleKey};
pub use policy::{choose_victims, EvictionPolicy};
pub use select::{
    sample_victims, select_survivors_batch, select_victims, BatchSelect, SampledVictims,
    VictimMode, VictimRequest,
};
pub use simulate::{golden_eviction, simulate, EvictionRecord, Fidelity, SimOptions, SimResult};
pub use trace::{synthetic_trace, LayerTrace, SyntheticConfig, Trace, TraceShape};
pub use view::EvictionView;

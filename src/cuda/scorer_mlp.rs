//! Launcher of `fkv_scorer_mlp` (csrc/scorer_mlp.cu) over caller-owned device memory.

use super::paged::{grid_dim, raw_stats, DeviceArray, Launch, PagedLaunch};
use super::CudaError;
use crate::kernels::scorer_mlp::{scorer_in_dim, validate_scorer_lens, validate_slot_matrix};
use crate::kernels::StatsLayout;

use super::params::{FKV_SCORER_CHUNK, FKV_SCORER_THREADS};

/// One layer's scorer weights on the device (f32, layouts of [`crate::kernels::ScorerWeights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceScorerWeights {
    /// `[num_kv_heads, 16, in_dim]`.
    pub w1: DeviceArray,
    /// `[num_kv_heads, 16]`.
    pub b1: DeviceArray,
    /// `[num_kv_heads, 16]`.
    pub w2: DeviceArray,
    /// `[num_kv_heads]`.
    pub b2: DeviceArray,
}

/// Enqueues `scorer_mlp` on `at`'s stream and device: same contract as
/// [`crate::kernels::scorer_mlp`]; `scores` is `[num_seqs, num_kv_heads, max_live]` f32.
///
/// # Safety
/// The pointers must be device memory of `at.ordinal` holding the lengths given, alive until the
/// kernel completes; `at.stream` must belong to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_scorer_mlp(
    at: &PagedLaunch<'_>,
    stats_layout: &StatsLayout,
    stats: DeviceArray,
    weights: DeviceScorerWeights,
    max_live: i64,
    scores: DeviceArray,
) -> Result<(), CudaError> {
    at.validate()?;
    let (kv, windows) = (at.kv, at.windows);
    stats_layout.validate(kv, stats_layout.group_size * kv.num_kv_heads, stats.len)?;
    let in_dim = scorer_in_dim(kv.head_dim, stats_layout.group_size);
    let nkv = kv.num_kv_heads as usize;
    validate_scorer_lens(
        nkv,
        in_dim,
        weights.w1.len,
        weights.b1.len,
        weights.w2.len,
        weights.b2.len,
    )?;
    let n = windows.num_seqs();
    validate_slot_matrix(
        "scores",
        windows.max_live(),
        max_live,
        n,
        kv.num_kv_heads,
        scores.len,
    )?;
    let chunks = windows.max_live().div_ceil(FKV_SCORER_CHUNK as usize);
    if n == 0 || chunks == 0 {
        return Ok(());
    }
    stats.non_null("stats")?;
    scores.non_null("scores")?;
    for (name, a) in [
        ("w1", weights.w1),
        ("b1", weights.b1),
        ("w2", weights.w2),
        ("b2", weights.b2),
    ] {
        a.non_null(name)?;
    }
    let p = super::params::fkv_scorer_params {
        kv: at.raw_cache(),
        win: windows.raw(),
        st: raw_stats(Some((stats_layout, stats))),
        w1: weights.w1.ptr as *const f32,
        b1: weights.b1.ptr as *const f32,
        w2: weights.w2.ptr as *const f32,
        b2: weights.b2.ptr as *const f32,
        scores: scores.ptr as *mut f32,
        max_live,
        in_dim: in_dim as i64,
    };
    let cfg = Launch {
        grid: (
            nkv as u32,
            grid_dim("num_seqs", n)?,
            grid_dim("slot chunks", chunks)?,
        ),
        threads: FKV_SCORER_THREADS,
        shared: 0,
    };
    at.launch("fkv_scorer_mlp", cfg, &p)
}

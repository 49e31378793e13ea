//! The baseline policies, under the same budget, interval and protected window as ForesightKV:
//! full cache, StreamingLLM, H2O, SnapKV, TOVA, R-KV and random. Each returns eviction propensity
//! (higher = evicted first), i.e. minus the paper's importance.
//!
//! Shared deviation: every method here runs as a decode-time policy that evicts `L` entries per
//! (layer, KV head) each time the cache reaches `B + L`, with the newest `L` protected. Where a paper
//! compresses only the prompt (SnapKV) or keeps its own recent window (H2O, TOVA), the protected
//! window plays that role, so all policies are compared on the same schedule.

use super::philox::SampleKey;
use super::policy::{check_scores, EvictionPolicy};
use super::view::EvictionView;
use super::EvictError;
use crate::kernels::window_stats::{STAT_CUMULATIVE, STAT_SUM32, STAT_SUM8};

/// The full cache: never evicts (the reference every fidelity figure is measured against).
#[derive(Debug, Clone, Copy, Default)]
pub struct FullCache;

impl EvictionPolicy for FullCache {
    fn name(&self) -> String {
        "full".into()
    }
    fn evicts(&self) -> bool {
        false
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        scores[..view.live()].iter_mut().for_each(|s| *s = 0.0);
        Ok(())
    }
}

/// StreamingLLM (Xiao et al., 2023): keep the first `sinks` tokens (attention sinks) and the most
/// recent ones; evicts the oldest non-sink entries first. Sinks are recognised by original
/// position, so they stay sinks after compaction.
#[derive(Debug, Clone, Copy)]
pub struct StreamingLlm {
    /// Attention-sink tokens kept (paper: 4).
    pub sinks: u32,
}

impl Default for StreamingLlm {
    fn default() -> Self {
        Self { sinks: 4 }
    }
}

impl EvictionPolicy for StreamingLlm {
    fn name(&self) -> String {
        "streaming".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        for (s, &p) in scores.iter_mut().zip(view.positions) {
            *s = if p < self.sinks {
                f32::NEG_INFINITY
            } else {
                -(p as f32)
            };
        }
        Ok(())
    }
}

/// H2O (Zhang et al., 2023): heavy hitters by attention accumulated since the token entered the
/// cache, summed over the GQA group (the cumulative statistic of `window_stats`). Deviation: the
/// paper's recent window is the protected window.
#[derive(Debug, Clone, Copy, Default)]
pub struct H2o;

impl EvictionPolicy for H2o {
    fn name(&self) -> String {
        "h2o".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        for (i, s) in scores[..view.live()].iter_mut().enumerate() {
            *s = -view.group_stat(i, STAT_CUMULATIVE);
        }
        Ok(())
    }
}

/// 1-D max pooling over live slots with an odd `kernel` (same-size output, edges clipped), as
/// SnapKV's and R-KV's pooling of attention along the key axis.
pub fn max_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let r = kernel / 2;
    (0..x.len())
        .map(|i| {
            x[i.saturating_sub(r)..(i + r + 1).min(x.len())]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .collect()
}

/// SnapKV (Li et al., 2024): attention of an observation window of recent queries, summed over the
/// window and the GQA group, max-pooled along the key axis. Deviations: the window is the last 32
/// queries since the previous eviction (the `window_stats` 32-query sum, so `min(32, L)` queries
/// after the first eviction; SnapKV's default window is 32) and the policy runs at
/// every eviction instead of once after the prompt; pooling runs over live slots, which after
/// compaction are neighbours in position order among the survivors.
#[derive(Debug, Clone, Copy)]
pub struct SnapKv {
    /// Pooling kernel (odd).
    pub kernel: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        Self { kernel: 7 }
    }
}

impl EvictionPolicy for SnapKv {
    fn name(&self) -> String {
        "snapkv".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        let att: Vec<f32> = (0..view.live())
            .map(|i| view.group_stat(i, STAT_SUM32))
            .collect();
        for (s, a) in scores.iter_mut().zip(max_pool(&att, self.kernel)) {
            *s = -a;
        }
        Ok(())
    }
}

/// TOVA (Oren et al., 2024): evict the entries the last query attends to least, attention averaged
/// over the heads of the GQA group (TOVA averages over heads).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tova;

impl EvictionPolicy for Tova {
    fn name(&self) -> String {
        "tova".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        let (n, m) = (view.live(), view.num_queries());
        if m == 0 {
            return Err(EvictError::arg(
                "queries",
                "TOVA needs at least one recent query",
            ));
        }
        let mut p = vec![0f32; n];
        scores[..n].iter_mut().for_each(|s| *s = 0.0);
        for g in 0..view.group_size {
            view.query_probs(m - 1, g, &mut p);
            for (s, x) in scores.iter_mut().zip(&p) {
                *s -= x / view.group_size as f32;
            }
        }
        Ok(())
    }
}

/// R-KV (Cai et al., 2025): `Z = lambda * I - (1 - lambda) * R`, with importance `I` the attention of
/// the last 8 queries summed over the group (the 8-query statistic) and max-pooled, and redundancy
/// `R = softmax_i(mean_{j != i} cos(k_i, k_j))` over the live keys; evicts the lowest `Z`.
/// Deviation: R-KV additionally spares the most recent of highly similar key pairs (threshold
/// rule); that refinement is omitted, the mean-similarity redundancy is kept.
#[derive(Debug, Clone, Copy)]
pub struct Rkv {
    /// Mixing weight of importance (paper: 0.1).
    pub lambda: f32,
    /// Pooling kernel (odd).
    pub kernel: usize,
}

impl Default for Rkv {
    fn default() -> Self {
        Self {
            lambda: 0.1,
            kernel: 7,
        }
    }
}

impl EvictionPolicy for Rkv {
    fn name(&self) -> String {
        "rkv".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        let n = view.live();
        let att: Vec<f32> = (0..n).map(|i| view.group_stat(i, STAT_SUM8)).collect();
        let imp = max_pool(&att, self.kernel);
        let unit: Vec<Vec<f32>> = (0..n)
            .map(|i| {
                let k = view.key_row(i);
                let norm = k.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                k.iter().map(|x| x / norm).collect()
            })
            .collect();
        let mean_sim: Vec<f32> = (0..n)
            .map(|i| {
                let s: f32 = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| {
                        unit[i]
                            .iter()
                            .zip(&unit[j])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                    })
                    .sum();
                s / (n.max(2) - 1) as f32
            })
            .collect();
        let mx = mean_sim.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let denom: f32 = mean_sim.iter().map(|x| (x - mx).exp()).sum();
        for i in 0..n {
            let red = (mean_sim[i] - mx).exp() / denom;
            scores[i] = -(self.lambda * imp[i] - (1.0 - self.lambda) * red);
        }
        Ok(())
    }
}

/// Uniformly random victims: each entry's score is a Philox uniform of (seed, request, layer, head,
/// eviction, slot), so runs are reproducible.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomEviction {
    /// Seed of the Philox stream.
    pub seed: u64,
}

impl EvictionPolicy for RandomEviction {
    fn name(&self) -> String {
        "random".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        let key = SampleKey {
            seed: self.seed,
            ..view.key
        };
        for (i, s) in scores[..view.live()].iter_mut().enumerate() {
            *s = key.uniform(i as u32) as f32;
        }
        Ok(())
    }
}

//! The baseline policies, under the same budget, interval and protected window as ForesightKV:
//! full cache, StreamingLLM, H2O, SnapKV, TOVA, R-KV and random. Each returns eviction propensity
//! (higher = evicted first), i.e. minus the paper's importance.
//!
//! Shared deviation: every method here runs as a decode-time policy that evicts `L` entries per
//! (layer, KV head) each time the cache reaches `B + L`, with the newest `L` protected. Where a paper
//! compresses only the prompt (SnapKV) or keeps its own recent window (H2O, TOVA), the protected
//! window plays that role, so all policies are compared on the same schedule (as the R-KV code
//! runs SnapKV and R-KV: compress every `L` decoded tokens).
//!
//! Reference implementations followed: SnapKV and R-KV as `rkv/` of Zefan-Cai/R-KV (vendored in
//! RUCAIBox/ForesightKV `evaluation/rkv`, the paper's baselines): window 8, GQA reduction = max of
//! the logits over the group, softmax, *mean* over the window's queries. Only H2O reads the
//! statistics (the cumulative one, identical in both `StatsMode`s), so no baseline depends on the
//! statistics mode. Named deviations: TOVA averages over the GQA group, not the layer ([`Tova`]).

use super::philox::SampleKey;
use super::policy::{check_scores, EvictionPolicy};
use super::view::EvictionView;
use super::EvictError;
use crate::kernels::window_stats::STAT_CUMULATIVE;

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
/// SnapKV's and R-KV's `max_pool1d(kernel, padding = kernel / 2, stride 1)` along the key axis.
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

/// The observation-window importance SnapKV and R-KV share, as the R-KV code computes it
/// (`rkv/utils.py::compute_attention_scores` with `pooling="max"`, then
/// `softmax(attn[:, :, -w:, :-w]).mean(-2)` and `max_pool1d`): for each of the last
/// `w = min(window, m)` queries, the logits `scale * q . k` reduced over the GQA group's heads by
/// their max, softmax over the `n - w` entries before the window's own; the mean over the `w`
/// queries, max-pooled with `kernel`. Returns `n - w` values (the window's own entries get none).
pub fn observation_importance(
    view: &EvictionView<'_>,
    window: usize,
    kernel: usize,
) -> Result<Vec<f32>, EvictError> {
    let (n, m, d, g) = (
        view.live(),
        view.num_queries(),
        view.head_dim,
        view.group_size,
    );
    if m == 0 || window == 0 {
        return Err(EvictError::arg(
            "queries",
            "an observation window needs at least one recent query",
        ));
    }
    let w = window.min(m);
    let keys = n - w;
    let mut imp = vec![0f32; keys];
    let mut logits = vec![0f32; keys];
    for j in m - w..m {
        logits.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        for gi in 0..g {
            let q = &view.queries[(j * g + gi) * d..(j * g + gi + 1) * d];
            for (i, lg) in logits.iter_mut().enumerate() {
                let x = q
                    .iter()
                    .zip(view.key_row(i))
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                    * view.scale;
                *lg = lg.max(x);
            }
        }
        let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let denom: f32 = logits.iter().map(|x| (x - mx).exp()).sum();
        for (o, x) in imp.iter_mut().zip(&logits) {
            *o += (x - mx).exp() / denom / w as f32;
        }
    }
    Ok(max_pool(&imp, kernel))
}

/// SnapKV (Li et al., 2024) as the R-KV code runs it at decode time (the ForesightKV paper's
/// baseline): [`observation_importance`] of the last `window` = 8 queries, pooled with kernel 7;
/// evicts the least important. The window's own entries are never evicted (score -inf), as SnapKV
/// always keeps them. Deviation: none beyond the shared schedule (module doc); SnapKV's original
/// prompt-only variant with a 32-query window is not what the paper compares against.
#[derive(Debug, Clone, Copy)]
pub struct SnapKv {
    /// Pooling kernel (odd).
    pub kernel: usize,
    /// Observation window: the last queries whose attention is averaged (paper baselines: 8).
    pub window: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        Self {
            kernel: 7,
            window: 8,
        }
    }
}

impl EvictionPolicy for SnapKv {
    fn name(&self) -> String {
        "snapkv".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        let imp = observation_importance(view, self.window, self.kernel)?;
        scores[..view.live()]
            .iter_mut()
            .for_each(|s| *s = f32::NEG_INFINITY);
        for (s, a) in scores.iter_mut().zip(&imp) {
            *s = -a;
        }
        Ok(())
    }
}

/// TOVA (Oren et al., 2024): evict the entries the last query attends to least. Deviation (named):
/// TOVA averages the last query's attention over all heads of the layer and evicts one token set
/// per layer; here every (layer, KV head) chooses its own victims (as every policy of this crate
/// does), so the average runs over the heads of the GQA group: a decision sees only its own
/// group's queries.
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

/// R-KV's redundancy of every live key (`rkv/utils.py::cal_similarity`, `retain_direction="last"`):
/// cosine similarities `s_ij` of the unit keys (`k / (|k| + 1e-8)`) with the diagonal zeroed; in
/// each row `i` the entry of the last `j` with `s_ij > threshold` is zeroed too (the most recent of
/// a highly similar pair is spared; with no such `j`, R-KV's code zeroes `s_i0`); then
/// `r_j = softmax_j(mean_i s_ij)` over all `n` keys.
pub fn rkv_redundancy(view: &EvictionView<'_>, threshold: f32) -> Vec<f32> {
    let n = view.live();
    let unit: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            let k = view.key_row(i);
            let norm = k.iter().map(|x| x * x).sum::<f32>().sqrt() + 1e-8;
            k.iter().map(|x| x / norm).collect()
        })
        .collect();
    let mut col = vec![0f32; n];
    let mut row = vec![0f32; n];
    for i in 0..n {
        for (j, r) in row.iter_mut().enumerate() {
            *r = if i == j {
                0.0
            } else {
                unit[i]
                    .iter()
                    .zip(&unit[j])
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
            };
        }
        let retain = (0..n).rev().find(|&j| row[j] > threshold).unwrap_or(0);
        row[retain] = 0.0;
        col.iter_mut().zip(&row).for_each(|(c, r)| *c += r);
    }
    let mean: Vec<f32> = col.iter().map(|c| c / n.max(1) as f32).collect();
    let mx = mean.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let denom: f32 = mean.iter().map(|x| (x - mx).exp()).sum();
    mean.iter().map(|x| (x - mx).exp() / denom).collect()
}

/// R-KV (Cai et al., 2025) as its official code (`rkv/compression/r1_kv.py`): keep the highest
/// `Z = lambda * I - (1 - lambda) * R`, with importance `I` = [`observation_importance`] of the
/// last `window` = 8 queries (max over the GQA group's logits, softmax, mean over the queries,
/// max-pooled) and redundancy `R` = [`rkv_redundancy`]; evicts the lowest `Z`. The window's own
/// entries are never evicted (score -inf). `lambda` = 0.1 as in the R-KV paper (its code's
/// default is 0.07).
#[derive(Debug, Clone, Copy)]
pub struct Rkv {
    /// Mixing weight of importance (paper: 0.1).
    pub lambda: f32,
    /// Pooling kernel (odd).
    pub kernel: usize,
    /// Observation window (R-KV: 8).
    pub window: usize,
    /// Similarity above which the most recent similar key is spared (R-KV: 0.5).
    pub threshold: f32,
}

impl Default for Rkv {
    fn default() -> Self {
        Self {
            lambda: 0.1,
            kernel: 7,
            window: 8,
            threshold: 0.5,
        }
    }
}

impl EvictionPolicy for Rkv {
    fn name(&self) -> String {
        "rkv".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        let imp = observation_importance(view, self.window, self.kernel)?;
        let red = rkv_redundancy(view, self.threshold);
        scores[..view.live()]
            .iter_mut()
            .for_each(|s| *s = f32::NEG_INFINITY);
        for (i, (s, a)) in scores.iter_mut().zip(&imp).enumerate() {
            *s = -(self.lambda * a - (1.0 - self.lambda) * red[i]);
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

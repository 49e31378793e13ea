//! The eviction policies the replay compares, and the kernel work each one's eviction step does.
//! Capacity-wise every evicting policy behaves the same (same budget, same live window); they differ
//! only in what the eviction step costs, which is modelled here by bytes moved and FLOPs.

use super::preset::ModelPreset;
use serde::Serialize;

/// A KV policy: the full cache or one of the eviction policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// No eviction: the full cache.
    Full,
    /// ForesightKV: window statistics, learned scorer, compaction.
    Foresight,
    /// H2O: accumulated attention (heavy hitters).
    H2o,
    /// SnapKV: observation-window attention, pooled.
    Snapkv,
    /// TOVA: the last query's attention.
    Tova,
    /// R-KV: attention plus key redundancy.
    Rkv,
    /// StreamingLLM: attention sinks plus the recent window.
    Streaming,
    /// Uniformly random victims.
    Random,
}

/// Work of one sequence's eviction step, summed over layers and KV heads.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct EvictionWork {
    /// Bytes read and written in device memory.
    pub bytes: f64,
    /// Floating-point operations.
    pub flops: f64,
    /// Kernel launches per eviction step (shared by every sequence evicting in that step).
    pub kernels: u32,
}

/// Attention sinks StreamingLLM keeps.
const SINKS: f64 = 4.0;
/// Statistics per query head kept by ForesightKV, f32 each.
const FORESIGHT_STATS: f64 = 8.0;
/// Hidden width of the ForesightKV scorer MLP.
const SCORER_HIDDEN: f64 = 16.0;

impl Policy {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Full => "full",
            Policy::Foresight => "foresight",
            Policy::H2o => "h2o",
            Policy::Snapkv => "snapkv",
            Policy::Tova => "tova",
            Policy::Rkv => "rkv",
            Policy::Streaming => "streaming",
            Policy::Random => "random",
        }
    }

    /// Whether the policy evicts (everything but the full cache).
    pub fn evicts(self) -> bool {
        self != Policy::Full
    }

    /// Kernel work of one sequence's eviction over `live` entries with interval `interval`.
    pub fn eviction_work(self, model: &ModelPreset, live: usize, interval: usize) -> EvictionWork {
        let (w, l) = (live as f64, interval as f64);
        let d = model.head_dim as f64;
        let e = model.dtype.size() as f64;
        let g = model.group_size() as f64;
        let heads = (model.layers * model.kv_heads) as f64;
        let kv_row = d * e;
        let compaction = |stat_bytes: f64| 2.0 * w * (2.0 * kv_row + stat_bytes);
        let window_attention = |queries: f64| {
            (
                w * kv_row,
                2.0 * queries * w * d * g + 5.0 * queries * w * g,
            )
        };
        let (bytes, flops, kernels) = match self {
            Policy::Full => (0.0, 0.0, 0),
            Policy::Foresight => {
                let stats = FORESIGHT_STATS * g * 4.0;
                let (ab, af) = window_attention(l);
                let stats_io = 2.0 * w * stats;
                let scorer_in = 2.0 * d + FORESIGHT_STATS * g;
                let scorer = (
                    2.0 * w * kv_row + w * stats,
                    2.0 * w * (scorer_in * SCORER_HIDDEN + SCORER_HIDDEN),
                );
                (
                    ab + stats_io + scorer.0 + compaction(stats),
                    af + scorer.1,
                    3,
                )
            }
            Policy::H2o => {
                let (ab, af) = window_attention(l);
                (ab + 2.0 * w * g * 4.0 + compaction(g * 4.0), af, 2)
            }
            Policy::Snapkv => {
                let (ab, af) = window_attention(l);
                (ab + compaction(0.0), af + 2.0 * w * g, 2)
            }
            Policy::Tova => {
                let (ab, af) = window_attention(1.0);
                (ab + compaction(0.0), af, 2)
            }
            Policy::Rkv => {
                let (ab, af) = window_attention(l);
                (2.0 * ab + compaction(0.0), af + 2.0 * w * w * d, 3)
            }
            Policy::Streaming => (2.0 * SINKS * 2.0 * kv_row, 0.0, 1),
            Policy::Random => (compaction(0.0), 0.0, 1),
        };
        EvictionWork {
            bytes: bytes * heads,
            flops: flops * heads,
            kernels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::preset::model;

    #[test]
    fn full_cache_does_no_work_and_others_do() {
        let m = model("qwen3-4b").unwrap();
        assert_eq!(
            Policy::Full.eviction_work(m, 1152, 128),
            EvictionWork::default()
        );
        for p in [
            Policy::Foresight,
            Policy::H2o,
            Policy::Snapkv,
            Policy::Tova,
            Policy::Rkv,
            Policy::Streaming,
            Policy::Random,
        ] {
            let w = p.eviction_work(m, 1152, 128);
            assert!(w.bytes > 0.0 && w.kernels > 0, "{p:?}");
            assert!(p.evicts());
        }
    }

    #[test]
    fn compaction_moves_each_live_kv_row_twice() {
        let m = model("qwen3-4b").unwrap();
        let w = Policy::Random.eviction_work(m, 1000, 128);
        let expected = 2.0 * 1000.0 * 2.0 * 128.0 * 2.0 * (36.0 * 8.0);
        assert!(
            (w.bytes - expected).abs() < 1e-6,
            "{} vs {expected}",
            w.bytes
        );
    }

    #[test]
    fn work_grows_with_the_window_and_foresight_costs_more_than_compaction() {
        let m = model("qwen3-4b").unwrap();
        for p in [
            Policy::Foresight,
            Policy::H2o,
            Policy::Snapkv,
            Policy::Rkv,
            Policy::Random,
        ] {
            let (a, b) = (p.eviction_work(m, 1152, 128), p.eviction_work(m, 4224, 128));
            assert!(b.bytes > a.bytes && b.flops >= a.flops, "{p:?}");
        }
        let f = Policy::Foresight.eviction_work(m, 1152, 128);
        let r = Policy::Random.eviction_work(m, 1152, 128);
        assert!(f.bytes > r.bytes && f.flops > r.flops);
        let rkv = Policy::Rkv.eviction_work(m, 4224, 128);
        assert!(
            rkv.flops > Policy::Snapkv.eviction_work(m, 4224, 128).flops,
            "redundancy is quadratic"
        );
    }
}

//! The roofline cost model of one engine step on a GPU preset: weights and live KV bytes read per
//! decode step, prefill and attention FLOPs, the eviction steps' kernel work, and a fixed step
//! overhead. Its efficiency constants can be replaced by measured timings from `bench-kernels` JSON.

use super::error::ReplayError;
use super::policy_cost::Policy;
use super::preset::{GpuPreset, ModelPreset};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Efficiencies and overheads the roofline assumes where nothing was measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CostConstants {
    /// Fraction of peak memory bandwidth reached by decode and eviction kernels.
    pub bandwidth_efficiency: f64,
    /// Fraction of peak bf16 FLOP/s reached by GEMMs.
    pub flops_efficiency: f64,
    /// Fixed time per engine step (scheduling, sampling, launches under CUDA graphs), seconds.
    pub step_overhead_s: f64,
    /// Time per kernel launch outside CUDA graphs (the eviction kernels), seconds.
    pub launch_overhead_s: f64,
}

impl Default for CostConstants {
    /// Typical figures for a tuned serving engine on a data-centre GPU.
    fn default() -> Self {
        CostConstants {
            bandwidth_efficiency: 0.8,
            flops_efficiency: 0.6,
            step_overhead_s: 3e-4,
            launch_overhead_s: 5e-6,
        }
    }
}

/// One decode-attention row of `bench-kernels` JSON (`decode[]`), per layer.
#[derive(Debug, Clone, Deserialize)]
pub struct DecodeTiming {
    /// Live KV tokens per sequence.
    pub live: usize,
    /// K and V bytes read per call.
    pub kv_bytes: f64,
    /// Mean time per call in microseconds; absent for skipped grid points.
    pub time_us: Option<f64>,
}

/// One eviction-step row of `bench-kernels` JSON (`evict[]`): window stats, scorer, survivor
/// selection and compaction of `batch` sequences, per layer.
#[derive(Debug, Clone, Deserialize)]
pub struct EvictionTiming {
    /// Budget B.
    pub budget: usize,
    /// Interval L.
    pub interval: usize,
    /// Sequences evicting in the measured step.
    pub batch: usize,
    /// Time of the whole step, microseconds.
    pub total_us: f64,
}

/// Measured kernel timings: the JSON `foresightkv bench-kernels --json` writes on the target GPU.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MeasuredTimings {
    /// Query heads, KV heads, head dim and block size the kernels were measured with.
    pub heads: Option<(usize, usize, usize, usize)>,
    /// Decode attention over batch x live-length grids.
    #[serde(default)]
    pub decode: Vec<DecodeTiming>,
    /// ForesightKV eviction steps at several budgets.
    #[serde(default)]
    pub evict: Vec<EvictionTiming>,
}

impl MeasuredTimings {
    /// Reads and checks a `bench-kernels` JSON file.
    pub fn from_path(path: &Path) -> Result<MeasuredTimings, ReplayError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `bench-kernels` JSON text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<MeasuredTimings, ReplayError> {
        let bad = |message: String| ReplayError::Timings {
            path: path.to_path_buf(),
            message,
        };
        let t: MeasuredTimings = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if t.decode.iter().all(|d| d.time_us.is_none()) && t.evict.is_empty() {
            return Err(bad("neither decode nor eviction timings".into()));
        }
        let decode_ok = t.decode.iter().all(|d| {
            d.time_us.is_none_or(|us| us > 0.0 && us.is_finite())
                && d.kv_bytes > 0.0
                && d.kv_bytes.is_finite()
        });
        let evict_ok = t
            .evict
            .iter()
            .all(|e| e.total_us > 0.0 && e.total_us.is_finite() && e.batch > 0 && e.budget > 0);
        let heads_ok = t.heads.is_none_or(|(q, kv, d, _)| q > 0 && kv > 0 && d > 0);
        if !(decode_ok && evict_ok && heads_ok) {
            return Err(bad(
                "timings, sizes and heads must be positive and finite".into()
            ));
        }
        Ok(t)
    }

    /// Achieved KV read bandwidth of decode attention: the median over measured runs with at least
    /// 1K live tokens.
    fn decode_bandwidth(&self) -> Option<f64> {
        let mut bw: Vec<f64> = self
            .decode
            .iter()
            .filter(|d| d.live >= 1024)
            .filter_map(|d| Some(d.kv_bytes / (d.time_us? * 1e-6)))
            .collect();
        if bw.is_empty() {
            return None;
        }
        bw.sort_by(f64::total_cmp);
        Some(bw[bw.len() / 2])
    }

    /// Seconds of one sequence's ForesightKV eviction over all layers of `model` at `budget`: the
    /// nearest measured budget's per-layer time per sequence, scaled to the window size, the
    /// model's layers and its KV heads x head dim against the measured ones.
    fn eviction_seconds(&self, model: &ModelPreset, budget: usize, interval: usize) -> Option<f64> {
        let e = self
            .evict
            .iter()
            .min_by_key(|e| e.budget.abs_diff(budget))?;
        let per_layer = e.total_us * 1e-6 / e.batch as f64;
        let window = (budget + interval) as f64 / (e.budget + e.interval) as f64;
        let heads = match self.heads {
            Some((_, kv, d, _)) => (model.kv_heads * model.head_dim) as f64 / (kv * d) as f64,
            None => 1.0,
        };
        Some(per_layer * window * heads * model.layers as f64)
    }
}

/// What one engine step processes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepWork {
    /// Sequences decoding one token.
    pub decode_seqs: usize,
    /// Live KV tokens the decoding sequences attend to, summed.
    pub decode_live_tokens: u64,
    /// Prompt tokens prefilled (chunks of any number of sequences).
    pub prefill_tokens: u64,
    /// Attention (query, key) pairs of those prefill chunks.
    pub prefill_pairs: f64,
    /// KV tokens of earlier chunks the prefill chunks read.
    pub prefill_context_tokens: u64,
}

/// The cost model of one model on one GPU.
#[derive(Debug, Clone)]
pub struct CostModel {
    model: ModelPreset,
    gpu: GpuPreset,
    consts: CostConstants,
    measured: Option<MeasuredTimings>,
}

impl CostModel {
    /// A model on a GPU, with the default constants and nothing measured.
    pub fn new(model: ModelPreset, gpu: GpuPreset) -> CostModel {
        CostModel {
            model,
            gpu,
            consts: CostConstants::default(),
            measured: None,
        }
    }

    /// Replaces the constants.
    pub fn with_constants(mut self, consts: CostConstants) -> Result<CostModel, ReplayError> {
        let frac = |v: f64| v > 0.0 && v <= 1.0;
        let time = |v: f64| v >= 0.0 && v.is_finite();
        let ok = frac(consts.bandwidth_efficiency)
            && frac(consts.flops_efficiency)
            && time(consts.step_overhead_s)
            && time(consts.launch_overhead_s);
        if !ok {
            return Err(ReplayError::Config(format!(
                "cost constants out of range: {consts:?}"
            )));
        }
        self.consts = consts;
        Ok(self)
    }

    /// Uses measured timings where they apply.
    pub fn with_measured(mut self, measured: MeasuredTimings) -> CostModel {
        self.measured = Some(measured);
        self
    }

    /// The model this cost model prices.
    pub fn model(&self) -> &ModelPreset {
        &self.model
    }

    fn bandwidth(&self) -> f64 {
        self.gpu.bandwidth * self.consts.bandwidth_efficiency
    }

    fn flops(&self) -> f64 {
        self.gpu.bf16_flops * self.consts.flops_efficiency
    }

    /// Seconds of one step without eviction: the slower of reading (weights, KV) and computing, plus
    /// the step overhead. An empty step costs nothing.
    pub fn step_seconds(&self, w: &StepWork) -> f64 {
        let tokens = w.decode_seqs as u64 + w.prefill_tokens;
        if tokens == 0 {
            return 0.0;
        }
        let m = &self.model;
        let kv_token = m.kv_bytes_per_token() as f64;
        let kv_read = (w.decode_live_tokens + w.prefill_context_tokens) as f64 * kv_token;
        let kv_write = tokens as f64 * kv_token;
        let kv_bw = self
            .measured
            .as_ref()
            .and_then(MeasuredTimings::decode_bandwidth)
            .unwrap_or_else(|| self.bandwidth());
        let memory =
            m.weight_bytes() / self.bandwidth() + kv_read / kv_bw + kv_write / self.bandwidth();
        let attn_flops = 4.0
            * (m.layers * m.q_heads * m.head_dim) as f64
            * (w.decode_live_tokens as f64 + w.prefill_pairs);
        let compute = (2.0 * m.params * tokens as f64 + attn_flops) / self.flops();
        memory.max(compute) + self.consts.step_overhead_s
    }

    /// Seconds of the eviction steps of `events` sequences evicting over `live` entries each in one step.
    pub fn eviction_seconds(
        &self,
        policy: Policy,
        events: usize,
        live: usize,
        budget: usize,
        interval: usize,
    ) -> f64 {
        if events == 0 || !policy.evicts() {
            return 0.0;
        }
        let work = policy.eviction_work(&self.model, live, interval);
        let launches = f64::from(work.kernels) * self.consts.launch_overhead_s;
        let measured = match policy {
            Policy::Foresight => self
                .measured
                .as_ref()
                .and_then(|m| m.eviction_seconds(&self.model, budget, interval)),
            _ => None,
        };
        let per_seq = measured
            .unwrap_or_else(|| (work.bytes / self.bandwidth()).max(work.flops / self.flops()));
        launches + per_seq * events as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::preset::{gpu, model};

    fn qwen_h200() -> CostModel {
        CostModel::new(
            model("qwen3-4b").unwrap().clone(),
            gpu("h200").unwrap().clone(),
        )
    }

    #[test]
    fn decode_step_is_bandwidth_bound_and_matches_the_roofline() {
        let c = qwen_h200();
        let w = StepWork {
            decode_seqs: 64,
            decode_live_tokens: 64 * 4096,
            ..Default::default()
        };
        let kv = 147_456.0;
        let bytes_time = (4.02e9 * 2.0 + 64.0 * 4096.0 * kv + 64.0 * kv) / (4.8e12 * 0.8);
        let t = c.step_seconds(&w);
        assert!((t - bytes_time - 3e-4).abs() < 1e-9, "{t} vs {bytes_time}");
        assert_eq!(c.step_seconds(&StepWork::default()), 0.0);
    }

    #[test]
    fn big_prefill_is_compute_bound() {
        let c = qwen_h200();
        let w = StepWork {
            prefill_tokens: 8192,
            prefill_pairs: 8192.0 * 4096.0,
            ..Default::default()
        };
        let flops = 2.0 * 4.02e9 * 8192.0 + 4.0 * (36 * 32 * 128) as f64 * 8192.0 * 4096.0;
        let t = c.step_seconds(&w);
        assert!((t - flops / (989e12 * 0.6) - 3e-4).abs() < 1e-9);
    }

    #[test]
    fn eviction_costs_scale_with_events_and_measurements_replace_the_model() {
        let c = qwen_h200();
        assert_eq!(c.eviction_seconds(Policy::Full, 10, 1152, 1024, 128), 0.0);
        assert_eq!(
            c.eviction_seconds(Policy::Foresight, 0, 1152, 1024, 128),
            0.0
        );
        let one = c.eviction_seconds(Policy::Foresight, 1, 1152, 1024, 128);
        let ten = c.eviction_seconds(Policy::Foresight, 10, 1152, 1024, 128);
        assert!(ten > 9.0 * (one - 15e-6) && one > 0.0);
        let measured = MeasuredTimings {
            heads: Some((32, 8, 128, 16)),
            decode: vec![
                DecodeTiming {
                    live: 4096,
                    kv_bytes: 1e9,
                    time_us: Some(1e3),
                },
                DecodeTiming {
                    live: 8192,
                    kv_bytes: 2e9,
                    time_us: None,
                },
            ],
            evict: vec![EvictionTiming {
                budget: 1024,
                interval: 128,
                batch: 32,
                total_us: 32.0,
            }],
        };
        let m = qwen_h200().with_measured(measured);
        // 32 us per layer for 32 sequences = 1 us per sequence and layer; 36 layers; 2 sequences.
        let e = m.eviction_seconds(Policy::Foresight, 2, 1152, 1024, 128);
        assert!((e - (3.0 * 5e-6 + 2.0 * 36e-6)).abs() < 1e-12, "{e}");
        // At B = 2K the window is (2048 + 128) / (1024 + 128) times larger.
        let e2 = m.eviction_seconds(Policy::Foresight, 1, 2176, 2048, 128);
        assert!(
            (e2 - (3.0 * 5e-6 + 36e-6 * 2176.0 / 1152.0)).abs() < 1e-12,
            "{e2}"
        );
        let w = StepWork {
            decode_seqs: 1,
            decode_live_tokens: 1_000_000,
            ..Default::default()
        };
        assert!(
            m.step_seconds(&w) > c.step_seconds(&w),
            "measured 1 TB/s is slower than 80% of 4.8 TB/s"
        );
    }

    #[test]
    fn timings_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("fkv-timings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"device":"x","heads":[32,8,128,16],"decode":[{"batch":8,"live":2048,"partitions":1,"time_us":200.0,"kv_bytes":5e8,"gbps":2500.0,"frac_of_copy":0.8,"skipped":null}],"evict":[]}"#,
        )
        .unwrap();
        assert_eq!(MeasuredTimings::from_path(&good).unwrap().decode.len(), 1);
        let bad = dir.join("bad.json");
        std::fs::write(
            &bad,
            r#"{"decode":[{"live":2048,"kv_bytes":5e8,"time_us":0.0}]}"#,
        )
        .unwrap();
        assert!(matches!(
            MeasuredTimings::from_path(&bad),
            Err(ReplayError::Timings { .. })
        ));
        std::fs::write(&bad, "{}").unwrap();
        assert!(matches!(
            MeasuredTimings::from_path(&bad),
            Err(ReplayError::Timings { .. })
        ));
        assert!(matches!(
            MeasuredTimings::from_path(&dir.join("none.json")),
            Err(ReplayError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[cfg(feature = "cli")]
    fn reads_what_bench_kernels_writes() {
        use crate::cli::bench_kernels::{BenchKernelsReport, DecodeRow, EvictRow};
        let report = BenchKernelsReport {
            device: "NVIDIA H200".into(),
            unix_time: 0,
            dtype: crate::DType::Bf16,
            heads: (32, 8, 128, 16),
            copy_gbps: 4000.0,
            decode: vec![DecodeRow {
                batch: 32,
                live: 4096,
                partitions: 4,
                time_us: Some(100.0),
                kv_bytes: 300_000_000,
                gbps: Some(3000.0),
                frac_of_copy: Some(0.75),
                skipped: None,
            }],
            evict: vec![EvictRow {
                batch: 32,
                budget: 1024,
                interval: 128,
                window_stats_us: 10.0,
                scorer_us: 5.0,
                select_us: 3.0,
                sample_us: 3.0,
                compact_us: 6.0,
                total_us: 24.0,
                decode_step_us: 50.0,
                fraction_of_decode: 0.004,
            }],
        };
        let dir = std::env::temp_dir().join(format!("fkv-bench-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.json");
        std::fs::write(&path, serde_json::to_string(&report).unwrap()).unwrap();
        let t = MeasuredTimings::from_path(&path).unwrap();
        assert_eq!(t.heads, Some((32, 8, 128, 16)));
        assert!((t.decode_bandwidth().unwrap() - 3e12).abs() < 1.0);
        let m = model("qwen3-4b").unwrap();
        let per_seq = t.eviction_seconds(m, 1024, 128).unwrap();
        assert!((per_seq - 24e-6 / 32.0 * 36.0).abs() < 1e-15);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_constants_are_rejected() {
        let c = CostConstants {
            bandwidth_efficiency: 1.5,
            ..Default::default()
        };
        assert!(matches!(
            qwen_h200().with_constants(c),
            Err(ReplayError::Config(_))
        ));
    }
}

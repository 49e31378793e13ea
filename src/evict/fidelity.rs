//! `foresightkv fidelity`: every policy at every budget over recorded or synthetic traces, reporting
//! the attention mass kept for later queries and the relative error of the attention output against
//! the full cache, with Golden Eviction as the upper reference.

use super::baselines::{FullCache, H2o, RandomEviction, Rkv, SnapKv, StreamingLlm, Tova};
use super::checkpoint::{ModelShape, ScorerCheckpoint};
use super::foresight::ForesightPolicy;
use super::golden::{GoldenPolicy, GoldenScores, Schedule};
use super::policy::EvictionPolicy;
use super::select::VictimMode;
use super::simulate::{simulate, Fidelity, SimOptions};
use super::trace::{synthetic_trace, SyntheticConfig, Trace, TraceShape};
use super::EvictError;
use crate::kernels::StatsMode;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// A policy by name, as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PolicyName {
    /// The full cache.
    Full,
    /// StreamingLLM (4 sinks + recent).
    Streaming,
    /// H2O (cumulative attention).
    H2o,
    /// SnapKV (pooled window attention).
    Snapkv,
    /// TOVA (last query).
    Tova,
    /// R-KV (importance and redundancy).
    Rkv,
    /// Random victims.
    Random,
    /// Golden Eviction (offline oracle).
    Golden,
    /// ForesightKV with a scorer checkpoint (`--scorer`).
    Foresight,
}

/// Settings shared by every policy of a fidelity run.
#[derive(Debug, Clone)]
pub struct FidelityOptions {
    /// Budgets B to evaluate.
    pub budgets: Vec<usize>,
    /// Interval L.
    pub interval: usize,
    /// Prompt tokens (compressed right after prefill when longer than the budget).
    pub prompt_len: usize,
    /// Policies, in table order.
    pub policies: Vec<PolicyName>,
    /// Scorer for [`PolicyName::Foresight`].
    pub scorer: Option<Arc<ScorerCheckpoint>>,
    /// Victim choice of ForesightKV.
    pub foresight_mode: VictimMode,
    /// Seed of the random policy.
    pub seed: u64,
    /// Statistics definition computed (a scorer must have been trained on it).
    pub stats_mode: StatsMode,
}

/// One row of the fidelity table.
#[derive(Debug, Clone, Serialize)]
pub struct FidelityRow {
    /// Trace label.
    pub trace: String,
    /// Budget B.
    pub budget: usize,
    /// Interval L.
    pub interval: usize,
    /// Policy name.
    pub policy: String,
    /// Statistics definition computed.
    pub stats_mode: StatsMode,
    /// Sums behind the means.
    pub fidelity: Fidelity,
    /// Mean attention mass kept.
    pub mass_kept: f64,
    /// Mean relative attention-output error.
    pub rel_err: f64,
    /// Wall time of the replay, seconds.
    pub seconds: f64,
}

/// Builds the policy `name` for `trace` under `schedule` (`golden` shares precomputed scores).
fn build(
    name: PolicyName,
    opts: &FidelityOptions,
    golden: &Option<Arc<GoldenScores>>,
    shape: &TraceShape,
) -> Result<Box<dyn EvictionPolicy>, EvictError> {
    Ok(match name {
        PolicyName::Full => Box::new(FullCache),
        PolicyName::Streaming => Box::new(StreamingLlm::default()),
        PolicyName::H2o => Box::new(H2o),
        PolicyName::Snapkv => Box::new(SnapKv::default()),
        PolicyName::Tova => Box::new(Tova),
        PolicyName::Rkv => Box::new(Rkv::default()),
        PolicyName::Random => Box::new(RandomEviction { seed: opts.seed }),
        PolicyName::Golden => match golden {
            Some(g) => Box::new(GoldenPolicy { scores: g.clone() }),
            None => return Err(EvictError::arg("golden", "future scores were not computed")),
        },
        PolicyName::Foresight => {
            let ck = opts.scorer.clone().ok_or_else(|| {
                EvictError::arg(
                    "policies",
                    "foresight needs a scorer checkpoint (--scorer DIR)",
                )
            })?;
            ck.check_model(&ModelShape {
                num_layers: shape.num_layers,
                num_kv_heads: shape.num_kv_heads,
                group_size: shape.group_size(),
                head_dim: shape.head_dim,
            })?;
            Box::new(ForesightPolicy::new(ck, opts.foresight_mode))
        }
    })
}

/// Runs every policy of `opts` at every budget over `trace`; rows in (budget, policy) order.
pub fn fidelity_table(
    label: &str,
    trace: &Trace,
    opts: &FidelityOptions,
) -> Result<Vec<FidelityRow>, EvictError> {
    let shape = trace.shape();
    let mut rows = Vec::new();
    for &budget in &opts.budgets {
        let schedule = Schedule {
            budget,
            interval: opts.interval,
            prompt_len: opts.prompt_len,
        };
        schedule.validate()?;
        let golden = if opts.policies.contains(&PolicyName::Golden) {
            let start = Instant::now();
            let g = GoldenScores::compute(trace, schedule)?;
            tracing::info!(
                budget,
                seconds = start.elapsed().as_secs_f64(),
                record_bytes = g.record_bytes(),
                "golden future scores computed"
            );
            Some(Arc::new(g))
        } else {
            None
        };
        for &name in &opts.policies {
            let policy = build(name, opts, &golden, &shape)?;
            let start = Instant::now();
            let res = simulate(
                trace,
                policy.as_ref(),
                &SimOptions {
                    stats_mode: opts.stats_mode,
                    ..SimOptions::new(schedule)
                },
            )?;
            rows.push(FidelityRow {
                trace: label.to_string(),
                budget,
                interval: opts.interval,
                policy: policy.name(),
                stats_mode: opts.stats_mode,
                fidelity: res.fidelity,
                mass_kept: res.fidelity.mass(),
                rel_err: res.fidelity.rel_err(),
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }
    Ok(rows)
}

/// Formats rows as a fixed-width text table.
pub fn format_table(rows: &[FidelityRow]) -> String {
    let mut s = format!(
        "{:<24} {:>7} {:>5} {:<14} {:>10} {:>11} {:>9} {:>9} {:>8}\n",
        "trace",
        "budget",
        "L",
        "policy",
        "mass_kept",
        "rel_out_err",
        "queries",
        "evictions",
        "secs"
    );
    for r in rows {
        s += &format!(
            "{:<24} {:>7} {:>5} {:<14} {:>10.4} {:>11.4} {:>9} {:>9} {:>8.2}\n",
            r.trace,
            r.budget,
            r.interval,
            r.policy,
            r.mass_kept,
            r.rel_err,
            r.fidelity.queries,
            r.fidelity.evictions,
            r.seconds
        );
    }
    s
}

/// Arguments of `foresightkv fidelity`.
#[derive(Debug, Clone, clap::Args)]
pub struct FidelityArgs {
    /// Recorded traces (safetensors, `layers.{l}.queries|keys|values`); none = one synthetic trace.
    #[arg(long = "trace")]
    pub traces: Vec<PathBuf>,
    /// Budgets B (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "128,256,512")]
    pub budgets: Vec<usize>,
    /// Eviction interval L.
    #[arg(long, default_value_t = 32)]
    pub interval: usize,
    /// Leading trace tokens treated as the prompt (prefilled, compressed when longer than B).
    #[arg(long, default_value_t = 0)]
    pub prompt_len: usize,
    /// Policies (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "full,streaming,h2o,snapkv,tova,rkv,random,golden"
    )]
    pub policies: Vec<PolicyName>,
    /// Scorer checkpoint directory for the foresight policy.
    #[arg(long)]
    pub scorer: Option<PathBuf>,
    /// Statistics definition to compute (default: the scorer's own, else `paper`); a scorer
    /// trained on the other mode is refused.
    #[arg(long, value_enum)]
    pub stats_mode: Option<StatsMode>,
    /// Choose ForesightKV victims deterministically (top-L) instead of sampling.
    #[arg(long)]
    pub top_l: bool,
    /// Seed of the random policy and of ForesightKV sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Synthetic trace: tokens.
    #[arg(long, default_value_t = 2048)]
    pub syn_len: usize,
    /// Synthetic trace: layers.
    #[arg(long, default_value_t = 2)]
    pub syn_layers: usize,
    /// Synthetic trace: query heads.
    #[arg(long, default_value_t = 8)]
    pub syn_q_heads: usize,
    /// Synthetic trace: KV heads.
    #[arg(long, default_value_t = 2)]
    pub syn_kv_heads: usize,
    /// Synthetic trace: head dimension.
    #[arg(long, default_value_t = 64)]
    pub syn_head_dim: usize,
    /// Synthetic trace: generator seed.
    #[arg(long, default_value_t = 0)]
    pub syn_seed: u64,
    /// Also write the synthetic trace to this safetensors file.
    #[arg(long)]
    pub save_synthetic: Option<PathBuf>,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Runs `foresightkv fidelity` and prints the table.
pub fn run_fidelity(args: &FidelityArgs) -> Result<(), EvictError> {
    let scorer = match (&args.scorer, args.stats_mode) {
        (Some(dir), Some(mode)) => Some(Arc::new(ScorerCheckpoint::load_with_mode(dir, mode)?)),
        (Some(dir), None) => Some(Arc::new(ScorerCheckpoint::load(dir)?)),
        (None, _) => None,
    };
    let stats_mode = args
        .stats_mode
        .or(scorer.as_ref().map(|c| c.config.stats_mode))
        .unwrap_or_default();
    let opts = FidelityOptions {
        budgets: args.budgets.clone(),
        interval: args.interval,
        prompt_len: args.prompt_len,
        policies: args.policies.clone(),
        scorer,
        foresight_mode: if args.top_l {
            VictimMode::TopL
        } else {
            VictimMode::Sample {
                seed: args.seed,
                temperature: 1.0,
            }
        },
        seed: args.seed,
        stats_mode,
    };
    let mut traces: Vec<(String, Trace)> = Vec::new();
    if args.traces.is_empty() {
        let shape = TraceShape {
            num_layers: args.syn_layers,
            num_q_heads: args.syn_q_heads,
            num_kv_heads: args.syn_kv_heads,
            head_dim: args.syn_head_dim,
            len: args.syn_len,
        };
        let trace = synthetic_trace(&SyntheticConfig::new(shape, args.syn_seed))?;
        if let Some(p) = &args.save_synthetic {
            trace.save(p)?;
        }
        traces.push((format!("synthetic-{}", args.syn_seed), trace));
    }
    for p in &args.traces {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| p.display().to_string());
        traces.push((name, Trace::load(p)?));
    }
    let mut all = Vec::new();
    for (label, trace) in &traces {
        let s = trace.shape();
        println!(
            "# {label}: {} tokens, {} layers, {} query heads, {} KV heads, head_dim {}; statistics mode {}",
            s.len, s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim, opts.stats_mode
        );
        let rows = fidelity_table(label, trace, &opts)?;
        print!("{}", format_table(&rows));
        all.extend(rows);
    }
    if let Some(p) = &args.json {
        let json = serde_json::to_vec_pretty(&all).map_err(|source| EvictError::Json {
            path: p.display().to_string(),
            source,
        })?;
        super::tensors::write_file(p, &json)?;
    }
    Ok(())
}

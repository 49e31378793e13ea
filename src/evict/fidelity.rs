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
use super::trace::{Trace, TraceShape};
use super::EvictError;
use crate::kernels::StatsMode;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// A policy by name, as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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

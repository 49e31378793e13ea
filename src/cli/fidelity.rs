//! `foresightkv fidelity`: every policy at every budget against Golden Eviction on attention traces.

use crate::evict::fidelity::{fidelity_table, format_table, FidelityOptions, PolicyName};
use crate::evict::{
    synthetic_trace, EvictError, ScorerCheckpoint, SyntheticConfig, Trace, TraceShape, VictimMode,
};
use crate::kernels::StatsMode;
use std::path::PathBuf;
use std::sync::Arc;

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
pub fn run(args: &FidelityArgs) -> Result<(), EvictError> {
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
        crate::evict::tensors::write_file(p, &json)?;
    }
    Ok(())
}

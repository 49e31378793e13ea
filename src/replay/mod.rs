//! Production-trace replay, `foresightkv replay`: how much more traffic a GPU serves at which
//! eviction budget. Requests from the Azure LLM inference traces (or any CSV with their columns)
//! go through a continuous-batching scheduler that drives the real [`crate::block::KvCacheManager`];
//! each step is priced by a roofline cost model of a model preset on a GPU preset; the full cache
//! runs next to each policy and budget, and the result is a table, JSON and a PNG.

pub mod cost;
pub mod error;
pub mod export;
pub mod metrics;
#[cfg(feature = "cli")]
pub mod plot;
pub mod policy_cost;
pub mod preset;
pub mod report;
pub mod request_trace;
pub mod scenario;
pub mod scheduler;

pub use cost::{CostConstants, CostModel, MeasuredTimings};
pub use error::ReplayError;
pub use metrics::RunMetrics;
pub use policy_cost::Policy;
pub use report::{Report, Setup};
pub use request_trace::{BundledTrace, Trace, TraceRequest};
pub use scenario::{OutputLengths, ScenarioKind, ScenarioSpec};
pub use scheduler::{
    simulate, Admission, BlockOp, NoObserver, Observer, SchedulerConfig, StepView,
};

use rayon::prelude::*;
use std::path::PathBuf;

/// Arguments of `foresightkv replay`. With none: the bundled conversation trace in the reasoning
/// scenario on Qwen3-4B / H200, the full cache against ForesightKV at B = 1K, 2K, 4K, L = 128.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ReplayArgs {
    /// Trace: "conv" or "code" (bundled Azure 2023 traces) or a CSV path with the columns
    /// TIMESTAMP, ContextTokens, GeneratedTokens.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().trace))]
    pub trace: String,
    /// Scenario.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = ReplayArgs::default().scenario))]
    pub scenario: ScenarioKind,
    /// Requests to replay: the first N of the trace, or N identical ones in the paper setting
    /// [default: 1000 from a trace, 512 in the paper setting].
    #[cfg_attr(feature = "cli", arg(long))]
    pub requests: Option<usize>,
    /// Arrival-rate multiplier (2 = arrivals twice as dense).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().rate_scale))]
    pub rate_scale: f64,
    /// Reasoning scenario: median output length (log-normal).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().output_median))]
    pub output_median: f64,
    /// Reasoning scenario: standard deviation of the log output length.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().output_sigma))]
    pub output_sigma: f64,
    /// Reasoning scenario: shortest output.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().output_min))]
    pub output_min: u32,
    /// Reasoning scenario: longest output.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().output_max))]
    pub output_max: u32,
    /// Paper setting: prompt length.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().prompt_len))]
    pub prompt_len: u32,
    /// Paper setting: output length of every request.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().output_len))]
    pub output_len: u32,
    /// Model preset (qwen3-1.7b, qwen3-4b, qwen3-8b, deepseek-r1-distill-qwen-7b, llama-3.1-8b).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().model))]
    pub model: String,
    /// GPU preset (h200, h100, a100-80g or a800, l4).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().gpu))]
    pub gpu: String,
    /// Share of GPU memory for weights and KV cache.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().mem_fraction))]
    pub mem_fraction: f64,
    /// Eviction policies to compare with the full cache (which always runs).
    #[cfg_attr(feature = "cli", arg(long, value_enum, value_delimiter = ',', default_values_t = ReplayArgs::default().policy))]
    pub policy: Vec<Policy>,
    /// Budgets B in tokens (multiples of the block size).
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', default_values_t = ReplayArgs::default().budgets))]
    pub budgets: Vec<usize>,
    /// Eviction interval L in tokens.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().interval))]
    pub interval: usize,
    /// Tokens per KV block.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().block_size))]
    pub block_size: usize,
    /// Evict generated tokens only; prompts stay whole.
    #[cfg_attr(feature = "cli", arg(long))]
    pub protect_prompt: bool,
    /// Admission rule.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = ReplayArgs::default().admission))]
    pub admission: Admission,
    /// Most sequences running at once.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().max_num_seqs))]
    pub max_num_seqs: usize,
    /// Most tokens per step (decode tokens plus prefill chunks).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().max_batched_tokens))]
    pub max_batched_tokens: usize,
    /// Stop after this many simulated seconds.
    #[cfg_attr(feature = "cli", arg(long))]
    pub horizon_s: Option<f64>,
    /// Measured kernel timings (`bench-kernels` JSON) replacing the roofline's constants.
    #[cfg_attr(feature = "cli", arg(long))]
    pub timings: Option<PathBuf>,
    /// Seed of the output-length draws.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReplayArgs::default().seed))]
    pub seed: u64,
    /// Write the report as JSON here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: Option<PathBuf>,
    /// Write the PNG plot here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub plot: Option<PathBuf>,
    /// Write the block-manager operation sequence of the first evicting run (or the full cache's
    /// when none evicts) here as CSV, for bench/vllm_manager_compare.py.
    #[cfg_attr(feature = "cli", arg(long))]
    pub export_ops: Option<PathBuf>,
    /// No progress bars.
    #[cfg_attr(feature = "cli", arg(long))]
    pub quiet: bool,
}

impl Default for ReplayArgs {
    /// The defaults of `foresightkv replay` with no arguments (the command line reads them here).
    fn default() -> Self {
        let out = OutputLengths::default();
        Self {
            trace: "conv".into(),
            scenario: ScenarioKind::Reasoning,
            requests: None,
            rate_scale: 1.0,
            output_median: out.median,
            output_sigma: out.sigma,
            output_min: out.min,
            output_max: out.max,
            prompt_len: 128,
            output_len: 32_768,
            model: "qwen3-4b".into(),
            gpu: "h200".into(),
            mem_fraction: 0.9,
            policy: vec![Policy::Foresight],
            budgets: vec![1024, 2048, 4096],
            interval: 128,
            block_size: 16,
            protect_prompt: false,
            admission: Admission::Footprint,
            max_num_seqs: 1024,
            max_batched_tokens: 8192,
            horizon_s: None,
            timings: None,
            seed: 0,
            json: None,
            plot: None,
            export_ops: None,
            quiet: false,
        }
    }
}

/// Follows the runs of a replay (the command line draws progress bars from it); called from the
/// threads that run them.
pub trait RunProgress: Sync {
    /// Run `run` (of `configs`, in order), labelled `label`, starts over `total` requests.
    fn started(&self, run: usize, label: &str, total: usize);
    /// Run `run` has finished `done` requests.
    fn advanced(&self, run: usize, done: usize);
    /// Run `run` is over.
    fn finished(&self, run: usize);
}

/// No progress reporting.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl RunProgress for NoProgress {
    fn started(&self, _run: usize, _label: &str, _total: usize) {}
    fn advanced(&self, _run: usize, _done: usize) {}
    fn finished(&self, _run: usize) {}
}

/// Requests replayed by default from a trace (enough to saturate an H200 with reasoning outputs at
/// the recorded arrival rate, small enough to replay in seconds).
pub const DEFAULT_TRACE_REQUESTS: usize = 1000;
/// Requests replayed by default in the paper setting.
pub const DEFAULT_PAPER_REQUESTS: usize = 512;

/// Loads the trace named on the command line.
pub fn load_trace(name: &str) -> Result<Trace, ReplayError> {
    match name {
        "conv" | "conversation" => Trace::bundled(BundledTrace::Conversation),
        "code" => Trace::bundled(BundledTrace::Code),
        path => Trace::from_path(std::path::Path::new(path)),
    }
}

/// The runs a replay does: the full cache, then every policy at every budget.
pub fn run_configs(
    args: &ReplayArgs,
    num_blocks: usize,
) -> Result<Vec<SchedulerConfig>, ReplayError> {
    if args.budgets.is_empty() {
        return Err(ReplayError::Config("no budget given".into()));
    }
    let mut policies: Vec<Policy> = args.policy.iter().copied().filter(|p| p.evicts()).collect();
    policies.sort();
    policies.dedup();
    let base = SchedulerConfig {
        policy: Policy::Full,
        budget: None,
        interval: args.interval,
        block_size: args.block_size,
        num_blocks,
        protect_prompt: args.protect_prompt,
        admission: args.admission,
        max_num_seqs: args.max_num_seqs,
        max_batched_tokens: args.max_batched_tokens,
        horizon_s: args.horizon_s,
    };
    base.cache_config().validate()?;
    let mut configs = vec![base.clone()];
    for &policy in &policies {
        for &budget in &args.budgets {
            let c = SchedulerConfig {
                policy,
                budget: Some(budget),
                ..base.clone()
            };
            c.cache_config().validate()?;
            configs.push(c);
        }
    }
    Ok(configs)
}

/// Runs the whole replay described by `args` and returns its report; `progress` follows each run.
pub fn replay(args: &ReplayArgs, progress: &dyn RunProgress) -> Result<Report, ReplayError> {
    let trace = load_trace(&args.trace)?;
    let requests_n = args.requests.unwrap_or(match args.scenario {
        ScenarioKind::Paper => DEFAULT_PAPER_REQUESTS,
        _ => DEFAULT_TRACE_REQUESTS,
    });
    let spec = ScenarioSpec {
        kind: args.scenario,
        requests: requests_n,
        rate_scale: args.rate_scale,
        output: OutputLengths {
            median: args.output_median,
            sigma: args.output_sigma,
            min: args.output_min,
            max: args.output_max,
        },
        paper_prompt: args.prompt_len,
        paper_output: args.output_len,
        seed: args.seed,
    };
    let requests = spec.build(&trace)?;
    let model = preset::model(&args.model)?;
    let gpu = preset::gpu(&args.gpu)?;
    let kv_bytes = preset::kv_memory_bytes(model, gpu, args.mem_fraction)?;
    if args.block_size == 0 {
        return Err(ReplayError::Config("block size must be positive".into()));
    }
    let num_blocks = preset::num_blocks(model, kv_bytes, args.block_size);
    let mut cost = CostModel::new(model.clone(), gpu.clone());
    if let Some(path) = &args.timings {
        cost = cost.with_measured(MeasuredTimings::from_path(path)?);
    }
    let configs = run_configs(args, num_blocks)?;
    let export_index = configs.iter().position(|c| c.policy.evicts()).unwrap_or(0);

    let runs: Vec<Result<RunMetrics, ReplayError>> = configs
        .par_iter()
        .enumerate()
        .map(|(i, cfg)| {
            let label = match cfg.budget {
                Some(b) => format!("{} B={b}", cfg.policy.name()),
                None => cfg.policy.name().to_string(),
            };
            progress.started(i, &label, requests.len());
            let advanced = |done: usize| progress.advanced(i, done);
            let result = match (&args.export_ops, i == export_index) {
                (Some(path), true) => {
                    let mut exporter = export::OpExporter::create(path)?;
                    let r = simulate(&requests, cfg, &cost, &mut exporter, Some(&advanced));
                    exporter.finish()?;
                    r
                }
                _ => simulate(&requests, cfg, &cost, &mut NoObserver, Some(&advanced)),
            };
            progress.finished(i);
            result
        })
        .collect();
    let runs = runs.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Report {
        setup: Setup {
            trace: if args.scenario == ScenarioKind::Paper {
                "none (paper setting)".into()
            } else {
                trace.name.clone()
            },
            scenario: format!("{:?}", args.scenario).to_lowercase(),
            requests: requests.len(),
            model: model.name.into(),
            gpu: gpu.name.into(),
            memory_fraction: args.mem_fraction,
            kv_gib: kv_bytes / preset::GIB,
            num_blocks,
            block_size: args.block_size,
            interval: args.interval,
            protect_prompt: args.protect_prompt,
            admission: format!("{:?}", args.admission).to_lowercase(),
            measured_timings: args.timings.is_some(),
        },
        runs,
    })
}

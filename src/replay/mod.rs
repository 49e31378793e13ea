//! Production-trace replay, `foresightkv replay`: how much more traffic a GPU serves at which
//! eviction budget. Requests from the Azure LLM inference traces (or any CSV with their columns)
//! go through a continuous-batching scheduler that drives the real [`crate::block::KvCacheManager`];
//! each step is priced by a roofline cost model of a model preset on a GPU preset; the full cache
//! runs next to each policy and budget, and the result is a table, JSON and a PNG.

pub mod cost;
pub mod error;
pub mod export;
pub mod metrics;
pub mod plot;
pub mod policy;
pub mod preset;
pub mod report;
pub mod scenario;
pub mod scheduler;
pub mod trace;

pub use cost::{CostConstants, CostModel, MeasuredTimings};
pub use error::ReplayError;
pub use metrics::RunMetrics;
pub use policy::Policy;
pub use report::{Report, Setup};
pub use scenario::{OutputLengths, ScenarioKind, ScenarioSpec};
pub use scheduler::{
    simulate, Admission, BlockOp, NoObserver, Observer, SchedulerConfig, StepView,
};
pub use trace::{BundledTrace, Trace, TraceRequest};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use std::path::PathBuf;

/// Arguments of `foresightkv replay`. With none: the bundled conversation trace in the reasoning
/// scenario on Qwen3-4B / H200, the full cache against ForesightKV at B = 1K, 2K, 4K, L = 128.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Trace: "conv" or "code" (bundled Azure 2023 traces) or a CSV path with the columns
    /// TIMESTAMP, ContextTokens, GeneratedTokens.
    #[arg(long, default_value = "conv")]
    pub trace: String,
    /// Scenario.
    #[arg(long, value_enum, default_value_t = ScenarioKind::Reasoning)]
    pub scenario: ScenarioKind,
    /// Requests to replay: the first N of the trace, or N identical ones in the paper setting
    /// [default: 1000 from a trace, 512 in the paper setting].
    #[arg(long)]
    pub requests: Option<usize>,
    /// Arrival-rate multiplier (2 = arrivals twice as dense).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Reasoning scenario: median output length (log-normal).
    #[arg(long, default_value_t = OutputLengths::default().median)]
    pub output_median: f64,
    /// Reasoning scenario: standard deviation of the log output length.
    #[arg(long, default_value_t = OutputLengths::default().sigma)]
    pub output_sigma: f64,
    /// Reasoning scenario: shortest output.
    #[arg(long, default_value_t = OutputLengths::default().min)]
    pub output_min: u32,
    /// Reasoning scenario: longest output.
    #[arg(long, default_value_t = OutputLengths::default().max)]
    pub output_max: u32,
    /// Paper setting: prompt length.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: u32,
    /// Paper setting: output length of every request.
    #[arg(long, default_value_t = 32_768)]
    pub output_len: u32,
    /// Model preset (qwen3-1.7b, qwen3-4b, qwen3-8b, deepseek-r1-distill-qwen-7b, llama-3.1-8b).
    #[arg(long, default_value = "qwen3-4b")]
    pub model: String,
    /// GPU preset (h200, h100, a100-80g or a800, l4).
    #[arg(long, default_value = "h200")]
    pub gpu: String,
    /// Share of GPU memory for weights and KV cache.
    #[arg(long, default_value_t = 0.9)]
    pub mem_fraction: f64,
    /// Eviction policies to compare with the full cache (which always runs).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "foresight")]
    pub policy: Vec<Policy>,
    /// Budgets B in tokens (multiples of the block size).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    pub budgets: Vec<usize>,
    /// Eviction interval L in tokens.
    #[arg(long, default_value_t = 128)]
    pub interval: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Evict generated tokens only; prompts stay whole.
    #[arg(long)]
    pub protect_prompt: bool,
    /// Admission rule.
    #[arg(long, value_enum, default_value_t = Admission::Footprint)]
    pub admission: Admission,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 1024)]
    pub max_num_seqs: usize,
    /// Most tokens per step (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 8192)]
    pub max_batched_tokens: usize,
    /// Stop after this many simulated seconds.
    #[arg(long)]
    pub horizon_s: Option<f64>,
    /// Measured kernel timings (`bench-kernels` JSON) replacing the roofline's constants.
    #[arg(long)]
    pub timings: Option<PathBuf>,
    /// Seed of the output-length draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the PNG plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the block-manager operation sequence of the first evicting run (or the full cache's
    /// when none evicts) here as CSV, for bench/vllm_manager_compare.py.
    #[arg(long)]
    pub export_ops: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for ReplayArgs {
    /// The defaults of `foresightkv replay` with no arguments.
    fn default() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: ReplayArgs,
        }
        Wrap::parse_from(["replay"]).args
    }
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

/// Runs the whole replay described by `args` and returns its report.
pub fn replay(args: &ReplayArgs) -> Result<Report, ReplayError> {
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

    let bars = MultiProgress::with_draw_target(if args.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let style =
        ProgressStyle::with_template("{prefix:>16} [{bar:30}] {pos}/{len} requests {elapsed}")
            .map_err(|e| ReplayError::Config(e.to_string()))?
            .progress_chars("=> ");
    let runs: Vec<Result<RunMetrics, ReplayError>> = configs
        .par_iter()
        .enumerate()
        .map(|(i, cfg)| {
            let bar = bars.add(ProgressBar::new(requests.len() as u64));
            bar.set_style(style.clone());
            bar.set_prefix(match cfg.budget {
                Some(b) => format!("{} B={b}", cfg.policy.name()),
                None => cfg.policy.name().to_string(),
            });
            let progress = |done: usize| bar.set_position(done as u64);
            let result = match (&args.export_ops, i == export_index) {
                (Some(path), true) => {
                    let mut exporter = export::OpExporter::create(path)?;
                    let r = simulate(&requests, cfg, &cost, &mut exporter, Some(&progress));
                    exporter.finish()?;
                    r
                }
                _ => simulate(&requests, cfg, &cost, &mut NoObserver, Some(&progress)),
            };
            bar.finish();
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

/// Runs `foresightkv replay`: prints the table, writes the JSON and the PNG when asked.
pub fn run(args: &ReplayArgs) -> Result<(), ReplayError> {
    let report = replay(args)?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        plot::write_png(&report, path)?;
    }
    Ok(())
}

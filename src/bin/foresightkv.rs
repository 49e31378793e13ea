//! The `foresightkv` command line: build and device information, trace replay, kernel benchmarks
//! and policy fidelity. Each subcommand's arguments and logic live in the library; this file only
//! dispatches.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "foresightkv",
    version,
    about = "Learned KV-cache eviction for paged-attention serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Version, embedded kernels and their architectures, visible GPUs, driver.
    Info(foresightkv::info::InfoArgs),
    /// Replay a production trace through the scheduler and block manager: throughput against the full cache.
    Replay(foresightkv::replay::ReplayArgs),
    /// Every eviction policy at every budget over attention traces: mass kept and output error vs the full cache.
    Fidelity(foresightkv::evict::fidelity::FidelityArgs),
    /// Convert an official ForesightKV checkpoint (judge_model tensors) to a scorer-only checkpoint.
    ConvertScorer(foresightkv::evict::convert::ConvertArgs),
    /// GPU benchmark of decode attention (bandwidth vs copy) and of the eviction step (share of decode).
    BenchKernels(foresightkv::bench_kernels::BenchKernelsArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Info(args) => foresightkv::info::run(&args).map_err(Into::into),
        Command::Replay(args) => foresightkv::replay::run(&args).map_err(Into::into),
        Command::Fidelity(args) => {
            foresightkv::evict::fidelity::run_fidelity(&args).map_err(Into::into)
        }
        Command::ConvertScorer(args) => {
            foresightkv::evict::convert::run_convert(&args).map_err(Into::into)
        }
        Command::BenchKernels(args) => foresightkv::bench_kernels::run(&args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

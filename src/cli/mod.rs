//! The `foresightkv` command line (feature `cli`): argument parsing, printing and progress for the
//! subcommands, over the library. The binary (src/bin/foresightkv.rs) only calls [`main`]; a
//! library that embeds foresightkv builds without this module and without clap, indicatif and
//! plotters.

pub mod bench_kernels;
pub mod convert_scorer;
pub mod fidelity;
pub mod info;
pub mod replay;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The command line.
#[derive(Parser)]
#[command(
    name = "foresightkv",
    version,
    about = "Learned KV-cache eviction for paged-attention serving"
)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Version, embedded kernels and their architectures, visible GPUs, driver.
    Info(info::InfoArgs),
    /// Replay a production trace through the scheduler and block manager: throughput against the full cache.
    Replay(crate::replay::ReplayArgs),
    /// Every eviction policy at every budget over attention traces: mass kept and output error vs the full cache.
    Fidelity(fidelity::FidelityArgs),
    /// Convert an official ForesightKV checkpoint (judge_model tensors) to a scorer-only checkpoint.
    ConvertScorer(convert_scorer::ConvertArgs),
    /// GPU benchmark of decode attention (bandwidth vs copy) and of the eviction step (share of decode).
    BenchKernels(bench_kernels::BenchKernelsArgs),
}

/// Runs one subcommand.
pub fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Info(args) => info::run(&args)?,
        Command::Replay(args) => replay::run(&args)?,
        Command::Fidelity(args) => fidelity::run(&args)?,
        Command::ConvertScorer(args) => convert_scorer::run(&args)?,
        Command::BenchKernels(args) => bench_kernels::run(&args)?,
    }
    Ok(())
}

/// The program: logging to stderr (`RUST_LOG`, default `warn`), the parsed command line, and the
/// exit status (`error: <why>` on stderr when a subcommand fails).
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

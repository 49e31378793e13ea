//! `foresightkv convert-scorer`: an official ForesightKV checkpoint to a scorer-only checkpoint.

use crate::evict::convert::convert_official_dir;
use crate::evict::EvictError;
use std::path::PathBuf;

/// Arguments of `foresightkv convert-scorer`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// Model directory with the official checkpoint's `*.safetensors` shards and `config.json`.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory of the scorer-only checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Budget B the scorer was trained with.
    #[arg(long)]
    pub budget: usize,
    /// Eviction interval L the scorer was trained with.
    #[arg(long)]
    pub interval: usize,
}

/// Runs `foresightkv convert-scorer`: reads every shard, converts, writes, prints a summary.
pub fn run(args: &ConvertArgs) -> Result<(), EvictError> {
    let (ck, shape, shards) = convert_official_dir(&args.model, args.budget, args.interval)?;
    ck.save(&args.out)?;
    println!(
        "converted {} layers x {} KV heads (G {}, head_dim {}) from {} shards to {}",
        shape.num_layers,
        shape.num_kv_heads,
        shape.group_size,
        shape.head_dim,
        shards,
        args.out.display()
    );
    Ok(())
}

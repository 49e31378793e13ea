//! `foresightkv info`: what this build and this machine offer, as text or JSON.

use crate::cuda::CudaError;
use crate::info::collect;

/// Arguments of `foresightkv info`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `foresightkv info`, printing to stdout.
pub fn run(args: &InfoArgs) -> Result<(), CudaError> {
    let info = collect()?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).map_err(|e| CudaError::Fatbin(e.to_string()))?
        );
        return Ok(());
    }
    println!("foresightkv {}", info.version);
    if info.kernels_embedded {
        println!(
            "kernels:  embedded ({} bytes): {}",
            info.fatbin_bytes,
            info.architectures.join(", ")
        );
    } else {
        println!(
            "kernels:  not compiled in (no nvcc at build time; run scripts/setup.sh and rebuild)"
        );
    }
    println!(
        "cudarc:   {} (dynamic loading; cuda feature {})",
        info.cudarc_version,
        if info.cuda_feature { "on" } else { "off" }
    );
    match &info.driver {
        Ok(v) => println!("driver:   CUDA {v}"),
        Err(e) => println!("driver:   none ({e})"),
    }
    match &info.gpus {
        Ok(g) if g.is_empty() => println!("gpus:     none visible"),
        Ok(g) => g.iter().for_each(|d| println!("gpu:      {d}")),
        Err(e) => println!("gpus:     none ({e})"),
    }
    Ok(())
}

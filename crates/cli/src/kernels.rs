//! `radix-sparse kernels list|compile`: every embedded kernel specialisation, compiled
//! through NVRTC for any architecture without a GPU (CI runs this for sm_90a and sm_80).

use anyhow::Context;
use clap::Subcommand;
use radix_gpu::{Arch, Jit};

#[derive(Subcommand)]
pub enum KernelsCommand {
    /// List every kernel specialisation.
    List,
    /// Compile every specialisation (or those whose label contains --filter).
    Compile {
        /// Target architectures (repeatable), e.g. sm_90a sm_80.
        #[arg(long = "arch", default_values = ["sm_90a"])]
        archs: Vec<Arch>,
        #[arg(long)]
        filter: Option<String>,
        /// Bypass the disk cache (always run NVRTC).
        #[arg(long)]
        no_cache: bool,
        /// Print NVRTC's log (registers, spills) for each kernel.
        #[arg(short, long)]
        verbose: bool,
        /// Also build the attention kernel with these tiles (WARPS,M_TILES,BLOCK_N;
        /// repeatable), bf16, both head dims, to inspect registers and spills.
        #[arg(long = "attention-tiles", value_parser = radix_kernels::attention::TileConfig::parse)]
        attention_tiles: Vec<radix_kernels::attention::TileConfig>,
    },
}

pub fn run(cmd: KernelsCommand) -> anyhow::Result<()> {
    match cmd {
        KernelsCommand::List => {
            for spec in radix_kernels::catalog() {
                println!("{}  (min {})", spec.label(), spec.min_arch);
            }
            Ok(())
        }
        KernelsCommand::Compile { archs, filter, no_cache, verbose, attention_tiles } => {
            let jit = if no_cache { Jit::new(None) } else { Jit::with_default_cache() };
            let extra = attention_tiles.iter().flat_map(|&t| {
                [64, 128].map(|d| radix_kernels::attention::spec::<half::bf16>(d, false, t))
            });
            let specs: Vec<_> = radix_kernels::catalog()
                .into_iter()
                .chain(extra)
                .filter(|s| filter.as_deref().is_none_or(|f| s.label().contains(f)))
                .collect();
            let mut compiled = 0;
            for arch in &archs {
                for spec in specs.iter().filter(|s| s.supports(*arch)) {
                    let started = std::time::Instant::now();
                    let out = jit
                        .compile(spec, *arch)
                        .with_context(|| format!("compiling {} for {arch}", spec.label()))?;
                    println!(
                        "{arch}  {:<60} {:>8} bytes  {:>6} ms{}",
                        spec.label(),
                        out.cubin.len(),
                        started.elapsed().as_millis(),
                        if out.from_disk { "  (cached)" } else { "" }
                    );
                    if verbose && !out.log.trim().is_empty() {
                        println!("{}", out.log.trim_end());
                    }
                    compiled += 1;
                }
            }
            println!("{compiled} kernel images for {} architecture(s)", archs.len());
            Ok(())
        }
    }
}

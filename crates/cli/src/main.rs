//! The `radix-sparse` binary: serve, generate, bench, doctor, kernels.

mod bench;
mod doctor;
mod engine_args;
mod generate;
mod hub;
mod kernels;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "radix-sparse", version, about = "LLM inference server for NVIDIA Hopper GPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI API (completions, chat, streaming) over HTTP.
    Serve(serve::ServeArgs),
    /// Generate text for one prompt, streamed to the terminal.
    Generate(generate::GenerateArgs),
    /// Report the GPU, driver, CUDA libraries and kernel cache this machine has.
    Doctor,
    /// List or compile the embedded CUDA kernels (compiling needs NVRTC, not a GPU).
    #[command(subcommand)]
    Kernels(kernels::KernelsCommand),
    /// Benchmarks (GPU).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Doctor => doctor::run(),
        Command::Kernels(cmd) => kernels::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

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
    /// Log lines as text (default) or as JSON objects, one per line (for collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Benchmarks: `serve`, `offline` and `sparse-quality` run anywhere; the kernel and
    /// step benchmarks need a GPU.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        // Colour codes only for a terminal: logs piped to a file or a collector stay plain.
        .with_ansi(std::io::stderr().is_terminal() && cli.log_format == LogFormat::Text)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn generate(args: &[&str]) -> Result<generate::GenerateArgs, clap::Error> {
        let argv = ["radix-sparse", "generate", "--prompt", "x"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Generate(g) => Ok(g),
            _ => unreachable!("parsed as generate"),
        }
    }

    #[test]
    fn log_format_and_several_served_model_names() {
        let cli = Cli::try_parse_from([
            "radix-sparse",
            "serve",
            "--served-model-name",
            "a",
            "b/c",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["radix-sparse", "--log-format", "xml", "doctor"]).is_err());
        let Command::Serve(args) = cli.command else { unreachable!("parsed as serve") };
        assert_eq!(args.served_model_names(), ["a", "b/c"]);
    }

    #[test]
    fn negative_numbers_are_values_not_flags() {
        let g = generate(&["--temperature", "-1"]).expect("-1 is read as a value");
        let e = g.sampling().params().unwrap_err().to_string();
        assert!(e.contains("temperature must be >= 0"), "{e}");
        let g = generate(&["--frequency-penalty", "-0.5", "--top-k", "-1"]).unwrap();
        let p = g.sampling().params().unwrap();
        assert_eq!((p.frequency_penalty, p.top_k), (-0.5, 0));
        assert!(generate(&["--top-k", "-2"]).unwrap().sampling().params().is_err());
    }
}

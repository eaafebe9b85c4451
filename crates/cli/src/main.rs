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
    // NCCL reads its settings from the environment, and setting a variable races with
    // any thread reading it: set NCCL's defaults (NVLink multicast off, connections made
    // up front) now, while this is the only thread. Only NCCL reads them.
    radix_gpu::nccl::set_default_env();
    let cli = Cli::parse_from(vllm_short_flags(std::env::args_os()));
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

/// vLLM's `-tp N` (`-tp=N`): clap's short flags are one letter, so the argument is
/// rewritten to `--tensor-parallel-size` before parsing.
fn vllm_short_flags(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("-tp") => "--tensor-parallel-size".into(),
            Some(s) if s.starts_with("-tp=") => {
                format!("--tensor-parallel-size={}", &s[4..]).into()
            }
            _ => a,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate(args: &[&str]) -> Result<generate::GenerateArgs, clap::Error> {
        let argv = ["radix-sparse", "generate", "--prompt", "x"].iter().chain(args);
        match Cli::try_parse_from(vllm_short_flags(argv.map(std::ffi::OsString::from)))?.command {
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

    #[test]
    fn tensor_parallel_size_and_its_vllm_spellings() {
        assert_eq!(generate(&[]).unwrap().model_args().tensor_parallel_size, 1);
        for args in [&["-tp", "4"][..], &["-tp=4"], &["--tp", "4"], &["--tensor-parallel-size=4"]] {
            assert_eq!(generate(args).unwrap().model_args().tensor_parallel_size, 4, "{args:?}");
        }
    }

    #[test]
    fn a_tensor_parallel_size_the_model_cannot_take_is_an_error() {
        let load = |tp: &str| {
            let g = generate(&["--model", "synthetic:tiny", "--device", "cpu", "-tp", tp]).unwrap();
            g.model_args().load_runner().err().map(|e| format!("{e:#}"))
        };
        let e = load("3").unwrap();
        assert!(e.contains("--tensor-parallel-size 3") && e.contains("8 attention heads"), "{e}");
        assert!(load("0").unwrap().contains("at least 1"));
        assert!(load("2").is_none());
    }

    #[test]
    fn quantization_and_kv_cache_dtype_take_vllm_values() {
        let load = |args: &[&str]| {
            let mut all = vec!["--model", "synthetic:tiny", "--device", "cpu"];
            all.extend_from_slice(args);
            generate(&all).map(|g| g.model_args().load_runner().err().map(|e| format!("{e:#}")))
        };
        // FP8 weights at load run (dequantized) on the CPU; bf16 caches are the default.
        assert!(load(&["--quantization", "fp8"]).unwrap().is_none());
        assert!(load(&["--kv-cache-dtype", "bfloat16"]).unwrap().is_none());
        // The FP8 KV cache runs on the CPU (one rank); with more ranks it is refused.
        for dtype in ["fp8", "fp8_e4m3"] {
            assert!(load(&["--kv-cache-dtype", dtype]).unwrap().is_none());
            let e = load(&["--kv-cache-dtype", dtype, "-tp", "2"]).unwrap().expect("refused");
            assert!(
                e.contains(&format!("--kv-cache-dtype {dtype}")) && e.contains("one rank"),
                "{e}"
            );
        }
        let e = load(&["--quantization", "awq"]).unwrap_err().to_string();
        assert!(e.contains("possible values: fp8"), "{e}");
    }

    /// CUDA ranks on a machine without GPUs (this one, CI's): refused with the reason,
    /// no panic. (With the `cuda` feature the machine has GPUs: the GPU tests cover it.)
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_tensor_parallel_without_gpus_is_refused_cleanly() {
        let g = generate(&["--model", "synthetic:tiny", "--device", "cuda", "-tp", "2"]).unwrap();
        let e = format!("{:#}", g.model_args().load_runner().err().expect("no GPU here"));
        assert!(e.starts_with("--tensor-parallel-size 2 on CUDA: "), "{e}");
        // No driver (libcuda), a driver that sees no GPU, or fewer than 2 GPUs.
        assert!(
            e.contains("libcuda") || e.contains("no CUDA GPU") || e.contains("needs 2 GPUs"),
            "{e}"
        );
    }
}

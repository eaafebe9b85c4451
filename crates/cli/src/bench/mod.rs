//! `radix-sparse bench ...`: benchmarks (`serve`, `offline` and `sparse-quality` run
//! anywhere; the rest need a GPU). Each prints a table and, with `--json`,
//! writes one JSON object per measured shape for bench/record.py to pair with its peer.

mod allreduce;
mod attention;
pub mod dataset;
mod decode;
mod decode_trace;
mod gemm;
mod offline;
mod roofline;
mod serve;
mod sparse_quality;
mod step;

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// cuBLASLt GEMM throughput on Llama-3-8B shapes and 8192³.
    Gemm(gemm::GemmArgs),
    /// NCCL all-reduce (bf16 sum) bus bandwidth over a tensor-parallel group of GPUs.
    Allreduce(allreduce::AllReduceArgs),
    /// Prefill attention (tensor cores) on equal-length sequences; default the seed shape.
    Attention(attention::AttentionArgs),
    /// Paged decode attention bandwidth beside a device-to-device copy.
    Decode(decode::DecodeArgs),
    /// Offline throughput: a whole dataset through the engine at once.
    Offline(offline::OfflineArgs),
    /// One decode step of a full batch, split by op, against its memory floor (CUDA); the
    /// prefill chunks that fill the contexts are split by op too.
    Step(step::StepArgs),
    /// Online serving benchmark of a running server (throughput, TTFT, TPOT, ITL).
    Serve(serve::ServeBenchArgs),
    /// Quality of sparse paging on the CPU backend: the softmax mass and attention
    /// error of the pages Quest keeps, per budget, for one prompt.
    SparseQuality(sparse_quality::SparseQualityArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Gemm(args) => gemm::run(args),
        BenchCommand::Allreduce(args) => allreduce::run(args),
        BenchCommand::Attention(args) => attention::run(args),
        BenchCommand::Decode(args) => decode::run(args),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Offline(args) => offline::run(args),
        BenchCommand::Step(args) => step::run(args),
        BenchCommand::SparseQuality(args) => sparse_quality::run(args),
    }
}

/// One measured shape, as bench/record.py reads it.
#[derive(Serialize)]
pub struct Measurement {
    pub benchmark: String,
    pub shape: String,
    pub ours: f64,
    pub unit: String,
    pub median_ms: f64,
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

/// Appends measurements as JSON lines to `path` (when given).
pub fn write_json(path: Option<&PathBuf>, rows: &[Measurement]) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    for row in rows {
        writeln!(f, "{}", serde_json::to_string(row)?)?;
    }
    Ok(())
}

/// Uploads `len` elements of `block` repeated: large random buffers without generating
/// gigabytes on the host (the timings do not depend on the values).
pub fn upload_cycled<T: radix_gpu::Element>(
    device: &radix_gpu::Device,
    block: &[T],
    len: usize,
) -> anyhow::Result<radix_gpu::DeviceBuffer<T>> {
    let host: Vec<T> = block.iter().copied().cycle().take(len).collect();
    Ok(device.upload(&host)?)
}

/// A progress bar for long benchmarks, hidden when stderr is not a terminal.
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

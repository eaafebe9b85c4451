//! `bench allreduce`: NCCL's in-place bf16 sum over a tensor-parallel group of GPUs, as
//! the engine's ranks run it (`NcclGroup::all_reduce_sum_bf16`, one thread per rank),
//! per message size: CUDA events on each rank around back-to-back calls after warm-up,
//! the median of the samples, the slowest rank's. Reported as NCCL's bus bandwidth,
//! `bytes / time × 2(n − 1)/n`, the figure nccl-tests prints. Peer:
//! bench/peers/torch_allreduce.py (`torch.distributed.all_reduce`, NCCL backend).
//!
//! The default sizes are what a Llama-3-8B step reduces (hidden 4096 × tokens: decode
//! batches 1 to 256, prefill chunks of 2K and 8K), then 64M and 256M elements.

use clap::Args;
use half::bf16;
use radix_gpu::{Device, NcclGroup, time_back_to_back};

use super::{Measurement, progress, write_json};

#[derive(Args)]
pub struct AllReduceArgs {
    /// GPUs in the group (ranks 0..n on GPUs 0..n).
    #[arg(long, default_value_t = 2)]
    gpus: usize,
    /// Message sizes in bf16 elements (comma-separated); default: see the module doc.
    #[arg(long, value_delimiter = ',')]
    elements: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Timed samples per size, each of `--per-sample` calls back to back.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    #[arg(long, default_value_t = 10)]
    per_sample: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// Hidden 4096 × tokens of a step, then large messages.
pub fn default_elements() -> Vec<usize> {
    let mut sizes: Vec<usize> = [1, 8, 64, 256, 2048, 8192].iter().map(|t| 4096 * t).collect();
    sizes.extend([64 << 20, 256 << 20]);
    sizes
}

/// NCCL's bus bandwidth (GB/s) of an all-reduce of `bytes` over `n` ranks in `ms`.
pub fn bus_gbps(bytes: usize, n: usize, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9 * 2.0 * (n as f64 - 1.0) / n as f64
}

pub fn run(args: AllReduceArgs) -> anyhow::Result<()> {
    let n = args.gpus;
    anyhow::ensure!(n >= 2, "bench allreduce needs --gpus 2 or more, got {n}");
    let visible = Device::count()?;
    anyhow::ensure!(visible >= n, "--gpus {n} needs {n} GPUs, {visible} visible");
    let sizes = if args.elements.is_empty() { default_elements() } else { args.elements.clone() };
    anyhow::ensure!(sizes.iter().all(|&s| s > 0), "every --elements size must be positive");
    let group = NcclGroup::new(&(0..n).collect::<Vec<_>>())?;
    let devices: Vec<Device> = (0..n).map(Device::open).collect::<Result<_, _>>()?;
    let largest = *sizes.iter().max().expect("sizes are not empty");
    let mut buffers = Vec::with_capacity(n);
    for d in &devices {
        // Ones: the sums stay finite however many calls add up.
        buffers.push(d.upload(&vec![bf16::ONE; largest])?);
    }
    let bar = progress(sizes.len(), "all-reduce");
    let mut rows = Vec::new();
    println!("{:>12} {:>12} {:>10} {:>12}", "elements", "bytes", "median us", "bus GB/s");
    for &len in &sizes {
        // Every rank makes the same calls in the same order, on its own thread.
        let per_rank: Vec<anyhow::Result<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = buffers
                .iter_mut()
                .zip(&devices)
                .enumerate()
                .map(|(rank, (buf, device))| {
                    let group = &group;
                    s.spawn(move || -> anyhow::Result<f64> {
                        device.context().bind_to_thread()?;
                        let t = time_back_to_back(
                            device,
                            args.warmup,
                            args.samples,
                            args.per_sample,
                            |_| group.all_reduce_sum_bf16(rank, buf, len),
                        )?;
                        Ok(t.median_ms)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
        });
        let mut ms = 0.0f64;
        for r in per_rank {
            ms = ms.max(r?);
        }
        let bytes = 2 * len;
        let gbps = bus_gbps(bytes, n, ms);
        bar.suspend(|| println!("{len:>12} {bytes:>12} {:>10.2} {gbps:>12.1}", ms * 1e3));
        rows.push(Measurement {
            benchmark: "allreduce".into(),
            shape: format!("bf16 elements={len} gpus={n}"),
            ours: gbps,
            unit: "GB/s".into(),
            median_ms: ms,
            device: devices[0].info().name.clone(),
            extra: Some(serde_json::json!({ "us": ms * 1e3, "bytes": bytes })),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_json(args.json.as_ref(), &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_bandwidth_is_nccl_tests_formula() {
        // 1 GB in 10 ms over 2 ranks: 100 GB/s algorithm bandwidth, bus the same (2·1/2);
        // over 8 ranks the bus figure is 7/4 of it.
        assert!((bus_gbps(1_000_000_000, 2, 10.0) - 100.0).abs() < 1e-9);
        assert!((bus_gbps(1_000_000_000, 8, 10.0) - 175.0).abs() < 1e-9);
        assert_eq!(default_elements()[0], 4096);
        assert_eq!(default_elements().len(), 8);
    }
}

//! `bench attention`: our prefill kernel on a batch of equal-length sequences, timed with
//! CUDA events (median after warm-up) on random inputs. Peer: bench/peers/torch_sdpa.py
//! (torch SDPA's FlashAttention-2 and cuDNN backends on the same shapes and layout).

use clap::Args;
use half::{bf16, f16};
use radix_gpu::{DType, Device, HalfFloat, Jit, time_runs};
use radix_kernels::attention::{AttentionBatch, AttentionShape, BatchMeta, KvSource, TileConfig};
use rand::{Rng, SeedableRng};

use super::{Measurement, write_json};

#[derive(Args)]
pub struct AttentionArgs {
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// KV heads (default: = heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value = "f16")]
    dtype: DType,
    #[arg(long)]
    causal: bool,
    /// Read K/V from the page pool with this page size instead of contiguous tensors.
    #[arg(long)]
    page_size: Option<usize>,
    /// Tile configs to time, WARPS,M_TILES,BLOCK_N[,STAGES], or on Hopper
    /// wgmma[,128[,STAGES]], wgmma-ws[,128[,STAGES]] (a producer warp), wgmma-ws4 (four),
    /// wgmma-tma (a TMA producer warpgroup), wgmma-tma-persistent, wgmma-tma3 (three compute
    /// warpgroups, head_dim 64) (repeatable; default: the launcher's choice, wgmma on Hopper).
    #[arg(long = "tiles", value_parser = TileConfig::parse)]
    tiles: Vec<TileConfig>,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    #[arg(long, default_value_t = 30)]
    runs: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn run(args: AttentionArgs) -> anyhow::Result<()> {
    match args.dtype {
        DType::F16 => run_typed::<f16>(&args),
        DType::BF16 => run_typed::<bf16>(&args),
        other => anyhow::bail!("bench attention takes f16 or bf16, not {other}"),
    }
}

/// The shape string bench/peers/torch_sdpa.py writes for the same case.
pub fn shape_label(a: &AttentionArgs, hkv: usize) -> String {
    format!(
        "B={} Hq={} Hkv={hkv} S={} D={} {} {}",
        a.batch,
        a.heads,
        a.seq_len,
        a.head_dim,
        a.dtype,
        if a.causal { "causal" } else { "full" }
    )
}

fn run_typed<T: HalfFloat>(a: &AttentionArgs) -> anyhow::Result<()> {
    let (b, s, d, hq) = (a.batch, a.seq_len, a.head_dim, a.heads);
    let hkv = a.kv_heads.unwrap_or(hq);
    anyhow::ensure!(b > 0 && s > 0, "batch and seq-len must be positive");
    let device = Device::open(0)?;
    let jit = Jit::with_default_cache();
    let shape = AttentionShape::new(hq, hkv, d, a.causal);
    let qo: Vec<i32> = (0..=b).map(|i| (i * s) as i32).collect();
    let (kv, kv_elems) = match a.page_size {
        None => (KvSource::Contiguous { kv_indptr: qo.clone() }, b * s * hkv * d),
        Some(ps) => {
            let per_seq = s.div_ceil(ps);
            let num_pages = b * per_seq;
            let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
            let mut ids: Vec<i32> = (0..num_pages as i32).collect();
            rand::seq::SliceRandom::shuffle(&mut ids[..], &mut rng);
            let kv = KvSource::Paged {
                page_size: ps,
                num_pages,
                kv_indptr: (0..=b).map(|i| (i * per_seq) as i32).collect(),
                kv_indices: ids,
                kv_last_page_len: vec![(s - (per_seq - 1) * ps) as i32; b],
                head_tables: false,
            };
            (kv, num_pages * hkv * ps * d)
        }
    };
    let meta = BatchMeta::new(qo, kv, a.causal)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut random = |len: usize| -> anyhow::Result<radix_gpu::DeviceBuffer<T>> {
        let host: Vec<T> = (0..len).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect();
        Ok(device.upload(&host)?)
    };
    let q = random(b * s * hq * d)?;
    let k = random(kv_elems)?;
    let v = random(kv_elems)?;
    let mut o = device.alloc::<T>(b * s * hq * d)?;
    let flops =
        4.0 * (b * hq) as f64 * (s as f64).powi(2) * d as f64 / if a.causal { 2.0 } else { 1.0 };
    let configs: Vec<Option<TileConfig>> =
        if a.tiles.is_empty() { vec![None] } else { a.tiles.iter().copied().map(Some).collect() };
    let mut rows = Vec::new();
    for cfg in configs {
        let batch = AttentionBatch::new(&device, shape, meta.clone(), cfg)?;
        let t =
            time_runs(&device, a.warmup, a.runs, |_| batch.run(&jit, &q, &k, &v, &mut o, None))?;
        let tflops = flops / (t.median_ms * 1e-3) / 1e12;
        let tiles = batch.tiles();
        let label =
            shape_label(a, hkv) + &a.page_size.map(|p| format!(" page={p}")).unwrap_or_default();
        let kernel = match (tiles.wgmma, tiles.tma) {
            (true, true) if tiles.persistent => "wgmma-tma-persistent",
            (true, true) if tiles.num_warps == 16 => "wgmma-tma3",
            (true, true) => "wgmma-tma",
            (true, false) => "wgmma",
            _ => "mma.sync",
        };
        println!(
            "{label}  {kernel} tiles={},{},{},{}  {:.3} ms  {:.1} TFLOP/s",
            tiles.num_warps, tiles.m_tiles, tiles.block_n, tiles.stages, t.median_ms, tflops
        );
        rows.push(Measurement {
            benchmark: "attention_prefill".into(),
            shape: label,
            ours: tflops,
            unit: "TFLOP/s".into(),
            median_ms: t.median_ms,
            device: device.info().name.clone(),
            extra: Some(serde_json::json!({
                "tiles": [tiles.num_warps, tiles.m_tiles, tiles.block_n, tiles.stages],
                "kernel": kernel,
                "default_tiles": cfg.is_none(),
            })),
        });
    }
    write_json(a.json.as_ref(), &rows)
}

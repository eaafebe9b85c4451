//! `bench decode`: paged decode attention (one query token per request) over shuffled
//! pages, timed with CUDA events, reported as achieved bandwidth beside a device-to-device
//! copy timed in the same run (the peer: what the memory system moves).

use clap::Args;
use half::{bf16, f16};
use radix_gpu::{DType, Device, HalfFloat, Jit, time_runs};
use radix_kernels::attention::{AttentionBatch, AttentionShape, BatchMeta, KvSource};
use rand::{Rng, SeedableRng};

use super::{Measurement, write_json};

#[derive(Args)]
pub struct DecodeArgs {
    /// Context lengths, one per request, as N@LEN (N requests of LEN tokens) or
    /// mixed:N:MIN:MAX (N requests, lengths log-uniform in MIN..MAX, fixed seed).
    /// Repeatable; default: the Llama-3-8B cases of the decode issue.
    #[arg(long = "case")]
    cases: Vec<String>,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Blocks below which keys are split across SMs (default 2 × SMs).
    #[arg(long)]
    target_blocks: Option<usize>,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 50)]
    runs: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_case(s: &str) -> anyhow::Result<Vec<usize>> {
    let bad = || anyhow::anyhow!("bad case {s:?}: expected N@LEN or mixed:N:MIN:MAX");
    if let Some(rest) = s.strip_prefix("mixed:") {
        let v: Vec<usize> =
            rest.split(':').map(|x| x.parse()).collect::<Result<_, _>>().map_err(|_| bad())?;
        let [n, lo, hi] = v[..] else { return Err(bad()) };
        anyhow::ensure!(n > 0 && lo > 0 && hi >= lo, bad());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        return Ok((0..n).map(|_| rng.random_range(a..=b).exp().round() as usize).collect());
    }
    let (n, len) = s.split_once('@').ok_or_else(bad)?;
    let (n, len): (usize, usize) = (n.parse().map_err(|_| bad())?, len.parse().map_err(|_| bad())?);
    anyhow::ensure!(n > 0 && len > 0, bad());
    Ok(vec![len; n])
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    match args.dtype {
        DType::F16 => run_typed::<f16>(&args),
        DType::BF16 => run_typed::<bf16>(&args),
        other => anyhow::bail!("bench decode takes f16 or bf16, not {other}"),
    }
}

/// Device-to-device copy bandwidth (bytes read + written per second), 1 GiB buffers.
pub fn copy_bandwidth(device: &Device) -> anyhow::Result<f64> {
    let n = 1usize << 30;
    let src = device.alloc_zeros::<u8>(n)?;
    let mut dst = device.alloc_zeros::<u8>(n)?;
    let t = time_runs(device, 3, 20, |_| dst.copy_from_device(&src))?;
    Ok(2.0 * n as f64 / (t.median_ms * 1e-3))
}

fn run_typed<T: HalfFloat>(a: &DecodeArgs) -> anyhow::Result<()> {
    let cases: Vec<(String, Vec<usize>)> = if a.cases.is_empty() {
        ["64@4096", "256@1024", "1@65536", "mixed:16:512:32768"]
            .iter()
            .map(|c| Ok((c.to_string(), parse_case(c)?)))
            .collect::<anyhow::Result<_>>()?
    } else {
        a.cases.iter().map(|c| Ok((c.clone(), parse_case(c)?))).collect::<anyhow::Result<_>>()?
    };
    let device = Device::open(0)?;
    let jit = Jit::with_default_cache();
    let copy_bw = copy_bandwidth(&device)?;
    println!("device-to-device copy: {:.0} GB/s (read + write)", copy_bw / 1e9);
    let (hq, hkv, d, ps) = (a.heads, a.kv_heads, a.head_dim, a.page_size);
    let shape = AttentionShape::new(hq, hkv, d, true);
    let mut rows = Vec::new();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    for (name, lens) in cases {
        let b = lens.len();
        let pages: Vec<usize> = lens.iter().map(|l| l.div_ceil(ps)).collect();
        let num_pages: usize = pages.iter().sum();
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rand::seq::SliceRandom::shuffle(&mut ids[..], &mut rng);
        let mut indptr = vec![0i32];
        for p in &pages {
            indptr.push(indptr.last().unwrap() + *p as i32);
        }
        let last: Vec<i32> =
            lens.iter().zip(&pages).map(|(l, p)| (l - (p - 1) * ps) as i32).collect();
        let kv = KvSource::Paged {
            page_size: ps,
            num_pages,
            kv_indptr: indptr,
            kv_indices: ids,
            kv_last_page_len: last,
        };
        let meta = BatchMeta::new((0..=b as i32).collect(), kv, true)?;
        let pool = num_pages * hkv * ps * d;
        let mut random = |len: usize| -> anyhow::Result<radix_gpu::DeviceBuffer<T>> {
            let host: Vec<T> = (0..len).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect();
            Ok(device.upload(&host)?)
        };
        let q = random(b * hq * d)?;
        let k = random(pool)?;
        let v = random(pool)?;
        let mut o = device.alloc::<T>(b * hq * d)?;
        let batch = AttentionBatch::with_options(&device, shape, meta, None, a.target_blocks)?;
        let t =
            time_runs(&device, a.warmup, a.runs, |_| batch.run(&jit, &q, &k, &v, &mut o, None))?;
        let tokens: usize = lens.iter().sum();
        let bytes = (2 * tokens * hkv * d + 2 * b * hq * d) * 2;
        let bw = bytes as f64 / (t.median_ms * 1e-3);
        let label = format!("{name} Hq={hq} Hkv={hkv} D={d} page={ps} {}", T::DTYPE);
        println!(
            "{label}: {:.1} us, {:.0} GB/s = {:.1}% of copy, {} splits",
            t.median_ms * 1e3,
            bw / 1e9,
            100.0 * bw / copy_bw,
            batch.plan().merge.len()
        );
        rows.push(Measurement {
            benchmark: "attention_decode".into(),
            shape: label,
            ours: bw / 1e9,
            unit: "GB/s".into(),
            median_ms: t.median_ms,
            device: device.info().name.clone(),
            extra: Some(serde_json::json!({
                "median_us": t.median_ms * 1e3,
                "copy_gbps": copy_bw / 1e9,
                "fraction_of_copy": bw / copy_bw,
                "kv_tokens": tokens,
            })),
        });
    }
    write_json(a.json.as_ref(), &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cases() {
        assert_eq!(parse_case("2@10").unwrap(), vec![10, 10]);
        let mixed = parse_case("mixed:16:512:32768").unwrap();
        assert_eq!(mixed.len(), 16);
        assert!(mixed.iter().all(|&l| (512..=32768).contains(&l)));
        assert!(parse_case("x@1").is_err() && parse_case("mixed:1:5:2").is_err());
    }
}

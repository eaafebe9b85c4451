//! `bench gemm`: our cuBLASLt wrapper on bf16 GEMMs, timed with CUDA events (median of
//! many runs after warm-up), on random inputs. Peer: bench/peers/torch_gemm.py.
//!
//! `--dtype fp8`: cuBLASLt's FP8 GEMM (e4m3 × e4m3 → bf16, a scale per token and per
//! output channel) as the FP8 linear layers run it, on activations and weights quantized
//! by our per-row quantizer; the quantizer's own time is printed beside it. Peer:
//! `torch._scaled_mm` with row-wise scales (bench/peers/torch_gemm.py --dtype fp8). Up to
//! 8 rows the engine runs our skinny FP8 GEMM instead, so that is the figure there
//! (cuBLASLt's beside it). Up to 64 rows the shapes are also timed back to back over weight copies
//! beyond L2 (as decode reads them), as weight-read bandwidth: cuBLASLt's FP8 GEMM, the
//! skinny one and, up to 8 rows, our FP8-weight GEMV on the 16-bit activations.
//!
//! `--gemv`: decode-sized products (M <= 8) through our GEMV kernel beside cuBLASLt in the
//! same run, both back to back over weight copies that together exceed the L2 cache (a
//! step's layers never find their weights there), as weight-read bandwidth.

use clap::Args;
use half::{bf16, f16};
use radix_gpu::{BLayout, DType, Device, Gemm, HalfFloat, time_back_to_back, time_runs};
use rand::{Rng, SeedableRng};

use radix_kernels::fp8::skinny;

use super::{Measurement, progress, upload_cycled, write_json};

#[derive(Args)]
pub struct GemmArgs {
    /// Shapes as MxNxK (repeatable); default: 8192³ and Llama-3-8B decode/prefill shapes.
    #[arg(long = "shape")]
    shapes: Vec<String>,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Append one JSON line per shape here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Time the decode GEMV beside cuBLASLt (M <= 8; default shapes: M 1, 2, 4, 8 on
    /// Llama-3-8B's projections and LM head).
    #[arg(long)]
    gemv: bool,
    /// Also time every algorithm cuBLASLt's heuristic offers for each shape (up to 8), not
    /// only its first choice: bf16 and f16 back to back over weight copies beyond the L2
    /// (weights of 4 MiB and more), as a decode step reads them; fp8 one at a time, the
    /// weight in the L2 (so the two sets of figures do not compare).
    #[arg(long, alias = "fp8-candidates")]
    candidates: bool,
}

/// M ∈ {1, 2, 4, 8} against Llama-3-8B's (N, K): qkv, o, gate|up, down, LM head.
pub fn gemv_shapes() -> Vec<(usize, usize, usize)> {
    let mut shapes = Vec::new();
    for m in [1, 2, 4, 8] {
        for (n, k) in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)] {
            shapes.push((m, n, k));
        }
    }
    shapes
}

/// 8192³, then M ∈ {1, 64, 256, 4096} against Llama-3-8B's (K, N): the square
/// projections, the MLP up (gate/up) and down projections.
pub fn default_shapes() -> Vec<(usize, usize, usize)> {
    let mut shapes = vec![(8192, 8192, 8192)];
    for m in [1, 64, 256, 4096] {
        for (k, n) in [(4096, 4096), (4096, 14336), (14336, 4096)] {
            shapes.push((m, n, k));
        }
    }
    shapes
}

fn parse_shape(s: &str) -> anyhow::Result<(usize, usize, usize)> {
    let dims: Vec<usize> = s
        .split(['x', 'X'])
        .map(|d| d.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("bad shape {s:?}: expected MxNxK"))?;
    match dims[..] {
        [m, n, k] if m > 0 && n > 0 && k > 0 => Ok((m, n, k)),
        _ => anyhow::bail!("bad shape {s:?}: expected MxNxK with positive sizes"),
    }
}

pub fn run(args: GemmArgs) -> anyhow::Result<()> {
    let shapes = if args.shapes.is_empty() {
        if args.gemv { gemv_shapes() } else { default_shapes() }
    } else {
        args.shapes.iter().map(|s| parse_shape(s)).collect::<anyhow::Result<_>>()?
    };
    match args.dtype {
        DType::BF16 => run_typed::<bf16>(&args, &shapes),
        DType::F16 => run_typed::<f16>(&args, &shapes),
        DType::F8E4M3 if !args.gemv => run_fp8(&args, &shapes),
        other => anyhow::bail!("bench gemm takes bf16, f16 or fp8 (not with --gemv), not {other}"),
    }
}

fn run_typed<T: HalfFloat>(
    args: &GemmArgs,
    shapes: &[(usize, usize, usize)],
) -> anyhow::Result<()> {
    if args.gemv {
        return run_gemv::<T>(args, shapes);
    }
    let device = Device::open(0)?;
    let mut gemm = Gemm::new(&device)?;
    if args.candidates {
        gemm.keep_all_candidates();
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut random = |len: usize| -> anyhow::Result<radix_gpu::DeviceBuffer<T>> {
        let host: Vec<T> = (0..len).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect();
        Ok(device.upload(&host)?)
    };
    let bar = progress(shapes.len(), "gemm");
    let mut rows = Vec::new();
    let mut copy = None; // the copy bandwidth, measured once if candidates are timed
    println!("{:<28} {:>10} {:>10}", "shape (MxNxK)", "median ms", "TFLOP/s");
    for &(m, n, k) in shapes {
        let a = random(m * k)?;
        let b = random(n * k)?;
        let mut out = device.alloc::<T>(m * n)?;
        let t = time_runs(&device, args.warmup, args.runs, |_| {
            gemm.matmul::<T, T>(m, n, k, &a, &b, BLayout::NK, None, 0.0, &mut out)
        })?;
        let extra = if args.candidates {
            let copy = match copy {
                Some(c) => c,
                None => *copy.insert(super::decode::copy_bandwidth(&device)?),
            };
            Some(candidates_beyond_l2(
                args,
                &device,
                &gemm,
                copy,
                (m, n, k),
                &mut random,
                &a,
                &mut out,
            )?)
        } else {
            None
        };
        let row = gemm_row(&device, (m, n, k), T::DTYPE, t.median_ms, extra);
        bar.suspend(|| {
            println!("{:<28} {:>10.4} {:>10.1}", format!("{m}x{n}x{k}"), t.median_ms, row.ours);
            for c in row.extra.as_ref().and_then(|e| e["cublaslt_candidates"].as_array()).into_iter().flatten() {
                println!(
                    "    cuBLASLt candidate {}: {:.2} us back to back beyond L2 ({:.0} TFLOP/s, {:.1}% of copy for the weights), split-K {}",
                    c["index"], c["us"].as_f64().unwrap_or(f64::NAN), c["tflops"].as_f64().unwrap_or(f64::NAN),
                    c["copy_pct"].as_f64().unwrap_or(f64::NAN), c["split_k"]
                );
            }
        });
        rows.push(row);
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_json(args.json.as_ref(), &rows)
}

/// Every candidate of cuBLASLt's heuristic for one 16-bit shape, back to back over copies
/// of the weight that together exceed the L2 (as a decode step's layers read them): time,
/// TFLOP/s and the weight read's share of the copy bandwidth. Leaves the first chosen.
#[allow(clippy::too_many_arguments)]
fn candidates_beyond_l2<T: HalfFloat>(
    args: &GemmArgs,
    device: &Device,
    gemm: &Gemm,
    copy: f64,
    (m, n, k): (usize, usize, usize),
    random: &mut impl FnMut(usize) -> anyhow::Result<radix_gpu::DeviceBuffer<T>>,
    a: &radix_gpu::DeviceBuffer<T>,
    out: &mut radix_gpu::DeviceBuffer<T>,
) -> anyhow::Result<serde_json::Value> {
    let bytes = n * k * std::mem::size_of::<T>();
    let copies = (256usize << 20).div_ceil(bytes).clamp(1, 64);
    let weights: Vec<_> = (0..copies).map(|_| random(n * k)).collect::<anyhow::Result<_>>()?;
    let shape = radix_gpu::GemmShape {
        m,
        n,
        k,
        input: T::DTYPE,
        output: T::DTYPE,
        b_layout: BLayout::NK,
        bias: false,
    };
    let mut list = each_candidate(gemm, &shape, || {
        let t = time_back_to_back(device, args.warmup, 5, args.runs, |r| {
            gemm.matmul::<T, T>(m, n, k, a, &weights[r % copies], BLayout::NK, None, 0.0, out)
        })?;
        Ok(t.median_ms)
    })?;
    for c in &mut list {
        let ms = c["us"].as_f64().unwrap_or(f64::NAN) * 1e-3;
        c["copy_pct"] = (100.0 * bytes as f64 / (ms * 1e-3) / copy).into();
    }
    Ok(serde_json::json!({ "cublaslt_candidates": list, "copy_gbps": copy / 1e9 }))
}

/// Runs `time` (a median in ms) with each of the heuristic's candidates for `shape` chosen
/// in turn, then the first again: a JSON object a candidate (index, us, split-K, TFLOP/s).
fn each_candidate(
    gemm: &Gemm,
    shape: &radix_gpu::GemmShape,
    mut time: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let count = gemm.choose_candidate(shape, 0).map_or(0, |c| c.0);
    let mut list = Vec::with_capacity(count);
    for i in 0..count {
        let split_k = gemm.choose_candidate(shape, i).map_or(0, |c| c.1);
        let ms = time();
        gemm.choose_candidate(shape, 0);
        let ms = ms?;
        list.push(serde_json::json!({
            "index": i, "us": ms * 1e3, "split_k": split_k,
            "tflops": tflops((shape.m, shape.n, shape.k), ms),
        }));
    }
    Ok(list)
}

/// TFLOP/s of an MxNxK product taking `median_ms`.
fn tflops((m, n, k): (usize, usize, usize), median_ms: f64) -> f64 {
    2.0 * (m * n * k) as f64 / (median_ms * 1e-3) / 1e12
}

/// One `bench gemm` row: the product's TFLOP/s, its shape named with `dtype`.
fn gemm_row(
    device: &Device,
    (m, n, k): (usize, usize, usize),
    dtype: impl std::fmt::Display,
    median_ms: f64,
    extra: Option<serde_json::Value>,
) -> Measurement {
    Measurement {
        benchmark: "gemm".into(),
        shape: format!("M={m} N={n} K={k} {dtype}"),
        ours: tflops((m, n, k), median_ms),
        unit: "TFLOP/s".into(),
        median_ms,
        device: device.info().name.clone(),
        extra,
    }
}

/// The FP8 GEMM on quantized random operands (see the module doc).
fn run_fp8(args: &GemmArgs, shapes: &[(usize, usize, usize)]) -> anyhow::Result<()> {
    use radix_kernels::fp8::quantize_rows;
    let device = Device::open(0)?;
    let gemm = Gemm::new(&device)?;
    let jit = radix_gpu::Jit::with_default_cache();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let block: Vec<bf16> =
        (0..(1usize << 22)).map(|_| bf16::from_f64(rng.random_range(-1.0..1.0))).collect();
    // bf16 rows quantized on the device: e4m3 bytes and a scale per row.
    let quantized = |rows: usize, cols: usize| -> anyhow::Result<_> {
        let x = upload_cycled(&device, &block, rows * cols)?;
        let mut q = device.alloc::<u8>(rows * cols)?;
        let mut scales = device.alloc::<f32>(rows)?;
        quantize_rows(&jit, &x, rows, cols, &mut q, &mut scales)?;
        Ok((x, q, scales))
    };
    let mut scratch = SkinnyBuffers::new(&device)?;
    let bar = progress(shapes.len(), "gemm fp8");
    let mut rows = Vec::new();
    println!(
        "{:<28} {:>10} {:>10} {:>14} {:>14}",
        "shape (MxNxK)", "median ms", "TFLOP/s", "quantize us", "cuBLASLt ms"
    );
    for &(m, n, k) in shapes {
        let (x, mut xq, mut xs) = quantized(m, k)?;
        let (_, wq, ws) = quantized(n, k)?;
        let mut out = device.alloc::<bf16>(m * n)?;
        // What the engine runs for this shape by default: at one row on Hopper the
        // streaming GEMV (16-bit x), else the skinny variant it picks, if any, else cuBLASLt.
        let streams = m == 1 && radix_kernels::gemv::fits_stream_fp8(device.info(), m, n, k);
        let variant = skinny::engine_variant(device.arch(), m, n, k)
            .filter(|_| m <= skinny::DEFAULT_ROWS && !streams);
        let skinny = if streams {
            Some(time_runs(&device, args.warmup, args.runs, |_| {
                radix_kernels::gemv::gemv_stream_fp8(&jit, m, n, k, &x, &wq, &ws, &mut out)
            })?)
        } else if let Some(variant) = variant {
            Some(time_runs(&device, args.warmup, args.runs, |_| {
                let (a, w, v) = ((&xq, &xs), (&wq, &ws), Some(variant));
                skinny::gemm_with(&jit, (m, n, k), a, w, None, &mut out, scratch.get(), v)
            })?)
        } else {
            None
        };
        let lt = time_runs(&device, args.warmup, args.runs, |_| {
            // SAFETY: every buffer was allocated at the size the shape names.
            unsafe {
                gemm.matmul_fp8_raw(
                    m,
                    n,
                    k,
                    xq.ptr(),
                    xs.ptr(),
                    wq.ptr(),
                    ws.ptr(),
                    0,
                    out.ptr_mut(),
                )
            }
        })?;
        let candidates = if args.candidates {
            let shape = radix_gpu::GemmShape {
                m,
                n,
                k,
                input: DType::F8E4M3,
                output: DType::BF16,
                b_layout: BLayout::NK,
                bias: false,
            };
            each_candidate(&gemm, &shape, || {
                let t = time_runs(&device, args.warmup, args.runs, |_| {
                    // SAFETY: every buffer was allocated at the size the shape names.
                    unsafe {
                        let (a, b) = ((xq.ptr(), xs.ptr()), (wq.ptr(), ws.ptr()));
                        gemm.matmul_fp8_raw(m, n, k, a.0, a.1, b.0, b.1, 0, out.ptr_mut())
                    }
                })?;
                Ok(t.median_ms)
            })?
        } else {
            Vec::new()
        };
        let quant = time_runs(&device, args.warmup, args.runs, |_| {
            quantize_rows(&jit, &x, m, k, &mut xq, &mut xs)
        })?;
        let decode = if skinny::fits(m, n, k) {
            let ops = (&x, &xq, &xs);
            Some(fp8_decode(args, &device, &gemm, &jit, (m, n, k), ops, &block, &mut scratch)?)
        } else {
            None
        };
        // The figure is what the engine runs for this shape by default.
        let t = skinny.as_ref().unwrap_or(&lt);
        let tflops = tflops((m, n, k), t.median_ms);
        bar.suspend(|| {
            println!(
                "{:<28} {:>10.4} {:>10.1} {:>14.2} {:>14.4}",
                format!("{m}x{n}x{k}"),
                t.median_ms,
                tflops,
                quant.median_ms * 1e3,
                lt.median_ms
            );
            if let Some(d) = &decode {
                let f = |key: &str| d[key].as_f64().unwrap_or(f64::NAN);
                println!(
                    "    back to back beyond L2: skinny FP8 {:.2} us ({:.1}% of copy) | skinny wgmma {:.2} us ({:.1}%), 128-row blocks {:.2} us ({:.1}%) | cuBLASLt FP8 {:.2} us ({:.1}%) | FP8 GEMV {:.2} us ({:.1}%) | streaming FP8 GEMV {:.2} us ({:.1}%)",
                    f("skinny_us"),
                    f("skinny_copy_pct"),
                    f("skinny_wgmma_us"),
                    f("skinny_wgmma_copy_pct"),
                    f("skinny_wgmma128_us"),
                    f("skinny_wgmma128_copy_pct"),
                    f("cublaslt_us"),
                    f("cublaslt_copy_pct"),
                    f("gemv_us"),
                    f("gemv_copy_pct"),
                    f("stream_us"),
                    f("stream_copy_pct")
                );
            }
            for c in &candidates {
                println!(
                    "    cuBLASLt candidate {}: {:.2} us ({:.0} TFLOP/s), split-K {}",
                    c["index"],
                    c["us"].as_f64().unwrap_or(f64::NAN),
                    c["tflops"].as_f64().unwrap_or(f64::NAN),
                    c["split_k"]
                );
            }
        });
        let kernel = match variant {
            _ if streams => "stream-gemv",
            Some(skinny::Variant::Wgmma64) => "skinny-wgmma",
            Some(skinny::Variant::Wgmma128) => "skinny-wgmma128",
            Some(skinny::Variant::Mma) => "skinny",
            None => "cublaslt",
        };
        let mut extra = serde_json::json!({
            "quantize_us": quant.median_ms * 1e3,
            "kernel": kernel,
            "cublaslt_ms": lt.median_ms,
        });
        if let Some(sk) = &skinny {
            extra["skinny_ms"] = sk.median_ms.into();
        }
        if let Some(d) = decode {
            extra["decode"] = d;
        }
        if !candidates.is_empty() {
            extra["cublaslt_candidates"] = candidates.into();
        }
        rows.push(gemm_row(&device, (m, n, k), "fp8", t.median_ms, Some(extra)));
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_json(args.json.as_ref(), &rows)
}

/// The skinny FP8 GEMM's split-K scratch, as the engine's workspace holds it.
struct SkinnyBuffers {
    partial: radix_gpu::DeviceBuffer<f32>,
    counters: radix_gpu::DeviceBuffer<i32>,
}

impl SkinnyBuffers {
    fn new(device: &Device) -> anyhow::Result<Self> {
        Ok(Self { partial: device.alloc(1 << 21)?, counters: device.alloc_zeros(4096)? })
    }

    fn get(&mut self) -> skinny::SkinnyScratch<'_> {
        skinny::SkinnyScratch { partial: &mut self.partial, counters: &mut self.counters }
    }
}

/// Decode-sized FP8 products back to back over weight copies beyond L2: cuBLASLt's FP8
/// GEMM and the skinny one (activations already quantized) and, up to 8 rows, our
/// FP8-weight GEMV (16-bit activations), up to 4 on Hopper its streaming one too.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn fp8_decode(
    args: &GemmArgs,
    device: &Device,
    gemm: &Gemm,
    jit: &radix_gpu::Jit,
    (m, n, k): (usize, usize, usize),
    (x, xq, xs): (
        &radix_gpu::DeviceBuffer<bf16>,
        &radix_gpu::DeviceBuffer<u8>,
        &radix_gpu::DeviceBuffer<f32>,
    ),
    block: &[bf16],
    scratch: &mut SkinnyBuffers,
) -> anyhow::Result<serde_json::Value> {
    use radix_kernels::{fp8::quantize_rows, gemv};
    let copy = super::decode::copy_bandwidth(device)?;
    let copies = (256usize << 20).div_ceil(n * k).clamp(1, 16);
    let mut weights = Vec::with_capacity(copies);
    for _ in 0..copies {
        let w = upload_cycled(device, block, n * k)?;
        let mut q = device.alloc::<u8>(n * k)?;
        let mut s = device.alloc::<f32>(n)?;
        quantize_rows(jit, &w, n, k, &mut q, &mut s)?;
        weights.push((q, s));
    }
    let mut out = device.alloc::<bf16>(m * n)?;
    let lt = time_back_to_back(device, args.warmup, 5, args.runs, |i| {
        let (q, s) = &weights[i % copies];
        // SAFETY: every buffer was allocated at the size the shape names.
        unsafe {
            gemm.matmul_fp8_raw(m, n, k, xq.ptr(), xs.ptr(), q.ptr(), s.ptr(), 0, out.ptr_mut())
        }
    })?;
    let sk = time_back_to_back(device, args.warmup, 5, args.runs, |i| {
        let (q, s) = &weights[i % copies];
        let x = (xq, xs);
        let mma = Some(skinny::Variant::Mma);
        skinny::gemm_with(jit, (m, n, k), x, (q, s), None, &mut out, scratch.get(), mma)
    })?;
    // On Hopper, the skinny kernel on FP8 wgmma too (K in whole 128-byte stages), with one
    // and two warpgroups a block.
    let mut wgmma = Vec::new();
    if skinny::wgmma_runs(device.info().arch(), k) {
        for variant in [skinny::Variant::Wgmma64, skinny::Variant::Wgmma128] {
            wgmma.push(time_back_to_back(device, args.warmup, 5, args.runs, |i| {
                let (q, s) = &weights[i % copies];
                let (x, v) = ((xq, xs), Some(variant));
                skinny::gemm_with(jit, (m, n, k), x, (q, s), None, &mut out, scratch.get(), v)
            })?);
        }
    }
    let gemv = if gemv::fits_fp8(m, n, k) {
        Some(time_back_to_back(device, args.warmup, 5, args.runs, |i| {
            let (q, s) = &weights[i % copies];
            gemv::gemv_fp8(jit, m, n, k, x, q, s, &mut out)
        })?)
    } else {
        None
    };
    // On Hopper, up to 4 rows, the streaming GEMV over the FP8 weight (bf16 activations).
    let stream = if gemv::fits_stream_fp8(device.info(), m, n, k) {
        Some(time_back_to_back(device, args.warmup, 5, args.runs, |i| {
            let (q, s) = &weights[i % copies];
            gemv::gemv_stream_fp8(jit, m, n, k, x, q, s, &mut out)
        })?)
    } else {
        None
    };
    // Weights and their scales, the activations (e4m3 and their scales; the GEMVs read
    // bf16 ones), bf16 out.
    let bytes = |x_bytes: usize| (n * k + 4 * n + x_bytes + 2 * m * n) as f64;
    let pct_of = |x_bytes: usize, ms: f64| 100.0 * bytes(x_bytes) / (ms * 1e-3) / copy;
    let pct = |ms: f64| pct_of(m * k + 4 * m, ms);
    let mut out = serde_json::json!({
        "skinny_us": sk.median_ms * 1e3,
        "skinny_copy_pct": pct(sk.median_ms),
        "cublaslt_us": lt.median_ms * 1e3,
        "cublaslt_copy_pct": pct(lt.median_ms),
        "copy_gbps": copy / 1e9,
        "weight_copies": copies,
    });
    if let [one, two] = &wgmma[..] {
        out["skinny_wgmma_us"] = (one.median_ms * 1e3).into();
        out["skinny_wgmma_copy_pct"] = pct(one.median_ms).into();
        out["skinny_wgmma128_us"] = (two.median_ms * 1e3).into();
        out["skinny_wgmma128_copy_pct"] = pct(two.median_ms).into();
    }
    if let Some(g) = gemv {
        out["gemv_us"] = (g.median_ms * 1e3).into();
        out["gemv_copy_pct"] = pct_of(2 * m * k, g.median_ms).into();
    }
    if let Some(g) = stream {
        out["stream_us"] = (g.median_ms * 1e3).into();
        out["stream_copy_pct"] = pct_of(2 * m * k, g.median_ms).into();
    }
    Ok(out)
}

/// Our GEMV beside cuBLASLt on decode shapes, as weight-read bandwidth (see the module doc).
fn run_gemv<T: HalfFloat>(args: &GemmArgs, shapes: &[(usize, usize, usize)]) -> anyhow::Result<()> {
    use radix_kernels::gemv;
    let device = Device::open(0)?;
    let gemm = Gemm::new(&device)?;
    let jit = radix_gpu::Jit::with_default_cache();
    let copy = super::decode::copy_bandwidth(&device)?;
    println!("device-to-device copy: {:.0} GB/s (read + write)", copy / 1e9);
    // Random values, a 4M-element block repeated (see upload_cycled).
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let block: Vec<T> =
        (0..(1usize << 22)).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect();
    let mut rows = Vec::new();
    for &(m, n, k) in shapes {
        anyhow::ensure!(
            gemv::fits(m, n, k),
            "--gemv takes M <= 8 and K a multiple of 8, not {m}x{n}x{k}"
        );
        let bytes = (n * k + m * k + m * n) * std::mem::size_of::<T>();
        let copies = (256usize << 20).div_ceil(n * k * std::mem::size_of::<T>()).clamp(1, 16);
        let upload = |len: usize| upload_cycled(&device, &block, len);
        let x = upload(m * k)?;
        let ws: Vec<_> = (0..copies).map(|_| upload(n * k)).collect::<anyhow::Result<_>>()?;
        let mut out = device.alloc::<T>(m * n)?;
        let lt = time_back_to_back(&device, args.warmup, 5, args.runs, |i| {
            gemm.matmul::<T, T>(m, n, k, &x, &ws[i % copies], BLayout::NK, None, 0.0, &mut out)
        })?;
        let ours = time_back_to_back(&device, args.warmup, 5, args.runs, |i| {
            gemv::gemv(&jit, m, n, k, &x, &ws[i % copies], &mut out)
        })?;
        // The streaming kernel (Hopper, K a multiple of 1,024, up to 4 rows), back to back
        // as well: under programmatic dependent launch each launch's first copies overlap
        // the previous one's tail, as they overlap the previous kernel in a decode step.
        let stream = if gemv::fits_stream(device.info(), m, n, k) {
            Some(time_back_to_back(&device, args.warmup, 5, args.runs, |i| {
                gemv::gemv_stream(&jit, m, n, k, &x, &ws[i % copies], &mut out)
            })?)
        } else {
            None
        };
        let gbps = |ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
        let p = gbps(lt.median_ms);
        let shape = format!("M={m} N={n} K={k} {}", T::DTYPE);
        let lt_extra = serde_json::json!({
            "cublaslt_gbps": p,
            "cublaslt_us": lt.median_ms * 1e3,
            "copy_gbps": copy / 1e9,
            "weight_copies": copies,
        });
        print!(
            "{shape}: cuBLASLt {:.2} us {p:.0} GB/s ({:.1}%)",
            lt.median_ms * 1e3,
            100.0 * p * 1e9 / copy
        );
        for (name, t) in [("gemv", Some(ours)), ("gemv_stream", stream)] {
            let Some(t) = t else { continue };
            let o = gbps(t.median_ms);
            print!(
                " | {name} {:.2} us {o:.0} GB/s ({:.1}%, {:.2}x)",
                t.median_ms * 1e3,
                100.0 * o * 1e9 / copy,
                lt.median_ms / t.median_ms
            );
            rows.push(Measurement {
                benchmark: name.into(),
                shape: shape.clone(),
                ours: o,
                unit: "GB/s".into(),
                median_ms: t.median_ms,
                device: device.info().name.clone(),
                extra: Some(lt_extra.clone()),
            });
        }
        println!();
    }
    write_json(args.json.as_ref(), &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shapes_and_lists_defaults() {
        assert_eq!(parse_shape("1x4096x14336").unwrap(), (1, 4096, 14336));
        assert!(parse_shape("1x2").is_err());
        assert!(parse_shape("0x2x3").is_err());
        assert_eq!(default_shapes().len(), 13);
    }
}

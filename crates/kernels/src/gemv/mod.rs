//! Skinny GEMMs for decode (gemv.cu): `out[M,N] = x[M,K] · wᵀ` for M up to 8 and a
//! Linear weight `w[N,K]`, bandwidth-bound, beside cuBLASLt (`bench gemm --gemv`).
//! `gemv_fp8`: the same with an FP8 weight (e4m3 bytes, a scale per row) and 16-bit x.
//! `gemv_stream` (stream.cu, Hopper): up to 4 rows, each block streaming a contiguous
//! range of weight rows through shared memory with bulk copies, the first of them issued
//! before the previous kernel has finished (programmatic dependent launch).

use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{
    Arch, DeviceBuffer, DeviceInfo, Element, HalfFloat, Jit, KernelSpec, Result, SourceFile, ensure,
};

use crate::{HEADERS, dtype_define};

pub const GEMV: SourceFile = SourceFile { path: "gemv/gemv.cu", code: include_str!("gemv.cu") };
pub const GEMV_STREAM: SourceFile =
    SourceFile { path: "gemv/stream.cu", code: include_str!("stream.cu") };

/// Rows of x the kernel takes at most.
pub const MAX_ROWS: usize = 8;
/// Weight rows per block (`ROWS` in gemv.cu).
const BLOCK_ROWS: usize = 8;

/// The specialisation for up to `m_rows` rows of x (rounded up to 1, 2, 4 or 8), input
/// dtype `T` and f32 (`out_f32`) or `T` output.
pub fn spec<T: HalfFloat>(m_rows: usize, out_f32: bool) -> KernelSpec {
    KernelSpec::new(GEMV, HEADERS)
        .define("DTYPE", dtype_define::<T>())
        .define("M_ROWS", m_rows.next_power_of_two().max(1))
        .define("OUT_F32", out_f32 as u32)
}

/// The FP8-weight specialisation (e4m3 conversion in hardware: sm_89 and later).
pub fn spec_fp8<T: HalfFloat>(m_rows: usize, out_f32: bool) -> KernelSpec {
    spec::<T>(m_rows, out_f32).define("W_FP8", 1).min_arch(Arch::SM89)
}

/// Mirrors `GemvParams` in params.cuh (both kernels' parameters).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GemvParams {
    x: u64,
    w: u64,
    out: u64,
    w_scales: u64,
    m_rows: i32,
    n: i32,
    k: i32,
    /// stream.cu only: rows a block owns (gemv.cu: 0, unused).
    rows_per_block: i32,
    /// stream.cu with x built from an RMSNorm: its weight and epsilon.
    norm_w: u64,
    eps: f32,
    /// stream.cu: add the product into out (0 in gemv.cu).
    accumulate: i32,
}

// SAFETY: plain data mirroring the kernel's parameter struct.
unsafe impl DeviceRepr for GemvParams {}

const _: () = assert!(std::mem::size_of::<GemvParams>() == 64);

/// Whether `gemv` takes this product: few rows, K in whole 16-byte chunks, sizes in i32.
pub fn fits(m: usize, n: usize, k: usize) -> bool {
    (1..=MAX_ROWS).contains(&m)
        && n > 0
        && k > 0
        && k.is_multiple_of(8)
        && n * k < i32::MAX as usize
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` (f32 accumulation); `O` is `T` or f32.
pub fn gemv<T: HalfFloat, O: Element>(
    jit: &Jit,
    m: usize,
    n: usize,
    k: usize,
    x: &DeviceBuffer<T>,
    w: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<O>,
) -> Result<()> {
    ensure!(
        fits(m, n, k),
        "gemv takes 1..={MAX_ROWS} rows and K a multiple of 8, got M={m} N={n} K={k}"
    );
    ensure!(w.len() >= n * k, "gemv w holds {} elements, expected N*K = {n}*{k}", w.len());
    launch(jit, (m, n, k), x, w.ptr(), None, out, "gemv")
}

/// Whether `gemv_fp8` takes this product: `fits`, with K in whole 16-byte weight chunks.
pub fn fits_fp8(m: usize, n: usize, k: usize) -> bool {
    fits(m, n, k) && k.is_multiple_of(16)
}

/// `out[m, n] = scales[n] · Σ_k x[m, k] · e4m3(w[n, k])` (f32 accumulation); `O` is `T`
/// or f32.
#[allow(clippy::too_many_arguments)]
pub fn gemv_fp8<T: HalfFloat, O: Element>(
    jit: &Jit,
    m: usize,
    n: usize,
    k: usize,
    x: &DeviceBuffer<T>,
    w: &DeviceBuffer<u8>,
    scales: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<O>,
) -> Result<()> {
    ensure!(
        fits_fp8(m, n, k),
        "gemv_fp8 takes 1..={MAX_ROWS} rows and K a multiple of 16, got M={m} N={n} K={k}"
    );
    ensure!(w.len() >= n * k, "gemv_fp8 w holds {} bytes, expected N*K = {n}*{k}", w.len());
    ensure!(scales.len() >= n, "gemv_fp8 has {} scales for {n} rows", scales.len());
    launch(jit, (m, n, k), x, w.ptr(), Some(scales.ptr()), out, "gemv_fp8")
}

/// Checks both GEMVs' x and out for an `[m, k] x [n, k]` product; returns whether out is
/// f32 (else it is `T`).
fn check_x_out<T: HalfFloat, O: Element>(
    (m, n, k): (usize, usize, usize),
    x: &DeviceBuffer<T>,
    out: &DeviceBuffer<O>,
    what: &str,
) -> Result<bool> {
    let out_f32 = O::DTYPE == radix_gpu::DType::F32;
    ensure!(
        out_f32 || O::DTYPE == T::DTYPE,
        "{what} writes f32 or the input dtype, not {}",
        O::DTYPE
    );
    ensure!(x.len() >= m * k, "{what} x holds {} elements, expected M*K = {m}*{k}", x.len());
    ensure!(out.len() >= m * n, "{what} out holds {} elements, expected M*N = {m}*{n}", out.len());
    Ok(out_f32)
}

/// Checks x and out and launches the specialisation for `m` rows: 16-bit weights at
/// `w`, or e4m3 ones with their `scales` (the callers checked `w` and `scales`).
fn launch<T: HalfFloat, O: Element>(
    jit: &Jit,
    (m, n, k): (usize, usize, usize),
    x: &DeviceBuffer<T>,
    w: u64,
    scales: Option<u64>,
    out: &mut DeviceBuffer<O>,
    what: &str,
) -> Result<()> {
    let out_f32 = check_x_out((m, n, k), x, out, what)?;
    let spec = match scales {
        None => spec::<T>(m, out_f32),
        Some(_) => spec_fp8::<T>(m, out_f32),
    };
    let kernel = jit.kernel(x.device(), &spec, "gemv")?;
    let params = GemvParams {
        x: x.ptr(),
        w,
        out: out.ptr_mut(),
        w_scales: scales.unwrap_or(0),
        m_rows: m as i32,
        n: n as i32,
        k: k as i32,
        rows_per_block: 0,
        norm_w: 0,
        eps: 0.0,
        accumulate: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK_ROWS) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: sizes checked here and by the callers; the kernel reads rows < n of w (and
    // of scales) and m_rows rows of x.
    unsafe { kernel.launch(x.device(), cfg, &params) }
}

/// Rows of x `gemv_stream` takes at most.
pub const STREAM_MAX_ROWS: usize = 4;
/// Bytes of a row one warp sums per stage, a span (`32 * VEC_PER_LANE * 16` in stream.cu):
/// K times the weight's element size must be a multiple.
const STREAM_WARP_BYTES: usize = 2048;
/// Shared memory of the stage ring (`STAGES * STAGE_BYTES` in stream.cu), and the number
/// of stages (each has a full and an empty barrier).
const STREAM_RING_BYTES: usize = 4 * 32768;
const STREAM_STAGES: usize = 4;
/// Threads per block: 16 consumer warps and a producer warp.
const STREAM_THREADS: u32 = 32 * 17;

/// The streaming GEMV's specialisation for up to `m_rows` rows (rounded up to 1, 2 or 4).
pub fn spec_stream<T: HalfFloat>(m_rows: usize, out_f32: bool) -> KernelSpec {
    KernelSpec::new(GEMV_STREAM, HEADERS)
        .define("DTYPE", dtype_define::<T>())
        .define("M_ROWS", m_rows.next_power_of_two().max(1))
        .define("OUT_F32", out_f32 as u32)
        .min_arch(Arch::SM90A)
}

/// The streaming GEMV over an FP8 weight (e4m3 bytes, a scale per row) and 16-bit x.
pub fn spec_stream_fp8<T: HalfFloat>(m_rows: usize, out_f32: bool) -> KernelSpec {
    spec_stream::<T>(m_rows, out_f32).define("W_FP8", 1)
}

/// The one-row specialisation that builds x in the kernel (`StreamX`'s `x_src`), over a
/// 16-bit (`fp8` false) or an FP8 weight.
pub fn spec_stream_built<T: HalfFloat>(x_src: u32, fp8: bool, out_f32: bool) -> KernelSpec {
    let spec = if fp8 { spec_stream_fp8::<T>(1, out_f32) } else { spec_stream::<T>(1, out_f32) };
    spec.define("X_SRC", x_src)
}

/// What the streaming GEMV multiplies: x as it is, or one row of x built inside the
/// kernel from the activation the small op before it would have read (the op fused).
#[derive(Clone, Copy)]
pub enum StreamX<'a, T: HalfFloat> {
    /// `x` `[m, k]`.
    Plain(&'a DeviceBuffer<T>),
    /// `rms_norm(x) · weight` of one row `x` `[1, k]`, each value rounded to `T` (as
    /// `ops::rms_norm` stores it).
    RmsNorm { x: &'a DeviceBuffer<T>, weight: &'a DeviceBuffer<T>, eps: f32 },
    /// `silu(gate) · up` of one row `[gate | up]` `[1, 2k]`, rounded to `T` (as
    /// `ops::silu_mul` stores it).
    SiluMul(&'a DeviceBuffer<T>),
}

impl<T: HalfFloat> StreamX<'_, T> {
    /// stream.cu's `X_SRC`.
    fn x_src(&self) -> u32 {
        match self {
            StreamX::Plain(_) => 0,
            StreamX::RmsNorm { .. } => 1,
            StreamX::SiluMul(_) => 2,
        }
    }

    /// The activation the kernel reads.
    fn source(&self) -> &DeviceBuffer<T> {
        match self {
            StreamX::Plain(x) | StreamX::SiluMul(x) | StreamX::RmsNorm { x, .. } => x,
        }
    }

    /// Checks the activation (and the norm weight) for `m` rows of `k`.
    fn check(&self, m: usize, k: usize) -> Result<()> {
        let (rows, width) = match self {
            StreamX::Plain(_) => return Ok(()),
            StreamX::RmsNorm { weight, eps, .. } => {
                ensure!(
                    weight.len() >= k,
                    "gemv_stream's norm weight holds {} of {k}",
                    weight.len()
                );
                ensure!(
                    weight.ptr().is_multiple_of(16),
                    "gemv_stream needs a 16-byte aligned norm weight, got {:#x}",
                    weight.ptr()
                );
                ensure!(eps.is_finite() && *eps >= 0.0, "gemv_stream's norm epsilon is {eps}");
                (m, k)
            }
            StreamX::SiluMul(_) => (m, 2 * k),
        };
        ensure!(rows == 1, "gemv_stream builds x of one row in the kernel, got M={rows}");
        let x = self.source();
        ensure!(x.len() >= width, "gemv_stream's x holds {} elements of {width}", x.len());
        Ok(())
    }
}

/// The weight of a streaming product: 16-bit, or e4m3 bytes with a scale per row.
#[derive(Clone, Copy)]
pub enum StreamWeight<'a, T: HalfFloat> {
    Half(&'a DeviceBuffer<T>),
    Fp8 { bits: &'a DeviceBuffer<u8>, scales: &'a DeviceBuffer<f32> },
}

/// Whether `gemv_stream` takes this product on GPU `info`: sm_90a, at most 4 rows, K a
/// multiple of 1,024 (a warp's span of a stage stays in one row), sizes in i32, and the
/// block's span sums fit in shared memory beside the stage ring.
pub fn fits_stream(info: &DeviceInfo, m: usize, n: usize, k: usize) -> bool {
    fits_stream_bytes(info, m, n, k, 2, false)
}

/// Whether `gemv_stream_fp8` takes this product: as `fits_stream`, K a multiple of 2,048.
pub fn fits_stream_fp8(info: &DeviceInfo, m: usize, n: usize, k: usize) -> bool {
    fits_stream_bytes(info, m, n, k, 1, false)
}

/// Whether `gemv_stream_fused` takes a one-row product that builds x in the kernel
/// (`StreamX::RmsNorm` or `SiluMul`): as `fits_stream` (or `_fp8`), with the row of x in
/// shared memory as well.
pub fn fits_stream_built(info: &DeviceInfo, n: usize, k: usize, fp8: bool) -> bool {
    fits_stream_bytes(info, 1, n, k, if fp8 { 1 } else { 2 }, true)
}

fn fits_stream_bytes(
    info: &DeviceInfo,
    m: usize,
    n: usize,
    k: usize,
    elem_bytes: usize,
    built: bool,
) -> bool {
    // The kernel is sm_90a code (cp.async.bulk, mbarriers as Hopper has them), as its spec.
    info.arch() == Arch::SM90A
        && (1..=STREAM_MAX_ROWS).contains(&m)
        && n > 0
        && k > 0
        && (k * elem_bytes).is_multiple_of(STREAM_WARP_BYTES)
        && n * k < i32::MAX as usize
        && stream_smem(info, m, n, k, elem_bytes, built).1 <= info.max_shared_per_block
}

/// Rows per block (about one block per SM) and the dynamic shared memory they take: the
/// stage ring, a sum per (span of 2,048 bytes of a row, row of x), the barriers, and
/// (`built`) the row of x the block builds.
fn stream_smem(
    info: &DeviceInfo,
    m: usize,
    n: usize,
    k: usize,
    elem_bytes: usize,
    built: bool,
) -> (usize, usize) {
    let rows_per_block = n.div_ceil(info.sm_count.max(1) as usize);
    let spans = rows_per_block * (k * elem_bytes / STREAM_WARP_BYTES);
    let sums = (spans * m.next_power_of_two() * 4).next_multiple_of(16);
    // The built row, and the consumers' 16 partial sums of squares (static shared memory).
    let x = if built { 2 * k + 16 * 4 } else { 0 };
    (rows_per_block, STREAM_RING_BYTES + sums + STREAM_STAGES * 16 + x)
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` (f32 accumulation) by the streaming kernel; `O` is
/// `T` or f32.
///
/// `w` must not be written by the kernel launched just before this one on the stream: the
/// first stages of it are read before the kernel waits for that one (programmatic
/// dependent launch). The engine's weights are written once, at load.
pub fn gemv_stream<T: HalfFloat, O: Element>(
    jit: &Jit,
    m: usize,
    n: usize,
    k: usize,
    x: &DeviceBuffer<T>,
    w: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<O>,
) -> Result<()> {
    gemv_stream_fused(jit, (m, n, k), StreamX::Plain(x), StreamWeight::Half(w), out, false)
}

/// `out[m, n] = scales[n] · Σ_k x[m, k] · e4m3(w[n, k])` by the streaming kernel; `O` is
/// `T` or f32. As `gemv_stream`, `w` must not come from the kernel just before.
#[allow(clippy::too_many_arguments)]
pub fn gemv_stream_fp8<T: HalfFloat, O: Element>(
    jit: &Jit,
    m: usize,
    n: usize,
    k: usize,
    x: &DeviceBuffer<T>,
    w: &DeviceBuffer<u8>,
    scales: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<O>,
) -> Result<()> {
    let w = StreamWeight::Fp8 { bits: w, scales };
    gemv_stream_fused(jit, (m, n, k), StreamX::Plain(x), w, out, false)
}

/// The streaming product with the small op before it fused (`x`: `StreamX`), and with
/// `accumulate` the residual add after it: `out[m, n] (+)= Σ_k x[m, k] · w[n, k]`, the sum
/// rounded to `O` before it is added (as `ops::add_rms_norm` adds a stored product). As
/// `gemv_stream`, `w` must not come from the kernel just before; `out` must not overlap
/// what x is built from.
pub fn gemv_stream_fused<T: HalfFloat, O: Element>(
    jit: &Jit,
    (m, n, k): (usize, usize, usize),
    x: StreamX<'_, T>,
    w: StreamWeight<'_, T>,
    out: &mut DeviceBuffer<O>,
    accumulate: bool,
) -> Result<()> {
    let device = x.source().device();
    let info = device.info();
    let (w_ptr, scales, elem_bytes) = match w {
        StreamWeight::Half(w) => {
            ensure!(
                w.len() >= n * k,
                "gemv_stream w holds {} elements, expected N*K = {n}*{k}",
                w.len()
            );
            (w.ptr(), None, 2)
        }
        StreamWeight::Fp8 { bits, scales } => {
            ensure!(
                bits.len() >= n * k,
                "gemv_stream w holds {} bytes, expected N*K = {n}*{k}",
                bits.len()
            );
            ensure!(scales.len() >= n, "gemv_stream has {} scales for {n} rows", scales.len());
            (bits.ptr(), Some(scales.ptr()), 1)
        }
    };
    let built = x.x_src() != 0;
    x.check(m, k)?;
    // Blocks write out while others still read what x is built from: they must not overlap.
    let out_bytes = (out.ptr(), out.len() * std::mem::size_of::<O>());
    let src = x.source();
    let mut inputs = vec![(src.ptr(), src.len() * std::mem::size_of::<T>())];
    if let StreamX::RmsNorm { weight, .. } = x {
        inputs.push((weight.ptr(), weight.len() * std::mem::size_of::<T>()));
    }
    for (at, len) in inputs {
        ensure!(
            at + len as u64 <= out_bytes.0 || out_bytes.0 + out_bytes.1 as u64 <= at,
            "gemv_stream's out overlaps its input ({at:#x}+{len} and {:#x}+{})",
            out_bytes.0,
            out_bytes.1
        );
    }
    ensure!(
        fits_stream_bytes(info, m, n, k, elem_bytes, built),
        "gemv_stream takes 1..={STREAM_MAX_ROWS} rows, K a multiple of {}, an sm_90a GPU and \
         its sums in shared memory, got M={m} N={n} K={k} on {}",
        STREAM_WARP_BYTES / elem_bytes,
        info.name
    );
    // cp.async.bulk and the 16-byte loads of x need 16-byte alignment.
    ensure!(
        w_ptr.is_multiple_of(16) && src.ptr().is_multiple_of(16),
        "gemv_stream needs 16-byte aligned w and x, got {w_ptr:#x} and {:#x}",
        src.ptr()
    );
    // (A built x's source was checked by `StreamX::check`, against its own width.)
    let out_f32 = check_x_out((m, n, if built { 0 } else { k }), src, out, "gemv_stream")?;
    // About one block per SM, each a whole number of rows.
    let (rows_per_block, smem) = stream_smem(info, m, n, k, elem_bytes, built);
    let spec = match (built, scales) {
        (true, _) => spec_stream_built::<T>(x.x_src(), scales.is_some(), out_f32),
        (false, None) => spec_stream::<T>(m, out_f32),
        (false, Some(_)) => spec_stream_fp8::<T>(m, out_f32),
    };
    let kernel = jit.kernel(device, &spec, "gemv_stream")?;
    kernel.set_max_dynamic_smem(device, smem)?;
    let (norm_w, eps) = match x {
        StreamX::RmsNorm { weight, eps, .. } => (weight.ptr(), eps),
        _ => (0, 0.0),
    };
    let params = GemvParams {
        x: src.ptr(),
        w: w_ptr,
        out: out.ptr_mut(),
        w_scales: scales.unwrap_or(0),
        m_rows: m as i32,
        n: n as i32,
        k: k as i32,
        rows_per_block: rows_per_block as i32,
        norm_w,
        eps,
        accumulate: accumulate as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: (STREAM_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: sizes checked here and by `StreamX::check`; block b reads rows
    // [b * rows_per_block, ..) < n of w (and of scales), m rows of x (or the one row x is
    // built from, and k norm weights), and writes (reads, accumulating) those rows of out.
    unsafe { kernel.launch(device, cfg, &params) }
}

//! Skinny GEMMs for decode (gemv.cu): `out[M,N] = x[M,K] · wᵀ` for M up to 8 and a
//! Linear weight `w[N,K]`, bandwidth-bound, beside cuBLASLt (`bench gemm --gemv`).
//! `gemv_fp8`: the same with an FP8 weight (e4m3 bytes, a scale per row) and 16-bit x.

use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{
    Arch, DeviceBuffer, Element, HalfFloat, Jit, KernelSpec, Result, SourceFile, ensure,
};

use crate::{HEADERS, dtype_define};

pub const GEMV: SourceFile = SourceFile { path: "gemv/gemv.cu", code: include_str!("gemv.cu") };

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

/// Mirrors `GemvParams` in gemv.cu.
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
    reserved: i32,
}

// SAFETY: plain data mirroring the kernel's parameter struct.
unsafe impl DeviceRepr for GemvParams {}

const _: () = assert!(std::mem::size_of::<GemvParams>() == 48);

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
    let out_f32 = O::DTYPE == radix_gpu::DType::F32;
    ensure!(
        out_f32 || O::DTYPE == T::DTYPE,
        "{what} writes f32 or the input dtype, not {}",
        O::DTYPE
    );
    ensure!(x.len() >= m * k, "{what} x holds {} elements, expected M*K = {m}*{k}", x.len());
    ensure!(out.len() >= m * n, "{what} out holds {} elements, expected M*N = {m}*{n}", out.len());
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
        reserved: 0,
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

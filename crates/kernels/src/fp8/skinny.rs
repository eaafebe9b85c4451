//! The skinny FP8 GEMM (skinny.cu): `out = xs · ws · (xq · wqᵀ) (+ bias)` for the few
//! rows of a decode step, e4m3 activations (per-token scales) against an e4m3 Linear
//! weight (per-row scales), reading the weights at the copy bandwidth where cuBLASLt's
//! FP8 kernels do not (`bench gemm --dtype fp8` times both).

use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{Arch, DeviceBuffer, HalfFloat, Jit, KernelSpec, Result, SourceFile, ensure};

use crate::{HEADERS, dtype_define};

pub const SKINNY: SourceFile =
    SourceFile { path: "fp8/skinny.cu", code: include_str!("skinny.cu") };

/// Rows of x the kernel takes at most (8 MMA columns of 8 tokens).
pub const MAX_ROWS: usize = 64;
/// Rows up to which the engine considers it by default (`engine_variant` decides per
/// shape): beyond, cuBLASLt's FP8 GEMM was faster on the H200 (bench/NOTES.md).
pub const DEFAULT_ROWS: usize = 32;
/// Rows up to which the mma.sync variant beat cuBLASLt on every Llama-3-8B shape (H200):
/// where the wgmma variant cannot run.
const MMA_ROWS: usize = 8;
/// Rows up to which the wgmma variant beat cuBLASLt on every Llama-3-8B shape (H200, 1.2-2.3x
/// at 1-8 rows, where it also beat the mma.sync variant by 1.16-1.35x; 1.11-1.60x at 16),
/// and up to which it beat it on the large products only (17-32 rows: gate|up and down
/// 1.33-1.39x; q|k|v and o 0.80-0.93x).
const WGMMA_ALL_ROWS: usize = 16;
const WGMMA_LARGE_ROWS: usize = 32;
/// Weight elements from which a product counts as large (down is 58.7 M, o 16.8 M).
const LARGE_WEIGHTS: usize = 48 << 20;
/// Weight rows per block (`BLOCK_ROWS` in skinny.cu): one counter each when K is split.
pub const BLOCK_ROWS: usize = 64;
/// K bytes of one warp step (`SEG`): K must be a multiple of it.
const SEG: usize = 64;
/// K bytes of one stage of the wgmma variant (`KB`).
const WGMMA_SEG: usize = 128;
/// Stages of the wgmma variant (`STAGES`).
const WGMMA_STAGES: usize = 4;

/// Dynamic shared memory of the wgmma variant for `m` rows: its stages of 64 weight rows
/// and the token rows (8, 16, 32 or 64) of 128 bytes, and 1 KiB to align them.
fn wgmma_smem(m: usize) -> usize {
    let tokens = 8 * m.div_ceil(8).next_power_of_two().clamp(1, MAX_ROWS / 8);
    WGMMA_STAGES * (BLOCK_ROWS + tokens) * WGMMA_SEG + 1024
}
/// Splits of K at most: more would leave each warp too few steps to hide a load.
const MAX_SPLITS: usize = 16;

/// The specialisation for up to `m` rows (rounded up to 8, 16, 32 or 64), output `T`.
pub fn spec<T: HalfFloat>(m: usize) -> KernelSpec {
    let tiles = m.div_ceil(8).next_power_of_two().clamp(1, MAX_ROWS / 8);
    KernelSpec::new(SKINNY, HEADERS)
        .define("DTYPE", dtype_define::<T>())
        .define("N_TILES", tiles)
        .min_arch(Arch::SM89)
}

/// The same on Hopper's FP8 wgmma (skinny.cu's WGMMA; sm_90a).
pub fn spec_wgmma<T: HalfFloat>(m: usize) -> KernelSpec {
    spec::<T>(m).define("WGMMA", 1).min_arch(Arch::SM90A)
}

/// Whether the wgmma variant runs on `arch` with this K: sm_90a, K in whole 128-byte
/// stages.
pub fn wgmma_runs(arch: Arch, k: usize) -> bool {
    arch == Arch::SM90A && k.is_multiple_of(WGMMA_SEG)
}

/// Which variant the engine runs for `m` rows against an `n x k` FP8 weight on `arch`:
/// `Some(false)` the mma.sync one, `Some(true)` the wgmma one, `None` neither (cuBLASLt's
/// FP8 GEMM is faster there). From the H200's measurements of 2026-11-30 (bench/NOTES.md):
/// on Hopper wgmma up to 16 rows, and at 17-32 rows on the large products; elsewhere
/// mma.sync up to 8 rows.
pub fn engine_variant(arch: Arch, m: usize, n: usize, k: usize) -> Option<bool> {
    if !fits(m, n, k) {
        return None;
    }
    if wgmma_runs(arch, k)
        && (m <= WGMMA_ALL_ROWS || (m <= WGMMA_LARGE_ROWS && n * k >= LARGE_WEIGHTS))
    {
        return Some(true);
    }
    (m <= MMA_ROWS).then_some(false)
}

/// Mirrors `SkinnyParams` in skinny.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SkinnyParams {
    x: u64,
    x_scales: u64,
    w: u64,
    w_scales: u64,
    bias: u64,
    out: u64,
    partial: u64,
    counters: u64,
    m: i32,
    n: i32,
    k: i32,
    k_split: i32,
}

// SAFETY: plain data mirroring the kernel's parameter struct.
unsafe impl DeviceRepr for SkinnyParams {}

const _: () = assert!(std::mem::size_of::<SkinnyParams>() == 80);

/// Whether the kernel takes this product: 1..=64 rows, K in whole 64-byte steps, sizes
/// in i32.
pub fn fits(m: usize, n: usize, k: usize) -> bool {
    (1..=MAX_ROWS).contains(&m)
        && n > 0
        && k > 0
        && k.is_multiple_of(SEG)
        && n.max(m) * k < i32::MAX as usize
}

/// How K is split: `(k_split, splits)`, so that the row groups times the splits come near
/// `target_blocks`, each split a whole number of 64-byte steps, and the partial sums
/// (`splits × m × n` floats) fit `partial_cap`.
pub fn plan(
    m: usize,
    n: usize,
    k: usize,
    target_blocks: usize,
    partial_cap: usize,
) -> (usize, usize) {
    plan_steps(m, n, k, target_blocks, partial_cap, SEG)
}

/// `plan` in steps of `seg` K bytes.
fn plan_steps(
    m: usize,
    n: usize,
    k: usize,
    target_blocks: usize,
    partial_cap: usize,
    seg: usize,
) -> (usize, usize) {
    let groups = n.div_ceil(BLOCK_ROWS);
    let steps = k / seg;
    let mut splits = (target_blocks / groups).clamp(1, MAX_SPLITS.min(steps));
    while splits > 1 && splits * m * n > partial_cap {
        splits -= 1;
    }
    let k_split = steps.div_ceil(splits) * seg;
    (k_split, k.div_ceil(k_split))
}

/// Blocks a launch aims for: four per SM (sixteen warps), or
/// `RADIX_SPARSE_FP8_SKINNY_BLOCKS` per SM.
pub fn target_blocks(sm_count: usize) -> usize {
    static PER_SM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let per_sm = PER_SM.get_or_init(|| {
        std::env::var("RADIX_SPARSE_FP8_SKINNY_BLOCKS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&b| b > 0)
            .unwrap_or(4)
    });
    per_sm * sm_count
}

/// The scratch of a launch that splits K: f32 partial sums and one counter per 64 weight
/// rows, all zero before the first launch (the kernel leaves the counters zero).
pub struct SkinnyScratch<'a> {
    pub partial: &'a mut DeviceBuffer<f32>,
    pub counters: &'a mut DeviceBuffer<i32>,
}

/// `out[m, n] = xs[m] · ws[n] · Σ_k e4m3(xq[m, k]) · e4m3(wq[n, k]) (+ bias[n])`, f32
/// accumulation.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: HalfFloat>(
    jit: &Jit,
    dims: (usize, usize, usize),
    x: (&DeviceBuffer<u8>, &DeviceBuffer<f32>),
    w: (&DeviceBuffer<u8>, &DeviceBuffer<f32>),
    bias: Option<&DeviceBuffer<T>>,
    out: &mut DeviceBuffer<T>,
    scratch: SkinnyScratch<'_>,
) -> Result<()> {
    gemm_with(jit, dims, x, w, bias, out, scratch, None)
}

/// `gemm` with the variant chosen: `Some(true)` the wgmma one (sm_90a, K a multiple of
/// 128), `Some(false)` the mma.sync one, `None` the wgmma one wherever it runs (it was the
/// faster of the two at every shape measured on the H200).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with<T: HalfFloat>(
    jit: &Jit,
    (m, n, k): (usize, usize, usize),
    (xq, xs): (&DeviceBuffer<u8>, &DeviceBuffer<f32>),
    (wq, ws): (&DeviceBuffer<u8>, &DeviceBuffer<f32>),
    bias: Option<&DeviceBuffer<T>>,
    out: &mut DeviceBuffer<T>,
    scratch: SkinnyScratch<'_>,
    wgmma: Option<bool>,
) -> Result<()> {
    ensure!(
        fits(m, n, k),
        "the skinny FP8 GEMM takes 1..={MAX_ROWS} rows and K a multiple of {SEG}, got M={m} \
         N={n} K={k}"
    );
    ensure!(
        xq.len() >= m * k && xs.len() >= m,
        "skinny FP8 GEMM: x holds {} bytes and {} scales for [{m}, {k}]",
        xq.len(),
        xs.len()
    );
    ensure!(
        wq.len() >= n * k && ws.len() >= n,
        "skinny FP8 GEMM: w holds {} bytes and {} scales for [{n}, {k}]",
        wq.len(),
        ws.len()
    );
    ensure!(out.len() >= m * n, "skinny FP8 GEMM: out holds {} for [{m}, {n}]", out.len());
    if let Some(b) = bias {
        ensure!(b.len() >= n, "skinny FP8 GEMM: {} bias values for {n} rows", b.len());
    }
    let device = xq.device();
    let sms = device.info().sm_count as usize;
    let arch = device.info().arch();
    let wgmma = wgmma.unwrap_or_else(|| wgmma_runs(arch, k));
    ensure!(
        !wgmma || wgmma_runs(arch, k),
        "the skinny FP8 GEMM's wgmma variant runs on sm_90a with K a multiple of \
         {WGMMA_SEG}, not on {arch} with K={k}"
    );
    let seg = if wgmma { WGMMA_SEG } else { SEG };
    let (k_split, splits) = plan_steps(m, n, k, target_blocks(sms), scratch.partial.len(), seg);
    let groups = n.div_ceil(BLOCK_ROWS);
    if splits > 1 {
        ensure!(
            scratch.counters.len() >= groups,
            "skinny FP8 GEMM: {} counters for {groups} row groups",
            scratch.counters.len()
        );
    }
    let spec = if wgmma { spec_wgmma::<T>(m) } else { spec::<T>(m) };
    let kernel = jit.kernel(device, &spec, "fp8_gemm_skinny")?;
    let smem = if wgmma { wgmma_smem(m) } else { 0 };
    kernel.set_max_dynamic_smem(device, smem)?;
    let params = SkinnyParams {
        x: xq.ptr(),
        x_scales: xs.ptr(),
        w: wq.ptr(),
        w_scales: ws.ptr(),
        bias: bias.map_or(0, |b| b.ptr()),
        out: out.ptr_mut(),
        partial: scratch.partial.ptr_mut(),
        counters: scratch.counters.ptr_mut(),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        k_split: k_split as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (groups as u32, splits as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: sizes checked above; the kernel reads rows < n of w and ws, rows < m of x
    // and xs, writes out[m, n] and, with splits > 1, partial[splits, m, n] (plan keeps it
    // within the buffer) and counters[groups].
    unsafe { kernel.launch(device, cfg, &params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_split_k_until_the_gpu_is_full() {
        // 132 SMs, 4 blocks each: Llama-3-8B's o projection (64 row groups) splits 8 ways,
        // its gate|up (448 groups) not at all, its down projection 8 ways of 28 steps.
        let cap = 1 << 22;
        assert_eq!(plan(1, 4096, 4096, 528, cap), (512, 8));
        assert_eq!(plan(64, 28672, 4096, 528, cap), (4096, 1));
        assert_eq!(plan(8, 4096, 14336, 528, cap), (1792, 8));
        // qkv: 96 groups, 5 splits of 13 steps (the last 12).
        assert_eq!(plan(1, 6144, 4096, 528, cap), (832, 5));
        // Few steps: no more splits than steps.
        assert_eq!(plan(1, 64, 128, 528, cap), (64, 2));
        // The partial sums must fit.
        assert_eq!(plan(64, 4096, 4096, 528, 3 * 64 * 4096), (1408, 3));
    }

    #[test]
    fn specs_round_rows_up_to_whole_mma_columns() {
        let tiles = |m| {
            let spec = spec::<half::bf16>(m);
            spec.defines.iter().find(|(k, _)| k == "N_TILES").unwrap().1.clone()
        };
        assert_eq!(tiles(1), "1");
        assert_eq!(tiles(9), "2");
        assert_eq!(tiles(33), "8");
        assert_eq!(tiles(64), "8");
    }

    #[test]
    fn wgmma_stages_fit_two_blocks_an_sm() {
        // 4 stages of 64 weight rows and 8 (16, 32, 64) token rows of 128 bytes, + 1 KiB.
        assert_eq!(wgmma_smem(1), 4 * 72 * 128 + 1024);
        assert_eq!(wgmma_smem(9), 4 * 80 * 128 + 1024);
        assert_eq!(wgmma_smem(64), 4 * 128 * 128 + 1024);
        assert!(2 * (wgmma_smem(64) + 1024) <= 228 * 1024);
        // Splits in whole 128-byte stages.
        assert_eq!(plan_steps(1, 4096, 4096, 528, 1 << 22, WGMMA_SEG), (512, 8));
        assert_eq!(plan_steps(8, 4096, 14336, 528, 1 << 22, WGMMA_SEG), (1792, 8));
    }

    #[test]
    fn the_engine_picks_the_variant_that_won_on_the_h200() {
        let (hopper, ampere) = (Arch::SM90A, Arch::SM89);
        let (qkv, o, gate_up, down) = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336));
        for m in [1, 2, 8, 16] {
            for (n, k) in [qkv, o, gate_up, down] {
                assert_eq!(engine_variant(hopper, m, n, k), Some(true), "{m}x{n}x{k}");
            }
        }
        // 17-32 rows: only the large products; beyond 32, cuBLASLt.
        assert_eq!(engine_variant(hopper, 32, gate_up.0, gate_up.1), Some(true));
        assert_eq!(engine_variant(hopper, 32, down.0, down.1), Some(true));
        assert_eq!(engine_variant(hopper, 32, qkv.0, qkv.1), None);
        assert_eq!(engine_variant(hopper, 17, o.0, o.1), None);
        assert_eq!(engine_variant(hopper, 33, gate_up.0, gate_up.1), None);
        // K not in whole 128-byte stages: the mma.sync variant up to 8 rows.
        assert_eq!(engine_variant(hopper, 8, 4096, 4160), Some(false));
        assert_eq!(engine_variant(hopper, 9, 4096, 4160), None);
        // No wgmma before Hopper.
        assert_eq!(engine_variant(ampere, 8, o.0, o.1), Some(false));
        assert_eq!(engine_variant(ampere, 9, gate_up.0, gate_up.1), None);
        // What the kernel does not take at all.
        assert_eq!(engine_variant(hopper, 1, 4096, 100), None);
    }

    #[test]
    fn fits_needs_whole_steps_and_few_rows() {
        assert!(fits(1, 4096, 4096) && fits(64, 3, 64));
        assert!(!fits(0, 16, 64) && !fits(65, 16, 64) && !fits(1, 16, 96) && !fits(1, 0, 64));
    }
}

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
/// shape): all it takes (at 33-64 rows the large products, on two warpgroups a block).
pub const DEFAULT_ROWS: usize = MAX_ROWS;
/// Rows up to which the mma.sync variant beat cuBLASLt on every Llama-3-8B shape (H200):
/// where the wgmma variant cannot run.
const MMA_ROWS: usize = 8;
/// Rows up to which the wgmma variant beat cuBLASLt on every Llama-3-8B shape (H200, back to
/// back: 1.5-2.7x at 1-16 rows, 1.26-1.82x at 24-32). At 48-64 rows (splits in clusters)
/// it beat it on o (1.09-1.15x), down (1.39-1.41x) and gate|up (1.21-1.23x), not on q|k|v
/// (0.84-0.91x).
const WGMMA_ALL_ROWS: usize = 32;
/// Weight rows per block (`BLOCK_ROWS` in skinny.cu) of the mma.sync variant and the
/// one-warpgroup wgmma variant: one counter each when K is split (the two-warpgroup
/// variant's blocks take 128 rows, so they need half as many).
pub const BLOCK_ROWS: usize = 64;
/// K bytes of one warp step (`SEG`): K must be a multiple of it.
const SEG: usize = 64;
/// K bytes of one stage of the wgmma variant (`KB`).
const WGMMA_SEG: usize = 128;
/// Stages of the wgmma variant (`STAGES`).
const WGMMA_STAGES: usize = 4;

/// A variant of the kernel: mma.sync (any sm_89+ GPU), or wgmma (sm_90a) with one or two
/// warpgroups of 64 weight rows a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Mma,
    Wgmma64,
    Wgmma128,
}

impl Variant {
    /// Weight rows a block.
    pub fn block_rows(self) -> usize {
        if self == Variant::Wgmma128 { 2 * BLOCK_ROWS } else { BLOCK_ROWS }
    }

    fn is_wgmma(self) -> bool {
        self != Variant::Mma
    }
}

/// The wgmma variant for an `n`-row weight: two warpgroups a block (128 weight rows share
/// each stage of tokens) where the 128-row groups alone fill the GPU (`WIDE_ROWS`), one
/// elsewhere (more row groups, fewer K splits); or as `RADIX_SPARSE_FP8_SKINNY_WG` (1 or
/// 2) says, for comparisons. On the H200, back to back (bench/NOTES.md): gate|up on two
/// warpgroups 34.9 / 35.7 us at 48 / 64 rows against 47.0 / 49.9 on one (even at 1-32);
/// q|k|v, o and down on one warpgroup 1-12% faster at every row count from 1 to 64.
pub fn wgmma_variant(n: usize) -> Variant {
    static WG: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = WG.get_or_init(|| {
        std::env::var("RADIX_SPARSE_FP8_SKINNY_WG").ok().and_then(|v| v.trim().parse().ok())
    });
    match forced {
        Some(1) => Variant::Wgmma64,
        Some(2) => Variant::Wgmma128,
        _ if n >= WIDE_ROWS => Variant::Wgmma128,
        _ => Variant::Wgmma64,
    }
}
/// Weight rows from which a product is wide: 128 groups of 128 rows (Llama-3-8B's gate|up
/// has 28,672).
const WIDE_ROWS: usize = 16384;

/// Dynamic shared memory of a wgmma variant for `m` rows: its stages of 64 or 128 weight
/// rows and the token rows (8, 16, 32 or 64) of 128 bytes, and 1 KiB to align them.
fn wgmma_smem(m: usize, variant: Variant) -> usize {
    let tokens = 8 * m.div_ceil(8).next_power_of_two().clamp(1, MAX_ROWS / 8);
    WGMMA_STAGES * (variant.block_rows() + tokens) * WGMMA_SEG + 1024
}
/// Splits of K at most (`MAX_SPLITS` in skinny.cu): more would leave each warp too few steps
/// to hide a load.
const MAX_SPLITS: usize = 16;

/// Whether the wgmma variant adds up its K splits for `m` rows in a thread-block cluster
/// (through distributed shared memory) rather than through f32 partial sums in global
/// memory and counters: from `CLUSTER_ROWS` rows, where the partial sums grow large;
/// `RADIX_SPARSE_FP8_SKINNY_CLUSTER=0` never, `=1` always (for comparisons). On the H200,
/// back to back (bench/NOTES.md): at 64 rows o 13.6 us in clusters against 23.1 through
/// global memory, down 27.3 against 37.5, q|k|v 18.3 against 24.7; at 32 rows q|k|v 14.4
/// against 15.7; but at 1-16 rows clusters were 1-6 us slower on all but gate|up (q|k|v
/// 13.5 against 9.4 at one row).
fn cluster_sum(m: usize) -> bool {
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| {
        std::env::var("RADIX_SPARSE_FP8_SKINNY_CLUSTER").ok().map(|v| v.trim() != "0")
    });
    forced.unwrap_or(m >= CLUSTER_ROWS)
}
const CLUSTER_ROWS: usize = 32;
/// Splits a cluster sum takes at most: the portable cluster size.
const CLUSTER_SPLITS: usize = 8;

/// The specialisation for up to `m` rows (rounded up to 8, 16, 32 or 64), output `T`.
pub fn spec<T: HalfFloat>(m: usize) -> KernelSpec {
    let tiles = m.div_ceil(8).next_power_of_two().clamp(1, MAX_ROWS / 8);
    KernelSpec::new(SKINNY, HEADERS)
        .define("DTYPE", dtype_define::<T>())
        .define("N_TILES", tiles)
        .min_arch(Arch::SM89)
}

/// The same on Hopper's FP8 wgmma (skinny.cu's WGMMA; sm_90a), one warpgroup a block.
pub fn spec_wgmma<T: HalfFloat>(m: usize) -> KernelSpec {
    spec::<T>(m).define("WGMMA", 1).min_arch(Arch::SM90A)
}

/// The specialisation of `variant` for up to `m` rows.
pub fn spec_variant<T: HalfFloat>(m: usize, variant: Variant) -> KernelSpec {
    match variant {
        Variant::Mma => spec::<T>(m),
        Variant::Wgmma64 => spec_wgmma::<T>(m),
        Variant::Wgmma128 => spec_wgmma::<T>(m).define("WG", 2),
    }
}

/// Whether the wgmma variant runs on `arch` with this K: sm_90a, K in whole 128-byte
/// stages.
pub fn wgmma_runs(arch: Arch, k: usize) -> bool {
    arch == Arch::SM90A && k.is_multiple_of(WGMMA_SEG)
}

/// Which variant the engine runs for `m` rows against an `n x k` FP8 weight on `arch`, or
/// `None` (cuBLASLt's FP8 GEMM is faster there). From the H200's measurements of
/// 2026-11-30 (bench/NOTES.md): on Hopper wgmma up to 32 rows, and at 33-64 rows on the
/// products at least as deep as wide (o, down) or wide (gate|up), not on q|k|v; elsewhere
/// mma.sync up to 8 rows.
pub fn engine_variant(arch: Arch, m: usize, n: usize, k: usize) -> Option<Variant> {
    if !fits(m, n, k) {
        return None;
    }
    if wgmma_runs(arch, k) && (m <= WGMMA_ALL_ROWS || n <= k || n >= WIDE_ROWS) {
        return Some(wgmma_variant(n));
    }
    (m <= MMA_ROWS).then_some(Variant::Mma)
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
    cluster_sum: i32,
    reserved: i32,
}

// SAFETY: plain data mirroring the kernel's parameter struct.
unsafe impl DeviceRepr for SkinnyParams {}

const _: () = assert!(std::mem::size_of::<SkinnyParams>() == 88);

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
    plan_steps((m, n, k), target_blocks, partial_cap, SEG, BLOCK_ROWS, MAX_SPLITS)
}

/// `plan` in steps of `seg` K bytes, blocks of `block_rows` weight rows, at most
/// `max_splits` splits.
fn plan_steps(
    (m, n, k): (usize, usize, usize),
    target_blocks: usize,
    partial_cap: usize,
    seg: usize,
    block_rows: usize,
    max_splits: usize,
) -> (usize, usize) {
    let groups = n.div_ceil(block_rows);
    let steps = k / seg;
    let mut splits = (target_blocks / groups).clamp(1, max_splits.min(steps));
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

/// The scratch of a launch that splits K through global memory: f32 partial sums and one
/// counter per 64 weight rows, all zero before the first launch (the kernel leaves the
/// counters zero).
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

/// `gemm` with the variant chosen (wgmma: sm_90a, K a multiple of 128); `None`: the wgmma
/// one wherever it runs (it was the faster of the two at every shape measured on the
/// H200), with the warpgroups `wgmma_variant` gives.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with<T: HalfFloat>(
    jit: &Jit,
    (m, n, k): (usize, usize, usize),
    (xq, xs): (&DeviceBuffer<u8>, &DeviceBuffer<f32>),
    (wq, ws): (&DeviceBuffer<u8>, &DeviceBuffer<f32>),
    bias: Option<&DeviceBuffer<T>>,
    out: &mut DeviceBuffer<T>,
    scratch: SkinnyScratch<'_>,
    variant: Option<Variant>,
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
    let variant = variant
        .unwrap_or_else(|| if wgmma_runs(arch, k) { wgmma_variant(n) } else { Variant::Mma });
    let wgmma = variant.is_wgmma();
    ensure!(
        !wgmma || wgmma_runs(arch, k),
        "the skinny FP8 GEMM's wgmma variant runs on sm_90a with K a multiple of \
         {WGMMA_SEG}, not on {arch} with K={k}"
    );
    let seg = if wgmma { WGMMA_SEG } else { SEG };
    let rows = variant.block_rows();
    let groups = n.div_ceil(rows);
    let kernel = jit.kernel(device, &spec_variant::<T>(m, variant), "fp8_gemm_skinny")?;
    let smem = if wgmma { wgmma_smem(m, variant) } else { 0 };
    kernel.set_max_dynamic_smem(device, smem)?;
    let block = (2 * rows as u32, 1, 1);
    // The splits in one cluster where asked for and the device takes clusters that large.
    let cluster_splits = if wgmma && cluster_sum(m) {
        let cfg =
            LaunchConfig { grid_dim: (1, 1, 1), block_dim: block, shared_mem_bytes: smem as u32 };
        (kernel.max_cluster_size(device, cfg)? as usize).min(CLUSTER_SPLITS)
    } else {
        0
    };
    // (Blocks of two warpgroups: half as many, the same warps an SM.)
    let target = target_blocks(sms) * BLOCK_ROWS / rows;
    let (max_splits, cap) = if cluster_splits >= 2 {
        (cluster_splits, usize::MAX)
    } else {
        (MAX_SPLITS, scratch.partial.len())
    };
    let (k_split, splits) = plan_steps((m, n, k), target, cap, seg, rows, max_splits);
    let by_cluster = cluster_splits >= 2 && splits > 1;
    if splits > 1 && !by_cluster {
        ensure!(
            scratch.counters.len() >= groups,
            "skinny FP8 GEMM: {} counters for {groups} row groups",
            scratch.counters.len()
        );
    }
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
        cluster_sum: by_cluster as i32,
        reserved: 0,
    };
    let grid = if by_cluster { (splits, groups) } else { (groups, splits) };
    let cfg = LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: block,
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: sizes checked above; the kernel reads rows < n of w and ws, rows < m of x
    // and xs, writes out[m, n] and, with splits > 1 outside a cluster, partial[splits, m,
    // n] (plan keeps it within the buffer) and counters[groups].
    unsafe {
        if by_cluster {
            kernel.launch_cluster(device, cfg, splits as u32, &params)
        } else {
            kernel.launch(device, cfg, &params)
        }
    }
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
        let (one, two) = (Variant::Wgmma64, Variant::Wgmma128);
        assert_eq!(wgmma_smem(1, one), 4 * 72 * 128 + 1024);
        assert_eq!(wgmma_smem(9, one), 4 * 80 * 128 + 1024);
        assert_eq!(wgmma_smem(64, one), 4 * 128 * 128 + 1024);
        assert_eq!(wgmma_smem(64, two), 4 * 192 * 128 + 1024);
        assert!(2 * (wgmma_smem(64, two) + 1024) <= 228 * 1024);
        // Splits in whole 128-byte stages.
        assert_eq!(plan_steps((1, 4096, 4096), 528, 1 << 22, WGMMA_SEG, 64, MAX_SPLITS), (512, 8));
        assert_eq!(
            plan_steps((8, 4096, 14336), 528, 1 << 22, WGMMA_SEG, 64, MAX_SPLITS),
            (1792, 8)
        );
        // 128-row blocks, half the target: the o projection's 32 groups split 8 ways.
        assert_eq!(
            plan_steps((64, 4096, 4096), 264, 1 << 22, WGMMA_SEG, 128, MAX_SPLITS),
            (512, 8)
        );
        // In a cluster: at most CLUSTER_SPLITS, no partial sums to fit.
        let cluster =
            |m, n, k| plan_steps((m, n, k), 264, usize::MAX, WGMMA_SEG, 128, CLUSTER_SPLITS);
        assert_eq!(cluster(64, 4096, 4096), (512, 8));
        assert_eq!(cluster(64, 28672, 4096), (4096, 1));
        assert_eq!(cluster(48, 6144, 4096), (896, 5));
    }

    #[test]
    fn the_engine_picks_the_variant_that_won_on_the_h200() {
        let (hopper, ampere) = (Arch::SM90A, Arch::SM89);
        let (qkv, o, gate_up, down) = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336));
        // One warpgroup a block up to 32 rows, two on the wide product (gate|up).
        for m in [1, 2, 8, 16, 17, 32] {
            for (n, k) in [qkv, o, down] {
                assert_eq!(engine_variant(hopper, m, n, k), Some(Variant::Wgmma64), "{m}x{n}x{k}");
            }
            let (n, k) = gate_up;
            assert_eq!(engine_variant(hopper, m, n, k), Some(Variant::Wgmma128), "{m}x{n}x{k}");
        }
        // 33-64 rows: all but q|k|v.
        for m in [33, 64] {
            assert_eq!(engine_variant(hopper, m, o.0, o.1), Some(Variant::Wgmma64));
            assert_eq!(engine_variant(hopper, m, down.0, down.1), Some(Variant::Wgmma64));
            assert_eq!(engine_variant(hopper, m, gate_up.0, gate_up.1), Some(Variant::Wgmma128));
            assert_eq!(engine_variant(hopper, m, qkv.0, qkv.1), None);
        }
        // K not in whole 128-byte stages: the mma.sync variant up to 8 rows.
        assert_eq!(engine_variant(hopper, 8, 4096, 4160), Some(Variant::Mma));
        assert_eq!(engine_variant(hopper, 9, 4096, 4160), None);
        // No wgmma before Hopper.
        assert_eq!(engine_variant(ampere, 8, o.0, o.1), Some(Variant::Mma));
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

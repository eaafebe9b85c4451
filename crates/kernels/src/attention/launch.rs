//! Launching attention: a batch is planned once (`AttentionBatch::new`, per engine step)
//! and run for every layer (`AttentionBatch::run`).

use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{Device, DeviceBuffer, HalfFloat, Jit, KernelSpec, Result, ensure};

use super::SOURCE;
use super::batch::{AttentionShape, BatchMeta, KvSource};
use super::plan::{
    DECODE_CLUSTER, MergeItem, TileConfig, WorkItem, WorkList, clusters_apply, plan, plan_clustered,
};
use crate::{HEADERS, dtype_define, env_flag};

/// The fewest keys a split of a sequence's keys reads (`plan`, `clusters_apply`).
const MIN_CHUNK: usize = 256;

/// Whether the attention kernel reads host-written metadata before `pdl_wait()`:
/// `RADIX_SPARSE_ATTN_EARLY_META=0` turns it off (to compare in one run).
pub(crate) fn early_meta() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !env_flag(&OFF, "RADIX_SPARSE_ATTN_EARLY_META", |v| v.trim() == "0")
}

/// Whether the decode kernels load their first K/V tiles of keys older than the step
/// before `pdl_wait()`: `RADIX_SPARSE_ATTN_KV_EARLY=0` turns it off (to compare in one run).
fn early_kv() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !env_flag(&OFF, "RADIX_SPARSE_ATTN_KV_EARLY", |v| v.trim() == "0")
}

/// Whether key-split decode on Hopper runs its splits in thread-block clusters that merge
/// through distributed shared memory (`plan_clustered`): `RADIX_SPARSE_DECODE_CLUSTER=0`
/// turns it off (to compare in one run).
fn decode_clusters() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !env_flag(&OFF, "RADIX_SPARSE_DECODE_CLUSTER", |v| v.trim() == "0")
}

/// Mirrors `AttentionParams` in attention.cu field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AttentionParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    partial_o: u64,
    partial_lse: u64,
    qo_indptr: u64,
    kv_indptr: u64,
    kv_indices: u64,
    kv_last_page_len: u64,
    work: u64,
    merge: u64,
    trace: u64,
    q_stride: i64,
    o_stride: i64,
    kv_stride: i64,
    num_qo_heads: i32,
    num_kv_heads: i32,
    group: i32,
    page_size: i32,
    page_shift: i32,
    causal: i32,
    scale_log2: f32,
    head_tables: i32,
    heads_inner: i32,
    v_scale: f32,
    meta_early: i32,
    kv_early: i32,
    cluster: i32,
}

// SAFETY: plain data mirroring the kernel's parameter struct.
unsafe impl DeviceRepr for AttentionParams {}

/// A TMA tensor map as the driver encodes it (`CUtensorMap`): 128 opaque bytes, aligned as
/// attention.cu's `TmaMap` (128, as CUDA 13 declares it).
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Default)]
struct TmaMap([u64; 16]);

/// Mirrors `KernelParams` of the TMA specialisation: the parameters, the task count of the
/// persistent grid, then the K and V maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TmaKernelParams {
    p: AttentionParams,
    num_tasks: i32,
    k_map: TmaMap,
    v_map: TmaMap,
}

// SAFETY: plain data mirroring the kernel's parameter struct.
unsafe impl DeviceRepr for TmaKernelParams {}

/// Encodes a tensor map over 16-bit values at `addr`: `dims` innermost first, `strides` the
/// bytes between steps of dims 1.., `boxes` the box the kernel copies, swizzled by 128
/// bytes (rows of 64 values, attention.cu's tile layout). Out-of-range boxes fill zeros.
fn encode_tma_map(addr: u64, dims: &[u64], strides: &[u64], boxes: &[u32]) -> Result<TmaMap> {
    use radix_gpu::cudarc::driver::sys;
    ensure!(
        dims.len() == boxes.len() && strides.len() + 1 == dims.len(),
        "tensor map: {} dims, {} strides, {} box dims",
        dims.len(),
        strides.len(),
        boxes.len()
    );
    ensure!(addr.is_multiple_of(16), "TMA needs 16-byte aligned K/V, got address {addr:#x}");
    ensure!(
        dims.iter().all(|&d| (1..=1 << 32).contains(&d))
            && strides.iter().all(|&s| s.is_multiple_of(16) && s < 1 << 40),
        "tensor map out of TMA's range: dims {dims:?}, strides {strides:?}"
    );
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let ones = [1u32; 5];
    // SAFETY: the arrays hold `dims.len()` (strides: one fewer) entries as the call reads;
    // the map is written in place; nothing is dereferenced on the device here.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            dims.len() as u32,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            ones.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    ensure!(
        r == sys::CUresult::CUDA_SUCCESS,
        "cuTensorMapEncodeTiled failed ({r:?}) for dims {dims:?}, strides {strides:?}, box {boxes:?}"
    );
    Ok(TmaMap(map.opaque))
}

/// The kernel specialisation for a dtype, head dim, KV source and tile shape (wgmma
/// tiles: sm_90a only).
pub fn spec<T: HalfFloat>(head_dim: usize, paged: bool, tiles: TileConfig) -> KernelSpec {
    let spec = KernelSpec::new(SOURCE, HEADERS)
        .define("DTYPE", dtype_define::<T>())
        .define("HEAD_DIM", head_dim)
        .define("PAGED", paged as u32)
        .define("NUM_WARPS", tiles.num_warps)
        .define("M_TILES", tiles.m_tiles)
        .define("BLOCK_N", tiles.block_n)
        .define("STAGES", tiles.stages)
        .define("KEY_SPLIT", tiles.key_split as u32);
    if !tiles.wgmma {
        return spec;
    }
    // The producer-warp variant takes turns between its warpgroups unless
    // RADIX_SPARSE_WGMMA_PINGPONG=0 (for comparisons).
    static NO_PINGPONG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let pingpong = !env_flag(&NO_PINGPONG, "RADIX_SPARSE_WGMMA_PINGPONG", |v| {
        matches!(v.to_ascii_lowercase().as_str(), "0" | "false" | "off")
    });
    let spec = spec.define("WGMMA", 1).min_arch(radix_gpu::Arch::SM90A);
    let spec = if tiles.tma { spec.define("TMA", 1) } else { spec };
    let spec = if tiles.persistent { spec.define("PERSISTENT", 1) } else { spec };
    // RADIX_SPARSE_TMA_PAGED_ISSUE=serial: the paged TMA producer as it was before page ids
    // were looked up a tile ahead (for comparisons).
    static SERIAL_ISSUE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let serial = env_flag(&SERIAL_ISSUE, "RADIX_SPARSE_TMA_PAGED_ISSUE", |v| {
        v.eq_ignore_ascii_case("serial")
    });
    let spec = if tiles.tma && paged && serial { spec.define("TMA_PAGED_AHEAD", 0) } else { spec };
    // RADIX_SPARSE_PREFILL_WG_SKIP=1: the one-item TMA kernel's warpgroups stop at their
    // own rows' last tile (causal; attention.cu's WG_SKIP, until measured).
    static WG_SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let wg_skip = env_flag(&WG_SKIP, "RADIX_SPARSE_PREFILL_WG_SKIP", |v| v == "1");
    let spec =
        if tiles.tma && !tiles.persistent && wg_skip { spec.define("WG_SKIP", 1) } else { spec };
    if tiles.num_warps > 8 && pingpong { spec.define("PINGPONG", 1) } else { spec }
}

/// A key-split kernel specialisation that merges more than `WIDE_MERGE_SPLITS` splits of a
/// row (attention.cu's WIDE_MERGE).
pub fn wide_merge(spec: KernelSpec) -> KernelSpec {
    spec.define("WIDE_MERGE", 1)
}

/// The prefill kernels `RADIX_SPARSE_PREFILL_KERNEL` chooses between on Hopper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrefillKernel {
    /// The TMA kernel where it is faster and can run, else wgmma (unset, `auto`).
    Auto,
    /// wgmma with the block's own cp.async copies (`wgmma`).
    Wgmma,
    /// wgmma with the TMA producer wherever it can run (`tma`).
    Tma,
    /// The same, persistent (`tma-persistent`).
    TmaPersistent,
    /// The mma.sync kernel of other GPUs (`mma`).
    Mma,
}

/// The mean keys a query row attends (over a batch) up to which Hopper runs the persistent
/// prefill kernel at head_dim 128 (`prefill_tiles`).
pub const PERSISTENT_MAX_MEAN_KEYS: f64 = 2048.0;
/// The mean keys a query row attends above which Hopper runs the three-warpgroup TMA
/// kernel at head_dim 64 (`prefill_tiles`).
pub const TMA3_MIN_MEAN_KEYS: f64 = 1024.0;

/// Which prefill kernel `plan_batch` picks by itself on Hopper for `head_dim`, paged
/// `page_size`, and `mean_keys` (the keys a query row attends, averaged over the batch's
/// rows), as measured on the H200 (bench/NOTES.md):
/// - head_dim 128: the wgmma kernel with a TMA producer (1.2-1.4x the cp.async one, pages of
///   16 included), persistent where rows attend 2,048 keys or fewer (1.17x the one-item
///   kernel on 500-token sequences, 1.06x at 2,500; 0.9x on 16K or full 4K rows);
/// - head_dim 64: the TMA kernel with three compute warpgroups where rows attend more than
///   1,024 keys (1.14-1.17x the cp.async one on full 2K and causal 8K rows, 1.0x on causal
///   2K, 0.82x on causal 500), else the cp.async wgmma kernel (two blocks an SM);
/// - the cp.async wgmma kernel where TMA cannot read the pages (fewer than 8 tokens).
///
/// `RADIX_SPARSE_PREFILL_KERNEL=wgmma|tma|tma-persistent|mma` forces one (`tma` at head_dim
/// 64: three warpgroups; for comparisons, or as a fallback; other values are named in a
/// warning and ignored). Other GPUs always run mma.sync.
pub fn prefill_tiles(
    device: &Device,
    head_dim: usize,
    page_size: Option<usize>,
    mean_keys: f64,
) -> TileConfig {
    static CHOICE: std::sync::OnceLock<PrefillKernel> = std::sync::OnceLock::new();
    let choice = *CHOICE.get_or_init(|| {
        let v = std::env::var("RADIX_SPARSE_PREFILL_KERNEL").unwrap_or_default();
        match v.to_ascii_lowercase().as_str() {
            "" | "auto" => PrefillKernel::Auto,
            "wgmma" => PrefillKernel::Wgmma,
            "tma" => PrefillKernel::Tma,
            "tma-persistent" => PrefillKernel::TmaPersistent,
            "mma" => PrefillKernel::Mma,
            _ => {
                tracing::warn!(
                    "RADIX_SPARSE_PREFILL_KERNEL={v:?} is not auto, tma, tma-persistent, wgmma or mma; ignored"
                );
                PrefillKernel::Auto
            }
        }
    });
    if device.info().arch() != radix_gpu::Arch::SM90A || choice == PrefillKernel::Mma {
        return TileConfig::PREFILL;
    }
    let tma_reads = page_size.is_none_or(|ps| ps >= 8);
    match choice {
        PrefillKernel::Auto
            if head_dim == 128 && tma_reads && mean_keys <= PERSISTENT_MAX_MEAN_KEYS =>
        {
            TileConfig::PREFILL_SM90_TMA_PERSISTENT
        }
        PrefillKernel::Auto if head_dim == 128 && tma_reads => TileConfig::PREFILL_SM90_TMA,
        PrefillKernel::Auto if head_dim == 64 && tma_reads && mean_keys > TMA3_MIN_MEAN_KEYS => {
            TileConfig::PREFILL_SM90_TMA_D64
        }
        PrefillKernel::Tma if tma_reads && head_dim == 64 => TileConfig::PREFILL_SM90_TMA_D64,
        PrefillKernel::Tma if tma_reads => TileConfig::PREFILL_SM90_TMA,
        PrefillKernel::TmaPersistent if tma_reads => TileConfig::PREFILL_SM90_TMA_PERSISTENT,
        _ => TileConfig::PREFILL_SM90,
    }
}

/// The specialisation reading an FP8 (e4m3) K/V pool (hardware e4m3 conversion: sm_89+).
/// Key-split tiles widen in registers the way `fp8_widen()` says.
pub fn spec_fp8_kv<T: HalfFloat>(head_dim: usize, paged: bool, tiles: TileConfig) -> KernelSpec {
    spec_fp8_kv_widened::<T>(head_dim, paged, tiles, fp8_widen())
}

/// `spec_fp8_kv` with key-split tiles widening the way `widen` says.
pub fn spec_fp8_kv_widened<T: HalfFloat>(
    head_dim: usize,
    paged: bool,
    tiles: TileConfig,
    widen: Fp8Widen,
) -> KernelSpec {
    let spec =
        spec::<T>(head_dim, paged, tiles).define("KV_FP8", 1).min_arch(radix_gpu::Arch::SM89);
    if tiles.key_split { spec.define("FP8_CVT", widen as u8) } else { spec }
}

/// How key-split decode blocks widen e4m3 bytes to f16 (attention.cu's FP8_CVT): bit moves
/// or the hardware conversion for keys, values or both (the default). On the H200 decode
/// over an FP8 pool at 64@4096 read at 83% of copy with bit moves, 84% converting keys,
/// 93% converting values and 94% converting both (bench/NOTES.md): a value's pair of
/// keys costs a byte permute and one conversion, against a permute and three bit moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fp8Widen {
    BitMoves = 0,
    ConvertKeys = 1,
    ConvertValues = 2,
    Convert = 3,
}

impl Fp8Widen {
    /// `bits`, `cvt-k`, `cvt-v` or `cvt` (RADIX_SPARSE_FP8_WIDEN).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "bits" => Some(Self::BitMoves),
            "cvt-k" => Some(Self::ConvertKeys),
            "cvt-v" => Some(Self::ConvertValues),
            "cvt" => Some(Self::Convert),
            _ => None,
        }
    }
}

static FP8_WIDEN_OVERRIDE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Sets how later FP8 launches widen (None: back to the environment's choice); for tests
/// and benchmarks that compare the ways in one process.
pub fn set_fp8_widen(widen: Option<Fp8Widen>) {
    FP8_WIDEN_OVERRIDE
        .store(widen.map_or(u8::MAX, |w| w as u8), std::sync::atomic::Ordering::Relaxed);
}

/// The override of `set_fp8_widen`, else `RADIX_SPARSE_FP8_WIDEN`, else the conversion.
pub fn fp8_widen() -> Fp8Widen {
    const ALL: [Fp8Widen; 4] =
        [Fp8Widen::BitMoves, Fp8Widen::ConvertKeys, Fp8Widen::ConvertValues, Fp8Widen::Convert];
    if let Some(&w) =
        ALL.get(FP8_WIDEN_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) as usize)
    {
        return w;
    }
    static ENV: std::sync::OnceLock<Fp8Widen> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| {
        let Ok(v) = std::env::var("RADIX_SPARSE_FP8_WIDEN") else { return Fp8Widen::Convert };
        Fp8Widen::parse(&v).unwrap_or_else(|| {
            tracing::warn!(
                "RADIX_SPARSE_FP8_WIDEN={v:?}: expected bits, cvt-k, cvt-v or cvt; using cvt"
            );
            Fp8Widen::Convert
        })
    })
}

/// The kernel widens e4m3 bytes into f16 values 2^-8 times theirs (bit moves, no
/// conversions): the scales it gets carry the 2^8 back.
const FP8_WIDEN: f32 = 256.0;

/// An FP8 KV cache's per-layer scales: stored bytes times these are the keys and values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvFp8Scales {
    pub k: f32,
    pub v: f32,
}

/// The device arrays an attention batch reads: owned by the batch, or views of a step
/// workspace that a CUDA graph replays over.
pub struct AttentionBuffers {
    pub qo_indptr: DeviceBuffer<i32>,
    pub kv_indptr: DeviceBuffer<i32>,
    pub kv_indices: DeviceBuffer<i32>,
    pub kv_last_page_len: DeviceBuffer<i32>,
    /// `WorkList::work_words`.
    pub work: DeviceBuffer<i32>,
    /// `WorkList::merge_words`; the kernel counts finished splits in it (and leaves it as
    /// it found it).
    pub merge: DeviceBuffer<i32>,
    /// `partial_rows x num_qo_heads x head_dim` (at least one element).
    pub partial_o: DeviceBuffer<f32>,
    /// `partial_rows x num_qo_heads` (at least one element).
    pub partial_lse: DeviceBuffer<f32>,
}

/// The tiles and the work of a batch, planned on the host alone (no device work).
pub fn plan_batch(
    device: &Device,
    shape: &AttentionShape,
    meta: &BatchMeta,
    tiles: Option<TileConfig>,
    target_blocks: Option<usize>,
) -> Result<(TileConfig, WorkList)> {
    shape.validate()?;
    let max_rows = meta.q_lens.iter().max().copied().unwrap_or(0) * shape.group();
    let page_size = match &meta.kv {
        KvSource::Paged { page_size, .. } => Some(*page_size),
        KvSource::Contiguous { .. } => None,
    };
    let tiles = tiles.unwrap_or_else(|| {
        let mut chosen = TileConfig::choose(max_rows);
        // (FP8 pools run the mma.sync tiles: the wgmma kernels read 16-bit K/V only.)
        if chosen == TileConfig::PREFILL && !shape.kv_fp8 {
            chosen = prefill_tiles(
                device,
                shape.head_dim,
                page_size,
                meta.mean_keys_per_row(shape.causal),
            );
        }
        // GPUs with less shared memory than Hopper's (consumer parts) double-buffer.
        let max_shared = device.info().max_shared_per_block;
        let fits = chosen.smem_bytes(shape.head_dim, 2) <= max_shared;
        let chosen = if fits { chosen } else { TileConfig { stages: 2, ..chosen } };
        // Key-split decode over an FP8 pool: 128-key tiles where they fit. Its warps widen
        // their own keys in registers, so a wider tile is more keys a barrier. On the H200
        // (graphs, % of copy, beside 64-key tiles): 64@4096 101.8 / 95.2, 256@1024 92.7 /
        // 85.1, 128@2048 96.1 / 91.5, mixed:64:100:16000 98.6 / 89.7, 1@8192 9.2 / 10.5 us;
        // but 8@16384 79.1 / 70.1 us: the plan below counts blocks an SM by the 16-bit
        // tiles' shared memory (one of these), not their FP8 stages' (two). Counting two
        // took 8@16384 to 65.9 us but mixed to 92.6% and 1@8192 to 11.2 us (more, shorter
        // splits), so it stays (bench/NOTES.md). (With the widened tiles in shared memory
        // 128 keys had lost.)
        let wide = TileConfig { block_n: 128, ..chosen };
        if shape.kv_fp8
            && chosen.key_split
            && wide.fp8_pipeline(shape.head_dim, max_shared).smem_bytes_fp8_kv(shape.head_dim)
                <= max_shared
        {
            wide
        } else {
            chosen
        }
    });
    // TMA boxes of a page keep the 1024-byte swizzle atoms only with 8 rows or more.
    if let Some(page_size) = page_size {
        ensure!(
            !tiles.tma || page_size >= 8,
            "the TMA prefill kernel reads pages of 8 tokens or more, not {page_size}"
        );
    }
    ensure!(
        !shape.kv_fp8 || !tiles.wgmma || tiles.block_m() == TileConfig::PREFILL.block_m(),
        "tiles {tiles:?} cannot read an FP8 pool ({} rows a block where the FP8 kernel has {})",
        tiles.block_m(),
        TileConfig::PREFILL.block_m()
    );
    ensure!(
        !tiles.tma || tiles.num_warps != 16 || shape.head_dim == 64,
        "three compute warpgroups (wgmma-tma3) run head_dim 64 only, not {}",
        shape.head_dim
    );
    ensure!(
        !tiles.wgmma || device.info().arch() == radix_gpu::Arch::SM90A,
        "wgmma tiles need a Hopper GPU (sm_90a); this one is {}",
        device.info().arch()
    );
    let smem = tiles.smem_bytes(shape.head_dim, 2);
    ensure!(
        smem <= device.info().max_shared_per_block,
        "tiles {tiles:?} need {smem} bytes of shared memory; the device allows {}",
        device.info().max_shared_per_block
    );
    // Keys are split until about one wave of blocks runs: as many as fit on the SMs at once
    // (the Hopper prefill tiles fit one an SM at head_dim 128; at most the two a step's
    // work bound assumes, `default_target_blocks`).
    let target_blocks = target_blocks.unwrap_or_else(|| {
        device.info().sm_count as usize
            * tiles.blocks_per_sm(shape.head_dim, device.info().max_shared_per_block)
    });
    // Sparse paging's per-head tables come from the kernel before (no K/V before the wait).
    let late_tables = matches!(meta.kv, KvSource::Paged { head_tables: true, .. });
    let hopper = device.info().arch() == radix_gpu::Arch::SM90A;
    let cluster = if hopper && decode_clusters() { DECODE_CLUSTER } else { 0 };
    let max_kv = meta.kv_lens.iter().copied().max().unwrap_or(0);
    let (batch, heads) = (meta.batch(), shape.num_kv_heads);
    if clusters_apply(batch, max_kv, heads, tiles, target_blocks, MIN_CHUNK, cluster) {
        let plan = plan_clustered(&meta.q_lens, &meta.kv_lens, shape.group(), tiles, cluster);
        return Ok((tiles, plan));
    }
    let plan = plan(
        &meta.q_lens,
        &meta.kv_lens,
        shape.group(),
        shape.num_kv_heads,
        tiles,
        target_blocks,
        MIN_CHUNK,
        late_tables,
    );
    Ok((tiles, plan))
}

/// Blocks below which keys are split: two per SM.
pub fn default_target_blocks(device: &Device) -> usize {
    2 * device.info().sm_count as usize
}

/// One planned batch with its metadata on the device, ready to run for every layer.
pub struct AttentionBatch {
    device: Device,
    shape: AttentionShape,
    tiles: TileConfig,
    meta: BatchMeta,
    plan: WorkList,
    buffers: AttentionBuffers,
    /// `enable_trace`: `TRACE_SLOTS` stamps per block of the last launch (u64s as pairs
    /// of u32, low word first).
    trace: Option<DeviceBuffer<u32>>,
}

/// Stamps per block of a traced launch (attention.cu's `TRACE_SLOTS`): the SM's cycle
/// counter at phases 0-7 (entry, plan read, wait done, first tile in, loop done, output
/// written, split count known, merge done: 0 where the block did not merge), the global
/// timer in ns at entry (8) and exit (9), the SM id (10).
pub const TRACE_SLOTS: usize = 16;

impl AttentionBatch {
    /// Validates the shape, plans the work (splitting keys when the batch alone cannot
    /// fill the GPU) and uploads the metadata. `tiles: None` picks them from the batch.
    pub fn new(
        device: &Device,
        shape: AttentionShape,
        meta: BatchMeta,
        tiles: Option<TileConfig>,
    ) -> Result<Self> {
        Self::with_options(device, shape, meta, tiles, None)
    }

    /// As `new`, with the number of blocks below which keys are split (default 2 × SMs).
    pub fn with_options(
        device: &Device,
        shape: AttentionShape,
        meta: BatchMeta,
        tiles: Option<TileConfig>,
        target_blocks: Option<usize>,
    ) -> Result<Self> {
        let (tiles, plan) = plan_batch(device, &shape, &meta, tiles, target_blocks)?;
        let upload = |v: &[i32]| device.upload(if v.is_empty() { &[0] } else { v });
        let (kv_indptr, kv_indices, kv_last_page_len) = match &meta.kv {
            KvSource::Contiguous { kv_indptr } => (upload(kv_indptr)?, upload(&[])?, upload(&[])?),
            KvSource::Paged { kv_indptr, kv_indices, kv_last_page_len, .. } => {
                (upload(kv_indptr)?, upload(kv_indices)?, upload(kv_last_page_len)?)
            }
        };
        let partial = plan.partial_rows * shape.num_qo_heads;
        let buffers = AttentionBuffers {
            qo_indptr: upload(&meta.qo_indptr)?,
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            work: upload(&plan.work_words().collect::<Vec<_>>())?,
            merge: upload(&plan.merge_words().collect::<Vec<_>>())?,
            partial_o: device.alloc(partial.max(1) * shape.head_dim)?,
            partial_lse: device.alloc(partial.max(1))?,
        };
        Self::from_parts(device, shape, meta, tiles, plan, buffers)
    }

    /// A batch over arrays already on the device: `buffers` must hold `meta` and `plan`
    /// as `new` would upload them (checked by size here; contents are the caller's).
    pub fn from_parts(
        device: &Device,
        shape: AttentionShape,
        meta: BatchMeta,
        tiles: TileConfig,
        plan: WorkList,
        buffers: AttentionBuffers,
    ) -> Result<Self> {
        shape.validate()?;
        let b = &buffers;
        let batch = meta.batch();
        let partial = plan.partial_rows * shape.num_qo_heads;
        if let KvSource::Paged { kv_indptr, head_tables: true, .. } = &meta.kv {
            ensure!(
                kv_indptr.len() == batch * shape.num_kv_heads + 1,
                "per-head page tables need batch x num_kv_heads + 1 = {} offsets, got {}",
                batch * shape.num_kv_heads + 1,
                kv_indptr.len()
            );
        }
        let (indptr, indices, lasts) = match &meta.kv {
            KvSource::Contiguous { kv_indptr } => (kv_indptr.len(), 0, 0),
            KvSource::Paged { kv_indptr, kv_indices, kv_last_page_len, .. } => {
                (kv_indptr.len(), kv_indices.len(), kv_last_page_len.len())
            }
        };
        ensure!(
            b.qo_indptr.len() > batch
                && b.kv_indptr.len() >= indptr
                && b.kv_indices.len() >= indices
                && b.kv_last_page_len.len() >= lasts
                && b.work.len() >= 6 * plan.work.len()
                && b.merge.len() >= 4 * plan.merge.len()
                && b.partial_o.len() >= partial * shape.head_dim
                && b.partial_lse.len() >= partial,
            "attention buffers too small for a batch of {batch} with {} work items",
            plan.work.len()
        );
        if plan.cluster > 1 {
            ensure!(
                plan.cluster == DECODE_CLUSTER
                    && tiles.key_split
                    && !plan.heads_inner
                    && plan.work.len().is_multiple_of(plan.cluster)
                    && device.info().arch() == radix_gpu::Arch::SM90A,
                "a plan in clusters of {} runs key-split tiles on Hopper, in whole clusters of \
                 {DECODE_CLUSTER} items ({} items, tiles {tiles:?})",
                plan.cluster,
                plan.work.len()
            );
            // Every block of a cluster meets at its barriers: the items of one are the same
            // query tile (or all padding), so they all return early or none does.
            let same =
                |c: &[WorkItem]| c.iter().all(|w| (w.batch, w.q_tile) == (c[0].batch, c[0].q_tile));
            ensure!(
                plan.work.chunks(plan.cluster).all(same),
                "a clustered plan mixes query tiles within a cluster of {}",
                plan.cluster
            );
        }
        Ok(Self { device: device.clone(), shape, tiles, meta, plan, buffers, trace: None })
    }

    pub fn work(&self) -> &WorkList {
        &self.plan
    }

    /// What of the launch's shape and kernel image the plan chose, beyond the tiles: bit 0
    /// clusters, bit 1 the wide merge. A CUDA graph replays the launch it recorded, so the
    /// backend keys its graphs by this too.
    pub fn launch_variant(&self) -> u8 {
        (self.plan.cluster > 1) as u8 | (self.wide_merge_image() as u8) << 1
    }

    /// Whether launches run the wide-merge image (`wide_merge`): key-split tiles whose plan
    /// merges more than `WIDE_MERGE_SPLITS` splits of a row.
    fn wide_merge_image(&self) -> bool {
        self.tiles.key_split && self.plan.wide_merge()
    }

    pub fn meta(&self) -> &BatchMeta {
        &self.meta
    }

    pub fn tiles(&self) -> TileConfig {
        self.tiles
    }

    /// Benchmarks: from now on launches run the kernel that stamps its phases
    /// (`TRACE_SLOTS` per block; mma.sync tiles over 16-bit K/V only), read back by
    /// `read_trace`.
    pub fn enable_trace(&mut self) -> Result<()> {
        ensure!(!self.tiles.wgmma, "traces are of the mma.sync kernel, not {:?}", self.tiles);
        let blocks = self.plan.work.len() * self.shape.num_kv_heads;
        self.trace = Some(self.device.alloc_zeros(2 * blocks * TRACE_SLOTS)?);
        Ok(())
    }

    /// The last traced launch's stamps, `TRACE_SLOTS` per block (block i: work item
    /// i / Hkv, kv head i % Hkv with heads inside, else item i % items, head i / items).
    pub fn read_trace(&self) -> Result<Option<Vec<u64>>> {
        let Some(t) = &self.trace else { return Ok(None) };
        let words = t.to_vec()?;
        Ok(Some(words.chunks(2).map(|w| w[0] as u64 | (w[1] as u64) << 32).collect()))
    }

    /// Runs attention for one layer. `q` and `o` are `[total_q, num_qo_heads, head_dim]`;
    /// `k`/`v` are `[total_kv, num_kv_heads, head_dim]` (contiguous) or the layer's page
    /// pool `[num_pages, num_kv_heads, page_size, head_dim]`; `lse`, if given, receives
    /// the natural-log LSE per (token, head), `[total_q, num_qo_heads]`.
    ///
    /// Paged through the host's tables, the kernel may read the page ids and the K/V of
    /// keys before each sequence's last q_len before the kernel launched just before it on
    /// the stream has finished (programmatic dependent launch): that kernel may write the
    /// step's own tokens (the KV append), not older keys or the tables.
    pub fn run<T: HalfFloat>(
        &self,
        jit: &Jit,
        q: &DeviceBuffer<T>,
        k: &DeviceBuffer<T>,
        v: &DeviceBuffer<T>,
        o: &mut DeviceBuffer<T>,
        lse: Option<&mut DeviceBuffer<f32>>,
    ) -> Result<()> {
        let gpus = [k.device().info().ordinal, v.device().info().ordinal];
        let kv = KvRead { k: (k.ptr(), k.len()), v: (v.ptr(), v.len()), gpus, fp8: None };
        self.launch(jit, q, kv, o, lse)
    }

    /// `run` over an FP8 K/V pool: `k` and `v` hold e4m3 bytes in the same layouts, read
    /// as those values times `scales`. The wgmma kernel reads 16-bit tiles only: wgmma
    /// tiles run here as the mma.sync `TileConfig::PREFILL` (same plan), whatever `tiles()`
    /// says.
    #[allow(clippy::too_many_arguments)]
    pub fn run_fp8<T: HalfFloat>(
        &self,
        jit: &Jit,
        q: &DeviceBuffer<T>,
        k: &DeviceBuffer<u8>,
        v: &DeviceBuffer<u8>,
        scales: KvFp8Scales,
        o: &mut DeviceBuffer<T>,
        lse: Option<&mut DeviceBuffer<f32>>,
    ) -> Result<()> {
        ensure!(
            scales.k.is_finite() && scales.k > 0.0 && scales.v.is_finite() && scales.v > 0.0,
            "FP8 KV scales must be positive numbers, got {scales:?}"
        );
        let gpus = [k.device().info().ordinal, v.device().info().ordinal];
        let kv = KvRead { k: (k.ptr(), k.len()), v: (v.ptr(), v.len()), gpus, fp8: Some(scales) };
        self.launch(jit, q, kv, o, lse)
    }

    fn launch<T: HalfFloat>(
        &self,
        jit: &Jit,
        q: &DeviceBuffer<T>,
        kv: KvRead,
        o: &mut DeviceBuffer<T>,
        lse: Option<&mut DeviceBuffer<f32>>,
    ) -> Result<()> {
        let s = &self.shape;
        let d = s.head_dim;
        let total_q = self.meta.total_q();
        let row = s.num_qo_heads * d;
        ensure!(
            q.len() == total_q * row,
            "q holds {} elements, expected total_q {total_q} x {} heads x {d}",
            q.len(),
            s.num_qo_heads
        );
        ensure!(
            o.len() == total_q * row,
            "o holds {} elements, expected total_q {total_q} x {} heads x {d}",
            o.len(),
            s.num_qo_heads
        );
        let kv_elems = match &self.meta.kv {
            KvSource::Contiguous { kv_indptr } => {
                *kv_indptr.last().unwrap() as usize * s.num_kv_heads * d
            }
            KvSource::Paged { page_size, num_pages, .. } => {
                num_pages * s.num_kv_heads * page_size * d
            }
        };
        ensure!(kv.k.1 == kv_elems, "k holds {} elements, expected {kv_elems}", kv.k.1);
        ensure!(kv.v.1 == kv_elems, "v holds {} elements, expected {kv_elems}", kv.v.1);
        if let Some(l) = &lse {
            ensure!(
                l.len() == total_q * s.num_qo_heads,
                "lse holds {} elements, expected {}",
                l.len(),
                total_q * s.num_qo_heads
            );
        }
        let gpu = q.device().info().ordinal;
        ensure!(
            kv.gpus.iter().chain([&o.device().info().ordinal]).all(|&g| g == gpu),
            "attention buffers live on different GPUs"
        );
        if self.plan.work.is_empty() || total_q == 0 {
            return Ok(());
        }
        let (page_size, paged, head_tables) = match &self.meta.kv {
            KvSource::Paged { page_size, head_tables, .. } => (*page_size, true, *head_tables),
            KvSource::Contiguous { .. } => (1, false, false),
        };
        let (spec, smem, threads) = match kv.fp8 {
            None => {
                let spec = spec::<T>(d, paged, self.tiles);
                let spec = if self.trace.is_some() { spec.define("TRACE", 1) } else { spec };
                (spec, self.tiles.smem_bytes(d, 2), self.tiles.threads())
            }
            Some(_) => {
                // The wgmma kernel reads 16-bit tiles only: over an FP8 pool the mma.sync
                // prefill tiles run the same plan when it has the same 128 rows a block
                // (a shape marked `kv_fp8` is never planned otherwise).
                ensure!(
                    !self.tiles.wgmma || self.tiles.block_m() == TileConfig::PREFILL.block_m(),
                    "this batch was planned with {} rows a block for 16-bit K/V; plan it with \
                     AttentionShape::with_fp8_kv(true) to run it over an FP8 pool",
                    self.tiles.block_m()
                );
                let base = if self.tiles.wgmma { TileConfig::PREFILL } else { self.tiles };
                // 16-byte copies of e4m3 rows: a copy step of threads / (D / 16) rows must
                // divide the tile (attention.cu's KV_RSTEP).
                let step = base.threads() as usize * 16 / d;
                ensure!(
                    (base.block_n as usize).is_multiple_of(step),
                    "tiles {base:?} over an FP8 pool at head_dim {d}: BLOCK_N must be a multiple of \
                     {step}"
                );
                // Deeper pipeline, same work list: stages do not change the plan.
                let tiles = base.fp8_pipeline(d, self.device.info().max_shared_per_block);
                (spec_fp8_kv::<T>(d, paged, tiles), tiles.smem_bytes_fp8_kv(d), tiles.threads())
            }
        };
        let spec = if self.wide_merge_image() { wide_merge(spec) } else { spec };
        let kernel = jit.kernel(&self.device, &spec, "attention_kernel")?;
        kernel.set_max_dynamic_smem(&self.device, smem)?;
        let lse_ptr = match lse {
            Some(l) => l.ptr_mut(),
            None => 0,
        };
        let params = AttentionParams {
            q: q.ptr(),
            k: kv.k.0,
            v: kv.v.0,
            o: o.ptr_mut(),
            lse: lse_ptr,
            partial_o: self.buffers.partial_o.ptr(),
            partial_lse: self.buffers.partial_lse.ptr(),
            qo_indptr: self.buffers.qo_indptr.ptr(),
            kv_indptr: self.buffers.kv_indptr.ptr(),
            kv_indices: self.buffers.kv_indices.ptr(),
            kv_last_page_len: self.buffers.kv_last_page_len.ptr(),
            work: self.buffers.work.ptr(),
            merge: self.buffers.merge.ptr(),
            trace: self.trace.as_ref().map_or(0, |t| t.ptr()),
            q_stride: row as i64,
            o_stride: row as i64,
            kv_stride: (s.num_kv_heads * d) as i64,
            num_qo_heads: s.num_qo_heads as i32,
            num_kv_heads: s.num_kv_heads as i32,
            group: s.group() as i32,
            page_size: page_size as i32,
            page_shift: page_size.trailing_zeros() as i32,
            causal: s.causal as i32,
            // An FP8 cache's key scale multiplies every score: folded in here, with the
            // 2^8 the kernel's widened f16 keys are short of (attention.cu's head).
            scale_log2: s.scale
                * kv.fp8.map_or(1.0, |f| f.k * FP8_WIDEN)
                * std::f32::consts::LOG2_E,
            head_tables: head_tables as i32,
            heads_inner: self.plan.heads_inner as i32,
            v_scale: kv.fp8.map_or(1.0, |f| f.v * FP8_WIDEN),
            // The work list, offsets and lengths are the host's, also over sparse paging's
            // per-head tables (whose offsets the host fixes); only those tables' page ids
            // come from the kernel before, and every variant reads page ids after
            // pdl_wait(). (RADIX_SPARSE_ATTN_EARLY_META=0 waits first, for comparisons.)
            meta_early: early_meta() as i32,
            // Paged K/V through the host's tables: keys before each sequence's last q_len
            // are older than the kernel just before (the KV append writes the step's own
            // tokens only), so their first tiles may load before pdl_wait() (`run`'s
            // contract).
            kv_early: (paged && !head_tables && early_kv()) as i32,
            cluster: if self.plan.cluster > 1 { self.plan.cluster as i32 } else { 0 },
        };
        let cfg = LaunchConfig {
            grid_dim: if self.plan.heads_inner {
                ((self.plan.work.len() * s.num_kv_heads) as u32, 1, 1)
            } else {
                (self.plan.work.len() as u32, s.num_kv_heads as u32, 1)
            },
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        if self.tiles.tma && kv.fp8.is_none() {
            // setmaxnreg moves registers from 24 a producer thread to 240 a consumer one
            // (160 with three compute warpgroups): that balances only from the SM's 64K
            // shared out over the block in ptxas's steps of 8, 168 (128) a thread (fewer,
            // and the consumers' request would wait forever).
            let regs = kernel.num_regs()?;
            let want = (65536 / threads as i32) & !7;
            ensure!(
                regs == want,
                "the TMA attention kernel starts with {regs} registers a thread, not {want}"
            );
            // The persistent kernel runs one block an SM, taking tasks (work item, kv head)
            // in turn; the one-item kernel keeps the plan's grid.
            let num_tasks = self.plan.work.len() * s.num_kv_heads;
            let blocks = num_tasks.min(self.device.info().sm_count as usize);
            let (k_map, v_map) = self.tma_maps(&kv)?;
            let params = TmaKernelParams { p: params, num_tasks: num_tasks as i32, k_map, v_map };
            let cfg = if self.tiles.persistent {
                LaunchConfig { grid_dim: (blocks as u32, 1, 1), ..cfg }
            } else {
                cfg
            };
            // SAFETY: as below; the maps cover exactly the K/V buffers checked above, and
            // the kernel reads work items below num_tasks / num_kv_heads only.
            unsafe { kernel.launch(&self.device, cfg, &params) }?;
            return Ok(());
        }
        if self.plan.cluster > 1 {
            // SAFETY: as below; `from_parts` checked the clustered plan's shape (key-split
            // tiles on Hopper, whole clusters of items along x), which the kernel's cluster
            // merge relies on: every block of a cluster reaches its barriers.
            unsafe { kernel.launch_cluster(&self.device, cfg, self.plan.cluster as u32, &params) }?;
            return Ok(());
        }
        // SAFETY: params mirrors the kernel's struct; the buffer sizes were checked above
        // against the validated metadata, which the work list only indexes within (split
        // items' merge entries included).
        unsafe { kernel.launch(&self.device, cfg, &params) }?;
        Ok(())
    }

    /// The TMA kernel's K and V maps: contiguous K/V as `[tokens][Hkv][D]` with boxes of
    /// `[BN][1][64]`; a page pool as rows of D with a box of a page (at most BN rows).
    fn tma_maps(&self, kv: &KvRead) -> Result<(TmaMap, TmaMap)> {
        let s = &self.shape;
        let (d, hkv, bn) = (s.head_dim as u64, s.num_kv_heads as u64, self.tiles.block_n as u64);
        let map = |addr: u64| match &self.meta.kv {
            KvSource::Contiguous { kv_indptr } => {
                let tokens = (*kv_indptr.last().unwrap() as u64).max(1);
                ensure!(tokens < 1 << 31, "{tokens} tokens of K/V are past the TMA kernel's 2^31");
                encode_tma_map(addr, &[d, hkv, tokens], &[d * 2, hkv * d * 2], &[64, 1, bn as u32])
            }
            KvSource::Paged { page_size, num_pages, .. } => {
                let rows = (*num_pages as u64 * hkv * *page_size as u64).max(1);
                ensure!(
                    rows < 1 << 31,
                    "a page pool of {rows} rows of head_dim is past the TMA kernel's 2^31"
                );
                let box_rows = (*page_size as u64).min(bn) as u32;
                encode_tma_map(addr, &[d, rows], &[d * 2], &[64, box_rows])
            }
        };
        Ok((map(kv.k.0)?, map(kv.v.0)?))
    }
}

/// The K/V pool a launch reads: (address, elements) of each, their GPUs, and its FP8
/// scales.
struct KvRead {
    k: (u64, usize),
    v: (u64, usize),
    gpus: [usize; 2],
    fp8: Option<KvFp8Scales>,
}

// Keep the host structs the size the kernels expect.
const _: () = assert!(std::mem::size_of::<AttentionParams>() == 192);
const _: () = assert!(std::mem::size_of::<TmaKernelParams>() == 512);
const _: () = assert!(std::mem::size_of::<WorkItem>() == 24);
const _: () = assert!(std::mem::size_of::<MergeItem>() == 16);

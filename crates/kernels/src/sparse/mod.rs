//! Query-aware page selection for sparse decode (see sparse.cu): per-page scores from the
//! key bounds, then per-(sequence, kv head) sparse page tables that the attention kernel
//! reads with `KvSource::Paged { head_tables: true, .. }`.
//!
//! The host fixes every table's length (`sparse_indptr`, from the pages to keep per
//! sequence); the device picks the page ids. A step's metadata is therefore known before
//! it runs, and a CUDA graph replays any step of its batch size.

mod reference;

use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{
    Arch, Device, DeviceBuffer, GpuError, HalfFloat, Jit, Kernel, KernelSpec, Result, SourceFile,
};

pub use reference::{page_score_reference, scores_reference, select_reference};

use crate::attention::{BatchMeta, KvSource};
use crate::{HEADERS, dtype_define};
use radix_kv::bounds_record_bytes;

pub const SOURCE: SourceFile =
    SourceFile { path: "sparse/sparse.cu", code: include_str!("sparse.cu") };
/// Scoring and selection in one launch of thread-block clusters (Hopper; see fused.cu).
pub const SOURCE_FUSED: SourceFile =
    SourceFile { path: "sparse/fused.cu", code: include_str!("fused.cu") };

/// The specialisation for a dtype, head dim and GQA group (query heads per kv head: the
/// scoring kernel folds the group's queries with a compile-time loop).
pub fn spec<T: HalfFloat>(head_dim: usize, group: usize) -> KernelSpec {
    KernelSpec::new(SOURCE, HEADERS)
        .define("DTYPE", dtype_define::<T>())
        .define("HEAD_DIM", head_dim)
        .define("BOUNDS_RECORD_BYTES", bounds_record_bytes(head_dim))
        .define("GROUP", group)
}

/// The one-launch selection's specialisation (sm_90a: thread-block clusters).
pub fn spec_fused<T: HalfFloat>(head_dim: usize, group: usize) -> KernelSpec {
    KernelSpec::new(SOURCE_FUSED, HEADERS)
        .define("DTYPE", dtype_define::<T>())
        .define("HEAD_DIM", head_dim)
        .define("BOUNDS_RECORD_BYTES", bounds_record_bytes(head_dim))
        .define("GROUP", group)
        .min_arch(Arch::SM90A)
}

/// `RADIX_SPARSE_SELECT_CLUSTER=n`: `SelectPath::Auto` takes clusters of n blocks
/// wherever the one-launch kernel runs and the device allows clusters that large, even when
/// they do not all fit at once (benchmarks).
fn forced_cluster() -> Option<u32> {
    static C: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *C.get_or_init(|| std::env::var("RADIX_SPARSE_SELECT_CLUSTER").ok()?.trim().parse().ok())
}

/// Heads and the pages every sparse table keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseShape {
    pub num_qo_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Leading pages always kept.
    pub sink_pages: usize,
    /// Trailing pages always kept (the last, partly filled page among them).
    pub window_pages: usize,
}

impl SparseShape {
    pub fn group(&self) -> usize {
        self.num_qo_heads / self.num_kv_heads.max(1)
    }
}

/// The per-head sparse table offsets, `[batch × num_kv_heads + 1]`: sequence b's heads
/// each get `keep[b]` pages when `0 < keep[b] < pages(b)`, else all of their pages.
/// Rejects a keep below `sink + window` (the kernel would not fit its forced pages).
pub fn sparse_indptr(
    kv_indptr: &[i32],
    keep: &[i32],
    shape: &SparseShape,
) -> std::result::Result<Vec<i32>, String> {
    let batch = kv_indptr.len().saturating_sub(1);
    if keep.len() != batch {
        return Err(format!("{} keep counts for a batch of {batch}", keep.len()));
    }
    if shape.window_pages == 0 {
        return Err(
            "window_pages must be at least 1: the last, partly filled page stays last".into()
        );
    }
    let forced = (shape.sink_pages + shape.window_pages) as i32;
    let mut out = Vec::with_capacity(batch * shape.num_kv_heads + 1);
    out.push(0i32);
    for b in 0..batch {
        let n = kv_indptr[b + 1] - kv_indptr[b];
        let k = keep[b];
        if k > 0 && k < n && k < forced {
            return Err(format!("sequence {b} keeps {k} pages, fewer than sink + window {forced}"));
        }
        let len = if k > 0 && k < n { k } else { n };
        for _ in 0..shape.num_kv_heads {
            out.push(out.last().unwrap() + len);
        }
    }
    Ok(out)
}

/// The attention metadata over the per-head tables a selection will write: the offsets
/// of `sparse_indptr`, the dense table's last-page lengths, and placeholder page ids
/// (valid, so the host can plan from lengths alone; the kernel reads the device's).
#[allow(clippy::too_many_arguments)]
pub fn sparse_meta(
    shape: &SparseShape,
    qo_indptr: &[i32],
    kv_indptr: &[i32],
    kv_last_page_len: &[i32],
    keep: &[i32],
    page_size: usize,
    num_pages: usize,
) -> Result<BatchMeta> {
    let indptr = sparse_indptr(kv_indptr, keep, shape).map_err(GpuError::Invalid)?;
    let entries = *indptr.last().unwrap_or(&0) as usize;
    BatchMeta::new(
        qo_indptr.to_vec(),
        KvSource::Paged {
            page_size,
            num_pages,
            kv_indptr: indptr,
            kv_indices: vec![0; entries],
            kv_last_page_len: kv_last_page_len.to_vec(),
            head_tables: true,
        },
        true,
    )
}

/// Mirrors `ScoreParams` in sparse.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ScoreParams {
    q: u64,
    bounds: u64,
    scores: u64,
    qo_indptr: u64,
    kv_indptr: u64,
    kv_indices: u64,
    keep: u64,
    q_stride: i64,
    batch: i32,
    num_kv_heads: i32,
    group: i32,
    reserved: i32,
}
// SAFETY: plain data mirroring the kernel's struct.
unsafe impl DeviceRepr for ScoreParams {}

/// Mirrors `SelectParams` in sparse.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SelectParams {
    scores: u64,
    kv_indptr: u64,
    kv_indices: u64,
    keep: u64,
    out_indptr: u64,
    out_indices: u64,
    batch: i32,
    num_kv_heads: i32,
    sink: i32,
    window: i32,
}
// SAFETY: plain data mirroring the kernel's struct.
unsafe impl DeviceRepr for SelectParams {}

/// Mirrors `FusedParams` in fused.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct FusedParams {
    q: u64,
    bounds: u64,
    scores: u64,
    qo_indptr: u64,
    kv_indptr: u64,
    kv_indices: u64,
    keep: u64,
    out_indptr: u64,
    out_indices: u64,
    q_stride: i64,
    batch: i32,
    num_kv_heads: i32,
    sink: i32,
    window: i32,
    meta_early: i32,
    bounds_early: i32,
}
// SAFETY: plain data mirroring the kernel's struct.
unsafe impl DeviceRepr for FusedParams {}

/// Whether the one-launch selection loads the key bounds of pages before the query tokens'
/// before `pdl_wait()` (with the host's tables): `RADIX_SPARSE_SELECT_BOUNDS_EARLY=0` turns
/// it off (to compare in one run, or for a caller whose kernel just before writes other
/// pages' bounds).
fn bounds_early() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !crate::env_flag(&OFF, "RADIX_SPARSE_SELECT_BOUNDS_EARLY", |v| v.trim() == "0")
}

const _: () = assert!(std::mem::size_of::<FusedParams>() == 104);
const _: () = assert!(std::mem::size_of::<ScoreParams>() == 80);
const _: () = assert!(std::mem::size_of::<SelectParams>() == 64);

/// The device arrays of one selection (owned, or views of a step workspace). The tables,
/// `keep` and `out_indptr` are the host's: the one-launch kernel reads them before
/// `pdl_wait()` (unless `RADIX_SPARSE_ATTN_EARLY_META=0`), so no kernel may write them.
pub struct SelectBuffers {
    /// `[batch + 1]` query offsets; each sequence's query is its last token.
    pub qo_indptr: DeviceBuffer<i32>,
    /// The dense table.
    pub kv_indptr: DeviceBuffer<i32>,
    pub kv_indices: DeviceBuffer<i32>,
    /// `[batch]` pages to keep.
    pub keep: DeviceBuffer<i32>,
    /// `sparse_indptr` of the batch, and room for its tables.
    pub out_indptr: DeviceBuffer<i32>,
    pub out_indices: DeviceBuffer<i32>,
    /// f32 scratch: the page scores, head-major `[num_kv_heads, dense pages]`.
    pub scores: DeviceBuffer<f32>,
}

/// Sizes the host knows for one selection, checked against the buffers on each run.
#[derive(Clone, Copy, Debug)]
pub struct SelectSizes {
    pub batch: usize,
    /// Dense pages of the batch (`kv_indptr[batch]`).
    pub dense_pages: usize,
    /// Entries of the sparse tables (`sparse_indptr[batch × heads]`).
    pub sparse_entries: usize,
}

/// Largest GQA group the scoring kernel takes (one compiled specialisation per group).
pub const MAX_GROUP: usize = 16;

/// Blocks of the scoring grid: fixed per device (the kernel strides over the work), so
/// a captured graph covers any number of pages.
pub fn score_blocks(device: &Device) -> u32 {
    // One wave: four resident blocks per SM (`__launch_bounds__(256, 4)`).
    4 * device.info().sm_count
}

/// How a selection runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectPath {
    /// The one-launch kernel in clusters where it runs (Hopper) and where the batch leaves
    /// SMs idle (at most half as many (sequence, kv head) pairs as SMs), else the two
    /// kernels. `RADIX_SPARSE_SELECT=split` keeps the two kernels (for comparisons).
    Auto,
    /// `page_scores`, then `select_pages`.
    Split,
    /// `score_select` with clusters of this many blocks (1 to 16; Hopper only). Its scores
    /// add up the same terms in another order than `page_scores`: each path's table
    /// equals the CPU selection on its own scores, and near-ties may go either way
    /// between the two paths.
    Fused(u32),
}

/// Blocks of the one-launch kernel (fused.cu's THREADS).
const FUSED_THREADS: u32 = 512;
/// The largest cluster the one-launch kernel adds up (fused.cu's MAX_CLUSTER).
pub const MAX_CLUSTER: u32 = 16;

fn fused_config(cluster: u32, batch: usize, num_kv_heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cluster, batch as u32, num_kv_heads as u32),
        block_dim: (FUSED_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn split_forced() -> bool {
    static SPLIT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::env_flag(&SPLIT, "RADIX_SPARSE_SELECT", |v| v.trim() == "split")
}

/// The cluster size `SelectPath::Auto` gives the one-launch kernel for `batch` sequences,
/// or `None` for the two kernels: the largest power of two (at most 16) whose clusters
/// all fit on the GPU at once in one block an SM.
pub fn auto_cluster<T: HalfFloat>(
    jit: &Jit,
    device: &Device,
    shape: &SparseShape,
    batch: usize,
) -> Option<u32> {
    auto_choice::<T>(jit, device, shape, batch).map(|(_, c)| c)
}

/// `auto_cluster` with the kernel it was asked about (built once a selection).
fn auto_choice<T: HalfFloat>(
    jit: &Jit,
    device: &Device,
    shape: &SparseShape,
    batch: usize,
) -> Option<(Kernel, u32)> {
    let spec = spec_fused::<T>(shape.head_dim, shape.group());
    if split_forced() || !spec.supports(device.arch()) || batch == 0 {
        return None;
    }
    // The two kernels run wherever this one cannot be built or asked about: said once.
    let choose = || -> Result<Option<(Kernel, u32)>> {
        let kernel = jit.kernel(device, &spec, "score_select")?;
        let pairs = batch * shape.num_kv_heads;
        let sms = device.info().sm_count as usize;
        let cfg = fused_config(1, batch, shape.num_kv_heads);
        let max = kernel.max_cluster_size(device, cfg)?.min(MAX_CLUSTER);
        if let Some(c) = forced_cluster().filter(|&c| c >= 1 && c <= max) {
            return Ok(Some((kernel, c)));
        }
        let mut c = if max == 0 { 0 } else { 1u32 << (31 - max.leading_zeros()) };
        while c >= 2 {
            let fit = kernel.max_active_clusters(device, cfg, c)? as usize;
            if pairs * c as usize <= sms && fit >= pairs {
                return Ok(Some((kernel, c)));
            }
            c /= 2;
        }
        Ok(None)
    };
    choose().unwrap_or_else(|e| {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!("one-launch sparse selection unavailable ({e}); using two kernels")
        });
        None
    })
}

/// For each cluster size 1, 2, 4, 8, 16 the one-launch kernel can take here, how many such
/// clusters run at once (empty off Hopper): what `auto_cluster` chooses from.
pub fn cluster_fit<T: HalfFloat>(
    jit: &Jit,
    device: &Device,
    shape: &SparseShape,
) -> Result<Vec<(u32, u32)>> {
    let spec = spec_fused::<T>(shape.head_dim, shape.group());
    if !spec.supports(device.arch()) {
        return Ok(Vec::new());
    }
    let kernel = jit.kernel(device, &spec, "score_select")?;
    let cfg = fused_config(1, 1, shape.num_kv_heads);
    let max = kernel.max_cluster_size(device, cfg)?;
    [1u32, 2, 4, 8, 16]
        .into_iter()
        .filter(|&c| c <= max)
        .map(|c| Ok((c, kernel.max_active_clusters(device, cfg, c)?)))
        .collect()
}

/// Scores the pages of the sequences with `0 < keep < pages` for this layer's queries
/// `q` (`[tokens, num_qo_heads, head_dim]`, RoPE applied) and key `bounds` (a
/// `kv_append::bounds` record per (page, kv head)), then writes every sequence's per-head table
/// into `bufs.out_indices`.
///
/// Under programmatic dependent launch with the host's tables, the one-launch kernel reads
/// the bounds of every page but each sequence's last q_len before the kernel just before it
/// on the stream has finished: that kernel may write only those (as the KV append does).
pub fn select<T: HalfFloat>(
    jit: &Jit,
    shape: &SparseShape,
    sizes: &SelectSizes,
    q: &DeviceBuffer<T>,
    bounds: &DeviceBuffer<u8>,
    bufs: &mut SelectBuffers,
) -> Result<()> {
    select_with(jit, shape, sizes, q, bounds, bufs, SelectPath::Auto)
}

/// `select` along `path`.
pub fn select_with<T: HalfFloat>(
    jit: &Jit,
    shape: &SparseShape,
    sizes: &SelectSizes,
    q: &DeviceBuffer<T>,
    bounds: &DeviceBuffer<u8>,
    bufs: &mut SelectBuffers,
    path: SelectPath,
) -> Result<()> {
    check(shape, sizes, q, bounds, bufs)?;
    if sizes.batch == 0 {
        return Ok(());
    }
    let device = q.device();
    let choice = match path {
        SelectPath::Split => None,
        SelectPath::Auto => auto_choice::<T>(jit, device, shape, sizes.batch),
        SelectPath::Fused(c) => {
            if c == 0 || c > MAX_CLUSTER {
                return Err(GpuError::Invalid(format!(
                    "sparse selection: clusters of 1 to {MAX_CLUSTER} blocks, not {c}"
                )));
            }
            let spec = spec_fused::<T>(shape.head_dim, shape.group());
            if !spec.supports(device.arch()) {
                return Err(GpuError::Invalid(format!(
                    "the one-launch sparse selection needs sm_90a, not {}",
                    device.arch()
                )));
            }
            Some((jit.kernel(device, &spec, "score_select")?, c))
        }
    };
    let Some((kernel, cluster)) = choice else {
        return launch_split(jit, shape, sizes, q, bounds, bufs, Stages::Both);
    };
    let params = FusedParams {
        q: q.ptr(),
        bounds: bounds.ptr(),
        scores: bufs.scores.ptr_mut(),
        qo_indptr: bufs.qo_indptr.ptr(),
        kv_indptr: bufs.kv_indptr.ptr(),
        kv_indices: bufs.kv_indices.ptr(),
        keep: bufs.keep.ptr(),
        out_indptr: bufs.out_indptr.ptr(),
        out_indices: bufs.out_indices.ptr_mut(),
        q_stride: (shape.num_qo_heads * shape.head_dim) as i64,
        batch: sizes.batch as i32,
        num_kv_heads: shape.num_kv_heads as i32,
        sink: shape.sink_pages as i32,
        window: shape.window_pages as i32,
        meta_early: crate::attention::launch::early_meta() as i32,
        bounds_early: bounds_early() as i32,
    };
    let cfg = fused_config(cluster, sizes.batch, shape.num_kv_heads);
    // SAFETY: as `launch_split`: the tables index pages inside `bounds`, out_indptr comes
    // from `sparse_indptr` of the same keep and dense table, sizes checked above; the
    // launcher checks the cluster against the device.
    unsafe { kernel.launch_cluster(device, cfg, cluster, &params) }
}

/// Which kernels of the two-kernel selection to launch (benchmarks time them apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stages {
    Both,
    /// `page_scores` only.
    Score,
    /// `select_pages` only (over the scores already in the buffers).
    Pick,
}

/// The two-kernel selection, launching only `stages`.
pub fn select_stages<T: HalfFloat>(
    jit: &Jit,
    shape: &SparseShape,
    sizes: &SelectSizes,
    q: &DeviceBuffer<T>,
    bounds: &DeviceBuffer<u8>,
    bufs: &mut SelectBuffers,
    stages: Stages,
) -> Result<()> {
    check(shape, sizes, q, bounds, bufs)?;
    if sizes.batch == 0 {
        return Ok(());
    }
    launch_split(jit, shape, sizes, q, bounds, bufs, stages)
}

fn check<T: HalfFloat>(
    shape: &SparseShape,
    sizes: &SelectSizes,
    q: &DeviceBuffer<T>,
    bounds: &DeviceBuffer<u8>,
    bufs: &SelectBuffers,
) -> Result<()> {
    let (hkv, d) = (shape.num_kv_heads, shape.head_dim);
    let bad = |m: String| Err(GpuError::Invalid(m));
    if !matches!(d, 64 | 128) || hkv == 0 || !shape.num_qo_heads.is_multiple_of(hkv) {
        return bad(format!("sparse selection: bad heads {shape:?}"));
    }
    if shape.group() > MAX_GROUP {
        return bad(format!(
            "sparse selection takes GQA groups of up to {MAX_GROUP} query heads, not {}",
            shape.group()
        ));
    }
    if !bounds.len().is_multiple_of(hkv * bounds_record_bytes(d))
        || !q.len().is_multiple_of(shape.num_qo_heads * d)
    {
        return bad("sparse selection: q or bounds have a partial row".into());
    }
    let b = sizes.batch;
    if bufs.qo_indptr.len() <= b
        || bufs.kv_indptr.len() <= b
        || bufs.kv_indices.len() < sizes.dense_pages
        || bufs.keep.len() < b
        || bufs.out_indptr.len() <= b * hkv
        || bufs.out_indices.len() < sizes.sparse_entries
        || bufs.scores.len() < sizes.dense_pages * hkv
    {
        return bad(format!("sparse selection buffers too small for {sizes:?}"));
    }
    Ok(())
}

fn launch_split<T: HalfFloat>(
    jit: &Jit,
    shape: &SparseShape,
    sizes: &SelectSizes,
    q: &DeviceBuffer<T>,
    bounds: &DeviceBuffer<u8>,
    bufs: &mut SelectBuffers,
    stages: Stages,
) -> Result<()> {
    let (hkv, d) = (shape.num_kv_heads, shape.head_dim);
    let b = sizes.batch;
    let device = q.device();
    let spec = spec::<T>(d, shape.group());
    let score = jit.kernel(device, &spec, "page_scores")?;
    let params = ScoreParams {
        q: q.ptr(),
        bounds: bounds.ptr(),
        scores: bufs.scores.ptr_mut(),
        qo_indptr: bufs.qo_indptr.ptr(),
        kv_indptr: bufs.kv_indptr.ptr(),
        kv_indices: bufs.kv_indices.ptr(),
        keep: bufs.keep.ptr(),
        q_stride: (shape.num_qo_heads * d) as i64,
        batch: b as i32,
        num_kv_heads: hkv as i32,
        group: shape.group() as i32,
        reserved: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (score_blocks(device), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    if stages != Stages::Pick {
        // SAFETY: the caller's tables index pages inside `bounds` (validated on the host
        // when the step was planned); sizes checked above.
        unsafe { score.launch(device, cfg, &params) }?;
    }
    if stages == Stages::Score {
        return Ok(());
    }

    let pick = jit.kernel(device, &spec, "select_pages")?;
    let params = SelectParams {
        scores: bufs.scores.ptr(),
        kv_indptr: bufs.kv_indptr.ptr(),
        kv_indices: bufs.kv_indices.ptr(),
        keep: bufs.keep.ptr(),
        out_indptr: bufs.out_indptr.ptr(),
        out_indices: bufs.out_indices.ptr_mut(),
        batch: b as i32,
        num_kv_heads: hkv as i32,
        sink: shape.sink_pages as i32,
        window: shape.window_pages as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (b as u32, hkv as u32, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: out_indptr was built by `sparse_indptr` from the same keep and dense table,
    // so every block writes inside out_indices (sized above).
    unsafe { pick.launch(device, cfg, &params) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> SparseShape {
        SparseShape {
            num_qo_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            sink_pages: 1,
            window_pages: 2,
        }
    }

    #[test]
    fn sparse_tables_take_keep_pages_per_head_or_all_of_them() {
        // Sequences of 10, 3 and 8 pages; keep 4, 0 (dense) and 8 (= all: dense).
        let got = sparse_indptr(&[0, 10, 13, 21], &[4, 0, 8], &shape()).unwrap();
        assert_eq!(got, vec![0, 4, 8, 11, 14, 22, 30]);
        let err = sparse_indptr(&[0, 10], &[2], &shape()).unwrap_err();
        assert!(err.contains("sink + window"), "{err}");
        assert!(sparse_indptr(&[0, 10], &[2, 3], &shape()).is_err());
    }
}

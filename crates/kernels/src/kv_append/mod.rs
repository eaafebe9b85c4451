//! KV append with RoPE (q and k rotated in the same launch) and per-page key bounds.
//! See kv_append.cu; `bounds` has the stored form of the bounds.

pub mod bounds;
mod reference;

use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{DType, DeviceBuffer, HalfFloat, Jit, KernelSpec, Result, SourceFile, ensure};
use radix_kv::{KvDtype, KvGeometry};

pub use reference::{append_reference, key_bounds_record, key_bounds_reference};

use crate::attention::KvFp8Scales;
use crate::{HEADERS, dtype_define};

pub const SOURCE: SourceFile =
    SourceFile { path: "kv_append/kv_append.cu", code: include_str!("kv_append.cu") };

pub fn spec<T: HalfFloat>(head_dim: usize) -> KernelSpec {
    KernelSpec::new(SOURCE, HEADERS)
        .define("DTYPE", dtype_define::<T>())
        .define("HEAD_DIM", head_dim)
        .define("BOUNDS_RECORD_BYTES", radix_kv::bounds_record_bytes(head_dim))
}

/// The specialisation writing an FP8 (e4m3) pool from `T` activations (sm_89+).
pub fn spec_fp8<T: HalfFloat>(head_dim: usize) -> KernelSpec {
    spec::<T>(head_dim).define("KV_FP8", 1).min_arch(radix_gpu::Arch::SM89)
}

/// One layer of the page pool and the query heads appended beside it: the pool's
/// geometry (radix-kv's, the one description of a page) with its page count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    kv: KvGeometry,
    num_pages: usize,
    num_qo_heads: usize,
}

impl PoolShape {
    /// Checks what the kernels take: head dims 64 and 128, a half-float or FP8 pool, query
    /// heads a multiple of the kv heads, at least one page.
    pub fn new(kv: KvGeometry, num_pages: usize, num_qo_heads: usize) -> Result<Self> {
        ensure!(
            matches!(kv.head_dim(), 64 | 128),
            "head_dim {} not supported (64 or 128)",
            kv.head_dim()
        );
        ensure!(
            matches!(kv.dtype(), KvDtype::BF16 | KvDtype::F16 | KvDtype::F8E4M3),
            "the CUDA KV pool is bf16, f16 or fp8 e4m3, not {:?}",
            kv.dtype()
        );
        ensure!(
            num_qo_heads > 0 && num_qo_heads.is_multiple_of(kv.num_kv_heads()),
            "{num_qo_heads} query heads for {} kv heads",
            kv.num_kv_heads()
        );
        ensure!(num_pages > 0, "a pool needs at least one page");
        Ok(Self { kv, num_pages, num_qo_heads })
    }

    pub fn geometry(&self) -> &KvGeometry {
        &self.kv
    }
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
    pub fn num_qo_heads(&self) -> usize {
        self.num_qo_heads
    }
    pub fn num_kv_heads(&self) -> usize {
        self.kv.num_kv_heads()
    }
    pub fn page_size(&self) -> usize {
        self.kv.page_size()
    }
    pub fn head_dim(&self) -> usize {
        self.kv.head_dim()
    }

    /// Elements of one layer's K (or V) pool.
    pub fn pool_elems(&self) -> usize {
        self.kv.layer_elems(self.num_pages)
    }

    /// Bytes of one layer's key bounds (0 when the pool keeps none).
    pub fn bounds_bytes(&self) -> usize {
        self.kv.bounds_layer_bytes(self.num_pages)
    }

    /// Elements of one token's fused QKV row: q, k and v heads.
    pub fn qkv_row(&self) -> usize {
        (self.num_qo_heads + 2 * self.num_kv_heads()) * self.head_dim()
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct AppendParams {
    qkv: u64,
    q_out: u64,
    k_pool: u64,
    v_pool: u64,
    positions: u64,
    slots: u64,
    inv_freq: u64,
    qkv_stride: i64,
    num_tokens: i32,
    num_qo_heads: i32,
    num_kv_heads: i32,
    page_size: i32,
    k_scale: f32,
    v_scale: f32,
}
// SAFETY: plain data mirroring AppendParams in kv_append.cu.
unsafe impl DeviceRepr for AppendParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct BoundsParams {
    k_pool: u64,
    bounds: u64,
    pages: u64,
    filled: u64,
    num_touched: i32,
    num_kv_heads: i32,
    page_size: i32,
    k_scale: f32,
}
// SAFETY: plain data mirroring BoundsParams in kv_append.cu.
unsafe impl DeviceRepr for BoundsParams {}

/// The host-side description of one append: the new tokens' positions and slots.
pub struct AppendBatch<'a> {
    pub positions: &'a [i32],
    pub slots: &'a [i32],
}

impl AppendBatch<'_> {
    /// Checks positions and slots against the pool.
    pub fn validate(&self, shape: &PoolShape) -> Result<()> {
        ensure!(
            self.positions.len() == self.slots.len(),
            "{} positions for {} slots",
            self.positions.len(),
            self.slots.len()
        );
        let slots = (shape.num_pages() * shape.page_size()) as i64;
        if let Some(bad) = self.slots.iter().find(|&&s| s < 0 || s as i64 >= slots) {
            return Err(radix_gpu::GpuError::Invalid(format!(
                "slot {bad} outside the pool's {slots} slots"
            )));
        }
        if let Some(bad) = self.positions.iter().find(|&&p| p < 0) {
            return Err(radix_gpu::GpuError::Invalid(format!("negative position {bad}")));
        }
        Ok(())
    }

    /// The pages these slots touch with how far each is filled afterwards (highest slot
    /// offset + 1), for `key_bounds`. Assumes a page's earlier slots are filled already
    /// (pages fill in order), which is how the scheduler hands them out.
    pub fn touched_pages(&self, page_size: usize) -> (Vec<i32>, Vec<i32>) {
        let mut touched: Vec<(i32, i32)> =
            self.slots.iter().map(|&s| (s / page_size as i32, s % page_size as i32 + 1)).collect();
        touched.sort_unstable();
        let mut pages = Vec::new();
        let mut filled = Vec::new();
        for (p, f) in touched {
            if pages.last() == Some(&p) {
                *filled.last_mut().unwrap() = f; // sorted: the last is the largest
            } else {
                pages.push(p);
                filled.push(f);
            }
        }
        (pages, filled)
    }
}

/// Device buffers an append reads besides the activations: positions, slots, the RoPE
/// frequency table and the touched-page list for the bounds.
pub struct AppendInputs {
    pub positions: DeviceBuffer<i32>,
    pub slots: DeviceBuffer<i32>,
    pub inv_freq: DeviceBuffer<f32>,
    pub touched_pages: DeviceBuffer<i32>,
    pub touched_filled: DeviceBuffer<i32>,
    pub num_tokens: usize,
    pub num_touched: usize,
}

impl AppendInputs {
    pub fn upload(
        device: &radix_gpu::Device,
        shape: &PoolShape,
        batch: &AppendBatch,
        inv_freq: &[f32],
    ) -> Result<Self> {
        batch.validate(shape)?;
        ensure!(
            inv_freq.len() == shape.head_dim() / 2,
            "inv_freq has {} entries, want head_dim/2",
            inv_freq.len()
        );
        let (pages, filled) = batch.touched_pages(shape.page_size());
        let up = |v: &[i32]| device.upload(if v.is_empty() { &[0] } else { v });
        Ok(Self {
            positions: up(batch.positions)?,
            slots: up(batch.slots)?,
            inv_freq: device.upload(inv_freq)?,
            num_touched: pages.len(),
            touched_pages: up(&pages)?,
            touched_filled: up(&filled)?,
            num_tokens: batch.positions.len(),
        })
    }
}

/// Rotates q and k of every new token, writes q to `q_out` and k, v into the pool, then
/// refreshes the key bounds of every touched page.
#[allow(clippy::too_many_arguments)]
pub fn append<T: HalfFloat>(
    jit: &Jit,
    shape: &PoolShape,
    inputs: &AppendInputs,
    qkv: &DeviceBuffer<T>,
    q_out: &mut DeviceBuffer<T>,
    k_pool: &mut DeviceBuffer<T>,
    v_pool: &mut DeviceBuffer<T>,
    bounds: Option<&mut DeviceBuffer<u8>>,
) -> Result<()> {
    let want = match T::DTYPE {
        DType::F16 => KvDtype::F16,
        _ => KvDtype::BF16,
    };
    ensure!(
        shape.geometry().dtype() == want,
        "a {:?} pool appended with {} activations",
        shape.geometry().dtype(),
        T::DTYPE
    );
    let pool =
        PoolWrite { k: (k_pool.ptr_mut(), k_pool.len()), v: (v_pool.ptr_mut(), v_pool.len()) };
    launch_append(jit, shape, inputs, qkv, q_out, pool, None, bounds)
}

/// `append` into an FP8 pool: keys and values stored as e4m3 bytes of `k / scales.k` and
/// `v / scales.v`, the bounds those of the stored keys.
#[allow(clippy::too_many_arguments)]
pub fn append_fp8<T: HalfFloat>(
    jit: &Jit,
    shape: &PoolShape,
    inputs: &AppendInputs,
    qkv: &DeviceBuffer<T>,
    q_out: &mut DeviceBuffer<T>,
    k_pool: &mut DeviceBuffer<u8>,
    v_pool: &mut DeviceBuffer<u8>,
    scales: KvFp8Scales,
    bounds: Option<&mut DeviceBuffer<u8>>,
) -> Result<()> {
    ensure!(
        shape.geometry().dtype() == KvDtype::F8E4M3,
        "append_fp8 into a {:?} pool",
        shape.geometry().dtype()
    );
    ensure!(
        scales.k.is_finite() && scales.k > 0.0 && scales.v.is_finite() && scales.v > 0.0,
        "FP8 KV scales must be positive numbers, got {scales:?}"
    );
    let pool =
        PoolWrite { k: (k_pool.ptr_mut(), k_pool.len()), v: (v_pool.ptr_mut(), v_pool.len()) };
    launch_append(jit, shape, inputs, qkv, q_out, pool, Some(scales), bounds)
}

/// The K and V pools an append writes: (address, elements) of each.
struct PoolWrite {
    k: (u64, usize),
    v: (u64, usize),
}

#[allow(clippy::too_many_arguments)]
fn launch_append<T: HalfFloat>(
    jit: &Jit,
    shape: &PoolShape,
    inputs: &AppendInputs,
    qkv: &DeviceBuffer<T>,
    q_out: &mut DeviceBuffer<T>,
    pool: PoolWrite,
    fp8: Option<KvFp8Scales>,
    bounds: Option<&mut DeviceBuffer<u8>>,
) -> Result<()> {
    let n = inputs.num_tokens;
    ensure!(
        qkv.len() == n * shape.qkv_row(),
        "qkv holds {} elements, expected {n} x {}",
        qkv.len(),
        shape.qkv_row()
    );
    ensure!(
        q_out.len() == n * shape.num_qo_heads() * shape.head_dim(),
        "q_out holds {} elements, expected {}",
        q_out.len(),
        n * shape.num_qo_heads() * shape.head_dim()
    );
    ensure!(
        pool.k.1 == shape.pool_elems() && pool.v.1 == shape.pool_elems(),
        "K/V pools must hold {} elements",
        shape.pool_elems()
    );
    ensure!(
        bounds.is_some() == shape.geometry().key_bounds(),
        "key bounds given: {}, but the pool keeps them: {}",
        bounds.is_some(),
        shape.geometry().key_bounds()
    );
    if let Some(b) = &bounds {
        ensure!(
            b.len() == shape.bounds_bytes(),
            "key bounds hold {} bytes, expected {}",
            b.len(),
            shape.bounds_bytes()
        );
    }
    // The kernel moves 16-byte items (8-byte ones into an FP8 pool) and reads inv_freq as
    // float4s.
    let pool_align = if fp8.is_some() { 8 } else { 16 };
    ensure!(
        qkv.ptr().is_multiple_of(16)
            && q_out.ptr().is_multiple_of(16)
            && inputs.inv_freq.ptr().is_multiple_of(16)
            && pool.k.0.is_multiple_of(pool_align)
            && pool.v.0.is_multiple_of(pool_align),
        "kv_append: qkv, q_out and inv_freq must be 16-byte aligned and the K/V pools \
         {pool_align}-byte aligned"
    );
    if n == 0 {
        return Ok(());
    }
    let device = qkv.device();
    let spec = match fp8 {
        None => spec::<T>(shape.head_dim()),
        Some(_) => spec_fp8::<T>(shape.head_dim()),
    };
    let (k_scale, v_scale) = fp8.map_or((1.0, 1.0), |s| (s.k, s.v));
    let kernel = jit.kernel(device, &spec, "kv_append")?;
    let params = AppendParams {
        qkv: qkv.ptr(),
        q_out: q_out.ptr_mut(),
        k_pool: pool.k.0,
        v_pool: pool.v.0,
        positions: inputs.positions.ptr(),
        slots: inputs.slots.ptr(),
        inv_freq: inputs.inv_freq.ptr(),
        qkv_stride: shape.qkv_row() as i64,
        num_tokens: n as i32,
        num_qo_heads: shape.num_qo_heads() as i32,
        num_kv_heads: shape.num_kv_heads() as i32,
        page_size: shape.page_size() as i32,
        k_scale,
        v_scale,
    };
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (APPEND_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: sizes checked above; slots were validated against the pool on upload.
    unsafe { kernel.launch(device, cfg, &params) }?;

    if let Some(bounds) = bounds {
        let kernel = jit.kernel(device, &spec, "key_bounds")?;
        let params = BoundsParams {
            k_pool: pool.k.0,
            bounds: bounds.ptr_mut(),
            pages: inputs.touched_pages.ptr(),
            filled: inputs.touched_filled.ptr(),
            num_touched: inputs.num_touched as i32,
            num_kv_heads: shape.num_kv_heads() as i32,
            page_size: shape.page_size() as i32,
            k_scale,
        };
        let cfg = LaunchConfig {
            grid_dim: (inputs.num_touched as u32, shape.num_kv_heads() as u32, 1),
            block_dim: (shape.head_dim() as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: touched pages come from validated slots; bounds sized above.
        unsafe { kernel.launch(device, cfg, &params) }?;
    }
    Ok(())
}

/// Threads of a `kv_append` block (`APPEND_THREADS` in kv_append.cu).
const APPEND_THREADS: u32 = 256;

// Keep the host structs the size the kernel expects.
const _: () = assert!(std::mem::size_of::<AppendParams>() == 88);
const _: () = assert!(std::mem::size_of::<BoundsParams>() == 48);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_contain_the_elementwise_extremes() {
        // Two keys of 8 dims; every value below is a multiple of its group's step (2^-5
        // for an amax of 3), so the stored bounds are exact.
        let keys =
            [1.0f32, -2.0, 0.5, 3.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0];
        let (lo, hi) = key_bounds_reference(&keys, 8);
        assert_eq!(lo, vec![-1.0, -2.0, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(hi, vec![1.0, 0.0, 0.5, 3.0, 0.0, 0.0, 0.0, 0.0]);
        // Off the grid: rounded outward.
        let (lo, hi) = key_bounds_reference(&[0.1f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 8);
        assert!(lo[0] <= 0.1 && hi[0] >= 0.1 && hi[0] - lo[0] < 0.1 / 63.0);
    }

    #[test]
    fn touched_pages_take_the_highest_offset() {
        let b = AppendBatch { positions: &[0, 1, 2, 3], slots: &[33, 32, 34, 5] };
        assert_eq!(b.touched_pages(16), (vec![0, 2], vec![6, 3]));
    }

    #[test]
    fn rejects_slots_outside_the_pool() {
        let kv = KvGeometry::new(1, 2, 16, 64, KvDtype::BF16, false).unwrap();
        let shape = PoolShape::new(kv, 2, 4).unwrap();
        assert!(AppendBatch { positions: &[0], slots: &[32] }.validate(&shape).is_err());
        assert!(AppendBatch { positions: &[-1], slots: &[3] }.validate(&shape).is_err());
        assert!(AppendBatch { positions: &[0, 1], slots: &[3] }.validate(&shape).is_err());
        assert!(AppendBatch { positions: &[7], slots: &[31] }.validate(&shape).is_ok());
    }
}

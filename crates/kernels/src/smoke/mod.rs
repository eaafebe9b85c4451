//! A small kernel that exercises the whole JIT path (embed, compile, load, launch).

use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{DeviceBuffer, HalfFloat, Jit, KernelSpec, Result, SourceFile, ensure};

use crate::{HEADERS, dtype_define};

pub const SOURCE: SourceFile =
    SourceFile { path: "smoke/smoke.cu", code: include_str!("smoke.cu") };

#[repr(C)]
#[derive(Clone, Copy)]
struct SmokeParams {
    x: u64,
    out: u64,
    scale: f32,
    shift: f32,
    n: u32,
}

// SAFETY: plain old data mirroring `SmokeParams` in smoke.cu.
unsafe impl DeviceRepr for SmokeParams {}

pub fn spec<T: HalfFloat>() -> KernelSpec {
    KernelSpec::new(SOURCE, HEADERS).define("DTYPE", dtype_define::<T>())
}

/// `out[i] = scale * x[i] + shift` on the GPU.
pub fn affine<T: HalfFloat>(
    jit: &Jit,
    x: &DeviceBuffer<T>,
    scale: f32,
    shift: f32,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    ensure!(x.len() == out.len(), "smoke: x has {} elements, out {}", x.len(), out.len());
    ensure!(x.len() <= u32::MAX as usize, "smoke: {} elements is too many", x.len());
    if x.is_empty() {
        return Ok(());
    }
    let device = x.device();
    let kernel = jit.load(device, &spec::<T>())?.function("smoke_affine")?;
    let n = x.len() as u32;
    let params = SmokeParams { x: x.ptr(), out: out.ptr_mut(), scale, shift, n };
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).min(device.info().sm_count * 8), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: params mirrors the kernel's struct; x and out hold n elements each.
    unsafe { kernel.launch(device, cfg, &params) }
}

/// CPU reference of `affine`, in f64.
pub fn affine_reference<T: HalfFloat>(x: &[T], scale: f32, shift: f32) -> Vec<f64> {
    x.iter().map(|v| scale as f64 * v.to_f64() + shift as f64).collect()
}

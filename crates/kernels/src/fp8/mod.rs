//! FP8 (e4m3) activations for the FP8 GEMMs (fp8.cu): each row quantized with its own
//! scale, as the GEMM's per-token scale vector wants them.

pub mod skinny;

use float8::F8E4M3;
use radix_gpu::cudarc::driver::{DeviceRepr, LaunchConfig};
use radix_gpu::{
    Arch, DeviceBuffer, Element, HalfFloat, Jit, KernelSpec, Result, SourceFile, ensure,
};

use crate::{HEADERS, dtype_define};

pub const FP8: SourceFile = SourceFile { path: "fp8/fp8.cu", code: include_str!("fp8.cu") };

/// Largest finite e4m3 value (OCP "float8_e4m3fn").
pub const E4M3_MAX: f32 = 448.0;

/// The quantizer for activations of type `T` (hardware e4m3 conversion: sm_89 and later).
pub fn spec<T: HalfFloat>() -> KernelSpec {
    KernelSpec::new(FP8, HEADERS).define("DTYPE", dtype_define::<T>()).min_arch(Arch::SM89)
}

/// Mirrors `QuantizeParams` in fp8.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct QuantizeParams {
    x: u64,
    q: u64,
    scales: u64,
    rows: i32,
    cols: i32,
}

// SAFETY: plain data mirroring the kernel's parameter struct.
unsafe impl DeviceRepr for QuantizeParams {}

const _: () = assert!(std::mem::size_of::<QuantizeParams>() == 32);

/// Quantizes `x[rows, cols]` row by row into e4m3 bytes `q` and f32 `scales` (see
/// fp8.cu). `cols` must be a multiple of 8.
pub fn quantize_rows<T: HalfFloat>(
    jit: &Jit,
    x: &DeviceBuffer<T>,
    rows: usize,
    cols: usize,
    q: &mut DeviceBuffer<u8>,
    scales: &mut DeviceBuffer<f32>,
) -> Result<()> {
    ensure!(
        cols > 0 && cols.is_multiple_of(8) && cols <= i32::MAX as usize,
        "FP8 quantization takes rows of a positive multiple of 8 elements, got {cols}"
    );
    ensure!(
        x.len() >= rows * cols && q.len() >= rows * cols && scales.len() >= rows,
        "quantize_rows: buffers too small for [{rows}, {cols}] (x {}, q {}, scales {})",
        x.len(),
        q.len(),
        scales.len()
    );
    if rows == 0 {
        return Ok(());
    }
    let device = x.device();
    let k = jit.kernel(device, &spec::<T>(), "quantize_rows")?;
    let p = QuantizeParams {
        x: x.ptr(),
        q: q.ptr_mut(),
        scales: scales.ptr_mut(),
        rows: rows as i32,
        cols: cols as i32,
    };
    let cfg =
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: sizes checked above; one block per row stays within its row.
    unsafe { k.launch(device, cfg, &p) }
}

/// A row's (scale, multiplier) from its largest magnitude, as common/fp8.cuh computes
/// them: `(amax / 448, 448 / amax)`; `(1, 1)` for 0 or a non-finite amax; `(2^-100,
/// 2^100)` below `448 · 2^-100`, where `448 / amax` would overflow.
pub fn row_scale(amax: f32) -> (f32, f32) {
    const TINY: f32 = 7.888_609e-31; // 2^-100
    if !(amax > 0.0 && amax.is_finite()) {
        (1.0, 1.0)
    } else if amax < E4M3_MAX * TINY {
        (TINY, 1.0 / TINY)
    } else {
        (amax / E4M3_MAX, E4M3_MAX / amax)
    }
}

/// CPU reference of `quantize_rows`, bit for bit: `(scale, inv) = row_scale(amax)`,
/// `q = e4m3(x * inv)` rounded to nearest even and saturated.
pub fn quantize_rows_reference<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows);
    for row in x.chunks(cols).take(rows) {
        let row: Vec<f32> = row.iter().map(|v| v.to_f64() as f32).collect();
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (scale, inv) = row_scale(amax);
        scales.push(scale);
        q.extend(row.iter().map(|v| F8E4M3::from_f32(v * inv).to_bits()));
    }
    (q, scales)
}

/// The value of e4m3 byte `b`.
pub fn e4m3_to_f32(b: u8) -> f32 {
    F8E4M3::from_bits(b).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn reference_scales_each_row_to_its_largest_magnitude() {
        let x: Vec<bf16> = [1.0f32, -2.0, 0.5, 4.0, 0.0, 0.0, 0.0, 0.0]
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let (q, s) = quantize_rows_reference(&x, 2, 4);
        assert_eq!(s, vec![4.0 / 448.0, 1.0], "a row of zeros keeps scale 1");
        // 4.0 maps to 448 (0x7e), -2 to -224, 1 to 112, 0.5 to 56.
        assert_eq!(&q[..4], &[0x6e, 0xf6, 0x66, 0x7e]);
        let back: Vec<f32> = q[..4].iter().map(|&b| e4m3_to_f32(b) * s[0]).collect();
        assert_eq!(back, vec![1.0, -2.0, 0.5, 4.0]);
        assert_eq!(&q[4..], &[0, 0, 0, 0]);
        // A row far below any scale: no infinite multiplier, no NaN.
        let (scale, inv) = row_scale(1e-38);
        assert_eq!((scale, inv), (2f32.powi(-100), 2f32.powi(100)));
        let (q, _) = quantize_rows_reference(&[1e-38f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1, 8);
        assert!(q.iter().all(|&b| b & 0x7f != 0x7f), "{q:?}");
    }
}

//! radix-sparse's CUDA kernels. Each family is a folder with its `.cu` source, its Rust
//! launcher (shape checks, then one `unsafe` launch) and its CPU reference; shared device
//! code lives in `common/*.cuh`. Sources are embedded in the binary and compiled by
//! NVRTC at first use (see `radix_gpu::jit`).

pub mod attention;
pub mod fp8;
pub mod gemv;
pub mod kv_append;
pub mod ops;
pub mod rope;
pub mod sparse;

use radix_gpu::{DType, Element, HalfFloat, KernelSpec, SourceFile};

/// Headers every kernel may `#include "common/..."`.
pub const HEADERS: &[SourceFile] = &[
    SourceFile { path: "common/types.cuh", code: include_str!("common/types.cuh") },
    SourceFile { path: "common/mma.cuh", code: include_str!("common/mma.cuh") },
    SourceFile { path: "common/key_bounds.cuh", code: include_str!("common/key_bounds.cuh") },
    SourceFile { path: "common/fp8.cuh", code: include_str!("common/fp8.cuh") },
    SourceFile { path: "common/wgmma.cuh", code: include_str!("common/wgmma.cuh") },
    SourceFile { path: "common/cluster.cuh", code: include_str!("common/cluster.cuh") },
    // The TMA pipeline and the persistent TMA variant of attention.cu (included by it).
    SourceFile {
        path: "attention/tma_pipeline.cuh",
        code: include_str!("attention/tma_pipeline.cuh"),
    },
    SourceFile { path: "attention/tma.cuh", code: include_str!("attention/tma.cuh") },
    // What the GEMVs (gemv.cu, stream.cu) share.
    SourceFile { path: "gemv/dot.cuh", code: include_str!("gemv/dot.cuh") },
    SourceFile { path: "gemv/params.cuh", code: include_str!("gemv/params.cuh") },
    // What the two sparse selections (sparse.cu, fused.cu) share.
    SourceFile { path: "sparse/select.cuh", code: include_str!("sparse/select.cuh") },
];

/// Whether environment variable `name` is set to a value `test` accepts, read once per
/// process into `cell` (launchers ask at every launch; the switches are for comparisons).
pub(crate) fn env_flag(
    cell: &'static std::sync::OnceLock<bool>,
    name: &str,
    test: fn(&str) -> bool,
) -> bool {
    *cell.get_or_init(|| std::env::var(name).is_ok_and(|v| test(&v)))
}

/// The `-DDTYPE=` value for element type `T` (see common/types.cuh).
pub fn dtype_define<T: HalfFloat>() -> &'static str {
    match T::DTYPE {
        DType::F16 => "RS_F16",
        DType::BF16 => "RS_BF16",
        _ => unreachable!("HalfFloat is only f16 and bf16"),
    }
}

/// Every specialisation the project ships, for `radix-sparse kernels compile` and CI.
pub fn catalog() -> Vec<KernelSpec> {
    use radix_gpu::half::{bf16, f16};
    let mut specs = Vec::new();
    for head_dim in [64, 128] {
        // The Hopper prefill kernel (wgmma), 16-bit pools only; three stages: the overlapped
        // loop (`bench attention --tiles wgmma,128,3`).
        let sm90 = attention::TileConfig::PREFILL_SM90;
        for tiles in [
            sm90,
            attention::TileConfig { stages: 3, ..sm90 },
            // With one or four producer warps (`--tiles wgmma-ws[,128,3]`, `wgmma-ws4`).
            attention::TileConfig { num_warps: 9, ..sm90 },
            attention::TileConfig { num_warps: 9, stages: 3, ..sm90 },
            attention::TileConfig { num_warps: 12, ..sm90 },
            // With a TMA producer warpgroup (`--tiles wgmma-tma`), also persistent
            // (`--tiles wgmma-tma-persistent`).
            attention::TileConfig::PREFILL_SM90_TMA,
            attention::TileConfig::PREFILL_SM90_TMA_PERSISTENT,
            // Three compute warpgroups (`--tiles wgmma-tma3`), head_dim 64 only.
            attention::TileConfig::PREFILL_SM90_TMA_D64,
        ] {
            if tiles.num_warps == 16 && head_dim != 64 {
                continue;
            }
            for paged in [false, true] {
                specs.push(attention::spec::<f16>(head_dim, paged, tiles));
                specs.push(attention::spec::<bf16>(head_dim, paged, tiles));
            }
        }
        for tiles in [
            attention::TileConfig::PREFILL,
            attention::TileConfig::DECODE,
            attention::TileConfig::DECODE_SMALL,
        ] {
            for paged in [false, true] {
                specs.push(attention::spec::<f16>(head_dim, paged, tiles));
                specs.push(attention::spec::<bf16>(head_dim, paged, tiles));
            }
            // The FP8 KV cache is a paged pool, with Hopper's deeper pipeline.
            specs.push(attention::spec_fp8_kv::<bf16>(head_dim, true, tiles));
            let hopper = tiles.fp8_pipeline(head_dim, 227 * 1024);
            if hopper != tiles {
                specs.push(attention::spec_fp8_kv::<bf16>(head_dim, true, hopper));
            }
            // Key-split blocks' other ways to widen (RADIX_SPARSE_FP8_WIDEN; spec_fp8_kv
            // has the default), and their 128-key tiles (`bench decode --tiles ks,128`).
            if tiles.key_split {
                use attention::Fp8Widen;
                let wide = attention::TileConfig { block_n: 128, ..tiles };
                specs.push(attention::spec_fp8_kv::<bf16>(head_dim, true, wide));
                // Merging more than 16 splits of a row (long contexts at batch 1).
                for paged in [false, true] {
                    let wide_f16 = attention::spec::<f16>(head_dim, paged, tiles);
                    specs.push(attention::wide_merge(wide_f16));
                    let wide_bf16 = attention::spec::<bf16>(head_dim, paged, tiles);
                    specs.push(attention::wide_merge(wide_bf16));
                }
                let fp8 = attention::spec_fp8_kv::<bf16>(head_dim, true, wide);
                specs.push(attention::wide_merge(fp8));
                for widen in [Fp8Widen::BitMoves, Fp8Widen::ConvertKeys, Fp8Widen::ConvertValues] {
                    specs.push(attention::spec_fp8_kv_widened::<bf16>(
                        head_dim, true, hopper, widen,
                    ));
                }
            }
        }
    }
    for m in [1, 2, 4, 8] {
        for out_f32 in [false, true] {
            specs.push(gemv::spec::<f16>(m, out_f32));
            specs.push(gemv::spec::<bf16>(m, out_f32));
            specs.push(gemv::spec_fp8::<bf16>(m, out_f32));
            if m <= gemv::STREAM_MAX_ROWS {
                specs.push(gemv::spec_stream::<f16>(m, out_f32));
                specs.push(gemv::spec_stream::<bf16>(m, out_f32));
                specs.push(gemv::spec_stream_fp8::<bf16>(m, out_f32));
            }
        }
    }
    // The decode kernel that stamps its phases (`bench decode --trace`).
    let decode = attention::TileConfig::DECODE_SMALL;
    specs.push(attention::spec::<bf16>(128, true, decode).define("TRACE", 1));
    // The one-row products with the norm (1) or SiLU·mul (2) before them built in.
    for x_src in [1, 2] {
        for fp8 in [false, true] {
            specs.push(gemv::spec_stream_built::<bf16>(x_src, fp8, false));
        }
        specs.push(gemv::spec_stream_built::<f16>(x_src, false, false));
    }
    for m in [8, 16, 32, 64] {
        use fp8::skinny::Variant;
        for variant in [Variant::Mma, Variant::Wgmma64, Variant::Wgmma128] {
            specs.push(fp8::skinny::spec_variant::<bf16>(m, variant));
        }
    }
    specs.push(fp8::spec::<f16>());
    specs.push(fp8::spec::<bf16>());
    specs.push(ops::ops_spec::<f16>());
    specs.push(ops::ops_spec::<bf16>());
    specs.push(ops::sampling_spec());
    for head_dim in [64, 128] {
        specs.push(kv_append::spec::<f16>(head_dim));
        specs.push(kv_append::spec::<bf16>(head_dim));
        specs.push(kv_append::spec_fp8::<bf16>(head_dim));
        // Llama's groups (8B: 4, 70B: 8) and MHA.
        for group in [1, 4, 8] {
            specs.push(sparse::spec::<f16>(head_dim, group));
            specs.push(sparse::spec::<bf16>(head_dim, group));
            specs.push(sparse::spec_fused::<f16>(head_dim, group));
            specs.push(sparse::spec_fused::<bf16>(head_dim, group));
        }
    }
    specs.sort_by_key(|s| s.label());
    specs
}

/// Relative error ‖out − ref‖ / ‖ref‖, with NaN/inf in `out` reported as infinite error.
pub fn relative_error<T: Element>(out: &[T], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "relative_error: length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (o, r) in out.iter().zip(reference) {
        let o = o.to_f64();
        if !o.is_finite() {
            return f64::INFINITY;
        }
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_flags_nan_and_measures_distance() {
        assert_eq!(relative_error(&[1.0f32, 2.0], &[1.0, 2.0]), 0.0);
        assert!(relative_error(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
        let e = relative_error(&[1.1f32, 0.0], &[1.0, 0.0]);
        assert!((e - 0.1).abs() < 1e-6);
    }

    #[test]
    fn catalog_sources_preprocess() {
        for spec in catalog() {
            radix_gpu::jit::preprocess(&spec.source, spec.headers).unwrap();
        }
    }
}

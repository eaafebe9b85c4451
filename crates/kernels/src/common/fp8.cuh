// Per-row FP8 (e4m3) quantization shared by the quantizer (fp8/fp8.cu) and the ops that
// fuse it into their output (RMSNorm, SiLU·mul in ops/ops.cu): one scale per row,
// scale = amax / 448 (1 for a row of zeros or a non-finite amax), q = e4m3(x * 448 / amax).
// Division and product are IEEE round-to-nearest, so every kernel and the CPU reference
// (fp8::quantize_rows_reference) give the same bytes.
#pragma once
#include "common/types.cuh"

constexpr float E4M3_MAX = 448.f;

// Two floats to two e4m3 bytes, `lo` in the low byte; rounded to nearest even, saturated
// to ±448 (NaN stays NaN). The conversion is hardware on sm_89 and later; the kernels
// that use it are only launched there.
__device__ __forceinline__ u16 e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
  u16 r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
#else
  __trap();
  return 0;
#endif
}

// Two e4m3 bytes (low byte first) as floats, exactly, through the f16x2 conversion.
__device__ __forceinline__ void e4m3x2_to_float(u32 v, float& lo, float& hi) {
#if __CUDA_ARCH__ >= 890
  u32 h2;
  asm("{.reg .b16 a;\n mov.b16 a, %1;\n cvt.rn.f16x2.e4m3x2 %0, a;}\n" : "=r"(h2) : "h"((u16)v));
  unpack2<half_t>(h2, lo, hi);
#else
  __trap();
  lo = hi = 0.f;
#endif
}

// The element type of a K/V pool: e4m3 bytes in an FP8 cache (KV_FP8), else elem_t.
#ifndef KV_FP8
#define KV_FP8 0
#endif
#if KV_FP8
typedef unsigned char kv_t;
#else
typedef elem_t kv_t;
#endif

// One e4m3 byte of `x` (round to nearest even, saturated; NaN stays NaN).
__device__ __forceinline__ unsigned char to_e4m3(float x) { return (unsigned char)(e4m3x2(x, 0.f) & 0xff); }

// The row's multiplier 448 / amax; its scale (amax / 448) goes to *scale. A row of zeros
// (or a non-finite amax) takes scale 1; a row whose amax is below 448 * 2^-100 takes scale
// 2^-100, so that 448 / amax cannot overflow to infinity (0 * inf would be NaN).
__device__ __forceinline__ float fp8_row_inv(float amax, float* scale) {
  const bool usable = amax > 0.f && amax <= 3.402823466e38f;  // not zero, not inf or NaN
  if (!usable) {
    *scale = 1.f;
    return 1.f;
  }
  if (amax < E4M3_MAX * 0x1p-100f) {
    *scale = 0x1p-100f;
    return 0x1p100f;
  }
  *scale = __fdiv_rn(amax, E4M3_MAX);
  return __fdiv_rn(E4M3_MAX, amax);
}

// Eight values, already scaled, as eight e4m3 bytes at `dst` (8-byte aligned).
__device__ __forceinline__ void store_e4m3x8_scaled(unsigned char* dst, const float (&s)[8]) {
  u32 w[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float* v = s + 4 * j;
    w[j] = (u32)e4m3x2(v[0], v[1]) | ((u32)e4m3x2(v[2], v[3]) << 16);
  }
  *(uint2*)dst = make_uint2(w[0], w[1]);
}

// Eight values times `inv` as eight e4m3 bytes at `dst` (8-byte aligned).
__device__ __forceinline__ void store_e4m3x8(unsigned char* dst, const float (&y)[8], float inv) {
  float s[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) s[e] = __fmul_rn(y[e], inv);
  store_e4m3x8_scaled(dst, s);
}

// The row's multiplier from this thread's part of its largest magnitude: the block's
// maximum (block_max; `scratch` 32 floats) through fp8_row_inv; thread 0 writes the scale
// to `*scale`.
__device__ __forceinline__ float fp8_block_row_inv(float amax, float* scratch, float* scale) {
  float s;
  const float inv = fp8_row_inv(block_max(amax, scratch), &s);
  if (threadIdx.x == 0) *scale = s;
  return inv;
}

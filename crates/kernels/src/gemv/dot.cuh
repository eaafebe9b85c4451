// Dot products of one 16-byte weight vector with x, f32 accumulation: the inner step of the
// decode GEMVs (gemv.cu, stream.cu).
#pragma once
#include "common/fp8.cuh"

// Eight 16-bit weights against eight 16-bit x values.
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  const u32 av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float a0, a1, b0, b1;
    unpack2<elem_t>(av[i], a0, a1);
    unpack2<elem_t>(bv[i], b0, b1);
    s = fmaf(a0, b0, fmaf(a1, b1, s));
  }
  return s;
}

// Sixteen e4m3 weights against sixteen 16-bit x values (two 16-byte vectors).
__device__ __forceinline__ float dot16_fp8(uint4 w, uint4 x0, uint4 x1) {
  const u32 wv[4] = {w.x, w.y, w.z, w.w};
  const u32 xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float w0, w1, w2, w3, a0, a1, a2, a3;
    e4m3x2_to_float(wv[i] & 0xffffu, w0, w1);
    e4m3x2_to_float(wv[i] >> 16, w2, w3);
    unpack2<elem_t>(xv[2 * i], a0, a1);
    unpack2<elem_t>(xv[2 * i + 1], a2, a3);
    s = fmaf(w0, a0, fmaf(w1, a1, fmaf(w2, a2, fmaf(w3, a3, s))));
  }
  return s;
}

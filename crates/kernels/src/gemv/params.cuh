// What the decode GEMVs (gemv.cu, stream.cu) share: their compile-time knobs, element types
// and parameter struct, the store of one output, and the dot products of dot.cuh.
#pragma once
#include "gemv/dot.cuh"

#ifndef M_ROWS
#define M_ROWS 1
#endif
#ifndef OUT_F32
#define OUT_F32 0
#endif
// W_FP8: the weight is e4m3 bytes with an f32 scale per row (an FP8 linear layer), x stays
// 16-bit: half the bytes of a 16-bit weight, no activation quantization.
#ifndef W_FP8
#define W_FP8 0
#endif

#if W_FP8
typedef unsigned char w_t;
#else
typedef elem_t w_t;
#endif
constexpr int VEC_ELEMS = 16 / sizeof(w_t);  // weights per 16-byte vector

#if OUT_F32
typedef float out_t;
#else
typedef elem_t out_t;
#endif

// Mirrors GemvParams in gemv/mod.rs.
struct GemvParams {
  const elem_t* x;        // [m_rows, k]
  const w_t* w;           // [n, k]
  out_t* out;             // [m_rows, n]
  const float* w_scales;  // W_FP8: [n]
  int m_rows;             // <= M_ROWS
  int n;
  int k;                  // gemv.cu: a multiple of VEC_ELEMS; stream.cu: of its warp span
  int rows_per_block;     // stream.cu: the launcher's split of the rows (gemv.cu: unused)
  const elem_t* norm_w;   // stream.cu X_SRC 1: the RMSNorm weight [k] (else unused)
  float eps;              // and its epsilon
  int accumulate;         // out += the product instead of out = (stream.cu; gemv.cu: 0)
};

static_assert(sizeof(GemvParams) == 64, "GemvParams mirrors gemv/mod.rs");

// out[m, row] = v, times the row's scale over FP8 weights, in the output's type; with
// `accumulate`, out[m, row] += it, rounded as the residual add of ops.cu stores it (the
// product in the output's type first, then the sum).
__device__ __forceinline__ void store_out(const GemvParams& p, int m, int row, float v) {
#if W_FP8
  v *= p.w_scales[row];
#endif
  out_t* at = p.out + (long long)m * p.n + row;
#if OUT_F32
  *at = p.accumulate ? *at + v : v;
#else
  *at = p.accumulate ? from_float<elem_t>(to_float(*at) + to_float(from_float<elem_t>(v))) : from_float<elem_t>(v);
#endif
}

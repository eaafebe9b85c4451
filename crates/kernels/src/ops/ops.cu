// The small ops of a Llama layer around the GEMMs and attention: embedding lookup, RMSNorm
// (alone, or fused with the residual add), SiLU·mul of the fused gate|up projection, and
// gathering the rows that need logits. Activations are elem_t, math in f32.
//
// Before an FP8 linear layer, RMSNorm and SiLU·mul also write their output as per-row
// e4m3 bytes and scales (q non-null; common/fp8.cuh): the values they store, quantized
// exactly as fp8/fp8.cu would, without a second pass over the activations.
#include "common/fp8.cuh"

struct EmbedParams {
  const elem_t* table;  // [vocab, hidden]
  const int* ids;       // [rows]
  elem_t* out;          // [rows, hidden]
  int rows;
  int hidden;
  int vocab;
  int reserved;
};

// grid rows, block 256: copies a row in 16-byte pieces (hidden % 8 == 0).
extern "C" __global__ void embed(const __grid_constant__ EmbedParams p) {
  pdl_wait();
  const int r = blockIdx.x;
  int id = p.ids[r];
  id = id < 0 ? 0 : (id >= p.vocab ? p.vocab - 1 : id);  // the host validated ids; never read out of bounds
  const vec16* src = (const vec16*)(p.table + (long long)id * p.hidden);
  vec16* dst = (vec16*)(p.out + (long long)r * p.hidden);
  for (int i = threadIdx.x; i < p.hidden / 8; i += blockDim.x) dst[i] = src[i];
}

struct NormParams {
  elem_t* residual;     // [rows, hidden]: updated in place when delta is set
  const elem_t* delta;  // [rows, hidden] or null (plain RMSNorm of residual)
  const elem_t* weight; // [hidden]
  elem_t* out;          // [rows, hidden]
  unsigned char* q;     // [rows, hidden] e4m3 of out, or null
  float* q_scales;      // [rows]
  int rows;
  int hidden;
  float eps;
  int reserved;
};

// (load8 and store8, the 16-byte vector helpers, are common/types.cuh's.)
constexpr int NORM_THREADS = 256;
constexpr int NORM_VECS = 4;  // 16-byte vectors per thread held in registers: hidden <= 8192

// grid rows, block 256. residual (+= delta, rounded to elem_t as the stream is stored),
// then out = residual / rms(residual) * weight. Rows of up to 8192 elements (a multiple of
// 8) stay in registers between the two passes, every load of the row (residual, delta,
// weight) issued before the first store (load_row_vecs); longer ones are read twice (and
// are never asked for FP8: the launcher quantizes them apart).
extern "C" __global__ void __launch_bounds__(NORM_THREADS) rms_norm(const __grid_constant__ NormParams p) {
  pdl_wait();
  __shared__ float scratch[32];
  const long long base = (long long)blockIdx.x * p.hidden;
  const int nvec = p.hidden / 8;
  if (p.hidden % 8 == 0 && nvec <= NORM_THREADS * NORM_VECS) {
    vec16 xr[NORM_VECS], dr[NORM_VECS], wr[NORM_VECS];
    load_row_vecs<NORM_VECS, NORM_THREADS>(p.residual + base, nvec, xr);
    if (p.delta) load_row_vecs<NORM_VECS, NORM_THREADS>(p.delta + base, nvec, dr);
    load_row_vecs<NORM_VECS, NORM_THREADS>(p.weight, nvec, wr);
    float x[NORM_VECS][8];
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
      const int v = threadIdx.x + j * NORM_THREADS;
      if (v >= nvec) break;
      unpack8(xr[j], x[j]);
      if (p.delta) {
        float d[8];
        unpack8(dr[j], d);
#pragma unroll
        for (int e = 0; e < 8; ++e) x[j][e] = to_float(from_float<elem_t>(x[j][e] + d[e]));  // as stored
        store8(p.residual + base + v * 8, x[j]);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) sq += x[j][e] * x[j][e];
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / p.hidden + p.eps);
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
      const int v = threadIdx.x + j * NORM_THREADS;
      if (v >= nvec) break;
      float w[8];
      unpack8(wr[j], w);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        x[j][e] = to_float(from_float<elem_t>(x[j][e] * inv * w[e]));  // as stored
        if (p.q) amax = fmaxf(amax, fabsf(x[j][e]));
      }
      store8(p.out + base + v * 8, x[j]);
    }
    if (p.q) {
      const float qinv = fp8_block_row_inv(amax, scratch, p.q_scales + blockIdx.x);
#pragma unroll
      for (int j = 0; j < NORM_VECS; ++j) {
        const int v = threadIdx.x + j * NORM_THREADS;
        if (v >= nvec) break;
        store_e4m3x8(p.q + base + v * 8, x[j], qinv);
      }
    }
    return;
  }
  float sq = 0.f;
  for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    float x = to_float(p.residual[base + i]);
    if (p.delta) {
      elem_t sum = from_float<elem_t>(x + to_float(p.delta[base + i]));
      p.residual[base + i] = sum;
      x = to_float(sum);
    }
    sq += x * x;
  }
  const float inv = rsqrtf(block_sum(sq, scratch) / p.hidden + p.eps);
  for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    // Each thread rereads only the elements it wrote itself.
    float x = to_float(p.residual[base + i]);
    p.out[base + i] = from_float<elem_t>(x * inv * to_float(p.weight[i]));
  }
}

struct SiluParams {
  const elem_t* gate_up;  // [rows, 2 * inter]: gate then up
  elem_t* out;            // [rows, inter]
  unsigned char* q;       // silu_mul_fp8: [rows, inter] e4m3 of out
  float* q_scales;        // [rows]
  int rows;
  int inter;
};

constexpr int SILU_FP8_THREADS = 512;
constexpr int SILU_FP8_VECS = 4;  // 16-byte vectors per thread in registers: inter <= 16384

// grid rows, block 512: silu_mul of one row kept in registers, then its e4m3 bytes and
// scale (inter a multiple of 8, at most 16384). Every load of the row goes out before the
// first store: with the store in the same loop (out may alias gate_up, as far as the
// compiler knows) each load waited for the last store, a round trip per vector, and at 93
// registers only two 256-thread blocks fit an SM: 63% of the copy rate at 8K rows.
extern "C" __global__ void __launch_bounds__(SILU_FP8_THREADS) silu_mul_fp8(const __grid_constant__ SiluParams p) {
  pdl_wait();
  __shared__ float scratch[32];
  const long long r = blockIdx.x;
  const int nvec = p.inter / 8;
  const elem_t* gate = p.gate_up + r * 2 * p.inter;
  const elem_t* up = gate + p.inter;
  vec16 g[SILU_FP8_VECS], u[SILU_FP8_VECS];
  load_row_vecs<SILU_FP8_VECS, SILU_FP8_THREADS>(gate, nvec, g);
  load_row_vecs<SILU_FP8_VECS, SILU_FP8_THREADS>(up, nvec, u);
  float y[SILU_FP8_VECS][8];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < SILU_FP8_VECS; ++j) {
    const int v = threadIdx.x + j * SILU_FP8_THREADS;
    if (v >= nvec) break;
    float gf[8], uf[8];
    unpack8(g[j], gf);
    unpack8(u[j], uf);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      y[j][e] = to_float(from_float<elem_t>(gf[e] / (1.f + __expf(-gf[e])) * uf[e]));  // as stored
      amax = fmaxf(amax, fabsf(y[j][e]));
    }
    store8(p.out + r * p.inter + v * 8, y[j]);
  }
  const float inv = fp8_block_row_inv(amax, scratch, p.q_scales + r);
#pragma unroll
  for (int j = 0; j < SILU_FP8_VECS; ++j) {
    const int v = threadIdx.x + j * SILU_FP8_THREADS;
    if (v >= nvec) break;
    store_e4m3x8(p.q + r * p.inter + v * 8, y[j], inv);
  }
}

// Eight outputs per thread when `inter` is a multiple of 8 (16-byte loads and stores).
extern "C" __global__ void silu_mul(const __grid_constant__ SiluParams p) {
  pdl_wait();
  if (p.inter % 8 == 0) {
    const long long vecs = (long long)p.rows * (p.inter / 8);
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < vecs; v += (long long)gridDim.x * blockDim.x) {
      long long r = v / (p.inter / 8), c = (v - r * (p.inter / 8)) * 8;
      float g[8], u[8], y[8];
      load8(p.gate_up + r * 2 * p.inter + c, g);
      load8(p.gate_up + r * 2 * p.inter + p.inter + c, u);
#pragma unroll
      for (int e = 0; e < 8; ++e) y[e] = g[e] / (1.f + __expf(-g[e])) * u[e];
      store8(p.out + r * p.inter + c, y);
    }
    return;
  }
  const long long n = (long long)p.rows * p.inter;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    long long r = i / p.inter, c = i - r * p.inter;
    float g = to_float(p.gate_up[r * 2 * p.inter + c]);
    float u = to_float(p.gate_up[r * 2 * p.inter + p.inter + c]);
    p.out[i] = from_float<elem_t>(g / (1.f + __expf(-g)) * u);
  }
}

struct GatherParams {
  const elem_t* x;  // [n, cols]
  const int* rows;  // [count]
  elem_t* out;      // [count, cols]
  int count;
  int cols;
};

extern "C" __global__ void gather_rows(const __grid_constant__ GatherParams p) {
  pdl_wait();
  const int i = blockIdx.x;
  const vec16* src = (const vec16*)(p.x + (long long)p.rows[i] * p.cols);
  vec16* dst = (vec16*)(p.out + (long long)i * p.cols);
  for (int c = threadIdx.x; c < p.cols / 8; c += blockDim.x) dst[c] = src[c];
}

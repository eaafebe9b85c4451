// Per-token FP8 quantization of the activations an FP8 GEMM reads (see common/fp8.cuh):
// each row of x (elem_t) becomes e4m3 bytes and one f32 scale, which the GEMM applies
// per row (cuBLASLt's outer-vector scaling). RMSNorm and SiLU·mul do the same fused into
// their output (ops.cu); this kernel serves every other input (the attention output).
#include "common/fp8.cuh"

struct QuantizeParams {
  const elem_t* x;  // [rows, cols]
  unsigned char* q; // [rows, cols] e4m3
  float* scales;    // [rows]
  int rows;
  int cols;         // a multiple of 8
};

constexpr int QUANT_THREADS = 256;

__device__ __forceinline__ float amax8(const vec16& v) {
  float y[8], m = 0.f;
  unpack8(v, y);
#pragma unroll
  for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(y[e]));
  return m;
}

// grid rows, block 256: one pass for the row's largest magnitude, one to write the bytes.
// Rows of up to QUANT_VECS 16-byte vectors a thread (8192 elements) stay in registers
// between the two, all their loads issued together; longer ones are read again (from
// L1/L2), a vector at a time.
constexpr int QUANT_VECS = 4;
extern "C" __global__ void __launch_bounds__(QUANT_THREADS)
quantize_rows(const __grid_constant__ QuantizeParams p) {
  pdl_wait();
  __shared__ float scratch[32];
  const long long base = (long long)blockIdx.x * p.cols;
  const vec16* x = (const vec16*)(p.x + base);
  const int nvec = p.cols / 8;
  float amax = 0.f;
  if (nvec <= QUANT_THREADS * QUANT_VECS) {
    vec16 xr[QUANT_VECS];
    load_row_vecs<QUANT_VECS, QUANT_THREADS>(p.x + base, nvec, xr);
#pragma unroll
    for (int j = 0; j < QUANT_VECS; ++j) {
      if (threadIdx.x + j * QUANT_THREADS < nvec) amax = fmaxf(amax, amax8(xr[j]));
    }
    const float inv = fp8_block_row_inv(amax, scratch, p.scales + blockIdx.x);
#pragma unroll
    for (int j = 0; j < QUANT_VECS; ++j) {
      const int i = threadIdx.x + j * QUANT_THREADS;
      if (i >= nvec) break;
      float y[8];
      unpack8(xr[j], y);
      store_e4m3x8(p.q + base + i * 8, y, inv);
    }
    return;
  }
  for (int i = threadIdx.x; i < nvec; i += QUANT_THREADS) amax = fmaxf(amax, amax8(x[i]));
  const float inv = fp8_block_row_inv(amax, scratch, p.scales + blockIdx.x);
  for (int i = threadIdx.x; i < nvec; i += QUANT_THREADS) {
    float y[8];
    unpack8(x[i], y);
    store_e4m3x8(p.q + base + i * 8, y, inv);
  }
}

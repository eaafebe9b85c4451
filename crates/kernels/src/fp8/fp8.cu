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

// grid rows, block 256: one pass for the row's largest magnitude, one to write the bytes
// (the row is at most a few tens of KB: the second read comes from L1/L2).
extern "C" __global__ void __launch_bounds__(QUANT_THREADS)
quantize_rows(const __grid_constant__ QuantizeParams p) {
  pdl_wait();
  __shared__ float scratch[32];
  const long long base = (long long)blockIdx.x * p.cols;
  const vec16* x = (const vec16*)(p.x + base);
  const int nvec = p.cols / 8;
  float amax = 0.f;
  for (int i = threadIdx.x; i < nvec; i += QUANT_THREADS) {
    vec16 v = x[i];
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float a, b;
      unpack2<elem_t>(w[j], a, b);
      amax = fmaxf(amax, fmaxf(fabsf(a), fabsf(b)));
    }
  }
  float scale;
  const float inv = fp8_row_inv(block_max(amax, scratch), &scale);
  if (threadIdx.x == 0) p.scales[blockIdx.x] = scale;
  for (int i = threadIdx.x; i < nvec; i += QUANT_THREADS) {
    vec16 v = x[i];
    float y[8];
    unpack2<elem_t>(v.x, y[0], y[1]);
    unpack2<elem_t>(v.y, y[2], y[3]);
    unpack2<elem_t>(v.z, y[4], y[5]);
    unpack2<elem_t>(v.w, y[6], y[7]);
    store_e4m3x8(p.q + base + i * 8, y, inv);
  }
}

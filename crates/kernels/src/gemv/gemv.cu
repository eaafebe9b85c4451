// Skinny GEMM for decode: out[m, n] = Σ_k x[m, k] · w[n, k] for a few rows m (M_ROWS, a
// compile-time 1, 2, 4 or 8; the launcher rounds up and `m_rows` masks the rest), w a
// Linear weight [N, K] row-major, f32 accumulation, out in the input dtype or f32.
//
// At batch 1 a decode step is its weights read once; cuBLASLt reached 86-87% of the copy
// bandwidth there on the H200 (bench/NOTES.md). Here a block owns ROWS weight rows and
// all its threads stride over K together in 16-byte chunks, so every thread has ROWS
// independent 16-byte weight loads in flight per step (UNROLL steps at a time) and the
// loads of a row are contiguous across the block; x is read through L1 (a few KB, shared
// by every block). Then a shuffle reduction per warp and one through shared memory.
//
// W_FP8 (params.cuh): a 16-byte load then holds 16 weights; the scale is applied once per
// output.
#include "gemv/params.cuh"

constexpr int M = M_ROWS;
constexpr int ROWS = 8;      // weight rows per block
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int UNROLL = M <= 2 ? 4 : 2;  // chunks per thread in flight, per row
static_assert(M == 1 || M == 2 || M == 4 || M == 8, "M_ROWS 1, 2, 4 or 8");

// Weights are read once: keep them out of L1.
__device__ __forceinline__ uint4 load_stream(const w_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

extern "C" __global__ void __launch_bounds__(THREADS) gemv(const __grid_constant__ GemvParams p) {
  pdl_wait();
  __shared__ float partial[WARPS][ROWS * M];
  const int n0 = blockIdx.x * ROWS;
  const int chunks = p.k / VEC_ELEMS;
  float acc[ROWS][M];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  // Rows past N read row N - 1 (in bounds) and are never written.
  const w_t* wrow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) wrow[r] = p.w + (long long)min(n0 + r, p.n - 1) * p.k;

  for (int c0 = threadIdx.x; c0 < chunks; c0 += THREADS * UNROLL) {
    uint4 wv[UNROLL][ROWS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = c0 + u * THREADS;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) wv[u][r] = c < chunks ? load_stream(wrow[r] + c * VEC_ELEMS) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = c0 + u * THREADS;
      if (c < chunks) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m < p.m_rows) {
#if W_FP8
            const uint4* xp = reinterpret_cast<const uint4*>(p.x + (long long)m * p.k) + 2 * c;
            const uint4 x0 = __ldg(xp), x1 = __ldg(xp + 1);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r][m] += dot16_fp8(wv[u][r], x0, x1);
#else
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(p.x + (long long)m * p.k) + c);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r][m] += dot8(wv[u][r], xv);
#endif
          }
        }
      }
    }
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0) partial[warp][r * M + m] = v;
    }
  __syncthreads();
  if (threadIdx.x < ROWS * M) {
    const int r = threadIdx.x / M, m = threadIdx.x % M;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += partial[w][threadIdx.x];
    if (n0 + r < p.n && m < p.m_rows) store_out(p, m, n0 + r, s);
  }
}


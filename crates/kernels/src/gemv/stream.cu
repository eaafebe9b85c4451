// Streaming GEMV for decode on Hopper: out[m, n] = Σ_k x[m, k] · w[n, k] for 1, 2 or 4 rows
// of x (M_ROWS), w a Linear weight [N, K] row-major, f32 accumulation; W_FP8 weights
// (params.cuh) are e4m3 bytes with a scale per row, half the bytes.
//
// Why another GEMV: at batch 1 a decode step is its weights read once, and the small
// products (q|k|v 6144 x 4096 and o 4096 x 4096 at Llama-3-8B: 32-50 MB) read at 55-65% of
// the copy bandwidth under cuBLASLt and under gemv.cu (bench/NOTES.md): hundreds of short
// blocks whose ramp, reduction and replacement leave the memory pipe idle, a few
// microseconds of each product's 8-12.
//
// Here each block owns a contiguous range of whole weight rows (the grid is about one block
// per SM), which is one contiguous byte range, and streams it through a ring of STAGES
// shared-memory stages with cp.async.bulk (plain bytes, no tensor map): a producer warp
// keeps STAGES x 32 KB in flight per SM from the first byte to the last, refilling each
// stage once all consumer warps have released it (full/empty mbarriers, so the consumers
// never wait for each other). The weights do not depend on the kernel before, so the
// first STAGES copies are issued before pdl_wait(): under programmatic dependent launch
// they load during the previous kernel's tail.
//
// A consumer warp takes 512 contiguous bytes of each stage per 16-byte vector of its lanes,
// four in all (1,024 16-bit or 2,048 e4m3 weights): a span, which lies in one row because K
// is a multiple of it (the launcher checks). Each span's warp sum goes to its own slot in
// shared memory, and a row's spans are added in a fixed order at the end: no atomics, so
// every run gives the same bits (graph replays equal eager runs).
//
// At batch 1 the small ops between the products cost more than their bytes: each is a
// launch whose chain (wait for the kernel before, load, reduce, store, drain) the next
// product waits behind. X_SRC takes them into the product (one row of x): every block
// builds x in shared memory after pdl_wait() while its first weight stages land,
//   X_SRC 1: x = RMSNorm(p.x) · p.norm_w (p.x the residual stream, k wide),
//   X_SRC 2: x = SiLU(gate) · up of p.x = [gate | up] (2k wide),
// each value rounded to elem_t as ops.cu stores it (the norm's sum of squares adds up in
// another order than ops.cu's block_sum: a value may differ by one ulp); and `accumulate`
// adds the product into out (the residual add). A block recomputes the whole row (4-14K values: a few
// loads a thread, from L2).
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "gemv/params.cuh"

#ifndef X_SRC
#define X_SRC 0
#endif

constexpr int M = M_ROWS;
static_assert(M == 1 || M == 2 || M == 4, "M_ROWS 1, 2 or 4");
static_assert(X_SRC == 0 || M == 1, "x built in the kernel: one row");
constexpr int CWARPS = 16;                    // consumer warps
constexpr int THREADS = 32 * (CWARPS + 1);    // and one producer warp
constexpr int VEC_PER_LANE = 4;               // 16-byte vectors per lane and stage
constexpr int WARP_ELEMS = 32 * VEC_PER_LANE * VEC_ELEMS;  // weights per warp and stage
constexpr int STAGE_BYTES = CWARPS * 32 * VEC_PER_LANE * 16;  // 32 KB
constexpr int STAGE_ELEMS = STAGE_BYTES / (int)sizeof(w_t);
constexpr int STAGES = 4;                     // 128 KB in flight per block

// Dynamic shared memory: STAGES stages, then the span sums, then the stages' full and empty
// barriers.
__device__ __forceinline__ int sums_offset() { return STAGES * STAGE_BYTES; }
__device__ __forceinline__ int bars_offset(int spans) { return sums_offset() + ((spans * M * 4 + 15) / 16) * 16; }
// X_SRC: the row of x the block builds, behind the barriers.
__device__ __forceinline__ int x_offset(int spans) { return bars_offset(spans) + STAGES * 16; }

#if X_SRC
// The row of x into `xs` (shared memory) by the consumer threads (`tid` < CWARPS * 32), as
// ops.cu's rms_norm / silu_mul would store it; `red` holds CWARPS floats. Ends with the
// consumers' barrier: xs is complete after it.
__device__ void build_x(const GemvParams& p, elem_t* xs, float* red, int tid) {
  const int nvec = p.k / 8;
  constexpr int T = CWARPS * 32;
#if X_SRC == 1
  float sq = 0.f;
  for (int v = tid; v < nvec; v += T) {
    float f[8];
    load8(p.x + v * 8, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) sq += f[e] * f[e];
  }
  sq = warp_sum(sq);
  if (tid % 32 == 0) red[tid / 32] = sq;
  named_bar_sync<1, T>();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < CWARPS; ++w) total += red[w];
  const float inv = rsqrtf(total / p.k + p.eps);
  for (int v = tid; v < nvec; v += T) {
    float f[8], g[8];
    load8(p.x + v * 8, f);
    load8(p.norm_w + v * 8, g);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = f[e] * inv * g[e];
    store8(xs + v * 8, f);
  }
#else
  for (int v = tid; v < nvec; v += T) {
    float g[8], u[8];
    load8(p.x + v * 8, g);
    load8(p.x + p.k + v * 8, u);
#pragma unroll
    for (int e = 0; e < 8; ++e) g[e] = g[e] / (1.f + __expf(-g[e])) * u[e];
    store8(xs + v * 8, g);
  }
#endif
  named_bar_sync<1, T>();
}
#endif

// A 16-byte vector of x: from shared memory when the block built it, else through the
// read-only path.
__device__ __forceinline__ uint4 load_x(const uint4* at) {
#if X_SRC
  return *at;
#else
  return __ldg(at);
#endif
}

__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// The producer warp's lane 0: keeps every stage filled, each refill after all consumer
// warps have released the stage. The first STAGES copies need no release.
__device__ __forceinline__ void produce(const char* src, long long bytes, int chunks, u32 stages, u32 full, u32 empty,
                                        int first) {
  for (int c = first; c < chunks; ++c) {
    const int s = c % STAGES;
    if (c >= STAGES) mbar_wait(empty + s * 8, ((c / STAGES) - 1) & 1);
    const u32 n = (u32)min((long long)STAGE_BYTES, bytes - (long long)c * STAGE_BYTES);
    mbar_arrive_expect_tx(full + s * 8, n);
    bulk_copy(stages + s * STAGE_BYTES, src + (long long)c * STAGE_BYTES, n, full + s * 8);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) gemv_stream(const __grid_constant__ GemvParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int r0 = min(blockIdx.x * p.rows_per_block, p.n);
  const int rows = min(p.rows_per_block, p.n - r0);
  const char* src = reinterpret_cast<const char*>(p.w + (long long)r0 * p.k);
  const long long bytes = (long long)rows * p.k * sizeof(w_t);
  const int chunks = (int)((bytes + STAGE_BYTES - 1) / STAGE_BYTES);
  const u32 stages = smem_addr(smem);
  const int row_spans = p.k / WARP_ELEMS;
  const u32 full = stages + bars_offset(p.rows_per_block * row_spans), empty = full + STAGES * 8;
  float* sums = reinterpret_cast<float*>(smem + sums_offset());  // [span][M]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Weights only until pdl_wait: they do not depend on the previous kernel.
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + s * 8, 1);
      mbar_init(empty + s * 8, CWARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    produce(src, bytes, min(STAGES, chunks), stages, full, empty, 0);
  }
  __syncthreads();
  if (warp == CWARPS) {
    if (lane == 0) produce(src, bytes, chunks, stages, full, empty, STAGES);
    return;
  }
  pdl_wait();
#if X_SRC
  __shared__ float red[CWARPS];
  elem_t* xs = reinterpret_cast<elem_t*>(smem + x_offset(p.rows_per_block * row_spans));
  build_x(p, xs, red, threadIdx.x);
  const elem_t* x = xs;
#else
  const elem_t* x = p.x;
#endif

  for (int c = 0; c < chunks; ++c) {
    const int s = c % STAGES;
    mbar_wait(full + s * 8, (c / STAGES) & 1);
    // This warp's span of the stage, relative to the block's first element.
    const long long e0 = (long long)c * STAGE_ELEMS + warp * WARP_ELEMS;
    if (e0 < (long long)rows * p.k) {  // uniform over the warp: spans are whole or absent
      const int span_id = (int)(e0 / WARP_ELEMS);  // every span of the block is one warp's once
      const int row = (int)(e0 / p.k);
      const int k0 = (int)(e0 - (long long)row * p.k);
      const uint4* span = reinterpret_cast<const uint4*>(smem + s * STAGE_BYTES + warp * WARP_ELEMS * (int)sizeof(w_t));
      uint4 wv[VEC_PER_LANE];
#pragma unroll
      for (int u = 0; u < VEC_PER_LANE; ++u) wv[u] = span[u * 32 + lane];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m < p.m_rows) {
          float part[VEC_PER_LANE];
#if W_FP8
          // Sixteen x values (two vectors) per weight vector.
          const uint4* xp = reinterpret_cast<const uint4*>(x + (long long)m * p.k + k0) + 2 * lane;
          uint4 xv[VEC_PER_LANE][2];
#pragma unroll
          for (int u = 0; u < VEC_PER_LANE; ++u) {
            xv[u][0] = load_x(xp + u * 64);
            xv[u][1] = load_x(xp + u * 64 + 1);
          }
#pragma unroll
          for (int u = 0; u < VEC_PER_LANE; ++u) part[u] = dot16_fp8(wv[u], xv[u][0], xv[u][1]);
#else
          const uint4* xp = reinterpret_cast<const uint4*>(x + (long long)m * p.k + k0) + lane;
          uint4 xv[VEC_PER_LANE];
#pragma unroll
          for (int u = 0; u < VEC_PER_LANE; ++u) xv[u] = load_x(xp + u * 32);
#pragma unroll
          for (int u = 0; u < VEC_PER_LANE; ++u) part[u] = dot8(wv[u], xv[u]);
#endif
          const float v = warp_sum((part[0] + part[1]) + (part[2] + part[3]));
          if (lane == 0) sums[span_id * M + m] = v;
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + s * 8);
  }
  named_bar_sync<1, CWARPS * 32>();  // every span's sum is in
  for (int i = threadIdx.x; i < rows * M; i += CWARPS * 32) {
    const int r = i / M, m = i % M;
    if (m < p.m_rows) {
      float v = 0.f;
      for (int q = 0; q < row_spans; ++q) v += sums[(r * row_spans + q) * M + m];  // in order
      store_out(p, m, r0 + r, v);
    }
  }
}


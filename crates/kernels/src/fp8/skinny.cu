// Skinny FP8 GEMM for decode steps: out[m, n] = xs[m] · ws[n] · Σ_k xq[m, k] · wq[n, k]
// (+ bias[n]) for up to 64 rows m, xq the activations quantized per token (e4m3, scale
// xs[m]) and wq a Linear weight [N, K] in e4m3 with a scale per row ws[n].
//
// Why not cuBLASLt: at 1-64 rows its FP8 kernels read the weights at 26-64% of the copy
// bandwidth on the H200, where a decode step is its weights read once. Measured there,
// this kernel wins up to 8 rows (1.01-1.7x back to back) and loses beyond: Hopper runs
// FP8 mma.sync as f16 HMMAs behind F2FP conversions, and the activations' conversions
// repeat for every warp's 16 weight rows (bench/NOTES.md), so the engine uses it up to 8.
// On Hopper a WGMMA variant (below) runs the same blocks on the FP8 tensor cores: there it
// beat both the mma.sync variant and cuBLASLt up to 16 rows and is the engine's choice
// (skinny::engine_variant).
//
// Roles are swapped against the usual GEMM: the weight rows are the MMA's 16-row A
// operand and the tokens its 8 columns (mma.sync m16n8k32 e4m3 → f32), so a decode step
// of one token wastes only MMA lanes, never weight bytes. A warp owns 16 weight rows over
// the block's K range, a block 64 rows (4 warps) sharing the activations through L1, and
// blocks split K (grid.y) when the rows alone do not fill the GPU: each split writes f32
// partial sums and the last block of a row group to finish adds them up (a counter per
// row group, reset by that block, so the kernel needs no second launch and replays in a
// CUDA graph). On Hopper (wgmma variant, `cluster_sum`) the splits of a row group are
// instead one thread-block cluster along grid.x: each leaves its sums in its own shared
// memory and, after a cluster barrier, block y adds up slice y of the outputs from every
// split's shared memory. No partial sums go through global memory (at 64 rows and 8
// splits they were half the weights' bytes) and no counters.
//
// Loads: a dot product does not care in which order its k terms come, as long as both
// operands use the same order. So a thread loads 16 consecutive bytes of its weight row
// (and of its token's activations) per 64-byte K segment, and hands the four words to two
// MMAs as their k-slots (4c..4c+3 and 16+4c..16+4c+3 of each k32 step, c = lane % 4):
// full 16-byte loads, no shuffles, no shared memory. U segments are in flight per thread,
// double-buffered in registers.
#include "common/cluster.cuh"
#include "common/fp8.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"

#ifndef N_TILES
#define N_TILES 1  // 8-token MMA columns: up to 8 * N_TILES rows of x
#endif
constexpr int NT = N_TILES;
// WG (wgmma only): warpgroups a block, each 64 weight rows against the same tokens. Two
// halve the token bytes a block reads per weight byte (at 64 tokens, 64-row blocks read
// as many token bytes as weight bytes) and the split-K partial sums a launch writes.
#ifndef WG
#define WG 1
#endif
constexpr int WARPS = 4 * WG;
constexpr int THREADS = WARPS * 32;
constexpr int BLOCK_ROWS = 16 * WARPS;  // weight rows per block
constexpr int MAX_SPLITS = 16;          // K splits a launch at most (mirrors skinny.rs)
// WGMMA (sm_90a): the same block of 64 weight rows on Hopper's FP8 tensor cores (no
// conversions: wgmma m64nNk32 e4m3, N the 8 * N_TILES tokens), the weight rows and the
// tokens staged through shared memory in K steps of 128 bytes (one 128-byte swizzled row
// each) by cp.async, STAGES deep; the accumulators have mma.sync's m16n8 layout per warp,
// so the epilogue below serves both.
#ifndef WGMMA
#define WGMMA 0
#endif
static_assert(WG == 1 || (WGMMA && WG == 2), "two warpgroups a block in the wgmma variant only");
static_assert(NT == 1 || NT == 2 || NT == 4 || NT == 8, "N_TILES 1, 2, 4 or 8");
#if !WGMMA
constexpr int SEG = 64;  // K bytes of one warp step: two k32 MMAs
constexpr int U = 4;     // segments per thread in flight
#endif

// Mirrors SkinnyParams in fp8/skinny.rs.
struct SkinnyParams {
  const unsigned char* x;   // [m, k] e4m3
  const float* x_scales;    // [m]
  const unsigned char* w;   // [n, k] e4m3
  const float* w_scales;    // [n]
  const elem_t* bias;       // [n], or null
  elem_t* out;              // [m, n]
  float* partial;           // [gridDim.y, m, n] f32, when K is split
  int* counters;            // [gridDim.x], zero between launches, when K is split
  int m;                    // <= 8 * NT
  int n;
  int k;                    // a multiple of SEG
  int k_split;              // K bytes per split (a multiple of SEG)
  int cluster_sum;          // splits along grid.x, one cluster (wgmma only); else grid.y
  int reserved;
};

__device__ __forceinline__ void mma_e4m3(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Weights are read once: keep them out of L1 (the activations live there).
__device__ __forceinline__ uint4 load_stream(const unsigned char* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The first `splits` of a (row group, token)'s per-split sums, added in split order (both
// ways of summing the splits give the same bits).
__device__ __forceinline__ float4 add_in_split_order(const float4 (&v)[MAX_SPLITS], int splits) {
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int y = 0; y < MAX_SPLITS; ++y) {
    if (y < splits) {
      sum.x += v[y].x;
      sum.y += v[y].y;
      sum.z += v[y].z;
      sum.w += v[y].w;
    }
  }
  return sum;
}

// The block's result for (token m, weight row f) from the raw sum: scales, bias, dtype.
__device__ __forceinline__ void store_out(const SkinnyParams& p, int m, int f, float s) {
  s *= p.x_scales[m] * p.w_scales[f];
  if (p.bias) s += to_float(p.bias[f]);
  p.out[(long long)m * p.n + f] = from_float<elem_t>(s);
}

#if WGMMA
constexpr int KB = 128;                      // K bytes of one stage
constexpr int TOK = 8 * NT;                  // wgmma N: token columns
constexpr int W_BYTES = BLOCK_ROWS * KB;     // a stage's weight rows
constexpr int STAGE_BYTES = W_BYTES + TOK * KB;
// Four stages in dynamic shared memory (36-64 KiB, 68-96 KiB with two warpgroups;
// skinny.rs asks for 1 KiB more to align them): three in flight, 24 KiB of weights a
// block (48 KiB).
constexpr int STAGES = 4;
static_assert(STAGE_BYTES % 1024 == 0, "stages start on 1024-byte swizzle atoms");

// D (+)= A B: A = 64 weight rows x 32 K bytes, B = N tokens x 32 K bytes, both K-major
// from 128-byte-swizzled shared memory (e4m3 takes no transposes); scale_d = 0 overwrites D.
template <int N> __device__ __forceinline__ void wgmma_e4m3(float (&d)[N / 2], u64 a, u64 b, int scale_d);
template <> __device__ __forceinline__ void wgmma_e4m3<8>(float (&d)[4], u64 a, u64 b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, %4, %5, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "l"(a), "l"(b), "r"(scale_d));
}
template <> __device__ __forceinline__ void wgmma_e4m3<16>(float (&d)[8], u64 a, u64 b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(a), "l"(b), "r"(scale_d));
}
template <> __device__ __forceinline__ void wgmma_e4m3<32>(float (&d)[16], u64 a, u64 b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b), "r"(scale_d));
}
template <> __device__ __forceinline__ void wgmma_e4m3<64>(float (&d)[32], u64 a, u64 b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(scale_d));
}

// Stage `step` (K bytes [kb + step * KB, + KB)) of the block's weight rows (rows past N read
// row N - 1, never stored) into `base`.
__device__ __forceinline__ void load_stage_weights(const SkinnyParams& p, u32 base, int f_block, int k0) {
#pragma unroll
  for (int i = threadIdx.x; i < BLOCK_ROWS * 8; i += THREADS) {
    const int r = i / 8, ch = i % 8;
    const unsigned char* src = p.w + (long long)min(f_block + r, p.n - 1) * p.k + k0 + ch * 16;
    cp_async_16(base + r * KB + ((ch ^ (r & 7)) << 4), src, true);
  }
}

// The same stage of the tokens (rows past m read as zeros), behind the weights.
__device__ __forceinline__ void load_stage_tokens(const SkinnyParams& p, u32 base, int k0) {
#pragma unroll
  for (int i = threadIdx.x; i < TOK * 8; i += THREADS) {
    const int r = i / 8, ch = i % 8;
    const unsigned char* src = p.x + (long long)min(r, p.m - 1) * p.k + k0 + ch * 16;
    cp_async_16(base + W_BYTES + r * KB + ((ch ^ (r & 7)) << 4), src, r < p.m);
  }
}

// Row pitch (floats) of a block's sums in shared memory for the cluster sum: 4 more than
// the weight rows, so a warp's stores (8 rows x 4 token pairs) hit 32 banks.
constexpr int SUM_PITCH = BLOCK_ROWS + 4;
static_assert(TOK * SUM_PITCH * 4 <= STAGES * STAGE_BYTES, "the sums fit in the stages");
#endif

extern "C" __global__ void __launch_bounds__(THREADS) fp8_gemm_skinny(const __grid_constant__ SkinnyParams p) {
#if !WGMMA
  pdl_wait();
#endif
  __shared__ int last_split;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  // Row group and split: grid.x and .y, swapped under the cluster sum (clusters run along
  // x).
  const bool by_cluster = WGMMA && p.cluster_sum;
  const int group = by_cluster ? blockIdx.y : blockIdx.x;
  const int split = by_cluster ? blockIdx.x : blockIdx.y;
  const int splits = by_cluster ? gridDim.x : gridDim.y;
  const int f0 = group * BLOCK_ROWS + warp * 16;
  const int kb = split * p.k_split;
#if WGMMA
  extern __shared__ unsigned char dyn_smem[];
  const u32 s0 = (smem_addr(dyn_smem) + 1023u) & ~1023u;  // the swizzle atoms' alignment
  const int f_block = group * BLOCK_ROWS;
  const int steps = max(0, min(p.k_split, p.k - kb)) / KB;
  // Each stage's 128 K bytes accumulate in the tensor cores (d), then into f32 here
  // (acc): Hopper's FP8 wgmma keeps fewer bits than f32 while it accumulates, so a chain
  // over all of K (448 steps of 32 at K = 14336) would lose precision.
  float d[NT * 4], acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
  // The first stages' weights depend on no kernel before: under programmatic dependent
  // launch they load during its tail (the quantized tokens, which it writes, after
  // pdl_wait()). They join commit group 0, so stage s is in when groups 0..s are.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) load_stage_weights(p, s0 + s * STAGE_BYTES, f_block, kb + s * KB);
  }
  pdl_wait();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) load_stage_tokens(p, s0 + s * STAGE_BYTES, kb + s * KB);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    // Stage `step` has landed for every thread, and every thread's wgmmas of step - 1 are
    // done: its buffer takes step + STAGES - 1.
    cp_async_wait<STAGES - 2>();
    fence_proxy_async();
    __syncthreads();
    const int next = step + STAGES - 1;
    if (next < steps) {
      load_stage_weights(p, s0 + (next % STAGES) * STAGE_BYTES, f_block, kb + next * KB);
      load_stage_tokens(p, s0 + (next % STAGES) * STAGE_BYTES, kb + next * KB);
    }
    cp_async_commit();
    const u32 base = s0 + (step % STAGES) * STAGE_BYTES;
    const u32 rows = base + (warp / 4) * 64 * KB;  // this warpgroup's 64 weight rows
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KB / 32; ++kk) {
      const u64 a = wgmma_desc(rows + kk * 32, 16, 1024), b = wgmma_desc(base + W_BYTES + kk * 32, 16, 1024);
      wgmma_e4m3<TOK>(d, a, b, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_regs(d);  // (the compiler cannot see the asynchronous write)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[t][i] += d[4 * t + i];
  }
#else
  const int segs = max(0, min(p.k_split, p.k - kb)) / SEG;
  // Rows past N read row N - 1 (in bounds) and are never written.
  const unsigned char* w_lo = p.w + (long long)min(f0 + g, p.n - 1) * p.k + kb + 16 * c;
  const unsigned char* w_hi = p.w + (long long)min(f0 + g + 8, p.n - 1) * p.k + kb + 16 * c;
  // Token t * 8 + g's activations; tokens past m contribute zeros (their columns of the
  // result are never stored either).
  const unsigned char* xrow[NT];
  bool has_row[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    has_row[t] = t * 8 + g < p.m;
    xrow[t] = p.x + (long long)min(t * 8 + g, p.m - 1) * p.k + kb + 16 * c;
  }

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;

  uint4 lo[U], hi[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    lo[u] = u < segs ? load_stream(w_lo + u * SEG) : make_uint4(0, 0, 0, 0);
    hi[u] = u < segs ? load_stream(w_hi + u * SEG) : make_uint4(0, 0, 0, 0);
  }
  for (int s0 = 0; s0 < segs; s0 += U) {
    uint4 cur_lo[U], cur_hi[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      cur_lo[u] = lo[u];
      cur_hi[u] = hi[u];
    }
    // The next U segments' weights go out before this group's MMAs.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + U + u;
      if (s < segs) {
        lo[u] = load_stream(w_lo + s * SEG);
        hi[u] = load_stream(w_hi + s * SEG);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u;
      if (s < segs) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          uint4 xv = make_uint4(0, 0, 0, 0);
          if (has_row[t]) xv = __ldg(reinterpret_cast<const uint4*>(xrow[t] + s * SEG));
          mma_e4m3(acc[t], cur_lo[u].x, cur_hi[u].x, cur_lo[u].y, cur_hi[u].y, xv.x, xv.y);
          mma_e4m3(acc[t], cur_lo[u].z, cur_hi[u].z, cur_lo[u].w, cur_hi[u].w, xv.z, xv.w);
        }
      }
    }
  }
#endif

  // acc[t] holds rows f0 + g (0, 1) and f0 + g + 8 (2, 3), tokens t * 8 + 2c (0, 2) and
  // t * 8 + 2c + 1 (1, 3).
  if (splits == 1) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = t * 8 + 2 * c + (i & 1), f = f0 + g + 8 * (i >> 1);
        if (m < p.m && f < p.n) store_out(p, m, f, acc[t][i]);
      }
    return;
  }
  const int row0 = group * BLOCK_ROWS;
  const int rows = min(BLOCK_ROWS, p.n - row0);
#if WGMMA
  if (by_cluster) {
    // Every warpgroup is done with the stages: the sums go where they were.
    __syncthreads();
    float* sums = reinterpret_cast<float*>(dyn_smem + (s0 - smem_addr(dyn_smem)));
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        sums[(t * 8 + 2 * c + (i & 1)) * SUM_PITCH + warp * 16 + g + 8 * (i >> 1)] = acc[t][i];
    cluster_sync();
    // Block `split` adds up every splits-th item of four rows, all splits' loads issued
    // together, added in split order.
    for (int i = split * THREADS + threadIdx.x; i < p.m * (BLOCK_ROWS / 4); i += splits * THREADS) {
      const int m = i / (BLOCK_ROWS / 4), r = (i % (BLOCK_ROWS / 4)) * 4;
      if (r >= rows) continue;
      const float* at = sums + m * SUM_PITCH + r;
      float4 v[MAX_SPLITS];
#pragma unroll
      for (int y = 0; y < MAX_SPLITS; ++y) {
        if (y < splits) v[y] = ld_cluster_f4(in_rank(at, y));
      }
      const float4 sum = add_in_split_order(v, splits);
      const int f = row0 + r;
      store_out(p, m, f, sum.x);
      if (r + 1 < rows) store_out(p, m, f + 1, sum.y);
      if (r + 2 < rows) store_out(p, m, f + 2, sum.z);
      if (r + 3 < rows) store_out(p, m, f + 3, sum.w);
    }
    // A block's shared memory stays until every block of the cluster has read it.
    cluster_sync();
    return;
  }
#endif
  float* part = p.partial + (long long)split * p.m * p.n;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = t * 8 + 2 * c + (i & 1), f = f0 + g + 8 * (i >> 1);
      if (m < p.m && f < p.n) part[(long long)m * p.n + f] = acc[t][i];
    }
  // Publish this split's partials, then count it; the last split of the row group sums.
  int* counter = p.counters + group;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int done = atomicAdd(counter, 1);
    last_split = done == splits - 1;
  }
  __syncthreads();
  if (!last_split) return;
  __threadfence();
  const long long plane = (long long)p.m * p.n;  // one split's partial sums
  if ((p.n & 3) == 0) {
    // Four rows an item (16-byte loads; rows and row0 are multiples of 4 here), every
    // split's load of an item issued together (unrolled to MAX_SPLITS, predicated), then
    // added in split order: the same bits as the one-at-a-time loop below. That loop kept
    // each load a round trip apart (a runtime trip count, and the store between outputs
    // that the compiler cannot move a later load above), which grew with the rows: most
    // of a 64-row launch's time.
    for (int i = threadIdx.x; i < p.m * (BLOCK_ROWS / 4); i += THREADS) {
      const int m = i / (BLOCK_ROWS / 4), r = (i % (BLOCK_ROWS / 4)) * 4;
      if (r >= rows) continue;
      const float* src = p.partial + (long long)m * p.n + row0 + r;
      float4 v[MAX_SPLITS];
#pragma unroll
      for (int y = 0; y < MAX_SPLITS; ++y) {
        if (y < splits) v[y] = __ldcg(reinterpret_cast<const float4*>(src + y * plane));
      }
      const float4 sum = add_in_split_order(v, splits);
      store_out(p, m, row0 + r, sum.x);
      store_out(p, m, row0 + r + 1, sum.y);
      store_out(p, m, row0 + r + 2, sum.z);
      store_out(p, m, row0 + r + 3, sum.w);
    }
  } else {
    for (int i = threadIdx.x; i < p.m * BLOCK_ROWS; i += THREADS) {
      const int m = i / BLOCK_ROWS, r = i % BLOCK_ROWS;
      if (r >= rows) continue;
      const long long at = (long long)m * p.n + row0 + r;
      float s = 0.f;
      for (int y = 0; y < splits; ++y) s += __ldcg(p.partial + y * plane + at);
      store_out(p, m, row0 + r, s);
    }
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next launch
}

static_assert(sizeof(SkinnyParams) == 88, "SkinnyParams mirrors fp8/skinny.rs");

// Microbenchmark of page-scoring variants (nvcc on the GPU machine; bench/NOTES.md has
// the story). Llama-3-8B heads, B=32 x 32K tokens, pages shuffled, L2 flushed per run.
// The kernel shipped before (copied below, bf16 bounds) beside variants that
// read either the old bf16 bounds [lo bf16 x D][hi bf16 x D] or int8 records
// [lo i8 x D][hi i8 x D][exponent i32, padded to 16 B] (one exponent per record here; the
// shipped format has one per 8 dims).
//   nvcc -O3 -arch=sm_90a -std=c++17 -DDTYPE=RS_BF16 -I crates/kernels/src \
//        bench/micro/page_scores_int8.cu -o /tmp/psb && /tmp/psb
// H100, 2026-11-25 (median of 50): bf16 shipped 128-131 us; int8, same loop 125 us;
// group folded into P/N: bf16 110 us, int8 84 us; + transposed warp sums: bf16 119, int8
// 100; cp.async-streamed page records: bf16 140-170, int8 120-140; unroll 16: spills.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
#include <cmath>
#include <cstring>
#include "common/types.cuh"
#include "common/mma.cuh"

// ---- The scoring kernel as shipped before this experiment (bf16 bounds), verbatim ----
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GROUP
#define GROUP 4
#endif
constexpr int D = HEAD_DIM;
constexpr int PER_LANE = D / 32;  // 4 or 2 dims per lane
static_assert(D == 64 || D == 128, "head_dim 64 or 128");
static_assert(GROUP >= 1 && GROUP <= 16, "GQA group of 1..=16 query heads");

// Mirrors ScoreParams in sparse/mod.rs.
struct ScoreParams {
  const elem_t* q;         // [tokens, q_stride]; query head h at h * D (rotated)
  const elem_t* bounds;    // [pages, Hkv, 2, D]: min then max
  float* scores;           // [Hkv, kv_indptr[batch]] (head-major)
  const int* qo_indptr;    // [batch + 1]; a sequence's query is its last token
  const int* kv_indptr;    // [batch + 1] dense page table
  const int* kv_indices;
  const int* keep;         // [batch] pages to keep; <= 0 or >= pages: dense (no scores)
  long long q_stride;
  int batch;
  int num_kv_heads;
  int group;               // must equal GROUP (checked on the host)
  int reserved;
};

template <int N> struct Vec;
template <> struct Vec<4> { typedef uint2 type; };
template <> struct Vec<2> { typedef u32 type; };

__device__ __forceinline__ void load_lane(const elem_t* src, float (&out)[PER_LANE]) {
  typedef typename Vec<PER_LANE>::type V;
  V v = *reinterpret_cast<const V*>(src);
  const u32* w = reinterpret_cast<const u32*>(&v);
#pragma unroll
  for (int i = 0; i < PER_LANE / 2; ++i) unpack2<elem_t>(w[i], out[2 * i], out[2 * i + 1]);
}

// The sequence owning flat page f of the dense table: the last b with kv_indptr[b] <= f.
__device__ __forceinline__ int owner(const int* indptr, int batch, int f) {
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (indptr[mid] <= f) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// A warp scores 32 consecutive pages of the flat table for one kv head: each lane looks
// up one page's id and owner (in parallel), then the warp walks the pages SCORE_UNROLL at
// a time, issuing all their bound loads before using any (the pass is bandwidth-bound).
// GROUP is a compile-time constant so the group's queries live in registers, kept while
// consecutive pages share a sequence.
constexpr int SCORE_UNROLL = 8;

// Four blocks per SM (at most 64 registers a thread): the pass is latency-bound below
// that (measured: 88 registers allowed two blocks, 16 warps per SM, 1.3 TB/s).
__global__ void __launch_bounds__(256, 4) page_scores(const __grid_constant__ ScoreParams p) {
  typedef typename Vec<PER_LANE>::type V;
  const int lane = threadIdx.x % 32;
  const int pages_total = p.kv_indptr[p.batch];
  const int chunks = (pages_total + 31) / 32;
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  const long long items = (long long)chunks * p.num_kv_heads;
  for (long long item = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; item < items; item += warps) {
    const int chunk = (int)(item / p.num_kv_heads), kvh = (int)(item - (long long)chunk * p.num_kv_heads);
    const int f0 = chunk * 32;
    // Lane i: page f0 + i, its sequence (-1: none, or dense) and page id.
    int my_b = -1, my_page = 0;
    if (f0 + lane < pages_total) {
      const int b = owner(p.kv_indptr, p.batch, f0 + lane);
      const int keep = p.keep[b];
      if (keep > 0 && keep < p.kv_indptr[b + 1] - p.kv_indptr[b]) {  // sparse rows only
        my_b = b;
        my_page = p.kv_indices[f0 + lane];
      }
    }
    if (__ballot_sync(0xffffffffu, my_b >= 0) == 0) continue;
    int cur_b = -1;
    float q[GROUP][PER_LANE];
    for (int j0 = 0; j0 < 32; j0 += SCORE_UNROLL) {
      V lo_raw[SCORE_UNROLL], hi_raw[SCORE_UNROLL];
      int seq[SCORE_UNROLL];
#pragma unroll
      for (int u = 0; u < SCORE_UNROLL; ++u) {
        seq[u] = __shfl_sync(0xffffffffu, my_b, j0 + u);
        const long long page = __shfl_sync(0xffffffffu, my_page, j0 + u);
        if (seq[u] < 0) continue;  // uniform over the warp
        const elem_t* bp = p.bounds + (page * p.num_kv_heads + kvh) * 2 * D + lane * PER_LANE;
        lo_raw[u] = *reinterpret_cast<const V*>(bp);
        hi_raw[u] = *reinterpret_cast<const V*>(bp + D);
      }
#pragma unroll
      for (int u = 0; u < SCORE_UNROLL; ++u) {
        if (seq[u] < 0) continue;
        if (seq[u] != cur_b) {  // a new sequence: its group's queries
          cur_b = seq[u];
          const elem_t* qp = p.q + (long long)(p.qo_indptr[cur_b + 1] - 1) * p.q_stride +
                             (long long)kvh * GROUP * D + lane * PER_LANE;
#pragma unroll
          for (int g = 0; g < GROUP; ++g) load_lane(qp + g * D, q[g]);
        }
        float lo[PER_LANE], hi[PER_LANE];
        const u32* wl = reinterpret_cast<const u32*>(&lo_raw[u]);
        const u32* wh = reinterpret_cast<const u32*>(&hi_raw[u]);
#pragma unroll
        for (int i = 0; i < PER_LANE / 2; ++i) {
          unpack2<elem_t>(wl[i], lo[2 * i], lo[2 * i + 1]);
          unpack2<elem_t>(wh[i], hi[2 * i], hi[2 * i + 1]);
        }
        float acc = 0.f;
#pragma unroll
        for (int g = 0; g < GROUP; ++g)
#pragma unroll
          for (int i = 0; i < PER_LANE; ++i) acc += fmaxf(q[g][i] * lo[i], q[g][i] * hi[i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        // Head-major, so the selection of one (sequence, head) reads its scores contiguously.
        if (lane == 0) p.scores[(long long)kvh * pages_total + f0 + j0 + u] = acc;
      }
    }
  }
}

// ---- Variants ----


#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1);} } while (0)

constexpr int REC = 2 * D + 16;

// Σ_g max(q_g·lo, q_g·hi) = P·hi + N·lo with P = Σ_g max(q_g, 0), N = Σ_g min(q_g, 0):
// the group folds into two vectors, 2 FMAs per dim instead of 4 ops per (dim, head).
template <bool I8, int UNROLL>
__global__ void __launch_bounds__(256, 4) page_scores_pn(const __grid_constant__ ScoreParams p) {
  typedef typename Vec<PER_LANE>::type V;
  const int lane = threadIdx.x % 32;
  const unsigned char* bounds = reinterpret_cast<const unsigned char*>(p.bounds);
  const int pages_total = p.kv_indptr[p.batch];
  const int chunks = (pages_total + 31) / 32;
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  const long long items = (long long)chunks * p.num_kv_heads;
  for (long long item = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; item < items; item += warps) {
    const int chunk = (int)(item / p.num_kv_heads), kvh = (int)(item - (long long)chunk * p.num_kv_heads);
    const int f0 = chunk * 32;
    int my_b = -1, my_page = 0;
    if (f0 + lane < pages_total) {
      const int b = owner(p.kv_indptr, p.batch, f0 + lane);
      const int keep = p.keep[b];
      if (keep > 0 && keep < p.kv_indptr[b + 1] - p.kv_indptr[b]) { my_b = b; my_page = p.kv_indices[f0 + lane]; }
    }
    if (__ballot_sync(0xffffffffu, my_b >= 0) == 0) continue;
    int cur_b = -1;
    float pos[PER_LANE], neg[PER_LANE];
    for (int j0 = 0; j0 < 32; j0 += UNROLL) {
      V lo_raw[UNROLL], hi_raw[UNROLL];
      u32 lo8[UNROLL], hi8[UNROLL];
      int ex[UNROLL], seq[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        seq[u] = __shfl_sync(0xffffffffu, my_b, j0 + u);
        const long long page = __shfl_sync(0xffffffffu, my_page, j0 + u);
        if (seq[u] < 0) continue;
        if (I8) {
          const unsigned char* bp = bounds + (page * p.num_kv_heads + kvh) * REC;
          lo8[u] = *reinterpret_cast<const u32*>(bp + lane * 4);
          hi8[u] = *reinterpret_cast<const u32*>(bp + D + lane * 4);
          ex[u] = *reinterpret_cast<const int*>(bp + 2 * D);
        } else {
          const elem_t* bp = p.bounds + (page * p.num_kv_heads + kvh) * 2 * D + lane * PER_LANE;
          lo_raw[u] = *reinterpret_cast<const V*>(bp);
          hi_raw[u] = *reinterpret_cast<const V*>(bp + D);
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (seq[u] < 0) continue;
        if (seq[u] != cur_b) {
          cur_b = seq[u];
          const elem_t* qp = p.q + (long long)(p.qo_indptr[cur_b + 1] - 1) * p.q_stride + (long long)kvh * GROUP * D + lane * PER_LANE;
#pragma unroll
          for (int i = 0; i < PER_LANE; ++i) pos[i] = neg[i] = 0.f;
#pragma unroll
          for (int g = 0; g < GROUP; ++g) {
            float q[PER_LANE];
            load_lane(qp + g * D, q);
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) { pos[i] += fmaxf(q[i], 0.f); neg[i] += fminf(q[i], 0.f); }
          }
        }
        float lo[PER_LANE], hi[PER_LANE];
        if (I8) {
#pragma unroll
          for (int i = 0; i < PER_LANE; ++i) {
            lo[i] = (float)(signed char)(lo8[u] >> (8 * i));
            hi[i] = (float)(signed char)(hi8[u] >> (8 * i));
          }
        } else {
          const u32* wl = reinterpret_cast<const u32*>(&lo_raw[u]);
          const u32* wh = reinterpret_cast<const u32*>(&hi_raw[u]);
#pragma unroll
          for (int i = 0; i < PER_LANE / 2; ++i) {
            unpack2<elem_t>(wl[i], lo[2 * i], lo[2 * i + 1]);
            unpack2<elem_t>(wh[i], hi[2 * i], hi[2 * i + 1]);
          }
        }
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) acc = fmaf(pos[i], hi[i], fmaf(neg[i], lo[i], acc));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) p.scores[(long long)kvh * pages_total + f0 + j0 + u] = I8 ? ldexpf(acc, ex[u]) : acc;
      }
    }
  }
}


// Streamed: a block copies whole page records (all kv heads: 4 KB bf16, 2.2 KB int8 for
// Llama-3-8B) into shared memory with cp.async, STAGES tiles of TILE pages in flight, then
// warp w scores the tile's (page, head) pairs w, w + 8, ... from shared memory.
// As page_scores_pn, UNROLL = 8, but the 8 pages' warp sums share one transposed
// reduction (9 shuffles for 8 pages instead of 40), and int8 scales multiply before it.
template <bool I8>
__global__ void __launch_bounds__(256, 4) page_scores_pn2(const __grid_constant__ ScoreParams p) {
  typedef typename Vec<PER_LANE>::type V;
  constexpr int U = 8;
  const int lane = threadIdx.x % 32;
  const unsigned char* bounds = reinterpret_cast<const unsigned char*>(p.bounds);
  const int pages_total = p.kv_indptr[p.batch];
  const int chunks = (pages_total + 31) / 32;
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  const long long items = (long long)chunks * p.num_kv_heads;
  // After the reduction, lanes with (lane & 3) == 0 hold page `mine` of the 8.
  const int mine = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
  for (long long item = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; item < items; item += warps) {
    const int chunk = (int)(item / p.num_kv_heads), kvh = (int)(item - (long long)chunk * p.num_kv_heads);
    const int f0 = chunk * 32;
    int my_b = -1, my_page = 0;
    if (f0 + lane < pages_total) {
      const int b = owner(p.kv_indptr, p.batch, f0 + lane);
      const int keep = p.keep[b];
      if (keep > 0 && keep < p.kv_indptr[b + 1] - p.kv_indptr[b]) { my_b = b; my_page = p.kv_indices[f0 + lane]; }
    }
    if (__ballot_sync(0xffffffffu, my_b >= 0) == 0) continue;
    int cur_b = -1;
    float pos[PER_LANE], neg[PER_LANE];
    for (int j0 = 0; j0 < 32; j0 += U) {
      V lo_raw[U], hi_raw[U];
      u32 lo8[U], hi8[U];
      float sc[U];
      int seq[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        seq[u] = __shfl_sync(0xffffffffu, my_b, j0 + u);
        const long long page = __shfl_sync(0xffffffffu, my_page, j0 + u);
        if (seq[u] < 0) continue;
        if (I8) {
          const unsigned char* bp = bounds + (page * p.num_kv_heads + kvh) * REC;
          lo8[u] = *reinterpret_cast<const u32*>(bp + lane * 4);
          hi8[u] = *reinterpret_cast<const u32*>(bp + D + lane * 4);
          sc[u] = __int_as_float((*reinterpret_cast<const int*>(bp + 2 * D) + 127) << 23);
        } else {
          const elem_t* bp = p.bounds + (page * p.num_kv_heads + kvh) * 2 * D + lane * PER_LANE;
          lo_raw[u] = *reinterpret_cast<const V*>(bp);
          hi_raw[u] = *reinterpret_cast<const V*>(bp + D);
        }
      }
      float acc[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        acc[u] = 0.f;
        if (seq[u] < 0) continue;
        if (seq[u] != cur_b) {
          cur_b = seq[u];
          const elem_t* qp = p.q + (long long)(p.qo_indptr[cur_b + 1] - 1) * p.q_stride + (long long)kvh * GROUP * D + lane * PER_LANE;
#pragma unroll
          for (int i = 0; i < PER_LANE; ++i) pos[i] = neg[i] = 0.f;
#pragma unroll
          for (int g = 0; g < GROUP; ++g) {
            float q[PER_LANE];
            load_lane(qp + g * D, q);
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) { pos[i] += fmaxf(q[i], 0.f); neg[i] += fminf(q[i], 0.f); }
          }
        }
        float lo[PER_LANE], hi[PER_LANE];
        if (I8) {
#pragma unroll
          for (int i = 0; i < PER_LANE; ++i) {
            lo[i] = (float)(signed char)(lo8[u] >> (8 * i));
            hi[i] = (float)(signed char)(hi8[u] >> (8 * i));
          }
        } else {
          const u32* wl = reinterpret_cast<const u32*>(&lo_raw[u]);
          const u32* wh = reinterpret_cast<const u32*>(&hi_raw[u]);
#pragma unroll
          for (int i = 0; i < PER_LANE / 2; ++i) {
            unpack2<elem_t>(wl[i], lo[2 * i], lo[2 * i + 1]);
            unpack2<elem_t>(wh[i], hi[2 * i], hi[2 * i + 1]);
          }
        }
        float a = 0.f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) a = fmaf(pos[i], hi[i], fmaf(neg[i], lo[i], a));
        acc[u] = I8 ? a * sc[u] : a;
      }
      // Transposed warp reduction: halve the values per lane at each of offsets 16, 8, 4.
      float v4[4], v2[2];
      const bool b16 = lane & 16, b8 = lane & 8, b4 = lane & 4;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float send = b16 ? acc[k] : acc[k + 4], keep = b16 ? acc[k + 4] : acc[k];
        v4[k] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
      }
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const float send = b8 ? v4[k] : v4[k + 2], keep = b8 ? v4[k + 2] : v4[k];
        v2[k] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
      }
      float v = (b4 ? v2[1] : v2[0]) + __shfl_xor_sync(0xffffffffu, b4 ? v2[0] : v2[1], 4);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      const int my_seq = __shfl_sync(0xffffffffu, my_b, j0 + mine);
      if ((lane & 3) == 0 && my_seq >= 0) p.scores[(long long)kvh * pages_total + f0 + j0 + mine] = v;
    }
  }
}

constexpr int TILE = 8, STAGES = 3, ST_THREADS = 256;
// Pages per lookup batch: one page per thread, looked up in parallel before the copies.
constexpr int LOOKUP = ST_THREADS;
template <bool I8, int T = TILE>
__global__ void __launch_bounds__(ST_THREADS, 2) page_scores_stream(const __grid_constant__ ScoreParams p) {
  constexpr int HREC = I8 ? REC : 4 * D;           // bytes per (page, head)
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int meta_b[LOOKUP], meta_page[LOOKUP];
  const int hkv = p.num_kv_heads, prec = hkv * HREC, chunks16 = prec / 16;
  const unsigned char* bounds = reinterpret_cast<const unsigned char*>(p.bounds);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int pages_total = p.kv_indptr[p.batch];
  // Contiguous ranges of whole tiles per block.
  const int tiles = (pages_total + T - 1) / T;
  const int per = (tiles + gridDim.x - 1) / gridDim.x;
  const int t_begin = blockIdx.x * per, t_end = min(tiles, t_begin + per);
  int cur_b = -1, cur_h = -1;
  float pos[PER_LANE], neg[PER_LANE];
  for (int base = t_begin; base < t_end; base += LOOKUP / T) {
    const int n = min(LOOKUP / T, t_end - base);
    {
      int b = -1, page = 0;
      const int f = base * T + threadIdx.x;
      if (threadIdx.x < n * T && f < pages_total) {
        const int o = owner(p.kv_indptr, p.batch, f);
        const int keep = p.keep[o];
        if (keep > 0 && keep < p.kv_indptr[o + 1] - p.kv_indptr[o]) { b = o; page = p.kv_indices[f]; }
      }
      __syncthreads();  // the previous batch is done with meta
      meta_b[threadIdx.x] = b;
      meta_page[threadIdx.x] = page;
      __syncthreads();
    }
    auto issue = [&](int i) {
      if (i < n) {
        unsigned char* dst = smem + (i % STAGES) * T * prec;
        for (int c = threadIdx.x; c < T * chunks16; c += ST_THREADS) {
          const int j = c / chunks16, k = c - j * chunks16;
          if (meta_b[i * T + j] < 0) continue;
          cp_async_16(smem_addr(dst + j * prec + k * 16), bounds + (long long)meta_page[i * T + j] * prec + k * 16, true);
        }
      }
      cp_async_commit();
    };
    for (int i = 0; i < STAGES - 1; ++i) issue(i);
    for (int i = 0; i < n; ++i) {
      issue(i + STAGES - 1);
      cp_async_wait<STAGES - 1>();
      __syncthreads();
      const unsigned char* tile = smem + (i % STAGES) * T * prec;
      const int f0 = (base + i) * T;
      for (int pair = warp; pair < T * hkv; pair += ST_THREADS / 32) {
        const int j = pair / hkv, h = pair - j * hkv, b = meta_b[i * T + j];
        if (b < 0) continue;
        if (b != cur_b || h != cur_h) {
          cur_b = b; cur_h = h;
          const elem_t* qp = p.q + (long long)(p.qo_indptr[b + 1] - 1) * p.q_stride + (long long)h * GROUP * D + lane * PER_LANE;
#pragma unroll
          for (int k = 0; k < PER_LANE; ++k) pos[k] = neg[k] = 0.f;
#pragma unroll
          for (int g = 0; g < GROUP; ++g) {
            float q[PER_LANE];
            load_lane(qp + g * D, q);
#pragma unroll
            for (int k = 0; k < PER_LANE; ++k) { pos[k] += fmaxf(q[k], 0.f); neg[k] += fminf(q[k], 0.f); }
          }
        }
        const unsigned char* rec = tile + j * prec + h * HREC;
        float lo[PER_LANE], hi[PER_LANE];
        int ex = 0;
        if (I8) {
          const u32 l8 = *reinterpret_cast<const u32*>(rec + lane * 4), h8 = *reinterpret_cast<const u32*>(rec + D + lane * 4);
          ex = *reinterpret_cast<const int*>(rec + 2 * D);
#pragma unroll
          for (int k = 0; k < 4; ++k) { lo[k] = (float)(signed char)(l8 >> (8 * k)); hi[k] = (float)(signed char)(h8 >> (8 * k)); }
        } else {
          typedef typename Vec<PER_LANE>::type V;
          V lr = *reinterpret_cast<const V*>(rec + lane * PER_LANE * 2), hr = *reinterpret_cast<const V*>(rec + 2 * D + lane * PER_LANE * 2);
          const u32* wl = reinterpret_cast<const u32*>(&lr);
          const u32* wh = reinterpret_cast<const u32*>(&hr);
#pragma unroll
          for (int k = 0; k < PER_LANE / 2; ++k) { unpack2<elem_t>(wl[k], lo[2 * k], lo[2 * k + 1]); unpack2<elem_t>(wh[k], hi[2 * k], hi[2 * k + 1]); }
        }
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < PER_LANE; ++k) acc = fmaf(pos[k], hi[k], fmaf(neg[k], lo[k], acc));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) p.scores[(long long)h * pages_total + f0 + j] = I8 ? ldexpf(acc, ex) : acc;
      }
      __syncthreads();  // the stage is refilled next iteration
    }
    cp_async_wait<0>();
  }
}

int main() {
  const int B = 32, PAGES = 2048, HKV = 8, HQ = 32, TOTAL = B * PAGES;
  const int POOL = TOTAL + 1024;
  std::mt19937 rng(1);
  std::vector<int> perm(POOL);
  for (int i = 0; i < POOL; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int> indptr(B + 1), qo(B + 1), keep(B, 614);
  for (int b = 0; b <= B; ++b) { indptr[b] = b * PAGES; qo[b] = b; }
  std::vector<unsigned short> qh(B * HQ * D);
  for (auto& x : qh) x = 0x3f80 ^ (rng() & 0x807f);
  size_t bf_bytes = (size_t)POOL * HKV * 2 * D * 2, i8_bytes = (size_t)POOL * HKV * REC;
  std::vector<unsigned char> fill(std::max(bf_bytes, i8_bytes));
  for (auto& x : fill) x = rng() & 0x3f;  // small values: finite bf16, small exponents
  void *d_bf, *d_i8, *d_q, *d_sc, *d_ip, *d_ix, *d_qo, *d_keep;
  CK(cudaMalloc(&d_bf, bf_bytes)); CK(cudaMalloc(&d_i8, i8_bytes));
  CK(cudaMemcpy(d_bf, fill.data(), bf_bytes, cudaMemcpyHostToDevice));
  for (size_t r = 0; r < (size_t)POOL * HKV; ++r) {  // exponents in [-8, 7]
    int e = (int)(rng() % 16) - 8;
    memcpy(&fill[r * REC + 2 * D], &e, 4);
  }
  CK(cudaMemcpy(d_i8, fill.data(), i8_bytes, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&d_q, qh.size() * 2)); CK(cudaMemcpy(d_q, qh.data(), qh.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&d_sc, (size_t)TOTAL * HKV * 4));
  CK(cudaMalloc(&d_ip, (B + 1) * 4)); CK(cudaMemcpy(d_ip, indptr.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&d_qo, (B + 1) * 4)); CK(cudaMemcpy(d_qo, qo.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&d_keep, B * 4)); CK(cudaMemcpy(d_keep, keep.data(), B * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&d_ix, TOTAL * 4)); CK(cudaMemcpy(d_ix, perm.data(), TOTAL * 4, cudaMemcpyHostToDevice));
  ScoreParams p{};
  p.q = (const elem_t*)d_q; p.scores = (float*)d_sc; p.qo_indptr = (int*)d_qo; p.kv_indptr = (int*)d_ip;
  p.kv_indices = (int*)d_ix; p.keep = (int*)d_keep; p.q_stride = HQ * D; p.batch = B; p.num_kv_heads = HKV; p.group = GROUP;
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  void* flush; size_t flush_bytes = 256u << 20; CK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  auto time = [&](const char* name, double bytes, auto launch) {
    std::vector<float> t;
    for (int r = 0; r < 60; ++r) {
      CK(cudaMemsetAsync(flush, r, flush_bytes));  // evict L2
      CK(cudaEventRecord(e0)); launch(); CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
      float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); if (r >= 10) t.push_back(ms * 1000);
    }
    CK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    printf("%-28s median %7.1f us  min %7.1f us  %6.0f GB/s\n", name, t[t.size() / 2], t[0], bytes / (t[t.size() / 2] * 1e3));
  };
  for (int bps : {3}) {
    const int smem_bf = STAGES * TILE * HKV * 4 * D, smem_i8 = STAGES * TILE * HKV * REC;
    CK(cudaFuncSetAttribute(page_scores_stream<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bf));
    CK(cudaFuncSetAttribute(page_scores_stream<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_i8));
    printf("streamed, %d blocks per SM\n", bps);
    p.bounds = (const elem_t*)d_bf;
    time("bf16 streamed", (double)TOTAL * HKV * 2 * D * 2, [&] { page_scores_stream<false><<<bps * sms, ST_THREADS, smem_bf>>>(p); });
    p.bounds = (const elem_t*)d_i8;
    time("int8 streamed", (double)TOTAL * HKV * REC, [&] { page_scores_stream<true><<<bps * sms, ST_THREADS, smem_i8>>>(p); });
    CK(cudaFuncSetAttribute(page_scores_stream<true, 16>, cudaFuncAttributeMaxDynamicSharedMemorySize, 2 * smem_i8));
    time("int8 streamed tile 16", (double)TOTAL * HKV * REC, [&] { page_scores_stream<true, 16><<<bps * sms, ST_THREADS, 2 * smem_i8>>>(p); });
  }
  for (int mult : {4}) {
    printf("grid %d blocks per SM\n", mult);
    p.bounds = (const elem_t*)d_bf;
    time("bf16 (shipped)", (double)TOTAL * HKV * 2 * D * 2, [&] { page_scores<<<mult * sms, 256>>>(p); });
    time("bf16 P/N unroll 8", (double)TOTAL * HKV * 2 * D * 2, [&] { page_scores_pn<false, 8><<<mult * sms, 256>>>(p); });
    time("bf16 P/N unroll 16", (double)TOTAL * HKV * 2 * D * 2, [&] { page_scores_pn<false, 16><<<mult * sms, 256>>>(p); });
    p.bounds = (const elem_t*)d_i8;
    time("int8 P/N2 (transposed sum)", (double)TOTAL * HKV * REC, [&] { page_scores_pn2<true><<<mult * sms, 256>>>(p); });
    p.bounds = (const elem_t*)d_bf;
    time("bf16 P/N2 (transposed sum)", (double)TOTAL * HKV * 2 * D * 2, [&] { page_scores_pn2<false><<<mult * sms, 256>>>(p); });
    p.bounds = (const elem_t*)d_i8;
    time("int8 P/N unroll 8", (double)TOTAL * HKV * REC, [&] { page_scores_pn<true, 8><<<mult * sms, 256>>>(p); });
    time("int8 P/N unroll 16", (double)TOTAL * HKV * REC, [&] { page_scores_pn<true, 16><<<mult * sms, 256>>>(p); });
  }
  {  // same scores from the folded group as from the shipped kernel
    std::vector<float> a((size_t)TOTAL * HKV), b(a.size());
    p.bounds = (const elem_t*)d_bf;
    page_scores<<<4 * sms, 256>>>(p);
    CK(cudaMemcpy(a.data(), d_sc, a.size() * 4, cudaMemcpyDeviceToHost));
    page_scores_pn<false, 8><<<4 * sms, 256>>>(p);
    CK(cudaMemcpy(b.data(), d_sc, b.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0, scale = 0;
    for (size_t i = 0; i < a.size(); ++i) { worst = std::max(worst, (double)std::fabs(a[i] - b[i])); scale = std::max(scale, (double)std::fabs(a[i])); }
    page_scores_stream<false><<<2 * sms, ST_THREADS, STAGES * TILE * HKV * 4 * D>>>(p);
    std::vector<float> c(a.size());
    CK(cudaMemcpy(c.data(), d_sc, c.size() * 4, cudaMemcpyDeviceToHost));
    double w2 = 0;
    for (size_t i = 0; i < a.size(); ++i) w2 = std::max(w2, (double)std::fabs(c[i] - b[i]));
    printf("streamed vs P/N registers: max |diff| %.3g\n", w2);
    p.bounds = (const elem_t*)d_i8;
    page_scores_pn<true, 8><<<4 * sms, 256>>>(p);
    CK(cudaMemcpy(b.data(), d_sc, b.size() * 4, cudaMemcpyDeviceToHost));
    page_scores_stream<true><<<2 * sms, ST_THREADS, STAGES * TILE * HKV * REC>>>(p);
    CK(cudaMemcpy(c.data(), d_sc, c.size() * 4, cudaMemcpyDeviceToHost));
    w2 = 0;
    for (size_t i = 0; i < a.size(); ++i) w2 = std::max(w2, (double)std::fabs(c[i] - b[i]));
    page_scores_pn2<true><<<4 * sms, 256>>>(p);
    CK(cudaMemcpy(a.data(), d_sc, a.size() * 4, cudaMemcpyDeviceToHost));
    double w3 = 0;
    for (size_t i = 0; i < a.size(); ++i) w3 = std::max(w3, (double)std::fabs(a[i] - b[i]) / (1e-30 + std::fabs(b[i])));
    printf("int8 transposed vs int8 registers: max rel diff %.3g\n", w3);
    p.bounds = (const elem_t*)d_bf;
    page_scores_pn<false, 8><<<4 * sms, 256>>>(p);
    CK(cudaMemcpy(b.data(), d_sc, b.size() * 4, cudaMemcpyDeviceToHost));
    page_scores_pn2<false><<<4 * sms, 256>>>(p);
    CK(cudaMemcpy(a.data(), d_sc, a.size() * 4, cudaMemcpyDeviceToHost));
    w3 = 0;
    for (size_t i = 0; i < a.size(); ++i) w3 = std::max(w3, (double)std::fabs(a[i] - b[i]) / (1e-30 + std::fabs(b[i])));
    printf("bf16 transposed vs bf16 registers: max rel diff %.3g\n", w3);
    printf("int8 streamed vs int8 registers: max |diff| %.3g\n", w2);
    CK(cudaDeviceSynchronize());
    printf("P/N vs shipped: max |diff| %.3g of max |score| %.3g\n", worst, scale);
  }
  void* cp; CK(cudaMalloc(&cp, 1u << 30));
  time("copy 512 MiB (read+write)", 2.0 * (1u << 29), [&] { CK(cudaMemcpyAsync(cp, (char*)cp + (1u << 29), 1u << 29, cudaMemcpyDeviceToDevice)); });
  return 0;
}

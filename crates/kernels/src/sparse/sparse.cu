// Query-aware page selection for sparse decode (Quest): score every page of a decoding
// sequence from its per-page key bounds, then keep the best pages per kv head.
//
// page_scores: for page p of sequence b and kv head h, the upper bound of q·k over the
// page's keys, summed over the query heads g of h's GQA group:
//     score = Σ_g Σ_d max(q_gd · lo_pd, q_gd · hi_pd) = Σ_d (P_d · hi_pd + N_d · lo_pd)
// with P = Σ_g max(q_g, 0) and N = Σ_g min(q_g, 0): the group folds into two vectors, so
// a page costs 2 FMAs per dim whatever the group. The bounds are the int8 records of
// common/key_bounds.cuh. One warp per (page, kv head): each lane takes D/32 dims, scales
// its partial sum by its dims' exponent, then a warp sum. The grid is fixed and strides
// over all (page, head) items of the batch, so a CUDA graph captured once covers any
// step's tables: the work size is read from the device (kv_indptr[batch]).
//
// select_pages: one block per (sequence, kv head). Writes that head's sparse page table
// (ascending positions): the first `sink` pages, the `keep - sink - window` best-scoring
// pages in between, the last `window` pages. Ties go to the earlier page, so the choice
// is deterministic. The threshold is found by a radix select over the scores as
// order-preserving u32 keys (4 passes of 8 bits with a shared histogram), then one
// ordered compaction. Sequences with keep <= 0 or keep >= their page count (dense) get
// their whole table copied.
#include "common/key_bounds.cuh"
#include "sparse/select.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GROUP
#define GROUP 4
#endif
constexpr int D = HEAD_DIM;
constexpr int PER_LANE = D / 32;  // 4 or 2 dims per lane: one u32 or u16 of each bound
constexpr int RECORD = BOUNDS_RECORD;
static_assert(D == 64 || D == 128, "head_dim 64 or 128");
static_assert(GROUP >= 1 && GROUP <= 16, "GQA group of 1..=16 query heads");

// Mirrors ScoreParams in sparse/mod.rs.
struct ScoreParams {
  const elem_t* q;         // [tokens, q_stride]; query head h at h * D (rotated)
  const unsigned char* bounds;  // [pages, Hkv] records of RECORD bytes
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
template <int N> struct Bytes;
template <> struct Bytes<4> { typedef u32 type; };
template <> struct Bytes<2> { typedef u16 type; };

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

// A warp scores SCORE_CHUNK (32) consecutive pages of the flat table for one kv head: each
// lane looks up one page's id and owner (in parallel), then the warp walks the pages
// SCORE_UNROLL at a time, issuing all their bound loads before using any. GROUP is a
// compile-time constant; the folded P and N of the group are kept while consecutive
// pages share a sequence.
constexpr int SCORE_UNROLL = 8;
#ifndef SCORE_CHUNK
#define SCORE_CHUNK 32
#endif
// (Measured: 8-page chunks score one 32K sequence in 9.9 us instead of 15.2 but 32 of
// them in 90 us instead of 80; bench/micro/page_scores_chunk.cu.)
static_assert(SCORE_CHUNK % SCORE_UNROLL == 0 && SCORE_CHUNK <= 32, "chunk of whole rounds");

// Four blocks per SM (at most 64 registers a thread): the pass is latency-bound below
// that (measured: 88 registers allowed two blocks, 16 warps per SM, 1.3 TB/s).
extern "C" __global__ void __launch_bounds__(256, 4) page_scores(const __grid_constant__ ScoreParams p) {
  pdl_wait();
  typedef typename Bytes<PER_LANE>::type B;
  const int lane = threadIdx.x % 32;
  const int pages_total = p.kv_indptr[p.batch];
  const int chunks = (pages_total + SCORE_CHUNK - 1) / SCORE_CHUNK;
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  const long long items = (long long)chunks * p.num_kv_heads;
  // This lane's dims, lane * PER_LANE.., share exponent byte `lane_exp` of the record.
  const int lane_exp = 2 * D + lane * PER_LANE / EXP_GROUP;
  for (long long item = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; item < items; item += warps) {
    const int chunk = (int)(item / p.num_kv_heads), kvh = (int)(item - (long long)chunk * p.num_kv_heads);
    const int f0 = chunk * SCORE_CHUNK;
    // Lane i: page f0 + i, its sequence (-1: none, or dense) and page id.
    int my_b = -1, my_page = 0;
    if (lane < SCORE_CHUNK && f0 + lane < pages_total) {
      const int b = owner(p.kv_indptr, p.batch, f0 + lane);
      const int keep = p.keep[b];
      if (keep > 0 && keep < p.kv_indptr[b + 1] - p.kv_indptr[b]) {  // sparse rows only
        my_b = b;
        my_page = p.kv_indices[f0 + lane];
      }
    }
    if (__ballot_sync(0xffffffffu, my_b >= 0) == 0) continue;
    int cur_b = -1;
    float pos[PER_LANE], neg[PER_LANE];
    for (int j0 = 0; j0 < SCORE_CHUNK; j0 += SCORE_UNROLL) {
      B lo_raw[SCORE_UNROLL], hi_raw[SCORE_UNROLL];
      signed char ex[SCORE_UNROLL];
      int seq[SCORE_UNROLL];
#pragma unroll
      for (int u = 0; u < SCORE_UNROLL; ++u) {
        seq[u] = __shfl_sync(0xffffffffu, my_b, j0 + u);
        const long long page = __shfl_sync(0xffffffffu, my_page, j0 + u);
        if (seq[u] < 0) continue;  // uniform over the warp
        const unsigned char* rec = p.bounds + (page * p.num_kv_heads + kvh) * RECORD;
        lo_raw[u] = *reinterpret_cast<const B*>(rec + lane * PER_LANE);
        hi_raw[u] = *reinterpret_cast<const B*>(rec + D + lane * PER_LANE);
        ex[u] = (signed char)rec[lane_exp];
      }
#pragma unroll
      for (int u = 0; u < SCORE_UNROLL; ++u) {
        if (seq[u] < 0) continue;
        if (seq[u] != cur_b) {  // a new sequence: fold its group's queries
          cur_b = seq[u];
          const elem_t* qp = p.q + (long long)(p.qo_indptr[cur_b + 1] - 1) * p.q_stride +
                             (long long)kvh * GROUP * D + lane * PER_LANE;
#pragma unroll
          for (int i = 0; i < PER_LANE; ++i) pos[i] = neg[i] = 0.f;
#pragma unroll
          for (int g = 0; g < GROUP; ++g) {
            float q[PER_LANE];
            load_lane(qp + g * D, q);
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
              // Not fmaxf/fminf: a NaN query must give a NaN score (ranked last), as
              // the unfolded sum does.
              pos[i] += q[i] < 0.f ? 0.f : q[i];
              neg[i] += q[i] > 0.f ? 0.f : q[i];
            }
          }
        }
        float acc = 0.f, lo[4], hi[4];
        s8x4_to_float(lo_raw[u], lo);
        s8x4_to_float(hi_raw[u], hi);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) acc = fmaf(pos[i], hi[i], fmaf(neg[i], lo[i], acc));
        acc = warp_sum(acc * pow2i(ex[u]));  // the scale is exact: a power of two
        // Head-major, so the selection of one (sequence, head) reads its scores contiguously.
        if (lane == 0) p.scores[(long long)kvh * pages_total + f0 + j0 + u] = acc;
      }
    }
  }
}

// Mirrors SelectParams in sparse/mod.rs.
struct SelectParams {
  const float* scores;      // [Hkv, kv_indptr[batch]] from page_scores
  const int* kv_indptr;     // [batch + 1] dense table
  const int* kv_indices;
  const int* keep;          // [batch]
  const int* out_indptr;    // [batch * Hkv + 1] sparse tables (sized on the host)
  int* out_indices;
  int batch;
  int num_kv_heads;
  int sink;
  int window;
};

constexpr int SEL_THREADS = 512;
// Middle pages whose keys the selection keeps in shared memory (64K tokens of 16-token
// pages); longer sequences re-read their scores from global memory (L2) on each pass.
constexpr int KEY_CACHE = 4096;
constexpr int SEL_WARPS = SEL_THREADS / 32;

extern "C" __global__ void __launch_bounds__(SEL_THREADS, 1) select_pages(const __grid_constant__ SelectParams p) {
  pdl_wait();
  __shared__ int hist[256];
  __shared__ int warp_sums[SEL_WARPS];
  __shared__ u32 cache[KEY_CACHE];
  __shared__ u32 s_prefix;
  __shared__ int s_remaining;
  const int b = blockIdx.x, kvh = blockIdx.y;
  if (b >= p.batch) return;
  const int* pages = p.kv_indices + p.kv_indptr[b];
  const int n = p.kv_indptr[b + 1] - p.kv_indptr[b];
  int* out = p.out_indices + p.out_indptr[b * p.num_kv_heads + kvh];
  const int keep = p.keep[b];
  if (keep <= 0 || keep >= n || keep < p.sink + p.window) {
    for (int i = threadIdx.x; i < n; i += SEL_THREADS) out[i] = pages[i];
    return;
  }
  const float* scores = p.scores + (long long)kvh * p.kv_indptr[p.batch] + p.kv_indptr[b];
  const int mid_begin = p.sink, mid_end = n - p.window;
  const int k_mid = keep - p.sink - p.window;  // pages to pick among [mid_begin, mid_end)
  const bool cached = mid_end - mid_begin <= KEY_CACHE;
  if (cached) {
    // Four loads in flight per thread (KEY_CACHE = 8 x SEL_THREADS).
    for (int i0 = mid_begin + threadIdx.x; i0 < mid_end; i0 += 4 * SEL_THREADS) {
      float v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * SEL_THREADS;
        v[u] = i < mid_end ? scores[i] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * SEL_THREADS;
        if (i < mid_end) cache[i - mid_begin] = score_key(v[u]);
      }
    }
  }
  auto key_at = [&](int i) { return cached ? cache[i - mid_begin] : score_key(scores[i]); };

  // Radix select: the key of the k_mid-th largest middle score, digit by digit.
  if (threadIdx.x == 0) {
    s_prefix = 0u;
    s_remaining = k_mid;
  }
  // Bits every middle key shares need no pass: scores of similar magnitude share their
  // top bits, which would also pile a pass's histogram onto one or two bins.
  __shared__ u32 s_and, s_or;
  if (threadIdx.x == 0) {
    s_and = 0xffffffffu;
    s_or = 0u;
  }
  __syncthreads();
  {
    u32 a = 0xffffffffu, o = 0u;
    for (int i = mid_begin + threadIdx.x; i < mid_end; i += SEL_THREADS) {
      const u32 key = key_at(i);
      a &= key;
      o |= key;
    }
    a = __reduce_and_sync(0xffffffffu, a);
    o = __reduce_or_sync(0xffffffffu, o);
    if (threadIdx.x % 32 == 0) {
      atomicAnd(&s_and, a);
      atomicOr(&s_or, o);
    }
  }
  __syncthreads();
  const u32 differ = s_and ^ s_or;
  // Radix passes over 8-bit digits from the highest differing bit down.
  const int top = differ ? 31 - __clz(differ) : 0;
  const int first_shift = max(top - 7, 0);
  u32 mask = first_shift + 8 >= 32 ? 0u : ~0u << (first_shift + 8);
  // The shared high bits (all of them when every key is equal: no pass runs).
  if (threadIdx.x == 0) s_prefix = differ ? s_and & mask : s_and;
  if (k_mid > 0 && differ != 0) {
    for (int shift = first_shift; shift > -8; shift -= 8) {
      const int sh = max(shift, 0);
      const int width = shift >= 0 ? 8 : 8 + shift;  // the last digit may be narrower
      const u32 dmask = (1u << width) - 1u;
      for (int i = threadIdx.x; i < 256; i += SEL_THREADS) hist[i] = 0;
      __syncthreads();
      const u32 prefix = s_prefix;
      // Keys of a pass mostly share a few digits (scores of similar magnitude): lanes
      // with the same digit add once, through their leader.
      for (int base = mid_begin; base < mid_end; base += SEL_THREADS) {  // whole warps: hist_add
        const int i = base + threadIdx.x;
        const u32 key = i < mid_end ? key_at(i) : 0u;
        hist_add(hist, i < mid_end && (key & mask) == prefix, (key >> sh) & dmask);
      }
      __syncthreads();
      if (threadIdx.x < 32) radix_digit(hist, s_remaining, prefix, sh, &s_prefix, &s_remaining);
      mask |= dmask << sh;
      __syncthreads();
      if (sh == 0) break;
    }
  }
  __syncthreads();
  const u32 thresh = s_prefix;
  const int take_equal = s_remaining;  // of the keys == thresh, the earliest ones

  for (int i = threadIdx.x; i < p.sink; i += SEL_THREADS) out[i] = pages[i];
  for (int i = threadIdx.x; i < p.window; i += SEL_THREADS) out[keep - p.window + i] = pages[mid_end + i];
  // Ordered compaction of the chosen middle pages into out[sink .. keep - window).
  if (k_mid > 0)
    compact_chosen<SEL_WARPS, SEL_THREADS>(mid_begin, mid_end, key_at, thresh, take_equal,
                                           [&](int i) { return pages[i]; }, out + p.sink, 0, warp_sums);
}

static_assert(sizeof(ScoreParams) == 80, "ScoreParams mirrors sparse/mod.rs");
static_assert(sizeof(SelectParams) == 64, "SelectParams mirrors sparse/mod.rs");

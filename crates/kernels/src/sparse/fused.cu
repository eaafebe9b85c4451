// Page scoring and selection in one launch, for small batches on Hopper (sm_90a).
//
// At batch 1 the two-kernel path (sparse.cu) is latency-bound: the selection runs one
// block per (sequence, kv head), 8 blocks on a 132-SM GPU, and scoring and selection are
// two launches with a round trip of scores between them. Here a thread-block cluster of C
// blocks (up to 16) owns one (sequence, kv head): block r of the cluster scores slice r of
// the sequence's pages into its own shared memory, and the cluster runs the radix select
// together: four passes of 8-bit digits, each adding up the C blocks' histograms through
// distributed shared memory after one cluster barrier (the barriers are what counts at
// batch 1). Every block computes the same threshold, and writes its
// chosen pages at an offset it adds up from the lower ranks' bins in the same reads: the
// table is in ascending page order, as the two-kernel path writes it, with the same rule
// (the best `keep - sink - window` middle pages, ties to the earlier page; NaN lowest)
// applied to its own scores (summed in another order than page_scores': near-ties may go
// either way between the two paths).
//
// Scoring: 8 lanes per page, each taking D/8 dims (one 16- or 8-byte load of lo and of hi,
// their exponents), four rounds of a block's 64 pages in flight; the group's queries fold
// into P = Σ max(q, 0) and N = Σ min(q, 0) once per block (one kv head a block). Scores
// also go to the global scratch, head-major as page_scores writes them, so tests compare
// them with the f64 reference, and slices longer than the shared key cache read them back.
//
// The page tables, lengths and keep counts are the host's: with meta_early they are read
// before pdl_wait(), while the kernel before (RoPE and the KV append) finishes, and so are
// the first rounds' bounds of pages before the query tokens' (no kernel of the step writes
// those). Queries, the query tokens' pages' bounds and every write come after it.
#include "common/cluster.cuh"
#include "common/key_bounds.cuh"
#include "common/mma.cuh"
#include "sparse/select.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GROUP
#define GROUP 4
#endif
constexpr int D = HEAD_DIM;
constexpr int RECORD = BOUNDS_RECORD;
static_assert(D == 64 || D == 128, "head_dim 64 or 128");
static_assert(GROUP >= 1 && GROUP <= 16, "GQA group of 1..=16 query heads");

constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;
constexpr int LANES_PER_PAGE = 8;
constexpr int DPL = D / LANES_PER_PAGE;              // dims a lane scores: 16 or 8
constexpr int EXPS = DPL / EXP_GROUP;                // their exponents: 2 or 1
constexpr int ROUND = THREADS / LANES_PER_PAGE;      // pages a block scores at once
constexpr int UNROLL = 4;                            // rounds whose loads are in flight together
constexpr int KEY_CACHE = 4096;                      // keys a block keeps in shared memory
constexpr int MAX_CLUSTER = 16;
constexpr int BINS = 256;                            // 8-bit radix digits
static_assert(BINS <= THREADS, "a thread a bin of a pass's histogram");
static_assert(DPL % EXP_GROUP == 0, "a lane's dims cover whole exponent groups");


// Mirrors FusedParams in sparse/mod.rs.
struct FusedParams {
  const elem_t* q;              // [tokens, q_stride]; query head h at h * D (rotated)
  const unsigned char* bounds;  // [pages, Hkv] records of RECORD bytes
  float* scores;                // [Hkv, kv_indptr[batch]] (head-major)
  const int* qo_indptr;         // [batch + 1]; a sequence's query is its last token
  const int* kv_indptr;         // [batch + 1] dense page table
  const int* kv_indices;
  const int* keep;              // [batch] pages to keep; <= 0 or >= pages: dense
  const int* out_indptr;        // [batch * Hkv + 1] sparse tables (sized on the host)
  int* out_indices;
  long long q_stride;
  int batch;
  int num_kv_heads;
  int sink;
  int window;
  int meta_early;               // tables and keep counts came from the host
  int bounds_early;             // with meta_early: stable pages' bounds load before pdl_wait()
};

// One page's bytes for one lane: D/8 dims of lo and of hi, and their exponents.
template <int N> struct Lane;
template <> struct Lane<16> {
  uint4 lo, hi;
  u16 ex;
};
template <> struct Lane<8> {
  uint2 lo, hi;
  unsigned char ex;
};
typedef Lane<DPL> LaneBytes;

// Through L2 only (ld.global.cg): loads issued before pdl_wait() must not leave in L1 a
// sector of a neighbouring record that the kernel before is still writing (272-byte records
// share 32-byte sectors).
__device__ __forceinline__ void load_lane(const unsigned char* rec, int l8, LaneBytes& out) {
#if HEAD_DIM == 128
  out.lo = __ldcg(reinterpret_cast<const uint4*>(rec + l8 * DPL));
  out.hi = __ldcg(reinterpret_cast<const uint4*>(rec + D + l8 * DPL));
  out.ex = __ldcg(reinterpret_cast<const unsigned short*>(rec + 2 * D + l8 * EXPS));
#else
  out.lo = __ldcg(reinterpret_cast<const uint2*>(rec + l8 * DPL));
  out.hi = __ldcg(reinterpret_cast<const uint2*>(rec + D + l8 * DPL));
  out.ex = __ldcg(rec + 2 * D + l8 * EXPS);
#endif
}

// This lane's share of the page's bound: Σ over its dims of P·hi + N·lo, scaled per
// exponent group (exactly: a power of two).
__device__ __forceinline__ float lane_score(const LaneBytes& x, const float (&pos)[DPL], const float (&neg)[DPL]) {
  const u32* lo = reinterpret_cast<const u32*>(&x.lo);
  const u32* hi = reinterpret_cast<const u32*>(&x.hi);
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < EXPS; ++e) {
    float part = 0.f;
#pragma unroll
    for (int w = 0; w < EXP_GROUP / 4; ++w) {
      float l[4], h[4];
      s8x4_to_float(lo[e * EXP_GROUP / 4 + w], l);
      s8x4_to_float(hi[e * EXP_GROUP / 4 + w], h);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int d = e * EXP_GROUP + 4 * w + i;
        part = fmaf(pos[d], h[i], fmaf(neg[d], l[i], part));
      }
    }
    acc = fmaf(part, pow2i((signed char)(x.ex >> (8 * e))), acc);
  }
  return acc;
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) score_select(const __grid_constant__ FusedParams p) {
  __shared__ u32 keys[KEY_CACHE];
  __shared__ int ids[KEY_CACHE];  // the keys' page ids, for the table's writes (cached slices)
  __shared__ int hist[2][BINS];  // a pass's counts (by parity), cluster-read
  __shared__ int warp_sums[WARPS];
  __shared__ u32 s_prefix, s_digit;
  __shared__ int s_remaining, s_gt_before, s_eq_before;
  __shared__ bool s_last;

  const u32 rank = cluster_rank(), csize = cluster_blocks();
  const int b = blockIdx.y, kvh = blockIdx.z;
  const int lane = threadIdx.x % 32;
  const int l8 = lane % LANES_PER_PAGE, slot = threadIdx.x / LANES_PER_PAGE;

  if (!p.meta_early) pdl_wait();
  const int first = p.kv_indptr[b];
  const int n = p.kv_indptr[b + 1] - first;
  const int* pages = p.kv_indices + first;
  const int keep = p.keep[b];
  const int out_first = p.out_indptr[b * p.num_kv_heads + kvh];
  // Slice `rank` of the sequence's pages (all of them: sink and window pages are scored too).
  const int s_begin = (int)((long long)n * rank / csize);
  const int s_end = (int)((long long)n * (rank + 1) / csize);
  if (keep <= 0 || keep >= n || keep < p.sink + p.window) {
    // Dense: the whole table, each block its slice (no cluster barrier: the cluster agrees).
    if (p.meta_early) pdl_wait();
    for (int i = s_begin + threadIdx.x; i < s_end; i += THREADS) p.out_indices[out_first + i] = pages[i];
    return;
  }
  // The first rounds' page ids, before the wait when the tables are the host's; pages
  // before `stable` hold no query token.
  const int stable = p.meta_early && p.bounds_early ? n - (p.qo_indptr[b + 1] - p.qo_indptr[b]) : 0;
  int pid[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int i = s_begin + u * ROUND + slot;
    pid[u] = i < s_end ? pages[i] : -1;
  }
  const int pages_total = p.kv_indptr[p.batch];
  // The bounds of the rounds from `base`: of pages before `stable` (EARLY), from it on
  // (LATE), or all (ALL).
  enum Which { EARLY, LATE, ALL };
  LaneBytes x[UNROLL];
  auto load_rounds = [&](int base, Which which) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const bool late = base + u * ROUND + slot >= stable;
      if (pid[u] >= 0 && (which == ALL || late == (which == LATE)))
        load_lane(p.bounds + ((long long)pid[u] * p.num_kv_heads + kvh) * RECORD, l8, x[u]);
    }
  };
  // The first rounds' bounds are in flight while the kernel before finishes, except the
  // query tokens' pages' (at most the last q_len pages: the KV append before writes their
  // bounds, and no kernel of the step writes the others'), and then while the queries arrive.
  load_rounds(s_begin, EARLY);
  if (p.meta_early) pdl_wait();
  load_rounds(s_begin, LATE);

  // The group's queries, folded (not fmaxf/fminf: a NaN query must give a NaN score,
  // ranked last, as the unfolded sum does).
  float pos[DPL], neg[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) pos[i] = neg[i] = 0.f;
  {
    const elem_t* qp = p.q + (long long)(p.qo_indptr[b + 1] - 1) * p.q_stride + (long long)kvh * GROUP * D + l8 * DPL;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int c = 0; c < DPL / 8; ++c) {
        const uint4 v = *reinterpret_cast<const uint4*>(qp + g * D + c * 8);
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float a, bb;
          unpack2<elem_t>(w[i], a, bb);
          const int d = c * 8 + 2 * i;
          pos[d] += a < 0.f ? 0.f : a;
          neg[d] += a > 0.f ? 0.f : a;
          pos[d + 1] += bb < 0.f ? 0.f : bb;
          neg[d + 1] += bb > 0.f ? 0.f : bb;
        }
      }
    }
  }

  const int mid_begin = p.sink, mid_end = n - p.window;
  const bool cached = s_end - s_begin <= KEY_CACHE;
  float* scores = p.scores + (long long)kvh * pages_total + first;
  for (int base = s_begin; base < s_end; base += UNROLL * ROUND) {
    if (base > s_begin) load_rounds(base, ALL);
    int next[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + (UNROLL + u) * ROUND + slot;
      next[u] = i < s_end ? pages[i] : -1;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      // The 8 lanes of a page are 8 consecutive lanes of one warp (all present: whole rounds).
      float s = pid[u] >= 0 ? lane_score(x[u], pos, neg) : 0.f;
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      s += __shfl_xor_sync(0xffffffffu, s, 4);
      const int i = base + u * ROUND + slot;
      if (pid[u] >= 0 && l8 == 0) {
        const u32 key = score_key(s);
        scores[i] = s;
        if (cached) {
          keys[i - s_begin] = key;
          ids[i - s_begin] = pid[u];
        }
      }
      pid[u] = next[u];
    }
  }
  auto key_at = [&](int i) { return cached ? keys[i - s_begin] : score_key(scores[i]); };
  // Page ids from shared memory where this block scored them (its slice: with the sink
  // pages in rank 0's and the window's in the last rank's, unless slices are that short).
  auto page_at = [&](int i) { return cached && i >= s_begin && i < s_end ? ids[i - s_begin] : pages[i]; };
  const int c_begin = max(s_begin, mid_begin), c_end = min(s_end, mid_end);  // this block's middle

  const int k_mid = keep - p.sink - p.window;
  // The select's state, and the first pass's bins (each pass clears the next one's).
  if (threadIdx.x == 0) {
    s_prefix = 0u;
    s_remaining = k_mid;
    s_gt_before = s_eq_before = 0;
  }
  if (threadIdx.x < BINS) hist[0][threadIdx.x] = 0;
  __syncthreads();  // keys, scores, the state and the bins written

  // Radix select over four fixed 8-bit digits, from the top: each pass adds up the
  // cluster's histograms of the keys matching the prefix so far (hist[parity]; a block
  // clears the next pass's after this pass's cluster barrier, every block having read it
  // in the previous pass, before that barrier), and every block finds the same digit.
  // Reading the other blocks' bins anyway, a block also adds up the lower ranks' alone:
  // their keys above the threshold (above this pass's digit, within the prefix) and,
  // after the last pass, equal to it, which is where its own chosen pages start in the
  // table. Passes stop once the digit's
  // keys are all taken (the threshold compares the bits fixed so far). (11-bit digits,
  // three passes, measured slower: 20.3 us against 13.4 at 1@32768, eight times the bins
  // to gather.)
  u32 mask = 0u;  // the bits the prefix fixes
  int parity = 0;
  // Thread t < BINS owns digit BINS - 1 - t (descending: thread 0 the largest).
  const int my_bin = BINS - 1 - (int)threadIdx.x;
  for (int sh = 24; sh >= 0 && k_mid > 0; sh -= 8) {
    int* h = hist[parity];  // cleared (and the clearing ordered) before this pass
    const u32 prefix = s_prefix;
    const int need = s_remaining;
    for (int base = c_begin; base < c_end; base += THREADS) {  // whole warps: hist_add
      const int i = base + threadIdx.x;
      const u32 key = i < c_end ? key_at(i) : 0u;
      hist_add(h, i < c_end && (key & mask) == prefix, (key >> sh) & 0xffu);
    }
    cluster_sync();
    // The next pass's bins, which every block read in the previous pass, before this
    // barrier; the barriers below order the clearing before the next pass's adds.
    if (my_bin >= 0) hist[parity ^ 1][my_bin] = 0;
    int tot = 0, low = 0;
    if (my_bin >= 0) {
      u32 v[MAX_CLUSTER];
#pragma unroll
      for (int r = 0; r < MAX_CLUSTER; ++r) v[r] = (u32)r < csize ? ld_cluster(in_rank(&h[my_bin], r)) : 0u;
#pragma unroll
      for (int r = 0; r < MAX_CLUSTER; ++r) {
        tot += (int)v[r];
        low += (u32)r < rank ? (int)v[r] : 0;
      }
    }
    int all;
    const int above = block_exclusive_scan<WARPS>(tot, warp_sums, all);  // in larger digits
    if (above < need && need <= above + tot) {  // exactly one thread
      s_digit = (u32)my_bin;
      s_prefix = prefix | ((u32)my_bin << sh);
      s_remaining = need - above;  // how many keys equal to the prefix so far to take
      // The digit's keys all taken: the lower bits cannot change which (usually so after
      // three passes), and the last pass is skipped.
      s_last = sh == 0 || need - above == tot;
    }
    __syncthreads();
    const int digit = (int)s_digit;
    const bool last = s_last;
    const int gt = __reduce_add_sync(0xffffffffu, my_bin > digit ? low : 0);
    if (lane == 0 && gt) atomicAdd(&s_gt_before, gt);
    if (last && my_bin == digit) s_eq_before = low;
    mask |= 0xffu << sh;
    parity ^= 1;
    if (last) break;
  }
  // Done reading the other blocks' shared memory: they may leave once all have arrived.
  cluster_arrive();
  __syncthreads();
  const u32 thresh = s_prefix;  // the bits under `mask`
  const int take_equal = s_remaining;  // of the keys equal to it there, the earliest ones
  const int eq_before = s_eq_before;
  const int offset = s_gt_before + min(eq_before, take_equal);
  const int my_take_equal = max(take_equal - eq_before, 0);

  int* out = p.out_indices + out_first;
  if (rank == 0)
    for (int i = threadIdx.x; i < p.sink; i += THREADS) out[i] = page_at(i);
  if (rank == csize - 1)
    for (int i = threadIdx.x; i < p.window; i += THREADS) out[keep - p.window + i] = page_at(mid_end + i);
  // Ordered compaction of this block's chosen middle pages (keys compared on the bits the
  // passes fixed).
  if (k_mid > 0)
    compact_chosen<WARPS, THREADS>(
        c_begin, c_end, [&](int i) { return key_at(i) & mask; }, thresh, my_take_equal,
        page_at, out + p.sink, offset, warp_sums);
  // No block leaves while another may still read its shared memory.
  cluster_wait();
}

static_assert(sizeof(FusedParams) == 104, "FusedParams mirrors sparse/mod.rs");

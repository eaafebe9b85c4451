// What the two selection kernels share (sparse.cu's select_pages, fused.cu's
// score_select): scores as radix keys, a pass's histogram, a block's exclusive scan, the
// ordered compaction of the chosen pages, and the search for the digit of a radix pass
// that holds the k-th largest key.
#pragma once
#include "common/types.cuh"

// Scores as u32 keys in the same order (NaN sorts lowest).
__device__ __forceinline__ u32 score_key(float s) {
  if (s != s) return 0u;
  u32 u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Adds 1 to hist[digit] for each lane with `in`; lanes of a warp with the same digit add
// once, through their lowest lane: the keys of a pass mostly share a few digits (scores of
// similar magnitude), and shared-memory atomics on one address serialise. Every lane of
// the warp calls it.
__device__ __forceinline__ void hist_add(int* hist, bool in, u32 digit) {
  const u32 active = __ballot_sync(0xffffffffu, in);
  if (!in) return;
  const u32 same = __match_any_sync(active, digit);
  if ((int)(threadIdx.x % 32) == __ffs(same) - 1) atomicAdd(&hist[digit], __popc(same));
}

// Exclusive prefix sum of `v` over a block of WARPS warps; `total` gets the block's sum.
// Uses `warp_sums` ([WARPS]); every thread of the block must call it.
template <int WARPS>
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    int s = warp_sums[w];
    if (w < warp) before += s;
    total += s;
  }
  __syncthreads();  // warp_sums is reused by the next scan
  return before + x - v;
}

// Ordered compaction of one block's positions [begin, end): page `page_at(i)` of every
// chosen position goes to out[written + its rank among the chosen], in position order. A
// key (`key_at(i)`) is chosen above `thresh`, or equal to it among the first `take_equal`
// equal ones (the earlier pages). Every thread of the block calls it.
template <int WARPS, int THREADS, typename KeyAt, typename PageAt>
__device__ __forceinline__ void compact_chosen(int begin, int end, KeyAt key_at, u32 thresh, int take_equal,
                                               PageAt page_at, int* out, int written, int* warp_sums) {
  int equal_seen = 0;
  for (int base = begin; base < end; base += THREADS) {
    const int i = base + threadIdx.x;
    const bool in = i < end;
    const u32 key = in ? key_at(i) : 0u;
    const int is_eq = in && key == thresh;
    int eq_total;
    const int eq_rank = equal_seen + block_exclusive_scan<WARPS>(is_eq, warp_sums, eq_total);
    const int chosen = in && (key > thresh || (is_eq && eq_rank < take_equal));
    int chosen_total;
    const int at = written + block_exclusive_scan<WARPS>(chosen, warp_sums, chosen_total);
    if (chosen) out[at] = page_at(i);
    written += chosen_total;
    equal_seen += eq_total;
  }
}

// One warp (all 32 lanes): the digit of `hist` (256 bins, counts of keys matching the
// prefix so far) holding the need-th largest key. Lane l owns digits 255 - 8l down to
// 255 - 8l - 7; a warp scan gives the count above each lane's digits. Writes the extended
// prefix and how many keys equal to it are still to take.
__device__ __forceinline__ void radix_digit(const int* hist, int need, u32 prefix, int sh, u32* s_prefix,
                                            int* s_remaining) {
  const int lane = threadIdx.x % 32;
  int c[8], sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = hist[255 - 8 * lane - j];
    sum += c[j];
  }
  int incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  // Every lane has read `need` (often *s_remaining) before one of them rewrites it below (a
  // shuffle converges the lanes but orders no memory; racecheck flagged the pair).
  __syncwarp();
  int above = incl - sum;
  if (above < need && need <= incl) {  // exactly one lane
    int digit = 255 - 8 * lane - 7;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (above + c[j] >= need) {
        digit = 255 - 8 * lane - j;
        break;
      }
      above += c[j];
    }
    *s_prefix = prefix | ((u32)digit << sh);
    *s_remaining = need - above;  // how many keys equal to the threshold to take
  }
}

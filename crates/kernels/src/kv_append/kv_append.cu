// Appending new tokens to the paged KV cache, with rotary position embedding.
//
// kv_append: one block per new token (APPEND_THREADS threads, 16-byte items). Reads the token's fused QKV projection row
// [q heads | k heads | v heads] x HEAD_DIM, rotates q and k (HF "rotate_half" RoPE: dims i
// and i + D/2 form a pair, angle = position * inv_freq[i] computed in f32 as HF does),
// writes the rotated q to q_out and k, v to their slot of the layer's page pool
// [pages, kv_heads, page_size, D] (HND).
//
// key_bounds: one block per (touched page, kv head). Recomputes the element-wise min and
// max of the page's filled keys from the pool, so bounds stay right however many steps
// fill a page, with no atomics and no reset to order. Bounds are stored as int8 rounded
// outward with a power-of-two scale per 8 dims (kv_append/bounds.rs has the format and its
// CPU twin): 272 bytes per (page, head) at D = 128 instead of 512 in bf16, so sparse
// scoring reads half the bytes and the bounds still contain every finite key.
//
// KV_FP8: the pool holds e4m3 bytes of k / k_scale and v / v_scale (an FP8 KV cache,
// quantized here from the f32 rotated keys and the values; IEEE division, so the CPU
// backend's rounding gives the same bytes); the bounds are those of the keys the cache
// holds, byte times k_scale.
#include "common/key_bounds.cuh"
#include "common/fp8.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
constexpr int D = HEAD_DIM;
constexpr int HALF = D / 2;


// A key as the pool stores it, back to float (`scale`: the FP8 cache's).
__device__ __forceinline__ float from_kv(kv_t x, float scale) {
#if KV_FP8
  float lo, hi;
  e4m3x2_to_float(x, lo, hi);
  return lo * scale;
#else
  return to_float(x);
#endif
}

struct AppendParams {
  const elem_t* qkv;        // [tokens, qkv_stride]
  elem_t* q_out;            // [tokens, num_qo_heads, D]
  kv_t* k_pool;             // [pages, num_kv_heads, page_size, D]
  kv_t* v_pool;
  const int* positions;     // [tokens]
  const int* slots;         // [tokens] page * page_size + offset
  const float* inv_freq;    // [D / 2]
  long long qkv_stride;     // elements between tokens of qkv
  int num_tokens;
  int num_qo_heads;
  int num_kv_heads;
  int page_size;
  float k_scale;            // KV_FP8: the cache's scales (unused otherwise)
  float v_scale;
};

__device__ __forceinline__ void rope_pair(float x1, float x2, float c, float s, float& y1, float& y2) {
  y1 = x1 * c - x2 * s;
  y2 = x2 * c + x1 * s;
}

// Eight rotated or copied values to the pool: e4m3 bytes of y / scale (FP8 cache; IEEE
// division, as the CPU reference divides) or elem_t.
__device__ __forceinline__ void store_kv8(kv_t* dst, const float (&y)[8], float scale) {
#if KV_FP8
  float s[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) s[e] = __fdiv_rn(y[e], scale);
  store_e4m3x8_scaled(dst, s);
#else
  store8(dst, y);
#endif
}

// A token's work in 16-byte items: (q or k head, 8 pairs of dims i and i + D/2) to rotate,
// then (v head, 8 dims) to copy. A block holds APPEND_ITEMS of them a thread and issues
// every load of a round before its first store: with one item at a time, each load waited
// for the stores before it (the compiler cannot tell q_out and the pool from qkv), so a
// decode token cost a chain of ~20 round trips (16 us at batch 1 on the H200).
constexpr int APPEND_THREADS = 256;
constexpr int APPEND_ITEMS = 2;
constexpr int CHUNKS = HALF / 8;  // rotation items of a head
static_assert(HALF % 8 == 0, "whole 16-byte items a half head");

// grid tokens, block APPEND_THREADS.
extern "C" __global__ void __launch_bounds__(APPEND_THREADS) kv_append(const __grid_constant__ AppendParams p) {
  pdl_wait();
  const int t = blockIdx.x;
  if (t >= p.num_tokens) return;
  const elem_t* row = p.qkv + (long long)t * p.qkv_stride;
  const float pos = (float)p.positions[t];
  const int slot = p.slots[t];
  const int page = slot / p.page_size, off = slot - page * p.page_size;
  const int hq = p.num_qo_heads, hkv = p.num_kv_heads;
  const int rotated = (hq + hkv) * CHUNKS;
  const int items = rotated + hkv * (D / 8);
  for (int first = 0; first < items; first += APPEND_THREADS * APPEND_ITEMS) {
    vec16 lo[APPEND_ITEMS], hi[APPEND_ITEMS];
    float4 f0[APPEND_ITEMS], f1[APPEND_ITEMS];
#pragma unroll
    for (int j = 0; j < APPEND_ITEMS; ++j) {
      const int idx = first + threadIdx.x + j * APPEND_THREADS;
      if (idx < rotated) {
        const int head = idx / CHUNKS, c = idx - head * CHUNKS;
        const elem_t* src = row + head * D + c * 8;
        lo[j] = *(const vec16*)src;
        hi[j] = *(const vec16*)(src + HALF);
        f0[j] = *(const float4*)(p.inv_freq + c * 8);
        f1[j] = *(const float4*)(p.inv_freq + c * 8 + 4);
      } else if (idx < items) {
        lo[j] = *(const vec16*)(row + (hq + hkv) * D + (idx - rotated) * 8);
      }
    }
#pragma unroll
    for (int j = 0; j < APPEND_ITEMS; ++j) {
      const int idx = first + threadIdx.x + j * APPEND_THREADS;
      if (idx < rotated) {
        const int head = idx / CHUNKS, c = idx - head * CHUNKS;
        float x1[8], x2[8], y1[8], y2[8];
        unpack8(lo[j], x1);
        unpack8(hi[j], x2);
        const float freq[8] = {f0[j].x, f0[j].y, f0[j].z, f0[j].w, f1[j].x, f1[j].y, f1[j].z, f1[j].w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float s, co;
          sincosf(pos * freq[e], &s, &co);
          rope_pair(x1[e], x2[e], co, s, y1[e], y2[e]);
        }
        if (head < hq) {
          elem_t* dst = p.q_out + ((long long)t * hq + head) * D + c * 8;
          store8(dst, y1);
          store8(dst + HALF, y2);
        } else {
          kv_t* dst = p.k_pool + (((long long)page * hkv + (head - hq)) * p.page_size + off) * D + c * 8;
          store_kv8(dst, y1, p.k_scale);
          store_kv8(dst + HALF, y2, p.k_scale);
        }
      } else if (idx < items) {
        const int v = idx - rotated, vh = v / (D / 8), d = (v - vh * (D / 8)) * 8;
        kv_t* dst = p.v_pool + (((long long)page * hkv + vh) * p.page_size + off) * D + d;
#if KV_FP8
        float x[8];
        unpack8(lo[j], x);
        store_kv8(dst, x, p.v_scale);
#else
        *(vec16*)dst = lo[j];
#endif
      }
    }
  }
}

struct BoundsParams {
  const kv_t* k_pool;       // [pages, num_kv_heads, page_size, D]
  unsigned char* bounds;    // [pages, num_kv_heads] records of BOUNDS_RECORD bytes
  const int* pages;         // [num_touched] page ids
  const int* filled;        // [num_touched] filled slots of each page (1..=page_size)
  int num_touched;
  int num_kv_heads;
  int page_size;
  float k_scale;            // KV_FP8: the cache's key scale (unused otherwise)
};

static_assert(D / EXP_GROUP <= 16, "exponents fit the record's 16 trailing bytes");

// The smallest e in [EXP_MIN, EXP_MAX] with amax <= 127 * 2^e.
__device__ __forceinline__ int group_exponent(float amax) {
  if (amax != amax || amax <= 0.f) return EXP_MIN;
  if (amax == __int_as_float(0x7f800000)) return EXP_MAX;  // +inf
  int e = (int)((__float_as_uint(amax) >> 23) & 0xff) - 133;
  if (e >= EXP_MIN && amax > 127.f * pow2i(e)) e += 1;
  return min(max(e, EXP_MIN), EXP_MAX);
}

// x / 2^e rounded down or up, saturated to int8; non-finite values take the widest;
// nonzero values never round to 0.
__device__ __forceinline__ signed char quantize(float x, int e, bool up) {
  if (!(fabsf(x) <= 3.402823466e38f)) return up ? 127 : -128;  // NaN or inf
  float r = x * pow2i(-e);
  r = up ? ceilf(r) : floorf(r);
  if (r == 0.f && !up && x < 0.f) r = -1.f;
  if (r == 0.f && up && x > 0.f) r = 1.f;
  return (signed char)fminf(fmaxf(r, -128.f), 127.f);
}

// |x| if finite, else 0: the exponent follows the finite values only.
__device__ __forceinline__ float finite_abs(float x) {
  const float a = fabsf(x);
  return a <= 3.402823466e38f ? a : 0.f;
}

// grid (num_touched, num_kv_heads), D threads: thread d scans dim d of the filled slots;
// the 8 lanes of a group agree on its exponent by shuffles.
extern "C" __global__ void key_bounds(const __grid_constant__ BoundsParams p) {
  pdl_wait();
  const int i = blockIdx.x, kh = blockIdx.y, d = threadIdx.x;
  if (i >= p.num_touched) return;  // uniform over the block
  const long long page = p.pages[i];
  const kv_t* k = p.k_pool + ((page * p.num_kv_heads + kh) * p.page_size) * D + d;
  float lo = from_kv(k[0], p.k_scale), hi = lo;
  for (int s = 1; s < p.filled[i]; ++s) {
    float x = from_kv(k[(long long)s * D], p.k_scale);
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  float amax = fmaxf(finite_abs(lo), finite_abs(hi));
#pragma unroll
  for (int o = 1; o < EXP_GROUP; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const int e = group_exponent(amax);
  unsigned char* rec = p.bounds + (page * p.num_kv_heads + kh) * BOUNDS_RECORD;
  rec[d] = (unsigned char)quantize(lo, e, false);
  rec[D + d] = (unsigned char)quantize(hi, e, true);
  if (d % EXP_GROUP == 0) rec[2 * D + d / EXP_GROUP] = (unsigned char)(signed char)e;
  if (d < 16 - D / EXP_GROUP) rec[2 * D + D / EXP_GROUP + d] = 0;  // padding
}

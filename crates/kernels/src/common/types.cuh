// Element types and conversions, written with PTX so kernels need no CUDA headers:
// NVRTC alone compiles them (no toolkit include folder on the user's machine).
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// Programmatic dependent launch (crates/gpu/src/jit/pdl.rs): on Hopper every kernel may be
// launched while the one before it on the stream is still running. Each kernel calls this
// first, before any global memory access: it waits until the previous grid has finished and
// its writes are visible, then lets the next kernel's blocks be scheduled (they wait here
// in turn). A no-op for an ordinary launch and before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// 16 bytes moved as one (vectorised global and shared accesses).
struct __align__(16) vec16 { u32 x, y, z, w; };

// 16-bit floats as raw bits. Arithmetic happens in f32 or on tensor cores.
struct half_t { u16 bits; };
struct bfloat16_t { u16 bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_float(bfloat16_t x) {
  return __uint_as_float(((u32)x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float f) {
  half_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}
template <> __device__ __forceinline__ bfloat16_t from_float<bfloat16_t>(float f) {
  bfloat16_t b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(f));
  return b;
}

// Two floats packed into one 32-bit register of two 16-bit values, `lo` in the low half
// (the operand order tensor-core fragments expect).
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<half_t>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ u32 pack2<bfloat16_t>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// The two halves of a packed register back to floats.
template <typename T> __device__ __forceinline__ void unpack2(u32 v, float& lo, float& hi);
template <> __device__ __forceinline__ void unpack2<half_t>(u32 v, float& lo, float& hi) {
  half_t a{(u16)(v & 0xffff)}, b{(u16)(v >> 16)};
  lo = to_float(a);
  hi = to_float(b);
}
template <> __device__ __forceinline__ void unpack2<bfloat16_t>(u32 v, float& lo, float& hi) {
  lo = __uint_as_float(v << 16);
  hi = __uint_as_float(v & 0xffff0000u);
}

// DTYPE is defined by the launcher (-DDTYPE=...): the element type of one specialisation.
#define RS_F16 1
#define RS_BF16 2
#if defined(DTYPE) && DTYPE == RS_F16
typedef half_t elem_t;
#elif defined(DTYPE) && DTYPE == RS_BF16
typedef bfloat16_t elem_t;
#endif

#if defined(DTYPE)
// Eight elements of a 16-byte vector as floats, and back (rounded to elem_t).
__device__ __forceinline__ void unpack8(const vec16& v, float (&f)[8]) {
  unpack2<elem_t>(v.x, f[0], f[1]);
  unpack2<elem_t>(v.y, f[2], f[3]);
  unpack2<elem_t>(v.z, f[4], f[5]);
  unpack2<elem_t>(v.w, f[6], f[7]);
}
__device__ __forceinline__ void load8(const elem_t* p, float (&f)[8]) { unpack8(*(const vec16*)p, f); }
// A row's 16-byte vectors v = threadIdx.x + j * THREADS (j < VECS, v < nvec) into registers,
// every load issued before the caller's first store (a store between them, to memory the
// compiler cannot tell apart from `row`, would keep each load a round trip apart).
template <int VECS, int THREADS>
__device__ __forceinline__ void load_row_vecs(const elem_t* row, int nvec, vec16 (&out)[VECS]) {
#pragma unroll
  for (int j = 0; j < VECS; ++j) {
    const int v = threadIdx.x + j * THREADS;
    if (v < nvec) out[j] = *(const vec16*)(row + v * 8);
  }
}
__device__ __forceinline__ void store8(elem_t* p, const float (&f)[8]) {
  vec16 v;
  v.x = pack2<elem_t>(f[0], f[1]);
  v.y = pack2<elem_t>(f[2], f[3]);
  v.z = pack2<elem_t>(f[4], f[5]);
  v.w = pack2<elem_t>(f[6], f[7]);
  *(vec16*)p = v;
}
#endif

// Sum and max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024 threads); `scratch`
// holds 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)blockDim.x / 32; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Largest of non-negative `v` over the block (0 if all are 0; NaN ignored), as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = 0.f;
  for (int w = 0; w < (int)blockDim.x / 32; ++w) m = fmaxf(m, scratch[w]);
  __syncthreads();
  return m;
}

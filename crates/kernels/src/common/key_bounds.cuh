// The stored per-page key bounds (kv_append/bounds.rs has the format and its CPU twin):
// one record per (page, kv head) of [lo i8 x D][hi i8 x D][exponent i8 x D/8][zeros to
// 16 bytes]; a bound is q * 2^exponent[d / 8], lo rounded down and hi up.
#pragma once
#include "common/types.cuh"

constexpr int EXP_GROUP = 8, EXP_MIN = -126, EXP_MAX = 126;
// A record's size comes from the host (radix_kv::bounds_record_bytes), the one definition.
#ifndef BOUNDS_RECORD_BYTES
#error "BOUNDS_RECORD_BYTES must be defined (radix_kv::bounds_record_bytes(HEAD_DIM))"
#endif
constexpr int BOUNDS_RECORD = BOUNDS_RECORD_BYTES;

// 2^e for e in [EXP_MIN, EXP_MAX], exactly.
__device__ __forceinline__ float pow2i(int e) { return __int_as_float((e + 127) << 23); }

// The four signed bytes of `w` as floats, exactly, without I2F (a quarter-rate instruction
// that bound the scoring passes): each byte, offset to unsigned (b + 128), becomes the low
// mantissa byte of 2^23 (prmt), and 2^23 + 128 is subtracted.
__device__ __forceinline__ void s8x4_to_float(u32 w, float (&f)[4]) {
  const u32 x = w ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(0x4B000000u), "r"(0x7440u + i));
    f[i] = __uint_as_float(r) - 8388736.f;
  }
}

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

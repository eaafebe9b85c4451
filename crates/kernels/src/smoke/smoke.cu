// A small kernel that proves the JIT path end to end: parameters passed as one struct,
// a 16-bit element type chosen by -DDTYPE, conversions both ways.
#include "common/types.cuh"

struct SmokeParams {
  const elem_t* x;  // [n]
  elem_t* out;      // [n]
  float scale;
  float shift;
  u32 n;
};

// out[i] = scale * x[i] + shift, rounded to the element type.
extern "C" __global__ void smoke_affine(const __grid_constant__ SmokeParams p) {
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x) {
    p.out[i] = from_float<elem_t>(p.scale * to_float(p.x[i]) + p.shift);
  }
}

// Sampling on the GPU, one block per logits row; only token ids (and log-probabilities)
// go back to the host.
//
// Greedy: argmax. Otherwise the Gumbel-max trick: argmax(l/T + g) with g = -ln(-ln u)
// is a sample of softmax(l/T); u comes from a counter hash of (seed, index, token), the
// same as the CPU's `uniform`, so a seeded request draws the same way however it is
// batched. top-k, top-p and min-p become one logit threshold tau (found by bisection over
// block reductions), and the argmax runs over logits >= tau: an exact sample of the
// truncated, renormalised distribution (unlike the host, which keeps exactly k, top-k
// keeps every token tied with the k-th largest logit). Log-probabilities are of the raw
// logits.
//
// Per row, optionally: the `top_n` most likely raw tokens (n passes of a block argmax
// under the order (logit desc, id asc), NaN as -inf), then `logit_bias` and an allowed-
// token bitmask (structured output) applied to the row in place before sampling. The
// row's raw log-sum-exp is taken first, and the sampled token's raw logit is recovered by
// subtracting its bias, so every reported log-probability is of the raw distribution.
// In-place edits leave the logits buffer biased and masked for the rows that asked.
#include "common/types.cuh"

struct SampleRow {
  float temperature;  // <= 0: greedy
  float top_p;        // 1: off
  float min_p;        // 0: off
  int top_k;          // 0: off
  unsigned long long seed;
  unsigned long long index;
  int bias_start;     // into the extras' bias lists
  int bias_count;     // 0: no bias
  int top_n;          // alternatives to report, <= top_stride
  int mask_row;       // row of the extras' bitmasks, -1: every token allowed
  int target;         // >= 0: score this token instead of sampling (prompt logprobs)
  int reserved;
};

struct SampleParams {
  const float* logits;  // [rows, vocab]; rows with bias or a mask are edited in place
  const SampleRow* params;
  int* tokens;          // [rows]
  float* logprobs;      // [rows]
  // Extras (may be null when no row uses them): bias tokens and values, bitmasks.
  const unsigned* bias_tokens;
  const float* bias_values;
  const unsigned* masks;  // [mask rows, mask_words]
  int mask_words;
  int* top_tokens;        // [rows, top_stride]
  float* top_logprobs;    // [rows, top_stride]
  int top_stride;
  int rows;
  int vocab;
};

constexpr int THREADS = 1024;

__device__ __forceinline__ float uniform01(unsigned long long seed, unsigned long long index, unsigned long long salt) {
  unsigned long long z = seed ^ (index * 0x9E3779B97F4A7C15ull) ^ (salt * 0xD1B54A32D192ED03ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)(z >> 40) * (1.0f / 16777216.0f);
}

__device__ float reduce_max(float v, float* s) {
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) s[threadIdx.x / 32] = v;
  __syncthreads();
  float r = s[0];
  for (int w = 1; w < THREADS / 32; ++w) r = fmaxf(r, s[w]);
  __syncthreads();
  return r;
}

__device__ float reduce_sum(float v, float* s) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) s[threadIdx.x / 32] = v;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < THREADS / 32; ++w) r += s[w];
  __syncthreads();
  return r;
}

// (value, index) argmax, lowest index on ties.
__device__ void reduce_argmax(float& v, int& idx, float* sv, int* si) {
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
  }
  if (threadIdx.x % 32 == 0) { sv[threadIdx.x / 32] = v; si[threadIdx.x / 32] = idx; }
  __syncthreads();
  v = sv[0]; idx = si[0];
  for (int w = 1; w < THREADS / 32; ++w)
    if (sv[w] > v || (sv[w] == v && si[w] < idx)) { v = sv[w]; idx = si[w]; }
  __syncthreads();
}

// The row's `n` most likely tokens, highest first, lowest id on ties, NaN as -inf.
__device__ void top_tokens(const float* l, int vocab, int n, float log_z, int* out_t, float* out_l,
                           float* sv, int* si) {
  const float inf = __int_as_float(0x7f800000);
  float pv = inf;
  int pi = -1;
  for (int j = 0; j < n && j < vocab; ++j) {
    float best = -inf;
    int best_i = vocab;
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
      float x = l[i];
      if (isnan(x)) x = -inf;
      const bool after = x < pv || (x == pv && i > pi);  // not yet reported
      if (after && (x > best || (x == best && i < best_i))) { best = x; best_i = i; }
    }
    reduce_argmax(best, best_i, sv, si);
    if (best_i >= vocab) break;
    if (threadIdx.x == 0) { out_t[j] = best_i; out_l[j] = l[best_i] - log_z; }
    pv = best; pi = best_i;
  }
}

// The score a token's logit `x` competes with in the final argmax: the logit itself
// (greedy) or x / T plus its Gumbel noise.
__device__ __forceinline__ float draw_score(float x, int i, bool greedy, float t, const SampleRow& prm) {
  return greedy ? x : x / t - __logf(-__logf(fmaxf(uniform01(prm.seed, prm.index, (unsigned long long)i + 1), 1e-20f)));
}

// Folds logit `x` of token `i` into a thread's running log-sum-exp (m, z) and argmax.
// -inf adds nothing (as exp(-inf - m) does below); NaN poisons z, as it does there.
__device__ __forceinline__ void visit(float x, int i, bool greedy, float t, const SampleRow& prm,
                                      float& m, float& z, float& best, int& best_i) {
  if (x > m) {
    z = z * __expf(m - x) + 1.f;
    m = x;
  } else if (x != -__int_as_float(0x7f800000)) {
    z += __expf(x - m);
  }
  const float score = draw_score(x, i, greedy, t, prm);
  if (score > best || (score == best && i < best_i)) { best = score; best_i = i; }
}

// A row with nothing to filter, edit or report besides its token (greedy, or a plain
// temperature): its log-sum-exp and the argmax of its scores in one pass over the logits,
// instead of the three passes below (max, sum, argmax). 16-byte loads where rows allow.
__device__ void sample_plain(const SampleParams& p, const SampleRow& prm, const float* l, int r,
                             float* sv, int* si) {
  const bool greedy = prm.temperature <= 0.f;
  const float t = greedy ? 1.f : prm.temperature;
  const float inf = __int_as_float(0x7f800000);
  float m = -inf, z = 0.f, best = -inf;
  int best_i = p.vocab;
  if (p.vocab % 4 == 0) {
    const float4* l4 = (const float4*)l;
#pragma unroll 4
    for (int v = threadIdx.x; v < p.vocab / 4; v += THREADS) {
      const float4 x = l4[v];
      visit(x.x, 4 * v, greedy, t, prm, m, z, best, best_i);
      visit(x.y, 4 * v + 1, greedy, t, prm, m, z, best, best_i);
      visit(x.z, 4 * v + 2, greedy, t, prm, m, z, best, best_i);
      visit(x.w, 4 * v + 3, greedy, t, prm, m, z, best, best_i);
    }
  } else {
    for (int i = threadIdx.x; i < p.vocab; i += THREADS) visit(l[i], i, greedy, t, prm, m, z, best, best_i);
  }
  const float row_m = reduce_max(m, sv);
  // A thread whose maximum is still -inf saw only -inf (z = 0: adds nothing) or NaN too
  // (z = NaN: poisons the row, as in the full path); rescaling would give NaN either way.
  const float row_z = reduce_sum(m == -inf ? z : z * __expf(m - row_m), sv);
  reduce_argmax(best, best_i, sv, si);
  if (threadIdx.x == 0) {
    const int tok = best_i < p.vocab ? best_i : 0;
    p.tokens[r] = tok;
    p.logprobs[r] = l[tok] - (row_m + __logf(row_z));
  }
}

extern "C" __global__ void __launch_bounds__(THREADS) sample_rows(const __grid_constant__ SampleParams p) {
  pdl_wait();
  __shared__ float sv[32];
  __shared__ int si[32];
  const int r = blockIdx.x;
  const SampleRow prm = p.params[r];
  float* l = const_cast<float*>(p.logits) + (long long)r * p.vocab;
  const bool greedy = prm.temperature <= 0.f;
  const float t = greedy ? 1.f : prm.temperature;
  const bool filters = prm.min_p > 0.f || (prm.top_k > 0 && prm.top_k < p.vocab) || prm.top_p < 1.f;
  if (prm.top_n <= 0 && prm.target < 0 && prm.bias_count == 0 && prm.mask_row < 0 && (greedy || !filters)) {
    sample_plain(p, prm, l, r, sv, si);
    return;
  }

  float m = -__int_as_float(0x7f800000);
  for (int i = threadIdx.x; i < p.vocab; i += THREADS) m = fmaxf(m, l[i]);
  m = reduce_max(m, sv);
  float z = 0.f;
  for (int i = threadIdx.x; i < p.vocab; i += THREADS) z += __expf(l[i] - m);
  const float log_z = m + __logf(reduce_sum(z, sv));

  if (prm.top_n > 0)
    top_tokens(l, p.vocab, prm.top_n, log_z, p.top_tokens + (long long)r * p.top_stride,
               p.top_logprobs + (long long)r * p.top_stride, sv, si);

  if (prm.target >= 0) {  // scoring: the target's raw log-probability, no draw
    if (threadIdx.x == 0) {
      const int tok = prm.target < p.vocab ? prm.target : 0;
      p.tokens[r] = tok;
      p.logprobs[r] = l[tok] - log_z;
    }
    return;
  }

  // Bias and mask, in place; then the maximum the filters below start from is the
  // edited row's.
  if (prm.bias_count > 0 || prm.mask_row >= 0) {
    __syncthreads();  // every thread has read the raw row
    if (prm.mask_row >= 0) {
      // As on the host: a mask that allows no token with a finite logit is ignored
      // rather than leaving nothing to sample.
      const unsigned* mask = p.masks + (long long)prm.mask_row * p.mask_words;
      float usable = 0.f;
      for (int i = threadIdx.x; i < p.vocab; i += THREADS)
        usable += ((mask[i >> 5] >> (i & 31)) & 1u) && isfinite(l[i]) ? 1.f : 0.f;
      if (reduce_sum(usable, sv) > 0.f)
        for (int i = threadIdx.x; i < p.vocab; i += THREADS)
          if (!((mask[i >> 5] >> (i & 31)) & 1u)) l[i] = -__int_as_float(0x7f800000);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < prm.bias_count; b += THREADS) {
      const unsigned tok = p.bias_tokens[prm.bias_start + b];
      if (tok < (unsigned)p.vocab) l[tok] += p.bias_values[prm.bias_start + b];
    }
    __syncthreads();
    m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < p.vocab; i += THREADS) m = fmaxf(m, l[i]);
    m = reduce_max(m, sv);
  }

  // Threshold tau on logits: everything below it is filtered out.
  float tau = -__int_as_float(0x7f800000);
  if (!greedy) {
    if (prm.min_p > 0.f) tau = fmaxf(tau, m + t * __logf(prm.min_p));
    if (prm.top_k > 0 && prm.top_k < p.vocab) {
      // Largest tau with count(l >= tau) >= k, by bisection between m - 64T and m.
      float lo = m - 64.f * t, hi = m;
      for (int it = 0; it < 28; ++it) {
        float mid = 0.5f * (lo + hi);
        float c = 0.f;
        for (int i = threadIdx.x; i < p.vocab; i += THREADS) c += l[i] >= mid ? 1.f : 0.f;
        if (reduce_sum(c, sv) >= (float)prm.top_k) lo = mid; else hi = mid;
      }
      tau = fmaxf(tau, lo);
    }
    if (prm.top_p < 1.f) {
      // Mass of what survives so far, then the largest tau keeping >= top_p of it.
      float mass = 0.f;
      for (int i = threadIdx.x; i < p.vocab; i += THREADS) mass += l[i] >= tau ? __expf((l[i] - m) / t) : 0.f;
      const float target = prm.top_p * reduce_sum(mass, sv);
      float lo = fmaxf(tau, m - 64.f * t), hi = m;
      for (int it = 0; it < 28; ++it) {
        float mid = 0.5f * (lo + hi);
        float s = 0.f;
        for (int i = threadIdx.x; i < p.vocab; i += THREADS) s += l[i] >= mid ? __expf((l[i] - m) / t) : 0.f;
        if (reduce_sum(s, sv) >= target) lo = mid; else hi = mid;
      }
      tau = fmaxf(tau, lo);
    }
  }

  float best = -__int_as_float(0x7f800000);
  int best_i = p.vocab;
  for (int i = threadIdx.x; i < p.vocab; i += THREADS) {
    float x = l[i];
    if (x < tau) continue;
    const float score = draw_score(x, i, greedy, t, prm);
    if (score > best || (score == best && i < best_i)) { best = score; best_i = i; }
  }
  reduce_argmax(best, best_i, sv, si);
  if (threadIdx.x == 0) {
    int tok = best_i < p.vocab ? best_i : 0;
    // The raw logit: the edited one less the token's bias (a sampled token is allowed).
    float raw = l[tok];
    for (int b = 0; b < prm.bias_count; ++b)
      if (p.bias_tokens[prm.bias_start + b] == (unsigned)tok) raw -= p.bias_values[prm.bias_start + b];
    p.tokens[r] = tok;
    p.logprobs[r] = raw - log_z;
  }
}

// Microbenchmark: the shipped page_scores (sparse.cu, int8 bounds records) at batch 1, 4
// and 32 of 32K-token sequences, for the chunk of pages one warp item covers
// (-DSCORE_CHUNK=8, 16 or 32). Llama-3-8B heads, pages shuffled, L2 flushed per run.
//   for c in 8 16 32; do nvcc -O3 -arch=sm_90a -std=c++17 -DDTYPE=RS_BF16 -DGROUP=4 \
//     -DSCORE_CHUNK=$c -I crates/kernels/src bench/micro/page_scores_chunk.cu -o /tmp/psc$c \
//     && /tmp/psc$c; done
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "sparse/sparse.cu"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1);} } while (0)

int main() {
  const int PAGES = 2048, HKV = 8, HQ = 32, MAXB = 32, POOL = MAXB * PAGES + 64;
  std::mt19937 rng(1);
  std::vector<int> perm(POOL);
  for (int i = 0; i < POOL; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<unsigned char> rec((size_t)POOL * HKV * RECORD);
  for (auto& x : rec) x = rng() & 0xff;
  for (size_t r = 0; r < (size_t)POOL * HKV; ++r)
    for (int g = 0; g < D / EXP_GROUP; ++g) rec[r * RECORD + 2 * D + g] = (unsigned char)(signed char)(-(int)(rng() % 8));
  std::vector<unsigned short> qh(MAXB * HQ * D);
  for (auto& x : qh) x = 0x3f80 ^ (rng() & 0x807f);
  void *d_rec, *d_q, *d_sc, *d_ip, *d_ix, *d_qo, *d_keep, *flush;
  CK(cudaMalloc(&d_rec, rec.size())); CK(cudaMemcpy(d_rec, rec.data(), rec.size(), cudaMemcpyHostToDevice));
  CK(cudaMalloc(&d_q, qh.size() * 2)); CK(cudaMemcpy(d_q, qh.data(), qh.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&d_sc, (size_t)MAXB * PAGES * HKV * 4));
  CK(cudaMalloc(&d_ix, (size_t)MAXB * PAGES * 4)); CK(cudaMemcpy(d_ix, perm.data(), (size_t)MAXB * PAGES * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&d_ip, (MAXB + 1) * 4)); CK(cudaMalloc(&d_qo, (MAXB + 1) * 4)); CK(cudaMalloc(&d_keep, MAXB * 4));
  size_t flush_bytes = 256u << 20; CK(cudaMalloc(&flush, flush_bytes));
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (int B : {1, 4, 32}) {
    std::vector<int> ip(B + 1), qo(B + 1), keep(B, 614);
    for (int b = 0; b <= B; ++b) { ip[b] = b * PAGES; qo[b] = b; }
    CK(cudaMemcpy(d_ip, ip.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_qo, qo.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_keep, keep.data(), B * 4, cudaMemcpyHostToDevice));
    ScoreParams p{};
    p.q = (const elem_t*)d_q; p.bounds = (const unsigned char*)d_rec; p.scores = (float*)d_sc;
    p.qo_indptr = (int*)d_qo; p.kv_indptr = (int*)d_ip; p.kv_indices = (int*)d_ix; p.keep = (int*)d_keep;
    p.q_stride = HQ * D; p.batch = B; p.num_kv_heads = HKV; p.group = GROUP;
    std::vector<float> t;
    for (int r = 0; r < 60; ++r) {
      CK(cudaMemsetAsync(flush, r, flush_bytes));
      CK(cudaEventRecord(e0)); page_scores<<<4 * sms, 256>>>(p); CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
      float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); if (r >= 10) t.push_back(ms * 1000);
    }
    CK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    double bytes = (double)B * PAGES * HKV * RECORD;
    printf("chunk %2d  B=%2d  median %6.1f us  min %6.1f us  %5.0f GB/s\n", SCORE_CHUNK, B, t[t.size() / 2], t[0], bytes / (t[t.size() / 2] * 1e3));
  }
  return 0;
}

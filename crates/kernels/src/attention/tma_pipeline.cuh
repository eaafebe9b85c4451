// The TMA kernels' pipeline (TMA = 1; included by attention.cu after its constants, tile
// layout and softmax, and used by the one-item kernel there and the persistent one in
// attention/tma.cuh): the K/V stage barriers, the producer warp's TMA copies, the
// warpgroups' ping-pong turns, and the consumers' overlapped loop over the stages.
//
// Named barriers: 1 the compute threads (block_sync), 2 + w warpgroup w's ping-pong turn
// (256 threads: it and its predecessor), 8 + w within warpgroup w (128), 6 the persistent
// kernel's end of a task's turns.
// The barriers of the TMA kernels' K and V stages: full (the producer's arrival plus the
// tile's bytes) and empty (the consumer threads), stage s at + 8 s. Tile g (counted from
// the block's first) goes into stage g % ST, phase (g / ST) & 1.
struct Stages {
  u32 kfull, kempty, vfull, vempty;
};

// The TMA producer (one warp; lane 0 arms the barriers): tiles g0, g0 + 1, ... of keys
// [kv_begin, kv_stop) of kv head kvh, K tile g into its stage once the consumers released
// the stage's previous tile, then V tile g likewise, each landing on its full barrier by
// byte count.
// kv_base is the kv_indptr entry of the sequence's table row. Contiguous K/V: one [BN, 64]
// box per column block at the sequence's first token plus the tile's (past the tensor's end
// TMA fills zeros), issued by lane 0. Paged: one box per page (min(page_size, BN) rows,
// page_size >= 8 so boxes keep the swizzle's 1024-byte atoms), lane j looking up box j's
// page id (a tile ahead) and issuing it, pages past the sequence not copied. Rows past
// kv_stop hold whatever was there: scores mask them, and the consumers zero V's before
// P V reads them (0 x NaN would not be 0).
__device__ void produce_kv_tma(const KernelParams& kp, int kvh, int kv_begin, int n_tiles, int kv_stop, int kv_base,
                               int g0, u32 sk0, u32 sv0, const Stages& bar, int lane) {
  constexpr u32 STAGE = BN * D * 2;
#if PAGED
  const AttentionParams& p = kp.p;
  const int* pages = p.kv_indices + kv_base;
  const int prow = min(p.page_size, BN);  // rows per box
  // Lane j: the pool row where box j of tile i starts (boxes past the sequence: 0).
  auto box_row_of = [&](int i) {
    const int key = kv_begin + i * BN + lane * prow;
    if (lane * prow >= BN || key >= kv_stop) return 0;
    const int page = __ldg(pages + (key >> p.page_shift));
    return (page * p.num_kv_heads + kvh) * p.page_size + (key & (p.page_size - 1));
  };
#if TMA_PAGED_AHEAD
  // Tile i + 1's page ids are asked for before waiting on tile i's stages, so the
  // lookup's latency hides under that wait rather than following it.
  int next_row = n_tiles > 0 ? box_row_of(0) : 0;
#endif
#else
  const int first_token = kv_base;
#endif
  for (int i = 0; i < n_tiles; ++i) {
    __syncwarp();  // (every lane waits on the stages itself: keep them in step)
    const int g = g0 + i, st = g % ST;
    const u32 parity = (g / ST - 1) & 1;  // of the release awaited (g >= ST)
    const int tile_start = kv_begin + i * BN;
#if PAGED
    const int boxes = (min(BN, kv_stop - tile_start) + prow - 1) / prow;
#if TMA_PAGED_AHEAD
    const int box_row = next_row;
    if (i + 1 < n_tiles) next_row = box_row_of(i + 1);
#else
    const int box_row = box_row_of(i);
#endif
    const u32 bytes = boxes * prow * D * 2;
#else
    const u32 bytes = STAGE;
#endif
#pragma unroll
    for (int kv = 0; kv < 2; ++kv) {
      const u32 full = (kv ? bar.vfull : bar.kfull) + st * 8;
      const u32 dst = (kv ? sv0 : sk0) + st * STAGE;
      const TmaMap* map = kv ? &kp.v_map : &kp.k_map;
      if (g >= ST) mbar_wait((kv ? bar.vempty : bar.kempty) + st * 8, parity);
      if (lane == 0) mbar_arrive_expect_tx(full, bytes);
#if PAGED && TMA_PAGED_AHEAD
      // Each lane issues its own box (the barrier's transaction count may dip below zero
      // before lane 0's expect_tx: the phase still waits for that arrival).
      if (lane < boxes) {
#pragma unroll
        for (int c = 0; c < D / 64; ++c) tma_load_2d(dst + c * BN * 128 + lane * prow * 128, map, full, c * 64, box_row);
      }
#elif PAGED
      for (int j = 0; j < boxes; ++j) {
        const int row = __shfl_sync(0xffffffffu, box_row, j);
        if (lane == 0) {
#pragma unroll
          for (int c = 0; c < D / 64; ++c) tma_load_2d(dst + c * BN * 128 + j * prow * 128, map, full, c * 64, row);
        }
      }
#else
      if (lane == 0) {
#pragma unroll
        for (int c = 0; c < D / 64; ++c) tma_load_3d(dst + c * BN * 128, map, full, c * 64, kvh, first_token + tile_start);
      }
#endif
    }
  }
}

// Ping-pong (FlashAttention-3): the n warpgroups with rows take turns issuing their
// wgmmas in a ring. Warpgroup w's turn is named barrier 2 + w, which its predecessor
// arrives at when it has issued (256 threads: the two of them).
__device__ __forceinline__ void turn_wait(int wg) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(2 + wg) : "memory");
}
__device__ __forceinline__ void turn_pass(int wg, int n) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(wg + 1 == n ? 2 : 3 + wg) : "memory");
}
// A barrier among warpgroup wg's own 128 threads (named barrier 8 + wg).
__device__ __forceinline__ void wg_bar_sync(int wg) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(8 + wg) : "memory");
}

// Zeroes rows [valid, BN) of the V tile at `sv` (the last tile's rows past kv_stop), by
// the 128 threads of warpgroup `wg`, before its P V reads the tile: P is 0 there, but the
// rows hold whatever the box brought (another sequence's values, a page's unused slots).
// Every warpgroup writes the same zeros, one perhaps while the other's P V reads them: the
// bytes do not change. Each orders its own writes before its wgmmas.
__device__ __forceinline__ void zero_v_tail(u32 sv, int valid, int wg) {
  for (int i = valid * DC + threadIdx.x % 128; i < BN * DC; i += 128) {
    asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};\n" ::"r"(sv + swz<BN>(i / DC, i % DC)), "r"(0u) : "memory");
  }
  fence_proxy_async();
  wg_bar_sync(wg);
}

// The TMA kernels' overlapped loop for one warpgroup, up to the last tile's P V: Q Kᵀ of
// tile j is issued with P V of tile j - 1, whose P waits in p_frag; K's stage is released
// once the scores are in registers, V's once its P V is done. Tile 0 is peeled off so that
// the loop body has one shape: with branches on j between a wgmma and its wait, ptxas
// serialises the wgmmas (C7514, C7518 in the verbose log). Tiles are counted from g, a
// multiple of ST (stage j % ST: the compiler keeps the descriptors on the uniform datapath).
// With ping-pong the n_wg warpgroups take turns issuing (turn_wait, turn_pass).
__device__ __forceinline__ void tma_overlapped_tiles(const AttentionParams& p, u32 q_rows, u32 sk0, u32 sv0,
                                                     const Stages& bar, int g, int n_tiles, int kv_begin, int kv_stop,
                                                     int mask_free_end, const int (&row_limit)[MT][2], bool pingpong,
                                                     int wg, int n_wg, int lane, float (&o_acc)[MT][ON][4],
                                                     float (&m_run)[MT][2], float (&l_run)[MT][2],
                                                     u32 (&p_frag)[PK][4]) {
  constexpr u32 STAGE = BN * D * 2;
  float s[MT][NT][4];
  float(&s_flat)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(s[0]);  // as wgmma lays it out
  auto issue_qk = [&](int st) {  // S = Q Kᵀ against K stage st
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) {
      const u64 da = wgmma_desc(q_rows + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024);
      const u64 db = wgmma_desc(sk0 + st * STAGE + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024);
      wgmma_ss<BN, mma_t>(s_flat, da, db, kk > 0);
    }
    wgmma_commit();
  };
  auto my_turn = [&] {
    if (pingpong) turn_wait(wg);
  };
  auto their_turn = [&] {
    if (pingpong) turn_pass(wg, n_wg);
  };
  mbar_wait(bar.kfull, (g / ST) & 1);
  my_turn();
  issue_qk(0);
  their_turn();
  wgmma_wait<0>();
  wgmma_fence_regs(s_flat);
  mbar_arrive(bar.kempty);
  {
    float alpha[MT][2];  // O is still zero: no rescale
    softmax_tile(s, m_run, l_run, alpha, row_limit, kv_begin, kv_begin + BN > min(kv_stop, mask_free_end),
                 p.scale_log2, lane);
  }
#pragma unroll
  for (int kk = 0; kk < PK; ++kk) pack_p(s, 0, kk, p_frag[kk]);
  for (int j = 1; j < n_tiles; ++j) {
    const int st = j % ST, pst = (j - 1) % ST;  // this tile's stage, the previous one's
    const int tile_start = kv_begin + j * BN;
    mbar_wait(bar.kfull + st * 8, ((g + j) / ST) & 1);
    my_turn();
    issue_qk(st);
    mbar_wait(bar.vfull + pst * 8, ((g + j - 1) / ST) & 1);
    wgmma_pv(p_frag, sv0 + pst * STAGE, o_acc);
    their_turn();
    wgmma_wait<1>();  // Q Kᵀ done; P V may still run
    wgmma_fence_regs(s_flat);
    mbar_arrive(bar.kempty + st * 8);
    float alpha[MT][2];
    const bool rescale = softmax_tile(s, m_run, l_run, alpha, row_limit, tile_start,
                                      tile_start + BN > min(kv_stop, mask_free_end), p.scale_log2, lane);
    wgmma_fence_regs(s_flat);  // keeps the softmax above the wait, in the P V's shadow
    wgmma_pv_done(p_frag, o_acc);
    mbar_arrive(bar.vempty + pst * 8);
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int n = 0; n < ON; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) o_acc[0][n][i] *= alpha[0][i / 2];
    }
#pragma unroll
    for (int kk = 0; kk < PK; ++kk) pack_p(s, 0, kk, p_frag[kk]);
  }
}

// The last tile's P V (tile g + n_tiles - 1 of keys from kv_begin), its rows past kv_stop
// zeroed first; returns its stage.
__device__ __forceinline__ int tma_last_pv(u32 sv0, const Stages& bar, int g, int n_tiles, int kv_begin, int kv_stop,
                                           int wg, float (&o_acc)[MT][ON][4], u32 (&p_frag)[PK][4]) {
  constexpr u32 STAGE = BN * D * 2;
  const int lst = (n_tiles - 1) % ST;
  mbar_wait(bar.vfull + lst * 8, ((g + n_tiles - 1) / ST) & 1);
  const int valid = kv_stop - (kv_begin + (n_tiles - 1) * BN);
  if (valid < BN) zero_v_tail(sv0 + lst * STAGE, valid, wg);
  wgmma_pv(p_frag, sv0 + lst * STAGE, o_acc);
  wgmma_pv_done(p_frag, o_acc);
  return lst;
}

// Tiles [from, n_tiles) of the one-item kernel (tiles counted from 0, one item a block:
// not for the persistent kernel, whose barriers carry on across tasks) for a warpgroup
// none of whose rows sees their keys (causal, WG_SKIP): it takes its ping-pong turns and
// releases each stage once its tile has landed (an earlier release would count toward the
// stage's previous tile), computing nothing. First it releases the V of tile from - 1,
// whose P V `tma_last_pv` has done (that function releases nothing).
__device__ __forceinline__ void tma_idle_tiles(const Stages& bar, int from, int n_tiles, bool pingpong, int wg,
                                               int n_wg) {
  if (from >= n_tiles) return;
  mbar_arrive(bar.vempty + ((from - 1) % ST) * 8);
  for (int j = from; j < n_tiles; ++j) {
    const int st = j % ST;
    mbar_wait(bar.kfull + st * 8, (j / ST) & 1);
    if (pingpong) {
      turn_wait(wg);
      turn_pass(wg, n_wg);
    }
    mbar_arrive(bar.kempty + st * 8);
    mbar_wait(bar.vfull + st * 8, (j / ST) & 1);
    mbar_arrive(bar.vempty + st * 8);
  }
}

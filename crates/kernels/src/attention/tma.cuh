// The Hopper prefill kernel with a TMA producer, persistent (PERSISTENT = 1; included by
// attention.cu, whose constants, tile layout and softmax it uses): gridDim.x blocks, one an SM,
// each taking the launch's next task (work item x kv head, make_task, schedule_tasks;
// items are sorted longest first) whenever it has room for one.
//
// Warpgroup 2 is the producer: its first warp brings every task's K and V tiles in with
// TMA copies, running ahead of the consumers across task boundaries as far as the stages
// allow, so a task's first tiles land while the previous task finishes. Warpgroups 0 and 1
// each own 64 rows of the 128-row query tile: Q (cp.async, by the warpgroup itself,
// prefetched for the next task once its last Q Kᵀ is done), the overlapped loop (tile j's
// Q Kᵀ issued with tile j-1's P V, the softmax in the P V's shadow), and the epilogue
// (through a staging tile of their own). Barriers between them: K and V stages, full and
// empty (counts include the warpgroup without rows, which keeps step), named barrier 1 for
// the split-merge count, 2/3 for ping-pong (6 closes a task's turns), 8/9 within a
// warpgroup (attention/tma_pipeline.cuh).
//
// Per task the one-item kernel paid its launch, Q's and the first tiles' latency and the
// epilogue with nothing overlapped: about five tiles' time on the H200, measured as the gap
// between 16K-token sequences (678 TFLOP/s) and 500-token ones (201).

// x as lane 0 has it, which the compiler then knows to be the same in every lane.
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

// A task: a work item for one kv head, with what the block derives from it.
struct Task {
  WorkItem w;
  int b, kvh, qo_start, rows, row0, kv_stop, n_tiles, causal_shift, mask_free_end;
  int kv_base;  // kv_indptr of its table row: contiguous, the first key's token; paged, its pages
};

// Task `task` of the launch (numbered as the one-item kernel's blocks are dispatched:
// kv head-major, so the blocks running at once share their kv head's K/V in L2; heads
// inner for plans of one query tile a sequence); false when it has nothing to do (padding,
// rows past the sequence). The same arithmetic as the one-item kernel's prologue.
__device__ __forceinline__ bool make_task(const AttentionParams& p, int num_tasks, int task, Task& t) {
  const int items = num_tasks / p.num_kv_heads;
  t.w = p.work[p.heads_inner ? task / p.num_kv_heads : task % items];
  t.kvh = p.heads_inner ? task % p.num_kv_heads : task / items;
  if (t.w.batch < 0) return false;
  t.b = t.w.batch;
  t.qo_start = p.qo_indptr[t.b];
  const int q_len = p.qo_indptr[t.b + 1] - t.qo_start;
  t.rows = q_len * p.group;
  t.row0 = t.w.q_tile * BM;
  if (t.row0 >= t.rows) return false;
  const int kv_len = seq_kv_len(p, t.b, t.kvh);
  t.kv_base = p.kv_indptr[table_row(p, t.b, t.kvh)];
  t.causal_shift = kv_len - q_len;  // row token r sees keys <= r + causal_shift
  t.kv_stop = min(t.w.kv_end, kv_len);
  if (p.causal) t.kv_stop = min(t.kv_stop, (min(t.rows, t.row0 + BM) - 1) / p.group + t.causal_shift + 1);
  t.n_tiles = t.kv_stop > t.w.kv_begin ? (t.kv_stop - t.w.kv_begin + BN - 1) / BN : 0;
  t.mask_free_end = p.causal ? t.row0 / p.group + t.causal_shift + 1 : t.kv_stop;
  return true;
}

// The block's tasks with work, in order, handed from a scheduler warp to the producer and
// the consumers through a ring of TASK_RING slots in shared memory: make_task is two or
// three dependent memory round trips (work item, then the sequence's offsets), which on
// the consumers' path cost more than a tile each task (the first persistent version ran
// 10-20% slower than the one-item kernel). The scheduler runs up to TASK_RING tasks ahead
// (few: tasks it holds are not free for idle blocks);
// a slot with b = -1 ends the list. Slot k % TASK_RING: full (the scheduler's arrival),
// empty (the 256 consumer threads and the producer warp's first lane, once they have
// copied it).
constexpr int TASK_RING = 2;
struct TaskRing {
  Task* slots;
  u32 full, empty;  // barriers of slot s at + 8 s
};

// Tasks are taken in launch order by whichever block asks next (an atomic counter in the
// module's memory): the longest first, as the hardware hands out the one-item kernel's
// blocks. A static split (block b: tasks b, b + G, ...) left block 0 the longest task of
// every round (25% above the mean at one 16K-token causal sequence), and a zig-zag one did
// no better. The last block to find the list empty resets the counters for the next
// launch (a CUDA graph replays the same module); one launch at a time per module (the
// engine's one stream per GPU).
__device__ int task_next;
__device__ int task_blocks_done;

__device__ void schedule_tasks(const KernelParams& kp, const TaskRing& ring) {
  for (int k = 0;;) {
    const int task = atomicAdd(&task_next, 1);
    Task t;
    const bool end = task >= kp.num_tasks;
    if (!end && !make_task(kp.p, kp.num_tasks, task, t)) continue;
    if (end) {
      t.b = -1;
      __threadfence();  // this block's last take from task_next before its count below
      if (atomicAdd(&task_blocks_done, 1) == (int)gridDim.x - 1) {
        task_next = 0;  // every block is past its last atomicAdd on it
        task_blocks_done = 0;
      }
    }
    const int slot = k % TASK_RING;
    if (k >= TASK_RING) mbar_wait(ring.empty + slot * 8, (k / TASK_RING - 1) & 1);
    ring.slots[slot] = t;
    mbar_arrive(ring.full + slot * 8);  // release: the slot's contents before the arrival
    ++k;
    if (end) return;
  }
}

// Copies the block's k-th task out of the ring and releases its slot (by `release`: one
// thread of each reader); false past the last task.
__device__ __forceinline__ bool take_task(const TaskRing& ring, int k, Task& t, bool release) {
  const int slot = k % TASK_RING;
  mbar_wait(ring.full + slot * 8, (k / TASK_RING) & 1);
  t = ring.slots[slot];
  if (release) mbar_arrive(ring.empty + slot * 8);
  return t.b >= 0;
}

// Every task starts at a multiple of ST (padded_tiles): its tile j is in stage j % ST,
// which the compiler then computes on the uniform datapath, wgmma descriptors included
// (from a count carried across tasks it built them per thread, two R2UR before every
// wgmma). Stages: attention.cu.
static_assert(ST == 2, "the TMA kernel's stage padding assumes two stages");

// Tiles a task takes in the stage count: its own, rounded up to ST (the last one empty).
__device__ __forceinline__ int padded_tiles(int n_tiles) { return (n_tiles + ST - 1) / ST * ST; }

// The producer warp's share of a task: its tiles (produce_kv_tma), then the padding tile.
__device__ void produce_task(const KernelParams& kp, const Task& t, int g0, u32 sk0, u32 sv0, const Stages& bar,
                             int lane) {
  produce_kv_tma(kp, t.kvh, t.w.kv_begin, t.n_tiles, t.kv_stop, t.kv_base, g0, sk0, sv0, bar, lane);
  // The padding tile: its stages change hands without a copy.
  for (int g = g0 + t.n_tiles; g < g0 + padded_tiles(t.n_tiles); ++g) {
    const int st = g % ST;
    const u32 parity = (g / ST - 1) & 1;
#pragma unroll
    for (int kv = 0; kv < 2; ++kv) {
      if (g >= ST) mbar_wait((kv ? bar.vempty : bar.kempty) + st * 8, parity);
      if (lane == 0) mbar_arrive((kv ? bar.vfull : bar.kfull) + st * 8);
    }
  }
}

// Issues the cp.async copies of warpgroup wg's 64 rows of task t's Q tile (rows past the
// sequence read as zeros); the caller commits them.
__device__ __forceinline__ void load_q_rows(const AttentionParams& p, const Task& t, u32 sq, int wg) {
  constexpr int STEP = 128 / DC;  // rows a pass of the warpgroup's threads copies
  const int tid = threadIdx.x % 128, chunk = tid % DC;
#pragma unroll
  for (int it = 0; it < 64 / STEP; ++it) {
    const int r = wg * 64 + tid / DC + it * STEP;  // row within the tile
    const int gr = min(t.row0 + r, t.rows - 1);
    const int tok = gr / p.group, g = gr - tok * p.group;
    const elem_t* src =
        p.q + (long long)(t.qo_start + tok) * p.q_stride + (long long)(t.kvh * p.group + g) * D + chunk * 8;
    cp_async_16(sq + swz<BM>(r, chunk), src, t.row0 + r < t.rows);
  }
}


// One task for warpgroup wg (both run every task; one without rows only keeps the stages'
// count). Q of the task is in flight (this warpgroup's rows, its own cp.async); `next`,
// when `has_next`, is the block's next task, whose Q rows it loads once its last Q Kᵀ is
// done. `g`: the block's tiles before this task.
__device__ void consume_task(const AttentionParams& p, const Task& t, bool has_next, const Task& next, int g_in,
                             u32 sq, u32 so, u32 sk0, u32 sv0, const Stages& bar) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  // Warp-uniform copies of what the loop's addresses, barriers and branches derive from: a
  // value carried across tasks is the same in every lane, but the compiler cannot see it,
  // and then computed the wgmma descriptors per thread (R2UR before every wgmma) and
  // reconverged around each barrier: the loop ran 10-20% slower than the one-item kernel's.
  const int g = warp_uniform(g_in);  // a multiple of ST: tile j's stage is j % ST
  const int n_tiles = warp_uniform(t.n_tiles), kv_begin = warp_uniform(t.w.kv_begin);
  const int kv_stop = warp_uniform(t.kv_stop), mask_free_end = warp_uniform(t.mask_free_end);
  const int rows = warp_uniform(t.rows), row0 = warp_uniform(t.row0);
  const int wrow = warp * 16;  // this warp's first row within the tile
  const bool active = row0 + wg * 64 < rows;
  const bool pingpong = PINGPONG && row0 + 64 < rows;  // both warpgroups have rows

  cp_async_wait<0>();  // this thread's Q copies; the warpgroup's, past the barrier
  fence_proxy_async();
  wg_bar_sync(wg);
  if (!active) {
    // Keep step with the stages' counts: release each tile once it has landed.
    for (int j = 0; j < padded_tiles(n_tiles); ++j) {
      const int st = j % ST;
      const u32 parity = ((g + j) / ST) & 1;
      mbar_wait(bar.kfull + st * 8, parity);
      mbar_arrive(bar.kempty + st * 8);
      mbar_wait(bar.vfull + st * 8, parity);
      mbar_arrive(bar.vempty + st * 8);
    }
    if (has_next) load_q_rows(p, next, sq, wg);
    cp_async_commit();
  }

  float o_acc[MT][ON][4];
  float m_run[MT][2] = {{NEG_INF, NEG_INF}}, l_run[MT][2] = {{0.f, 0.f}};
#pragma unroll
  for (int n = 0; n < ON; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) o_acc[0][n][i] = 0.f;
  int row_limit[MT][2];  // one past the last key each of this thread's rows may see
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int gr = row0 + wrow + lane / 4 + half * 8;
    row_limit[0][half] = p.causal ? min(kv_stop, gr / p.group + t.causal_shift + 1) : kv_stop;
  }

  if (active && n_tiles > 0) {
    if (pingpong && wg == 1) turn_pass(1, 2);  // warpgroup 0 first
    u32 p_frag[PK][4];  // tile j - 1's P, waiting for its P V
    tma_overlapped_tiles(p, sq + wg * 64 * 128, sk0, sv0, bar, g, n_tiles, kv_begin, kv_stop, mask_free_end, row_limit,
                         pingpong, wg, 2, lane, o_acc, m_run, l_run, p_frag);
    if (pingpong && wg == 0) turn_wait(0);  // warpgroup 1's extra arrival
    // Every Q Kᵀ of this warpgroup is done: its Q rows take the next task's.
    if (has_next) load_q_rows(p, next, sq, wg);
    cp_async_commit();
    const int lst = tma_last_pv(sv0, bar, g, n_tiles, kv_begin, kv_stop, wg, o_acc, p_frag);
    mbar_arrive(bar.vempty + lst * 8);
    // The padding tile (an odd count): its stages change hands empty.
    for (int j = n_tiles; j < padded_tiles(n_tiles); ++j) {
      const u32 parity = ((g + j) / ST) & 1;
      mbar_wait(bar.kfull + (j % ST) * 8, parity);
      mbar_arrive(bar.kempty + (j % ST) * 8);
      mbar_wait(bar.vfull + (j % ST) * 8, parity);
      mbar_arrive(bar.vempty + (j % ST) * 8);
    }
  } else if (active) {
    if (has_next) load_q_rows(p, next, sq, wg);
    cp_async_commit();
  }
  // Warpgroup 0's last sync on ping-pong barrier 2 balances warpgroup 1's first arrival;
  // warpgroup 1 must not arrive for the next task before that sync, or its two arrivals
  // would complete a phase without warpgroup 0 and both would wait forever (barrier 6).
  if (pingpong && n_tiles > 0) {
    if (wg == 0) named_bar_arrive<6, THREADS>();
    else named_bar_sync<6, THREADS>();
  }

  // Epilogue: normalise, then write O (through this warpgroup's staging rows, 16-byte
  // stores) or the fp32 partial, and the LSE.
  const bool partial = t.w.partial_row >= 0;
  if (!partial) wg_bar_sync(wg);  // the previous task's staging rows are read
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = warp_sum4(l_run[0][half]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int r = wrow + lane / 4 + half * 8, gr = row0 + r;
    const bool valid = active && gr < rows;
    const int tok = valid ? gr / p.group : 0;
    const int head = t.kvh * p.group + (valid ? gr % p.group : 0);
    const float lse = l > 0.f ? (m_run[0][half] + __log2f(l)) * LN2 : NEG_INF;
#pragma unroll
    for (int n = 0; n < ON; ++n) {
      const float x0 = o_acc[0][n][half * 2] * inv, x1 = o_acc[0][n][half * 2 + 1] * inv;
      if (partial) {
        if (valid) {
          float* dst = p.partial_o + ((long long)(t.w.partial_row + tok) * p.num_qo_heads + head) * D + n * 8 +
                       (lane % 4) * 2;
          asm volatile("st.global.v2.f32 [%0], {%1,%2};\n" ::"l"(dst), "f"(x0), "f"(x1));
        }
      } else {
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(so + swz<BM>(r, n) + (lane % 4) * 4), "r"(pack2<elem_t>(x0, x1)));
      }
    }
    if (valid && lane % 4 == 0) {
      if (partial) {
        p.partial_lse[(long long)(t.w.partial_row + tok) * p.num_qo_heads + head] = lse;
      } else if (p.lse) {
        p.lse[(long long)(t.qo_start + tok) * p.num_qo_heads + head] = lse;
      }
    }
  }
  if (!partial) {
    wg_bar_sync(wg);
    constexpr int STEP = 128 / DC;
    const int tid = threadIdx.x % 128, chunk = tid % DC;
#pragma unroll
    for (int it = 0; it < 64 / STEP; ++it) {
      const int r = wg * 64 + tid / DC + it * STEP, gr = row0 + r;
      if (gr >= rows) break;  // rows only grow with `it`
      const int tok = gr / p.group, head = t.kvh * p.group + gr % p.group;
      u32 v0, v1, v2, v3;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(v0), "=r"(v1), "=r"(v2), "=r"(v3)
                   : "r"(so + swz<BM>(r, chunk)));
      elem_t* dst = p.o + (long long)(t.qo_start + tok) * p.o_stride + (long long)head * D + chunk * 8;
      asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"l"(dst), "r"(v0), "r"(v1), "r"(v2), "r"(v3));
    }
    return;
  }
  // The last split of this (query tile, kv head) to finish merges them all (as the
  // one-item kernel does, among the 256 consumer threads).
  __shared__ int is_last;
  MergeItem* m = p.merge + t.w.merge + t.kvh;
  __threadfence();
  named_bar_sync<1, THREADS>();
  if (threadIdx.x == 0) {
    const int done = atomicAdd(&m->arrived, 1) + 1;
    is_last = done == m->num_splits;
    if (is_last) atomicExch(&m->arrived, 0);  // all have arrived: ready for the next launch
  }
  named_bar_sync<1, THREADS>();  // (a later task's thread 0 writes is_last only after every
                                 // thread has reached that task's first barrier)
  if (!is_last) return;
  __threadfence();
  merge_rows(p, *m, row0, min(rows, row0 + BM), t.kvh, t.qo_start, warp, lane);
}

extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 1)
attention_kernel(const __grid_constant__ KernelParams kp) {
  pdl_wait();
  const AttentionParams& p = kp.p;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  // Q, the K and V stages, the output staging tile; 1024-byte aligned for the swizzle
  // atoms (the launcher asks for 1 KiB more).
  const u32 sq = (smem_addr(smem) + 1023u) & ~1023u;
  const u32 sk0 = sq + BM * D * 2, sv0 = sk0 + ST * BN * D * 2, so = sv0 + ST * BN * D * 2;
  __shared__ __align__(8) u64 bars[4 * ST];
  __shared__ __align__(8) u64 ring_bars[2 * TASK_RING];
  __shared__ Task ring_slots[TASK_RING];
  const TaskRing ring = {ring_slots, smem_addr(ring_bars), smem_addr(ring_bars) + TASK_RING * 8};
  const Stages bar = {smem_addr(bars), smem_addr(bars) + ST * 8, smem_addr(bars) + 2 * ST * 8,
                      smem_addr(bars) + 3 * ST * 8};
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < ST; ++s) {
      mbar_init(bar.kfull + s * 8, 1);
      mbar_init(bar.vfull + s * 8, 1);
      mbar_init(bar.kempty + s * 8, THREADS);
      mbar_init(bar.vempty + s * 8, THREADS);
    }
#pragma unroll
    for (int s = 0; s < TASK_RING; ++s) {
      mbar_init(ring.full + s * 8, 1);
      mbar_init(ring.empty + s * 8, THREADS + 1);  // the consumers and the producer warp's lane 0
    }
  }
  __syncthreads();
  Task t;
  if (warp >= WARPS) {
    // The producer warpgroup gives its registers to the consumers; its first warp copies,
    // the second lists the tasks.
    setmaxnreg_dec<24>();
    if (warp == WARPS) {
      if (lane == 0) {
        tma_prefetch_map(&kp.k_map);
        tma_prefetch_map(&kp.v_map);
      }
      for (int k = 0, g = 0; take_task(ring, k, t, false); ++k) {
        __syncwarp();  // every lane has its copy before lane 0 frees the slot
        if (lane == 0) mbar_arrive(ring.empty + (k % TASK_RING) * 8);
        produce_task(kp, t, g, sk0, sv0, bar, lane);
        g += padded_tiles(t.n_tiles);
      }
    } else if (warp == WARPS + 1 && lane == 0) {
      schedule_tasks(kp, ring);
    }
    return;
  }
  setmaxnreg_inc<CONSUMER_REGS>();
  bool has = take_task(ring, 0, t, true);
  if (has) load_q_rows(p, t, sq, wg);
  cp_async_commit();
  for (int k = 0, g = 0; has; ++k) {
    Task next;
    const bool has_next = take_task(ring, k + 1, next, true);
    consume_task(p, t, has_next, next, g, sq, so, sk0, sv0, bar);
    g += padded_tiles(t.n_tiles);
    t = next;
    has = has_next;
  }
}

// Attention over ragged batches on tensor cores (FlashAttention-2 style), for prefill
// and decode alike.
//
// Rows of a block are (query token, query head of one GQA group) pairs: row r of a
// sequence is token r / GROUP, head kv_head * GROUP + r % GROUP. All rows of a block use
// one kv head, so each K/V tile is read from memory once for its whole group, and a
// decode step (one token, GROUP heads) fills a tile with GROUP rows.
//
// One block runs one work item (planned on the host, see attention/plan.rs): a tile of
// BM rows of one sequence against keys [kv_begin, kv_end), for one kv head (grid.y, or
// for decode plans the low part of a 1-D grid: heads_inner).
// Items of a sequence split along the keys write fp32 partial outputs and their
// log-sum-exp; the last split of a (query tile, kv head) to finish merges them all
// (merge_rows), so a split costs no second launch.
//
// Per block: Q tile -> shared (cp.async) -> registers (ldmatrix); K/V tiles of BN keys
// in a STAGES-deep cp.async pipeline in shared memory; S = Q Kᵀ and O += P V with
// mma.sync m16n8k16 (fp32 accumulation); the online softmax stays in registers, in the
// exp2 domain with the scale folded in; P goes from the S accumulators straight into A
// fragments (their layouts coincide). Shared tiles are XOR-swizzled by 16-byte chunk so
// ldmatrix reads 8 rows without bank conflicts.
//
// WGMMA (Hopper, sm_90a; the launcher's choice for prefill there): two warpgroups of 64
// rows each, BM = 128. Q Kᵀ runs as wgmma with Q and K read from shared memory through
// descriptors, P V as wgmma with P from registers (the S accumulators, packed) and V read
// transposed; tiles use the 128-byte swizzle wgmma expects (common/wgmma.cuh), so a head
// dim of 128 is two [rows, 64] column blocks. Every thread still copies K/V with cp.async,
// but stages are handed over by mbarriers (full: the copies landed; empty: every thread is
// done with them) instead of a block barrier a tile, so the warpgroups drift apart and one
// runs its softmax while the other's wgmmas run. With 3+ stages the loop issues tile j's
// Q Kᵀ together with tile j-1's P V (FlashAttention-3's intra-warpgroup overlap); measured
// slower here, as the warpgroup that falls behind issues its half of the next tile's copies
// late. NUM_WARPS 9 or 12 add one or four producer warps that issue every copy, and the two
// warpgroups then take turns issuing wgmmas (ping-pong, when both have rows and unless
// RADIX_SPARSE_WGMMA_PINGPONG=0); four measured 3-4% faster than the cp.async default, one
// 20% slower: cp.async issue is their bound. TMA (12 warps, Hopper's default at head dim
// 128): the producer warpgroup's first thread brings K and V in with TMA copies into stages
// of their own, and the overlapped loop runs on them: 1.20-1.44x the cp.async kernel on the
// H200 (contiguous K/V; pages of 16 about 1.0x: 2 KiB boxes, bench/NOTES.md). PERSISTENT: the same with one block an SM taking tasks in turn
// (attention/tma.cuh); 1.2x on 500-token sequences, 3-8% slower on long ones, so far opt-in.
//
// KV_FP8: the K/V pool holds e4m3 bytes (an FP8 KV cache, half the bytes). Each stage
// then holds a tile's bytes (16-byte cp.async copies, swizzled by row: fp8_chunk); before
// the MMAs they are widened into one f16 K and V tile, swizzled as 16-bit tiles are, by
// the thread that copied them; KEY_SPLIT blocks (decode) instead widen each warp's keys in
// registers, straight from the stage into MMA fragments (FP8_REGS). The widening moves bits, it
// does not convert: each e4m3 byte's sign, exponent and mantissa moved into an f16
// (s eeee mmm -> s 0eeee mmm0000000) are its value times 2^-8 exactly, normal or
// subnormal (the conversion instructions run at a quarter of the ALU rate; key-split
// blocks convert by default all the same, FP8_CVT: one instruction against three). So over an
// FP8 pool the MMAs run in f16 (mma_t): the Q tile is converted to f16 once per block
// (clamped to +-65504; values below 2^-24 flush to zero), and the launcher folds 2^8 and
// the per-layer key scale into scale_log2, 2^8 and the value scale into the epilogue's
// normalisation (v_scale). An e4m3 NaN byte widens to a finite +-480 by bit moves and
// to NaN by conversion: the KV writer saturates, so only a NaN key or value reaches one.
//
// Measured on the H200 (bench/NOTES.md): with widened tiles in shared memory, decode
// over e4m3 pages took about as long per tile as over bf16 pages (57-62% of the copy
// bandwidth to their 100%): the tiles' stores and ldmatrix reads were more shared-memory
// traffic per tile than its bytes' arrival at the copy rate left time for. Widened in
// registers (FP8_REGS) it reads at 83% (bit moves) and 94% (conversions) at 64@4096.
#include "common/fp8.cuh"
#include "common/mma.cuh"
#ifndef WGMMA
#define WGMMA 0
#endif
#if WGMMA
#include "common/wgmma.cuh"
#endif

#if KV_FP8
typedef half_t mma_t;
#else
typedef elem_t mma_t;
#endif

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef NUM_WARPS
#define NUM_WARPS 4
#endif
#ifndef M_TILES
#define M_TILES 1
#endif
#ifndef BLOCK_N
#define BLOCK_N 64
#endif
#ifndef PAGED
#define PAGED 0
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef KEY_SPLIT
#define KEY_SPLIT 0
#endif

constexpr int D = HEAD_DIM;
// Bytes from one row of a shared tile to the next: wgmma's 128-byte swizzle stores a head
// dim of 128 as two [rows, 64] column blocks (see swz), the mma.sync path whole rows.
constexpr int ROW_PITCH = WGMMA ? 128 : D * 2;
// wgmma blocks: 8 compute warps (two warpgroups), plus with NUM_WARPS = 9 or 12 one or four
// producer warps that issue every K/V copy (PRODUCER); with TMA at head_dim 64, NUM_WARPS 16:
// three compute warpgroups (192 rows, as FlashAttention-3 runs head_dim 64: the scores
// cost as much as at 128 while the MMAs halve, so a third warpgroup's softmax hides under
// the other two's GEMMs). WARPS and THREADS count the compute warps.
constexpr bool PRODUCER = WGMMA && NUM_WARPS > 8;
constexpr int CWG = WGMMA && NUM_WARPS == 16 ? 3 : 2;  // compute warpgroups (wgmma)
static_assert(!PRODUCER || (BLOCK_N * (HEAD_DIM / 8)) % ((NUM_WARPS - 4 * CWG) * 32) == 0, "producer copies split evenly");
constexpr int PRODUCER_THREADS = PRODUCER ? (NUM_WARPS - 4 * CWG) * 32 : 0;
// With a producer, the warpgroups may take turns issuing their wgmmas (FlashAttention-3's
// ping-pong: named barriers 2 and 3), so one's softmax runs under the other's GEMMs.
#ifndef PINGPONG
#define PINGPONG 0
#endif
// TMA (NUM_WARPS 12): the producer warpgroup's first thread brings every K/V tile in with
// TMA copies (cp.async.bulk.tensor) through host-built tensor maps, K and V in stages of
// their own (K's freed once Q Kᵀ is done, V's once P V is), so the overlapped loop runs
// with two of each; setmaxnreg hands the producer's registers to the two consumer
// warpgroups.
#ifndef TMA
#define TMA 0
#endif
static_assert(!TMA || (WGMMA && (NUM_WARPS == 12 || (NUM_WARPS == 16 && HEAD_DIM == 64))),
              "TMA blocks: two consumer warpgroups (three at head_dim 64) and a producer one");
// PERSISTENT (with TMA): one block an SM takes (work item, kv head) tasks in turn, loading
// across task boundaries (attention/tma.cuh).
#ifndef PERSISTENT
#define PERSISTENT 0
#endif
static_assert(!PERSISTENT || (TMA && CWG == 2), "the persistent kernel is the TMA one, two warpgroups");
#if TMA
// The registers setmaxnreg gives a TMA consumer thread: what the producer's 24 leave of the
// block's 64K (384 threads x 168 = 128 x 24 + 256 x 240; 512 x 128 = 128 x 24 + 384 x 160).
constexpr int CONSUMER_REGS = CWG == 3 ? 160 : 240;
#endif
// TMA_PAGED_AHEAD (paged TMA): page ids looked up a tile ahead and every lane of the
// producer warp issuing its own page's box, rather than lane 0 issuing all of them after
// the lookup (RADIX_SPARSE_TMA_PAGED_ISSUE=serial, for comparisons).
#ifndef TMA_PAGED_AHEAD
#define TMA_PAGED_AHEAD 1
#endif
// WG_SKIP (one-item TMA kernel, causal): a warpgroup stops computing at the last tile its
// own rows see, then only keeps step with the others (tma_idle_tiles); without it every
// warpgroup runs to the block's last key. Opt-in (RADIX_SPARSE_PREFILL_WG_SKIP=1) until
// measured: it saves the diagonal tiles of a 192-row block's first warpgroups.
#ifndef WG_SKIP
#define WG_SKIP 0
#endif
constexpr int WARPS = WGMMA ? 4 * CWG : NUM_WARPS;
constexpr int THREADS = WARPS * 32;
constexpr int BLOCK_THREADS = NUM_WARPS * 32;
constexpr int MT = M_TILES;          // 16-row MMA tiles per warp
constexpr int WARP_ROWS = 16 * MT;
// Key split (small decode blocks: a GQA group of one token is 4-8 rows): every warp takes
// the block's same WARP_ROWS rows against its own quarter of each K/V tile, with its own
// online softmax, and the warps' states are combined once at the end. Without it one
// warp computed while three only loaded, and at batch 1 a block's time was that warp's
// instruction stream (ncu on the H200: 1@1024, 4 tiles a block, 17 us).
constexpr bool KS = KEY_SPLIT;
constexpr int BM = KS ? WARP_ROWS : WARP_ROWS * WARPS;  // rows per block
constexpr int BN = BLOCK_N;          // keys per K/V tile
constexpr int WK = KS ? BN / WARPS : BN;  // keys of a tile one warp computes on
constexpr int ST = STAGES;           // K/V tiles in the cp.async pipeline
// wgmma with 3+ stages overlaps a tile's softmax with the previous tile's P V (the file's
// head); that V is read an iteration late, so its stage is refilled one tile later: tile
// j + AHEAD is loaded while tile j is computed on.
constexpr bool OVERLAP = WGMMA && (ST >= 3 || TMA);
constexpr int AHEAD = OVERLAP ? ST - 2 : ST - 1;
constexpr int DC = D / 8;            // 16-byte chunks per row
constexpr int DK = D / 16;           // k16 steps over head_dim (Q Kᵀ)
constexpr int NT = WK / 8;           // n8 tiles of a warp's S
constexpr int ON = D / 8;            // n8 tiles of O
constexpr int PK = WK / 16;          // k16 steps over a warp's keys (P V)
// Q fragments live in registers when they are few; otherwise each tile re-reads them.
constexpr bool Q_IN_REGS = !WGMMA && MT * DK <= 8;  // (wgmma reads Q from shared memory)
constexpr float LN2 = 0.6931471805599453f;
#define NEG_INF __int_as_float(0xff800000)

static_assert(D == 64 || D == 128, "head_dim 64 or 128");
static_assert(ST >= 2 && ST <= (KV_FP8 ? 8 : 4), "2 to 4 pipeline stages (8 over an FP8 pool)");
static_assert(BN % 16 == 0 && NT % 2 == 0, "BLOCK_N a multiple of 16 (of 16 per warp with KEY_SPLIT)");
static_assert(!KS || MT == 1, "KEY_SPLIT blocks are one 16-row MMA tile");
static_assert(!WGMMA || ((NUM_WARPS == 8 || NUM_WARPS == 9 || NUM_WARPS == 12 || (NUM_WARPS == 16 && TMA)) && MT == 1 &&
                         !KS && !KV_FP8 && (BN == 64 || BN == 128)),
              "wgmma blocks: warpgroups of 64 rows, 64 or 128 keys a tile, 16-bit K/V");
// Key-split blocks over an FP8 pool read each warp's keys from the stage of bytes straight
// into MMA fragments (fp8_scores, fp8_pv): no widened tile in shared memory.
constexpr bool FP8_REGS = KV_FP8 && KS;
// FP8_REGS: bit 0 converts key bytes, bit 1 value bytes with the hardware conversion
// (exact values) instead of bit moves (2^-8 times theirs); the kernel takes the launcher's
// 2^8 back out of what it converts (RADIX_SPARSE_FP8_WIDEN, for comparisons).
#ifndef FP8_CVT
#define FP8_CVT 0
#endif
// Shared bytes behind the Q tile: the K/V stages (FP8: the widened K and V tiles, where
// the MMAs read them from shared memory, then the stages of bytes).
constexpr int KV_SMEM = KV_FP8 ? (FP8_REGS ? 0 : 2 * BN * D * 2) + 2 * ST * BN * D : 2 * ST * BN * D * 2;
// Key-split epilogue: floats from one row of a warp's state (O) to the next in shared
// memory (see the epilogue for why 8, and 4 over FP8 pools, more than D).
constexpr int SO_PITCH = FP8_REGS ? D + 4 : D + 8;
static_assert(!KS || WARPS * 16 * (SO_PITCH + 2) * 4 <= KV_SMEM, "the warps' states (O rows, max, sum) fit the K/V stages");
// Key-split decode blocks on Hopper may run in clusters (p.cluster, plan.rs): the CLUSTER
// chunks of one (sequence, kv head) combine their states through distributed shared
// memory (cluster_merge) instead of the last split reading every split's partial from
// global memory.
#if KEY_SPLIT && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CLUSTER_MERGE 1
#include "common/cluster.cuh"
#else
#define CLUSTER_MERGE 0
#endif
constexpr int CLUSTER = 8;  // mirrors plan.rs DECODE_CLUSTER
static_assert(!KS || WARPS * 16 * (SO_PITCH + 2) * 4 + (16 * D + 16) * 4 <= KV_SMEM,
              "the warps' states and the block's state for its cluster fit the K/V stages");
static_assert((TMA || (BN * DC) % THREADS == 0) && (BM * DC) % THREADS == 0, "tiles split evenly");

// One unit of work; mirrors WorkItem in plan.rs.
struct WorkItem {
  int batch;        // sequence; < 0 marks padding (nothing to do)
  int q_tile;       // which BM-row tile of the sequence's rows
  int kv_begin;     // keys [kv_begin, kv_end) of this item (before causal clipping)
  int kv_end;
  int partial_row;  // < 0: write O directly; else this split's first partial row
  int merge;        // split items: merge-list entry of this query tile for kv head 0
};

// The splits of one (query tile, kv head); mirrors MergeItem in plan.rs. Partial row of
// split s, token t of the sequence: first_row + s * split_stride + t.
struct MergeItem {
  int num_splits;
  int first_row;
  int split_stride;  // the sequence's q_len
  int arrived;       // splits finished in this launch; the last one resets it to 0
};

// Mirrors AttentionParams in launch.rs (8-byte fields first, then 4-byte ones).
struct AttentionParams {
  const elem_t* q;            // [total_q, q_stride] rows; head h at h * D
  const kv_t* k;              // contiguous: [total_kv, kv_stride]; paged: [pages, Hkv, page_size, D]
  const kv_t* v;
  elem_t* o;                  // [total_q, o_stride]
  float* lse;                 // [total_q, Hq] natural-log LSE, or null
  float* partial_o;           // [partial rows, Hq, D] for split items
  float* partial_lse;         // [partial rows, Hq]
  const int* qo_indptr;       // [batch + 1]
  const int* kv_indptr;       // contiguous: token offsets; paged: page offsets, [batch + 1]
                              // (head_tables: [batch * num_kv_heads + 1], row b * Hkv + kvh)
  const int* kv_indices;      // paged: page ids
  const int* kv_last_page_len;  // paged: [batch]
  const WorkItem* work;       // [grid.x]
  MergeItem* merge;           // [split query tiles * num_kv_heads]
  unsigned long long* trace;  // TRACE: TRACE_SLOTS per block (see TRACE_MARK), else null
  long long q_stride;
  long long o_stride;
  long long kv_stride;        // contiguous only: elements between tokens
  int num_qo_heads;
  int num_kv_heads;
  int group;                  // num_qo_heads / num_kv_heads
  int page_size;
  int page_shift;             // log2(page_size)
  int causal;
  float scale_log2;           // softmax scale * log2(e)
  int head_tables;            // paged: each kv head of a sequence has its own page table
  int heads_inner;            // 1-D grid, block i = item i / Hkv, kv head i % Hkv (plan.rs)
  float v_scale;              // the FP8 cache's value scale (1 for a 16-bit cache)
  int meta_early;             // the work list, offsets and lengths came from the host, not
                              // from the kernel before: read them before pdl_wait() (page
                              // ids, which sparse selection writes, always after it)
  int kv_early;               // paged, host tables: the page ids, and the K/V of keys before
                              // each sequence's last q_len (which the KV append just before
                              // writes), are older than the kernel before, so the first
                              // tiles of those keys load before pdl_wait() (mma.sync kernels)
  int cluster;                // CLUSTER_MERGE: the launch runs clusters of CLUSTER blocks,
                              // each the chunks of one (query tile, kv head) (plan.rs)
};

// The kernel's one parameter: with TMA also the task count (of the persistent variant) and
// the K and V tensor maps (launch.rs builds them per launch: contiguous K/V as
// [tokens][Hkv][D] with boxes of [BN][1][64], a page pool as rows of D with boxes of
// [min(page_size, BN)][64]).
struct KernelParams {
  AttentionParams p;
#if TMA
  int num_tasks;  // work items x kv heads: the persistent blocks' tasks
  TmaMap k_map;
  TmaMap v_map;
#endif
};

// TRACE (benchmarks only, `AttentionBatch::enable_trace`): thread 0 of every block stamps
// its SM's cycle counter at each phase of the kernel (TRACE_MARK(i), slot i < 8), and the
// global timer at entry and exit (slots 8 and 9) with its SM id (slot 10), so a benchmark
// can say where a launch's time goes: entry, plan read, wait for the kernel before, first
// tile in, loop done, output written, split count known, merge done.
#ifndef TRACE
#define TRACE 0
#endif
#if TRACE
constexpr int TRACE_SLOTS = 16;  // mirrors launch.rs
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define TRACE_AT(i, v) \
  if (threadIdx.x == 0) p.trace[(blockIdx.x + (long long)blockIdx.y * gridDim.x) * TRACE_SLOTS + (i)] = (v)
#define TRACE_MARK(i) TRACE_AT(i, (unsigned long long)clock64())
#else
#define TRACE_AT(i, v)
#define TRACE_MARK(i)
#endif

// The block's barrier among the threads still running: once a TMA producer warpgroup has
// finished (it leaves after its last copy), the compute threads alone.
__device__ __forceinline__ void block_sync() {
#if TMA
  named_bar_sync<1, THREADS>();
#else
  __syncthreads();
#endif
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [ROWS, D] tile. WGMMA:
// D / 64 column blocks of [ROWS, 64], rows of 128 bytes (common/wgmma.cuh); at D = 64 the
// two layouts agree.
template <int ROWS> __device__ __forceinline__ u32 swz(int row, int chunk) {
#if WGMMA
  return (u32)((chunk >> 3) * ROWS * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
#else
  return (u32)(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
#endif
}

// Row of the page table of sequence b's kv head kvh: per-head tables (sparse selection)
// give every kv head of a sequence its own subset of pages, all of one length.
__device__ __forceinline__ int table_row(const AttentionParams& p, int b, int kvh) {
#if PAGED
  return p.head_tables ? b * p.num_kv_heads + kvh : b;
#else
  return b;
#endif
}

__device__ __forceinline__ int seq_kv_len(const AttentionParams& p, int b, int kvh) {
  const int r = table_row(p, b, kvh);
  int n = p.kv_indptr[r + 1] - p.kv_indptr[r];
#if PAGED
  return n == 0 ? 0 : (n - 1) * p.page_size + p.kv_last_page_len[b];
#else
  return n;
#endif
}

// Each thread copies one fixed 16-byte chunk column (c = tid % DC) of rows r0, r0 + RSTEP,
// ... of every Q tile (K/V tiles: KV_RSTEP and KDC below, the same over a 16-bit pool). RSTEP is a multiple of 8, so a row's swizzle (row & 7) is the same for
// all of a thread's rows and its shared-memory offsets advance by a constant: the copy
// loops carry no per-row address arithmetic beyond one multiply-add (and, paged, one
// page-id load).
constexpr int RSTEP = THREADS / DC;
constexpr int Q_ITERS = BM / RSTEP;
static_assert(THREADS % DC == 0 && RSTEP % 8 == 0, "rows per copy step must be a multiple of 8");
static_assert((TMA || BN % RSTEP == 0) && BM % RSTEP == 0, "tiles split evenly into copy steps");
// K/V copies are 16 bytes too: 8 values of a 16-bit pool, 16 of an FP8 one (8-byte copies
// of e4m3 chunks took as long per tile as 16-byte ones of bf16: half the bandwidth).
constexpr int KV_CHUNK = KV_FP8 ? 16 : 8;  // values per copy
constexpr int KDC = D / KV_CHUNK;          // copies per K/V row
constexpr int KV_RSTEP = THREADS / KDC;
constexpr int KV_ITERS = BN / KV_RSTEP;
static_assert(TMA || (KV_RSTEP % 8 == 0 && BN % KV_RSTEP == 0), "K/V tiles split evenly into copy steps");

// Byte offset of 16-byte chunk `chunk` of key `row` in a stage of e4m3 bytes (rows of D
// bytes): chunks swizzled by the row, so that fp8_scores' and fp8_pv's loads, which read
// the same chunk column of 4-8 rows at once, meet every bank once. A thread's copy rows lie
// KV_RSTEP (a multiple of 8) apart: its swizzle is the same for all of them.
__device__ __forceinline__ u32 fp8_chunk(int row, int chunk) {
  return (u32)(row * D + ((chunk ^ (row & (KDC - 1))) << 4));
}

struct KvCursor {
#if PAGED
  const int* pages;    // this sequence's page ids
  int page[KV_ITERS];  // page ids of this thread's rows of the next tile to load
  long long head_off;  // kvh * page_size * D + kv_chunk * KV_CHUNK
  long long page_stride;
#else
  long long base;      // first key's element offset + kvh * D + kv_chunk * KV_CHUNK
#endif
  int r0;              // this thread's first row within a tile
  int kv_chunk;        // its copy column within a row
  u32 s_off;           // its swizzled byte offset within a tile
  u32 f_off;           // KV_FP8: its byte offset within a stage of bytes (fp8_chunk)
  int kv_stop;
};

// Reads the page ids of this thread's rows of the tile at tile_start into the cursor. Issued
// one tile ahead of load_kv_tile: the page-table read is a memory round trip, and a load
// that waited for it would hold the warp before its MMAs on the current tile (at batch 1,
// a third of the kernel's time).
__device__ __forceinline__ void fetch_pages(const AttentionParams& p, KvCursor& cur, int tile_start) {
#if PAGED
#pragma unroll
  for (int it = 0; it < KV_ITERS; ++it) {
    int kk = min(tile_start + cur.r0 + it * KV_RSTEP, cur.kv_stop - 1);
    cur.page[it] = __ldg(cur.pages + (kk >> p.page_shift));
  }
#endif
}

// Issues the cp.async copies of the tile at tile_start (paged: with the page ids that
// fetch_pages read for it).
__device__ __forceinline__ void load_kv_tile(const AttentionParams& p, const KvCursor& cur, int tile_start,
                                             u32 sk, u32 sv) {
#pragma unroll
  for (int it = 0; it < KV_ITERS; ++it) {
    int key = tile_start + cur.r0 + it * KV_RSTEP;
    bool valid = key < cur.kv_stop;
    int kk = min(key, cur.kv_stop - 1);  // keep the (unread) address inside the sequence
#if PAGED
    long long off = (long long)cur.page[it] * cur.page_stride + cur.head_off +
                    (long long)(kk & (p.page_size - 1)) * D;
#else
    long long off = cur.base + (long long)kk * p.kv_stride;
#endif
#if KV_FP8
    u32 dst = cur.f_off + it * KV_RSTEP * D;
    cp_async_16(sk + dst, p.k + off, valid);
    cp_async_16(sv + dst, p.v + off, valid);
#else
    u32 dst = cur.s_off + it * KV_RSTEP * ROW_PITCH;
    cp_async_16(sk + dst, p.k + off, valid);
    cp_async_16(sv + dst, p.v + off, valid);
#endif
  }
}

// The A fragment of P for k16 step kk of MMA tile mt: the S accumulators of its n8 tiles
// 2kk and 2kk + 1 (the layouts coincide), packed to 16 bits.
__device__ __forceinline__ void pack_p(const float (&s)[MT][NT][4], int mt, int kk, u32 (&a)[4]) {
  a[0] = pack2<mma_t>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
  a[1] = pack2<mma_t>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
  a[2] = pack2<mma_t>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
  a[3] = pack2<mma_t>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
}

#if KV_FP8
// Two e4m3 bytes at bits 0-7 and 16-23 as two f16 of 2^-8 times their values (see the
// file's head): the sign to bit 15, exponent and mantissa to bits 7-13, of each half.
__device__ __forceinline__ u32 e4m3x2_as_f16x2_scaled(u32 pair) {
  return ((pair << 8) & 0x80008000u) | ((pair << 7) & 0x3f803f80u);
}

// Eight e4m3 bytes as eight f16 values (2^-8 times theirs), packed as ldmatrix reads them.
__device__ __forceinline__ uint4 widen8(uint2 b) {
  return make_uint4(e4m3x2_as_f16x2_scaled(__byte_perm(b.x, 0, 0x4140)),
                    e4m3x2_as_f16x2_scaled(__byte_perm(b.x, 0, 0x4342)),
                    e4m3x2_as_f16x2_scaled(__byte_perm(b.y, 0, 0x4140)),
                    e4m3x2_as_f16x2_scaled(__byte_perm(b.y, 0, 0x4342)));
}

// The Q chunks this thread copied, from elem_t to f16 in place (clamped to f16's range),
// for the f16 MMAs over an FP8 pool.
__device__ __forceinline__ void q_to_f16(u32 sq, u32 s_off) {
#if !(defined(DTYPE) && DTYPE == RS_F16)
  {
#pragma unroll
    for (int it = 0; it < Q_ITERS; ++it) {
      const u32 at = sq + s_off + it * RSTEP * D * 2;
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(at));
      u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float lo, hi;
        unpack2<elem_t>(w[i], lo, hi);
        w[i] = pack2<half_t>(fminf(fmaxf(lo, -65504.f), 65504.f), fminf(fmaxf(hi, -65504.f), 65504.f));
      }
      asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(at), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]));
    }
  }
#endif
}

// Sixteen e4m3 bytes at shared address `src` as f16 (see widen8) into the 16-bit tile at
// `tile`, row `row`, 8-value chunks 2c and 2c + 1 (swizzled as 16-bit tiles are).
__device__ __forceinline__ void widen16(u32 src, u32 tile, int row, int c) {
  uint4 b;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(b.x), "=r"(b.y), "=r"(b.z), "=r"(b.w) : "r"(src));
  const uint4 lo = widen8(make_uint2(b.x, b.y)), hi = widen8(make_uint2(b.z, b.w));
  asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(tile + swz<BN>(row, 2 * c)), "r"(lo.x), "r"(lo.y), "r"(lo.z), "r"(lo.w));
  asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(tile + swz<BN>(row, 2 * c + 1)), "r"(hi.x), "r"(hi.y), "r"(hi.z), "r"(hi.w));
}

// Widens the chunks this thread copied of the stage at (fk, fv) into the K and V tiles
// at (hk, hv). Only its own copies: after cp.async.wait_group they are visible to this
// thread without a barrier.
__device__ __forceinline__ void widen_kv_tile(const KvCursor& cur, u32 fk, u32 fv, u32 hk, u32 hv) {
#pragma unroll
  for (int it = 0; it < KV_ITERS; ++it) {
    const int row = cur.r0 + it * KV_RSTEP;
    const u32 src = cur.f_off + it * KV_RSTEP * D;
    widen16(fk + src, hk, row, cur.kv_chunk);
    widen16(fv + src, hv, row, cur.kv_chunk);
  }
}

// Key-split blocks (FP8_REGS) skip the widened tiles: each warp reads its WK keys'
// bytes from the stage straight into MMA fragments, and widens them in registers. (The
// widened tiles' 16-byte stores, two-way bank conflicted, and their ldmatrix reads were
// about three quarters of a tile's shared-memory traffic: per SM more than the time the
// tile's bytes take to arrive at the copy rate; the FP8 pool read at 57-63% of copy.)
// Dot products are sums, so the order of their terms is free: a thread takes head dims in
// the order its bytes lie, Q's fragments (built once) take the same order, and P V's
// output columns come out permuted, which the epilogue undoes.

// Two e4m3 bytes at bits 8-15 and 24-31 of `y` (the other bits ignored) as two f16 of
// 2^-8 times their values (e4m3x2_as_f16x2_scaled with the bytes one place up).
__device__ __forceinline__ u32 e4m3_odd_bytes_as_f16x2(u32 y) {
  return (y & 0x80008000u) | ((y >> 1) & 0x3f803f80u);
}

// The 16 bits of two e4m3 bytes (low byte first) as two f16 of their exact values.
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 pair) {
#if __CUDA_ARCH__ >= 890
  u32 h2;
  asm("{.reg .b16 a;\n cvt.u16.u32 a, %1;\n cvt.rn.f16x2.e4m3x2 %0, a;}\n" : "=r"(h2) : "r"(pair));
  return h2;
#else
  __trap();
  return 0;
#endif
}

// Key bytes of head dims d..d+3 (one 32-bit word of a key row) as the two B-fragment
// registers of one k16 step: bit moves take bytes 0 and 2, then 1 and 3; the conversion
// (FP8_CVT bit 0) bytes 0 and 1, then 2 and 3. fp8_q_frags pairs Q's dims the same way.
__device__ __forceinline__ void key_word_frag(u32 w, u32& b0, u32& b1) {
#if FP8_CVT & 1
  b0 = e4m3x2_to_f16x2(w & 0xffffu);
  b1 = e4m3x2_to_f16x2(w >> 16);
#else
  b0 = e4m3_odd_bytes_as_f16x2(w << 8);
  b1 = e4m3_odd_bytes_as_f16x2(w);
#endif
}

// Byte i of `a` and byte i of `b` (one head dim of two keys) as one B-fragment register of
// P V, `a`'s value low.
__device__ __forceinline__ u32 value_pair(u32 a, u32 b, int i) {
#if FP8_CVT & 2
  return e4m3x2_to_f16x2(__byte_perm(a, b, i | ((4 + i) << 4)));
#else
  return e4m3_odd_bytes_as_f16x2(__byte_perm(a, b, (i << 4) | ((4 + i) << 12)));
#endif
}

// Q's A fragments in the head-dim order of key_word_frag, from the f16 Q tile: thread
// (g, t) = (lane / 4, lane % 4) holds dims t * D/4 + 4 kk .. + 3 of rows g and g + 8 for
// k16 step kk (its 16-bit words lo = {d, d+1} and hi = {d+2, d+3}).
__device__ __forceinline__ void fp8_q_frags(u32 (&qf)[MT][DK][4], u32 sq, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int c = 0; c < D / 32; ++c) {  // the thread's D/4 dims: D/32 chunks of 8
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(sq + swz<BM>(g + 8 * h, t * (D / 32) + c)));
      const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const u32 lo = w[2 * e], hi = w[2 * e + 1];
        const int kk = 2 * c + e;
#if FP8_CVT & 1
        qf[0][kk][h] = lo;      // k 2t, 2t+1: dims d, d+1
        qf[0][kk][2 + h] = hi;  // k 2t+8, 2t+9: dims d+2, d+3
#else
        qf[0][kk][h] = __byte_perm(lo, hi, 0x5410);      // dims d, d+2
        qf[0][kk][2 + h] = __byte_perm(lo, hi, 0x7632);  // dims d+1, d+3
#endif
      }
    }
}

// S = Q Kᵀ over the warp's WK keys of the stage of bytes at `sk`: key n8 tile n, column g
// is key wkey + 8n + g, whose D/4 bytes from t * D/4 thread (g, t) reads (16-byte loads,
// fp8_chunk's swizzle: one wavefront per 8 lanes).
__device__ __forceinline__ void fp8_scores(float (&s)[MT][NT][4], const u32 (&qf)[MT][DK][4], u32 sk, int wkey,
                                           int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int row = wkey + n * 8 + g;
    u32 w[DK];
#pragma unroll
    for (int c = 0; c < D / 64; ++c) {
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(sk + fp8_chunk(row, t * (D / 64) + c)));
      w[4 * c] = v.x;
      w[4 * c + 1] = v.y;
      w[4 * c + 2] = v.z;
      w[4 * c + 3] = v.w;
    }
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) {
      u32 b0, b1;
      key_word_frag(w[kk], b0, b1);
      mma_16816<mma_t>(s[0][n], qf[0][kk], b0, b1);
    }
  }
}

// O += P V over the warp's WK keys of the stage of bytes at `sv`, 16 (one k16 step) at a
// time. The B fragment pairs two keys at one head dim (k = 2t, 2t+1 and 2t+8, 2t+9), so
// thread (g, t) reads words of those four key rows: dims 32 w + 4 g .. + 3 (four-byte
// loads, one wavefront a warp with fp8_chunk's swizzle at D = 128). O's n8 tile 4w + i,
// column c, is head dim 32 w + 4 c + i: thread (g, t) accumulates dims 32 w + 8 t + i and
// 32 w + 8 t + 4 + i.
__device__ __forceinline__ void fp8_pv(float (&o)[MT][ON][4], const float (&s)[MT][NT][4], u32 sv, int wkey,
                                       int lane) {
  static_assert(!FP8_REGS || ON == 4 * (D / 32), "D / 32 words a key row");
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int kk = 0; kk < PK; ++kk) {
    u32 a[4];
    pack_p(s, 0, kk, a);
    u32 vw[4][D / 32];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = wkey + kk * 16 + (r / 2) * 8 + 2 * t + r % 2;
#pragma unroll
      for (int w = 0; w < D / 32; ++w) {
        asm volatile("ld.shared.u32 %0, [%1];\n"
                     : "=r"(vw[r][w])
                     : "r"(sv + fp8_chunk(row, 2 * w + g / 4) + (g % 4) * 4));
      }
    }
#pragma unroll
    for (int w = 0; w < D / 32; ++w)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        mma_16816<mma_t>(o[0][4 * w + i], a, value_pair(vw[0][w], vw[1][w], i), value_pair(vw[2][w], vw[3][w], i));
  }
}
#endif

// Combines the splits of rows [row0, end) of sequence b's query tile for kv head kvh:
// o = Σ w_s o_s / Σ w_s with w_s = exp(lse_s - max lse), lse = max + log Σ w_s. One warp
// per row, each lane D/32 dims; lane s fetches split s's LSE, and the partial rows of the
// first MERGE_AHEAD splits load in the same round trip (they do not need the max first):
// at batch 1 the merge is on every launch's critical path, and each round trip is ~0.7 us
// (bench decode --trace on the H200: 2.5-2.8 us a merge with the rows loaded after the
// LSEs, 8 at a time). Later splits' rows go out 8 at a time. Reads bypass L1
// (ld.global.cg): other blocks wrote them during this launch.
// (Key-split decode blocks only: elsewhere the rows' registers would spill in the wgmma
// kernels, whose splits are long prefill chunks, not latency-bound.) WIDE_MERGE, for plans
// with more than 16 splits of a row (launch.rs): 32 ahead. On the H200 1@8192 (32 splits)
// took 12.0 us against 12.8 with 16, but plans of few splits ran 0.4-0.5 us slower with
// it (8@1024, 16@2048, 1@4096: bench/NOTES.md), so it is an image of its own.
#ifndef WIDE_MERGE
#define WIDE_MERGE 0
#endif
constexpr int MERGE_AHEAD = KS ? (WIDE_MERGE ? 32 : 16) : 1;
template <int PER> struct MergeVec { typedef float2 type; };  // a lane's D / 32 values
template <> struct MergeVec<4> { typedef float4 type; };
__device__ __forceinline__ void add_scaled(float (&acc)[4], float w, float4 v) {
  acc[0] += w * v.x; acc[1] += w * v.y; acc[2] += w * v.z; acc[3] += w * v.w;
}
__device__ __forceinline__ void add_scaled(float (&acc)[2], float w, float2 v) {
  acc[0] += w * v.x; acc[1] += w * v.y;
}
__device__ void merge_rows(const AttentionParams& p, const MergeItem& m, int row0, int end, int kvh,
                           int qo_start, int warp, int lane) {
  constexpr int PER = D / 32;
  typedef typename MergeVec<PER>::type vec_t;
  for (int gr = row0 + warp; gr < end; gr += WARPS) {
    const int t = gr / p.group, head = kvh * p.group + gr % p.group;
    const long long first = (long long)(m.first_row + t) * p.num_qo_heads + head;
    const long long step = (long long)m.split_stride * p.num_qo_heads;  // between splits
    const int n = m.num_splits;
    const float lse_own = lane < n ? __ldcg(p.partial_lse + first + lane * step) : NEG_INF;
    vec_t ahead[MERGE_AHEAD];
#pragma unroll
    for (int i = 0; i < MERGE_AHEAD; ++i) {
      if (i < n) ahead[i] = __ldcg(reinterpret_cast<const vec_t*>(p.partial_o + (first + i * step) * D + lane * PER));
    }
    float mx = lse_own;
    for (int s = lane + 32; s < n; s += 32) mx = fmaxf(mx, __ldcg(p.partial_lse + first + s * step));
    mx = warp_max(mx);
    float acc[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) acc[i] = 0.f;
    float wsum = 0.f;
    if (mx != NEG_INF) {
      for (int s0 = 0; s0 < n; s0 += 32) {
        const int s = s0 + lane;
        const float ls = s0 == 0 ? lse_own : (s < n ? __ldcg(p.partial_lse + first + s * step) : NEG_INF);
        const float wl = s < n ? fast_exp2((ls - mx) * 1.4426950408889634f) : 0.f;
        wsum += wl;
        const int count = min(32, n - s0);  // warp-uniform
        int i0 = 0;
        if (s0 == 0) {
#pragma unroll
          for (int i = 0; i < MERGE_AHEAD; ++i) {
            if (i < count) add_scaled(acc, __shfl_sync(0xffffffffu, wl, i), ahead[i]);
          }
          i0 = MERGE_AHEAD;
        }
#pragma unroll 8
        for (int i = i0; i < count; ++i) {
          const float wi = __shfl_sync(0xffffffffu, wl, i);
          add_scaled(acc, wi, __ldcg(reinterpret_cast<const vec_t*>(p.partial_o + (first + (s0 + i) * step) * D + lane * PER)));
        }
      }
    }
    wsum = warp_sum(wsum);
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    elem_t* dst = p.o + (long long)(qo_start + t) * p.o_stride + (long long)head * D + lane * PER;
#pragma unroll
    for (int i = 0; i < PER; i += 2) *(u32*)(dst + i) = pack2<elem_t>(acc[i] * inv, acc[i + 1] * inv);
    if (p.lse && lane == 0) {
      p.lse[(long long)(qo_start + t) * p.num_qo_heads + head] = wsum > 0.f ? mx + __logf(wsum) : NEG_INF;
    }
  }
}

#if CLUSTER_MERGE
// The chunks of one (query tile, kv head)'s keys in one cluster (CLUSTER blocks, consecutive
// along x: plan.rs's plan_clustered). Every block has written its state (`cs`: 16 rows of D
// normalised floats, then their 16 natural-log LSEs) to its shared memory; after one
// cluster barrier rank r combines columns [r SLICE, (r + 1) SLICE) of every row from all of
// them (distributed shared memory) and writes them out. No partials, counts or merge
// through global memory: on the H200 at 1,024 keys (bench/NOTES.md) those round trips were
// a third of a launch. A block's shared memory must outlive its peers' reads: each one
// arrives once done reading and waits for the others before it exits.
__device__ void cluster_merge(const AttentionParams& p, const float* cs, int row0, int rows, int kvh, int qo_start) {
  constexpr int SLICE = D / CLUSTER;  // columns a rank combines
  constexpr int VECS = SLICE / 4;     // float4 of them a row
  static_assert(16 * VECS <= THREADS, "a thread per float4 of the slice's 16 rows");
  constexpr float LOG2E = 1.4426950408889634f;
  const u32 rank = cluster_rank();
  const int rr = threadIdx.x / VECS, col = rank * SLICE + (threadIdx.x % VECS) * 4;
  const int gr = row0 + rr;
  const bool mine = threadIdx.x < 16 * VECS && gr < rows;
  cluster_sync();  // every block's state is in its shared memory
  if (mine) {
    float l[CLUSTER];
    float4 v[CLUSTER];
#pragma unroll
    for (int j = 0; j < CLUSTER; ++j) {
      l[j] = __uint_as_float(ld_cluster(in_rank(cs + 16 * D + rr, j)));
      v[j] = ld_cluster_f4(in_rank(cs + rr * D + col, j));
    }
    float mx = NEG_INF;
#pragma unroll
    for (int j = 0; j < CLUSTER; ++j) mx = fmaxf(mx, l[j]);
    float wsum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mx != NEG_INF) {  // (all chunks empty: no keys, which BatchMeta refuses)
#pragma unroll
      for (int j = 0; j < CLUSTER; ++j) {
        const float wj = fast_exp2((l[j] - mx) * LOG2E);  // 0 for an empty chunk
        wsum += wj;
        acc.x += wj * v[j].x; acc.y += wj * v[j].y; acc.z += wj * v[j].z; acc.w += wj * v[j].w;
      }
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    const int t = gr / p.group, head = kvh * p.group + gr % p.group;
    elem_t* dst = p.o + (long long)(qo_start + t) * p.o_stride + (long long)head * D + col;
    *reinterpret_cast<uint2*>(dst) =
        make_uint2(pack2<elem_t>(acc.x * inv, acc.y * inv), pack2<elem_t>(acc.z * inv, acc.w * inv));
    if (p.lse && col == 0) {
      p.lse[(long long)(qo_start + t) * p.num_qo_heads + head] = wsum > 0.f ? mx + __logf(wsum) : NEG_INF;
    }
  }
  cluster_arrive();  // done with the peers' shared memory
  TRACE_MARK(6);
#if TRACE
  TRACE_AT(7, 0ull);
  TRACE_AT(9, global_ns());
#endif
  cluster_wait();  // the peers are done with this block's shared memory
}
#endif

#if WGMMA
// Issues O += P V for one tile (PK k16 steps) as one wgmma group: P from registers (the
// S accumulators packed, mma.sync's A layout), V from the stage at `sv`, MN-major: 16 keys
// (2048 bytes) a step, its two 64-wide column blocks BN rows apart. The caller waits; P
// and O must stay untouched until then (wgmma reads and writes them asynchronously):
// wgmma_pv_done waits and pins them.
__device__ __forceinline__ void wgmma_pv(u32 (&p_frag)[PK][4], u32 sv, float (&o_acc)[MT][ON][4]) {
  wgmma_fence();  // the rescaled O and P's registers, before the wgmmas read them
#pragma unroll
  for (int kk = 0; kk < PK; ++kk) {
    const u64 db = wgmma_desc(sv + kk * 16 * 128, BN * 128, 1024);
    wgmma_rs<D, mma_t>(reinterpret_cast<float(&)[ON * 4]>(o_acc[0]), p_frag[kk], db, 1);
  }
  wgmma_commit();
}

// Waits for every wgmma of the warpgroup (the P V in flight), then pins P and O there.
__device__ __forceinline__ void wgmma_pv_done(u32 (&p_frag)[PK][4], float (&o_acc)[MT][ON][4]) {
  wgmma_wait<0>();
  wgmma_fence_regs(p_frag);
  wgmma_fence_regs(reinterpret_cast<float(&)[ON * 4]>(o_acc[0]));
}

// The producer warps (PRODUCER): copy tile t of keys [kv_begin, kv_stop) into stage t % ST
// as soon as every compute thread has released the stage's previous tile, one cp.async
// arrival on the stage's full barrier per thread. They run as far ahead as the stages
// allow, whatever the two warpgroups' pace. Producer thread i copies 16-byte chunks i,
// i + PRODUCER_THREADS, ... of each [BN, D] tile, with the row's page id from the table.
__device__ void produce_kv(const AttentionParams& p, int b, int kvh, int kv_begin, int n_tiles, int kv_stop,
                           u32 sk0, u32 sv0, u32 stage_bytes, u32 full_bar, u32 empty_bar, int ptid) {
#if PAGED
  const int* pages = p.kv_indices + p.kv_indptr[table_row(p, b, kvh)];
  const long long page_stride = (long long)p.num_kv_heads * p.page_size * D;
  const long long head_off = (long long)kvh * p.page_size * D;
#else
  const long long base = (long long)p.kv_indptr[b] * p.kv_stride + (long long)kvh * D;
#endif
  constexpr int PT = PRODUCER_THREADS > 0 ? PRODUCER_THREADS : 32;
  constexpr int COPIES = BN * DC / PT;  // per thread, of each of K and V
  for (int t = 0; t < n_tiles; ++t) {
    const int st = t % ST;
    if (t >= ST) mbar_wait(empty_bar + st * 8, (t / ST - 1) & 1);
    const int tile_start = kv_begin + t * BN;
    const u32 sk = sk0 + st * stage_bytes, sv = sv0 + st * stage_bytes;
#pragma unroll 8
    for (int i = 0; i < COPIES; ++i) {
      const int idx = i * PT + ptid, row = idx / DC, c = idx % DC;
      const int key = tile_start + row;
      const int kk = min(key, kv_stop - 1);  // keep the (unread) address inside the sequence
#if PAGED
      const long long off = (long long)__ldg(pages + (kk >> p.page_shift)) * page_stride + head_off +
                            (long long)(kk & (p.page_size - 1)) * D + c * 8;
#else
      const long long off = base + (long long)kk * p.kv_stride + c * 8;
#endif
      const u32 dst = swz<BN>(row, c);
      cp_async_16(sk + dst, p.k + off, key < kv_stop);
      cp_async_16(sv + dst, p.v + off, key < kv_stop);
    }
    cp_async_mbar_arrive(full_bar + st * 8);
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

#endif

// One K/V tile's step of the online softmax, on a warp's S accumulators: masks keys at or
// past each row's limit (the item's end, and when causal the row's token) if `need_mask`
// (`key0`: the key of column 0), then in the exp2 domain turns S into P (unnormalised),
// updates the running max and sum and gives each row's rescale factor `alpha` for O.
// Returns whether any of this thread's rows raised its max.
__device__ __forceinline__ bool softmax_tile(float (&s)[MT][NT][4], float (&m_run)[MT][2], float (&l_run)[MT][2],
                                             float (&alpha)[MT][2], const int (&row_limit)[MT][2], int key0,
                                             bool need_mask, float scale_log2, int lane) {
  if (need_mask) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        int limit = row_limit[mt][half] - key0 - (lane % 4) * 2;  // relative to column 0
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (n * 8 + e >= limit) s[mt][n][half * 2 + e] = NEG_INF;
      }
  }
  bool rescale = false;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = NEG_INF;
#pragma unroll
      for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][half * 2], s[mt][n][half * 2 + 1]));
      mx = warp_max4(mx) * scale_log2;
      float m_new = fmaxf(m_run[mt][half], mx);
      // A row with no visible key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
      float m_use = m_new == NEG_INF ? 0.f : m_new;
      alpha[mt][half] = fast_exp2(m_run[mt][half] - m_use);
      rescale |= m_new != m_run[mt][half];
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float pv = fast_exp2(fmaf(s[mt][n][half * 2 + e], scale_log2, -m_use));
          s[mt][n][half * 2 + e] = pv;
          sum += pv;
        }
      l_run[mt][half] = l_run[mt][half] * alpha[mt][half] + sum;
      m_run[mt][half] = m_new;
    }
  return rescale;
}

#if TMA
#include "attention/tma_pipeline.cuh"
#endif

#if PERSISTENT
// The persistent TMA kernel (its own file: its loop runs over tasks, not one item).
#include "attention/tma.cuh"
#else
// wgmma blocks at D = 64 without the overlap fit two to an SM (80 KiB of tiles each, at
// most 128 registers a thread).
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, WGMMA && D == 64 && !OVERLAP && !PRODUCER ? 2 : 1)
attention_kernel(const __grid_constant__ KernelParams kp) {
  const AttentionParams& p = kp.p;
  // The plan, the table offsets and the lengths are the host's: under programmatic
  // dependent launch their chain of loads (work item, indptrs, lengths) runs while the
  // kernel before (RoPE and the KV append, or sparse selection) finishes. Page ids (which
  // sparse selection writes), Q and K/V are read after pdl_wait() below.
  TRACE_MARK(0);
#if TRACE
  TRACE_AT(8, global_ns());
  {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    TRACE_AT(10, smid);
  }
#endif
  if (!p.meta_early) pdl_wait();
  extern __shared__ __align__(128) unsigned char smem[];
  const int item = p.heads_inner ? blockIdx.x / p.num_kv_heads : blockIdx.x;
  const WorkItem w = p.work[item];
  if (w.batch < 0) return;
  const int b = w.batch, kvh = p.heads_inner ? blockIdx.x % p.num_kv_heads : blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int qo_start = p.qo_indptr[b];
  const int q_len = p.qo_indptr[b + 1] - qo_start;
  const int rows = q_len * p.group;
  const int row0 = w.q_tile * BM;  // first row of this tile
  if (row0 >= rows) return;
  const int kv_len = seq_kv_len(p, b, kvh);

  // Keys this item reads: its split range, clipped to what the last row may see.
  int kv_stop = min(w.kv_end, kv_len);
  const int causal_shift = kv_len - q_len;  // row token t sees keys <= t + causal_shift
  if (p.causal) {
    int last_t = (min(rows, row0 + BM) - 1) / p.group;
    kv_stop = min(kv_stop, last_t + causal_shift + 1);
  }
  const int n_tiles = kv_stop > w.kv_begin ? (kv_stop - w.kv_begin + BN - 1) / BN : 0;
  // Keys every row of the tile may see (no causal mask needed at or below it).
  const int first_t = row0 / p.group;
  const int mask_free_end = p.causal ? first_t + causal_shift + 1 : kv_stop;

#if WGMMA
  // The swizzle atoms wgmma reads must start 1024-byte aligned: the launcher asks for 1 KiB
  // more than the tiles take.
  const u32 sq = (smem_addr(smem) + 1023u) & ~1023u;
#else
  const u32 sq = smem_addr(smem);
#endif
#if KV_FP8
  // The widened K and V tiles the MMAs read (none in key-split blocks), then the stages
  // of bytes.
  [[maybe_unused]] const u32 sk_wide = sq + BM * D * 2;
  [[maybe_unused]] const u32 sv_wide = sk_wide + BN * D * 2;
  const u32 sk0 = FP8_REGS ? sq + BM * D * 2 : sv_wide + BN * D * 2;
  const u32 sv0 = sk0 + ST * BN * D;
  const u32 stage_bytes = BN * D;
#else
  const u32 sk0 = sq + BM * D * 2;
  const u32 sv0 = sk0 + ST * BN * D * 2;
  const u32 stage_bytes = BN * D * 2;
#endif
  const int chunk = threadIdx.x % DC, r0 = threadIdx.x / DC;
  const u32 s_off = swz<BM>(r0, chunk);
  const bool producer = PRODUCER && warp >= WARPS;
  KvCursor cur;
  cur.kv_chunk = threadIdx.x % KDC;
  cur.r0 = threadIdx.x / KDC;
  cur.s_off = swz<BN>(cur.r0, cur.kv_chunk);
  cur.f_off = fp8_chunk(cur.r0, cur.kv_chunk);
  cur.kv_stop = kv_stop;
#if PAGED
  cur.pages = p.kv_indices + p.kv_indptr[table_row(p, b, kvh)];
  cur.page_stride = (long long)p.num_kv_heads * p.page_size * D;
  cur.head_off = (long long)kvh * p.page_size * D + cur.kv_chunk * KV_CHUNK;
#else
  cur.base = (long long)p.kv_indptr[b] * p.kv_stride + (long long)kvh * D + cur.kv_chunk * KV_CHUNK;
#endif
  // The first tiles whose keys the KV append just before did not write (all but each
  // sequence's last q_len keys) load before pdl_wait(), each its own commit group: under
  // programmatic dependent launch their page ids and K/V arrive during the previous
  // kernel's tail (at batch 1 the first tile's chain of round trips is a fixed cost of
  // every launch). Q, which that kernel writes, comes after the wait.
  int pre = 0;
#if !WGMMA
  if (p.kv_early && p.meta_early) {
    const int stable = kv_len - q_len;
    while (pre < AHEAD && pre < n_tiles && w.kv_begin + (pre + 1) * BN <= stable) ++pre;
  }
  for (int s = 0; s < pre; ++s) {
    fetch_pages(p, cur, w.kv_begin + s * BN);
    load_kv_tile(p, cur, w.kv_begin + s * BN, sk0 + s * stage_bytes, sv0 + s * stage_bytes);
    cp_async_commit();
  }
#endif

  TRACE_MARK(1);
  if (p.meta_early) pdl_wait();
  TRACE_MARK(2);
  // Q tile (by the compute threads): rows past the sequence read as zeros.
#pragma unroll
  for (int it = 0; it < (producer ? 0 : Q_ITERS); ++it) {
    int gr = min(row0 + r0 + it * RSTEP, rows - 1);
    int t = gr / p.group, g = gr - t * p.group;
    const elem_t* src = p.q + (long long)(qo_start + t) * p.q_stride + (long long)(kvh * p.group + g) * D + chunk * 8;
    cp_async_16(sq + s_off + it * RSTEP * ROW_PITCH, src, row0 + r0 + it * RSTEP < rows);
  }
#if WGMMA
  // Stage s is full when every copying thread's copies of its tile have landed (each one's
  // cp.async arrival; without producer warps Q rides with tile 0's, with them the compute
  // threads publish Q among themselves), and empty when every compute thread is done with it:
  // the two warpgroups wait on these instead of meeting at a block barrier each tile, so
  // one can run its softmax while the other's wgmmas run.
  // (TMA: K and V each have their own full and empty barriers, behind these.)
  __shared__ __align__(8) u64 stage_bars[(TMA ? 4 : 2) * ST];
  const u32 full_bar = smem_addr(stage_bars), empty_bar = full_bar + ST * 8;
#if TMA
  const u32 vfull_bar = empty_bar + ST * 8, vempty_bar = vfull_bar + ST * 8;
  const Stages bar = {full_bar, empty_bar, vfull_bar, vempty_bar};
  if (threadIdx.x == 0) {
    // Full: the producer's one arrival plus the tile's bytes. Empty: every thread of the
    // warpgroups with rows (the last ones have none when the tile's rows end early).
    const int consumers = 128 * min(CWG, (rows - row0 + 63) / 64);
#pragma unroll
    for (int s = 0; s < ST; ++s) {
      mbar_init(full_bar + s * 8, 1);
      mbar_init(vfull_bar + s * 8, 1);
      mbar_init(empty_bar + s * 8, consumers);
      mbar_init(vempty_bar + s * 8, consumers);
    }
  }
  __syncthreads();
  if (producer) {
    // From here on the producer warpgroup meets the consumers at no block barrier.
    setmaxnreg_dec<24>();
    if (warp == WARPS) {
      if (lane == 0) {
        tma_prefetch_map(&kp.k_map);
        tma_prefetch_map(&kp.v_map);
      }
      produce_kv_tma(kp, kvh, w.kv_begin, n_tiles, kv_stop, p.kv_indptr[table_row(p, b, kvh)], 0, sk0, sv0, bar,
                     lane);
    }
    return;
  }
  setmaxnreg_inc<CONSUMER_REGS>();
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  named_bar_sync<1, THREADS>();
#else
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < ST; ++s) {
      mbar_init(full_bar + s * 8, PRODUCER ? PRODUCER_THREADS : THREADS);  // the threads that copy
      mbar_init(empty_bar + s * 8, THREADS);                 // the threads that compute
    }
  }
  __syncthreads();
  if (producer) {
    produce_kv(p, b, kvh, w.kv_begin, n_tiles, kv_stop, sk0, sv0, stage_bytes, full_bar, empty_bar,
               threadIdx.x - THREADS);
  } else if (PRODUCER) {
    // Q is the compute threads' own: landed and published among them before any wgmma.
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    named_bar_sync<1, THREADS>();
  }
#endif
#endif
  // The first AHEAD tiles, one commit group each (empty past the last tile, so that
  // group j always holds tile j; Q rides in group 0). With tiles loaded before the wait,
  // Q rides in the first group after them, or alone when all AHEAD went before: tile 0
  // then waits for every group (below), and later tiles' groups come at most one later.
  for (int s = pre; s < (PRODUCER ? 0 : AHEAD); ++s) {
    if (s < n_tiles) {
      fetch_pages(p, cur, w.kv_begin + s * BN);
      load_kv_tile(p, cur, w.kv_begin + s * BN, sk0 + s * stage_bytes, sv0 + s * stage_bytes);
#if WGMMA
      cp_async_mbar_arrive(full_bar + s * 8);
#endif
    }
    cp_async_commit();
  }
  if (pre == AHEAD) cp_async_commit();  // Q alone
  if (!PRODUCER && AHEAD < n_tiles) fetch_pages(p, cur, w.kv_begin + AHEAD * BN);

  // Warps whose rows all lie past the sequence only help load.
  const int wrow = KS ? 0 : warp * WARP_ROWS;  // first row of this warp within the tile
  // (wgmma: a whole warpgroup's, whose instructions all its warps must issue.)
  const bool warp_active = !producer && row0 + (WGMMA ? wrow / 64 * 64 : wrow) < rows;
  const int wkey = KS ? warp * WK : 0;        // first key of this warp within a K/V tile
#if WGMMA
  // Ping-pong runs among the warpgroups with rows (each waits for its predecessor's turn).
  const int wg = warp / 4;
  [[maybe_unused]] const int n_wg = min(CWG, (rows - row0 + 63) / 64);
#if TMA
  const bool pingpong = PINGPONG && !producer && n_wg > 1;
  if (pingpong && wg == n_wg - 1) turn_pass(wg, n_wg);  // warpgroup 0 first
#else
  const bool pingpong = PRODUCER && PINGPONG && !producer && row0 + 64 < rows;
  if (pingpong && wg == 1) named_bar_arrive<2, THREADS>();  // warpgroup 0 first
#endif
#endif

  float o_acc[MT][ON][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < ON; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) o_acc[mt][n][i] = 0.f;
    m_run[mt][0] = m_run[mt][1] = NEG_INF;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }
  [[maybe_unused]] u32 q_frag[Q_IN_REGS ? MT : 1][Q_IN_REGS ? DK : 1][4];
  // One past the last key each of this thread's rows may see (its token's causal limit).
  int row_limit[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int gr = row0 + wrow + mt * 16 + lane / 4 + half * 8;
      row_limit[mt][half] = p.causal ? min(kv_stop, gr / p.group + causal_shift + 1) : kv_stop;
    }

  // (Keys converted exactly, FP8_CVT bit 0, lack none of the 2^8 the launcher folds in.)
  [[maybe_unused]] const float scale_log2 = FP8_REGS && (FP8_CVT & 1) ? p.scale_log2 * 0x1p-8f : p.scale_log2;
#if WGMMA
  // OVERLAP: tile j - 1's P, packed for P V, waits here while tile j's Q Kᵀ and softmax run.
  [[maybe_unused]] u32 p_frag[PK][4];
#endif
#if TMA
  // The overlapped loop over the TMA stages (tma_overlapped_tiles), then the last P V.
  if (warp_active && n_tiles > 0) {
#if WG_SKIP
    const int last_row = min(rows, row0 + (wg + 1) * 64) - 1;
    const int limit = p.causal ? min(kv_stop, last_row / p.group + causal_shift + 1) : kv_stop;
    const int my_tiles = max(1, min(n_tiles, (limit - w.kv_begin + BN - 1) / BN));
#else
    const int my_tiles = n_tiles;
#endif
    tma_overlapped_tiles(p, sq + wrow / 64 * 64 * 128, sk0, sv0, bar, 0, my_tiles, w.kv_begin, kv_stop, mask_free_end,
                         row_limit, pingpong, wg, n_wg, lane, o_acc, m_run, l_run, p_frag);
    tma_last_pv(sv0, bar, 0, my_tiles, w.kv_begin, kv_stop, wg, o_acc, p_frag);
#if WG_SKIP
    tma_idle_tiles(bar, my_tiles, n_tiles, pingpong, wg, n_wg);
#endif
  }
#endif
  for (int j = 0; j < (producer || TMA ? 0 : n_tiles); ++j) {
    const int tile_start = w.kv_begin + j * BN;
#if WGMMA
    // Tile j + AHEAD goes into the stage of tile j + AHEAD - ST once every thread is done
    // with that one; then wait for tile j.
    if (!PRODUCER && j + AHEAD < n_tiles) {
      const int t = j + AHEAD, st = t % ST;
      if (t >= ST) mbar_wait(empty_bar + st * 8, (t / ST - 1) & 1);
      load_kv_tile(p, cur, tile_start + AHEAD * BN, sk0 + st * stage_bytes, sv0 + st * stage_bytes);
      cp_async_mbar_arrive(full_bar + st * 8);
      if (t + 1 < n_tiles) fetch_pages(p, cur, tile_start + (AHEAD + 1) * BN);
    }
    cp_async_commit();
    mbar_wait(full_bar + (j % ST) * 8, (j / ST) & 1);
    // Other threads' copies, seen land through the barrier, to the proxy wgmma reads with.
    fence_proxy_async();
    if (!warp_active) {  // rows past the sequence: only help load
      mbar_arrive(empty_bar + (j % ST) * 8);
      continue;
    }
#else
    // Groups 0..j are complete (at most AHEAD - 1 younger ones pending): tile j landed.
    // After this barrier every warp is also done with tile j - 1, so its stage takes tile
    // j + AHEAD while we compute on tile j.
    if (j == 0 && pre > 0) {
      cp_async_wait<0>();  // Q is not in group 0 then
    } else {
      cp_async_wait<AHEAD - 1>();
    }
    __syncthreads();
    if (j == 0) TRACE_MARK(3);
    if (j + AHEAD < n_tiles) {
      u32 st = ((j + AHEAD) % ST) * stage_bytes;
      load_kv_tile(p, cur, tile_start + AHEAD * BN, sk0 + st, sv0 + st);
      if (j + AHEAD + 1 < n_tiles) fetch_pages(p, cur, tile_start + (AHEAD + 1) * BN);
    }
    cp_async_commit();
#endif
#if KV_FP8
    if (j == 0) {
      // Q landed with tile 0: to f16 for the MMAs, before any warp reads it (KEY_SPLIT
      // blocks have no second barrier below; the others' covers it).
      q_to_f16(sq, s_off);
      if constexpr (KS) __syncthreads();
    }
    // Key-split warps read the stage's bytes themselves (fp8_scores, fp8_pv). The others:
    // every warp is past tile j - 1 (the barrier above), so the widened tiles are free.
    u32 sk = sk0 + (j % ST) * stage_bytes, sv = sv0 + (j % ST) * stage_bytes;
    if constexpr (!FP8_REGS) {
      widen_kv_tile(cur, sk, sv, sk_wide, sv_wide);
      __syncthreads();
      sk = sk_wide;
      sv = sv_wide;
    }
#else
    const u32 sk = sk0 + (j % ST) * stage_bytes, sv = sv0 + (j % ST) * stage_bytes;
#endif

    if (warp_active) {
#if WGMMA
      // S = Q Kᵀ on the warpgroup's 64 rows: DK k16 steps, Q and K from shared memory.
      const u32 q_rows = sq + wrow / 64 * 64 * 128;
      float s[MT][NT][4];
      float(&s_flat)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(s[0]);  // as wgmma lays it out
      if (pingpong) {  // this warpgroup's turn: barrier 2 for warpgroup 0, 3 for 1
        if (wg == 0) named_bar_sync<2, THREADS>();
        else named_bar_sync<3, THREADS>();
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < DK; ++kk) {
        // Column block kk / 4 (of BM or BN rows of 128 bytes), then 32 bytes a step within it.
        const u64 da = wgmma_desc(q_rows + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024);
        const u64 db = wgmma_desc(sk + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024);
        wgmma_ss<BN, mma_t>(s_flat, da, db, kk > 0);
      }
      wgmma_commit();
      // P V of tile j - 1 behind it: the tensor cores run it during this tile's softmax.
      if (OVERLAP && j > 0) wgmma_pv(p_frag, sv0 + ((j - 1) % ST) * stage_bytes, o_acc);
      if (pingpong) {  // the other warpgroup's turn to issue
        if (wg == 0) named_bar_arrive<3, THREADS>();
        else named_bar_arrive<2, THREADS>();
      }
      if (OVERLAP && j > 0) {
        wgmma_wait<1>();  // Q Kᵀ done; P V may still run
      } else {
        wgmma_wait<0>();
      }
      wgmma_fence_regs(s_flat);
#else
      if constexpr (Q_IN_REGS) {
        if (j == 0) {
#if KV_FP8 && KEY_SPLIT
          fp8_q_frags(q_frag, sq, lane);  // (FP8_REGS: the calls below take its order of dims)
#else
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < DK; ++kk)
              ldmatrix_x4(q_frag[mt][kk][0], q_frag[mt][kk][1], q_frag[mt][kk][2], q_frag[mt][kk][3],
                          sq + swz<BM>(wrow + mt * 16 + lane % 16, kk * 2 + lane / 16));
#endif
        }
      }
      // S = Q Kᵀ
      float s[MT][NT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) s[mt][n][i] = 0.f;
#if KV_FP8 && KEY_SPLIT
      fp8_scores(s, q_frag, sk, wkey, lane);
#endif
#pragma unroll
      for (int kk = 0; kk < (FP8_REGS ? 0 : DK); ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (Q_IN_REGS) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[mt][i] = q_frag[mt][kk][i];
          } else {
            ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                        sq + swz<BM>(wrow + mt * 16 + lane % 16, kk * 2 + lane / 16));
          }
        }
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
          u32 b0, b1, b2, b3;
          ldmatrix_x4(b0, b1, b2, b3, sk + swz<BN>(wkey + n * 8 + lane % 8 + (lane / 16) * 8, kk * 2 + (lane / 8) % 2));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<mma_t>(s[mt][n], a[mt], b0, b1);
            mma_16816<mma_t>(s[mt][n + 1], a[mt], b2, b3);
          }
        }
      }
#endif

      float alpha[MT][2];
      const bool rescale = softmax_tile(s, m_run, l_run, alpha, row_limit, tile_start + wkey,
                                        tile_start + wkey + WK > min(kv_stop, mask_free_end), scale_log2, lane);
#if WGMMA
      if constexpr (OVERLAP) {
        // Tile j - 1's P V is done with O (and its P) before O is rescaled for tile j. The
        // softmax above must not sink below the wait (the compiler may move plain
        // arithmetic across it): pinning S here keeps it in the P V's shadow.
        wgmma_fence_regs(s_flat);
        if (j > 0) {
          wgmma_pv_done(p_frag, o_acc);
          mbar_arrive(empty_bar + ((j - 1) % ST) * 8);
        }
      }
#endif
      // Rescale O only when some row of the warp raised its max: one warp-uniform branch,
      // taken less and less often as keys go by.
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int n = 0; n < ON; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) o_acc[mt][n][i] *= alpha[mt][i / 2];
      }

      // O += P V: the S accumulators of n8 tiles 2kk, 2kk+1 are the A fragment of k16 step kk.
#if WGMMA
#pragma unroll
      for (int kk = 0; kk < PK; ++kk) pack_p(s, 0, kk, p_frag[kk]);
      if constexpr (!OVERLAP) {
        wgmma_pv(p_frag, sv, o_acc);
        wgmma_pv_done(p_frag, o_acc);
        mbar_arrive(empty_bar + (j % ST) * 8);
      }
#else
#if KV_FP8 && KEY_SPLIT
      fp8_pv(o_acc, s, sv, wkey, lane);
#endif
#pragma unroll
      for (int kk = 0; kk < (FP8_REGS ? 0 : PK); ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) pack_p(s, mt, kk, a[mt]);
#pragma unroll
        for (int n = 0; n < ON; n += 2) {
          u32 b0, b1, b2, b3;
          ldmatrix_x4_trans(b0, b1, b2, b3, sv + swz<BN>(wkey + kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, n + lane / 16));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<mma_t>(o_acc[mt][n], a[mt], b0, b1);
            mma_16816<mma_t>(o_acc[mt][n + 1], a[mt], b2, b3);
          }
        }
      }
#endif
    }
  }
#if WGMMA
  // The last warpgroup's first arrival on warpgroup 0's turn has one wait more to meet:
  // leave it balanced.
#if TMA
  if (pingpong && wg == 0) turn_wait(0);
#else
  if (pingpong && wg == 0) named_bar_sync<2, THREADS>();
#endif
  if (OVERLAP && !TMA && warp_active && n_tiles > 0) {  // the last tile's P V
    wgmma_pv(p_frag, sv0 + ((n_tiles - 1) % ST) * stage_bytes, o_acc);
    wgmma_pv_done(p_frag, o_acc);
  }
#endif
  cp_async_wait<0>();
  block_sync();
  TRACE_MARK(4);

  // Epilogue: normalise, then write O (or the fp32 partial) and the LSE.
  const bool partial = w.partial_row >= 0;
  if constexpr (KS) {
    // Each warp saw a quarter of the keys: combine their (m, l, O) through shared memory
    // (the K/V stages are free now), then each thread finishes D / TPR columns of one row,
    // four at a time, 32 columns apart. Rows of the states are SO_PITCH floats, 8 more
    // than D, and the threads of a row read consecutive columns: both the stores (8 rows a
    // warp instruction) and the loads then touch every bank once per wavefront (with rows
    // of D floats and 16 columns a thread, 8- and 16-way conflicts: 0.6 + 0.75 us of each
    // decode block's epilogue under bench decode --trace on the H200). fp8_pv's threads
    // hold 8 consecutive columns each (two float4 stores): there rows 4 floats apart
    // keep a wavefront's two rows on disjoint banks.
    constexpr int TPR = THREADS / 16;  // threads per row
    constexpr int CPT = D / TPR;       // columns per thread
    constexpr int CHUNKS = KS ? CPT / 4 : 1;  // of 4 columns (this branch also parses where !KS)
    float* so = reinterpret_cast<float*>(smem + BM * D * 2);  // [WARPS][16][SO_PITCH]
    float* sm = so + WARPS * 16 * SO_PITCH;                    // [WARPS][16] running max
    float* sl = sm + WARPS * 16;                               // [WARPS][16] sum
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = lane / 4 + half * 8;
      const float l = warp_sum4(l_run[0][half]);
      if (half == 1 && row0 + 8 >= rows) break;  // rows 8-15 all past the sequence's rows
      if (lane % 4 == 0) {
        sm[warp * 16 + r] = m_run[0][half];
        sl[warp * 16 + r] = l;
      }
      float* row_at = so + (warp * 16 + r) * SO_PITCH;
      if constexpr (FP8_REGS) {
#pragma unroll
        for (int w = 0; w < D / 32; ++w)
#pragma unroll
          for (int c = 0; c < 2; ++c) {  // columns 2t + c of n8 tiles 4w .. 4w + 3
            const int e = half * 2 + c;
            *reinterpret_cast<float4*>(row_at + 32 * w + 8 * (lane % 4) + 4 * c) =
                make_float4(o_acc[0][4 * w][e], o_acc[0][4 * w + 1][e], o_acc[0][4 * w + 2][e], o_acc[0][4 * w + 3][e]);
          }
      } else {
#pragma unroll
        for (int n = 0; n < ON; ++n) {
          *reinterpret_cast<float2*>(row_at + n * 8 + (lane % 4) * 2) =
              make_float2(o_acc[0][n][half * 2], o_acc[0][n][half * 2 + 1]);
        }
      }
    }
    TRACE_MARK(11);
    __syncthreads();
    TRACE_MARK(12);
    const int r = threadIdx.x / TPR, c0 = (threadIdx.x % TPR) * 4;  // columns c0 + 32 k
    const int gr = row0 + r;
    if (gr < rows) {
      float mx = NEG_INF;
#pragma unroll
      for (int wi = 0; wi < WARPS; ++wi) mx = fmaxf(mx, sm[wi * 16 + r]);
      const float m_use = mx == NEG_INF ? 0.f : mx;
      float wt[WARPS], l = 0.f;
#pragma unroll
      for (int wi = 0; wi < WARPS; ++wi) {
        wt[wi] = fast_exp2(sm[wi * 16 + r] - m_use);
        l += wt[wi] * sl[wi * 16 + r];
      }
      float inv = l > 0.f ? 1.f / l : 0.f;
#if KV_FP8
      // (Values converted exactly, FP8_CVT bit 1, lack none of the launcher's 2^8.)
      inv *= FP8_CVT & 2 ? p.v_scale * 0x1p-8f : p.v_scale;
#endif
      float4 x[CHUNKS];
#pragma unroll
      for (int k = 0; k < CHUNKS; ++k) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int wi = 0; wi < WARPS; ++wi) {
          const float4 v = *reinterpret_cast<const float4*>(so + (wi * 16 + r) * SO_PITCH + c0 + 4 * TPR * k);
          acc.x += wt[wi] * v.x; acc.y += wt[wi] * v.y; acc.z += wt[wi] * v.z; acc.w += wt[wi] * v.w;
        }
        x[k] = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
      }
      TRACE_MARK(13);
      const int t = gr / p.group, head = kvh * p.group + gr % p.group;
      const float lse = l > 0.f ? (mx + __log2f(l)) * LN2 : NEG_INF;
      if (CLUSTER_MERGE && p.cluster) {
        // The block's state for its cluster: rows of D floats, then the rows' LSEs.
        float* cs = sl + WARPS * 16;
#pragma unroll
        for (int k = 0; k < CHUNKS; ++k) *reinterpret_cast<float4*>(cs + r * D + c0 + 4 * TPR * k) = x[k];
        if (threadIdx.x % TPR == 0) cs[16 * D + r] = lse;
      } else if (partial) {
        float* dst = p.partial_o + ((long long)(w.partial_row + t) * p.num_qo_heads + head) * D + c0;
#pragma unroll
        for (int k = 0; k < CHUNKS; ++k) *reinterpret_cast<float4*>(dst + 4 * TPR * k) = x[k];
        if (threadIdx.x % TPR == 0) p.partial_lse[(long long)(w.partial_row + t) * p.num_qo_heads + head] = lse;
      } else {
        elem_t* dst = p.o + (long long)(qo_start + t) * p.o_stride + (long long)head * D + c0;
#pragma unroll
        for (int k = 0; k < CHUNKS; ++k) {
          *reinterpret_cast<uint2*>(dst + 4 * TPR * k) =
              make_uint2(pack2<elem_t>(x[k].x, x[k].y), pack2<elem_t>(x[k].z, x[k].w));
        }
        if (p.lse && threadIdx.x % TPR == 0) p.lse[(long long)(qo_start + t) * p.num_qo_heads + head] = lse;
      }
    }
    TRACE_MARK(5);
#if CLUSTER_MERGE
    if (p.cluster) {
      cluster_merge(p, sl + WARPS * 16, row0, rows, kvh, qo_start);
      return;
    }
#endif
#if TRACE
    if (!partial) TRACE_AT(9, global_ns());
#endif
    if (!partial) return;
  } else {
    // (The producer warp has no rows: its would-be rows lie past the Q tile it stages in.)
#pragma unroll
    for (int mt = 0; mt < (producer ? 0 : MT); ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float l = warp_sum4(l_run[mt][half]);
        float inv = l > 0.f ? 1.f / l : 0.f;
#if KV_FP8
        inv *= p.v_scale;
#endif
        int r = wrow + mt * 16 + lane / 4 + half * 8;
        int gr = row0 + r;
        bool valid = warp_active && gr < rows;
        int t = valid ? gr / p.group : 0;
        int head = kvh * p.group + (valid ? gr % p.group : 0);
        float lse = l > 0.f ? (m_run[mt][half] + __log2f(l)) * LN2 : NEG_INF;
#pragma unroll
        for (int n = 0; n < ON; ++n) {
          float x0 = o_acc[mt][n][half * 2] * inv, x1 = o_acc[mt][n][half * 2 + 1] * inv;
          int col = n * 8 + (lane % 4) * 2;
          if (partial) {
            if (valid) {
              float* dst = p.partial_o + ((long long)(w.partial_row + t) * p.num_qo_heads + head) * D + col;
              asm volatile("st.global.v2.f32 [%0], {%1,%2};\n" ::"l"(dst), "f"(x0), "f"(x1));
            }
          } else {
            // Stage through the (now idle) Q tile so global stores are 16 bytes wide.
            u32 addr = sq + swz<BM>(r, n) + (lane % 4) * 4;
            u32 packed = pack2<elem_t>(x0, x1);
            asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(packed));
          }
        }
        if (valid && lane % 4 == 0) {
          if (partial) {
            p.partial_lse[(long long)(w.partial_row + t) * p.num_qo_heads + head] = lse;
          } else if (p.lse) {
            p.lse[(long long)(qo_start + t) * p.num_qo_heads + head] = lse;
          }
        }
      }
    if (!partial) {
      block_sync();
#pragma unroll
      for (int it = 0; it < (producer ? 0 : Q_ITERS); ++it) {
        int gr = row0 + r0 + it * RSTEP;
        if (gr >= rows) break;  // rows only grow with `it`
        int t = gr / p.group, head = kvh * p.group + gr % p.group;
        u32 v0, v1, v2, v3;
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(v0), "=r"(v1), "=r"(v2), "=r"(v3)
                     : "r"(sq + s_off + it * RSTEP * ROW_PITCH));
        elem_t* dst = p.o + (long long)(qo_start + t) * p.o_stride + (long long)head * D + chunk * 8;
        asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"l"(dst), "r"(v0), "r"(v1), "r"(v2), "r"(v3));
      }
      return;
    }
  }
  // The last split of this (query tile, kv head) to finish merges them all. The block's
  // barrier orders every thread's partial writes before thread 0's count, an acquire-
  // release atomic at GPU scope: its release is cumulative (it publishes what the barrier
  // made thread 0 see, as CUTLASS's split-K semaphore does with fence.acq_rel and a
  // relaxed add), and its acquire orders the last block's reads of the others' partials
  // after their counts, through the barrier below. (A __threadfence is fence.sc, a
  // stronger and slower fence, and the last block paid two on the launch's critical path.)
  __shared__ int is_last;
  MergeItem* m = p.merge + w.merge + kvh;
  block_sync();
  if (threadIdx.x == 0) {
    int before;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n" : "=r"(before) : "l"(&m->arrived) : "memory");
    is_last = before + 1 == m->num_splits;
    // All have arrived: ready for the next launch (which starts after this grid ends).
    if (is_last) asm volatile("st.relaxed.gpu.global.s32 [%0], 0;\n" ::"l"(&m->arrived) : "memory");
  }
  block_sync();
  TRACE_MARK(6);
#if TRACE
  // (Slot 7, merge done, is the last split's: zeroed here, after the wait, where the
  // previous launch's last split can no longer write it.)
  if (!is_last) TRACE_AT(7, 0ull);
  if (!is_last) TRACE_AT(9, global_ns());
#endif
  if (!is_last) return;
  if (!producer) merge_rows(p, *m, row0, min(rows, row0 + BM), kvh, qo_start, warp, lane);
#if TRACE
  block_sync();
  TRACE_MARK(7);
  TRACE_AT(9, global_ns());
#endif
}

#endif  // PERSISTENT

static_assert(sizeof(AttentionParams) == 192, "AttentionParams mirrors launch.rs");
static_assert(sizeof(KernelParams) == (TMA ? 512 : 192), "KernelParams mirrors launch.rs");
static_assert(sizeof(WorkItem) == 24 && sizeof(MergeItem) == 16, "plan.rs mirrors");

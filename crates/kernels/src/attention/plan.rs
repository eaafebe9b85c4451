//! Host-side planning of an attention launch: which block does what.
//!
//! Work is cut into items of one sequence's BM-row tile against a range of its keys;
//! every item runs once per kv head (grid.y). When the batch alone would leave the GPU
//! idle (small batches, long contexts: decode), each sequence's keys are split into
//! chunks so that about `target_blocks` blocks run; split items write fp32 partials and
//! the last split of each (query tile, kv head) to finish combines them by log-sum-exp,
//! counting arrivals in its merge entry. Planning reads only host metadata: no device
//! synchronisation.

/// One block's work; mirrors `WorkItem` in attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkItem {
    pub batch: i32,
    pub q_tile: i32,
    pub kv_begin: i32,
    pub kv_end: i32,
    /// < 0: write O directly; else the first partial row of this split.
    pub partial_row: i32,
    /// Split items: the merge entry of this query tile for kv head 0 (kv head h uses the
    /// entry `merge + h`); -1 otherwise.
    pub merge: i32,
}

/// The splits of one (query tile, kv head), which the last of them to finish combines;
/// mirrors `MergeItem` in attention.cu. Split s of token t (of the sequence) wrote partial
/// row `first_row + s * split_stride + t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeItem {
    pub num_splits: i32,
    pub first_row: i32,
    /// The sequence's query length.
    pub split_stride: i32,
    /// Splits finished so far in a launch: 0 on the host and between launches (the kernel
    /// counts up, and the last split resets it).
    pub arrived: i32,
}

/// Tile shape of one kernel specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileConfig {
    pub num_warps: u32,
    /// 16-row MMA tiles per warp.
    pub m_tiles: u32,
    /// Keys per K/V tile.
    pub block_n: u32,
    /// K/V tiles in flight: the cp.async pipeline's depth (2: double buffering).
    pub stages: u32,
    /// Every warp takes the block's same 16 rows against its share of each K/V tile (one
    /// 16-row MMA tile per block, `m_tiles` 1); else each warp has its own rows.
    pub key_split: bool,
    /// Hopper's warpgroup MMAs (sm_90a only): two warpgroups of 64 rows, Q Kᵀ and P V
    /// as `wgmma` from 128-byte-swizzled shared tiles (`m_tiles` 1; `num_warps` 8, or 9 / 12
    /// with one / four producer warps that issue every K/V copy).
    pub wgmma: bool,
    /// wgmma tiles whose producer warpgroup brings K/V in with TMA copies (`num_warps` 12,
    /// two stages of K and two of V, the softmax overlapped with the previous tile's P V).
    pub tma: bool,
    /// TMA tiles run persistently: one block an SM takes (work item, kv head) tasks in
    /// turn, loading across task boundaries (attention/tma.cuh), with an output staging tile.
    pub persistent: bool,
}

impl TileConfig {
    /// Rows (token × group head) per block (wgmma: two warpgroups of 64, whatever the
    /// producer warp; three with the 16 warps of `PREFILL_SM90_TMA_D64`).
    pub fn block_m(&self) -> usize {
        if self.wgmma {
            return if self.num_warps == 16 { 192 } else { 128 };
        }
        let warps = if self.key_split { 1 } else { self.num_warps };
        (16 * self.m_tiles * warps) as usize
    }

    pub fn threads(&self) -> u32 {
        self.num_warps * 32
    }

    /// Dynamic shared memory: the Q tile plus `stages` K and V tiles (wgmma: and 1 KiB
    /// to align them to the 1024-byte swizzle atoms).
    /// The persistent tiles add a staging tile for the output (the next task's Q loads
    /// meanwhile).
    pub fn smem_bytes(&self, head_dim: usize, elem_bytes: usize) -> usize {
        let staging = if self.persistent { self.block_m() } else { 0 };
        (staging + self.block_m() + 2 * (self.stages * self.block_n) as usize)
            * head_dim
            * elem_bytes
            + if self.wgmma { 1024 } else { 0 }
    }

    /// Blocks of these tiles that fit on one SM by shared memory, at most two (the kernels'
    /// launch bounds); `max_shared_per_block` is the SM's shared memory less the 1 KiB the
    /// driver reserves per block.
    /// The TMA tiles' 384 threads take the SM's registers: one block.
    pub fn blocks_per_sm(&self, head_dim: usize, max_shared_per_block: usize) -> usize {
        let cap = if self.tma { 1 } else { 2 };
        ((max_shared_per_block + 1024) / (self.smem_bytes(head_dim, 2) + 1024)).clamp(1, cap)
    }

    /// Dynamic shared memory over an FP8 pool: the 16-bit Q tile, one widened 16-bit K and
    /// V tile (not in key-split blocks: their warps widen in registers), and `stages` K and
    /// V tiles of e4m3 bytes.
    pub fn smem_bytes_fp8_kv(&self, head_dim: usize) -> usize {
        let bn = self.block_n as usize;
        let widened = if self.key_split { 0 } else { 2 * bn };
        (self.block_m() + widened) * head_dim * 2 + 2 * self.stages as usize * bn * head_dim
    }

    /// These tiles over an FP8 pool: as many stages as keep two blocks on an SM with
    /// `max_shared_per_block` (Hopper at head_dim 128: 4, where the 16-bit pool has 3), at
    /// most 8; `RADIX_SPARSE_FP8_KV_STAGES` (2-8, key split 3-8: its epilogue's warp states
    /// take three stages) overrides it where it fits. An e4m3 tile is half the bytes of a
    /// 16-bit one, so at the same depth a block kept half the bytes in flight (decode read
    /// an FP8 pool at 51-56% of the copy bandwidth on the H200 where the 16-bit pool
    /// reached 100%). Key-split tiles keep their own depth: once their warps widened in
    /// registers, 3 stages measured faster than 4 and 6 (64@4096: 85.0% of copy against
    /// 84.2% and 83.2%; 1@8192: 11.0 us against 11.2 and 12.0).
    pub fn fp8_pipeline(self, head_dim: usize, max_shared_per_block: usize) -> TileConfig {
        let stage = 2 * self.block_n as usize * head_dim;
        let fixed = self.smem_bytes_fp8_kv(head_dim) - self.stages as usize * stage;
        // Two blocks per SM: each gets half the SM's shared memory, less 1 KiB the driver
        // reserves per block.
        let per_block = ((max_shared_per_block + 1024) / 2).saturating_sub(1024);
        let fit = |stages: usize| fixed + stages * stage <= max_shared_per_block;
        let least = if self.key_split { 3 } else { 2 };
        let auto = if self.key_split {
            // (At least 3: the epilogue's warp states; a plan for 99 KiB a block has 2.)
            (self.stages as usize).max(least)
        } else {
            (per_block.saturating_sub(fixed) / stage).clamp(2, 8).max(self.stages as usize)
        };
        static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
        let wanted = OVERRIDE.get_or_init(|| {
            std::env::var("RADIX_SPARSE_FP8_KV_STAGES").ok().and_then(|v| v.parse().ok())
        });
        let stages = wanted.filter(|&s| (least..=8).contains(&s) && fit(s)).unwrap_or(auto);
        TileConfig { stages: stages as u32, ..self }
    }

    /// Prefill tiles: 4 warps of 32 rows (two 16-row MMA tiles share each K/V fragment,
    /// halving shared-memory reads per MMA), 64 keys per tile. Fastest of the shapes swept
    /// on the H100 at head_dim 64 and 128 (bench/NOTES.md).
    pub const PREFILL: TileConfig = TileConfig {
        num_warps: 4,
        m_tiles: 2,
        block_n: 64,
        stages: 2,
        key_split: false,
        wgmma: false,
        tma: false,
        persistent: false,
    };
    /// Prefill tiles on Hopper: the same 128 rows a block as `PREFILL` (so the same plan),
    /// as two warpgroups of `wgmma`, against 128 keys a tile, double-buffered (161 KiB with
    /// the alignment pad at head_dim 128, one block an SM; 81 KiB at 64, two). Three stages select the loop that
    /// overlaps a tile's softmax with the previous tile's P V; with the block's own threads
    /// issuing the copies it measured slower on the H200 (371 vs 428 TFLOP/s, bench/NOTES.md).
    pub const PREFILL_SM90: TileConfig = TileConfig {
        num_warps: 8,
        m_tiles: 1,
        block_n: 128,
        stages: 2,
        key_split: false,
        wgmma: true,
        tma: false,
        persistent: false,
    };
    /// `PREFILL_SM90` with a TMA producer warpgroup (attention.cu's TMA): 12 warps, the
    /// same 161 KiB of tiles at head_dim 128, K and V in two stages each.
    pub const PREFILL_SM90_TMA: TileConfig =
        TileConfig { num_warps: 12, tma: true, ..Self::PREFILL_SM90 };
    /// `PREFILL_SM90_TMA` run persistently (attention/tma.cuh), with an output staging tile
    /// (193 KiB at head_dim 128).
    pub const PREFILL_SM90_TMA_PERSISTENT: TileConfig =
        TileConfig { persistent: true, ..Self::PREFILL_SM90_TMA };
    /// `PREFILL_SM90_TMA` with three compute warpgroups (16 warps, 192 rows a block), for
    /// head_dim 64 only (89 KiB of tiles; 160 registers a consumer thread).
    pub const PREFILL_SM90_TMA_D64: TileConfig =
        TileConfig { num_warps: 16, ..Self::PREFILL_SM90_TMA };
    /// Decode tiles: a block of 64 rows holds a whole GQA group of a few tokens with less
    /// shared memory; the kernel is bound by memory bandwidth there, not by MMAs, so a
    /// third stage keeps two K/V tiles in flight while one is computed on (a block at
    /// batch 1 reads only a few tiles, each a memory round trip with two stages). At
    /// head_dim 128 that is 112 KiB, still two blocks per SM on Hopper.
    pub const DECODE: TileConfig = TileConfig {
        num_warps: 4,
        m_tiles: 1,
        block_n: 64,
        stages: 3,
        key_split: false,
        wgmma: false,
        tma: false,
        persistent: false,
    };
    /// Decode tiles for at most 16 rows (one token of a GQA group up to 16): the four warps
    /// split each K/V tile's keys instead of rows, so all of them compute. With `DECODE`,
    /// a block of 4 rows ran on one warp, whose instruction stream was the block's time at
    /// batch 1 (ncu on the H200: 17 us for 4 tiles a block at 1@1024).
    pub const DECODE_SMALL: TileConfig = TileConfig {
        num_warps: 4,
        m_tiles: 1,
        block_n: 64,
        stages: 3,
        key_split: true,
        wgmma: false,
        tma: false,
        persistent: false,
    };

    /// Tiles for a batch whose longest sequence has `max_rows` rows (q_len × group).
    pub fn choose(max_rows: usize) -> TileConfig {
        if max_rows <= Self::DECODE_SMALL.block_m() {
            Self::DECODE_SMALL
        } else if max_rows <= Self::DECODE.block_m() {
            Self::DECODE
        } else {
            Self::PREFILL
        }
    }

    /// `WARPS,M_TILES,BLOCK_N[,STAGES]` (two stages unless given), or `wgmma[,BLOCK_N[,STAGES]]`
    /// for the Hopper kernel (`PREFILL_SM90` unless given; `wgmma-ws`, `wgmma-ws4`: with one
    /// or four producer warps; `wgmma-tma`, `wgmma-tma-persistent`, `wgmma-tma3`: the TMA
    /// producer, also persistent or with three compute warpgroups), or `ks[,BLOCK_N[,STAGES]]`
    /// for the key-split decode tiles (`DECODE_SMALL` unless given).
    pub fn parse(s: &str) -> Result<TileConfig, String> {
        if let Some(rest) = s.strip_prefix("ks").filter(|r| r.is_empty() || r.starts_with(',')) {
            let base = Self::DECODE_SMALL;
            let (block_n, stages) = block_n_and_stages(s, rest, base, "ks")?;
            return if [64, 128].contains(&block_n) && (2..=4).contains(&stages) {
                Ok(TileConfig { block_n, stages, ..base })
            } else {
                Err(format!("bad tile config {s:?}: ks BLOCK_N 64 or 128; STAGES 2..=4"))
            };
        }
        // Only the variants the GPU tests run (gpu_attention.rs): 128 keys a tile; two or
        // three stages (four producer warps: two).
        if s == "wgmma-tma-persistent" {
            return Ok(Self::PREFILL_SM90_TMA_PERSISTENT);
        }
        if s == "wgmma-tma3" {
            return Ok(Self::PREFILL_SM90_TMA_D64);
        }
        if let Some(rest) = s.strip_prefix("wgmma-tma") {
            return match rest {
                "" | ",128" | ",128,2" => Ok(Self::PREFILL_SM90_TMA),
                _ => Err(format!(
                    "bad tile config {s:?}: wgmma-tma runs 128 keys a tile, two stages"
                )),
            };
        }
        for (prefix, num_warps) in [("wgmma-ws4", 12), ("wgmma-ws", 9)] {
            if let Some(rest) = s.strip_prefix(prefix) {
                return Self::parse(&format!("wgmma{rest}"))
                    .map(|t| TileConfig { num_warps, ..t })
                    .map_err(|e| e.replace("wgmma", prefix))
                    .and_then(|t| {
                        if num_warps == 12 && t.stages != 2 {
                            Err(format!("bad tile config {s:?}: wgmma-ws4 runs two stages"))
                        } else {
                            Ok(t)
                        }
                    });
            }
        }
        if let Some(rest) = s.strip_prefix("wgmma") {
            let base = Self::PREFILL_SM90;
            let (block_n, stages) = block_n_and_stages(s, rest, base, "wgmma")?;
            return if block_n == 128 && (2..=3).contains(&stages) {
                Ok(TileConfig { block_n, stages, ..base })
            } else {
                Err(format!("bad tile config {s:?}: wgmma BLOCK_N 128; STAGES 2 or 3"))
            };
        }
        let v: Vec<u32> =
            s.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>().map_err(|_| {
                format!("bad tile config {s:?}: expected WARPS,M_TILES,BLOCK_N[,STAGES]")
            })?;
        let (num_warps, m_tiles, block_n, stages) = match v[..] {
            [w, m, n] => (w, m, n, 2),
            [w, m, n, st] => (w, m, n, st),
            _ => (0, 0, 0, 0),
        };
        if [2, 4, 8].contains(&num_warps)
            && [1, 2].contains(&m_tiles)
            && [32, 64, 128].contains(&block_n)
            && (2..=4).contains(&stages)
        {
            Ok(TileConfig {
                num_warps,
                m_tiles,
                block_n,
                stages,
                key_split: false,
                wgmma: false,
                tma: false,
                persistent: false,
            })
        } else {
            Err(format!(
                "bad tile config {s:?}: WARPS in 2,4,8; M_TILES in 1,2; BLOCK_N in 32,64,128; \
                 STAGES in 2..=4"
            ))
        }
    }
}

/// The work list of one batch: the blocks' split-KV items and the merges of their partials.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkList {
    pub work: Vec<WorkItem>,
    pub merge: Vec<MergeItem>,
    /// Rows of fp32 partial output the split items need (× heads × head_dim).
    pub partial_rows: usize,
    /// Block i runs item i / heads for kv head i % heads, so the heaviest items of every
    /// head start first (decode: no reuse of K/V between items to keep together). Else
    /// block (x, y) runs item x for kv head y, so the query tiles of one head, which read
    /// the same keys, run side by side (prefill). Fixed by the batch's shape alone, so a
    /// graph's captured launch and every plan it replays agree.
    pub heads_inner: bool,
    /// Greater than 1: the launch runs clusters of this many blocks along x, each the
    /// chunks of one query tile's keys (`plan_clustered`).
    pub cluster: usize,
}

/// Splits of a row above which a key-split launch merges with the image that loads 32
/// splits' rows at once (attention.cu's WIDE_MERGE).
pub const WIDE_MERGE_SPLITS: usize = 16;

impl WorkList {
    /// Whether some row's splits are more than `WIDE_MERGE_SPLITS`.
    pub fn wide_merge(&self) -> bool {
        self.merge.iter().any(|m| m.num_splits as usize > WIDE_MERGE_SPLITS)
    }

    /// The work list as the kernel reads it, 6 words per item.
    pub fn work_words(&self) -> impl Iterator<Item = i32> + '_ {
        self.work
            .iter()
            .flat_map(|w| [w.batch, w.q_tile, w.kv_begin, w.kv_end, w.partial_row, w.merge])
    }

    /// The merge list as the kernel reads it, 4 words per item.
    pub fn merge_words(&self) -> impl Iterator<Item = i32> + '_ {
        self.merge.iter().flat_map(|m| [m.num_splits, m.first_row, m.split_stride, m.arrived])
    }

    /// Pads the work list to exactly `work` items with items the kernel skips, so that a
    /// launch captured in a CUDA graph (whose grid is fixed) covers any plan that fits.
    /// Fails if the plan is already longer. (The merge list sets no grid: it needs none.)
    /// A clustered plan pads to the next multiple of its cluster, in whole clusters of items
    /// the kernel skips.
    pub fn pad_to(&mut self, work: usize) -> Result<(), String> {
        let work = if self.cluster > 1 { work.next_multiple_of(self.cluster) } else { work };
        if self.work.len() > work {
            return Err(format!("plan of {} work items does not fit {work}", self.work.len()));
        }
        self.work.resize(work, WorkItem { batch: -1, merge: -1, ..WorkItem::default() });
        Ok(())
    }
}

/// The most work items `plan` makes for `batch` sequences of one query token each: one
/// tile per sequence when unsplit; under one wave at most `slots / heads` items; over one,
/// chunks of at least half the average load, fewer than `2 wanted` of them, plus one
/// partial chunk per sequence (`choose_chunk`).
pub fn decode_work_bound(
    batch: usize,
    group: usize,
    num_kv_heads: usize,
    tiles: TileConfig,
    target_blocks: usize,
) -> usize {
    let q_tiles = group.div_ceil(tiles.block_m()).max(1);
    let wanted = target_blocks.div_ceil(num_kv_heads.max(1)).max(1);
    batch * q_tiles + 2 * wanted * q_tiles
}

/// What any step's plan needs at most (`plan_batch`'s tiles, `target_blocks`), for a
/// workspace sized once: steps of at most `max_tokens` query tokens over at most
/// `max_seqs` sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepWorkBound {
    pub work_items: usize,
    pub merge_items: usize,
    pub partial_rows: usize,
}

/// Bounds every plan of a step by `choose_chunk`'s two cases (`per_head` = slots / kv heads,
/// `bm` a block's rows, a sequence of `q` tokens has `ceil(q · group / bm)` query tiles and
/// so at most `q_tiles · bm / group` tokens):
/// - split chunks: under one wave, all items together are at most `per_head`; over one,
///   only items longer than the average load `a` split, into `ceil(k / c) <= 2k / c`
///   chunks with `c >= a / 2` and `Σ k <= a · per_head`: at most `4 per_head` chunks;
/// - so partial rows (chunks × their tokens) are at most `4 per_head · bm / group`, split
///   query tiles (at least two chunks each) at most `2 per_head`, with one merge entry per
///   kv head each, and work items the query tiles of the step plus those chunks.
pub fn step_work_bound(
    max_tokens: usize,
    max_seqs: usize,
    group: usize,
    num_kv_heads: usize,
    target_blocks: usize,
) -> StepWorkBound {
    let group = group.max(1);
    let per_head = target_blocks.div_ceil(num_kv_heads.max(1)).max(1);
    let all =
        [TileConfig::PREFILL, TileConfig::DECODE, TileConfig::DECODE_SMALL].map(|t| t.block_m());
    let (bm_min, bm_max) = (*all.iter().min().unwrap(), *all.iter().max().unwrap());
    let partial_rows = 4 * per_head * bm_max.div_ceil(group);
    let q_tiles = max_tokens * group.div_ceil(bm_min);
    StepWorkBound {
        // (+ DECODE_CLUSTER: a clustered plan pads the decode bound to whole clusters.)
        work_items: (q_tiles + 4 * per_head).max(decode_work_bound(
            max_seqs,
            group,
            num_kv_heads,
            TileConfig::DECODE,
            target_blocks,
        )) + DECODE_CLUSTER,
        merge_items: 2 * per_head * num_kv_heads.max(1),
        partial_rows,
    }
}

/// The `[,BLOCK_N[,STAGES]]` after a tile spec's name (`form`) in `TileConfig::parse`,
/// `base`'s where not given; (0, 0) when there are more, for the caller's range check to
/// refuse.
fn block_n_and_stages(
    s: &str,
    rest: &str,
    base: TileConfig,
    form: &str,
) -> Result<(u32, u32), String> {
    let v: Vec<u32> = rest
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad tile config {s:?}: expected {form}[,BLOCK_N[,STAGES]]"))?;
    Ok(match v[..] {
        [] => (base.block_n, base.stages),
        [n] => (n, base.stages),
        [n, st] => (n, st),
        _ => (0, 0),
    })
}

/// Decode chunks over page tables from the kernel before that are shorter than this many
/// K/V tiles run one block an SM (`choose_chunk`).
const SHORT_CHUNK_TILES: usize = 16;

/// The split of a batch's keys, in K/V tiles per chunk, or `None` to leave every item
/// whole. `items[b]` = (query tiles, key tiles) of sequence b; each item runs once per kv
/// head, and `slots` blocks run at once.
///
/// Under one wave (fewer items than slots): the smallest chunk whose items still all fit in
/// one wave, so every block reads about the same number of keys and none waits for a second
/// wave (rounding the other way, 280 blocks on 264 slots, took twice the time on the H200).
///
/// Over a wave: blocks queue for slots, heaviest first (the plan's order), so the batch
/// takes about the average load per slot, unless one item alone is heavier than that (one
/// long context among short ones): such items are cut into chunks of half the average.
fn choose_chunk(
    items: &[(usize, usize)],
    heads: usize,
    slots: usize,
    min_tiles: usize,
    late_tables: bool,
) -> Option<usize> {
    let max_kv = items.iter().map(|&(_, k)| k).max()?;
    if heads == 0 || max_kv <= min_tiles {
        return None;
    }
    let unsplit: usize = items.iter().map(|&(q, _)| q).sum();
    if unsplit * heads < slots {
        let count = |c: usize| items.iter().map(|&(q, k)| q * k.div_ceil(c).max(1)).sum::<usize>();
        // The smallest chunk whose items fit in `slots` blocks: count() only falls as chunks
        // grow, and the whole items (max_kv) fit.
        let fit = |slots: usize| {
            let wave = (slots / heads).max(1);
            let (mut lo, mut hi) = (min_tiles, max_kv);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if count(mid) <= wave { hi = mid } else { lo = mid + 1 }
            }
            lo
        };
        let mut chunk = fit(slots);
        // Page tables written by the kernel before (sparse paging's per-head tables): no
        // tile loads before pdl_wait(), so each split's first tiles are a round trip after
        // it, and short decode chunks run at half the slots (one block an SM) and twice as
        // long. H200, CUDA graphs (bench/NOTES.md): 1@32768 budget 0.3 29.1 vs 31.8 us,
        // 1@131072 budget 0.1 43.3 vs 47.9 us. With the host's tables two blocks an SM won
        // once the merge and the key-split epilogue were cut: 1@8192 12.9 vs 13.5 us,
        // 1@16384 20.4 vs 22.3 us.
        if late_tables
            && chunk < SHORT_CHUNK_TILES
            && slots >= 2
            && items.iter().all(|&(q, _)| q <= 1)
        {
            chunk = fit(slots / 2);
        }
        (chunk < max_kv).then_some(chunk)
    } else {
        let work: usize = items.iter().map(|&(q, k)| q * k).sum();
        let average = (work * heads).div_ceil(slots);
        (max_kv > average).then(|| average.div_ceil(2).max(min_tiles))
    }
}

/// Plans a batch: `q_lens[b]` query tokens against `kv_lens[b]` keys.
///
/// `target_blocks` is how many blocks run at once (2 per SM: one wave); keys are split
/// into chunks of at least `min_chunk` keys as `choose_chunk` decides; `late_tables`: the
/// page tables come from the kernel before (sparse paging's per-head tables).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    q_lens: &[usize],
    kv_lens: &[usize],
    group: usize,
    num_kv_heads: usize,
    tiles: TileConfig,
    target_blocks: usize,
    min_chunk: usize,
    late_tables: bool,
) -> WorkList {
    debug_assert_eq!(q_lens.len(), kv_lens.len());
    let bm = tiles.block_m();
    let bn = tiles.block_n as usize;
    let q_tiles = |b: usize| (q_lens[b] * group).div_ceil(bm);
    let items: Vec<(usize, usize)> =
        (0..q_lens.len()).map(|b| (q_tiles(b), kv_lens[b].div_ceil(bn))).collect();
    let min_tiles = min_chunk.div_ceil(bn).max(1);
    // Keys per split, in whole K/V tiles; usize::MAX means "do not split".
    let chunk = match choose_chunk(&items, num_kv_heads, target_blocks, min_tiles, late_tables) {
        Some(tiles) => tiles * bn,
        None => usize::MAX,
    };

    let mut out =
        WorkList { heads_inner: (0..q_lens.len()).all(|b| q_tiles(b) <= 1), ..WorkList::default() };
    for b in 0..q_lens.len() {
        let (q_len, kv_len) = (q_lens[b], kv_lens[b]);
        let splits = if chunk == usize::MAX { 1 } else { kv_len.div_ceil(chunk).max(1) };
        let partial_base = out.partial_rows;
        if splits > 1 {
            out.partial_rows += splits * q_len;
        }
        for tile in 0..q_tiles(b) {
            let merge = if splits > 1 { out.merge.len() as i32 } else { -1 };
            if splits > 1 {
                let entry = MergeItem {
                    num_splits: splits as i32,
                    first_row: partial_base as i32,
                    split_stride: q_len as i32,
                    arrived: 0,
                };
                out.merge.extend(std::iter::repeat_n(entry, num_kv_heads));
            }
            for s in 0..splits {
                let (begin, end) = if splits > 1 {
                    (s * chunk, ((s + 1) * chunk).min(kv_len))
                } else {
                    (0, kv_len)
                };
                out.work.push(WorkItem {
                    batch: b as i32,
                    q_tile: tile as i32,
                    kv_begin: begin as i32,
                    kv_end: end as i32,
                    partial_row: if splits > 1 { (partial_base + s * q_len) as i32 } else { -1 },
                    merge,
                });
            }
        }
    }
    // Heaviest items first, so a long tail of small ones fills in behind them. Under a
    // causal mask later tiles see more keys, so q_tile breaks ties the same way.
    out.work.sort_by_key(|w| std::cmp::Reverse(((w.kv_end - w.kv_begin) as i64, w.q_tile)));
    out
}

/// Blocks a cluster of a clustered decode plan (`plan_clustered`) holds: attention.cu's
/// CLUSTER, the portable cluster size.
pub const DECODE_CLUSTER: usize = 8;

/// Whether a batch runs its decode splits in clusters of `cluster` blocks (0: none) that
/// combine them through distributed shared memory (attention.cu's cluster_merge): key-split
/// tiles (one query tile a sequence), at most half a wave of `target_blocks` over the kv
/// heads in clusters, and every sequence short enough (`max_kv_len` at most `cluster`
/// chunks of `min_chunk` keys) that one cluster of splits reads it as fast as more splits
/// merged through global memory would. On the H200 (1@N, CUDA graphs, bench/NOTES.md) one
/// cluster took 4.4 us at 1,024 keys and 5.5 at 2,048 against 6.3 and 6.6 without, but 9.2
/// at 4,096 against 8.0; and longer sequences need more splits than a cluster holds, whose
/// clusters' results then meet in global memory again (measured no faster than the last
/// split's merge, and 32 clusters of 8 did not all fit on the GPU at once).
///
/// A CUDA graph replays one launch shape: the backend keys its graphs by this answer too.
pub fn clusters_apply(
    batch: usize,
    max_kv_len: usize,
    num_kv_heads: usize,
    tiles: TileConfig,
    target_blocks: usize,
    min_chunk: usize,
    cluster: usize,
) -> bool {
    cluster > 1
        && tiles.key_split
        && batch > 0
        && 2 * batch * cluster * num_kv_heads.max(1) <= target_blocks
        && max_kv_len <= cluster * min_chunk
}

/// `plan` for a batch `clusters_apply` takes: each query tile's keys in `cluster` chunks of
/// whole tiles (trailing ones empty when the sequence has fewer tiles), consecutive along x
/// from a multiple of `cluster`, so the chunks of a (query tile, kv head) run as one cluster
/// and combine there: no partial rows, no merge entries. The grid is (items, kv heads).
/// (Decode has one query tile a sequence; forced key-split tiles on more rows get one
/// cluster a tile.)
pub fn plan_clustered(
    q_lens: &[usize],
    kv_lens: &[usize],
    group: usize,
    tiles: TileConfig,
    cluster: usize,
) -> WorkList {
    let (bm, bn) = (tiles.block_m(), tiles.block_n as usize);
    let mut out = WorkList { cluster, ..WorkList::default() };
    for (b, (&q_len, &kv_len)) in q_lens.iter().zip(kv_lens).enumerate() {
        let per = kv_len.div_ceil(bn).div_ceil(cluster).max(1) * bn;
        for tile in 0..(q_len * group).div_ceil(bm) {
            for s in 0..cluster {
                out.work.push(WorkItem {
                    batch: b as i32,
                    q_tile: tile as i32,
                    kv_begin: (s * per).min(kv_len) as i32,
                    kv_end: ((s + 1) * per).min(kv_len) as i32,
                    partial_row: -1,
                    merge: -1,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod fp8_pipeline_tests {
    use super::TileConfig;

    #[test]
    fn fp8_pools_get_the_stages_two_blocks_per_sm_allow() {
        // Hopper: 227 KiB a block at most.
        let hopper = 227 * 1024;
        assert_eq!(TileConfig::DECODE_SMALL.fp8_pipeline(128, hopper).stages, 3);
        assert_eq!(TileConfig::DECODE.fp8_pipeline(128, hopper).stages, 4);
        assert_eq!(TileConfig::DECODE.fp8_pipeline(64, hopper).stages, 8);
        assert_eq!(TileConfig::DECODE_SMALL.fp8_pipeline(64, hopper).stages, 3);
        for tiles in [TileConfig::DECODE_SMALL, TileConfig::DECODE, TileConfig::PREFILL] {
            for d in [64, 128] {
                let t = tiles.fp8_pipeline(d, hopper);
                assert!(2 * (t.smem_bytes_fp8_kv(d) + 1024) <= hopper + 1024, "{t:?} at {d}");
                assert!(t.stages >= tiles.stages, "never shallower than the 16-bit pool");
            }
        }
        // A GPU with 99 KiB a block: one block per SM, the configuration's own depth.
        assert_eq!(TileConfig::DECODE_SMALL.fp8_pipeline(128, 99 * 1024).stages, 3);
        // There `plan_batch` gives key-split tiles 2 stages (16-bit K/V do not fit 3); over
        // an FP8 pool they take 3 again (the epilogue's warp states need them).
        let two = TileConfig { stages: 2, ..TileConfig::DECODE_SMALL };
        for d in [64, 128] {
            let t = two.fp8_pipeline(d, 99 * 1024);
            assert_eq!(t.stages, 3, "at {d}");
            assert!(t.smem_bytes_fp8_kv(d) <= 99 * 1024);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TILES: TileConfig = TileConfig::DECODE;

    #[test]
    fn big_batches_are_not_split() {
        let p = plan(&[1000, 1], &[1000, 5], 1, 8, TILES, 16, 256, false);
        assert!(p.merge.is_empty() && p.partial_rows == 0);
        assert_eq!(p.work.len(), 1000usize.div_ceil(64) + 1);
        assert!(p.work.iter().all(|w| w.partial_row < 0 && w.kv_begin == 0));
        assert!(!p.heads_inner, "prefill keeps one head's query tiles together");
    }

    #[test]
    fn decode_of_one_long_sequence_is_split_into_chunks_covering_every_key() {
        // One token, group 4, 65536 keys, 8 kv heads, 264 blocks wanted.
        let p = plan(&[1], &[65536], 4, 8, TILES, 264, 256, false);
        let splits = p.work.len();
        // As many equal chunks as fit one wave of 264 blocks over 8 kv heads: 32 of 2,048.
        assert_eq!(splits, 32);
        assert!(p.work.iter().all(|w| w.kv_end - w.kv_begin == 2048));
        assert!(p.heads_inner);
        let mut ranges: Vec<(i32, i32)> = p.work.iter().map(|w| (w.kv_begin, w.kv_end)).collect();
        ranges.sort();
        assert_eq!(ranges[0].0, 0);
        assert_eq!(ranges.last().unwrap().1, 65536);
        assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "gaps or overlaps");
        // One merge entry per kv head, all counting the 32 splits from partial row 0.
        let entry =
            MergeItem { num_splits: splits as i32, first_row: 0, split_stride: 1, arrived: 0 };
        assert_eq!(p.merge, vec![entry; 8]);
        assert!(p.work.iter().all(|w| w.merge == 0));
        assert_eq!(p.partial_rows, splits);
        // Each split writes its own partial row (q_len 1): rows 0..splits, once each.
        let mut rows: Vec<i32> = p.work.iter().map(|w| w.partial_row).collect();
        rows.sort();
        assert_eq!(rows, (0..splits as i32).collect::<Vec<_>>());
    }

    #[test]
    fn decode_plans_stay_within_the_bound_and_pad() {
        let mut rng = 7u64;
        for batch in [1usize, 2, 3, 8, 31, 32, 33, 64, 200] {
            for _ in 0..20 {
                let kv: Vec<usize> = (0..batch)
                    .map(|_| {
                        rng =
                            rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        1 + (rng >> 33) as usize % 70_000
                    })
                    .collect();
                let q = vec![1; batch];
                let mut p = plan(&q, &kv, 4, 8, TILES, 264, 256, false);
                let bound = decode_work_bound(batch, 4, 8, TILES, 264);
                assert!(p.work.len() <= bound, "{} items > bound {bound}", p.work.len());
                assert!(p.merge.len() <= batch * 8);
                p.pad_to(bound).unwrap();
                assert_eq!(p.work.len(), bound);
                assert!(p.work.iter().skip_while(|w| w.batch >= 0).all(|w| w.batch < 0));
            }
        }
        let mut p = plan(&[1], &[100], 4, 8, TILES, 264, 256, false);
        assert!(p.pad_to(0).is_err());
    }

    /// Blocks (items × kv heads) and the most keys one block reads.
    fn blocks_and_longest(p: &WorkList, heads: usize) -> (usize, i32) {
        (p.work.len() * heads, p.work.iter().map(|w| w.kv_end - w.kv_begin).max().unwrap())
    }

    #[test]
    fn small_batches_split_into_one_full_wave() {
        // 8 sequences of 16K over 8 kv heads, 264 slots: 4 chunks each, 256 blocks.
        let p = plan(&[1; 8], &[16384; 8], 4, 8, TILES, 264, 256, false);
        assert_eq!(blocks_and_longest(&p, 8), (256, 4096));
        // 1@8192: chunks of the minimum, 256 keys, two blocks an SM; over page tables
        // from the kernel before (sparse), short chunks run one block an SM: 16 of 512.
        let p = plan(&[1], &[8192], 4, 8, TILES, 264, 256, false);
        assert_eq!(blocks_and_longest(&p, 8), (256, 256));
        let p = plan(&[1], &[8192], 4, 8, TILES, 264, 256, true);
        assert_eq!(blocks_and_longest(&p, 8), (128, 512));
        // 1@65536 splits into chunks of 16 tiles at two blocks an SM: not short.
        let p = plan(&[1], &[65536], 4, 8, TILES, 264, 256, false);
        assert_eq!(blocks_and_longest(&p, 8), (256, 2048));
        // Never a second wave, for any mix under one.
        let mut rng = 3u64;
        for batch in 1..33 {
            let kv: Vec<usize> = (0..batch)
                .map(|_| {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    1 + (rng >> 33) as usize % 100_000
                })
                .collect();
            let p = plan(&vec![1; batch], &kv, 4, 8, TILES, 264, 256, false);
            assert!(p.work.len() * 8 <= 264, "batch {batch}: {} items", p.work.len());
        }
    }

    #[test]
    fn a_long_context_among_short_ones_is_cut_to_the_average_load() {
        // 64 sequences: 63 of 1,000 keys and one of 16,000 (250 tiles). Whole, the long
        // one alone would take longer than all the rest spread over the slots.
        let mut kv = vec![1000; 63];
        kv.push(16000);
        let p = plan(&[1; 64], &kv, 4, 8, TILES, 264, 256, false);
        let work_tiles: usize = kv.iter().map(|k| k.div_ceil(64)).sum();
        let average_keys = (work_tiles * 8).div_ceil(264) * 64;
        let (_, longest) = blocks_and_longest(&p, 8);
        assert!((longest as usize) <= average_keys, "{longest} > {average_keys}");
        assert_eq!(p.merge.len(), 8, "only the long sequence is split (an entry per kv head)");
        assert!(p.heads_inner);
        // Equal lengths over a wave stay whole (the waves are already even).
        let p = plan(&[1; 128], &[2048; 128], 4, 8, TILES, 264, 256, false);
        assert!(p.merge.is_empty() && p.work.len() == 128);
    }

    #[test]
    fn every_step_fits_the_step_bound() {
        // Mixed steps (prompt chunks beside decode rows) of at most 4,096 tokens and 64
        // sequences, group 4 and 8 kv heads, and the group-1 / 2-head case.
        let mut rng = 11u64;
        let mut next = |n: usize| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) as usize % n
        };
        for (group, heads) in [(4, 8), (1, 2), (8, 1)] {
            let bound = step_work_bound(4096, 64, group, heads, 264);
            for _ in 0..500 {
                let batch = 1 + next(64);
                let mut budget = 4096usize;
                let mut q = Vec::new();
                let mut kv = Vec::new();
                for _ in 0..batch {
                    let ql =
                        if budget > 1 && next(4) == 0 { 1 + next(budget.min(1500)) } else { 1 };
                    let ql = ql.min(budget.max(1));
                    budget = budget.saturating_sub(ql);
                    q.push(ql);
                    kv.push(ql + next(40_000));
                }
                let rows = q.iter().max().unwrap() * group;
                let p = plan(&q, &kv, group, heads, TileConfig::choose(rows), 264, 256, false);
                assert!(p.work.len() <= bound.work_items, "{} > {bound:?}", p.work.len());
                assert!(p.merge.len() <= bound.merge_items, "{} > {bound:?}", p.merge.len());
                assert!(p.partial_rows <= bound.partial_rows, "{} > {bound:?}", p.partial_rows);
            }
        }
    }

    #[test]
    fn split_items_find_their_splits_through_the_merge_entries() {
        // Prompt chunks beside decode rows, group 5 (tiles straddle tokens), 3 kv heads.
        let (q, kv) = ([1usize, 40, 1, 7], [9000usize, 3000, 300, 20_000]);
        let p = plan(&q, &kv, 5, 3, TileConfig::PREFILL, 264, 256, false);
        assert!(p.work.iter().any(|w| w.partial_row >= 0), "something splits");
        for w in p.work.iter().filter(|w| w.partial_row >= 0) {
            let mut splits: Vec<&WorkItem> =
                p.work.iter().filter(|o| (o.batch, o.q_tile) == (w.batch, w.q_tile)).collect();
            splits.sort_by_key(|o| o.kv_begin);
            let s = splits.iter().position(|o| o == &w).unwrap() as i32;
            for h in 0..3 {
                let m = p.merge[(w.merge + h) as usize];
                assert_eq!(m.num_splits as usize, splits.len());
                assert_eq!(m.split_stride as usize, q[w.batch as usize]);
                assert_eq!(m.first_row + s * m.split_stride, w.partial_row);
                assert_eq!(m.arrived, 0);
            }
            assert!(splits.iter().all(|o| o.merge == w.merge));
        }
        assert!(p.work.iter().filter(|w| w.partial_row < 0).all(|w| w.merge < 0));
    }

    #[test]
    fn clusters_apply_to_short_key_split_decode_of_few_sequences() {
        let ks = TileConfig::DECODE_SMALL;
        let apply =
            |batch, kv, tiles, cluster| clusters_apply(batch, kv, 8, tiles, 264, 256, cluster);
        // 8 kv heads, 264 slots: half a wave is 2 sequences of 8 chunks; 8 chunks of 256 keys.
        assert!(apply(1, 2048, ks, DECODE_CLUSTER) && apply(2, 1, ks, DECODE_CLUSTER));
        assert!(!apply(3, 1000, ks, DECODE_CLUSTER));
        assert!(!apply(1, 2049, ks, DECODE_CLUSTER));
        assert!(!apply(1, 1000, TileConfig::DECODE, DECODE_CLUSTER));
        assert!(!apply(1, 1000, ks, 0) && !apply(0, 1000, ks, DECODE_CLUSTER));
        assert!(clusters_apply(8, 2048, 2, ks, 264, 256, DECODE_CLUSTER));
    }

    #[test]
    fn clustered_plans_cut_each_sequence_into_one_cluster_of_chunks() {
        let ks = TileConfig::DECODE_SMALL;
        let mut p = plan_clustered(&[1, 0, 4], &[2048, 7, 100], 4, ks, DECODE_CLUSTER);
        assert_eq!((p.work.len(), p.cluster, p.heads_inner), (16, DECODE_CLUSTER, false));
        assert!(p.merge.is_empty() && p.partial_rows == 0);
        assert!(p.work.iter().all(|w| w.partial_row < 0 && w.merge < 0 && w.q_tile == 0));
        // 2,048 keys: 8 chunks of 4 tiles, in order.
        assert!(p.work[..8].iter().enumerate().all(|(s, w)| w.batch == 0
            && (w.kv_begin, w.kv_end) == (256 * s as i32, 256 * s as i32 + 256)));
        // 100 keys (the sequence of no queries takes none): one tile, a partial one, six
        // empty chunks.
        let ranges: Vec<(i32, i32)> = p.work[8..].iter().map(|w| (w.kv_begin, w.kv_end)).collect();
        assert_eq!(ranges[..2], [(0, 64), (64, 100)]);
        assert!(ranges[2..].iter().all(|&r| r == (100, 100)));
        assert!(p.work[8..].iter().all(|w| w.batch == 2));
        // Forced key-split tiles on 40 rows (q_len 5, group 8): a cluster a query tile.
        let p5 = plan_clustered(&[5], &[300], 8, ks, DECODE_CLUSTER);
        let tiles: Vec<i32> = p5.work.iter().map(|w| w.q_tile).collect();
        assert_eq!(tiles, [[0; 8], [1; 8], [2; 8]].concat());
        // A graph bucket's bound pads in whole clusters, within the step's bound.
        let bound = decode_work_bound(3, 4, 8, ks, 264);
        p.pad_to(bound).unwrap();
        assert_eq!(p.work.len(), bound.next_multiple_of(DECODE_CLUSTER));
        assert!(p.work.len() <= step_work_bound(6, 3, 4, 8, 264).work_items);
    }

    #[test]
    fn chunks_respect_the_minimum() {
        let p = plan(&[1], &[1000], 1, 1, TILES, 1000, 256, false);
        assert!(p.work.iter().all(|w| w.kv_end - w.kv_begin >= 256 || w.kv_end == 1000));
        assert_eq!(p.work.len(), 4);
    }

    #[test]
    fn tile_configs_parse_and_size() {
        let t = TileConfig::parse("4,2,64").unwrap();
        assert_eq!(t.block_m(), 128);
        assert_eq!(t.smem_bytes(64, 2), (128 + 256) * 64 * 2);
        let t = TileConfig::parse("4,1,64,3").unwrap();
        assert_eq!((t, t.smem_bytes(128, 2)), (TileConfig::DECODE, 112 * 1024));
        assert!(TileConfig::parse("4,1,64,5").is_err());
        assert!(TileConfig::parse("3,1,64").is_err());
        assert!(TileConfig::parse("4,1").is_err());
        // The Hopper tiles: the same 128 rows as PREFILL (one plan serves both), 160 KiB
        // of tiles at head_dim 128 plus 1 KiB to align them for wgmma.
        let t = TileConfig::parse("wgmma").unwrap();
        assert_eq!(t, TileConfig::PREFILL_SM90);
        assert_eq!((t.block_m(), t.threads()), (TileConfig::PREFILL.block_m(), 256));
        assert_eq!(t.smem_bytes(128, 2), 161 * 1024);
        let t = TileConfig::parse("wgmma,128,3").unwrap();
        assert!(t.wgmma && t.block_n == 128 && t.stages == 3);
        assert!(TileConfig::parse("wgmma,64").is_err());
        assert!(TileConfig::parse("wgmma,128,4").is_err());
        assert!(TileConfig::parse("wgmma-ws4,128,3").is_err());
        // One block an SM at head_dim 128 on Hopper (227 KiB a block), two for the others.
        let hopper = 227 * 1024;
        assert_eq!(TileConfig::PREFILL_SM90.blocks_per_sm(128, hopper), 1);
        assert_eq!(TileConfig::PREFILL_SM90.blocks_per_sm(64, hopper), 2);
        for t in [TileConfig::PREFILL, TileConfig::DECODE, TileConfig::DECODE_SMALL] {
            assert_eq!(t.blocks_per_sm(128, hopper), 2, "{t:?}");
        }
        assert!(TileConfig::parse("wgmma,x").is_err());
        let t = TileConfig::parse("wgmma-ws,128,3").unwrap();
        assert_eq!((t.num_warps, t.threads(), t.block_m(), t.stages), (9, 288, 128, 3));
        // The TMA producer: 12 warps, the same rows and tiles, one block an SM (registers).
        let t = TileConfig::parse("wgmma-tma").unwrap();
        assert_eq!(t, TileConfig::PREFILL_SM90_TMA);
        assert!(t.tma && t.wgmma);
        assert_eq!((t.threads(), t.block_m(), t.smem_bytes(128, 2)), (384, 128, 161 * 1024));
        let p = TileConfig::parse("wgmma-tma-persistent").unwrap();
        assert!(p.persistent && p.tma && p.smem_bytes(128, 2) == 193 * 1024);
        assert_eq!((t.blocks_per_sm(128, hopper), t.blocks_per_sm(64, hopper)), (1, 1));
        assert_eq!(TileConfig::parse("wgmma-tma,128,2").unwrap(), t);
        assert!(TileConfig::parse("wgmma-tma,128,3").is_err());
        assert!(TileConfig::parse("wgmma-tma,64").is_err());
        // Three compute warpgroups at head_dim 64: 192 rows, one block an SM.
        let t3 = TileConfig::parse("wgmma-tma3").unwrap();
        assert_eq!(t3, TileConfig::PREFILL_SM90_TMA_D64);
        assert_eq!((t3.threads(), t3.block_m(), t3.smem_bytes(64, 2)), (512, 192, 89 * 1024));
        assert_eq!(t3.blocks_per_sm(64, hopper), 1);
        assert_eq!(TileConfig::parse("ks").unwrap(), TileConfig::DECODE_SMALL);
        let ks = TileConfig::parse("ks,128,2").unwrap();
        assert!(ks.key_split && (ks.block_n, ks.stages) == (128, 2));
        assert!(TileConfig::parse("ks,32").is_err() && TileConfig::parse("ks,64,5").is_err());
        assert!(TileConfig::parse("ks128").is_err());
    }
}

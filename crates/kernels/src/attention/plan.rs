//! Host-side planning of an attention launch: which block does what.
//!
//! Work is cut into items of one sequence's BM-row tile against a range of its keys;
//! every item runs once per kv head (grid.y). When the batch alone would leave the GPU
//! idle (small batches, long contexts: decode), each sequence's keys are split into
//! chunks so that about `target_blocks` blocks run; split items write fp32 partials and
//! a merge pass combines them by log-sum-exp. Planning reads only host metadata: no
//! device synchronisation.

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
    pub reserved: i32,
}

/// One (token, all heads) whose splits the merge pass combines; mirrors `MergeItem`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeItem {
    pub out_token: i32,
    pub first_row: i32,
    pub num_splits: i32,
    pub split_stride: i32,
}

/// Tile shape of one kernel specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileConfig {
    pub num_warps: u32,
    /// 16-row MMA tiles per warp.
    pub m_tiles: u32,
    /// Keys per K/V tile.
    pub block_n: u32,
}

impl TileConfig {
    /// Rows (token × group head) per block.
    pub fn block_m(&self) -> usize {
        (16 * self.m_tiles * self.num_warps) as usize
    }

    pub fn threads(&self) -> u32 {
        self.num_warps * 32
    }

    /// Dynamic shared memory: the Q tile plus two stages of K and V tiles.
    pub fn smem_bytes(&self, head_dim: usize, elem_bytes: usize) -> usize {
        (self.block_m() + 4 * self.block_n as usize) * head_dim * elem_bytes
    }

    /// Prefill tiles: 4 warps of 32 rows (two 16-row MMA tiles share each K/V fragment,
    /// halving shared-memory reads per MMA), 64 keys per tile. Fastest of the shapes swept
    /// on the H100 at head_dim 64 and 128 (bench/NOTES.md).
    pub const PREFILL: TileConfig = TileConfig { num_warps: 4, m_tiles: 2, block_n: 64 };
    /// Decode tiles: a block of 64 rows holds a whole GQA group of a few tokens with less
    /// shared memory; the kernel is bound by memory bandwidth there, not by MMAs.
    pub const DECODE: TileConfig = TileConfig { num_warps: 4, m_tiles: 1, block_n: 64 };

    /// Tiles for a batch whose longest sequence has `max_rows` rows (q_len × group).
    pub fn choose(max_rows: usize) -> TileConfig {
        if max_rows <= Self::DECODE.block_m() { Self::DECODE } else { Self::PREFILL }
    }

    pub fn parse(s: &str) -> Result<TileConfig, String> {
        let v: Vec<u32> = s
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("bad tile config {s:?}: expected WARPS,M_TILES,BLOCK_N"))?;
        match v[..] {
            [num_warps, m_tiles, block_n]
                if [2, 4, 8].contains(&num_warps)
                    && [1, 2].contains(&m_tiles)
                    && [32, 64, 128].contains(&block_n) =>
            {
                Ok(TileConfig { num_warps, m_tiles, block_n })
            }
            _ => Err(format!(
                "bad tile config {s:?}: WARPS in 2,4,8; M_TILES in 1,2; BLOCK_N in 32,64,128"
            )),
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
}

impl WorkList {
    /// The work list as the kernel reads it, 6 words per item.
    pub fn work_words(&self) -> impl Iterator<Item = i32> + '_ {
        self.work
            .iter()
            .flat_map(|w| [w.batch, w.q_tile, w.kv_begin, w.kv_end, w.partial_row, w.reserved])
    }

    /// The merge list as the merge kernel reads it, 4 words per item.
    pub fn merge_words(&self) -> impl Iterator<Item = i32> + '_ {
        self.merge.iter().flat_map(|m| [m.out_token, m.first_row, m.num_splits, m.split_stride])
    }

    /// Pads the lists to exactly `work` and `merge` items with items the kernels skip, so
    /// that a launch captured in a CUDA graph (whose grid is fixed) covers any plan that
    /// fits. Fails if the plan is already longer.
    pub fn pad_to(&mut self, work: usize, merge: usize) -> Result<(), String> {
        if self.work.len() > work || self.merge.len() > merge {
            return Err(format!(
                "plan of {} work and {} merge items does not fit {work} and {merge}",
                self.work.len(),
                self.merge.len()
            ));
        }
        self.work.resize(work, WorkItem { batch: -1, ..WorkItem::default() });
        self.merge.resize(merge, MergeItem { num_splits: 0, ..MergeItem::default() });
        Ok(())
    }
}

/// The most work items `plan` makes for `batch` sequences of one query token each: one
/// tile per sequence when unsplit; when split, chunks of `c` tiles with
/// `c >= floor(tile_work / wanted) > tile_work / (2 wanted)` (or `tile_work < wanted`),
/// so fewer than `2 wanted` chunks plus one partial chunk per sequence.
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

/// Plans a batch: `q_lens[b]` query tokens against `kv_lens[b]` keys.
///
/// `target_blocks` is how many blocks keep the GPU busy (e.g. 2 × SMs); splitting happens
/// only below it, and never into chunks of fewer than `min_chunk` keys.
pub fn plan(
    q_lens: &[usize],
    kv_lens: &[usize],
    group: usize,
    num_kv_heads: usize,
    tiles: TileConfig,
    target_blocks: usize,
    min_chunk: usize,
) -> WorkList {
    debug_assert_eq!(q_lens.len(), kv_lens.len());
    let bm = tiles.block_m();
    let bn = tiles.block_n as usize;
    let q_tiles = |b: usize| (q_lens[b] * group).div_ceil(bm);
    let unsplit_blocks: usize = (0..q_lens.len()).map(q_tiles).sum::<usize>() * num_kv_heads;

    // Keys per split, in whole K/V tiles; usize::MAX means "do not split".
    let chunk = if unsplit_blocks >= target_blocks || num_kv_heads == 0 {
        usize::MAX
    } else {
        let tile_work: usize =
            (0..q_lens.len()).map(|b| q_tiles(b) * kv_lens[b].div_ceil(bn)).sum::<usize>();
        let wanted_items = target_blocks.div_ceil(num_kv_heads).max(1);
        let min_tiles = min_chunk.div_ceil(bn).max(1);
        // Round the chunk down so the split reaches the target rather than falling short.
        (tile_work / wanted_items).max(min_tiles) * bn
    };

    let mut out = WorkList::default();
    let mut q_start = 0usize;
    for b in 0..q_lens.len() {
        let (q_len, kv_len) = (q_lens[b], kv_lens[b]);
        let splits = if chunk == usize::MAX { 1 } else { kv_len.div_ceil(chunk).max(1) };
        let partial_base = out.partial_rows;
        if splits > 1 {
            out.partial_rows += splits * q_len;
            for t in 0..q_len {
                out.merge.push(MergeItem {
                    out_token: (q_start + t) as i32,
                    first_row: (partial_base + t) as i32,
                    num_splits: splits as i32,
                    split_stride: q_len as i32,
                });
            }
        }
        for tile in 0..q_tiles(b) {
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
                    reserved: 0,
                });
            }
        }
        q_start += q_len;
    }
    // Heaviest items first, so a long tail of small ones fills in behind them. Under a
    // causal mask later tiles see more keys, so q_tile breaks ties the same way.
    out.work.sort_by_key(|w| std::cmp::Reverse(((w.kv_end - w.kv_begin) as i64, w.q_tile)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TILES: TileConfig = TileConfig { num_warps: 4, m_tiles: 1, block_n: 64 };

    #[test]
    fn big_batches_are_not_split() {
        let p = plan(&[1000, 1], &[1000, 5], 1, 8, TILES, 16, 256);
        assert!(p.merge.is_empty() && p.partial_rows == 0);
        assert_eq!(p.work.len(), 1000usize.div_ceil(64) + 1);
        assert!(p.work.iter().all(|w| w.partial_row < 0 && w.kv_begin == 0));
    }

    #[test]
    fn decode_of_one_long_sequence_is_split_into_chunks_covering_every_key() {
        // One token, group 4, 65536 keys, 8 kv heads, 264 blocks wanted.
        let p = plan(&[1], &[65536], 4, 8, TILES, 264, 256);
        let splits = p.work.len();
        assert!(splits >= 33, "only {splits} splits");
        let mut ranges: Vec<(i32, i32)> = p.work.iter().map(|w| (w.kv_begin, w.kv_end)).collect();
        ranges.sort();
        assert_eq!(ranges[0].0, 0);
        assert_eq!(ranges.last().unwrap().1, 65536);
        assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "gaps or overlaps");
        assert_eq!(
            p.merge,
            vec![MergeItem {
                out_token: 0,
                first_row: 0,
                num_splits: splits as i32,
                split_stride: 1
            }]
        );
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
                let mut p = plan(&q, &kv, 4, 8, TILES, 264, 256);
                let bound = decode_work_bound(batch, 4, 8, TILES, 264);
                assert!(p.work.len() <= bound, "{} items > bound {bound}", p.work.len());
                assert!(p.merge.len() <= batch);
                p.pad_to(bound, batch).unwrap();
                assert_eq!(p.work.len(), bound);
                assert!(p.work.iter().skip_while(|w| w.batch >= 0).all(|w| w.batch < 0));
                assert!(p.merge.iter().filter(|m| m.num_splits == 0).count() <= batch);
            }
        }
        let mut p = plan(&[1], &[100], 4, 8, TILES, 264, 256);
        assert!(p.pad_to(0, 0).is_err());
    }

    #[test]
    fn chunks_respect_the_minimum() {
        let p = plan(&[1], &[1000], 1, 1, TILES, 1000, 256);
        assert!(p.work.iter().all(|w| w.kv_end - w.kv_begin >= 256 || w.kv_end == 1000));
        assert_eq!(p.work.len(), 4);
    }

    #[test]
    fn tile_configs_parse_and_size() {
        let t = TileConfig::parse("4,2,64").unwrap();
        assert_eq!(t.block_m(), 128);
        assert_eq!(t.smem_bytes(64, 2), (128 + 256) * 64 * 2);
        assert!(TileConfig::parse("3,1,64").is_err());
        assert!(TileConfig::parse("4,1").is_err());
    }
}

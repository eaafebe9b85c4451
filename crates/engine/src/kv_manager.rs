//! The engine's one owner of KV memory: the page pool, the radix prefix cache, the page
//! size and the prefix-cache switch, with the operations the scheduler needs (vLLM v1's
//! `KVCacheManager` is the model). The scheduler decides *who* runs; this type decides
//! which pages they hold, and nothing else touches the pool or the cache.
//!
//! A sequence's pages live in its `SeqPages`, which only this type changes:
//! - `admit` matches a new sequence's prompt against the cache and takes the cached
//!   prefix (locked, shared);
//! - `reserve` gives it pages for its first `upto` tokens, evicting unlocked cached
//!   pages when the free list is short;
//! - `cache_computed` hands its computed full pages to the cache (they become shared,
//!   the lock moves to the deeper node);
//! - `free` returns its own pages and unlocks its prefix (preemption, abort, or the end
//!   of a request, after `cache_computed` when its pages are worth keeping).
//!
//! Byte accounting derives from the pool's geometry (`KvGeometry`), so it follows the
//! backend's real dtype and the key-bounds records.

use radix_kv::{
    CacheMetrics, KvError, KvGeometry, NodeId, PageId, PagePool, RadixCache, SparsePolicy,
};

/// A sequence's KV pages: `pages[i]` holds tokens `i * page_size ..`; the first `shared`
/// belong to the radix cache (locked through `node`), the rest are the sequence's own.
#[derive(Debug, Default)]
pub struct SeqPages {
    pages: Vec<PageId>,
    shared: usize,
    node: Option<NodeId>,
}

impl SeqPages {
    pub fn pages(&self) -> &[PageId] {
        &self.pages
    }

    /// Pages the cache holds (the rest are the sequence's own).
    pub fn shared(&self) -> usize {
        self.shared
    }

    /// True when it holds nothing (a waiting sequence).
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty() && self.node.is_none()
    }
}

/// What a step's attention reads (`KvManager::kv_read_bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvReads {
    /// K and V of every page, every layer: what dense attention reads.
    pub dense_bytes: u64,
    /// With sparse selection: dense layers whole, sparse layers the kept pages plus the
    /// key bounds of the pages scored.
    pub bytes: u64,
}

pub struct KvManager {
    pool: PagePool,
    cache: RadixCache,
    geometry: KvGeometry,
    prefix_cache: bool,
}

impl KvManager {
    /// A pool of `num_pages` pages of `geometry`; `prefix_cache` turns prefix reuse on.
    pub fn new(
        num_pages: usize,
        geometry: KvGeometry,
        prefix_cache: bool,
    ) -> Result<Self, KvError> {
        let pool = PagePool::new(num_pages, geometry.page_size())?;
        let cache = RadixCache::new(&pool);
        Ok(Self { pool, cache, geometry, prefix_cache })
    }

    pub fn geometry(&self) -> &KvGeometry {
        &self.geometry
    }

    pub fn page_size(&self) -> usize {
        self.geometry.page_size()
    }

    pub fn num_pages(&self) -> usize {
        self.pool.num_pages()
    }

    /// Tokens the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.pool.num_pages() * self.page_size()
    }

    pub fn free_pages(&self) -> usize {
        self.pool.free_pages()
    }

    /// Pages in the free list plus those only the cache holds unlocked.
    pub fn reclaimable_pages(&self) -> usize {
        self.pool.free_pages() + self.cache.evictable_pages()
    }

    pub fn cache_metrics(&self) -> CacheMetrics {
        self.cache.metrics()
    }

    /// Takes the cached prefix of `tokens` (a new sequence's prompt, holding nothing yet)
    /// into `seq`: locked, shared. At least the last token is left to compute, for its
    /// logits. Returns the tokens served from the cache (0 with the cache off).
    pub fn admit(&mut self, seq: &mut SeqPages, tokens: &[u32]) -> usize {
        if !self.prefix_cache || !seq.is_empty() || tokens.is_empty() {
            return 0;
        }
        let m = self.cache.match_prefix(&tokens[..tokens.len() - 1]);
        if self.cache.lock(m.last_node).is_err() {
            return 0;
        }
        seq.pages = m.pages;
        seq.shared = seq.pages.len();
        seq.node = Some(m.last_node);
        m.matched_tokens
    }

    /// Gives `seq` pages for its first `upto` tokens, evicting unlocked cached pages when
    /// the free list is short. False (and nothing changed) if the pool cannot provide
    /// them.
    pub fn reserve(&mut self, seq: &mut SeqPages, upto: usize) -> bool {
        let need = upto.div_ceil(self.page_size()).saturating_sub(seq.pages.len());
        if need == 0 {
            return true;
        }
        let free = self.pool.free_pages();
        if free < need {
            let _ = self.cache.evict(need - free, &mut self.pool);
        }
        self.pool.alloc_into(&mut seq.pages, need).is_ok()
    }

    /// Hands `seq`'s full pages among its first `computed` tokens (`tokens` are the
    /// sequence's) to the prefix cache and moves its lock to the new node. A no-op with
    /// the cache off.
    pub fn cache_computed(&mut self, seq: &mut SeqPages, tokens: &[u32], computed: usize) {
        let full = computed.min(tokens.len()) / self.page_size();
        if !self.prefix_cache || full <= seq.shared {
            return;
        }
        let tokens = &tokens[..full * self.page_size()];
        match self.cache.insert(tokens, &mut seq.pages[..full], &mut self.pool) {
            Ok(res) => {
                if self.cache.lock(res.last_node).is_ok() {
                    if let Some(old) = seq.node.replace(res.last_node) {
                        let _ = self.cache.unlock(old);
                    }
                    seq.shared = full;
                }
            }
            Err(e) => tracing::error!("caching a computed prefix: {e}"),
        }
    }

    /// Returns `seq`'s own pages to the pool and unlocks its cached prefix: it holds
    /// nothing afterwards.
    pub fn free(&mut self, seq: &mut SeqPages) {
        if let Err(e) = self.pool.release(&seq.pages[seq.shared..]) {
            tracing::error!("releasing a sequence's pages: {e}");
        }
        if let Some(Err(e)) = seq.node.take().map(|node| self.cache.unlock(node)) {
            tracing::error!("unlocking a sequence's prefix: {e}");
        }
        seq.pages.clear();
        seq.shared = 0;
    }

    /// Bytes a step's attention reads, from `dense` and `kept` pages per layer of its
    /// sequences and the `scored` pages whose key bounds the selection reads; the first
    /// `policy.dense_layers` layers read all pages.
    pub fn kv_read_bytes(
        &self,
        policy: &SparsePolicy,
        dense: usize,
        kept: usize,
        scored: usize,
    ) -> KvReads {
        let g = &self.geometry;
        let (page, bounds) = (g.kv_bytes_per_page_layer(), g.bounds_bytes_per_page_layer());
        let layers = g.num_layers();
        let dense_layers = policy.dense_layers.min(layers);
        let sparse_layers = layers - dense_layers;
        KvReads {
            dense_bytes: (dense * layers * page) as u64,
            bytes: ((dense * dense_layers + kept * sparse_layers) * page
                + scored * sparse_layers * bounds) as u64,
        }
    }

    /// Checks the page bookkeeping against the sequences that hold pages: pool and cache
    /// agree, and the pages the pool calls owned are exactly theirs.
    pub fn check_invariants<'a>(
        &self,
        holders: impl Iterator<Item = &'a SeqPages>,
    ) -> Result<(), String> {
        self.pool.check_invariants()?;
        self.cache.check_invariants(&self.pool)?;
        let owned: usize = holders.map(|s| s.pages.len() - s.shared).sum();
        let c = self.pool.counts();
        if c.owned != owned {
            return Err(format!("pool says {} pages are owned, sequences own {owned}", c.owned));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use radix_kv::KvDtype;

    use super::*;

    fn manager(pages: usize, prefix_cache: bool) -> KvManager {
        let g = KvGeometry::new(2, 2, 4, 8, KvDtype::BF16, false).unwrap();
        KvManager::new(pages, g, prefix_cache).unwrap()
    }

    fn prompt(n: usize) -> Vec<u32> {
        (0..n as u32).collect()
    }

    #[test]
    fn reserve_allocates_whole_pages_and_refuses_past_the_pool() {
        let mut kv = manager(4, true);
        let mut a = SeqPages::default();
        assert!(kv.reserve(&mut a, 5));
        assert_eq!(a.pages().len(), 2);
        assert!(kv.reserve(&mut a, 8), "within the last page");
        assert_eq!(a.pages().len(), 2);
        let mut b = SeqPages::default();
        assert!(!kv.reserve(&mut b, 9), "3 pages, 2 free");
        assert!(b.is_empty(), "a refused reservation takes nothing");
        kv.check_invariants([&a, &b].into_iter()).unwrap();
        kv.free(&mut a);
        assert!(kv.reserve(&mut b, 9));
        kv.check_invariants([&a, &b].into_iter()).unwrap();
    }

    #[test]
    fn a_finished_prompt_is_served_to_the_next_one() {
        let mut kv = manager(8, true);
        let tokens = prompt(10);
        let mut a = SeqPages::default();
        assert_eq!(kv.admit(&mut a, &tokens), 0, "the cache starts empty");
        assert!(kv.reserve(&mut a, 10));
        kv.cache_computed(&mut a, &tokens, 10);
        assert_eq!(a.shared(), 2, "two full pages are cached");
        kv.free(&mut a);
        kv.check_invariants(std::iter::empty()).unwrap();

        let mut b = SeqPages::default();
        assert_eq!(kv.admit(&mut b, &tokens), 8, "the full pages come from the cache");
        assert_eq!((b.pages().len(), b.shared()), (2, 2));
        assert!(kv.reserve(&mut b, 10));
        kv.check_invariants([&b].into_iter()).unwrap();
        // Locked by b: not evictable while it runs.
        assert_eq!(kv.reclaimable_pages(), kv.free_pages());
        kv.free(&mut b);
        assert_eq!(kv.reclaimable_pages(), 8);
    }

    #[test]
    fn the_cache_off_shares_nothing() {
        let mut kv = manager(8, false);
        let tokens = prompt(10);
        let mut a = SeqPages::default();
        assert!(kv.reserve(&mut a, 10));
        kv.cache_computed(&mut a, &tokens, 10);
        assert_eq!(a.shared(), 0);
        kv.free(&mut a);
        let mut b = SeqPages::default();
        assert_eq!(kv.admit(&mut b, &tokens), 0);
        assert_eq!(kv.free_pages(), 8);
    }

    #[test]
    fn reserving_evicts_unlocked_cached_pages() {
        let mut kv = manager(4, true);
        let tokens = prompt(16);
        let mut a = SeqPages::default();
        assert!(kv.reserve(&mut a, 16));
        kv.cache_computed(&mut a, &tokens, 16);
        kv.free(&mut a);
        assert_eq!((kv.free_pages(), kv.reclaimable_pages()), (0, 4));
        // Another prompt needs the whole pool: the cached pages are evicted for it.
        let mut b = SeqPages::default();
        assert_eq!(kv.admit(&mut b, &[9, 9, 9, 9, 9]), 0);
        assert!(kv.reserve(&mut b, 16));
        assert_eq!(kv.cache_metrics().cached_pages, 0);
        kv.check_invariants([&b].into_iter()).unwrap();
    }

    #[test]
    fn locked_prefixes_are_not_evicted() {
        let mut kv = manager(4, true);
        let tokens = prompt(9);
        let mut a = SeqPages::default();
        assert!(kv.reserve(&mut a, 9));
        kv.cache_computed(&mut a, &tokens, 8);
        assert_eq!(a.shared(), 2);
        let mut b = SeqPages::default();
        assert!(!kv.reserve(&mut b, 8), "a's pages are locked: one page free");
        kv.check_invariants([&a, &b].into_iter()).unwrap();
    }

    #[test]
    fn kv_reads_follow_the_pool_dtype_and_key_bounds() {
        let policy =
            SparsePolicy { sink_pages: 1, window_pages: 1, min_context_tokens: 0, dense_layers: 1 };
        // 2 layers, 2 kv heads, pages of 4 tokens, head dim 8.
        let page_layer = |dtype: KvDtype| 2 * 2 * 4 * 8 * dtype.bytes();
        let bf16 = manager(8, true);
        let r = bf16.kv_read_bytes(&policy, 10, 3, 0);
        assert_eq!(r.dense_bytes, (10 * 2 * page_layer(KvDtype::BF16)) as u64);
        assert_eq!(r.bytes, ((10 + 3) * page_layer(KvDtype::BF16)) as u64);
        // The CPU backend's pool is f32: twice the bytes.
        let g = KvGeometry::new(2, 2, 4, 8, KvDtype::F32, true).unwrap();
        let f32_pool = KvManager::new(8, g, true).unwrap();
        let r = f32_pool.kv_read_bytes(&policy, 10, 3, 10);
        assert_eq!(r.dense_bytes, (10 * 2 * page_layer(KvDtype::F32)) as u64);
        let bounds = 10 * 2 * radix_kv::bounds_record_bytes(8);
        assert_eq!(r.bytes, ((10 + 3) * page_layer(KvDtype::F32) + bounds) as u64);
    }
}

//! LRU eviction of unlocked leaves.
//!
//! The evictable leaves are kept in an ordered set keyed by (last access, node), so
//! an eviction pops the oldest in O(log n) instead of re-heapifying every leaf on each
//! call. The set is updated only where a node's leaf-ness, lock count or access time
//! changes (`sync_lru` / `touch`); a parent that becomes an unlocked leaf after its
//! last child goes is offered right away, so one call can eat a whole cold branch.

use super::RadixCache;
use super::node::ROOT;
use crate::error::Result;
use crate::pool::PagePool;

impl RadixCache {
    /// Frees at least `n_pages` pages (whole nodes, so possibly a few more) by
    /// evicting least-recently-used unlocked leaves, or everything evictable if that
    /// is less. Returns the number of pages freed to `pool`.
    pub fn evict(&mut self, n_pages: usize, pool: &mut PagePool) -> Result<usize> {
        self.check_pool(pool)?;
        let mut freed = 0;
        while freed < n_pages {
            let Some((_, index)) = self.evictable_leaves.pop_first() else {
                break;
            };
            freed += self.remove_leaf(index, pool);
        }
        self.evicted_pages += freed as u64;
        Ok(freed)
    }

    /// Removes an evictable leaf already taken out of the LRU set; returns its pages.
    fn remove_leaf(&mut self, index: u32, pool: &mut PagePool) -> usize {
        let ps = self.page_size;
        let node = &mut self.arena[index];
        debug_assert!(node.is_leaf() && node.lock_ref == 0 && index != ROOT);
        node.lru_key = None;
        let pages = std::mem::take(&mut node.pages);
        let tokens = std::mem::take(&mut node.tokens);
        let parent = node.parent;
        let removed = self.arena[parent].children.remove(&tokens[..ps]);
        debug_assert_eq!(removed, Some(index));

        pool.free_cached(&pages);
        self.cached_pages -= pages.len();
        self.evictable_pages -= pages.len();
        self.arena.free(index);
        self.sync_lru(parent);
        pages.len()
    }

    /// Puts `index` into the LRU set or takes it out, as its state now requires.
    pub(super) fn sync_lru(&mut self, index: u32) {
        let node = &self.arena[index];
        let should_be_in = index != ROOT && node.lock_ref == 0 && node.is_leaf();
        match (node.lru_key, should_be_in) {
            (Some(key), false) => {
                self.evictable_leaves.remove(&(key, index));
                self.arena[index].lru_key = None;
            }
            (None, true) => {
                let key = node.last_access;
                self.evictable_leaves.insert((key, index));
                self.arena[index].lru_key = Some(key);
            }
            // In the set under the current key, or rightly out of it. `touch` takes a
            // node out before changing its time, so a stale key cannot survive here.
            _ => debug_assert!(node.lru_key.is_none_or(|k| k == node.last_access)),
        }
    }
}

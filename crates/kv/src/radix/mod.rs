//! The radix-tree prefix cache (RadixAttention-style), matched at page granularity.
//!
//! The tree maps token sequences to the KV pages that hold them. Every node holds a
//! run of whole pages (`tokens.len() == pages.len() * page_size`); children are keyed
//! by the tokens of their first page. Matching never ends inside a page: a 37-token
//! prompt with 16-token pages can match at most 32 tokens. When a match or insert
//! ends inside a node, the node is split at that page boundary, so a match result is
//! always exactly the path from the root to one node.
//!
//! # Ownership (who frees what)
//!
//! Every page is in exactly one place: the pool's free list, a running request, or
//! this tree (the pool's [`PageState`](crate::PageState) says which).
//!
//! * **Match.** [`RadixCache::match_prefix`] returns the tree's pages for the longest
//!   cached prefix. They stay the tree's; the request may read them but must
//!   [`lock`](RadixCache::lock) the returned node *before the next evict* and
//!   [`unlock`](RadixCache::unlock) it when it stops using them. It never releases
//!   them to the pool.
//! * **Allocate.** The request allocates its other pages from the pool; it owns them.
//! * **Insert** (after a prefill chunk, or when the request finishes).
//!   [`RadixCache::insert`] takes the page-aligned tokens and the matching pages
//!   (tree pages for the matched prefix, owned pages after it). All the pages end up
//!   the tree's: pages the caller owned that duplicate what the tree already had are
//!   released to the pool by `insert` itself, and the caller's slice is rewritten to
//!   the tree's pages, so it stays a valid page list for the request. The unaligned
//!   tail (the last partial page) is not inserted and stays the caller's to keep or
//!   release.
//! * **Lock handover.** To keep using the inserted pages (an unfinished request),
//!   lock the node `insert` returned and then unlock the node locked before. A
//!   finished request just unlocks its old node.
//! * **Evict.** [`RadixCache::evict`] frees least-recently-used unlocked leaves to the
//!   pool. Locked nodes (and so their ancestors) are never evicted. A matched page
//!   that was *not* locked may be evicted and handed to another request; the tree
//!   cannot tell that the first request still uses it, so the lock is not optional.
//!
//! # Locks
//!
//! `lock(node)` adds one to the lock count of the node and of every ancestor;
//! `unlock` takes it back. Pages move between the *evictable* and *protected* totals
//! only when a node's count goes 0 -> 1 or 1 -> 0. A node's count is never smaller
//! than a descendant's, so the evictable set is exactly the unlocked leaves and
//! whatever they expose as they go.
//!
//! # Time
//!
//! Access times are a logical clock bumped once per match or insert, not wall time,
//! so runs are reproducible. Matching and inserting touch every node on the path, so
//! a parent is never older than its children and eviction works from the leaves in.

mod check;
mod evict;
mod insert;
mod lookup;
mod node;

use std::collections::BTreeSet;

pub use node::NodeId;

use crate::error::{KvError, Result};
use crate::pool::{PageId, PagePool};
use node::{Arena, ROOT};

/// The cached prefix of a prompt, as [`RadixCache::match_prefix`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchResult {
    /// The tree's pages for the matched tokens, in order.
    pub pages: Vec<PageId>,
    /// Tokens matched: a multiple of the page size.
    pub matched_tokens: usize,
    /// The node ending the match (the root if nothing matched): lock it to keep the
    /// pages from eviction.
    pub last_node: NodeId,
}

/// A match without its page list, from [`RadixCache::match_prefix_into`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Tokens matched: a multiple of the page size.
    pub matched_tokens: usize,
    /// The node ending the match (the root if nothing matched).
    pub last_node: NodeId,
}

/// What [`RadixCache::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InsertResult {
    /// The node holding the last inserted page (the root for an empty insert).
    pub last_node: NodeId,
    /// Pages of the sequence the tree already had before the call.
    pub prefix_pages: usize,
    /// Pages the tree took over from the caller.
    pub new_pages: usize,
    /// Caller-owned pages that duplicated tree pages and were released to the pool.
    pub released_duplicates: usize,
}

/// Counters and gauges of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheMetrics {
    /// Tokens found in the cache by `match_prefix`, summed over calls.
    pub hit_tokens: u64,
    /// Tokens asked for but not found by `match_prefix` (including unaligned tails).
    pub miss_tokens: u64,
    /// Pages the tree took over in `insert`, summed over calls.
    pub inserted_pages: u64,
    /// Duplicate pages `insert` released to the pool, summed over calls.
    pub duplicate_pages: u64,
    /// Pages freed by `evict`, summed over calls.
    pub evicted_pages: u64,
    /// Pages the tree holds now.
    pub cached_pages: usize,
    /// Held pages with no lock (can be evicted, leaves first).
    pub evictable_pages: usize,
    /// Held pages under at least one lock.
    pub protected_pages: usize,
    /// Tree nodes now, the root excluded.
    pub nodes: usize,
}

impl CacheMetrics {
    /// Fraction of asked-for tokens that were found, or 0 before any match.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hit_tokens + self.miss_tokens;
        if total == 0 { 0.0 } else { self.hit_tokens as f64 / total as f64 }
    }
}

/// One node visited by a walk, and how many of its pages matched.
#[derive(Debug, Clone, Copy)]
struct PathStep {
    node: u32,
    matched_pages: usize,
}

/// The prefix cache over token ids; see the module doc for the ownership rules.
#[derive(Debug, Clone)]
pub struct RadixCache {
    pool_id: u64,
    page_size: usize,
    arena: Arena,
    /// Unlocked non-root leaves, ordered by (last access, index): the eviction order.
    evictable_leaves: BTreeSet<(u64, u32)>,
    clock: u64,
    cached_pages: usize,
    evictable_pages: usize,
    protected_pages: usize,
    hit_tokens: u64,
    miss_tokens: u64,
    inserted_pages: u64,
    duplicate_pages: u64,
    evicted_pages: u64,
    /// Scratch path reused by walks, so a match or insert does not allocate for it.
    path: Vec<PathStep>,
}

impl RadixCache {
    /// An empty cache for pages of `pool` (it takes the pool's page size, and its
    /// page-moving calls refuse any other pool).
    pub fn new(pool: &PagePool) -> Self {
        Self {
            pool_id: pool.id(),
            page_size: pool.page_size(),
            arena: Arena::new(),
            evictable_leaves: BTreeSet::new(),
            clock: 0,
            cached_pages: 0,
            evictable_pages: 0,
            protected_pages: 0,
            hit_tokens: 0,
            miss_tokens: 0,
            inserted_pages: 0,
            duplicate_pages: 0,
            evicted_pages: 0,
            path: Vec::new(),
        }
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The root node (the empty prefix).
    pub fn root(&self) -> NodeId {
        NodeId::ROOT
    }

    /// Pages the tree holds.
    pub fn cached_pages(&self) -> usize {
        self.cached_pages
    }

    /// Pages that `evict` could free now.
    pub fn evictable_pages(&self) -> usize {
        self.evictable_pages
    }

    /// Counters and gauges.
    pub fn metrics(&self) -> CacheMetrics {
        CacheMetrics {
            hit_tokens: self.hit_tokens,
            miss_tokens: self.miss_tokens,
            inserted_pages: self.inserted_pages,
            duplicate_pages: self.duplicate_pages,
            evicted_pages: self.evicted_pages,
            cached_pages: self.cached_pages,
            evictable_pages: self.evictable_pages,
            protected_pages: self.protected_pages,
            nodes: self.arena.live_count() - 1,
        }
    }

    /// Whether `node` names a live node of this tree.
    pub fn contains_node(&self, node: NodeId) -> bool {
        self.arena.resolve(node).is_some()
    }

    /// The lock count of `node`.
    pub fn lock_count(&self, node: NodeId) -> Result<u32> {
        let index = self.resolve(node)?;
        Ok(self.arena[index].lock_ref)
    }

    /// Protects `node` and its ancestors from eviction (one more lock on each).
    /// Locking the root does nothing.
    pub fn lock(&mut self, node: NodeId) -> Result<()> {
        let index = self.resolve(node)?;
        let mut current = index;
        while current != ROOT {
            let n = &mut self.arena[current];
            if n.lock_ref == 0 {
                self.evictable_pages -= n.pages.len();
                self.protected_pages += n.pages.len();
            }
            n.lock_ref += 1;
            current = n.parent;
        }
        // Only the start of the walk can be a leaf, so only it can leave the LRU set.
        self.sync_lru(index);
        Ok(())
    }

    /// Takes back one lock from `node` and its ancestors. Unlocking a node whose
    /// count is zero is an error and changes nothing. Unlocking the root does nothing.
    pub fn unlock(&mut self, node: NodeId) -> Result<()> {
        let index = self.resolve(node)?;
        if index == ROOT {
            return Ok(());
        }
        // Ancestors are locked at least as often as descendants, so checking the
        // start is enough to know no count on the path goes below zero.
        if self.arena[index].lock_ref == 0 {
            return Err(KvError::LockUnderflow(node));
        }
        let mut current = index;
        while current != ROOT {
            let n = &mut self.arena[current];
            debug_assert!(n.lock_ref > 0, "ancestor less locked than descendant");
            n.lock_ref -= 1;
            if n.lock_ref == 0 {
                self.protected_pages -= n.pages.len();
                self.evictable_pages += n.pages.len();
            }
            current = n.parent;
        }
        self.sync_lru(index);
        Ok(())
    }

    /// A copy of this cache and of its pool, bound to each other (for benchmarks and
    /// what-if simulations). `pool` must be this cache's pool.
    pub fn snapshot(&self, pool: &PagePool) -> Result<(RadixCache, PagePool)> {
        self.check_pool(pool)?;
        let pool = pool.clone();
        let mut cache = self.clone();
        cache.pool_id = pool.id();
        Ok((cache, pool))
    }

    fn resolve(&self, node: NodeId) -> Result<u32> {
        self.arena.resolve(node).ok_or(KvError::StaleNode(node))
    }

    fn check_pool(&self, pool: &PagePool) -> Result<()> {
        if pool.id() == self.pool_id { Ok(()) } else { Err(KvError::WrongPool) }
    }

    /// Advances the logical clock and returns the new time.
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Marks `index` as used at `now`, keeping its place in the LRU set current.
    fn touch(&mut self, index: u32, now: u64) {
        if let Some(key) = self.arena[index].lru_key.take() {
            self.evictable_leaves.remove(&(key, index));
        }
        self.arena[index].last_access = now;
        self.sync_lru(index);
    }
}

#[cfg(test)]
mod tests;

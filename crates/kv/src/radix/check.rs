//! Whole-tree consistency checks and introspection, for tests and debugging.
//! Both walk the entire tree: never call them on a hot path.

use std::collections::BTreeSet;

use super::RadixCache;
use super::node::ROOT;
use crate::pool::{PageId, PagePool, PageState};

impl RadixCache {
    /// Checks every structural invariant of the tree against `pool`:
    /// parent/child links and keys agree, nodes hold whole non-empty pages, every
    /// held page is `Cached` in the pool and held once, the page totals and the
    /// evictable / protected split add up, a node is never locked less than a
    /// descendant nor accessed later than its parent, the LRU set is exactly the
    /// unlocked leaves, and every live node is reachable from the root.
    pub fn check_invariants(&self, pool: &PagePool) -> Result<(), String> {
        if pool.id() != self.pool_id {
            return Err("checked against a pool this cache does not belong to".into());
        }
        let ps = self.page_size;
        let root = &self.arena[ROOT];
        if !root.live || !root.pages.is_empty() || root.lock_ref != 0 || root.lru_key.is_some() {
            return Err("root must be live, empty, unlocked and never evictable".into());
        }

        let mut seen_pages = vec![false; pool.num_pages()];
        let (mut cached, mut evictable, mut protected) = (0, 0, 0);
        let mut expected_lru = BTreeSet::new();
        for (index, node) in self.arena.slots() {
            if !node.live || index == ROOT {
                continue;
            }
            let parent = &self.arena[node.parent];
            if !parent.live {
                return Err(format!("node {index} has a dead parent {}", node.parent));
            }
            if node.pages.is_empty() || node.tokens.len() != node.pages.len() * ps {
                return Err(format!(
                    "node {index} holds {} tokens for {} pages",
                    node.tokens.len(),
                    node.pages.len()
                ));
            }
            if parent.children.get(&node.tokens[..ps]) != Some(&index) {
                return Err(format!("node {index} is not its parent's child under its key"));
            }
            for (key, &child) in &node.children {
                let c = &self.arena[child];
                if !c.live || c.parent != index || c.tokens.get(..ps) != Some(&key[..]) {
                    return Err(format!("node {index} has a bad child link to {child}"));
                }
            }
            if node.parent != ROOT {
                if node.lock_ref > parent.lock_ref {
                    return Err(format!("node {index} is locked more than its parent"));
                }
                if node.last_access > parent.last_access {
                    return Err(format!("node {index} was used after its parent"));
                }
            }
            for &page in &node.pages {
                match pool.state(page) {
                    Some(PageState::Cached) => {}
                    state => return Err(format!("tree page {page} has pool state {state:?}")),
                }
                if std::mem::replace(&mut seen_pages[page.index()], true) {
                    return Err(format!("page {page} is held by two tree nodes"));
                }
            }
            cached += node.pages.len();
            if node.lock_ref == 0 {
                evictable += node.pages.len();
                if node.is_leaf() {
                    expected_lru.insert((node.last_access, index));
                }
            } else {
                protected += node.pages.len();
            }
            let in_set = node.lru_key.is_some_and(|k| k == node.last_access);
            if in_set != (node.lock_ref == 0 && node.is_leaf()) {
                return Err(format!("node {index} has a wrong LRU key {:?}", node.lru_key));
            }
        }

        let counted = (cached, evictable, protected);
        let kept = (self.cached_pages, self.evictable_pages, self.protected_pages);
        if counted != kept || cached != pool.counts().cached {
            return Err(format!(
                "page totals (cached, evictable, protected): nodes say {counted:?}, counters \
                 say {kept:?}, pool says {} cached",
                pool.counts().cached
            ));
        }
        if expected_lru != self.evictable_leaves {
            return Err("the LRU set is not exactly the unlocked leaves".into());
        }
        for &slot in self.arena.free_slots() {
            if self.arena[slot].live {
                return Err(format!("free slot {slot} holds a live node"));
            }
        }
        let reachable = self.count_reachable();
        if reachable != self.arena.live_count() {
            return Err(format!(
                "{reachable} nodes reachable from the root, {} live",
                self.arena.live_count()
            ));
        }
        Ok(())
    }

    /// Every cached page with the full token prefix that ends at it, sorted by
    /// prefix. Quadratic in the depth: for tests and debugging only.
    pub fn cached_prefixes(&self) -> Vec<(Vec<u32>, PageId)> {
        let ps = self.page_size;
        let mut out = Vec::new();
        let mut stack = vec![(ROOT, Vec::new())];
        while let Some((index, prefix)) = stack.pop() {
            let node = &self.arena[index];
            let mut tokens = prefix;
            for (page_tokens, &page) in node.tokens.chunks_exact(ps).zip(&node.pages) {
                tokens.extend_from_slice(page_tokens);
                out.push((tokens.clone(), page));
            }
            stack.extend(node.children.values().map(|&child| (child, tokens.clone())));
        }
        out.sort();
        out
    }

    fn count_reachable(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![ROOT];
        while let Some(index) = stack.pop() {
            count += 1;
            // A cycle would loop forever; bound the walk by the arena size.
            if count > self.arena.live_count() {
                break;
            }
            stack.extend(self.arena[index].children.values().copied());
        }
        count
    }
}

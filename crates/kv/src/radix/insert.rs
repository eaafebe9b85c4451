//! Inserting a sequence's pages into the tree.

use super::node::{Node, ROOT};
use super::{InsertResult, PathStep, RadixCache};
use crate::error::{KvError, Result};
use crate::pool::{Handover, PageId, PagePool};

impl RadixCache {
    /// Inserts a page-aligned token sequence and its pages.
    ///
    /// `tokens.len()` must be `pages.len() * page_size`: only whole pages go in (the
    /// caller keeps or releases the unaligned tail). Each page must be either the
    /// tree's own page for that position (from an earlier match) or a page the
    /// caller owns, each owned page listed once.
    ///
    /// On success every page of the sequence is the tree's: owned pages that
    /// duplicate pages the tree already had are released to `pool`, and `pages` is
    /// rewritten to the tree's pages, so it still lists the sequence's KV. Lock
    /// `last_node` to keep using them. On error nothing changes.
    pub fn insert(
        &mut self,
        tokens: &[u32],
        pages: &mut [PageId],
        pool: &mut PagePool,
    ) -> Result<InsertResult> {
        self.check_pool(pool)?;
        if pages.len().checked_mul(self.page_size) != Some(tokens.len()) {
            return Err(KvError::PageCountMismatch {
                tokens: tokens.len(),
                pages: pages.len(),
                page_size: self.page_size,
            });
        }
        let mut path = std::mem::take(&mut self.path);
        let prefix_pages = self.walk(tokens, &mut path);
        let checked = self.check_insert_pages(&path, pages, pool);
        let result =
            checked.map(|()| self.insert_checked(tokens, pages, pool, &path, prefix_pages));
        self.path = path;
        result
    }

    /// Validates the caller's pages against the walked path, changing nothing.
    fn check_insert_pages(
        &self,
        path: &[PathStep],
        pages: &[PageId],
        pool: &mut PagePool,
    ) -> Result<()> {
        let round = pool.begin_distinct_check();
        let mut next = 0;
        for step in path {
            let tree_pages = &self.arena[step.node].pages[..step.matched_pages];
            for (&tree_page, &page) in tree_pages.iter().zip(&pages[next..]) {
                if page != tree_page {
                    pool.check_owned_once(page, round, Handover::Tree)?;
                }
            }
            next += step.matched_pages;
        }
        pages[next..]
            .iter()
            .try_for_each(|&page| pool.check_owned_once(page, round, Handover::Tree))
    }

    /// The mutating half of `insert`, once everything is known to be valid.
    fn insert_checked(
        &mut self,
        tokens: &[u32],
        pages: &mut [PageId],
        pool: &mut PagePool,
        path: &[PathStep],
        prefix_pages: usize,
    ) -> InsertResult {
        let now = self.tick();
        let mut last = ROOT;
        let mut next = 0;
        let mut duplicates = 0;
        for &step in path {
            last = self.split_if_partial(step);
            self.touch(last, now);
            let tree_pages = &self.arena[last].pages;
            for (mine, &tree_page) in pages[next..].iter_mut().zip(tree_pages) {
                if *mine != tree_page {
                    pool.free_owned(*mine);
                    *mine = tree_page;
                    duplicates += 1;
                }
            }
            next += tree_pages.len();
        }
        debug_assert_eq!(next, prefix_pages);

        let new_pages = pages.len() - prefix_pages;
        if new_pages > 0 {
            last = self.add_leaf(
                last,
                &tokens[prefix_pages * self.page_size..],
                &pages[prefix_pages..],
                now,
            );
            pool.move_owned_to_cache(&pages[prefix_pages..]);
        }
        self.inserted_pages += new_pages as u64;
        self.duplicate_pages += duplicates as u64;
        InsertResult {
            last_node: self.arena.id_of(last),
            prefix_pages,
            new_pages,
            released_duplicates: duplicates,
        }
    }

    /// Hangs a new unlocked leaf holding `tokens` / `pages` under `parent`.
    fn add_leaf(&mut self, parent: u32, tokens: &[u32], pages: &[PageId], now: u64) -> u32 {
        let leaf = self.arena.alloc(Node {
            parent,
            tokens: tokens.to_vec(),
            pages: pages.to_vec(),
            last_access: now,
            ..Node::default()
        });
        let key: Box<[u32]> = tokens[..self.page_size].into();
        let previous = self.arena[parent].children.insert(key, leaf);
        debug_assert!(previous.is_none(), "the walk stopped because no child had this key");
        self.cached_pages += pages.len();
        self.evictable_pages += pages.len();
        // The parent may have been an evictable leaf; now the new leaf is.
        self.sync_lru(parent);
        self.sync_lru(leaf);
        leaf
    }
}

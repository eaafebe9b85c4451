//! Walking the tree: prefix matching and node splits.

use super::node::{Node, ROOT};
use super::{MatchResult, PathStep, PrefixMatch, RadixCache};
use crate::pool::PageId;

impl RadixCache {
    /// Finds the longest cached page-aligned prefix of `tokens`.
    ///
    /// Marks the matched path as just used, and splits the last node if the match
    /// ends inside it, so `last_node` covers exactly the matched pages. The pages
    /// stay the tree's: lock `last_node` before anything can evict (module doc).
    pub fn match_prefix(&mut self, tokens: &[u32]) -> MatchResult {
        let mut pages = Vec::new();
        let found = self.match_prefix_into(tokens, &mut pages);
        MatchResult { pages, matched_tokens: found.matched_tokens, last_node: found.last_node }
    }

    /// [`Self::match_prefix`] that appends the matched pages to `pages` instead of
    /// allocating a new list.
    pub fn match_prefix_into(&mut self, tokens: &[u32], pages: &mut Vec<PageId>) -> PrefixMatch {
        let aligned = tokens.len() - tokens.len() % self.page_size;
        let mut path = std::mem::take(&mut self.path);
        let matched_pages = self.walk(&tokens[..aligned], &mut path);

        let mut last = ROOT;
        if !path.is_empty() {
            let now = self.tick();
            for step in &path {
                last = self.split_if_partial(*step);
                self.touch(last, now);
                pages.extend_from_slice(&self.arena[last].pages);
            }
        }
        self.path = path;

        let matched_tokens = matched_pages * self.page_size;
        self.hit_tokens += matched_tokens as u64;
        self.miss_tokens += (tokens.len() - matched_tokens) as u64;
        PrefixMatch { matched_tokens, last_node: self.arena.id_of(last) }
    }

    /// Tokens of `tokens` the cache holds, without touching access times, splitting
    /// or counting metrics (for scheduling policies that only want to compare).
    pub fn peek_prefix(&self, tokens: &[u32]) -> usize {
        let aligned = tokens.len() - tokens.len() % self.page_size;
        let mut matched_pages = 0;
        self.walk_with(&tokens[..aligned], |step| matched_pages += step.matched_pages);
        matched_pages * self.page_size
    }

    /// Walks from the root along `tokens` (page-aligned), recording every node
    /// visited in `path`; returns the number of pages matched. Read-only.
    pub(super) fn walk(&self, tokens: &[u32], path: &mut Vec<PathStep>) -> usize {
        path.clear();
        let mut matched_pages = 0;
        self.walk_with(tokens, |step| {
            matched_pages += step.matched_pages;
            path.push(step);
        });
        matched_pages
    }

    /// The walk itself: calls `visit` for each node whose pages match (fully, or a
    /// leading part for the last one).
    fn walk_with(&self, tokens: &[u32], mut visit: impl FnMut(PathStep)) {
        let ps = self.page_size;
        debug_assert_eq!(tokens.len() % ps, 0);
        let mut node = ROOT;
        let mut pos = 0;
        while pos < tokens.len() {
            let Some(&child) = self.arena[node].children.get(&tokens[pos..pos + ps]) else {
                break;
            };
            let child_tokens = &self.arena[child].tokens;
            let matched = matching_prefix_len(child_tokens, &tokens[pos..], ps);
            debug_assert!(matched >= ps, "a child's key is its first page");
            visit(PathStep { node: child, matched_pages: matched / ps });
            pos += matched;
            if matched < child_tokens.len() {
                break;
            }
            node = child;
        }
    }

    /// If `step` matched only part of its node, splits the node there and returns
    /// the new node holding the matched part; otherwise returns the node.
    pub(super) fn split_if_partial(&mut self, step: PathStep) -> u32 {
        if step.matched_pages < self.arena[step.node].pages.len() {
            self.split(step.node, step.matched_pages)
        } else {
            step.node
        }
    }

    /// Splits node `index` after its first `pages` pages: a new node takes those
    /// pages and sits between `index` and its parent. `index` keeps its id, so locks
    /// held on it (which name the deeper node) stay valid; the new node inherits its
    /// lock count and access time, which keeps every invariant as it was.
    fn split(&mut self, index: u32, pages: usize) -> u32 {
        let ps = self.page_size;
        let lower = &mut self.arena[index];
        debug_assert!(pages > 0 && pages < lower.pages.len());
        let rest_tokens = lower.tokens.split_off(pages * ps);
        let rest_pages = lower.pages.split_off(pages);
        let upper = Node {
            parent: lower.parent,
            tokens: std::mem::replace(&mut lower.tokens, rest_tokens),
            pages: std::mem::replace(&mut lower.pages, rest_pages),
            lock_ref: lower.lock_ref,
            last_access: lower.last_access,
            ..Node::default()
        };
        let parent = upper.parent;
        // The first page is unchanged, so the parent's key now leads to `upper`.
        let upper_index = self.arena.next_index();
        let slot = self.arena[parent].children.get_mut(&upper.tokens[..ps]);
        debug_assert!(slot.is_some());
        if let Some(slot) = slot {
            *slot = upper_index;
        }
        let upper = self.arena.alloc(upper);
        debug_assert_eq!(upper, upper_index);
        self.arena[index].parent = upper;
        let lower_key: Box<[u32]> = self.arena[index].tokens[..ps].into();
        self.arena[upper].children.insert(lower_key, index);
        upper
    }
}

/// Length of the common prefix of `a` and `b`, in whole pages of `ps` tokens.
///
/// The common case (the whole node matches) is one slice comparison, which compiles
/// to `memcmp`; only a mismatch pays for the page-by-page search.
fn matching_prefix_len(a: &[u32], b: &[u32], ps: usize) -> usize {
    let common = a.len().min(b.len());
    if a[..common] == b[..common] {
        return common;
    }
    let equal_pages = a[..common]
        .chunks_exact(ps)
        .zip(b[..common].chunks_exact(ps))
        .take_while(|(x, y)| x == y)
        .count();
    equal_pages * ps
}

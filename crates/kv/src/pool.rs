//! The page pool: a fixed set of KV pages and who holds each one.
//!
//! A page is `page_size` consecutive token slots of one sequence. The pool does not
//! hold any KV bytes (that is the GPU's job, laid out as [`crate::layout`] says); it
//! hands out page *ids* and tracks the state of every page:
//!
//! * [`PageState::Free`]: on the free list, nobody may read or write it.
//! * [`PageState::Owned`]: allocated to a running request, which must eventually
//!   either [`release`](PagePool::release) it or hand it to the radix tree
//!   ([`crate::RadixCache::insert`]).
//! * [`PageState::Cached`]: held by the radix tree; only the tree frees it (on
//!   eviction, or as a duplicate during insert).
//!
//! Every transition checks the current state, so releasing a page twice, or
//! releasing a page the tree holds, is an error rather than silent corruption.
//! Allocation and release are O(1) per page: the free list is a stack.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{KvError, Result};

/// Largest page size the kernels are built for: the one statement of the limit.
pub const MAX_PAGE_SIZE: usize = 128;

/// Index of one KV page in the pool (and in every per-layer KV tensor).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageId(pub u32);

impl PageId {
    /// The page id as an index into per-page arrays.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for PageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Who holds a page.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    /// On the free list.
    Free,
    /// Allocated to a request.
    Owned,
    /// Held by the radix tree.
    Cached,
}

/// How many pages are in each state. `free + owned + cached == total` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounts {
    /// Pages on the free list.
    pub free: usize,
    /// Pages owned by requests.
    pub owned: usize,
    /// Pages held by the radix tree.
    pub cached: usize,
    /// Pages in the pool.
    pub total: usize,
}

/// Where owned pages are going, for error reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handover {
    /// Back to the free list.
    Release,
    /// Into the radix tree.
    Tree,
}

/// Checks that `page_size` is a power of two in `1..=MAX_PAGE_SIZE`.
pub fn validate_page_size(page_size: usize) -> Result<()> {
    if page_size.is_power_of_two() && page_size <= MAX_PAGE_SIZE {
        Ok(())
    } else {
        Err(KvError::InvalidPageSize(page_size))
    }
}

/// Gives each pool a distinct identity so a radix cache can refuse a foreign pool.
static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// A fixed number of KV pages with O(1) allocation and checked release.
#[derive(Debug)]
pub struct PagePool {
    id: u64,
    page_size: usize,
    states: Vec<PageState>,
    /// Stack of free pages; the top is handed out next.
    free: Vec<PageId>,
    owned: usize,
    cached: usize,
    /// Scratch for duplicate detection: `marks[p] == epoch` means "seen in this call".
    /// Reused across calls so validation never allocates.
    marks: Vec<u32>,
    epoch: u32,
}

impl Clone for PagePool {
    /// A clone is a new, independent pool (with its own identity), starting in the
    /// same state. A radix cache bound to the original refuses the clone; copy them
    /// both together with [`crate::RadixCache::snapshot`].
    fn clone(&self) -> Self {
        Self {
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            page_size: self.page_size,
            states: self.states.clone(),
            free: self.free.clone(),
            owned: self.owned,
            cached: self.cached,
            marks: self.marks.clone(),
            epoch: self.epoch,
        }
    }
}

impl PagePool {
    /// A pool of `num_pages` free pages of `page_size` tokens.
    ///
    /// `page_size` must be a power of two in `1..=MAX_PAGE_SIZE`; `num_pages * page_size` must
    /// fit an `i32` slot index (the kernels take slots as `i32`).
    pub fn new(num_pages: usize, page_size: usize) -> Result<Self> {
        validate_page_size(page_size)?;
        if num_pages == 0 {
            return Err(KvError::InvalidSize {
                what: "num_pages",
                value: num_pages,
                why: "a pool needs at least one page",
            });
        }
        let max_slots = i32::MAX as usize + 1;
        if num_pages.checked_mul(page_size).is_none_or(|slots| slots > max_slots) {
            return Err(KvError::InvalidSize {
                what: "num_pages",
                value: num_pages,
                why: "num_pages * page_size must fit an i32 slot index",
            });
        }
        // Highest id on the bottom of the stack, so a fresh pool hands out 0, 1, 2, ...
        let free = (0..num_pages as u32).rev().map(PageId).collect();
        Ok(Self {
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            page_size,
            states: vec![PageState::Free; num_pages],
            free,
            owned: 0,
            cached: 0,
            marks: vec![0; num_pages],
            epoch: 0,
        })
    }

    /// Tokens per page.
    #[inline]
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the pool.
    #[inline]
    pub fn num_pages(&self) -> usize {
        self.states.len()
    }

    /// Pages on the free list.
    #[inline]
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages in each state.
    pub fn counts(&self) -> PoolCounts {
        PoolCounts {
            free: self.free.len(),
            owned: self.owned,
            cached: self.cached,
            total: self.states.len(),
        }
    }

    /// The state of `page`, or `None` if it is out of range.
    pub fn state(&self, page: PageId) -> Option<PageState> {
        self.states.get(page.index()).copied()
    }

    /// Pages needed to hold `tokens` tokens.
    #[inline]
    pub fn pages_for_tokens(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// Allocates `n` pages to the caller (all or nothing).
    pub fn alloc(&mut self, n: usize) -> Result<Vec<PageId>> {
        let mut pages = Vec::with_capacity(n);
        self.alloc_into(&mut pages, n)?;
        Ok(pages)
    }

    /// Allocates `n` pages and appends them to `out` (all or nothing: on error `out`
    /// is untouched). Does not allocate memory when `out` has room.
    pub fn alloc_into(&mut self, out: &mut Vec<PageId>, n: usize) -> Result<()> {
        if n > self.free.len() {
            return Err(KvError::OutOfPages { wanted: n, free: self.free.len() });
        }
        let start = self.free.len() - n;
        // Hand out the top of the stack in pop order (most recently freed first).
        for &page in self.free[start..].iter().rev() {
            debug_assert_eq!(self.states[page.index()], PageState::Free);
            self.states[page.index()] = PageState::Owned;
        }
        out.extend(self.free[start..].iter().rev());
        self.free.truncate(start);
        self.owned += n;
        Ok(())
    }

    /// Returns pages the caller owns to the free list.
    ///
    /// Validates every page first: an out-of-range page, a free page, a page listed
    /// twice or a page held by the tree is an error and nothing is released.
    pub fn release(&mut self, pages: &[PageId]) -> Result<()> {
        self.check_owned_distinct(pages)?;
        for &page in pages {
            self.set_free(page);
        }
        self.owned -= pages.len();
        Ok(())
    }

    /// Checks that every page is in range, owned by the caller and listed once.
    pub(crate) fn check_owned_distinct(&mut self, pages: &[PageId]) -> Result<()> {
        let round = self.begin_distinct_check();
        pages.iter().try_for_each(|&page| self.check_owned_once(page, round, Handover::Release))
    }

    /// Starts a round of [`Self::check_owned_once`] calls; returns its token.
    pub(crate) fn begin_distinct_check(&mut self) -> u32 {
        self.next_epoch()
    }

    /// Checks that `page` is in range, owned by the caller and not yet seen in this
    /// round (so a page listed twice is caught without allocating a set). The error
    /// names the mistake as the caller made it: releasing a free page is a double
    /// free, handing one to the tree is a use after release.
    pub(crate) fn check_owned_once(
        &mut self,
        page: PageId,
        round: u32,
        to: Handover,
    ) -> Result<()> {
        let state = self.checked_state(page)?;
        match (state, to) {
            (PageState::Owned, _) => {}
            (PageState::Free, Handover::Release) => return Err(KvError::DoubleFree(page)),
            (PageState::Free | PageState::Cached, _) => {
                return Err(KvError::NotOwned { page, state });
            }
        }
        let mark = &mut self.marks[page.index()];
        if *mark == round {
            return Err(match to {
                Handover::Release => KvError::DoubleFree(page),
                Handover::Tree => KvError::DuplicatePage(page),
            });
        }
        *mark = round;
        Ok(())
    }

    /// The state of an in-range page, or `PageOutOfRange`.
    pub(crate) fn checked_state(&self, page: PageId) -> Result<PageState> {
        self.state(page).ok_or(KvError::PageOutOfRange { page, num_pages: self.states.len() })
    }

    /// Starts a new duplicate-detection round; clears the marks on wrap-around.
    fn next_epoch(&mut self) -> u32 {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.marks.fill(0);
            self.epoch = 1;
        }
        self.epoch
    }

    /// Identity used by the radix cache to refuse a foreign pool.
    #[inline]
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Owned -> Cached: the tree takes pages the caller handed it (already validated).
    pub(crate) fn move_owned_to_cache(&mut self, pages: &[PageId]) {
        for &page in pages {
            debug_assert_eq!(self.states[page.index()], PageState::Owned);
            self.states[page.index()] = PageState::Cached;
        }
        self.owned -= pages.len();
        self.cached += pages.len();
    }

    /// Owned -> Free for one already-validated page (an insert duplicate).
    pub(crate) fn free_owned(&mut self, page: PageId) {
        debug_assert_eq!(self.states[page.index()], PageState::Owned);
        self.set_free(page);
        self.owned -= 1;
    }

    /// Cached -> Free: the tree evicts pages it holds.
    pub(crate) fn free_cached(&mut self, pages: &[PageId]) {
        for &page in pages {
            debug_assert_eq!(self.states[page.index()], PageState::Cached);
            self.set_free(page);
        }
        self.cached -= pages.len();
    }

    #[inline]
    fn set_free(&mut self, page: PageId) {
        self.states[page.index()] = PageState::Free;
        self.free.push(page);
    }

    /// Cross-checks the counters, the state array and the free list (for tests).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut counts = [0usize; 3];
        for &state in &self.states {
            counts[state as usize] += 1;
        }
        let [free, owned, cached] = counts;
        if free != self.free.len() || owned != self.owned || cached != self.cached {
            return Err(format!(
                "pool counters disagree with page states: states say free {free} owned {owned} \
                 cached {cached}, counters say free {} owned {} cached {}",
                self.free.len(),
                self.owned,
                self.cached
            ));
        }
        let mut seen = vec![false; self.states.len()];
        for &page in &self.free {
            let i = page.index();
            if i >= self.states.len() || self.states[i] != PageState::Free || seen[i] {
                return Err(format!("free list entry {page} is invalid or repeated"));
            }
            seen[i] = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_validates_arguments() {
        assert_eq!(PagePool::new(4, 3).unwrap_err(), KvError::InvalidPageSize(3));
        assert_eq!(PagePool::new(4, 0).unwrap_err(), KvError::InvalidPageSize(0));
        assert_eq!(PagePool::new(4, 256).unwrap_err(), KvError::InvalidPageSize(256));
        assert!(matches!(PagePool::new(0, 16), Err(KvError::InvalidSize { .. })));
        assert!(matches!(PagePool::new(1 << 28, 16), Err(KvError::InvalidSize { .. })));
        for page_size in [1, 2, 4, 8, 16, 32, 64, 128] {
            assert!(PagePool::new(8, page_size).is_ok());
        }
    }

    #[test]
    fn alloc_release_round_trip() {
        let mut pool = PagePool::new(8, 16).unwrap();
        let a = pool.alloc(3).unwrap();
        assert_eq!(a, vec![PageId(0), PageId(1), PageId(2)]);
        assert_eq!(pool.counts(), PoolCounts { free: 5, owned: 3, cached: 0, total: 8 });
        pool.release(&a[1..]).unwrap();
        // Most recently freed pages come back first.
        let b = pool.alloc(2).unwrap();
        assert_eq!(b, vec![PageId(2), PageId(1)]);
        pool.release(&a[..1]).unwrap();
        pool.release(&b).unwrap();
        assert_eq!(pool.counts().free, 8);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn alloc_is_all_or_nothing() {
        let mut pool = PagePool::new(4, 1).unwrap();
        let mut out = vec![PageId(99)];
        assert_eq!(
            pool.alloc_into(&mut out, 5).unwrap_err(),
            KvError::OutOfPages { wanted: 5, free: 4 }
        );
        assert_eq!(out, vec![PageId(99)]);
        assert_eq!(pool.counts().free, 4);
        pool.alloc_into(&mut out, 4).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(pool.alloc(0).unwrap(), vec![]);
    }

    #[test]
    fn bad_release_leaves_state_unchanged() {
        let mut pool = PagePool::new(4, 16).unwrap();
        let pages = pool.alloc(2).unwrap();
        let before = pool.counts();

        // Listed twice in one call.
        let err = pool.release(&[pages[0], pages[1], pages[0]]).unwrap_err();
        assert_eq!(err, KvError::DoubleFree(pages[0]));
        assert_eq!(pool.counts(), before);

        // Free page.
        let err = pool.release(&[pages[0], PageId(3)]).unwrap_err();
        assert_eq!(err, KvError::DoubleFree(PageId(3)));
        assert_eq!(pool.counts(), before);

        // Out of range.
        let err = pool.release(&[PageId(4)]).unwrap_err();
        assert_eq!(err, KvError::PageOutOfRange { page: PageId(4), num_pages: 4 });

        // Released twice across calls.
        pool.release(&pages).unwrap();
        let after = pool.counts();
        assert_eq!(pool.release(&pages[..1]).unwrap_err(), KvError::DoubleFree(pages[0]));
        assert_eq!(pool.counts(), after);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn cached_pages_cannot_be_released_by_callers() {
        let mut pool = PagePool::new(4, 16).unwrap();
        let pages = pool.alloc(2).unwrap();
        pool.move_owned_to_cache(&pages[..1]);
        let err = pool.release(&pages).unwrap_err();
        assert_eq!(err, KvError::NotOwned { page: pages[0], state: PageState::Cached });
        assert_eq!(pool.counts(), PoolCounts { free: 2, owned: 1, cached: 1, total: 4 });
        pool.free_cached(&pages[..1]);
        pool.release(&pages[1..]).unwrap();
        assert_eq!(pool.counts().free, 4);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn epoch_wrap_clears_marks() {
        let mut pool = PagePool::new(2, 1).unwrap();
        let pages = pool.alloc(2).unwrap();
        pool.epoch = u32::MAX - 1;
        pool.check_owned_distinct(&pages).unwrap();
        pool.check_owned_distinct(&pages).unwrap(); // wraps to 0 -> cleared, epoch 1
        pool.check_owned_distinct(&pages).unwrap();
        assert!(pool.check_owned_distinct(&[pages[0], pages[0]]).is_err());
    }
}

//! The one error type of the crate.
//!
//! Every fallible call validates its whole input before it changes anything, so an
//! `Err` always means "nothing happened": the pool, the tree and the page table are
//! exactly as they were before the call.

use crate::pool::{PageId, PageState};
use crate::radix::NodeId;

/// Result alias used throughout the crate.
pub type Result<T, E = KvError> = std::result::Result<T, E>;

/// Everything that can go wrong in the KV cache core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// `page_size` must be a power of two in `1..=MAX_PAGE_SIZE`.
    #[error("page_size must be a power of two in 1..={max}, got {0}", max = crate::MAX_PAGE_SIZE)]
    InvalidPageSize(usize),

    /// A size argument (pool pages, layout dimension, ...) is zero or too large.
    #[error("invalid {what}: {value} ({why})")]
    InvalidSize {
        /// Which argument.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The rule it broke.
        why: &'static str,
    },

    /// An allocation asked for more pages than are free; nothing was allocated.
    #[error("out of KV pages: wanted {wanted}, only {free} free")]
    OutOfPages {
        /// Pages requested.
        wanted: usize,
        /// Pages free at the time of the call.
        free: usize,
    },

    /// A page id is not below the pool's page count.
    #[error("page {page} is out of range (pool has {num_pages} pages)")]
    PageOutOfRange {
        /// The offending page.
        page: PageId,
        /// Pages in the pool.
        num_pages: usize,
    },

    /// A page was released (or handed over) while it was already free, or it was
    /// listed twice in one call.
    #[error("page {0} released twice (it is already free or listed more than once)")]
    DoubleFree(PageId),

    /// A page listed twice in one hand-over to the tree.
    #[error("page {0} is listed more than once")]
    DuplicatePage(PageId),

    /// A page that the caller does not own was released or handed to the tree: it
    /// is held by the radix tree, or (handed to the tree) it is free: use after release.
    #[error("page {page} is not owned by the caller (its state is {state:?})")]
    NotOwned {
        /// The offending page.
        page: PageId,
        /// Its state in the pool.
        state: PageState,
    },

    /// A call was given a pool other than the one the radix cache was built for.
    #[error("this radix cache belongs to another page pool")]
    WrongPool,

    /// A node id that names no live node (never existed, or evicted since).
    #[error("node {0:?} is not a live node of this radix cache")]
    StaleNode(NodeId),

    /// `unlock` on a node whose lock count is already zero.
    #[error("unlock of node {0:?} whose lock count is already zero")]
    LockUnderflow(NodeId),

    /// `insert` was given a page list whose length does not cover the tokens exactly.
    #[error(
        "insert needs exactly one page per {page_size} tokens: got {tokens} tokens and {pages} pages"
    )]
    PageCountMismatch {
        /// Token count given.
        tokens: usize,
        /// Page count given.
        pages: usize,
        /// The cache's page size.
        page_size: usize,
    },

    /// A page-table row whose page count disagrees with its sequence length.
    #[error("sequence of {seq_len} tokens needs {expected} pages of {page_size}, got {pages}")]
    SeqLenMismatch {
        /// Tokens in KV for the sequence.
        seq_len: usize,
        /// Pages given.
        pages: usize,
        /// Pages the length needs.
        expected: usize,
        /// Page size of the table.
        page_size: usize,
    },

    /// A page-table row with an impossible query length (more new tokens than tokens).
    #[error("query length {q_len} exceeds sequence length {seq_len}")]
    QueryTooLong {
        /// New tokens this step.
        q_len: usize,
        /// Tokens in KV after the step.
        seq_len: usize,
    },

    /// A sparse subset that is empty, unsorted, repeats a page or points past the sequence.
    #[error("invalid page subset: {0}")]
    InvalidSubset(&'static str),

    /// `push_subset` on a builder made without page positions.
    #[error(
        "this page table does not track page positions; build it with PageTableBuilder::with_page_pos"
    )]
    PagePosNotTracked,

    /// A value that must fit an `i32` for upload does not.
    #[error("{what} does not fit in i32")]
    I32Overflow {
        /// Which value.
        what: &'static str,
    },
}

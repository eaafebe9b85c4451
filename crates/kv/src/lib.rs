//! KV cache core of radix-sparse: the page pool, CSR page tables, the radix-tree
//! prefix cache and the KV pool layout. Pure Rust; it knows nothing of GPUs or models.
//!
//! * [`PagePool`]: fixed-size pages of `page_size` tokens, O(1) alloc / release,
//!   and a state per page (free / owned by a request / held by the tree) that turns
//!   double release or release of a page the caller does not own into an error.
//! * [`PageTableBuilder`] / [`PageTable`]: per step, `kv_indptr`, `kv_indices`,
//!   `kv_last_page_len`, `qo_indptr`, the slot mapping of appended tokens and (for
//!   sparse subsets) `page_pos`, as `i32` arrays in reused buffers.
//! * [`RadixCache`]: prefix sharing over token ids at page granularity, with locks
//!   for pages in use and LRU eviction of unlocked leaves. Its module doc,
//!   [`radix`], states who frees which page when.
//! * [`KvGeometry`]: what one page of the pool is (layers, kv heads, page size, head
//!   dim, dtype, key bounds), from which every size derives; the HND layout every kernel
//!   uses is documented in [`layout`].
//! * [`SparsePolicy`] / [`SparseBudget`]: how many pages a sparse decode step keeps.
//!
//! # One request's pages, end to end
//!
//! ```
//! use radix_kv::{PagePool, PageTableBuilder, RadixCache};
//!
//! let mut pool = PagePool::new(64, 4)?;
//! let mut cache = RadixCache::new(&pool);
//! let prompt: Vec<u32> = (0..10).collect();
//!
//! // Admit: reuse the cached prefix, lock it, allocate the rest.
//! let hit = cache.match_prefix(&prompt);
//! cache.lock(hit.last_node)?;
//! let mut pages = hit.pages;
//! let missing = pool.pages_for_tokens(prompt.len()) - pages.len();
//! pool.alloc_into(&mut pages, missing)?;
//!
//! // Every step: one CSR row per sequence (here a prefill of the unmatched tokens).
//! let mut table = PageTableBuilder::new(pool.page_size())?;
//! table.push_seq(&pages, prompt.len(), prompt.len() - hit.matched_tokens)?;
//! assert_eq!(table.table().kv_indptr(), &[0, 3]);
//!
//! // Finish: the tree takes the whole pages, the request frees its tail, then unlocks.
//! let full = prompt.len() / pool.page_size();
//! cache.insert(&prompt[..full * pool.page_size()], &mut pages[..full], &mut pool)?;
//! pool.release(&pages[full..])?;
//! cache.unlock(hit.last_node)?;
//! assert_eq!(cache.match_prefix(&prompt).matched_tokens, 8);
//! # Ok::<(), radix_kv::KvError>(())
//! ```
//!
//! # Testing
//!
//! Unit tests sit beside each module. `tests/radix_model.rs` drives random sequences
//! of admit / generate / insert / finish / abort / match / lock / unlock / evict and
//! invalid calls against a naive reference model, checking every invariant after
//! every step; `fuzz/` runs the same simulator under cargo-fuzz
//! (`RUSTC_BOOTSTRAP=1 cargo fuzz run ops` from this crate's folder). The criterion
//! benchmark `benches/kv.rs` times the per-step calls at serving sizes.

pub mod error;
pub mod layout;
pub mod page_table;
pub mod pool;
pub mod radix;
pub mod sparse;

pub use error::{KvError, Result};
pub use layout::{BOUNDS_EXP_GROUP, KvDtype, KvGeometry, bounds_record_bytes};
pub use page_table::{PageTable, PageTableBuilder};
pub use pool::{MAX_PAGE_SIZE, PageId, PagePool, PageState, PoolCounts, validate_page_size};
pub use radix::{CacheMetrics, InsertResult, MatchResult, NodeId, PrefixMatch, RadixCache};
pub use sparse::{SparseBudget, SparsePolicy};

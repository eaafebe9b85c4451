//! The KV pool layout every kernel uses.
//!
//! Per layer, K and V are two separate tensors of the same shape, **HND**:
//!
//! ```text
//! K[layer], V[layer] : [num_pages, num_kv_heads, page_size, head_dim]   (row-major)
//! element (page, head, slot, dim) at
//!     ((page * num_kv_heads + head) * page_size + slot) * head_dim + dim
//! ```
//!
//! One kv head of one page is a contiguous `page_size × head_dim` block, so decode
//! streams a page of one head with wide, fully coalesced loads and the whole tile of
//! a (page, head) pair is one TMA box. NHD (`[pages, page_size, heads, head_dim]`)
//! would make appends of one token contiguous across heads instead, but appends are
//! a tiny fraction of the traffic; reads dominate. No GPU measurement has overruled
//! HND yet; if one does, only the strides here change.
//!
//! A token's *slot* is `page * page_size + offset` (the slot mapping of
//! [`crate::PageTable`]); slot `s` lives at `page = s / page_size`,
//! `offset = s % page_size`.
//!
//! Per-page key bounds (for sparse paging) sit beside K and V, per layer, one record of
//! `bounds_record_bytes(head_dim)` bytes (272 at head_dim 128) per (page, kv head):
//!
//! ```text
//! KB[layer] : [num_pages, num_kv_heads] records
//! record    : [lo: i8 × head_dim][hi: i8 × head_dim][exp: i8 × ⌈head_dim/8⌉][zeros to 16 B]
//! bound (page, head, dim) = lo|hi[dim] × 2^exp[dim / 8]
//! ```
//!
//! The element-wise min (`lo`, rounded down) and max (`hi`, rounded up) of the page's keys,
//! with a power-of-two scale per 8 dims: the bounds still contain every key, and the
//! scoring pass reads about half the bytes of exact bf16 bounds (272 vs 512 bytes at
//! D = 128). `radix_kernels::kv_append::bounds` encodes and decodes a record.
//!
//! K/V offsets are in elements, not bytes (multiply by `dtype_bytes`); key-bounds
//! offsets are in bytes.

use crate::error::{KvError, Result};
use crate::pool::{PageId, validate_page_size};

/// Bytes of one (page, kv head) key-bounds record for `head_dim` (module doc): lo and hi,
/// then one exponent per 8 dims padded to a multiple of 16 bytes.
pub const fn bounds_record_bytes(head_dim: usize) -> usize {
    2 * head_dim + head_dim.div_ceil(8).next_multiple_of(16)
}

/// Shape of the paged KV pool (see the module doc for the exact layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    num_layers: usize,
    num_pages: usize,
    num_kv_heads: usize,
    page_size: usize,
    head_dim: usize,
    dtype_bytes: usize,
}

impl KvLayout {
    /// Validates and builds a layout. `page_size` must be a power of two in
    /// `1..=128`, `dtype_bytes` one of 1, 2, 4, every other dimension non-zero, and
    /// the whole pool's byte size must fit a `usize`.
    pub fn new(
        num_layers: usize,
        num_pages: usize,
        num_kv_heads: usize,
        page_size: usize,
        head_dim: usize,
        dtype_bytes: usize,
    ) -> Result<Self> {
        validate_page_size(page_size)?;
        for (what, value) in [
            ("num_layers", num_layers),
            ("num_pages", num_pages),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ] {
            if value == 0 {
                return Err(KvError::InvalidSize { what, value, why: "must be at least 1" });
            }
        }
        if !matches!(dtype_bytes, 1 | 2 | 4) {
            return Err(KvError::InvalidSize {
                what: "dtype_bytes",
                value: dtype_bytes,
                why: "must be 1, 2 or 4",
            });
        }
        let total = [num_layers, num_pages, num_kv_heads, page_size, head_dim, dtype_bytes, 2]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x));
        if total.is_none() {
            return Err(KvError::InvalidSize {
                what: "num_pages",
                value: num_pages,
                why: "the pool's byte size overflows usize",
            });
        }
        Ok(Self { num_layers, num_pages, num_kv_heads, page_size, head_dim, dtype_bytes })
    }

    /// The most pages that fit in `budget_bytes` for K and V of all layers (key
    /// bounds not included), or 0 if the dimensions are degenerate.
    pub fn pages_fitting(
        budget_bytes: usize,
        num_layers: usize,
        num_kv_heads: usize,
        page_size: usize,
        head_dim: usize,
        dtype_bytes: usize,
    ) -> usize {
        let per_page = [2, num_layers, num_kv_heads, page_size, head_dim, dtype_bytes]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x));
        match per_page {
            Some(0) | None => 0,
            Some(per_page) => budget_bytes / per_page,
        }
    }

    /// Layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }
    /// Pages per layer tensor.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
    /// KV heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Elements per head vector.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Bytes per element.
    pub fn dtype_bytes(&self) -> usize {
        self.dtype_bytes
    }

    /// Shape of one layer's K (or V) tensor: `[num_pages, num_kv_heads, page_size, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.num_pages, self.num_kv_heads, self.page_size, self.head_dim]
    }

    /// Element strides of one layer's K (or V) tensor, matching [`Self::shape`].
    pub fn strides(&self) -> [usize; 4] {
        let slot = self.head_dim;
        let head = self.page_size * slot;
        let page = self.num_kv_heads * head;
        [page, head, slot, 1]
    }

    /// Elements of one layer's K tensor (V has as many).
    pub fn layer_elems(&self) -> usize {
        self.num_pages * self.strides()[0]
    }

    /// Bytes of one layer's K tensor (V has as many).
    pub fn layer_bytes(&self) -> usize {
        self.layer_elems() * self.dtype_bytes
    }

    /// Bytes one page takes across K and V of all layers.
    pub fn bytes_per_page(&self) -> usize {
        2 * self.num_layers * self.strides()[0] * self.dtype_bytes
    }

    /// Bytes of the whole K and V pool, all layers.
    pub fn total_bytes(&self) -> usize {
        self.bytes_per_page() * self.num_pages
    }

    /// Element offset of `(page, head, slot, dim)` in one layer's K tensor, or `None`
    /// if any index is out of range. Hot loops should use [`Self::strides`] instead.
    pub fn k_offset(&self, page: PageId, head: usize, slot: usize, dim: usize) -> Option<usize> {
        let page = page.index();
        if page >= self.num_pages
            || head >= self.num_kv_heads
            || slot >= self.page_size
            || dim >= self.head_dim
        {
            return None;
        }
        Some(((page * self.num_kv_heads + head) * self.page_size + slot) * self.head_dim + dim)
    }

    /// Element offset in one layer's V tensor: the same as [`Self::k_offset`].
    pub fn v_offset(&self, page: PageId, head: usize, slot: usize, dim: usize) -> Option<usize> {
        self.k_offset(page, head, slot, dim)
    }

    /// Element offset of the first element of token slot `slot` (from a slot mapping)
    /// for kv head `head`, or `None` if out of range.
    pub fn slot_offset(&self, slot: usize, head: usize) -> Option<usize> {
        let page = u32::try_from(slot / self.page_size).ok()?;
        self.k_offset(PageId(page), head, slot % self.page_size, 0)
    }

    /// Bytes of one (page, kv head) key-bounds record (module doc).
    pub fn bounds_record_bytes(&self) -> usize {
        bounds_record_bytes(self.head_dim)
    }

    /// Bytes of one layer's key bounds: a record per (page, kv head).
    pub fn bounds_layer_bytes(&self) -> usize {
        self.num_pages * self.num_kv_heads * self.bounds_record_bytes()
    }

    /// Byte offset of the `(page, head)` record in one layer's key bounds, or `None` if
    /// out of range.
    pub fn bounds_offset(&self, page: PageId, head: usize) -> Option<usize> {
        let page = page.index();
        if page >= self.num_pages || head >= self.num_kv_heads {
            return None;
        }
        Some((page * self.num_kv_heads + head) * self.bounds_record_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama8b(num_pages: usize) -> KvLayout {
        KvLayout::new(32, num_pages, 8, 16, 128, 2).unwrap()
    }

    #[test]
    fn validates_dimensions() {
        assert_eq!(KvLayout::new(1, 1, 1, 3, 1, 2).unwrap_err(), KvError::InvalidPageSize(3));
        assert!(matches!(KvLayout::new(0, 1, 1, 16, 1, 2), Err(KvError::InvalidSize { .. })));
        assert!(matches!(KvLayout::new(1, 1, 1, 16, 0, 2), Err(KvError::InvalidSize { .. })));
        assert!(matches!(KvLayout::new(1, 1, 1, 16, 1, 3), Err(KvError::InvalidSize { .. })));
        assert!(matches!(
            KvLayout::new(usize::MAX / 2, 4, 1, 16, 1, 2),
            Err(KvError::InvalidSize { .. })
        ));
    }

    #[test]
    fn offsets_are_hnd_row_major() {
        let l = llama8b(10);
        assert_eq!(l.shape(), [10, 8, 16, 128]);
        assert_eq!(l.strides(), [8 * 16 * 128, 16 * 128, 128, 1]);
        assert_eq!(l.k_offset(PageId(0), 0, 0, 0), Some(0));
        assert_eq!(l.k_offset(PageId(0), 0, 1, 0), Some(128));
        assert_eq!(l.k_offset(PageId(0), 1, 0, 0), Some(16 * 128));
        assert_eq!(l.k_offset(PageId(1), 0, 0, 0), Some(8 * 16 * 128));
        let [sp, sh, ss, sd] = l.strides();
        assert_eq!(l.k_offset(PageId(9), 7, 15, 127), Some(9 * sp + 7 * sh + 15 * ss + 127 * sd));
        assert_eq!(l.k_offset(PageId(9), 7, 15, 127).unwrap() + 1, l.layer_elems());
        assert_eq!(l.v_offset(PageId(3), 2, 1, 5), l.k_offset(PageId(3), 2, 1, 5));
        assert_eq!(l.k_offset(PageId(10), 0, 0, 0), None);
        assert_eq!(l.k_offset(PageId(0), 8, 0, 0), None);
        assert_eq!(l.k_offset(PageId(0), 0, 16, 0), None);
        assert_eq!(l.k_offset(PageId(0), 0, 0, 128), None);
    }

    #[test]
    fn slot_offsets_follow_slot_mapping() {
        let l = llama8b(10);
        let slot = 3 * 16 + 5;
        assert_eq!(l.slot_offset(slot, 2), l.k_offset(PageId(3), 2, 5, 0));
        assert_eq!(l.slot_offset(10 * 16, 0), None);
    }

    #[test]
    fn sizes_in_bytes() {
        let l = llama8b(1000);
        // Llama-3-8B: 128 KiB per token of KV in bf16, 2 MiB per 16-token page.
        assert_eq!(l.bytes_per_page(), 2 * 32 * 8 * 16 * 128 * 2);
        assert_eq!(l.bytes_per_page() / 16, 128 * 1024);
        assert_eq!(l.total_bytes(), 1000 * l.bytes_per_page());
        assert_eq!(l.layer_bytes() * 2 * 32, l.total_bytes());
        assert_eq!(KvLayout::pages_fitting(l.total_bytes() + 5, 32, 8, 16, 128, 2), 1000);
        assert_eq!(KvLayout::pages_fitting(100, 0, 8, 16, 128, 2), 0);
    }

    #[test]
    fn bounds_layout() {
        let l = llama8b(4);
        assert_eq!(l.bounds_record_bytes(), 272);
        assert_eq!(l.bounds_offset(PageId(0), 0), Some(0));
        assert_eq!(l.bounds_offset(PageId(0), 1), Some(272));
        assert_eq!(l.bounds_offset(PageId(1), 0), Some(8 * 272));
        assert_eq!(l.bounds_offset(PageId(3), 7).map(|o| o + 272), Some(l.bounds_layer_bytes()));
        assert_eq!(l.bounds_offset(PageId(4), 0), None);
    }
}

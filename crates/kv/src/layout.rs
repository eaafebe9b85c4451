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
//! [`bounds_record_bytes`] bytes (272 at head_dim 128) per (page, kv head):
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
//! [`KvGeometry`] describes one page (layers, kv heads, page size, head dim, dtype, key
//! bounds); every byte count of the pool derives from it. K/V offsets are in elements,
//! not bytes (multiply by the dtype's bytes); key-bounds offsets are in bytes.

use crate::error::{KvError, Result};
use crate::pool::{PageId, validate_page_size};

/// Dims that share one power-of-two exponent in a key-bounds record.
pub const BOUNDS_EXP_GROUP: usize = 8;

/// Bytes of one (page, kv head) key-bounds record for `head_dim` (module doc): lo and hi,
/// then one exponent per [`BOUNDS_EXP_GROUP`] dims padded to a multiple of 16 bytes. The
/// one definition: the kernels get it as the `BOUNDS_RECORD_BYTES` define.
pub const fn bounds_record_bytes(head_dim: usize) -> usize {
    2 * head_dim + head_dim.div_ceil(BOUNDS_EXP_GROUP).next_multiple_of(16)
}

/// The element type of a KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// The CPU backend's pool.
    F32,
    BF16,
    F16,
    /// An FP8 cache: e4m3 bytes with a scale per layer for keys and one for values.
    F8E4M3,
}

impl KvDtype {
    /// Bytes per element.
    pub const fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::BF16 | KvDtype::F16 => 2,
            KvDtype::F8E4M3 => 1,
        }
    }
}

/// What one page of the KV pool is: layers, kv heads, tokens per page, head dim, element
/// type, and whether a key-bounds record sits beside each (page, kv head). The one
/// description of the pool's geometry: backends allocate from it, the memory plan sizes
/// the pool with it and the engine counts bytes with it. The page count is not part of
/// it (it is what a memory budget decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    num_layers: usize,
    num_kv_heads: usize,
    page_size: usize,
    head_dim: usize,
    dtype: KvDtype,
    key_bounds: bool,
}

impl KvGeometry {
    /// Validates and builds a geometry: `page_size` a power of two in
    /// `1..=MAX_PAGE_SIZE`, every other dimension non-zero, and one page's bytes must fit
    /// a `usize`.
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        page_size: usize,
        head_dim: usize,
        dtype: KvDtype,
        key_bounds: bool,
    ) -> Result<Self> {
        validate_page_size(page_size)?;
        for (what, value) in
            [("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)]
        {
            if value == 0 {
                return Err(KvError::InvalidSize { what, value, why: "must be at least 1" });
            }
        }
        let page = [2, num_layers, num_kv_heads, page_size, head_dim, dtype.bytes()]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x));
        if page.is_none() {
            return Err(KvError::InvalidSize {
                what: "num_layers",
                value: num_layers,
                why: "one page's byte size overflows usize",
            });
        }
        Ok(Self { num_layers, num_kv_heads, page_size, head_dim, dtype, key_bounds })
    }

    /// Layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
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
    /// Element type of K and V.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }
    /// True when every (page, kv head) keeps a key-bounds record (sparse paging).
    pub fn key_bounds(&self) -> bool {
        self.key_bounds
    }

    /// Shape of one layer's K (or V) tensor: `[num_pages, num_kv_heads, page_size, head_dim]`.
    pub fn shape(&self, num_pages: usize) -> [usize; 4] {
        [num_pages, self.num_kv_heads, self.page_size, self.head_dim]
    }

    /// Element strides of one layer's K (or V) tensor, matching [`Self::shape`].
    pub fn strides(&self) -> [usize; 4] {
        let slot = self.head_dim;
        let head = self.page_size * slot;
        let page = self.num_kv_heads * head;
        [page, head, slot, 1]
    }

    /// Elements of one page of one layer's K tensor (V has as many).
    pub fn page_elems(&self) -> usize {
        self.strides()[0]
    }

    /// Elements of one layer's K tensor of `num_pages` pages (V has as many).
    pub fn layer_elems(&self, num_pages: usize) -> usize {
        num_pages * self.page_elems()
    }

    /// Bytes of one page of one layer: K and V.
    pub fn kv_bytes_per_page_layer(&self) -> usize {
        2 * self.page_elems() * self.dtype.bytes()
    }

    /// Bytes of one (page, kv head) key-bounds record.
    pub fn bounds_record_bytes(&self) -> usize {
        bounds_record_bytes(self.head_dim)
    }

    /// Bytes of one page's key bounds in one layer (0 without key bounds).
    pub fn bounds_bytes_per_page_layer(&self) -> usize {
        if self.key_bounds { self.num_kv_heads * self.bounds_record_bytes() } else { 0 }
    }

    /// Bytes of one layer's key bounds for `num_pages` pages (0 without key bounds).
    pub fn bounds_layer_bytes(&self, num_pages: usize) -> usize {
        num_pages * self.bounds_bytes_per_page_layer()
    }

    /// Bytes one page takes across all layers: K, V and key bounds.
    pub fn bytes_per_page(&self) -> usize {
        self.num_layers * (self.kv_bytes_per_page_layer() + self.bounds_bytes_per_page_layer())
    }

    /// The most pages that fit in `budget_bytes` (key bounds included).
    pub fn pages_fitting(&self, budget_bytes: usize) -> usize {
        budget_bytes / self.bytes_per_page()
    }

    /// Element offset of `(page, head, slot, dim)` in one layer's K tensor, or `None`
    /// if head, slot or dim is out of range (the page count is the pool's). Hot loops
    /// should use [`Self::strides`] instead.
    pub fn k_offset(&self, page: PageId, head: usize, slot: usize, dim: usize) -> Option<usize> {
        if head >= self.num_kv_heads || slot >= self.page_size || dim >= self.head_dim {
            return None;
        }
        let [sp, sh, ss, _] = self.strides();
        Some(page.index() * sp + head * sh + slot * ss + dim)
    }

    /// Element offset of the first element of token slot `slot` (from a slot mapping)
    /// for kv head `head`, or `None` if the head is out of range.
    pub fn slot_offset(&self, slot: usize, head: usize) -> Option<usize> {
        let page = u32::try_from(slot / self.page_size).ok()?;
        self.k_offset(PageId(page), head, slot % self.page_size, 0)
    }

    /// Byte offset of the `(page, head)` record in one layer's key bounds, or `None` if
    /// the head is out of range.
    pub fn bounds_offset(&self, page: PageId, head: usize) -> Option<usize> {
        if head >= self.num_kv_heads {
            return None;
        }
        Some((page.index() * self.num_kv_heads + head) * self.bounds_record_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama8b(key_bounds: bool) -> KvGeometry {
        KvGeometry::new(32, 8, 16, 128, KvDtype::BF16, key_bounds).unwrap()
    }

    #[test]
    fn validates_dimensions() {
        let g = |l, h, ps, d| KvGeometry::new(l, h, ps, d, KvDtype::BF16, false);
        assert_eq!(g(1, 1, 3, 1).unwrap_err(), KvError::InvalidPageSize(3));
        assert!(matches!(g(0, 1, 16, 1), Err(KvError::InvalidSize { .. })));
        assert!(matches!(g(1, 1, 16, 0), Err(KvError::InvalidSize { .. })));
        assert!(matches!(g(usize::MAX / 2, 4, 16, 1), Err(KvError::InvalidSize { .. })));
    }

    #[test]
    fn offsets_are_hnd_row_major() {
        let l = llama8b(false);
        assert_eq!(l.shape(10), [10, 8, 16, 128]);
        assert_eq!(l.strides(), [8 * 16 * 128, 16 * 128, 128, 1]);
        assert_eq!(l.k_offset(PageId(0), 0, 0, 0), Some(0));
        assert_eq!(l.k_offset(PageId(0), 0, 1, 0), Some(128));
        assert_eq!(l.k_offset(PageId(0), 1, 0, 0), Some(16 * 128));
        assert_eq!(l.k_offset(PageId(1), 0, 0, 0), Some(8 * 16 * 128));
        let [sp, sh, ss, sd] = l.strides();
        assert_eq!(l.k_offset(PageId(9), 7, 15, 127), Some(9 * sp + 7 * sh + 15 * ss + 127 * sd));
        assert_eq!(l.k_offset(PageId(9), 7, 15, 127).unwrap() + 1, l.layer_elems(10));
        assert_eq!(l.k_offset(PageId(0), 8, 0, 0), None);
        assert_eq!(l.k_offset(PageId(0), 0, 16, 0), None);
        assert_eq!(l.k_offset(PageId(0), 0, 0, 128), None);
    }

    #[test]
    fn slot_offsets_follow_slot_mapping() {
        let l = llama8b(false);
        let slot = 3 * 16 + 5;
        assert_eq!(l.slot_offset(slot, 2), l.k_offset(PageId(3), 2, 5, 0));
        assert_eq!(l.slot_offset(slot, 8), None);
    }

    #[test]
    fn sizes_in_bytes() {
        let l = llama8b(false);
        // Llama-3-8B: 128 KiB per token of KV in bf16, 2 MiB per 16-token page.
        assert_eq!(l.bytes_per_page(), 2 * 32 * 8 * 16 * 128 * 2);
        assert_eq!(l.bytes_per_page() / 16, 128 * 1024);
        assert_eq!(l.kv_bytes_per_page_layer() * 32, l.bytes_per_page());
        assert_eq!(l.pages_fitting(1000 * l.bytes_per_page() + 5), 1000);
        // The CPU backend's f32 pool takes twice the bytes.
        let f32_pool = KvGeometry::new(32, 8, 16, 128, KvDtype::F32, false).unwrap();
        assert_eq!(f32_pool.bytes_per_page(), 2 * l.bytes_per_page());
        // Key bounds add a record per (page, kv head) and layer.
        let b = llama8b(true);
        assert_eq!(b.bounds_bytes_per_page_layer(), 8 * 272);
        assert_eq!(b.bytes_per_page(), l.bytes_per_page() + 32 * 8 * 272);
        assert_eq!(l.bounds_layer_bytes(4), 0);
    }

    #[test]
    fn bounds_layout() {
        let l = llama8b(true);
        assert_eq!(l.bounds_record_bytes(), 272);
        assert_eq!(bounds_record_bytes(64), 144);
        assert_eq!(bounds_record_bytes(256), 544);
        assert_eq!(l.bounds_offset(PageId(0), 0), Some(0));
        assert_eq!(l.bounds_offset(PageId(0), 1), Some(272));
        assert_eq!(l.bounds_offset(PageId(1), 0), Some(8 * 272));
        assert_eq!(l.bounds_offset(PageId(3), 7).map(|o| o + 272), Some(l.bounds_layer_bytes(4)));
        assert_eq!(l.bounds_offset(PageId(0), 8), None);
    }
}

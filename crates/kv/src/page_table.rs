//! CSR page tables and slot mappings for one engine step, in the form the
//! attention kernels take them (the FlashInfer convention).
//!
//! For a batch of `B` sequences:
//!
//! * `kv_indptr` (`B + 1`, starts at 0, non-decreasing): sequence `b` reads the pages
//!   `kv_indices[kv_indptr[b]..kv_indptr[b + 1]]`, in order.
//! * `kv_indices`: page ids.
//! * `kv_last_page_len` (`B`, each in `1..=page_size`): tokens used in the last
//!   listed page of each sequence. A sequence's length is
//!   `(pages - 1) * page_size + last_page_len` ([`PageTable::seq_len`]).
//! * `qo_indptr` (`B + 1`): sequence `b`'s queries are rows
//!   `qo_indptr[b]..qo_indptr[b + 1]` of the ragged `[total_q, heads, head_dim]`
//!   query tensor. They are the *last* `q_len` tokens of the sequence (the causal
//!   mask is aligned bottom-right). Decode has `q_len == 1`.
//! * `slot_mapping` (one per query token): where the step appends that token's K and
//!   V, `page_id * page_size + offset`.
//! * `page_pos` (optional, one per entry of `kv_indices`): the absolute position of
//!   the first token of each listed page. Sparse tables list a subset of a sequence's
//!   pages, so the kernel cannot infer positions from the index; build those with
//!   [`PageTableBuilder::with_page_pos`] and [`PageTableBuilder::push_subset`].
//!
//! `seq_len` passed to the builder counts the tokens in KV *after* this step's
//! appends (the appended tokens are the last `q_len` of them).
//!
//! The builder keeps its buffers: [`PageTableBuilder::clear`] empties them without
//! freeing, so a steady-state step allocates nothing on the host.

use crate::error::{KvError, Result};
use crate::pool::{PageId, validate_page_size};

/// The CSR arrays of one step, ready to upload as `i32`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    page_size: usize,
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    kv_last_page_len: Vec<i32>,
    qo_indptr: Vec<i32>,
    slot_mapping: Vec<i32>,
    page_pos: Option<Vec<i32>>,
}

impl PageTable {
    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Sequences in the batch.
    pub fn batch_size(&self) -> usize {
        self.kv_last_page_len.len()
    }

    /// `B + 1` offsets into [`Self::kv_indices`].
    pub fn kv_indptr(&self) -> &[i32] {
        &self.kv_indptr
    }

    /// Page ids of all sequences, concatenated.
    pub fn kv_indices(&self) -> &[i32] {
        &self.kv_indices
    }

    /// Tokens used in each sequence's last listed page.
    pub fn kv_last_page_len(&self) -> &[i32] {
        &self.kv_last_page_len
    }

    /// `B + 1` offsets into the ragged query tensor.
    pub fn qo_indptr(&self) -> &[i32] {
        &self.qo_indptr
    }

    /// Slot (`page * page_size + offset`) of every token the step appends, in
    /// query-row order.
    pub fn slot_mapping(&self) -> &[i32] {
        &self.slot_mapping
    }

    /// Absolute position of the first token of each listed page, if tracked.
    pub fn page_pos(&self) -> Option<&[i32]> {
        self.page_pos.as_deref()
    }

    /// Page ids listed for sequence `b`.
    pub fn pages_of(&self, b: usize) -> Option<&[i32]> {
        let start = *self.kv_indptr.get(b)? as usize;
        let end = *self.kv_indptr.get(b + 1)? as usize;
        Some(&self.kv_indices[start..end])
    }

    /// Tokens covered by the pages listed for sequence `b`:
    /// `(pages - 1) * page_size + last_page_len`. For a sparse row this is the
    /// length of the listed subset, not of the whole sequence.
    pub fn seq_len(&self, b: usize) -> Option<usize> {
        let pages = self.pages_of(b)?.len();
        let last = *self.kv_last_page_len.get(b)? as usize;
        Some((pages - 1) * self.page_size + last)
    }

    /// Query tokens of sequence `b` this step.
    pub fn q_len(&self, b: usize) -> Option<usize> {
        let start = *self.qo_indptr.get(b)?;
        let end = *self.qo_indptr.get(b + 1)?;
        Some((end - start) as usize)
    }

    /// Checks the CSR invariants the kernels rely on (for tests and debug builds).
    pub fn check(&self) -> std::result::Result<(), String> {
        let b = self.batch_size();
        if self.kv_indptr.len() != b + 1 || self.qo_indptr.len() != b + 1 {
            return Err(format!(
                "indptr lengths {} / {} for batch {b}",
                self.kv_indptr.len(),
                self.qo_indptr.len()
            ));
        }
        for (name, indptr, total) in [
            ("kv_indptr", &self.kv_indptr, self.kv_indices.len()),
            ("qo_indptr", &self.qo_indptr, self.slot_mapping.len()),
        ] {
            if indptr[0] != 0 || indptr[b] as usize != total {
                return Err(format!("{name} must run from 0 to {total}"));
            }
            if indptr.windows(2).any(|w| w[0] > w[1]) {
                return Err(format!("{name} decreases"));
            }
        }
        for i in 0..b {
            if self.kv_indptr[i] == self.kv_indptr[i + 1] {
                return Err(format!("sequence {i} lists no pages"));
            }
        }
        let ps = self.page_size as i32;
        if let Some(i) = self.kv_last_page_len.iter().position(|&l| l < 1 || l > ps) {
            return Err(format!("kv_last_page_len[{i}] outside 1..={ps}"));
        }
        if self.kv_indices.iter().chain(&self.slot_mapping).any(|&x| x < 0) {
            return Err("negative page id or slot".into());
        }
        if let Some(pos) = &self.page_pos {
            if pos.len() != self.kv_indices.len() {
                return Err("page_pos and kv_indices differ in length".into());
            }
            for i in 0..b {
                let row = &pos[self.kv_indptr[i] as usize..self.kv_indptr[i + 1] as usize];
                if row.windows(2).any(|w| w[0] >= w[1]) || row.iter().any(|&p| p < 0 || p % ps != 0)
                {
                    return Err(format!("page_pos of sequence {i} not increasing page starts"));
                }
            }
        }
        Ok(())
    }
}

/// Builds a [`PageTable`] step after step in the same buffers.
#[derive(Debug, Clone)]
pub struct PageTableBuilder {
    table: PageTable,
    /// `log2(page_size)`: positions split into (page, offset) with shifts.
    page_shift: u32,
}

impl PageTableBuilder {
    /// A builder for dense tables (no `page_pos`).
    pub fn new(page_size: usize) -> Result<Self> {
        Self::build(page_size, false)
    }

    /// A builder that also fills `page_pos`, as sparse tables need.
    pub fn with_page_pos(page_size: usize) -> Result<Self> {
        Self::build(page_size, true)
    }

    fn build(page_size: usize, page_pos: bool) -> Result<Self> {
        validate_page_size(page_size)?;
        Ok(Self {
            table: PageTable {
                page_size,
                kv_indptr: vec![0],
                kv_indices: Vec::new(),
                kv_last_page_len: Vec::new(),
                qo_indptr: vec![0],
                slot_mapping: Vec::new(),
                page_pos: page_pos.then(Vec::new),
            },
            page_shift: page_size.trailing_zeros(),
        })
    }

    /// Reserves room for `batch` sequences, `pages` listed pages and `q_tokens`
    /// query tokens in total, so later steps up to that size never allocate.
    pub fn reserve(&mut self, batch: usize, pages: usize, q_tokens: usize) {
        let t = &mut self.table;
        t.kv_indptr.reserve(batch + 1);
        t.qo_indptr.reserve(batch + 1);
        t.kv_last_page_len.reserve(batch);
        t.kv_indices.reserve(pages);
        t.slot_mapping.reserve(q_tokens);
        if let Some(pos) = &mut t.page_pos {
            pos.reserve(pages);
        }
    }

    /// Empties the table, keeping its buffers.
    pub fn clear(&mut self) {
        let t = &mut self.table;
        t.kv_indptr.truncate(1);
        t.qo_indptr.truncate(1);
        t.kv_indices.clear();
        t.kv_last_page_len.clear();
        t.slot_mapping.clear();
        if let Some(pos) = &mut t.page_pos {
            pos.clear();
        }
    }

    /// The table built so far.
    pub fn table(&self) -> &PageTable {
        &self.table
    }

    /// Adds a sequence that reads all its pages.
    ///
    /// `pages` are the sequence's pages in order, `seq_len` its tokens in KV after
    /// this step (so `pages.len() == ceil(seq_len / page_size)`), `q_len` the tokens
    /// this step appends and queries with (1 for decode, the chunk for prefill).
    /// On error the table is unchanged.
    pub fn push_seq(&mut self, pages: &[PageId], seq_len: usize, q_len: usize) -> Result<()> {
        self.check_seq(pages, seq_len, q_len)?;
        check_page_ids(pages, self.table.page_size)?;
        self.check_totals(pages.len(), q_len)?;

        let last_len = seq_len - ((pages.len() - 1) << self.page_shift);
        let t = &mut self.table;
        t.kv_indices.extend(pages.iter().map(|p| p.0 as i32));
        if let Some(pos) = &mut t.page_pos {
            let ps = t.page_size as i32;
            pos.extend((0..pages.len() as i32).map(|i| i * ps));
        }
        t.kv_last_page_len.push(last_len as i32);
        t.kv_indptr.push(t.kv_indices.len() as i32);
        self.push_queries(pages, seq_len, q_len);
        Ok(())
    }

    /// Adds a sequence that reads only some of its pages (sparse paging).
    ///
    /// `seq_pages` are all the sequence's pages and `seq_len`, `q_len` are as in
    /// [`Self::push_seq`]; `selected` lists the logical page numbers to read,
    /// strictly increasing and non-empty. The row lists `seq_pages[selected[i]]` with
    /// `page_pos` `selected[i] * page_size`; its last page length is the sequence's
    /// if the last page is selected, else a full page. Slots for the appended tokens
    /// come from `seq_pages`, selected or not. On error the table is unchanged.
    pub fn push_subset(
        &mut self,
        seq_pages: &[PageId],
        selected: &[u32],
        seq_len: usize,
        q_len: usize,
    ) -> Result<()> {
        if self.table.page_pos.is_none() {
            return Err(KvError::PagePosNotTracked);
        }
        self.check_seq(seq_pages, seq_len, q_len)?;
        let Some(&last_selected) = selected.last() else {
            return Err(KvError::InvalidSubset("no page selected"));
        };
        if selected.windows(2).any(|w| w[0] >= w[1]) {
            return Err(KvError::InvalidSubset("selected pages must strictly increase"));
        }
        if last_selected as usize >= seq_pages.len() {
            return Err(KvError::InvalidSubset("selected page past the end of the sequence"));
        }
        check_page_ids(seq_pages, self.table.page_size)?;
        self.check_totals(selected.len(), q_len)?;

        let n = seq_pages.len();
        let last_len = if last_selected as usize == n - 1 {
            seq_len - ((n - 1) << self.page_shift)
        } else {
            self.table.page_size
        };
        let t = &mut self.table;
        t.kv_indices.extend(selected.iter().map(|&i| seq_pages[i as usize].0 as i32));
        if let Some(pos) = &mut t.page_pos {
            let shift = self.page_shift;
            pos.extend(selected.iter().map(|&i| (i << shift) as i32));
        }
        t.kv_last_page_len.push(last_len as i32);
        t.kv_indptr.push(t.kv_indices.len() as i32);
        self.push_queries(seq_pages, seq_len, q_len);
        Ok(())
    }

    /// Validates one row's shape: a non-empty sequence whose page count covers
    /// `seq_len` exactly, and no more new tokens than tokens.
    fn check_seq(&self, pages: &[PageId], seq_len: usize, q_len: usize) -> Result<()> {
        let page_size = self.table.page_size;
        let expected = seq_len.div_ceil(page_size);
        if seq_len == 0 || pages.len() != expected {
            return Err(KvError::SeqLenMismatch {
                seq_len,
                pages: pages.len(),
                expected,
                page_size,
            });
        }
        if seq_len > i32::MAX as usize {
            return Err(KvError::I32Overflow { what: "seq_len" });
        }
        if q_len > seq_len {
            return Err(KvError::QueryTooLong { q_len, seq_len });
        }
        Ok(())
    }

    /// Checks that the batch totals still fit `i32` indptr values.
    fn check_totals(&self, new_pages: usize, q_len: usize) -> Result<()> {
        let t = &self.table;
        if t.kv_indices.len() + new_pages > i32::MAX as usize {
            return Err(KvError::I32Overflow { what: "total listed pages" });
        }
        if t.slot_mapping.len() + q_len > i32::MAX as usize {
            return Err(KvError::I32Overflow { what: "total query tokens" });
        }
        Ok(())
    }

    /// Appends the query range and the slots of the last `q_len` tokens.
    fn push_queries(&mut self, pages: &[PageId], seq_len: usize, q_len: usize) {
        let t = &mut self.table;
        let shift = self.page_shift;
        let mask = t.page_size - 1;
        for pos in seq_len - q_len..seq_len {
            let page = pages[pos >> shift].0 as usize;
            t.slot_mapping.push(((page << shift) | (pos & mask)) as i32);
        }
        t.qo_indptr.push(t.slot_mapping.len() as i32);
    }
}

/// Checks that every slot of every page fits an `i32` (one pass, vectorisable).
fn check_page_ids(pages: &[PageId], page_size: usize) -> Result<()> {
    let max = pages.iter().map(|p| p.0).max().unwrap_or(0) as u64;
    if (max + 1) * page_size as u64 - 1 > i32::MAX as u64 {
        return Err(KvError::I32Overflow { what: "page slot index" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[u32]) -> Vec<PageId> {
        raw.iter().copied().map(PageId).collect()
    }

    #[test]
    fn dense_decode_and_prefill_rows() {
        let mut b = PageTableBuilder::new(4).unwrap();
        // Decode: 9 tokens after appending the 9th -> 3 pages, last page holds 1.
        b.push_seq(&ids(&[7, 3, 5]), 9, 1).unwrap();
        // Prefill chunk: 6 tokens in KV, the last 4 are new (a 2-token prefix hit).
        b.push_seq(&ids(&[2, 8]), 6, 4).unwrap();
        let t = b.table();
        t.check().unwrap();
        assert_eq!(t.batch_size(), 2);
        assert_eq!(t.kv_indptr(), &[0, 3, 5]);
        assert_eq!(t.kv_indices(), &[7, 3, 5, 2, 8]);
        assert_eq!(t.kv_last_page_len(), &[1, 2]);
        assert_eq!(t.qo_indptr(), &[0, 1, 5]);
        // Token 8 of seq 0 -> page 5 offset 0; tokens 2..6 of seq 1 -> page 2 off 2,3, page 8 off 0,1.
        assert_eq!(t.slot_mapping(), &[20, 10, 11, 32, 33]);
        assert_eq!(t.seq_len(0), Some(9));
        assert_eq!(t.seq_len(1), Some(6));
        assert_eq!(t.q_len(1), Some(4));
        assert_eq!(t.seq_len(2), None);
        assert_eq!(t.page_pos(), None);
    }

    #[test]
    fn clear_keeps_buffers() {
        let mut b = PageTableBuilder::new(16).unwrap();
        b.reserve(4, 64, 4);
        let pages = ids(&(0..16).collect::<Vec<_>>());
        b.push_seq(&pages, 256, 1).unwrap();
        let cap = b.table().kv_indices.capacity();
        let ptr = b.table().kv_indices.as_ptr();
        b.clear();
        assert_eq!(b.table().batch_size(), 0);
        assert_eq!(b.table().kv_indptr(), &[0]);
        b.push_seq(&pages, 250, 1).unwrap();
        assert_eq!(b.table().kv_indices.capacity(), cap);
        assert_eq!(b.table().kv_indices.as_ptr(), ptr);
        assert_eq!(b.table().kv_last_page_len(), &[10]);
    }

    #[test]
    fn bad_rows_leave_the_table_unchanged() {
        let mut b = PageTableBuilder::with_page_pos(4).unwrap();
        b.push_seq(&ids(&[1, 2]), 8, 2).unwrap();
        let before = b.table().clone();
        let bad = [
            b.push_seq(&ids(&[1, 2]), 9, 1),
            b.push_seq(&ids(&[1, 2]), 4, 1),
            b.push_seq(&[], 0, 0),
            b.push_seq(&ids(&[1]), 3, 4),
            b.push_seq(&ids(&[u32::MAX]), 1, 1),
            b.push_subset(&ids(&[1, 2]), &[], 8, 1),
            b.push_subset(&ids(&[1, 2]), &[1, 0], 8, 1),
            b.push_subset(&ids(&[1, 2]), &[0, 0], 8, 1),
            b.push_subset(&ids(&[1, 2]), &[2], 8, 1),
        ];
        for result in bad {
            assert!(result.is_err());
        }
        assert_eq!(b.table(), &before);
        assert_eq!(PageTableBuilder::new(12).unwrap_err(), KvError::InvalidPageSize(12));
        let mut dense = PageTableBuilder::new(4).unwrap();
        assert_eq!(
            dense.push_subset(&ids(&[1]), &[0], 1, 1).unwrap_err(),
            KvError::PagePosNotTracked
        );
    }

    #[test]
    fn sparse_rows_carry_page_positions() {
        let mut b = PageTableBuilder::with_page_pos(4).unwrap();
        let seq = ids(&[10, 11, 12, 13, 14]); // 18 tokens: last page holds 2
        b.push_subset(&seq, &[0, 2, 4], 18, 1).unwrap();
        b.push_subset(&seq, &[1, 3], 18, 1).unwrap();
        b.push_seq(&seq[..2], 5, 5).unwrap();
        let t = b.table();
        t.check().unwrap();
        assert_eq!(t.kv_indices(), &[10, 12, 14, 11, 13, 10, 11]);
        assert_eq!(t.page_pos().unwrap(), &[0, 8, 16, 4, 12, 0, 4]);
        assert_eq!(t.kv_last_page_len(), &[2, 4, 1]);
        assert_eq!(t.seq_len(0), Some(10));
        // The appended token (position 17) lands in page 14 whether selected or not.
        assert_eq!(t.slot_mapping()[..2], [14 * 4 + 1, 14 * 4 + 1]);
        assert_eq!(t.slot_mapping()[2..], [40, 41, 42, 43, 44]);
    }

    #[test]
    fn page_size_one_and_max() {
        let mut b = PageTableBuilder::new(1).unwrap();
        b.push_seq(&ids(&[4, 9, 2]), 3, 3).unwrap();
        assert_eq!(b.table().kv_last_page_len(), &[1]);
        assert_eq!(b.table().slot_mapping(), &[4, 9, 2]);
        let mut b = PageTableBuilder::new(128).unwrap();
        b.push_seq(&ids(&[3]), 128, 1).unwrap();
        assert_eq!(b.table().kv_last_page_len(), &[128]);
        assert_eq!(b.table().slot_mapping(), &[3 * 128 + 127]);
    }
}

//! The metadata of one attention batch, validated once on the host: query ranges
//! (`qo_indptr`) and where the keys are (contiguous ranges, or pages through a CSR
//! page table).

use radix_gpu::{GpuError, Result};

/// Where K and V live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvSource {
    /// `[total_kv, num_kv_heads, head_dim]` tensors; sequence b owns tokens
    /// `kv_indptr[b]..kv_indptr[b+1]`.
    Contiguous { kv_indptr: Vec<i32> },
    /// The page pool `[num_pages, num_kv_heads, page_size, head_dim]` (HND, see radix-kv)
    /// through a CSR page table: sequence b owns pages
    /// `kv_indices[kv_indptr[b]..kv_indptr[b+1]]` in order, its last page holding
    /// `kv_last_page_len[b]` tokens. The table may list any subset of a sequence's pages.
    ///
    /// With `head_tables`, every kv head of a sequence has its own table (the pages a
    /// sparse selection kept for it): `kv_indptr` has `batch × num_kv_heads + 1` entries,
    /// row `b × num_kv_heads + h` for sequence b's kv head h. All heads of a sequence
    /// list the same number of pages and share `kv_last_page_len[b]`.
    Paged {
        page_size: usize,
        num_pages: usize,
        kv_indptr: Vec<i32>,
        kv_indices: Vec<i32>,
        kv_last_page_len: Vec<i32>,
        head_tables: bool,
    },
}

/// Head counts, head dim, masking and scale: what every layer of a step shares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub num_qo_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// Softmax scale, usually 1/sqrt(head_dim).
    pub scale: f32,
    /// K/V are e4m3 bytes (an FP8 pool, `AttentionBatch::run_fp8`): the plan keeps to the
    /// tiles that read them (no Hopper wgmma kernel).
    pub kv_fp8: bool,
}

impl AttentionShape {
    pub fn new(num_qo_heads: usize, num_kv_heads: usize, head_dim: usize, causal: bool) -> Self {
        let scale = 1.0 / (head_dim as f32).sqrt();
        Self { num_qo_heads, num_kv_heads, head_dim, causal, scale, kv_fp8: false }
    }

    /// The same shape over an FP8 (e4m3) K/V pool.
    pub fn with_fp8_kv(self, kv_fp8: bool) -> Self {
        Self { kv_fp8, ..self }
    }

    pub fn group(&self) -> usize {
        self.num_qo_heads / self.num_kv_heads.max(1)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(GpuError::Invalid(m));
        if self.num_qo_heads == 0 || self.num_kv_heads == 0 {
            return bad("attention needs at least one query and one kv head".into());
        }
        if !self.num_qo_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_qo_heads {} is not a multiple of num_kv_heads {}",
                self.num_qo_heads, self.num_kv_heads
            ));
        }
        if self.head_dim != 64 && self.head_dim != 128 {
            return bad(format!("head_dim {} is not supported (64 or 128)", self.head_dim));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("softmax scale {} must be positive and finite", self.scale));
        }
        Ok(())
    }
}

/// Validated batch metadata with the per-sequence lengths derived from it.
#[derive(Clone, Debug)]
pub struct BatchMeta {
    pub qo_indptr: Vec<i32>,
    pub kv: KvSource,
    pub q_lens: Vec<usize>,
    pub kv_lens: Vec<usize>,
}

impl BatchMeta {
    /// The keys a query row attends, averaged over the batch's rows (causal: aligned
    /// bottom-right, row i of q attending kv - q + i + 1 keys).
    pub fn mean_keys_per_row(&self, causal: bool) -> f64 {
        let (mut keys, mut rows) = (0f64, 0f64);
        for (&q, &kv) in self.q_lens.iter().zip(&self.kv_lens) {
            let (q, kv) = (q as f64, kv as f64);
            keys += if causal { q * (kv - (q - 1.0) / 2.0).max(0.0) } else { q * kv };
            rows += q;
        }
        if rows == 0.0 { 0.0 } else { keys / rows }
    }

    pub fn new(qo_indptr: Vec<i32>, kv: KvSource, causal: bool) -> Result<Self> {
        let q_lens = lengths("qo_indptr", &qo_indptr)?;
        let batch = q_lens.len();
        let kv_lens = match &kv {
            KvSource::Contiguous { kv_indptr } => {
                check_batch("kv_indptr", kv_indptr, batch)?;
                lengths("kv_indptr", kv_indptr)?
            }
            KvSource::Paged {
                page_size,
                num_pages,
                kv_indptr,
                kv_indices,
                kv_last_page_len,
                head_tables,
            } => {
                if let Err(e) = radix_kv::validate_page_size(*page_size) {
                    return invalid(e.to_string());
                }
                let rows = kv_indptr.len().saturating_sub(1);
                let heads = if *head_tables && batch > 0 { rows / batch } else { 1 };
                check_batch("kv_indptr", kv_indptr, batch * heads)?;
                let all = lengths("kv_indptr", kv_indptr)?;
                let mut pages = Vec::with_capacity(batch);
                for b in 0..batch {
                    let row = &all[b * heads..(b + 1) * heads];
                    if row.iter().any(|&n| n != row[0]) {
                        return invalid(format!(
                            "sequence {b}: its kv heads' page tables differ in length {row:?}"
                        ));
                    }
                    pages.push(row[0]);
                }
                let total = *kv_indptr.last().unwrap() as usize;
                if kv_indices.len() != total {
                    return invalid(format!(
                        "kv_indices has {} entries but kv_indptr ends at {total}",
                        kv_indices.len()
                    ));
                }
                if let Some(bad) = kv_indices.iter().find(|&&p| p < 0 || p as usize >= *num_pages) {
                    return invalid(format!("page id {bad} outside the pool of {num_pages} pages"));
                }
                if kv_last_page_len.len() != batch {
                    return invalid(format!(
                        "kv_last_page_len has {} entries for a batch of {batch}",
                        kv_last_page_len.len()
                    ));
                }
                let mut lens = Vec::with_capacity(batch);
                for (b, (&n, &last)) in pages.iter().zip(kv_last_page_len).enumerate() {
                    if n == 0 {
                        lens.push(0);
                        continue;
                    }
                    if last < 1 || last as usize > *page_size {
                        return invalid(format!(
                            "kv_last_page_len[{b}] = {last} is outside 1..={page_size}"
                        ));
                    }
                    lens.push((n - 1) * page_size + last as usize);
                }
                lens
            }
        };
        for b in 0..batch {
            if q_lens[b] > 0 && kv_lens[b] == 0 {
                return invalid(format!("sequence {b} has {} queries but no keys", q_lens[b]));
            }
            if causal && q_lens[b] > kv_lens[b] {
                return invalid(format!(
                    "sequence {b}: {} queries but {} keys; under a causal mask the queries are \
                     the last tokens of the keys, so q_len <= kv_len",
                    q_lens[b], kv_lens[b]
                ));
            }
            if kv_lens[b] > i32::MAX as usize / 2 {
                return invalid(format!("sequence {b} has {} keys, too many", kv_lens[b]));
            }
        }
        Ok(Self { qo_indptr, kv, q_lens, kv_lens })
    }

    pub fn batch(&self) -> usize {
        self.q_lens.len()
    }

    pub fn total_q(&self) -> usize {
        *self.qo_indptr.last().unwrap() as usize
    }
}

fn invalid<T>(msg: String) -> Result<T> {
    Err(GpuError::Invalid(msg))
}

fn check_batch(name: &str, indptr: &[i32], batch: usize) -> Result<()> {
    if indptr.len() != batch + 1 {
        return invalid(format!("{name} has {} entries for a batch of {batch}", indptr.len()));
    }
    Ok(())
}

/// Per-sequence lengths of a CSR `indptr`: starts at 0, never decreases.
fn lengths(name: &str, indptr: &[i32]) -> Result<Vec<usize>> {
    if indptr.len() < 2 {
        return invalid(format!(
            "{name} needs at least 2 entries (a batch of one), got {}",
            indptr.len()
        ));
    }
    if indptr[0] != 0 {
        return invalid(format!("{name} must start at 0, starts at {}", indptr[0]));
    }
    indptr
        .windows(2)
        .enumerate()
        .map(|(b, w)| {
            if w[1] < w[0] {
                invalid(format!("{name} decreases at {b}: {} then {}", w[0], w[1]))
            } else {
                Ok((w[1] - w[0]) as usize)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paged(indptr: Vec<i32>, indices: Vec<i32>, last: Vec<i32>) -> KvSource {
        KvSource::Paged {
            page_size: 16,
            num_pages: 8,
            kv_indptr: indptr,
            kv_indices: indices,
            kv_last_page_len: last,
            head_tables: false,
        }
    }

    #[test]
    fn derives_lengths() {
        let m =
            BatchMeta::new(vec![0, 3, 4], paged(vec![0, 2, 3], vec![5, 1, 7], vec![4, 16]), true)
                .unwrap();
        assert_eq!(m.q_lens, vec![3, 1]);
        assert_eq!(m.kv_lens, vec![20, 16]);
        assert_eq!(m.total_q(), 4);
        // Causal, aligned bottom-right: rows attend 18, 19, 20 and 16 keys.
        assert_eq!(m.mean_keys_per_row(true), 73.0 / 4.0);
        assert_eq!(m.mean_keys_per_row(false), 76.0 / 4.0);
    }

    #[test]
    fn rejects_bad_metadata_with_clear_errors() {
        let cases: Vec<(Vec<i32>, KvSource, &str)> = vec![
            (vec![1, 2], KvSource::Contiguous { kv_indptr: vec![0, 2] }, "start at 0"),
            (vec![0, 2, 1], KvSource::Contiguous { kv_indptr: vec![0, 2, 4] }, "decreases"),
            (vec![0, 2], KvSource::Contiguous { kv_indptr: vec![0, 2, 4] }, "entries for a batch"),
            (vec![0, 3], KvSource::Contiguous { kv_indptr: vec![0, 2] }, "q_len <= kv_len"),
            (vec![0, 1], KvSource::Contiguous { kv_indptr: vec![0, 0] }, "no keys"),
            (vec![0, 1], paged(vec![0, 1], vec![9], vec![1]), "outside the pool"),
            (vec![0, 1], paged(vec![0, 1], vec![1], vec![17]), "outside 1..=16"),
            (vec![0, 1], paged(vec![0, 2], vec![1], vec![1]), "kv_indices has"),
            (vec![0], KvSource::Contiguous { kv_indptr: vec![0] }, "at least 2"),
        ];
        for (qo, kv, want) in cases {
            let err = BatchMeta::new(qo, kv, true).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let shape = AttentionShape::new(32, 5, 128, true);
        assert!(shape.validate().unwrap_err().to_string().contains("multiple"));
        assert!(AttentionShape::new(8, 8, 96, true).validate().is_err());
    }
}

//! f64 CPU reference of attention over a batch, for tests: the same layouts and masking
//! as the kernel, computed the plain way (scores, softmax, weighted sum).

use radix_gpu::Element;

use super::batch::{AttentionShape, BatchMeta, KvSource};

/// Output `[total_q, num_qo_heads, head_dim]` and natural-log LSE `[total_q, num_qo_heads]`.
pub struct Reference {
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
}

/// One output row: (global token, query head, output, lse).
type Row = (usize, usize, Vec<f64>, f64);

/// Element offset of key `key` of sequence `b`, kv head `kvh`.
fn kv_offset(shape: &AttentionShape, meta: &BatchMeta, b: usize, kvh: usize, key: usize) -> usize {
    let d = shape.head_dim;
    match &meta.kv {
        KvSource::Contiguous { kv_indptr } => {
            ((kv_indptr[b] as usize + key) * shape.num_kv_heads + kvh) * d
        }
        KvSource::Paged { page_size, kv_indptr, kv_indices, head_tables, .. } => {
            let row = if *head_tables { b * shape.num_kv_heads + kvh } else { b };
            let page = kv_indices[kv_indptr[row] as usize + key / page_size] as usize;
            ((page * shape.num_kv_heads + kvh) * page_size + key % page_size) * d
        }
    }
}

/// Computes attention in f64, spreading (sequence, head) pairs over the CPU's threads.
pub fn attention_reference<T: Element>(
    shape: &AttentionShape,
    meta: &BatchMeta,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Reference {
    let (hq, d) = (shape.num_qo_heads, shape.head_dim);
    let total_q = meta.total_q();
    let mut o = vec![0.0; total_q * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; total_q * hq];
    let jobs: Vec<(usize, usize)> =
        (0..meta.batch()).flat_map(|b| (0..hq).map(move |h| (b, h))).collect();
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).min(32);
    let results: Vec<Vec<Row>> = std::thread::scope(|scope| {
        let chunks: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(threads).max(1))
            .map(|chunk| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for &(b, h) in chunk {
                        for (t, row, l) in one_head(shape, meta, q, k, v, b, h) {
                            out.push((t, h, row, l));
                        }
                    }
                    out
                })
            })
            .collect();
        chunks.into_iter().map(|c| c.join().expect("reference thread panicked")).collect()
    });
    for (t, h, row, l) in results.into_iter().flatten() {
        o[(t * hq + h) * d..(t * hq + h + 1) * d].copy_from_slice(&row);
        lse[t * hq + h] = l;
    }
    Reference { o, lse }
}

/// (global token index, output row, lse) for every query token of sequence b, head h.
fn one_head<T: Element>(
    shape: &AttentionShape,
    meta: &BatchMeta,
    q: &[T],
    k: &[T],
    v: &[T],
    b: usize,
    h: usize,
) -> Vec<(usize, Vec<f64>, f64)> {
    let (hq, d) = (shape.num_qo_heads, shape.head_dim);
    let kvh = h / shape.group();
    let (q_len, kv_len) = (meta.q_lens[b], meta.kv_lens[b]);
    let q_start = meta.qo_indptr[b] as usize;
    let keys: Vec<usize> = (0..kv_len).map(|j| kv_offset(shape, meta, b, kvh, j)).collect();
    let mut out = Vec::with_capacity(q_len);
    let mut scores = vec![0.0f64; kv_len];
    for t in 0..q_len {
        let qrow: Vec<f64> =
            q[((q_start + t) * hq + h) * d..][..d].iter().map(|x| x.to_f64()).collect();
        let visible = if shape.causal { kv_len - q_len + t + 1 } else { kv_len };
        let mut max = f64::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate().take(visible) {
            let krow = &k[keys[j]..keys[j] + d];
            *s = shape.scale as f64
                * qrow.iter().zip(krow).map(|(a, b)| a * b.to_f64()).sum::<f64>();
            max = max.max(*s);
        }
        let mut denom = 0.0;
        let mut row = vec![0.0; d];
        for (j, s) in scores.iter().enumerate().take(visible) {
            let p = (s - max).exp();
            denom += p;
            for (acc, x) in row.iter_mut().zip(&v[keys[j]..keys[j] + d]) {
                *acc += p * x.to_f64();
            }
        }
        row.iter_mut().for_each(|x| *x /= denom);
        out.push((q_start + t, row, max + denom.ln()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_key_returns_its_value_and_uniform_keys_average() {
        let shape = AttentionShape::new(1, 1, 64, true);
        let meta = BatchMeta::new(vec![0, 1], KvSource::Contiguous { kv_indptr: vec![0, 1] }, true)
            .unwrap();
        let q = vec![1.0f32; 64];
        let v: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let r = attention_reference(&shape, &meta, &q, &q, &v);
        assert_eq!(r.o, v.iter().map(|&x| x as f64).collect::<Vec<_>>());
        // Two keys with equal scores: the output is the mean of their values, lse = s + ln 2.
        let meta2 =
            BatchMeta::new(vec![0, 1], KvSource::Contiguous { kv_indptr: vec![0, 2] }, false)
                .unwrap();
        let k2 = vec![0.0f32; 128];
        let v2: Vec<f32> = (0..128).map(|i| if i < 64 { 0.0 } else { 2.0 }).collect();
        let r2 = attention_reference(&AttentionShape::new(1, 1, 64, false), &meta2, &q, &k2, &v2);
        assert!(r2.o.iter().all(|&x| (x - 1.0).abs() < 1e-12));
        assert!((r2.lse[0] - 2f64.ln()).abs() < 1e-12);
    }
}

//! f64 CPU reference of the append (RoPE on q and k, K/V written to their slots) and of
//! the key bounds.

use radix_gpu::Element;

use super::{PoolShape, bounds};
use crate::rope::rotate_head;

/// Returns (q_out, k_pool, v_pool) after appending into copies of the given pools.
pub fn append_reference<T: Element>(
    shape: &PoolShape,
    qkv: &[T],
    positions: &[i32],
    slots: &[i32],
    inv_freq: &[f32],
    k_pool: &[T],
    v_pool: &[T],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (hq, hkv, d, ps) =
        (shape.num_qo_heads(), shape.num_kv_heads(), shape.head_dim(), shape.page_size());
    let row = shape.qkv_row();
    let mut q_out = vec![0.0; positions.len() * hq * d];
    let mut k: Vec<f64> = k_pool.iter().map(|x| x.to_f64()).collect();
    let mut v: Vec<f64> = v_pool.iter().map(|x| x.to_f64()).collect();
    for (t, (&pos, &slot)) in positions.iter().zip(slots).enumerate() {
        let (page, off) = (slot as usize / ps, slot as usize % ps);
        let head = |h: usize| -> Vec<f64> {
            qkv[t * row + h * d..][..d].iter().map(|x| x.to_f64()).collect()
        };
        for h in 0..hq {
            let mut x = head(h);
            rotate_head(&mut x, pos as usize, inv_freq);
            q_out[(t * hq + h) * d..][..d].copy_from_slice(&x);
        }
        for kh in 0..hkv {
            let dst = ((page * hkv + kh) * ps + off) * d;
            let mut x = head(hq + kh);
            rotate_head(&mut x, pos as usize, inv_freq);
            k[dst..dst + d].copy_from_slice(&x);
            v[dst..dst + d].copy_from_slice(&head(hq + hkv + kh));
        }
    }
    (q_out, k, v)
}

/// The stored key-bounds record (`bounds::encode`) of the keys `[filled, head_dim]` of one
/// page and kv head: their element-wise min and max, rounded outward to int8.
pub fn key_bounds_record<T: Element>(keys: &[T], head_dim: usize) -> Vec<u8> {
    // As the kernel: start from the first key, then f32::min/max, which skip NaN as
    // fminf/fmaxf do. Keys are f16/bf16 values, exact in f32.
    let mut keys = keys.chunks(head_dim).map(|k| k.iter().map(|x| x.to_f64() as f32));
    let mut lo: Vec<f32> = keys.next().map(|k| k.collect()).unwrap_or(vec![0.0; head_dim]);
    let mut hi = lo.clone();
    for key in keys {
        for ((l, h), x) in lo.iter_mut().zip(hi.iter_mut()).zip(key) {
            *l = l.min(x);
            *h = h.max(x);
        }
    }
    let mut record = vec![0u8; radix_kv::bounds_record_bytes(head_dim)];
    bounds::encode(&lo, &hi, &mut record);
    record
}

/// The per-page key bounds (Quest's) that scoring uses for the keys `[filled, head_dim]`
/// of one page and kv head: the stored record decoded, `(lo, hi)` in f64. They contain
/// the keys' element-wise min and max (rounded outward, see `bounds`).
pub fn key_bounds_reference<T: Element>(keys: &[T], head_dim: usize) -> (Vec<f64>, Vec<f64>) {
    bounds::decode(&key_bounds_record(keys, head_dim), head_dim)
}

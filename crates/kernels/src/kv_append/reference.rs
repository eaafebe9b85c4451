//! f64 CPU reference of the append (RoPE on q and k, K/V written to their slots) and of
//! the key bounds.

use radix_gpu::Element;

use super::PoolShape;
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
        (shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, shape.page_size);
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

/// Element-wise min and max of the keys `[filled, head_dim]` of one page and kv head:
/// the per-page key bounds (Quest's), in f64 (exact copies of the keys).
pub fn key_bounds_reference<T: Element>(keys: &[T], head_dim: usize) -> (Vec<f64>, Vec<f64>) {
    let mut lo = vec![f64::INFINITY; head_dim];
    let mut hi = vec![f64::NEG_INFINITY; head_dim];
    for key in keys.chunks(head_dim) {
        for ((l, h), x) in lo.iter_mut().zip(hi.iter_mut()).zip(key) {
            *l = l.min(x.to_f64());
            *h = h.max(x.to_f64());
        }
    }
    (lo, hi)
}

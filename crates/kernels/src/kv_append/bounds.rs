//! The stored form of the per-page key bounds: int8, rounded outward, with a power-of-two
//! scale per 8 dims. `key_bounds` (kv_append.cu) writes it and `page_scores`
//! (sparse.cu) reads it; this is its CPU twin, to the bit.
//!
//! One record per (page, kv head), `radix_kv::bounds_record_bytes(head_dim)` bytes:
//!
//! ```text
//! [lo: i8 × D][hi: i8 × D][exp: i8 × ceil(D/8)][zero padding to a multiple of 16 bytes]
//! bound value = q × 2^exp[d / 8]
//! ```
//!
//! `lo` is rounded down and `hi` up, so the decoded bounds contain every finite key and
//! Quest's score stays an upper bound of q·k. The record is 272 bytes for D = 128, about
//! half of the exact bf16 min/max (512): the scoring pass reads half the bytes. A group's
//! exponent is the smallest that fits its largest finite magnitude `amax` in ±127, so a
//! bound moves by less than one step, `max(amax / 63.5, 2^-126)`; the 8 dims of a group
//! are neighbours under RoPE (the same frequency band), so their magnitudes are alike.
//! NaN keys are skipped (as fminf/fmaxf skip them); a dim whose min or max is infinite is
//! not bounded (it takes the widest value, -128 / 127, at the scale of the group's finite
//! values).

// The record's size and exponent group are the pool geometry's (radix-kv), shared with
// the kernels through the `BOUNDS_RECORD_BYTES` define.
use radix_kv::{BOUNDS_EXP_GROUP as EXP_GROUP, bounds_record_bytes as record_bytes};

/// Exponents are kept where `2^e` and `2^-e` are normal f32.
const EXP_MIN: i32 = -126;
const EXP_MAX: i32 = 126;

/// The smallest exponent `e` in `[EXP_MIN, EXP_MAX]` with `amax <= 127 · 2^e`
/// (`EXP_MIN` for 0 or NaN, `EXP_MAX` for infinity).
pub fn group_exponent(amax: f32) -> i32 {
    if amax.is_nan() || amax <= 0.0 {
        return EXP_MIN;
    }
    if amax.is_infinite() {
        return EXP_MAX;
    }
    // amax = 1.m × 2^(E - 127) < 2^(E - 126), so 2^(E - 133) × 128 > amax; one step
    // above that when 127 × 2^(E - 133) falls short. Subnormals take the minimum.
    let biased = ((amax.to_bits() >> 23) & 0xff) as i32;
    let mut e = biased - 133;
    if e >= EXP_MIN && amax > 127.0 * pow2(e) {
        e += 1;
    }
    e.clamp(EXP_MIN, EXP_MAX)
}

/// `2^e` for `e` in `[EXP_MIN, EXP_MAX]` (exact).
pub fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// `x / 2^e` rounded down (`up == false`) or up, saturated to i8. A non-finite value
/// (a NaN min/max: every key of the dim NaN; or an infinite one) takes the widest
/// (-128 or 127). A nonzero value never rounds to 0, even if the
/// quotient underflows.
fn quantize(x: f32, e: i32, up: bool) -> i8 {
    if !x.is_finite() {
        return if up { 127 } else { -128 };
    }
    let y = x * pow2(-e);
    let mut r = if up { y.ceil() } else { y.floor() };
    if r == 0.0 && !up && x < 0.0 {
        r = -1.0;
    }
    if r == 0.0 && up && x > 0.0 {
        r = 1.0;
    }
    r.clamp(-128.0, 127.0) as i8
}

/// `|x|` if finite, else 0 (the exponent follows the finite values only).
fn finite_abs(x: f32) -> f32 {
    if x.is_finite() { x.abs() } else { 0.0 }
}

/// Encodes the exact element-wise `lo`/`hi` of a page's keys (`head_dim` each) into `out`
/// (`radix_kv::bounds_record_bytes(head_dim)` bytes).
pub fn encode(lo: &[f32], hi: &[f32], out: &mut [u8]) {
    let d = lo.len();
    assert!(
        d == hi.len() && out.len() == record_bytes(d),
        "key bounds of {d} and {} dims into {} bytes",
        hi.len(),
        out.len()
    );
    out.fill(0);
    for g in 0..d.div_ceil(EXP_GROUP) {
        let dims = g * EXP_GROUP..((g + 1) * EXP_GROUP).min(d);
        let amax =
            dims.clone().fold(0.0f32, |m, j| m.max(finite_abs(lo[j])).max(finite_abs(hi[j])));
        let e = group_exponent(amax);
        out[2 * d + g] = e as i8 as u8;
        for j in dims {
            out[j] = quantize(lo[j], e, false) as u8;
            out[d + j] = quantize(hi[j], e, true) as u8;
        }
    }
}

/// The bounds a record stands for: `(lo, hi)`, `head_dim` values each.
pub fn decode(record: &[u8], head_dim: usize) -> (Vec<f64>, Vec<f64>) {
    let d = head_dim;
    assert_eq!(record.len(), record_bytes(d), "a key-bounds record of {d} dims");
    let value = |j: usize, b: u8| {
        let e = record[2 * d + j / EXP_GROUP] as i8 as i32;
        (b as i8) as f64 * (e as f64).exp2()
    };
    (
        (0..d).map(|j| value(j, record[j])).collect(),
        (0..d).map(|j| value(j, record[d + j])).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponents_fit_the_largest_magnitude_tightly() {
        for amax in [1.0f32, 127.0, 127.5, 128.0, 0.3, 3.0e-5, 1.0e30, f32::MAX] {
            let e = group_exponent(amax);
            assert!(amax <= 127.0 * pow2(e), "{amax}: e {e}");
            assert!(amax > 127.0 * pow2(e - 1), "{amax}: e {e} is not the smallest");
        }
        assert_eq!(group_exponent(127.0), 0);
        assert_eq!(group_exponent(127.5), 1);
        assert_eq!(group_exponent(0.0), EXP_MIN);
        assert_eq!(group_exponent(f32::NAN), EXP_MIN);
        assert_eq!(group_exponent(1.0e-42), EXP_MIN); // subnormal
        assert_eq!(group_exponent(f32::INFINITY), EXP_MAX);
    }

    #[test]
    fn decoded_bounds_contain_the_exact_ones_and_stay_close() {
        let d = 64;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        };
        for scale in [1.0f32, 1.0e-3, 300.0, 1.0e-39] {
            let lo: Vec<f32> = (0..d).map(|j| next() * scale * (1 + j % 5) as f32).collect();
            let hi: Vec<f32> = lo.iter().map(|&l| l + next().abs() * scale).collect();
            let mut rec = vec![0xAAu8; record_bytes(d)];
            encode(&lo, &hi, &mut rec);
            assert!(rec[2 * d + d / EXP_GROUP..].iter().all(|&b| b == 0), "padding is zeroed");
            let (dlo, dhi) = decode(&rec, d);
            for g in 0..d / EXP_GROUP {
                let dims = g * EXP_GROUP..(g + 1) * EXP_GROUP;
                let amax = dims.clone().fold(0.0f32, |m, j| m.max(lo[j].abs()).max(hi[j].abs()));
                for j in dims {
                    assert!(dlo[j] <= lo[j] as f64 && dhi[j] >= hi[j] as f64, "dim {j}");
                    // One step of the scale at most, and that is under amax / 63.5
                    // (or the smallest step, for subnormal inputs).
                    let step = (amax as f64 / 63.5).max(pow2(EXP_MIN) as f64);
                    assert!(lo[j] as f64 - dlo[j] <= step && dhi[j] - hi[j] as f64 <= step);
                }
            }
        }
    }

    #[test]
    fn tiny_values_beside_large_ones_and_non_finite_keys_round_outward() {
        let d = 8;
        let mut lo = vec![0.0f32; d];
        let mut hi = vec![0.0f32; d];
        // The group's step is 2^27: both tiny values underflow to 0 before rounding.
        (lo[0], hi[0]) = (-1.0e-40, 1.0e-38);
        (lo[1], hi[1]) = (-1.0e10, 1.0e10);
        (lo[2], hi[2]) = (f32::NAN, f32::NAN);
        (lo[3], hi[3]) = (f32::NEG_INFINITY, f32::INFINITY);
        let mut rec = vec![0u8; record_bytes(d)];
        encode(&lo, &hi, &mut rec);
        let (dlo, dhi) = decode(&rec, d);
        assert!(dlo[0] < 0.0 && dhi[0] > 0.0, "{} {}", dlo[0], dhi[0]);
        assert!(dlo[1] <= -1.0e10 && dhi[1] >= 1.0e10);
        // Non-finite keys take the widest values and leave the exponent to the others.
        assert_eq!(rec[2 * d] as i8 as i32, group_exponent(1.0e10));
        for j in [2, 3] {
            assert_eq!((rec[j] as i8, rec[d + j] as i8), (-128, 127));
        }
    }

    #[test]
    fn head_dims_off_the_group_size_get_a_partial_group() {
        assert_eq!((record_bytes(64), record_bytes(128)), (144, 272));
        assert_eq!((record_bytes(256), record_bytes(96), record_bytes(100)), (544, 208, 216));
        let d = 100;
        let lo: Vec<f32> = (0..d).map(|j| -(j as f32) * 0.37).collect();
        let hi: Vec<f32> = (0..d).map(|j| j as f32 * 0.41 + 0.1).collect();
        let mut rec = vec![0u8; record_bytes(d)];
        encode(&lo, &hi, &mut rec);
        let (dlo, dhi) = decode(&rec, d);
        assert!((0..d).all(|j| dlo[j] <= lo[j] as f64 && dhi[j] >= hi[j] as f64));
    }
}

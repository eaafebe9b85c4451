//! ggml tensor types: their sizes (to check the tensor table) and, for the types we
//! load, dequantization to f32. Each block format is written out beside its function;
//! the reference is ggml's `ggml-common.h` (block structs) and `ggml-quants.c`
//! (`dequantize_row_*`), read and reimplemented here. Weights are dequantized once, at
//! load; the backend then keeps them in its compute dtype.

use half::{bf16, f16};
use rayon::prelude::*;

/// A ggml tensor type (`enum ggml_type`) whose storage size we know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    F64,
    I8,
    I16,
    I32,
    I64,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// Elements per block of the k-quants ("super-blocks").
const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self, String> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => return Err(format!("ggml type {other} is not supported")),
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (QK_K, 84),
            Q3K => (QK_K, 110),
            Q4K => (QK_K, 144),
            Q5K => (QK_K, 176),
            Q6K => (QK_K, 210),
            Q8K => (QK_K, 292),
        }
    }

    /// Bytes of a tensor of `numel` elements whose rows (the contiguous dimension) are
    /// `ne0` long: rows must be whole blocks.
    pub fn byte_len(self, ne0: u64, numel: u64) -> Result<usize, String> {
        let (per_block, bytes) = self.block();
        if !ne0.is_multiple_of(per_block as u64) {
            return Err(format!(
                "rows of {ne0} elements are not a multiple of {self:?}'s block of {per_block}"
            ));
        }
        (numel / per_block as u64)
            .checked_mul(bytes as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| format!("{numel} elements of {self:?} overflow"))
    }
}

/// The loadable types, for error messages.
pub const LOADABLE: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K";

/// `data` (exactly `ty.byte_len` bytes of `numel` elements) as f32.
/// One block of `ty` (`out` holds its elements): Q4_0, Q4_1 and Q8_0, the formats kept as
/// blocks in memory (`tensor::QuantBlocks`).
pub fn dequantize_block(ty: GgmlType, block: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::Q8_0 => q8_0(block, out),
        GgmlType::Q4_0 => q4_0(block, out),
        GgmlType::Q4_1 => q4_1(block, out),
        other => unreachable!("{other:?} is not kept as blocks"),
    }
}

pub fn dequantize(ty: GgmlType, data: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    let (per_block, block_bytes) = ty.block();
    if data.len() != numel / per_block * block_bytes || !numel.is_multiple_of(per_block) {
        return Err(format!("{} bytes do not hold {numel} elements of {ty:?}", data.len()));
    }
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, out| out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, out| out[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, out| out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
        other => {
            return Err(format!("{other:?} tensors cannot be loaded (only {LOADABLE} can)"));
        }
    };
    let mut out = vec![0.0f32; numel];
    // Blocks are independent: split into chunks of whole blocks across threads.
    let blocks_per_task = (1 << 16) / per_block;
    out.par_chunks_mut(blocks_per_task * per_block)
        .zip(data.par_chunks(blocks_per_task * block_bytes))
        .for_each(|(out, data)| {
            for (o, b) in out.chunks_exact_mut(per_block).zip(data.chunks_exact(block_bytes)) {
                block_fn(b, o);
            }
        });
    Ok(out)
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32_const()
}

/// Q8_0, 32 weights in 34 bytes: `{ f16 d; i8 qs[32] }`, weight i = d · qs[i].
fn q8_0(b: &[u8], out: &mut [f32]) {
    unpack_q8_0(b.try_into().expect("a Q8_0 block"), out.try_into().expect("32 weights"));
}

/// Q4_0, 32 weights in 18 bytes: `{ f16 d; u8 qs[16] }`. Byte j holds weight j in its
/// low nibble and weight j + 16 in its high nibble, each an unsigned 4-bit q:
/// weight = d · (q − 8).
fn q4_0(b: &[u8], out: &mut [f32]) {
    unpack_q4_0(b.try_into().expect("a Q4_0 block"), out.try_into().expect("32 weights"));
}

/// Q4_1, 32 weights in 20 bytes: `{ f16 d; f16 m; u8 qs[16] }`, nibbles as Q4_0:
/// weight = d · q + m.
fn q4_1(b: &[u8], out: &mut [f32]) {
    unpack_q4_1(b.try_into().expect("a Q4_1 block"), out.try_into().expect("32 weights"));
}

// The block formats the CPU backend also keeps in memory, on fixed-size arrays (no bounds
// checks, so its decode products inline and vectorise them: cpu/linear.rs).

#[inline(always)]
pub(crate) fn unpack_q8_0(b: &[u8; 34], w: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        w[j] = d * (b[2 + j] as i8) as f32;
    }
}

#[inline(always)]
pub(crate) fn unpack_q4_0(b: &[u8; 18], w: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        w[j] = d * ((b[2 + j] & 0xF) as i32 - 8) as f32;
        w[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
    }
}

#[inline(always)]
pub(crate) fn unpack_q4_1(b: &[u8; 20], w: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        w[j] = d * (b[4 + j] & 0xF) as f32 + m;
        w[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K super-block, packed
/// in 12 bytes: sub-blocks 0..4 keep theirs in the low 6 bits of bytes j (scale) and
/// j + 4 (min); sub-blocks 4..8 keep their low 4 bits in the nibbles of byte j + 4
/// (scale low, min high) and their top 2 bits in the top bits of bytes j − 4 (scale) and
/// j (min).
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        let sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Q4_K, 256 weights in 144 bytes: `{ f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }`.
/// Eight sub-blocks of 32, each with a 6-bit scale sc and min m (`scale_min_k4`):
/// weight = d · sc · q − dmin · m, q a 4-bit value. The 128 bytes of qs come in four
/// runs of 32: run r holds sub-block 2r in its low nibbles and 2r + 1 in its high ones.
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    for (r, (qs, out)) in b[16..144].chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * r, scales);
        let (sc2, m2) = scale_min_k4(2 * r + 1, scales);
        let (d1, min1, d2, min2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        for (l, &q) in qs.iter().enumerate() {
            out[l] = d1 * (q & 0xF) as f32 - min1;
            out[l + 32] = d2 * (q >> 4) as f32 - min2;
        }
    }
}

/// Q5_K, 256 weights in 176 bytes: `{ f16 d; f16 dmin; u8 scales[12]; u8 qh[32];
/// u8 qs[128] }`. As Q4_K with a fifth bit per weight: weight l of sub-block s takes
/// bit s of qh[l] as its bit 4 (q in 0..32).
fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    for (r, (qs, out)) in b[48..176].chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * r, scales);
        let (sc2, m2) = scale_min_k4(2 * r + 1, scales);
        let (d1, min1, d2, min2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (bit1, bit2) = (1u8 << (2 * r), 2u8 << (2 * r));
        for (l, &q) in qs.iter().enumerate() {
            let hi1 = if qh[l] & bit1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & bit2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((q & 0xF) + hi1) as f32 - min1;
            out[l + 32] = d2 * ((q >> 4) + hi2) as f32 - min2;
        }
    }
}

/// Q6_K, 256 weights in 210 bytes: `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`.
/// Sixteen sub-blocks of 16, each with a signed 8-bit scale; weight = d · scale · (q − 32)
/// with q 6 bits: 4 low bits from ql, 2 high bits from qh. Each half of 128 weights uses
/// 64 bytes of ql and 32 of qh: for l in 0..32, weights l, l + 32, l + 64, l + 96 take
/// the low nibbles of ql[l], ql[l + 32], then the high nibbles of ql[l], ql[l + 32], and
/// bits 0-1, 2-3, 4-5, 6-7 of qh[l].
fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    let scales = &b[192..208];
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &scales[half * 8..half * 8 + 8];
        let out = &mut out[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &q) in q.iter().enumerate() {
                out[l + 32 * k] = d * (sc[is + 2 * k] as i8) as f32 * (q as i32 - 32) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_scales_signed_bytes() {
        let mut b = f16b(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let out = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        let want: Vec<f32> = (0..32).map(|i| 0.5 * (i - 16) as f32).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn q4_0_and_q4_1_split_nibbles_into_halves() {
        // Byte j = (high nibble 15 - j) << 4 | low nibble j.
        let qs: Vec<u8> = (0..16u8).map(|j| ((15 - j) << 4) | j).collect();
        let mut b = f16b(2.0).to_vec();
        b.extend(&qs);
        let out = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], 2.0 * (15.0 - j as f32 - 8.0));
        }
        let mut b = [f16b(0.25), f16b(-1.0)].concat();
        b.extend(&qs);
        let out = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 0.25 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.25 * (15 - j) as f32 - 1.0);
        }
    }

    /// Packs eight 6-bit (scale, min) pairs as `scale_min_k4` reads them.
    fn pack_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
        }
        s
    }

    #[test]
    fn k4_scales_unpack() {
        let sc = [1, 20, 33, 63, 17, 48, 5, 62];
        let m = [0, 63, 7, 40, 31, 16, 59, 2];
        let s = pack_scales(sc, m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &s), (sc[j] as f32, m[j] as f32), "sub-block {j}");
        }
    }

    /// Sub-block s, element e of a Q4_K/Q5_K super-block: its 4-bit q is (s + e) % 16.
    fn k_quant_q(s: usize, e: usize) -> u8 {
        ((s + e) % 16) as u8
    }

    fn pack_k_nibbles() -> Vec<u8> {
        let mut qs = vec![0u8; 128];
        for r in 0..4 {
            for l in 0..32 {
                qs[r * 32 + l] = k_quant_q(2 * r, l) | (k_quant_q(2 * r + 1, l) << 4);
            }
        }
        qs
    }

    #[test]
    fn q4_k_applies_each_sub_blocks_scale_and_min() {
        let sc = [1, 2, 3, 4, 5, 6, 7, 63];
        let m = [0, 1, 2, 3, 60, 5, 6, 7];
        let (d, dmin) = (0.5, 0.25);
        let mut b = [f16b(d), f16b(dmin)].concat();
        b.extend(pack_scales(sc, m));
        b.extend(pack_k_nibbles());
        assert_eq!(b.len(), 144);
        let out = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        for s in 0..8 {
            for e in 0..32 {
                let want = d * sc[s] as f32 * k_quant_q(s, e) as f32 - dmin * m[s] as f32;
                assert_eq!(out[s * 32 + e], want, "sub-block {s} element {e}");
            }
        }
    }

    #[test]
    fn q5_k_adds_the_fifth_bit_from_qh() {
        let sc = [3, 1, 4, 1, 5, 9, 2, 6];
        let m = [2, 7, 1, 8, 2, 8, 1, 8];
        let (d, dmin) = (0.125, 0.5);
        // Bit s of qh[e] set when (s * 7 + e) is odd.
        let hi = |s: usize, e: usize| (s * 7 + e) % 2 == 1;
        let qh: Vec<u8> =
            (0..32).map(|e| (0..8).fold(0u8, |acc, s| acc | (u8::from(hi(s, e)) << s))).collect();
        let mut b = [f16b(d), f16b(dmin)].concat();
        b.extend(pack_scales(sc, m));
        b.extend(&qh);
        b.extend(pack_k_nibbles());
        assert_eq!(b.len(), 176);
        let out = dequantize(GgmlType::Q5K, &b, 256).unwrap();
        for s in 0..8 {
            for e in 0..32 {
                let q = k_quant_q(s, e) as f32 + if hi(s, e) { 16.0 } else { 0.0 };
                let want = d * sc[s] as f32 * q - dmin * m[s] as f32;
                assert_eq!(out[s * 32 + e], want, "sub-block {s} element {e}");
            }
        }
    }

    #[test]
    fn q6_k_reassembles_six_bit_values() {
        // Weight i has q(i) = (i * 37) % 64, sub-block scale (i / 16) - 8.
        let q = |i: usize| ((i * 37) % 64) as u8;
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for half in 0..2 {
            for l in 0..32 {
                let w = |k: usize| q(half * 128 + l + 32 * k);
                ql[half * 64 + l] = (w(0) & 0xF) | ((w(2) & 0xF) << 4);
                ql[half * 64 + l + 32] = (w(1) & 0xF) | ((w(3) & 0xF) << 4);
                qh[half * 32 + l] =
                    (w(0) >> 4) | ((w(1) >> 4) << 2) | ((w(2) >> 4) << 4) | ((w(3) >> 4) << 6);
            }
        }
        let scales: Vec<u8> = (0..16).map(|s| (s as i8 - 8) as u8).collect();
        let d = 0.03125;
        let mut b = [ql.as_slice(), &qh, &scales].concat();
        b.extend(f16b(d));
        assert_eq!(b.len(), 210);
        let out = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        for (i, &got) in out.iter().enumerate() {
            let want = d * ((i / 16) as f32 - 8.0) * (q(i) as f32 - 32.0);
            assert_eq!(got, want, "weight {i}");
        }
    }

    #[test]
    fn plain_floats_and_bad_lengths() {
        let b: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &b, 2).unwrap(), vec![1.5, -2.0]);
        let b = [f16b(0.5), f16b(-3.0)].concat();
        assert_eq!(dequantize(GgmlType::F16, &b, 2).unwrap(), vec![0.5, -3.0]);
        let b = [bf16::from_f32(0.75).to_le_bytes(), bf16::from_f32(8.0).to_le_bytes()].concat();
        assert_eq!(dequantize(GgmlType::BF16, &b, 2).unwrap(), vec![0.75, 8.0]);
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).unwrap_err().contains("do not hold"));
        assert!(dequantize(GgmlType::Q5_0, &[0; 22], 32).unwrap_err().contains("Q4_K"));
    }

    /// Random blocks dequantized by llama.cpp's gguf-py (tools/make_dequant_fixture.py):
    /// a reference independent of the reading of the format above.
    #[test]
    fn random_blocks_match_gguf_py() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf-blocks.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let types = [
            ("Q4_0", GgmlType::Q4_0),
            ("Q4_1", GgmlType::Q4_1),
            ("Q8_0", GgmlType::Q8_0),
            ("Q4_K", GgmlType::Q4K),
            ("Q5_K", GgmlType::Q5K),
            ("Q6_K", GgmlType::Q6K),
        ];
        for (name, ty) in types {
            let hex = json[name]["hex"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let want: Vec<f64> = json[name]["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let got = dequantize(ty, &bytes, want.len()).unwrap();
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{name} value {i}: {g} vs {w}"
                );
            }
        }
    }
}

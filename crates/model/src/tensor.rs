//! Host tensors: what loaders produce and backends upload.

use half::{bf16, f16};

use crate::gguf::dequant::{self, GgmlType};

/// Element storage of a host tensor, in the dtype the checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    /// GGUF blocks kept as they are (Q4_0, Q4_1, Q8_0): the CPU backend computes with them
    /// directly, reading 4-8x fewer bytes per decode step than their f32 values.
    Blocks(QuantBlocks),
    /// FP8 e4m3 values with one scale per row (a per-tensor scale repeated): what FP8
    /// checkpoints and `--quantization fp8` give the linear layers. Element `i` is
    /// `e4m3(bits[i]) * scales[i / cols]`; GPUs run their GEMMs on the bytes as they are.
    Fp8(Fp8Rows),
}

/// A matrix of e4m3 bytes with a scale per row.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Rows {
    /// Elements per row.
    pub cols: usize,
    pub bits: Vec<u8>,
    pub scales: Vec<f32>,
}

impl Fp8Rows {
    /// Elements `[start, start + out.len())` as f32 (`e4m3 * scale`, rounded once to f32).
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            let at = start + i;
            *o = float8::F8E4M3::from_bits(self.bits[at]).to_f32() * self.scales[at / self.cols];
        }
    }

    /// The rows or row pieces `ranges` cover, still FP8 when each range is whole rows or
    /// every range is a piece of one row of the same width (tensor-parallel slices);
    /// `None` otherwise.
    fn select(&self, ranges: impl Iterator<Item = std::ops::Range<usize>> + Clone) -> Option<Self> {
        let cols = self.cols.max(1);
        let whole_rows = ranges.clone().all(|r| r.start % cols == 0 && r.len() % cols == 0);
        let width = ranges.clone().next().map_or(cols, |r| r.len());
        let row_pieces = width > 0
            && ranges.clone().all(|r| r.len() == width && r.start / cols == (r.end - 1) / cols);
        if !whole_rows && !row_pieces {
            return None;
        }
        let mut out = Fp8Rows {
            cols: if whole_rows { cols } else { width },
            bits: Vec::new(),
            scales: Vec::new(),
        };
        for r in ranges {
            out.bits.extend_from_slice(&self.bits[r.clone()]);
            let first_row = r.start / cols;
            let rows = if whole_rows { r.len() / cols } else { 1 };
            out.scales.extend_from_slice(&self.scales[first_row..first_row + rows]);
        }
        Some(out)
    }
}

/// A matrix in a GGUF block format whose rows are whole blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantBlocks {
    pub ty: GgmlType,
    /// Elements per row.
    pub cols: usize,
    pub bytes: Vec<u8>,
}

impl QuantBlocks {
    /// The block formats kept as blocks (the rest dequantize at load).
    pub fn keeps(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }

    pub fn len(&self) -> usize {
        let (per_block, block_bytes) = self.ty.block();
        self.bytes.len() / block_bytes * per_block
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        let (per_block, block_bytes) = self.ty.block();
        self.cols / per_block * block_bytes
    }

    /// Elements `[start, start + out.len())` as f32, each exactly as the f32 dequantization
    /// of the whole tensor gives it.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let (per_block, block_bytes) = self.ty.block();
        if start.is_multiple_of(per_block) && out.len().is_multiple_of(per_block) {
            // Whole blocks (a GEMM panel): straight into `out`.
            let first = start / per_block;
            for (i, o) in out.chunks_exact_mut(per_block).enumerate() {
                let b = first + i;
                dequant::dequantize_block(
                    self.ty,
                    &self.bytes[b * block_bytes..(b + 1) * block_bytes],
                    o,
                );
            }
            return;
        }
        let mut block = [0f32; 32];
        let block = &mut block[..per_block];
        let mut at = start;
        let mut done = 0;
        while done < out.len() {
            let b = at / per_block;
            dequant::dequantize_block(
                self.ty,
                &self.bytes[b * block_bytes..(b + 1) * block_bytes],
                block,
            );
            let from = at - b * per_block;
            let n = (per_block - from).min(out.len() - done);
            out[done..done + n].copy_from_slice(&block[from..from + n]);
            done += n;
            at += n;
        }
    }
}

impl HostData {
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::BF16(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::Blocks(q) => q.len(),
            Self::Fp8(q) => q.bits.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts `[start, start + out.len())` to f32 into `out`.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Self::F32(v) => out.copy_from_slice(&v[start..end]),
            Self::BF16(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = x.to_f32()),
            Self::F16(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = x.to_f32()),
            Self::Blocks(q) => q.read_f32(start, out),
            Self::Fp8(q) => q.read_f32(start, out),
        }
    }

    /// The elements of `ranges`, in order, in this dtype.
    pub fn select(&self, ranges: impl Iterator<Item = std::ops::Range<usize>> + Clone) -> HostData {
        fn pick<T: Copy>(
            v: &[T],
            ranges: impl Iterator<Item = std::ops::Range<usize>> + Clone,
        ) -> Vec<T> {
            let mut out = Vec::with_capacity(ranges.clone().map(|r| r.len()).sum());
            for r in ranges {
                out.extend_from_slice(&v[r]);
            }
            out
        }
        match self {
            Self::F32(v) => Self::F32(pick(v, ranges)),
            Self::BF16(v) => Self::BF16(pick(v, ranges)),
            Self::F16(v) => Self::F16(pick(v, ranges)),
            // Tensor-parallel slices of block weights: as f32 (a column slice need not
            // fall on block boundaries).
            Self::Blocks(_) => Self::F32(pick(&self.to_f32(), ranges)),
            Self::Fp8(q) => match q.select(ranges.clone()) {
                Some(q) => Self::Fp8(q),
                None => Self::F32(pick(&self.to_f32(), ranges)),
            },
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read_f32(0, &mut out);
        out
    }

    /// Concatenates tensors of one dtype (fused projections); f32 if they differ.
    pub fn concat(parts: &[&HostData]) -> HostData {
        // One allocation and one memcpy per part: loading Llama-3-8B stacks 4.5 G
        // elements, which element-by-element collection made a large part of its load.
        fn join<T: Copy>(
            parts: &[&HostData],
            pick: impl Fn(&HostData) -> Option<&[T]>,
        ) -> Option<Vec<T>> {
            let slices: Option<Vec<&[T]>> = parts.iter().map(|p| pick(p)).collect();
            let slices = slices?;
            let mut out = Vec::with_capacity(slices.iter().map(|s| s.len()).sum());
            for s in slices {
                out.extend_from_slice(s);
            }
            Some(out)
        }
        if let Some(Self::Blocks(first)) = parts.first() {
            // Rows are whole blocks: stacking rows is stacking bytes.
            let (ty, cols) = (first.ty, first.cols);
            if let Some(bytes) = join(parts, |p| match p {
                Self::Blocks(q) if q.ty == ty && q.cols == cols => Some(&q.bytes[..]),
                _ => None,
            }) {
                return Self::Blocks(QuantBlocks { ty, cols, bytes });
            }
        }
        if let Some(Self::Fp8(first)) = parts.first() {
            let cols = first.cols;
            let same = |p: &&HostData| matches!(p, Self::Fp8(q) if q.cols == cols);
            if parts.iter().all(same) {
                let bits = join(parts, |p| match p {
                    Self::Fp8(q) => Some(&q.bits[..]),
                    _ => None,
                });
                let scales = join(parts, |p| match p {
                    Self::Fp8(q) => Some(&q.scales[..]),
                    _ => None,
                });
                if let (Some(bits), Some(scales)) = (bits, scales) {
                    return Self::Fp8(Fp8Rows { cols, bits, scales });
                }
            }
        }
        if let Some(v) = join(parts, |p| match p {
            Self::BF16(v) => Some(v),
            _ => None,
        }) {
            Self::BF16(v)
        } else if let Some(v) = join(parts, |p| match p {
            Self::F16(v) => Some(v),
            _ => None,
        }) {
            Self::F16(v)
        } else {
            let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
            for p in parts {
                out.extend(p.to_f32());
            }
            Self::F32(out)
        }
    }
}

/// A named-shape tensor on the host: a matrix `[rows, cols]` or a vector `[len]`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `[rows, cols]` of a matrix, `[1, len]` of a vector.
    pub fn matrix_dims(&self) -> (usize, usize) {
        match self.shape[..] {
            [r, c] => (r, c),
            [n] => (1, n),
            _ => (1, self.numel()),
        }
    }

    /// Rows `rows` of a matrix (elements of a vector): a tensor-parallel rank's share of a
    /// column-parallel weight. The whole range gives the tensor back uncopied.
    pub fn slice_rows(self, rows: std::ops::Range<usize>) -> HostTensor {
        let (n, cols) = match self.shape[..] {
            [len] => (len, 1),
            _ => self.matrix_dims(),
        };
        assert!(rows.start <= rows.end && rows.end <= n, "rows {rows:?} of {n}");
        if rows == (0..n) {
            return self;
        }
        let data = self.data.select(std::iter::once(rows.start * cols..rows.end * cols));
        let shape = match self.shape.len() {
            1 => vec![rows.len()],
            _ => vec![rows.len(), cols],
        };
        HostTensor { shape, data }
    }

    /// Columns `cols` of a matrix: a tensor-parallel rank's share of a row-parallel
    /// weight (its input features). The whole range gives the tensor back uncopied.
    pub fn slice_cols(self, cols: std::ops::Range<usize>) -> HostTensor {
        let (rows, n) = self.matrix_dims();
        assert!(cols.start <= cols.end && cols.end <= n, "columns {cols:?} of {n}");
        if cols == (0..n) {
            return self;
        }
        let data = self.data.select((0..rows).map(|r| r * n + cols.start..r * n + cols.end));
        HostTensor { shape: vec![rows, cols.len()], data }
    }

    /// Stacks matrices with equal column counts row-wise (q|k|v, gate|up), or
    /// concatenates vectors (their biases).
    pub fn stack_rows(parts: &[&HostTensor]) -> HostTensor {
        let data = HostData::concat(&parts.iter().map(|p| &p.data).collect::<Vec<_>>());
        if parts.iter().all(|p| p.shape.len() == 1) {
            return HostTensor { shape: vec![data.len()], data };
        }
        let cols = parts[0].matrix_dims().1;
        debug_assert!(parts.iter().all(|p| p.matrix_dims().1 == cols));
        let rows: usize = parts.iter().map(|p| p.matrix_dims().0).sum();
        HostTensor { shape: vec![rows, cols], data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_and_converts() {
        let a = HostTensor { shape: vec![1, 2], data: HostData::BF16(vec![bf16::ONE, bf16::ZERO]) };
        let b = HostTensor { shape: vec![2, 2], data: HostData::F32(vec![1.0, 2.0, 3.0, 4.0]) };
        let s = HostTensor::stack_rows(&[&a, &b]);
        assert_eq!(s.shape, vec![3, 2]);
        assert_eq!(s.data, HostData::F32(vec![1.0, 0.0, 1.0, 2.0, 3.0, 4.0]));
        let s2 = HostTensor::stack_rows(&[&a, &a]);
        assert!(matches!(s2.data, HostData::BF16(_)));
    }

    #[test]
    fn fp8_rows_stay_fp8_through_slices_and_stacks() {
        // 0x38 = 1.0, 0x40 = 2.0, 0x44 = 3.0, 0x48 = 4.0 in e4m3.
        let q = Fp8Rows { cols: 2, bits: vec![0x38, 0x40, 0x44, 0x48], scales: vec![0.5, 2.0] };
        let m = HostTensor { shape: vec![2, 2], data: HostData::Fp8(q) };
        assert_eq!(m.data.to_f32(), vec![0.5, 1.0, 6.0, 8.0]);
        let c = m.clone().slice_cols(1..2);
        assert!(matches!(&c.data, HostData::Fp8(q) if q.cols == 1 && q.scales == [0.5, 2.0]));
        assert_eq!(c.data.to_f32(), vec![1.0, 8.0]);
        let r = m.clone().slice_rows(1..2);
        assert!(matches!(&r.data, HostData::Fp8(q) if q.scales == [2.0]));
        assert_eq!(r.data.to_f32(), vec![6.0, 8.0]);
        let s = HostTensor::stack_rows(&[&m, &r]);
        assert!(matches!(&s.data, HostData::Fp8(q) if q.scales == [0.5, 2.0, 2.0]));
        assert_eq!(s.data.to_f32(), vec![0.5, 1.0, 6.0, 8.0, 6.0, 8.0]);
        // Mixed with 16-bit rows, a stack is f32 of the dequantized values.
        let b = HostTensor { shape: vec![1, 2], data: HostData::F32(vec![7.0, 9.0]) };
        let mixed = HostTensor::stack_rows(&[&m, &b]);
        assert_eq!(mixed.data, HostData::F32(vec![0.5, 1.0, 6.0, 8.0, 7.0, 9.0]));
    }

    #[test]
    fn slices_rows_and_columns() {
        let m = HostTensor {
            shape: vec![3, 4],
            data: HostData::F32((0..12).map(|x| x as f32).collect()),
        };
        let r = m.clone().slice_rows(1..3);
        assert_eq!(
            (r.shape.clone(), r.data),
            (vec![2, 4], HostData::F32((4..12).map(|x| x as f32).collect()))
        );
        let c = m.clone().slice_cols(1..3);
        assert_eq!(c.shape, vec![3, 2]);
        assert_eq!(c.data, HostData::F32(vec![1.0, 2.0, 5.0, 6.0, 9.0, 10.0]));
        assert_eq!(m.clone().slice_cols(0..4), m);
        let v = HostTensor { shape: vec![4], data: HostData::BF16(vec![bf16::ONE; 4]) };
        assert_eq!(v.slice_rows(2..4).shape, vec![2]);
    }
}

//! The GGUF container (versions 2 and 3, little-endian): header, metadata and tensor
//! table, parsed from a byte slice (the memory-mapped file) without trusting a single
//! count or offset in it.
//!
//! Layout (all integers little-endian):
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | metadata_count u64
//! metadata_count × { key: string | value_type u32 | value }
//! tensor_count   × { name: string | n_dims u32 | n_dims × u64 (ne[0] first: the
//!                    contiguous dimension) | ggml_type u32 | offset u64 }
//! padding to `general.alignment` (32 unless the metadata says otherwise)
//! tensor data: each tensor at data_start + offset (a multiple of the alignment)
//! ```
//! A string is a u64 byte length then UTF-8 bytes; an array a u32 element type, a u64
//! count, then the elements. Version 3 differs from 2 only in allowing big-endian files,
//! which are refused here (their version field reads as 0x03000000).

use std::collections::BTreeMap;

use super::dequant::GgmlType;

/// Why a GGUF file could not be read. Every variant names what was being read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file (the first 4 bytes are {0:?}, not \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("truncated: {what} needs {needed} bytes at offset {offset}, the file has {len}")]
    Truncated { what: String, offset: usize, needed: usize, len: usize },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

type Result<T> = std::result::Result<T, GgufError>;

fn invalid(what: impl Into<String>, message: impl Into<String>) -> GgufError {
    GgufError::Invalid { what: what.into(), message: message.into() }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type that fits a u64 (GGUF writers differ in which they use).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short name of the type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous dimension (a matrix `[rows, cols]` is
    /// `[cols, rows]` here).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset of the data from the start of the file (already checked to lie
    /// inside it).
    pub start: usize,
    /// Bytes of data.
    pub len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        // Checked in `parse`: the product fits (it sized `len`).
        self.dims.iter().product::<u64>() as usize
    }

    /// The shape in row-major order (`[rows, cols]` for a matrix), as safetensors has it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// The parsed header of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    /// Where the tensor data starts.
    pub data_start: usize,
}

const MAGIC: [u8; 4] = *b"GGUF";
/// ggml's own limit on tensor dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; nothing real nests more than this.
const MAX_NESTING: usize = 4;
const DEFAULT_ALIGNMENT: usize = 32;

/// A cursor over the file's bytes that reports what it was reading when they run out.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos,
                needed: n,
                len: self.bytes.len(),
            });
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// A u64 count of items each at least `min_bytes` long: refused when the rest of
    /// the file could not hold them (so a garbled count never allocates).
    fn count(&mut self, min_bytes: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_bytes.max(1)) <= self.remaining() => Ok(n),
            _ => Err(invalid(
                what(),
                format!(
                    "count {n} at offset {at} does not fit in the {} bytes left (the file is \
                     truncated or corrupt)",
                    self.remaining()
                ),
            )),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| invalid(what(), format!("not UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(invalid(what(), format!("bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(invalid(what(), "arrays nested too deeply"));
                }
                let elem = self.u32(what)?;
                let n = self.count(min_value_bytes(elem), what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(invalid(what(), format!("unknown value type {other}"))),
        })
    }
}

/// The fewest bytes one value of a type takes (a string or array: its count).
fn min_value_bytes(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// Parses the header of a GGUF file held in `bytes` and checks that every tensor's data
/// lies inside it.
pub fn parse(bytes: &[u8]) -> Result<Header> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic: [u8; 4] = c.array(&|| "the magic number".into())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = c.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => return Err(GgufError::BigEndian),
        v => return Err(GgufError::UnsupportedVersion(v)),
    }
    // A tensor-table entry takes at least 8 + 4 + 4 + 8 bytes, a metadata entry 8 + 4 + 1.
    let tensor_count = c.count(24, &|| "the tensor count".into())?;
    let metadata_count = c.count(13, &|| "the metadata count".into())?;

    let mut metadata = BTreeMap::new();
    for i in 0..metadata_count {
        let key = c.string(&|| format!("metadata key {i}"))?;
        let what = || format!("metadata {key:?}");
        let ty = c.u32(&what)?;
        let value = c.value(ty, 0, &what)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(invalid(what(), "appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(invalid("general.alignment", format!("{v:?} is not a power of two"))),
        },
    };

    let mut infos = Vec::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let name = c.string(&|| format!("the name of tensor {i}"))?;
        let what = || format!("tensor {name:?}");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(invalid(what(), format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
        }
        let dims = (0..n_dims).map(|_| c.u64(&what)).collect::<Result<Vec<u64>>>()?;
        let ty = GgmlType::from_id(c.u32(&what)?).map_err(|m| invalid(what(), m))?;
        let offset = c.u64(&what)?;
        infos.push((name, dims, ty, offset));
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    if data_start > bytes.len() && tensor_count > 0 {
        return Err(GgufError::Truncated {
            what: "the tensor data".into(),
            offset: c.pos,
            needed: data_start - c.pos,
            len: bytes.len(),
        });
    }

    let mut tensors = Vec::with_capacity(infos.len());
    let mut names = std::collections::HashSet::new();
    for (name, dims, ty, offset) in infos {
        let what = || format!("tensor {name:?}");
        if !names.insert(name.clone()) {
            return Err(invalid(what(), "appears twice"));
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid(what(), format!("dimensions {dims:?} overflow")))?;
        let len = ty.byte_len(dims[0], numel).map_err(|m| invalid(what(), m))?;
        if !(offset as usize).is_multiple_of(alignment) {
            return Err(invalid(what(), format!("offset {offset} is not aligned to {alignment}")));
        }
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .filter(|s| s.checked_add(len).is_some_and(|end| end <= bytes.len()));
        let Some(start) = start else {
            return Err(GgufError::Truncated {
                what: what(),
                offset: data_start.saturating_add(offset as usize),
                needed: len,
                len: bytes.len(),
            });
        };
        tensors.push(TensorInfo { name, dims, ty, start, len });
    }
    Ok(Header { version, metadata, tensors, alignment, data_start })
}

#[cfg(test)]
mod tests {
    use super::super::test_writer::Writer;
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::default();
        w.string("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .strings("tokenizer.ggml.tokens", &["a", "b", "ab"])
            .f32_tensor("x", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .f32_tensor("y", &[2], &[7.0, 8.0]);
        w.bytes()
    }

    #[test]
    fn parses_metadata_and_tensor_table() {
        let bytes = sample();
        let h = parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata["general.architecture"].as_str(), Some("llama"));
        assert_eq!(h.metadata["llama.block_count"].as_u64(), Some(2));
        assert_eq!(h.metadata["tokenizer.ggml.tokens"].as_array().unwrap().len(), 3);
        assert_eq!(h.tensors.len(), 2);
        let x = &h.tensors[0];
        assert_eq!((x.shape(), x.len, x.ty), (vec![2, 3], 24, GgmlType::F32));
        let data = &bytes[x.start..x.start + x.len];
        assert_eq!(f32::from_le_bytes(data[20..24].try_into().unwrap()), 6.0);
        assert_eq!(h.tensors[1].start % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_naming_what_was_cut() {
        let bytes = sample();
        for len in 0..bytes.len() {
            // Cuts inside the trailing padding of the last tensor's slot are harmless only
            // past its data; everything before must fail.
            let last = parse(&bytes).unwrap().tensors[1].clone();
            if len >= last.start + last.len {
                assert!(parse(&bytes[..len]).is_ok());
                continue;
            }
            let err = parse(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, GgufError::Truncated { .. } | GgufError::Invalid { .. }),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn bad_magic_version_and_counts_are_named() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(parse(&b), Err(GgufError::BadMagic(_))));
        let mut b = sample();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(parse(&b), Err(GgufError::UnsupportedVersion(1)));
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(parse(&b), Err(GgufError::BigEndian));
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(&b).unwrap_err().to_string();
        assert!(err.contains("tensor count") && err.contains("does not fit"), "{err}");
    }

    #[test]
    fn unknown_types_and_misplaced_data_are_refused() {
        let mut w = Writer::default();
        w.raw("k", 99, &[0; 8]);
        assert!(parse(&w.bytes()).unwrap_err().to_string().contains("unknown value type 99"));
        let mut w = Writer::default();
        w.tensor("t", &[32], 77, vec![0; 64]);
        assert!(parse(&w.bytes()).unwrap_err().to_string().contains("77"));
        // Q8_0 rows must be whole blocks of 32.
        let mut w = Writer::default();
        w.tensor("t", &[33], 8, vec![0; 68]);
        assert!(parse(&w.bytes()).unwrap_err().to_string().contains("block of 32"));
        // Dimensions whose product overflows.
        let mut w = Writer::default();
        w.tensor("t", &[1 << 40, 1 << 40], 0, vec![]);
        assert!(parse(&w.bytes()).unwrap_err().to_string().contains("overflow"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Garbled files (bytes overwritten anywhere, then cut anywhere) parse or fail
        /// with an error; they never panic, and whatever parses stays inside the file.
        #[test]
        fn garbled_headers_never_panic(
            edits in proptest::collection::vec((0usize..1000, proptest::prelude::any::<u8>()), 0..8),
            cut in 0usize..1000,
        ) {
            let mut bytes = sample();
            for (at, b) in edits {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            bytes.truncate(cut.min(bytes.len()));
            if let Ok(h) = parse(&bytes) {
                for t in &h.tensors {
                    proptest::prop_assert!(t.start + t.len <= bytes.len());
                }
            }
        }

        /// Random bytes behind a valid magic and version.
        #[test]
        fn random_bodies_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut bytes = b"GGUF".to_vec();
            bytes.extend(3u32.to_le_bytes());
            bytes.extend(body);
            let _ = parse(&bytes);
        }
    }
}

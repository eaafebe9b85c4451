//! Reading weights: safetensors checkpoints (single file or sharded with
//! `model.safetensors.index.json`, memory-mapped) behind one `WeightSource` trait that the
//! synthetic models implement too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
use crate::tensor::{HostData, HostTensor};

/// Where named tensors come from.
pub trait WeightSource: Sync {
    /// The tensor `name`, which must have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor>;
    fn contains(&self, name: &str) -> bool;
    fn describe(&self) -> String;
}

/// Memory-mapped safetensors files of one checkpoint.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(ModelError::io(&index_path))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::bad_file(&index_path, e))?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| ModelError::bad_file(&index_path, "no \"weight_map\" object"))?;
            let mut shards: Vec<String> =
                map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(ModelError::bad_file(
                    dir,
                    "no model.safetensors or model.safetensors.index.json (only safetensors \
                     checkpoints are supported)",
                ));
            }
            vec![single]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(&path).map_err(ModelError::io(&path))?;
            // SAFETY: the file is opened read-only and not modified while mapped (a
            // checkpoint changing under a running server is outside what we support).
            let mmap = unsafe { Mmap::map(&file) }.map_err(ModelError::io(&path))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::bad_file(&path, e))?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(Self { files, index })
    }
}

impl SafetensorsSource {
    /// The dtype, shape and bytes of tensor `name`.
    fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8])> {
        let &file = self.index.get(name).ok_or_else(|| {
            ModelError::Weights(format!("tensor {name} is missing from the checkpoint"))
        })?;
        let (path, mmap) = &self.files[file];
        let st = SafeTensors::deserialize(mmap).map_err(|e| ModelError::bad_file(path, e))?;
        let view = st.tensor(name).map_err(|e| ModelError::bad_file(path, e))?;
        Ok((view.dtype(), view.shape().to_vec(), view.data()))
    }

    /// The FP8 weight `name` with its `{name}_scale` (one value, or one per
    /// row: `[]`, `[1]`, `[rows]` or `[rows, 1]`).
    fn fp8(&self, name: &str, shape: &[usize], bytes: &[u8]) -> Result<HostData> {
        let scale_name = format!("{name}_scale");
        if !self.contains(&scale_name) {
            let hint = if self.contains(&format!("{name}_scale_inv")) {
                " (it has a block-wise weight_scale_inv: block-wise FP8 is not supported)"
            } else {
                ""
            };
            return Err(ModelError::Weights(format!(
                "FP8 tensor {name} has no {scale_name}{hint}"
            )));
        }
        let (dtype, scale_shape, scale_bytes) = self.raw(&scale_name)?;
        let scales = decode(&scale_name, dtype, scale_bytes)?.to_f32();
        let (rows, cols) = match shape {
            [r, c] => (*r, *c),
            _ => (1, shape.iter().product()),
        };
        let per_row = matches!(scale_shape[..], [r] | [r, 1] if r == rows);
        if scales.len() != 1 && !per_row {
            return Err(ModelError::Weights(format!(
                "{scale_name} has shape {scale_shape:?}; a [{rows}, {cols}] FP8 weight takes one \
                 scale or one per row"
            )));
        }
        let rows = crate::fp8::fp8_rows(bytes.to_vec(), &scales, rows, cols)
            .map_err(|e| ModelError::Weights(format!("{name}: {e}")))?;
        Ok(HostData::Fp8(rows))
    }
}

/// 16- and 32-bit float bytes as host data.
fn decode(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<HostData> {
    Ok(match dtype {
        Dtype::F32 => HostData::F32(
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ),
        Dtype::BF16 => HostData::BF16(
            bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect(),
        ),
        Dtype::F16 => {
            HostData::F16(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect())
        }
        other => {
            return Err(ModelError::Weights(format!(
                "tensor {name} is {other:?}; only f32, bf16, f16 and FP8 e4m3 weights (with \
                 their scales) are supported"
            )));
        }
    })
}

impl WeightSource for SafetensorsSource {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let (dtype, actual, bytes) = self.raw(name)?;
        if actual != shape {
            return Err(ModelError::Weights(format!(
                "tensor {name} has shape {actual:?}, the config implies {shape:?}"
            )));
        }
        let data = match dtype {
            // Only the linear layers run FP8; any other FP8 tensor (an embedding table,
            // an LM head) is dequantized here for the 16-bit ops that read it.
            Dtype::F8_E4M3 if crate::fp8::is_linear_weight(name) => self.fp8(name, shape, bytes)?,
            Dtype::F8_E4M3 => HostData::F32(self.fp8(name, shape, bytes)?.to_f32()),
            other => decode(name, other, bytes)?,
        };
        Ok(HostTensor { shape: shape.to_vec(), data })
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn describe(&self) -> String {
        format!("{} safetensors file(s), {} tensors", self.files.len(), self.index.len())
    }
}

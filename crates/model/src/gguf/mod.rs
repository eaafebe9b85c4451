//! GGUF model files (llama.cpp's format): one memory-mapped file holds the config (as
//! metadata), the tokenizer, the chat template and the weights, often quantized.
//!
//! - `reader`: the container: header, metadata, tensor table, every offset checked.
//! - `config`: `llama` metadata as a `ModelConfig`.
//! - `tokenizer`: the metadata's vocabulary as a `tokenizers` tokenizer.
//! - `dequant`: ggml's block formats, dequantized to f32 at load.
//!
//! Weights are read under their Hugging Face names (`WeightSource`), so the model loads
//! a GGUF file as it loads a safetensors folder. llama.cpp's converter reorders the rows
//! of the q and k projections of llama models (each head's two rotary halves
//! interleaved, for its RoPE kernel); `GgufWeights` puts them back.

pub mod config;
pub mod dequant;
pub mod reader;
#[cfg(test)]
mod test_writer;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::tensor::{HostData, HostTensor, QuantBlocks};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;
use config::Meta;
use dequant::GgmlType;
use reader::{Header, TensorInfo};

/// An opened, parsed GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    header: Header,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(ModelError::io(path))?;
        // SAFETY: the file is opened read-only and not modified while mapped (a model
        // file changing under a running server is outside what we support).
        let mmap = unsafe { Mmap::map(&file) }.map_err(ModelError::io(path))?;
        let header = reader::parse(&mmap).map_err(|e| ModelError::bad_file(path, e))?;
        Ok(Self { path: path.to_path_buf(), mmap, header })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn meta(&self) -> Meta<'_> {
        Meta(&self.header.metadata)
    }

    pub fn config(&self) -> Result<ModelConfig> {
        config::model_config(&self.header.metadata, &self.header.tensors)
            .map_err(|e| ModelError::bad_file(&self.path, e))
    }

    /// The tokenizer and the chat template (`tokenizer.chat_template`, else the plain one).
    pub fn tokenizer(&self) -> Result<(Tokenizer, ChatTemplate)> {
        let t = tokenizer::from_metadata(&self.meta())
            .map_err(|e| ModelError::bad_file(&self.path, format!("tokenizer: {e}")))?;
        let template = match self.meta().str("tokenizer.chat_template") {
            Ok(Some(source)) => ChatTemplate::new(
                source,
                t.bos_token.clone().unwrap_or_default(),
                t.eos_token.clone().unwrap_or_default(),
            )?,
            Ok(None) => ChatTemplate::plain(),
            Err(e) => return Err(ModelError::bad_file(&self.path, e)),
        };
        Ok((Tokenizer::Hf(Box::new(t.tokenizer)), template))
    }

    /// The weights, read under Hugging Face names for a model of `config`.
    pub fn into_weights(self, config: &ModelConfig) -> GgufWeights {
        let index =
            self.header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        GgufWeights {
            file: self,
            index,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
        }
    }
}

/// A GGUF file's tensors as a `WeightSource`.
pub struct GgufWeights {
    file: GgufFile,
    index: HashMap<String, usize>,
    num_heads: usize,
    num_kv_heads: usize,
}

/// Where a Hugging Face tensor lives in a llama GGUF file, and how many heads its rows
/// were interleaved over (q and k projections).
fn gguf_name(hf: &str, heads: usize, kv_heads: usize) -> Option<(String, Option<usize>)> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some((name.to_string(), None));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (name, permute) = match part {
        "input_layernorm.weight" => ("attn_norm.weight", None),
        "self_attn.q_proj.weight" => ("attn_q.weight", Some(heads)),
        "self_attn.k_proj.weight" => ("attn_k.weight", Some(kv_heads)),
        "self_attn.v_proj.weight" => ("attn_v.weight", None),
        "self_attn.o_proj.weight" => ("attn_output.weight", None),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", None),
        "mlp.gate_proj.weight" => ("ffn_gate.weight", None),
        "mlp.up_proj.weight" => ("ffn_up.weight", None),
        "mlp.down_proj.weight" => ("ffn_down.weight", None),
        _ => return None,
    };
    Some((format!("blk.{layer}.{name}"), permute))
}

/// Undoes llama.cpp's q/k row order. Its converter viewed each head's rows as
/// `[2, D/2]` (the two rotary halves) and stored them transposed, `[D/2, 2]`: GGUF row
/// `2j + s` of a head is Hugging Face row `s · D/2 + j`.
fn unpermute_rows<T: Copy>(data: &[T], heads: usize, cols: usize) -> Vec<T> {
    let rows = data.len() / cols;
    let d = rows / heads;
    let half = d / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let src = h * d + 2 * j + s;
                out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Whether Q4_0/Q4_1/Q8_0 weights stay blocks in memory (`RADIX_SPARSE_GGUF_F32=1`
/// dequantizes them to f32 at load, as before, to compare).
fn keep_blocks() -> bool {
    std::env::var_os("RADIX_SPARSE_GGUF_F32").is_none_or(|v| v.is_empty() || v == "0")
}

/// `data` with its rows unpermuted over `heads` when it is a q or k projection.
fn in_hf_order<T: Copy>(data: Vec<T>, heads: Option<usize>, cols: usize) -> Vec<T> {
    match heads {
        Some(heads) => unpermute_rows(&data, heads, cols),
        None => data,
    }
}

impl GgufWeights {
    fn info(&self, gguf: &str) -> Option<&TensorInfo> {
        self.index.get(gguf).map(|&i| &self.file.header.tensors[i])
    }

    fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.file.mmap[t.start..t.start + t.len]
    }
}

impl WeightSource for GgufWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let (gguf, permute) = gguf_name(name, self.num_heads, self.num_kv_heads)
            .ok_or_else(|| ModelError::Weights(format!("no GGUF tensor corresponds to {name}")))?;
        let info = self.info(&gguf).ok_or_else(|| {
            ModelError::bad_file(&self.file.path, format!("tensor {gguf} ({name}) is missing"))
        })?;
        if info.shape() != shape {
            return Err(ModelError::bad_file(
                &self.file.path,
                format!("tensor {gguf} has shape {:?}, the config implies {shape:?}", info.shape()),
            ));
        }
        let bytes = self.bytes(info);
        let bad = |e: String| ModelError::bad_file(&self.file.path, format!("tensor {gguf}: {e}"));
        let cols = *shape.last().unwrap_or(&1);
        let rows = info.numel() / cols.max(1);
        if let Some(heads) = permute
            && (heads == 0 || !rows.is_multiple_of(2 * heads))
        {
            return Err(bad(format!("{rows} rows do not split into {heads} heads")));
        }
        // 16-bit floats stay as they are (the backend converts); the rest becomes f32.
        let data = match info.ty {
            GgmlType::F16 => HostData::F16(in_hf_order(
                bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect(),
                permute,
                cols,
            )),
            GgmlType::BF16 => HostData::BF16(in_hf_order(
                bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect(),
                permute,
                cols,
            )),
            // Q4_0, Q4_1, Q8_0 stay blocks, their rows permuted as bytes.
            ty if QuantBlocks::keeps(ty) && keep_blocks() => {
                let (per_block, block_bytes) = ty.block();
                if !cols.is_multiple_of(per_block)
                    || bytes.len() != info.numel() / per_block * block_bytes
                {
                    return Err(bad(format!(
                        "{} bytes do not hold rows of {cols} elements of {ty:?}",
                        bytes.len()
                    )));
                }
                let row_bytes = cols / per_block * block_bytes;
                HostData::Blocks(QuantBlocks {
                    ty,
                    cols,
                    bytes: in_hf_order(bytes.to_vec(), permute, row_bytes),
                })
            }
            ty => HostData::F32(in_hf_order(
                dequant::dequantize(ty, bytes, info.numel()).map_err(bad)?,
                permute,
                cols,
            )),
        };
        Ok(HostTensor { shape: shape.to_vec(), data })
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name, self.num_heads, self.num_kv_heads)
            .is_some_and(|(gguf, _)| self.index.contains_key(&gguf))
    }

    fn describe(&self) -> String {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for t in &self.file.header.tensors {
            let ty = format!("{:?}", t.ty);
            match counts.iter_mut().find(|(n, _)| *n == ty) {
                Some((_, c)) => *c += 1,
                None => counts.push((ty, 1)),
            }
        }
        let types: Vec<String> = counts.iter().map(|(t, c)| format!("{c} {t}")).collect();
        format!(
            "GGUF v{} {}, tensors: {}",
            self.file.header.version,
            self.file.path.display(),
            types.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_restores_rotary_halves() {
        // 2 heads of D = 4, one column: HF rows h*4 + [0 1 | 2 3] (halves), which the
        // converter stored as h*4 + [0 2 1 3].
        let hf: Vec<u32> = (0..8).collect();
        let gguf = vec![0, 2, 1, 3, 4, 6, 5, 7];
        assert_eq!(unpermute_rows(&gguf, 2, 1), hf);
        // With 3 columns, whole rows move.
        let gguf3: Vec<u32> = gguf.iter().flat_map(|&r| [r * 10, r * 10 + 1, r * 10 + 2]).collect();
        let hf3: Vec<u32> = hf.iter().flat_map(|&r| [r * 10, r * 10 + 1, r * 10 + 2]).collect();
        assert_eq!(unpermute_rows(&gguf3, 2, 3), hf3);
    }

    #[test]
    fn names_map_to_llama_cpp_names() {
        assert_eq!(
            gguf_name("model.layers.7.self_attn.k_proj.weight", 9, 3),
            Some(("blk.7.attn_k.weight".into(), Some(3)))
        );
        assert_eq!(gguf_name("model.embed_tokens.weight", 9, 3).unwrap().0, "token_embd.weight");
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight", 9, 3), None);
        assert_eq!(gguf_name("model.layers.0.self_attn.q_proj.bias", 9, 3), None);
    }
}

//! GGUF metadata of the `llama` architecture as a `ModelConfig`.
//!
//! Keys (prefixed by the architecture, `llama.`): `block_count`, `embedding_length`,
//! `feed_forward_length`, `attention.head_count`, `attention.head_count_kv`,
//! `attention.key_length` (head dim, else embedding / heads), `rope.dimension_count`,
//! `rope.freq_base`, `attention.layer_norm_rms_epsilon`, `context_length`, `vocab_size`
//! (else the token list's length). Token ids come from `tokenizer.ggml.*_token_id`.

use std::collections::BTreeMap;

use radix_kernels::rope::RopeConfig;

use super::reader::{TensorInfo, Value};
use crate::config::{Architecture, ModelConfig};

pub type Metadata = BTreeMap<String, Value>;

/// Typed look-ups that name the key when it is missing or of the wrong type.
pub struct Meta<'a>(pub &'a Metadata);

impl<'a> Meta<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, String> {
        self.get(key)
            .map(|v| {
                v.as_u64().ok_or_else(|| format!("{key} is a {}, not an integer", v.type_name()))
            })
            .transpose()
    }

    pub fn req_usize(&self, key: &str) -> Result<usize, String> {
        let v = self.u64(key)?.ok_or_else(|| format!("{key} is missing"))?;
        usize::try_from(v).map_err(|_| format!("{key} = {v} is too large"))
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, String> {
        self.get(key)
            .map(|v| {
                v.as_f64().ok_or_else(|| format!("{key} is a {}, not a number", v.type_name()))
            })
            .transpose()
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, String> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or_else(|| format!("{key} is a {}, not a string", v.type_name()))
            })
            .transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| format!("{key} is a {}, not a bool", v.type_name())))
            .transpose()
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a [Value]>, String> {
        self.get(key)
            .map(|v| {
                v.as_array().ok_or_else(|| format!("{key} is a {}, not an array", v.type_name()))
            })
            .transpose()
    }

    /// A token id (`tokenizer.ggml.bos_token_id` ...), if present.
    pub fn token_id(&self, key: &str) -> Result<Option<u32>, String> {
        self.u64(key)?
            .map(|v| u32::try_from(v).map_err(|_| format!("{key} = {v} is not a token id")))
            .transpose()
    }
}

/// The architectures whose GGUF files we load.
pub const ARCHITECTURES: &str = "llama";

/// The model's config from the metadata; `tensors` settles whether the output head is
/// tied (no `output.weight`) and refuses RoPE frequency factors we do not apply.
pub fn model_config(meta: &Metadata, tensors: &[TensorInfo]) -> Result<ModelConfig, String> {
    let m = Meta(meta);
    let arch = m.str("general.architecture")?.ok_or("general.architecture is missing")?;
    if arch != "llama" {
        return Err(format!(
            "GGUF architecture {arch:?} is not supported (supported: {ARCHITECTURES})"
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = m.req_usize(&key("embedding_length"))?;
    let num_heads = m.req_usize(&key("attention.head_count"))?;
    let num_kv_heads = match m.u64(&key("attention.head_count_kv"))? {
        Some(v) => v as usize,
        None => num_heads,
    };
    let head_dim = match m.u64(&key("attention.key_length"))? {
        Some(v) => v as usize,
        None => hidden_size.checked_div(num_heads).unwrap_or(0),
    };
    if let Some(rot) = m.u64(&key("rope.dimension_count"))?
        && rot as usize != head_dim
    {
        return Err(format!(
            "{} = {rot} rotates part of each head (head dim {head_dim}); only full rotary \
             embeddings are supported",
            key("rope.dimension_count")
        ));
    }
    if let Some(kind) = m.str(&key("rope.scaling.type"))?
        && kind != "none"
    {
        return Err(format!("RoPE scaling {kind:?} is not supported"));
    }
    if tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        return Err("per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 scaling) are \
                    not supported in GGUF files yet; load the Hugging Face folder instead"
            .into());
    }
    let vocab_size = match m.u64(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => m.array("tokenizer.ggml.tokens")?.ok_or("tokenizer.ggml.tokens is missing")?.len(),
    };
    let theta = m.f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
    let mut eos_token_ids: Vec<u32> = Vec::new();
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = m.token_id(k)?
            && !eos_token_ids.contains(&id)
        {
            eos_token_ids.push(id);
        }
    }
    let cfg = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size,
        hidden_size,
        intermediate_size: m.req_usize(&key("feed_forward_length"))?,
        num_layers: m.req_usize(&key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: m.f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32,
        rope: RopeConfig { head_dim, theta, llama3: None },
        max_position_embeddings: m.u64(&key("context_length"))?.unwrap_or(4096) as usize,
        tie_word_embeddings: !tensors.iter().any(|t| t.name == "output.weight"),
        qkv_bias: false,
        bos_token_id: m.token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::super::reader::parse;
    use super::super::test_writer::Writer;
    use super::*;

    fn smollm_like() -> Writer {
        let mut w = Writer::default();
        w.string("general.architecture", "llama")
            .u32("llama.block_count", 30)
            .u32("llama.context_length", 8192)
            .u32("llama.embedding_length", 576)
            .u32("llama.feed_forward_length", 1536)
            .u32("llama.attention.head_count", 9)
            .u32("llama.attention.head_count_kv", 3)
            .f32("llama.rope.freq_base", 100000.0)
            .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .u32("llama.rope.dimension_count", 64)
            .u32("llama.vocab_size", 49152)
            .u32("tokenizer.ggml.bos_token_id", 1)
            .u32("tokenizer.ggml.eos_token_id", 2);
        w
    }

    fn config_of(w: &Writer) -> Result<ModelConfig, String> {
        let h = parse(&w.bytes()).unwrap();
        model_config(&h.metadata, &h.tensors)
    }

    #[test]
    fn smollm2_metadata_becomes_its_config() {
        let c = config_of(&smollm_like()).unwrap();
        assert_eq!(
            (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads),
            (30, 576, 1536, 9, 3)
        );
        assert_eq!((c.head_dim, c.rope.theta, c.max_position_embeddings), (64, 100000.0, 8192));
        assert_eq!(
            (c.vocab_size, c.bos_token_id, c.eos_token_ids.clone()),
            (49152, Some(1), vec![2])
        );
        assert!(c.tie_word_embeddings, "no output.weight: tied");
        let mut w = smollm_like();
        w.f32_tensor("output.weight", &[1], &[0.0]);
        assert!(!config_of(&w).unwrap().tie_word_embeddings);
    }

    #[test]
    fn unsupported_metadata_is_named() {
        let mut w = smollm_like();
        w.string("llama.rope.scaling.type", "yarn");
        assert!(config_of(&w).unwrap_err().contains("yarn"));
        let mut w = Writer::default();
        w.string("general.architecture", "gemma2");
        assert!(config_of(&w).unwrap_err().contains("gemma2"));
        let mut w = Writer::default();
        w.string("general.architecture", "llama").u32("llama.embedding_length", 64);
        assert!(config_of(&w).unwrap_err().contains("llama.attention.head_count is missing"));
        let mut w = smollm_like();
        w.string("llama.feed_forward_length2", "x").f32("llama.attention.head_count_kv2", 1.0);
        w.u32("llama.rope.dimension_count2", 1);
        assert!(config_of(&w).is_ok(), "unknown keys are ignored");
        let mut w = smollm_like();
        w.f32_tensor("rope_freqs.weight", &[32], &[1.0; 32]);
        assert!(config_of(&w).unwrap_err().contains("rope_freqs"));
    }
}

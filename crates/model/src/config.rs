//! Model configuration: Hugging Face `config.json` and `generation_config.json` for the
//! Llama family (Llama 2/3, Mistral, Qwen2), validated into one plain struct.

use std::path::Path;

use radix_kernels::rope::{Llama3Scaling, RopeConfig};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Architectures that share the Llama forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    /// Qwen2: Llama with biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A model folder's `config.json`, parsed.
pub fn read_config_json(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(ModelError::io(&path))?;
    serde_json::from_str(&text).map_err(|e| ModelError::bad_file(&path, e))
}

impl ModelConfig {
    /// Parses `config.json` (and `generation_config.json` beside it, if present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_json(dir, &read_config_json(dir)?)
    }

    /// `from_dir` with `config.json` already read (`read_config_json`), for callers that
    /// read more of it (its `quantization_config`).
    pub fn from_dir_json(dir: &Path, json: &Value) -> Result<Self> {
        let path = dir.join("config.json");
        let mut cfg = Self::from_json(json).map_err(|e| ModelError::bad_file(&path, e))?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            let gen_json: Value =
                serde_json::from_str(&text).map_err(|e| ModelError::bad_file(&gen_path, e))?;
            if let Some(ids) = token_ids(&gen_json["eos_token_id"]) {
                cfg.eos_token_ids = ids;
            }
            if let Some(bos) = token_ids(&gen_json["bos_token_id"]).and_then(|v| v.first().copied())
            {
                cfg.bos_token_id = Some(bos);
            }
        }
        Ok(cfg)
    }

    /// Parses a `config.json` document.
    pub fn from_json(json: &Value) -> std::result::Result<Self, String> {
        let arch_name = json["architectures"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or("no \"architectures\" entry")?;
        let architecture = Architecture::from_hf(arch_name).ok_or_else(|| {
            format!(
                "architecture {arch_name} is not supported (LlamaForCausalLM, \
                 MistralForCausalLM and Qwen2ForCausalLM are)"
            )
        })?;
        let int = |key: &str| -> std::result::Result<usize, String> {
            json[key].as_u64().map(|v| v as usize).ok_or(format!("missing or non-integer {key:?}"))
        };
        let hidden_size = int("hidden_size")?;
        let num_heads = int("num_attention_heads")?;
        let num_kv_heads = json["num_key_value_heads"].as_u64().map_or(num_heads, |v| v as usize);
        let head_dim = json["head_dim"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        // transformers 5 writes `rope_parameters` (theta and scaling together); earlier
        // versions and most checkpoints `rope_theta` and `rope_scaling`.
        let params = &json["rope_parameters"];
        let theta =
            json["rope_theta"].as_f64().or(params["rope_theta"].as_f64()).unwrap_or(10000.0) as f32;
        let llama3 = rope_scaling(if json["rope_scaling"].is_null() {
            params
        } else {
            &json["rope_scaling"]
        })?;
        // Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) equals full
        // attention while the context fits the window: cap the context at the window.
        let max_pos = json["max_position_embeddings"].as_u64().unwrap_or(4096) as usize;
        let window = json["sliding_window"]
            .as_u64()
            .filter(|_| architecture == Architecture::Mistral || json["use_sliding_window"] == true)
            .map(|w| w as usize);
        let cfg = ModelConfig {
            architecture,
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            rope: RopeConfig { head_dim, theta, llama3 },
            max_position_embeddings: window.map_or(max_pos, |w| w.min(max_pos)),
            tie_word_embeddings: json["tie_word_embeddings"].as_bool().unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2
                || json["attention_bias"].as_bool().unwrap_or(false),
            bos_token_id: token_ids(&json["bos_token_id"]).and_then(|v| v.first().copied()),
            eos_token_ids: token_ids(&json["eos_token_id"]).unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps {} must be positive", self.rms_norm_eps));
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 1.0) {
            return Err(format!("rope_theta {} must be greater than 1", self.rope.theta));
        }
        Ok(())
    }

    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Rows of the fused q|k|v projection.
    pub fn qkv_size(&self) -> usize {
        self.q_size() + 2 * self.kv_size()
    }

    /// The geometry of this model's KV pool: pages of `page_size` tokens in `dtype`, with
    /// a key-bounds record per (page, kv head) when `key_bounds` (sparse paging).
    pub fn kv_geometry(
        &self,
        page_size: usize,
        dtype: radix_kv::KvDtype,
        key_bounds: bool,
    ) -> Result<radix_kv::KvGeometry> {
        Ok(radix_kv::KvGeometry::new(
            self.num_layers,
            self.num_kv_heads,
            page_size,
            self.head_dim,
            dtype,
            key_bounds,
        )?)
    }

    /// Parameter count (weights only), for reports.
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = self.qkv_size() * h
            + self.q_size() * h
            + 3 * self.intermediate_size * h
            + 2 * h
            + if self.qkv_bias { self.qkv_size() } else { 0 };
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_layers * per_layer + h + head
    }
}

/// Token ids given as one integer or a list.
fn token_ids(v: &Value) -> Option<Vec<u32>> {
    match v {
        Value::Number(n) => n.as_u64().map(|id| vec![id as u32]),
        Value::Array(a) => Some(a.iter().filter_map(|x| x.as_u64().map(|id| id as u32)).collect()),
        _ => None,
    }
}

fn rope_scaling(v: &Value) -> std::result::Result<Option<Llama3Scaling>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let kind = v["rope_type"].as_str().or(v["type"].as_str()).unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = |key: &str| {
                v[key].as_f64().map(|x| x as f32).ok_or(format!("rope_scaling.{key} missing"))
            };
            let s = Llama3Scaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")?,
            };
            if s.factor <= 0.0 || s.high_freq_factor <= s.low_freq_factor {
                return Err(
                    "rope_scaling: need factor > 0 and high_freq_factor > low_freq_factor".into()
                );
            }
            Ok(Some(s))
        }
        other => {
            Err(format!("rope_scaling type {other:?} is not supported (default and llama3 are)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 131072, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}
        })
    }

    #[test]
    fn parses_llama3_8b() {
        let c = ModelConfig::from_json(&llama()).unwrap();
        assert_eq!((c.head_dim, c.num_kv_heads, c.qkv_size()), (128, 8, 6144));
        assert!(c.rope.llama3.is_some() && !c.qkv_bias && !c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.num_params(), 8_030_261_248);
    }

    #[test]
    fn reads_transformers_5_rope_parameters() {
        let mut j = llama();
        let scaling = j["rope_scaling"].take();
        let mut params = scaling.clone();
        params["rope_theta"] = json!(500000.0);
        j["rope_parameters"] = params;
        j["rope_theta"] = Value::Null;
        let c = ModelConfig::from_json(&j).unwrap();
        assert_eq!(c.rope.theta, 500000.0);
        assert_eq!(c.rope.llama3.unwrap().factor, 8.0);
    }

    #[test]
    fn a_sliding_window_caps_the_context() {
        let mut j = llama();
        j["architectures"] = json!(["MistralForCausalLM"]);
        j["sliding_window"] = json!(4096);
        assert_eq!(ModelConfig::from_json(&j).unwrap().max_position_embeddings, 4096);
        j["sliding_window"] = Value::Null;
        assert_eq!(ModelConfig::from_json(&j).unwrap().max_position_embeddings, 131072);
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let mut j = llama();
        j["architectures"] = json!(["Qwen2ForCausalLM"]);
        j["rope_scaling"] = Value::Null;
        assert!(ModelConfig::from_json(&j).unwrap().qkv_bias);
    }

    #[test]
    fn rejects_bad_configs_with_the_reason() {
        let cases = [
            ("architectures", json!(["GPT2LMHeadModel"]), "not supported"),
            ("num_key_value_heads", json!(5), "multiple"),
            ("hidden_size", json!("big"), "hidden_size"),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}), "yarn"),
            ("num_hidden_layers", json!(0), "must be positive"),
        ];
        for (key, value, want) in cases {
            let mut j = llama();
            j[key] = value;
            let err = ModelConfig::from_json(&j).unwrap_err();
            assert!(err.contains(want), "{key}: {err}");
        }
    }
}

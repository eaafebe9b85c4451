//! Synthetic models for tests and benchmarks: real Llama shapes, deterministic random
//! weights (the same name always gives the same values), a byte-level tokenizer.
//!
//! - `synthetic:tiny`: 2 layers, hidden 256, 8 heads (2 kv heads) of 64, vocab 320: runs
//!   anywhere in milliseconds.
//! - `synthetic:llama3-8b`: Llama-3-8B's shapes (32 layers, hidden 4096, 32/8 heads of 128,
//!   MLP 14336, vocab 128256), for throughput benchmarks.
//! - `synthetic:llama3-70b`: Llama-3-70B's shapes (80 layers, hidden 8192, 64/8 heads of
//!   128, MLP 28672, vocab 128256): 141 GB in bf16, for tensor-parallel benchmarks on
//!   several GPUs (never instantiated in CPU tests).

use half::bf16;
use radix_kernels::rope::{Llama3Scaling, RopeConfig};

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::tensor::{HostData, HostTensor};
use crate::weights::WeightSource;

/// Byte tokens 0..256, then BOS and EOS.
pub const BYTE_VOCAB: u32 = 256;
pub const BOS: u32 = 256;
pub const EOS: u32 = 257;

pub const NAMES: [&str; 3] = ["tiny", "llama3-8b", "llama3-70b"];

/// The config of `synthetic:<name>`.
pub fn config(name: &str) -> Result<ModelConfig> {
    let llama3 = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let cfg = match name {
        "tiny" => ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 320,
            hidden_size: 256,
            intermediate_size: 512,
            num_layers: 2,
            num_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope: RopeConfig { head_dim: 64, theta: 10000.0, llama3: None },
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            qkv_bias: false,
            bos_token_id: Some(BOS),
            eos_token_ids: vec![EOS],
        },
        "llama3-8b" => ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope: RopeConfig { head_dim: 128, theta: 500000.0, llama3: Some(llama3) },
            max_position_embeddings: 131072,
            tie_word_embeddings: false,
            qkv_bias: false,
            bos_token_id: Some(BOS),
            eos_token_ids: vec![EOS],
        },
        "llama3-70b" => ModelConfig {
            vocab_size: 128256,
            hidden_size: 8192,
            intermediate_size: 28672,
            num_layers: 80,
            num_heads: 64,
            num_kv_heads: 8,
            head_dim: 128,
            ..config("llama3-8b")?
        },
        other => {
            return Err(ModelError::Unsupported(format!(
                "synthetic:{other} (known: {})",
                NAMES.map(|n| format!("synthetic:{n}")).join(", ")
            )));
        }
    };
    Ok(cfg)
}

/// Deterministic random weights in bf16: uniform in ±1/sqrt(fan_in) for matrices (so
/// activations keep their scale through the layers), 1 ± 0.05 for norm weights.
pub struct SyntheticWeights;

impl WeightSource for SyntheticWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        use rayon::prelude::*;
        let numel: usize = shape.iter().product();
        let seed = fnv1a(name.as_bytes());
        let is_norm = name.ends_with("norm.weight");
        let cols = *shape.last().unwrap_or(&1);
        let scale = if is_norm { 0.05 } else { 1.0 / (cols as f32).sqrt() };
        // The output head favours printable ASCII (bytes 32..127), so what the tiny
        // model writes is readable text rather than broken UTF-8.
        let head = name == "lm_head.weight";
        // Element i is a hash of (name, i): any order, any number of threads, same values.
        let data = (0..numel)
            .into_par_iter()
            .map(|i| {
                let mut state = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                let mut x = (2.0 * u - 1.0) * scale;
                if head {
                    x *= if (32..127).contains(&(i / cols)) { 4.0 } else { 0.1 };
                }
                bf16::from_f32(if is_norm { 1.0 + x } else { x })
            })
            .collect();
        Ok(HostTensor { shape: shape.to_vec(), data: HostData::BF16(data) })
    }

    fn contains(&self, name: &str) -> bool {
        // Synthetic models have no separate lm_head (it is generated when asked for), and
        // no quantization scales (FP8 weight or KV cache scales).
        !name.is_empty() && !name.ends_with("_scale")
    }

    fn describe(&self) -> String {
        "synthetic deterministic weights".into()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E3779B97F4A7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_deterministic_and_scaled() {
        let a = SyntheticWeights.tensor("model.layers.0.mlp.down_proj.weight", &[4, 64]).unwrap();
        let b = SyntheticWeights.tensor("model.layers.0.mlp.down_proj.weight", &[4, 64]).unwrap();
        let c = SyntheticWeights.tensor("model.layers.1.mlp.down_proj.weight", &[4, 64]).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let v = a.data.to_f32();
        assert!(v.iter().all(|x| x.abs() <= 0.126));
        let n = SyntheticWeights.tensor("model.norm.weight", &[8]).unwrap().data.to_f32();
        assert!(n.iter().all(|x| (x - 1.0).abs() <= 0.051));
    }

    #[test]
    fn configs_validate() {
        for name in NAMES {
            config(name).unwrap().validate().unwrap();
        }
        assert_eq!(config("llama3-8b").unwrap().num_params(), 8_030_261_248);
        // Meta's Llama-3-70B: 70,553,706,496 parameters.
        assert_eq!(config("llama3-70b").unwrap().num_params(), 70_553_706_496);
        assert!(config("huge").is_err());
    }
}

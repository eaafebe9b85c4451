//! FP8 (OCP e4m3, "float8_e4m3fn") weights: the schemes of Hugging Face checkpoints, their
//! dequantization at load, and `--quantization fp8` (per-output-channel quantization of a
//! 16-bit checkpoint at load).
//!
//! e4m3: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7f/0xff are NaN;
//! largest finite 448; subnormals down to 2^-9. A weight is stored as `q` with a scale
//! `s` (per tensor, or per output row): its value is `q * s`.
//!
//! Weights reach the backends as `HostData::Fp8` (e4m3 bytes and a scale per row). The CPU
//! backend dequantizes them once at upload (`q * s` in f32); the CUDA backend keeps the
//! bytes and runs cuBLASLt's FP8 GEMMs (half the weight bytes, twice the tensor rate) on
//! activations it quantizes per token as it goes. Static activation scales (`input_scale`)
//! are read past: per-token dynamic scales are never coarser.

use float8::F8E4M3;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::tensor::{Fp8Rows, HostData, HostTensor};
use crate::weights::WeightSource;

/// Largest finite e4m3 value, the kernels' (`float8::F8E4M3::MAX` says 416, the largest
/// value below 0x7e; 0x7e itself is 448, what torch and the OCP spec give).
pub use radix_kernels::fp8::E4M3_MAX;

/// How a checkpoint's weight scales are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleGranularity {
    /// One scale per tensor (`[]` or `[1]`).
    Tensor,
    /// One scale per output row (`[rows]` or `[rows, 1]`).
    Channel,
}

/// The FP8 scheme a checkpoint's `quantization_config` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8Scheme {
    /// `fp8` (transformers' FP8 / vLLM's format) or `compressed-tensors`.
    pub format: String,
    pub weights: ScaleGranularity,
    /// Activation scales are static (in the checkpoint) rather than computed per step.
    pub static_activations: bool,
}

impl Fp8Scheme {
    pub fn describe(&self) -> String {
        format!(
            "FP8 e4m3 weights ({}, {} scales, {} activation scales)",
            self.format,
            match self.weights {
                ScaleGranularity::Tensor => "per-tensor",
                ScaleGranularity::Channel => "per-channel",
            },
            if self.static_activations { "static" } else { "dynamic" }
        )
    }
}

/// The FP8 scheme of `config.json`'s `quantization_config`, `None` when there is none.
/// Anything else (other methods, block-wise FP8, integer schemes) is an error naming the
/// field, rather than weights read wrongly.
pub fn parse_quantization_config(config: &Value) -> Result<Option<Fp8Scheme>> {
    let Some(q) = config.get("quantization_config") else { return Ok(None) };
    let bad = |msg: String| Err(ModelError::Config(format!("quantization_config: {msg}")));
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    match method {
        "fp8" => {
            if let Some(block) = q.get("weight_block_size").filter(|v| !v.is_null()) {
                return bad(format!(
                    "weight_block_size {block} (block-wise FP8 scales) is not supported; \
                     per-tensor and per-channel FP8 are"
                ));
            }
            let act = q.get("activation_scheme").and_then(Value::as_str).unwrap_or("dynamic");
            if !["dynamic", "static"].contains(&act) {
                return bad(format!("activation_scheme {act:?} is not dynamic or static"));
            }
            Ok(Some(Fp8Scheme {
                format: "fp8".into(),
                weights: ScaleGranularity::Tensor,
                static_activations: act == "static",
            }))
        }
        "compressed-tensors" => parse_compressed_tensors(q).map(Some),
        "" => bad("no quant_method".into()),
        other => bad(format!(
            "quant_method {other:?} is not supported (supported: \"fp8\", FP8 \"compressed-tensors\")"
        )),
    }
}

/// compressed-tensors: one config group of 8-bit float weights, per tensor or per channel.
fn parse_compressed_tensors(q: &Value) -> Result<Fp8Scheme> {
    let bad = |msg: String| Err(ModelError::Config(format!("quantization_config: {msg}")));
    let groups = q.get("config_groups").and_then(Value::as_object);
    let Some(groups) = groups.filter(|g| g.len() == 1) else {
        return bad("compressed-tensors needs exactly one entry in config_groups".into());
    };
    let (name, group) = groups.iter().next().expect("one group");
    let w = &group["weights"];
    let num_bits = w.get("num_bits").and_then(Value::as_u64);
    let kind = w.get("type").and_then(Value::as_str);
    if num_bits != Some(8) || kind != Some("float") {
        return bad(format!(
            "config_groups.{name}.weights is {} bits of type {:?}; only 8-bit \"float\" (FP8) \
             is supported",
            num_bits.map_or("?".into(), |b| b.to_string()),
            kind.unwrap_or("?")
        ));
    }
    let weights = match w.get("strategy").and_then(Value::as_str) {
        Some("tensor") => ScaleGranularity::Tensor,
        Some("channel") => ScaleGranularity::Channel,
        other => {
            return bad(format!(
                "config_groups.{name}.weights.strategy {:?} is not supported (tensor, channel)",
                other.unwrap_or("?")
            ));
        }
    };
    if w.get("symmetric").and_then(Value::as_bool) == Some(false) {
        return bad(format!("config_groups.{name}.weights.symmetric false is not supported"));
    }
    let act = &group["input_activations"];
    let static_activations = match act {
        Value::Null => false,
        a => {
            if a.get("num_bits").and_then(Value::as_u64) != Some(8)
                || a.get("type").and_then(Value::as_str) != Some("float")
            {
                return bad(format!(
                    "config_groups.{name}.input_activations: only 8-bit \"float\" is supported"
                ));
            }
            !a.get("dynamic").and_then(Value::as_bool).unwrap_or(false)
        }
    };
    Ok(Fp8Scheme { format: "compressed-tensors".into(), weights, static_activations })
}

/// Checked FP8 rows from a checkpoint: `q` holds `[rows, cols]` e4m3 bytes, `scales` one
/// value (repeated for every row) or one per row, each a positive finite number.
pub fn fp8_rows(q: Vec<u8>, scales: &[f32], rows: usize, cols: usize) -> Result<Fp8Rows> {
    if q.len() != rows * cols {
        return Err(ModelError::Weights(format!(
            "{} FP8 values for a [{rows}, {cols}] tensor",
            q.len()
        )));
    }
    let scales = match scales.len() {
        1 => vec![scales[0]; rows],
        n if n == rows => scales.to_vec(),
        n => {
            return Err(ModelError::Weights(format!(
                "{n} scales for a tensor of {rows} rows (expected 1 or {rows})"
            )));
        }
    };
    if let Some(bad) = scales.iter().find(|s| !s.is_finite() || **s <= 0.0) {
        return Err(ModelError::Weights(format!("FP8 scale {bad} is not a positive number")));
    }
    Ok(Fp8Rows { cols, bits: q, scales })
}

/// Quantizes a `[rows, cols]` matrix per output row: `scale = max|w| / 448` (1 for a row
/// of zeros), `q = e4m3(w / scale)` rounded to nearest even. Returns the e4m3 bytes and
/// the scales.
pub fn quantize_per_channel(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    // Rows in parallel: Llama-3-8B's 7 G linear weights take a few seconds this way, not
    // the minutes of one thread.
    let cols = cols.max(1);
    let mut q = vec![0u8; rows * cols];
    let mut scales = vec![1.0f32; rows];
    q.par_chunks_mut(cols).zip(scales.par_iter_mut()).zip(w.par_chunks(cols)).for_each(
        |((q_row, scale), row)| {
            let amax = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            // The activations' rule: 1 for zero or non-finite rows, never below 2^-100
            // (w / scale must not overflow for a row of tiny weights).
            *scale = radix_kernels::fp8::row_scale(amax).0;
            for (q, x) in q_row.iter_mut().zip(row) {
                *q = F8E4M3::from_f32(x / *scale).to_bits();
            }
        },
    );
    (q, scales)
}

/// An FP8 (e4m3) KV cache's per-layer scales: a key is stored as `e4m3(k / k[layer])`
/// and read as that times `k[layer]`; values likewise with `v`.
#[derive(Clone, Debug, PartialEq)]
pub struct KvScales {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvScales {
    /// Every scale a positive finite number, one per layer for keys and for values.
    pub fn validate(&self) -> Result<()> {
        if self.k.len() != self.v.len() {
            return Err(ModelError::Invalid(format!(
                "FP8 KV cache: {} key scales and {} value scales",
                self.k.len(),
                self.v.len()
            )));
        }
        match self.k.iter().chain(&self.v).find(|s| !(s.is_finite() && **s > 0.0)) {
            Some(bad) => Err(ModelError::Invalid(format!(
                "FP8 KV cache scale {bad} is not a positive number"
            ))),
            None => Ok(()),
        }
    }

    /// Scale 1 for every layer (what vLLM uses when a checkpoint has no KV scales).
    pub fn ones(num_layers: usize) -> Self {
        Self { k: vec![1.0; num_layers], v: vec![1.0; num_layers] }
    }

    /// The checkpoint's KV scales: `model.layers.{i}.self_attn.k_scale` and `v_scale`
    /// (vLLM's and llm-compressor's layout), or the older single `kv_scale` for both;
    /// `None` when it has none. A scale per kv head (llm-compressor's per-head strategy)
    /// becomes the largest of them: the cache keeps one scale a layer, and the largest
    /// lets no head's values saturate (a warning says so). A checkpoint with some layers'
    /// scales but not all, or a scale that is not a positive number, is an error naming
    /// the tensor.
    pub fn from_checkpoint(weights: &dyn WeightSource, num_layers: usize) -> Result<Option<Self>> {
        let name = |i: usize, what: &str| format!("model.layers.{i}.self_attn.{what}");
        let has = |i: usize| {
            weights.contains(&name(i, "k_scale")) || weights.contains(&name(i, "kv_scale"))
        };
        let present = (0..num_layers).filter(|&i| has(i)).count();
        if present == 0 {
            return Ok(None);
        }
        if present < num_layers {
            let missing = (0..num_layers).find(|&i| !has(i)).unwrap_or(0);
            return Err(ModelError::Weights(format!(
                "KV cache scales: {} is missing ({present} of {num_layers} layers have one)",
                name(missing, "k_scale")
            )));
        }
        let per_head = std::cell::Cell::new(false);
        let read = |n: String| -> Result<f32> {
            let values = weights.tensor(&n, &[])?.data.to_f32();
            if values.is_empty() {
                return Err(ModelError::Weights(format!("{n} holds no value")));
            }
            if let Some(s) = values.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return Err(ModelError::Weights(format!("{n} holds {s}, not a positive number")));
            }
            per_head.set(per_head.get() || values.len() > 1);
            Ok(values.iter().fold(0.0f32, |m, &s| m.max(s)))
        };
        let mut scales = Self::ones(num_layers);
        for i in 0..num_layers {
            if weights.contains(&name(i, "k_scale")) {
                scales.k[i] = read(name(i, "k_scale"))?;
                scales.v[i] = read(name(i, "v_scale"))?;
            } else {
                scales.k[i] = read(name(i, "kv_scale"))?;
                scales.v[i] = scales.k[i];
            }
        }
        if per_head.get() {
            tracing::warn!(
                "the checkpoint's KV cache scales are per kv head; the FP8 cache keeps one \
                 scale a layer, the largest of each layer's heads"
            );
        }
        Ok(Some(scales))
    }
}

/// `x` as an FP8 cache with scale `scale` holds it: `e4m3(x / scale) * scale` (round to
/// nearest even, saturating at ±448·scale).
pub fn round_e4m3(x: f32, scale: f32) -> f32 {
    F8E4M3::from_f32(x / scale).to_f32() * scale
}

/// Whether `name` is the weight of one of a layer's linear projections (what FP8 schemes
/// quantize; embeddings, norms and the LM head stay 16-bit).
pub fn is_linear_weight(name: &str) -> bool {
    const PROJ: [&str; 7] = [
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    ];
    name.starts_with("model.layers.") && PROJ.iter().any(|p| name.ends_with(p))
}

/// `--quantization fp8` over a 16-bit checkpoint: the linear projections' weights come out
/// quantized per output channel, everything else as it is.
pub struct QuantizeFp8 {
    pub inner: Box<dyn WeightSource>,
}

impl WeightSource for QuantizeFp8 {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.inner.tensor(name, shape)?;
        if !is_linear_weight(name) {
            return Ok(t);
        }
        let (rows, cols) = t.matrix_dims();
        if matches!(t.data, HostData::Fp8(_)) {
            return Ok(t);
        }
        let (bits, scales) = quantize_per_channel(&t.data.to_f32(), rows, cols);
        Ok(HostTensor { shape: t.shape, data: HostData::Fp8(Fp8Rows { cols, bits, scales }) })
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn describe(&self) -> String {
        format!("{}, linear weights quantized to FP8 per channel at load", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Dequantizes e4m3 bytes `q` (a `[rows, cols]` matrix, or a vector when `rows` is 1)
    /// with `scales` of one value or one per row.
    fn dequantize(q: &[u8], scales: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
        Ok(HostData::Fp8(fp8_rows(q.to_vec(), scales, rows, cols)?).to_f32())
    }

    #[test]
    fn e4m3_values_round_to_nearest_even_and_saturate() {
        let q = |x: f32| F8E4M3::from_f32(x).to_bits();
        assert_eq!((q(448.0), q(1000.0), q(1.0), q(-3.3)), (0x7e, 0x7e, 0x38, 0xc5));
        assert_eq!(q(1.0625), 0x38, "a tie goes to the even mantissa");
        assert_eq!(q(2f32.powi(-9)), 0x01, "the smallest subnormal");
        assert_eq!(F8E4M3::from_bits(0x7e).to_f32(), E4M3_MAX);
        assert!(F8E4M3::from_bits(0x7f).to_f32().is_nan());
    }

    #[test]
    fn per_channel_quantization_keeps_each_row_within_e4m3_rounding() {
        let (rows, cols) = (5, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i / cols) as f32)
            .collect();
        let (q, scales) = quantize_per_channel(&w, rows, cols);
        let back = dequantize(&q, &scales, rows, cols).unwrap();
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            // The row's largest magnitude maps to 448 exactly.
            assert_eq!(scales[r], amax / E4M3_MAX);
            for (x, y) in row.iter().zip(&back[r * cols..(r + 1) * cols]) {
                // Normal range: half an ulp of 3 mantissa bits (2^-4 relative); below it,
                // half the subnormal step 2^-9 of the scaled value.
                let bound = (x.abs() / 16.0).max(scales[r] * 2f32.powi(-10)) * 1.0001;
                assert!((x - y).abs() <= bound, "row {r}: {x} -> {y}");
            }
        }
        let (_, s) = quantize_per_channel(&[0.0; 4], 1, 4);
        assert_eq!(s, vec![1.0], "a row of zeros keeps scale 1");
    }

    #[test]
    fn dequantize_checks_scales() {
        let q = [0x38u8, 0x40, 0x38, 0x40]; // 1, 2, 1, 2
        assert_eq!(dequantize(&q, &[0.5], 2, 2).unwrap(), vec![0.5, 1.0, 0.5, 1.0]);
        assert_eq!(dequantize(&q, &[1.0, 3.0], 2, 2).unwrap(), vec![1.0, 2.0, 3.0, 6.0]);
        let err = dequantize(&q, &[1.0, 2.0, 3.0], 2, 2).unwrap_err().to_string();
        assert!(err.contains("3 scales for a tensor of 2 rows"), "{err}");
        let err = dequantize(&q, &[f32::NAN], 2, 2).unwrap_err().to_string();
        assert!(err.contains("not a positive number"), "{err}");
        assert!(dequantize(&q, &[-1.0], 2, 2).is_err());
    }

    #[test]
    fn quantization_configs_parse_or_name_the_field() {
        let parse = |q: Value| parse_quantization_config(&json!({ "quantization_config": q }));
        assert_eq!(parse_quantization_config(&json!({})).unwrap(), None);
        let s = parse(json!({"quant_method": "fp8", "activation_scheme": "static"})).unwrap();
        assert_eq!(
            s,
            Some(Fp8Scheme {
                format: "fp8".into(),
                weights: ScaleGranularity::Tensor,
                static_activations: true
            })
        );
        let ct = |strategy: &str, bits: u64, dynamic: bool| {
            json!({"quant_method": "compressed-tensors", "format": "float-quantized",
                   "config_groups": {"group_0": {
                       "targets": ["Linear"],
                       "weights": {"num_bits": bits, "type": "float", "strategy": strategy,
                                   "symmetric": true, "dynamic": false},
                       "input_activations": {"num_bits": 8, "type": "float",
                                             "strategy": "token", "dynamic": dynamic}}}})
        };
        let s = parse(ct("channel", 8, true)).unwrap().unwrap();
        assert_eq!((s.weights, s.static_activations), (ScaleGranularity::Channel, false));
        let s = parse(ct("tensor", 8, false)).unwrap().unwrap();
        assert_eq!((s.weights, s.static_activations), (ScaleGranularity::Tensor, true));
        for (q, want) in [
            (ct("channel", 4, true), "4 bits"),
            (ct("group", 8, true), "strategy \"group\""),
            (json!({"quant_method": "awq", "bits": 4}), "quant_method \"awq\""),
            (json!({"quant_method": "fp8", "weight_block_size": [128, 128]}), "weight_block_size"),
            (json!({"bits": 4}), "no quant_method"),
        ] {
            let err = parse(q).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("quantization_config"), "{err}");
        }
    }

    /// A map of named scalars (or short vectors) as a weight source.
    struct Scalars(std::collections::HashMap<String, Vec<f32>>);

    impl WeightSource for Scalars {
        fn tensor(&self, name: &str, _shape: &[usize]) -> Result<HostTensor> {
            let v = self.0[name].clone();
            let shape = if v.len() == 1 { vec![] } else { vec![v.len()] };
            Ok(HostTensor { shape, data: HostData::F32(v) })
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
        fn describe(&self) -> String {
            "scalars".into()
        }
    }

    #[test]
    fn kv_scales_come_from_the_checkpoint_or_are_absent() {
        let src = |pairs: &[(&str, f32)]| {
            Scalars(pairs.iter().map(|(n, v)| (format!("model.layers.{n}"), vec![*v])).collect())
        };
        assert_eq!(KvScales::from_checkpoint(&src(&[]), 2).unwrap(), None);
        let s = src(&[
            ("0.self_attn.k_scale", 0.5),
            ("0.self_attn.v_scale", 0.25),
            ("1.self_attn.kv_scale", 2.0),
        ]);
        let got = KvScales::from_checkpoint(&s, 2).unwrap().unwrap();
        assert_eq!(got, KvScales { k: vec![0.5, 2.0], v: vec![0.25, 2.0] });
        let half = src(&[("0.self_attn.k_scale", 0.5), ("0.self_attn.v_scale", 0.5)]);
        let err = KvScales::from_checkpoint(&half, 2).unwrap_err().to_string();
        assert!(err.contains("model.layers.1.self_attn.k_scale is missing"), "{err}");
        let bad = src(&[("0.self_attn.kv_scale", -1.0)]);
        let err = KvScales::from_checkpoint(&bad, 1).unwrap_err().to_string();
        assert!(err.contains("not a positive number"), "{err}");
        // Per kv head: the largest of each layer's heads; a bad head is still an error.
        let heads = |k: Vec<f32>, v: Vec<f32>| {
            Scalars(
                [("k_scale", k), ("v_scale", v)]
                    .into_iter()
                    .map(|(n, s)| (format!("model.layers.0.self_attn.{n}"), s))
                    .collect(),
            )
        };
        let got = KvScales::from_checkpoint(&heads(vec![0.5, 2.0, 1.0], vec![0.1, 0.3]), 1);
        assert_eq!(got.unwrap().unwrap(), KvScales { k: vec![2.0], v: vec![0.3] });
        let err = KvScales::from_checkpoint(&heads(vec![0.5, f32::NAN], vec![0.1]), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("k_scale holds NaN, not a positive number"), "{err}");
        let err = KvScales::from_checkpoint(&heads(vec![], vec![0.1]), 1).unwrap_err().to_string();
        assert!(err.contains("holds no value"), "{err}");
        assert_eq!(round_e4m3(1.0625, 1.0), 1.0);
        assert_eq!(round_e4m3(3.3, 0.5), 3.25);
        assert_eq!(round_e4m3(1e6, 1.0), E4M3_MAX, "saturates");
    }

    #[test]
    fn only_layer_projections_are_linear_weights() {
        assert!(is_linear_weight("model.layers.3.self_attn.k_proj.weight"));
        assert!(is_linear_weight("model.layers.0.mlp.down_proj.weight"));
        assert!(!is_linear_weight("model.layers.0.self_attn.k_proj.bias"));
        assert!(!is_linear_weight("model.embed_tokens.weight"));
        assert!(!is_linear_weight("lm_head.weight"));
        assert!(!is_linear_weight("model.layers.0.input_layernorm.weight"));
    }
}

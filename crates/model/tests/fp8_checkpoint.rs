//! FP8 checkpoints as Hugging Face hosts them, written here from the tiny-llama fixture:
//! - `quant_method: "fp8"` (per-tensor f32 scales, static activation scales) and FP8
//!   `compressed-tensors` (per-channel bf16 scales `[rows, 1]`) load to exactly the logits
//!   of an f32 checkpoint holding the same dequantized weights (`q * scale`);
//! - `--quantization fp8` (`ModelSource::quantize_fp8`) equals the per-channel checkpoint
//!   written with f32 scales;
//! - all stay near the unquantized model: e4m3 keeps 3 mantissa bits (at most 2^-4
//!   relative per weight, about 3% RMS), and the fixture's logits moved by 6.8% (per
//!   channel) and 6.9% (per tensor), bound 0.1;
//! - malformed scales, missing scales and block-wise FP8 are clear errors.

mod numerics;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use float8::F8E4M3;
use half::bf16;
use numerics::rel_err;
use radix_model::fp8::{E4M3_MAX, is_linear_weight, quantize_per_channel};
use radix_model::{Backend, CpuBackend, KvPoolSpec, ModelSource, Step};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

fn logits(source: ModelSource) -> Vec<f32> {
    let cfg = source.config.clone();
    let mut model = source.load(CpuBackend::new()).unwrap();
    model.backend.init_kv(&cfg, &KvPoolSpec { num_pages: 8, page_size: 16, sparse: None }).unwrap();
    let tokens = vec![315u32, 272, 261, 275, 290, 300, 17, 99, 260];
    let n = tokens.len();
    let positions: Vec<i32> = (0..n as i32).collect();
    let step = Step {
        tokens,
        positions: positions.clone(),
        slots: positions,
        qo_indptr: vec![0, n as i32],
        kv_indptr: vec![0, 1],
        kv_indices: vec![0],
        kv_last_page_len: vec![n as i32],
        logit_rows: (0..n as u32).collect(),
        kv_keep: vec![],
    };
    model.forward_logits(&step).unwrap()
}

fn open(dir: &Path) -> ModelSource {
    ModelSource::open(dir.to_str().unwrap()).unwrap()
}

/// One tensor to write: dtype, shape, little-endian bytes.
type Tensor = (Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The fixture's tensors as f32, by name.
fn fixture_tensors() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.names()
        .into_iter()
        .map(|n| {
            let v = st.tensor(n).unwrap();
            assert_eq!(v.dtype(), Dtype::F32);
            let data = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()));
            (n.to_string(), (v.shape().to_vec(), data.collect()))
        })
        .collect()
}

/// A model folder: the fixture's tokenizer and config (with `quantization` added), and
/// `tensors`.
fn write_checkpoint(
    name: &str,
    tensors: &BTreeMap<String, Tensor>,
    quantization: Option<Value>,
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rs-fp8-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    if let Some(q) = quantization {
        config["quantization_config"] = q;
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (dtype, shape, bytes))| {
            (n.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

/// How the FP8 checkpoints store scales.
#[derive(Clone, Copy)]
enum Scales {
    /// One f32 scale per tensor, shape `[]`, plus a static `input_scale` (format "fp8").
    TensorF32,
    /// One bf16 scale per row, shape `[rows, 1]` (compressed-tensors, channel).
    ChannelBf16,
    /// One f32 scale per row, shape `[rows, 1]`.
    ChannelF32,
}

/// The fixture with its linear weights in FP8 (`fp8` true) or as the f32 values those FP8
/// weights dequantize to (`fp8` false: the reference).
fn quantized(scales: Scales, fp8: bool) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (name, (shape, w)) in fixture_tensors() {
        if !is_linear_weight(&name) {
            out.insert(name, (Dtype::F32, shape, f32_bytes(&w)));
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let (q, s): (Vec<u8>, Vec<f32>) = match scales {
            Scales::TensorF32 => {
                let amax = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let s = amax / E4M3_MAX;
                (w.iter().map(|x| F8E4M3::from_f32(x / s).to_bits()).collect(), vec![s])
            }
            Scales::ChannelF32 => quantize_per_channel(&w, rows, cols),
            Scales::ChannelBf16 => {
                // Scales stored in bf16: quantize against the rounded scale, as a writer
                // that keeps bf16 scales must.
                let (_, s) = quantize_per_channel(&w, rows, cols);
                let s: Vec<f32> = s.iter().map(|x| bf16::from_f32(*x).to_f32()).collect();
                let q = w
                    .chunks(cols)
                    .zip(&s)
                    .flat_map(|(row, s)| row.iter().map(move |x| F8E4M3::from_f32(x / s).to_bits()))
                    .collect();
                (q, s)
            }
        };
        if fp8 {
            let scale_name = format!("{name}_scale");
            let (scale_shape, scale) = match scales {
                Scales::TensorF32 => (vec![], (Dtype::F32, f32_bytes(&s))),
                Scales::ChannelF32 => (vec![rows, 1], (Dtype::F32, f32_bytes(&s))),
                Scales::ChannelBf16 => (
                    vec![rows, 1],
                    (
                        Dtype::BF16,
                        s.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
                    ),
                ),
            };
            out.insert(scale_name, (scale.0, scale_shape, scale.1));
            if matches!(scales, Scales::TensorF32) {
                let input = name.replace("weight", "input_scale");
                out.insert(input, (Dtype::F32, vec![], f32_bytes(&[0.02])));
            }
            out.insert(name, (Dtype::F8_E4M3, shape, q));
        } else {
            let per_row = s.len() > 1;
            let deq: Vec<f32> = q
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    F8E4M3::from_bits(*b).to_f32() * s[if per_row { i / cols } else { 0 }]
                })
                .collect();
            out.insert(name, (Dtype::F32, shape, f32_bytes(&deq)));
        }
    }
    out
}

fn fp8_config() -> Value {
    json!({"quant_method": "fp8", "activation_scheme": "static"})
}

fn compressed_tensors_config() -> Value {
    json!({"quant_method": "compressed-tensors", "format": "float-quantized",
           "config_groups": {"group_0": {"targets": ["Linear"],
               "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                           "symmetric": true, "dynamic": false},
               "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                     "dynamic": true}}},
           "ignore": ["lm_head"]})
}

#[test]
fn fp8_checkpoints_load_to_their_dequantized_weights() {
    let original = logits(open(&fixture()));
    for (label, scales, config) in [
        ("fp8", Scales::TensorF32, fp8_config()),
        ("ct", Scales::ChannelBf16, compressed_tensors_config()),
    ] {
        let fp8_dir = write_checkpoint(label, &quantized(scales, true), Some(config));
        let ref_dir = write_checkpoint(&format!("{label}-ref"), &quantized(scales, false), None);
        let source = open(&fp8_dir);
        assert!(source.quantization.is_some(), "{label}: the scheme is recognised");
        let got = logits(source);
        let want = logits(open(&ref_dir));
        assert!(got.iter().all(|x| x.is_finite()));
        assert_eq!(got, want, "{label}: FP8 weights must load as q * scale exactly");
        // e4m3 weights stay near the unquantized model on this 2-layer fixture.
        let err = rel_err(&got, &original);
        eprintln!("{label}: logits rel err vs unquantized {err:.3e}");
        assert!(err > 0.0 && err < 0.1, "{label}: logits rel err vs unquantized {err:.3e}");
        std::fs::remove_dir_all(&fp8_dir).unwrap();
        std::fs::remove_dir_all(&ref_dir).unwrap();
    }
}

#[test]
fn quantization_fp8_at_load_matches_a_per_channel_checkpoint() {
    let at_load = open(&fixture()).quantize_fp8().unwrap();
    assert!(at_load.weights.describe().contains("quantized to FP8 per channel"));
    let got = logits(at_load);
    let ref_dir = write_checkpoint("atload-ref", &quantized(Scales::ChannelF32, false), None);
    assert_eq!(got, logits(open(&ref_dir)));
    std::fs::remove_dir_all(&ref_dir).unwrap();
    // An FP8 checkpoint keeps its own scales.
    let dir = write_checkpoint(
        "twice",
        &quantized(Scales::ChannelF32, true),
        Some(compressed_tensors_config()),
    );
    let err = open(&dir).quantize_fp8().err().unwrap().to_string();
    assert!(err.contains("already quantized"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_fp8_checkpoints_name_the_problem() {
    let load_err = |name: &str, tensors: &BTreeMap<String, Tensor>, q: Value| -> String {
        let dir = write_checkpoint(name, tensors, Some(q));
        let err = match ModelSource::open(dir.to_str().unwrap()) {
            Err(e) => e.to_string(),
            Ok(source) => source.load(CpuBackend::new()).err().expect("must fail").to_string(),
        };
        std::fs::remove_dir_all(&dir).unwrap();
        err
    };
    let good = quantized(Scales::ChannelF32, true);
    let wq = "model.layers.0.self_attn.q_proj.weight";

    let mut missing = good.clone();
    missing.remove(&format!("{wq}_scale"));
    let err = load_err("missing", &missing, compressed_tensors_config());
    assert!(err.contains(&format!("{wq} has no {wq}_scale")), "{err}");

    let mut block = missing.clone();
    block.insert(format!("{wq}_scale_inv"), (Dtype::F32, vec![1, 1], f32_bytes(&[1.0])));
    let err = load_err("blockinv", &block, compressed_tensors_config());
    assert!(err.contains("block-wise"), "{err}");

    let mut wrong = good.clone();
    let rows = good[wq].1[0];
    wrong.insert(
        format!("{wq}_scale"),
        (Dtype::F32, vec![rows + 1], f32_bytes(&vec![1.0; rows + 1])),
    );
    let err = load_err("wrongshape", &wrong, compressed_tensors_config());
    assert!(err.contains("one scale or one per row"), "{err}");

    let mut negative = good.clone();
    negative.insert(format!("{wq}_scale"), (Dtype::F32, vec![], f32_bytes(&[-0.5])));
    let err = load_err("negative", &negative, compressed_tensors_config());
    assert!(err.contains("not a positive number"), "{err}");

    let err = load_err(
        "blockcfg",
        &good,
        json!({"quant_method": "fp8", "weight_block_size": [128, 128]}),
    );
    assert!(err.contains("weight_block_size") && err.contains("config.json"), "{err}");

    let err = load_err("gptq", &good, json!({"quant_method": "gptq", "bits": 4}));
    assert!(err.contains("quant_method \"gptq\""), "{err}");
}

//! The FP8 KV cache on the CPU backend (`--kv-cache-dtype fp8_e4m3`, synthetic:tiny, a
//! mixed batch through prefill and decode): keys and values rounded to e4m3 as they are
//! appended move the logits, but only by what 3 mantissa bits explain; an FP8 cache with
//! scales that push every value into e4m3's subnormals (or saturate it) is far off, so the
//! scales are applied; and scales that are not positive numbers, a call after `init_kv`
//! and scales for the wrong number of layers are refused.

mod numerics;
mod paged_batch;

use numerics::rel_err;
use paged_batch::{Batch, PS};
use radix_model::fp8::KvScales;
use radix_model::{Backend, CpuBackend, KvPoolSpec, LlamaModel, ModelSource};

fn model(scales: Option<KvScales>) -> LlamaModel<CpuBackend> {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let mut backend = CpuBackend::new();
    if let Some(s) = scales {
        backend.set_kv_cache_fp8(s).unwrap();
    }
    let mut model = source.load(backend).unwrap();
    let spec = KvPoolSpec { num_pages: 256, page_size: PS, sparse: None };
    model.backend.init_kv(&cfg, &spec).unwrap();
    model
}

/// Logits of 4 steps (a prefill, then decodes) of a 3-sequence batch.
fn run(model: &mut LlamaModel<CpuBackend>) -> Vec<Vec<f32>> {
    let mut batch = Batch::mixed(70);
    let mut out = Vec::new();
    for step in 0..4u32 {
        out.push(batch.step(model));
        for b in 0..3 {
            batch.computed[b] = batch.seqs[b].len();
            batch.seqs[b].push((step * 31 + b as u32 * 7) % 256);
        }
    }
    out
}

#[test]
fn fp8_kv_cache_rounds_keys_and_values() {
    let layers = ModelSource::open("synthetic:tiny").unwrap().config.num_layers;
    let exact = run(&mut model(None));
    let fp8 = run(&mut model(Some(KvScales::ones(layers))));
    let worst = exact.iter().zip(&fp8).map(|(a, b)| rel_err(b, a)).fold(0.0f64, f64::max);
    eprintln!("FP8 KV cache (scale 1) vs f32: logits rel err up to {worst:.3e}");
    assert!(worst > 0.0, "rounding the cache changed nothing");
    // e4m3 rounds each key and value by up to 2^-4 relative; attention averages that down.
    assert!(worst <= 5e-2, "FP8 KV cache moved the logits by {worst:.3e}");
    // Scales that leave every key and value in e4m3's subnormal range (|x| / s < 2^-6)
    // keep a bit or two of each: the logits go far off. So the scales are used.
    let tiny = KvScales { k: vec![1e4; layers], v: vec![1e4; layers] };
    let off = run(&mut model(Some(tiny)));
    let far = exact.iter().zip(&off).map(|(a, b)| rel_err(b, a)).fold(0.0f64, f64::max);
    assert!(far > 4.0 * worst, "scales 1e4: rel err {far:.3e} (scale 1: {worst:.3e})");
}

#[test]
fn fp8_kv_cache_refuses_bad_scales_and_a_late_call() {
    let mut backend = CpuBackend::new();
    let err = backend.set_kv_cache_fp8(KvScales { k: vec![1.0, f32::NAN], v: vec![1.0; 2] });
    assert!(err.unwrap_err().to_string().contains("not a positive number"));
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let mut model = source.load(backend).unwrap();
    let spec = KvPoolSpec { num_pages: 16, page_size: PS, sparse: None };
    model.backend.init_kv(&cfg, &spec).unwrap();
    let err = model.backend.set_kv_cache_fp8(KvScales::ones(cfg.num_layers)).unwrap_err();
    assert!(err.to_string().contains("before init_kv"), "{err}");
}

#[test]
fn fp8_kv_cache_needs_a_scale_per_layer() {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let mut backend = CpuBackend::new();
    backend.set_kv_cache_fp8(KvScales::ones(cfg.num_layers + 1)).unwrap();
    let mut model = source.load(backend).unwrap();
    let spec = KvPoolSpec { num_pages: 16, page_size: PS, sparse: None };
    let err = model.backend.init_kv(&cfg, &spec).unwrap_err().to_string();
    assert!(err.contains("3 scales for 2 layers"), "{err}");
}

//! Parity with Hugging Face transformers: tiny random Llama (GQA, llama3 RoPE scaling),
//! Qwen2 (QKV bias, tied embeddings) and a head_dim-64 Llama with bf16 weights (the one
//! the CUDA backend is also checked on) saved by tools/make_fixtures.py with their
//! logits and greedy continuations. Our CPU forward must match the logits (relative error
//! <= 1e-4, f32) and the greedy tokens exactly, through the KV cache (prefill, then one
//! decode step per token). The FP8 fixtures (tools/make_fp8_fixtures.py: hd64 with its
//! linear layers in FP8, per-tensor "fp8" and per-channel compressed-tensors) hold
//! transformers' logits with those weights dequantized, which the CPU computes too.

mod common;

use common::{Tolerance, check};
use radix_model::CpuBackend;

const CPU: Tolerance = Tolerance { logits: 1e-4, free_running: true };

#[test]
fn tiny_llama_matches_transformers() {
    check("tiny-llama", CpuBackend::new, CPU);
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check("tiny-qwen2", CpuBackend::new, CPU);
}

/// The head_dim-64 fixture the CUDA backend is checked on too (bf16 weights).
#[test]
fn tiny_llama_hd64_matches_transformers() {
    check("tiny-llama-hd64", CpuBackend::new, CPU);
}

/// vLLM-style FP8 (`quant_method: "fp8"`, per-tensor scales, static input scales).
#[test]
fn fp8_per_tensor_checkpoint_matches_transformers() {
    check("tiny-llama-hd64-fp8", CpuBackend::new, CPU);
}

/// compressed-tensors FP8 (per-channel scales, dynamic per-token activations).
#[test]
fn fp8_compressed_tensors_checkpoint_matches_transformers() {
    check("tiny-llama-hd64-fp8-ct", CpuBackend::new, CPU);
}

//! Llama-family models for radix-sparse: Hugging Face configs and safetensors weights,
//! GGUF files, tokenizers and chat templates, synthetic models, sampling, the forward pass written once
//! over the `Backend` ops, and the CPU backend.

pub mod backend;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod fp8;
pub mod gguf;
pub mod loader;
pub mod model;
pub mod sampling;
pub mod synthetic;
pub mod tensor;
pub mod tokenizer;
pub mod tp;
pub mod weights;

pub use backend::{
    Activation, Backend, KvPoolSpec, MAX_SCORED_ROWS_PER_STEP, Step, StepMode, StepRun,
};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use cpu::CpuBackend;
pub use cuda::CudaBackend;
pub use error::{ModelError, Result};
pub use loader::ModelSource;
pub use model::LlamaModel;
pub use sampling::{MAX_TOP_LOGPROBS, SampleRequest, Sampled, SamplingParams, TokenCounts};
pub use tokenizer::{TokenBytes, Tokenizer};
pub use tp::{CpuComm, TpModel, TpShard};

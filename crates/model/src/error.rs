//! Errors of model loading and execution.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A tensor-parallel size the model or the machine cannot take (names the numbers).
    #[error("tensor parallelism: {0}")]
    TensorParallel(String),
    /// A rank of a tensor-parallel group stopped because another one failed; the other
    /// rank's error is the cause.
    #[error("tensor-parallel group stopped: {0}")]
    GroupAborted(String),
    #[error(transparent)]
    Kv(#[from] radix_kv::KvError),
    #[error(transparent)]
    Gpu(#[from] radix_gpu::GpuError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
        let path = path.into();
        move |source| ModelError::Io { path, source }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, message: impl ToString) -> ModelError {
        ModelError::BadFile { path: path.into(), message: message.to_string() }
    }
}

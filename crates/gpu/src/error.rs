//! One error type for the GPU layer: every variant names the call or the input that failed.

use cudarc::cublaslt::result::CublasError;
use cudarc::driver::DriverError;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// A CUDA shared library could not be found or opened.
    #[error("{library} not found (looked for {searched}); {hint}")]
    LibraryMissing { library: &'static str, searched: String, hint: &'static str },

    /// The driver is there but reports no device (or not the one asked for).
    #[error("no CUDA GPU available: {0}")]
    NoDevice(String),

    /// A CUDA driver API call returned an error.
    #[error("CUDA driver call {call} failed: {source}")]
    Driver {
        call: &'static str,
        #[source]
        source: DriverError,
    },

    /// An NVRTC call (other than the compilation itself) failed.
    #[error("NVRTC call {call} failed: {message}")]
    Nvrtc { call: &'static str, message: String },

    /// NVRTC rejected a kernel's source; `log` is NVRTC's own log, with file names and lines.
    #[error("NVRTC could not compile kernel {kernel} for {arch} (options: {options}):\n{log}")]
    Compile { kernel: String, arch: String, options: String, log: String },

    /// A cuBLASLt call failed.
    #[error("cuBLASLt call {call} failed: {source}")]
    Cublas {
        call: &'static str,
        #[source]
        source: CublasError,
    },

    /// An NCCL call failed; `message` is NCCL's own account of it.
    #[error("NCCL call {call} failed: {message}")]
    Nccl { call: &'static str, message: String },

    /// A collective was refused because its group was aborted (another rank failed).
    #[error("the collective was aborted: {0}")]
    CollectiveAborted(String),

    /// Caller passed buffers or shapes that do not fit together.
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// The on-disk kernel cache could not be read or written.
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// Attaches the name of the failing driver call to a cudarc result.
pub(crate) trait DriverCall<T> {
    fn call(self, call: &'static str) -> Result<T>;
}

impl<T> DriverCall<T> for std::result::Result<T, DriverError> {
    fn call(self, call: &'static str) -> Result<T> {
        self.map_err(|source| GpuError::Driver { call, source })
    }
}

impl<T> DriverCall<T> for std::result::Result<T, CublasError> {
    fn call(self, call: &'static str) -> Result<T> {
        self.map_err(|source| GpuError::Cublas { call, source })
    }
}

/// Returns `GpuError::Invalid` with a formatted message when `cond` is false.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::GpuError::Invalid(format!($($fmt)+)));
        }
    };
}

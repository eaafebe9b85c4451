//! radix-sparse's GPU runtime layer, on cudarc with dynamic loading: nothing links
//! against CUDA, so the project builds anywhere and finds the driver, NVRTC and
//! cuBLASLt when it runs (see `libs`).
//!
//! - `Device`: one GPU and the one stream all our work is ordered on.
//! - `DeviceBuffer<T>`: typed allocations with checked copies.
//! - `GpuTimer`, `time_runs`, `time_back_to_back`: CUDA-event timing.
//! - `jit`: `.cu` sources compiled by NVRTC for the device's architecture, cached on disk.
//! - `Gemm`: cuBLASLt matmul with cached plans.
//! - `Graph`: CUDA graph capture and replay; `PinnedStaging`: async uploads.
//! - `nccl`: the communicators of a tensor-parallel group (NCCL, loaded on demand).
//! - `GpuError`: the one error type; it names the call that failed.

pub mod arch;
pub mod buffer;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gemm;
pub mod graph;
pub mod jit;
pub mod libs;
pub mod nccl;
pub mod staging;
pub mod timing;

pub use arch::Arch;
pub use buffer::DeviceBuffer;
pub use device::{Device, DeviceInfo, require_gpu};
pub use dtype::{DType, Element, HalfFloat};
pub use error::{GpuError, Result};
pub use gemm::{BLayout, Gemm, GemmShape};
pub use graph::Graph;
pub use jit::{Jit, Kernel, KernelSpec, Module, SourceFile};
pub use nccl::NcclGroup;
pub use staging::{PinnedStaging, StagedUploader};
pub use timing::{GpuTimer, Timings, profiler_range, time_back_to_back, time_graph, time_runs};

/// Re-exported so kernel crates can implement `DeviceRepr` for their parameter structs
/// and build `LaunchConfig`s without a second cudarc dependency line.
pub use cudarc;
pub use half;

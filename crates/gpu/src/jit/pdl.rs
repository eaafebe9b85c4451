//! Programmatic dependent launch (Hopper and later).
//!
//! A kernel launched with programmatic stream serialization may start while the kernel
//! before it on the stream is still running: its blocks are scheduled once every block
//! of the previous grid has run `griddepcontrol.launch_dependents` (or exited), and they
//! wait in `griddepcontrol.wait` until that grid has finished and its writes are visible.
//! What this hides is the gap between two dependent kernels (the launch, the block
//! dispatch, the previous grid's memory flush): about a microsecond each, paid hundreds
//! of times by a small-batch decode step.
//!
//! Every kernel of ours calls `pdl_wait()` (common/types.cuh) before its first global
//! memory access, so launching one this way changes no result. cuBLASLt and NCCL
//! kernels keep their ordinary launches: ours may only start early after theirs.
//! Captured into a CUDA graph, the launch becomes a programmatic edge.

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig};

use crate::device::Device;
use crate::error::{DriverCall, Result};

/// `RADIX_SPARSE_PDL=0` launches every kernel the ordinary way (for A/B measurements and
/// to rule PDL out when something looks wrong); anything else, or unset, leaves it on
/// wherever the GPU supports it (compute capability 9.0 and later).
pub const PDL_ENV: &str = "RADIX_SPARSE_PDL";

pub(crate) fn enabled(device: &Device) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var(PDL_ENV).map(|v| v.trim() != "0").unwrap_or(true));
    on && device.info().compute_capability.0 >= 9
}

/// `cuLaunchKernelEx` with the programmatic-stream-serialization attribute and one
/// by-value parameter struct.
///
/// # Safety
/// As `Kernel::launch`: `P` matches the kernel's parameters, its pointers are valid for
/// the launch, and the kernel calls `pdl_wait()` before touching global memory.
pub(crate) unsafe fn launch<P: DeviceRepr>(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &P,
) -> Result<()> {
    // SAFETY: forwarded.
    unsafe { launch_ex(stream, func, cfg, None, true, params) }
}

/// `cuLaunchKernelEx` with an optional thread-block cluster shape and, when `pdl`, the
/// programmatic-stream-serialization attribute.
///
/// # Safety
/// As [`launch`]; with `pdl` the kernel calls `pdl_wait()` before touching global memory,
/// and a cluster shape divides the grid.
pub(crate) unsafe fn launch_ex<P: DeviceRepr>(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    cluster: Option<(u32, u32, u32)>,
    pdl: bool,
    params: &P,
) -> Result<()> {
    stream.context().bind_to_thread().call("cuCtxSetCurrent")?;
    // SAFETY: an all-zero attribute is a valid (ignored) value; ids and values are set next.
    let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    let mut n = 0;
    if pdl {
        attrs[n].id =
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attrs[n].value.programmaticStreamSerializationAllowed = 1;
        n += 1;
    }
    if let Some((x, y, z)) = cluster {
        attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attrs[n].value.clusterDim.x = x;
        attrs[n].value.clusterDim.y = y;
        attrs[n].value.clusterDim.z = z;
        n += 1;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: attrs.as_mut_ptr(),
        numAttrs: n as u32,
    };
    let mut args = [params as *const P as *mut c_void];
    // SAFETY: the config, attributes and argument array outlive the call (the driver
    // copies the parameters at launch); the rest is the caller's contract.
    unsafe {
        sys::cuLaunchKernelEx(&config, func.cu_function(), args.as_mut_ptr(), std::ptr::null_mut())
    }
    .result()
    .call("cuLaunchKernelEx")
}

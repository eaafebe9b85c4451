//! CUDA graphs: a stream's launches recorded once and replayed with one call.
//!
//! A graph bakes in every kernel's parameters, so it replays only over buffers that stay
//! where they were at capture (see `DeviceBuffer::view`) and whose contents the host
//! rewrites between replays.

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use crate::device::Device;
use crate::error::{DriverCall, GpuError, Result};

/// An instantiated graph, replayed on the device's stream.
pub struct Graph {
    graph: CudaGraph,
}

// SAFETY: a CUDA graph and its executable are plain driver handles, usable from any
// thread once the context is current (`launch` binds it); we never share one between
// threads at once (no `Sync`).
unsafe impl Send for Graph {}

impl Graph {
    /// Queues one replay on the stream it was captured on.
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().call("cuGraphLaunch")
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

/// Starts recording `device`'s stream: what is queued until `end_capture` is recorded,
/// not run. The work in between must not synchronise the stream, allocate in stream
/// order or read results back (those fail under capture). Every `begin_capture` must be
/// followed by an `end_capture`, also when that work fails, or the stream stays unusable.
pub fn begin_capture(device: &Device) -> Result<()> {
    // Relaxed: kernels compiled or loaded for the first time during the capture (a
    // module load is not a stream operation) must not invalidate it.
    device
        .stream()
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .call("cuStreamBeginCapture")
}

/// Stops recording and instantiates what was recorded.
pub fn end_capture(device: &Device) -> Result<Graph> {
    let graph = device
        .stream()
        .end_capture(CUgraphInstantiate_flags(0))
        .call("cuStreamEndCapture")?
        .ok_or_else(|| {
            GpuError::Invalid("the captured graph is empty: nothing was launched".into())
        })?;
    graph.upload().call("cuGraphUpload")?;
    Ok(Graph { graph })
}

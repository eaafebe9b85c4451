//! CUDA graphs: a stream's launches recorded once and replayed with one call.
//!
//! A graph bakes in every kernel's parameters, so it replays only over buffers that stay
//! where they were at capture (see `DeviceBuffer::view`) and whose contents the host
//! rewrites between replays.
//!
//! # Captures and the rest of the process
//!
//! Several threads may each drive a device (tests do; a server with several GPUs will),
//! all in one CUDA context per GPU. A stream capture is invalidated when *another*
//! thread makes a call that synchronises the context implicitly: freeing pinned host
//! memory, unloading a module, destroying a cuBLASLt handle or a graph. The capturing
//! thread then sees its next launch fail (cuBLASLt reports it as
//! `CUBLAS_STATUS_EXECUTION_FAILED`), which is how this showed up: an intermittent GEMM
//! failure in a graph test while a test beside it tore its backend down. So every such
//! call in this crate runs through [`outside_captures`], which waits until no capture is
//! in flight and keeps new ones from starting meanwhile; the capturing thread itself
//! (and a thread already inside the gate) passes straight through.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::sync::{Condvar, Mutex};

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use crate::device::Device;
use crate::error::{DriverCall, GpuError, Result};

/// Stream captures in flight in this process.
static CAPTURES: Mutex<usize> = Mutex::new(0);
/// Signalled when `CAPTURES` drops to 0.
static IDLE: Condvar = Condvar::new();

thread_local! {
    /// Captures this thread has begun and not ended, plus 1 while it is inside
    /// `outside_captures`: such a thread runs gated calls directly.
    static EXEMPT: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f`, a call that synchronises the CUDA context implicitly (see the module doc),
/// once no stream capture is in flight in the process; no capture begins while it runs.
pub fn outside_captures<R>(f: impl FnOnce() -> R) -> R {
    if EXEMPT.get() > 0 {
        return f();
    }
    let mut n = CAPTURES.lock().unwrap_or_else(|e| e.into_inner());
    while *n > 0 {
        n = IDLE.wait(n).unwrap_or_else(|e| e.into_inner());
    }
    struct Exempt;
    impl Drop for Exempt {
        fn drop(&mut self) {
            EXEMPT.set(EXEMPT.get() - 1);
        }
    }
    EXEMPT.set(EXEMPT.get() + 1);
    let _exempt = Exempt;
    f()
}

/// A value whose drop is such a call (a pinned buffer, a graph, a library handle).
pub(crate) struct DropOutsideCaptures<T>(ManuallyDrop<T>);

impl<T> DropOutsideCaptures<T> {
    pub fn new(value: T) -> Self {
        Self(ManuallyDrop::new(value))
    }
}

impl<T> std::ops::Deref for DropOutsideCaptures<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for DropOutsideCaptures<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T> Drop for DropOutsideCaptures<T> {
    fn drop(&mut self) {
        // SAFETY: dropped once, here; the field is never used again.
        outside_captures(|| unsafe { ManuallyDrop::drop(&mut self.0) });
    }
}

/// An instantiated graph, replayed on the device's stream.
pub struct Graph {
    graph: DropOutsideCaptures<CudaGraph>,
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
    {
        let mut n = CAPTURES.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        EXEMPT.set(EXEMPT.get() + 1);
    }
    // Relaxed: kernels compiled or loaded for the first time during the capture (a
    // module load is not a stream operation) must not invalidate it.
    let begun = device
        .stream()
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .call("cuStreamBeginCapture");
    if begun.is_err() {
        capture_ended();
    }
    begun
}

/// Stops recording and instantiates what was recorded. The capture is over whatever
/// the result (a failed one leaves nothing to replay).
pub fn end_capture(device: &Device) -> Result<Graph> {
    let ended = device.stream().end_capture(CUgraphInstantiate_flags(0));
    capture_ended();
    let graph = ended.call("cuStreamEndCapture")?.ok_or_else(|| {
        GpuError::Invalid("the captured graph is empty: nothing was launched".into())
    })?;
    let graph = DropOutsideCaptures::new(graph);
    graph.upload().call("cuGraphUpload")?;
    Ok(Graph { graph })
}

/// One capture of this thread is over: gated calls may run again once none is left.
fn capture_ended() {
    let mut n = CAPTURES.lock().unwrap_or_else(|e| e.into_inner());
    *n = n.saturating_sub(1);
    EXEMPT.set(EXEMPT.get().saturating_sub(1));
    if *n == 0 {
        IDLE.notify_all();
    }
}

//! CUDA-event timing: warm up, then the median of many timed runs.

use cudarc::driver::CudaEvent;
use cudarc::driver::sys::CUevent_flags;

use crate::device::Device;
use crate::error::{DriverCall, Result};

/// A pair of timing events recorded on the device's stream.
pub struct GpuTimer {
    device: Device,
    start: CudaEvent,
    stop: CudaEvent,
}

impl GpuTimer {
    pub fn new(device: &Device) -> Result<Self> {
        let ev = || device.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        Ok(Self {
            device: device.clone(),
            start: ev().call("cuEventCreate")?,
            stop: ev().call("cuEventCreate")?,
        })
    }

    pub fn start(&self) -> Result<()> {
        self.start.record(self.device.stream()).call("cuEventRecord")
    }

    /// Records the stop event without waiting (read it later with `elapsed_ms`).
    pub fn record_stop(&self) -> Result<()> {
        self.stop.record(self.device.stream()).call("cuEventRecord")
    }

    /// Milliseconds between the recorded start and stop; waits for the stop event.
    pub fn elapsed_ms(&self) -> Result<f32> {
        self.stop.synchronize().call("cuEventSynchronize")?;
        self.start.elapsed_ms(&self.stop).call("cuEventElapsedTime")
    }

    /// Records the stop event, waits for it and returns milliseconds since `start`.
    pub fn stop_ms(&self) -> Result<f32> {
        self.stop.record(self.device.stream()).call("cuEventRecord")?;
        self.stop.synchronize().call("cuEventSynchronize")?;
        self.start.elapsed_ms(&self.stop).call("cuEventElapsedTime")
    }
}

/// Summary of repeated timings, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    pub median_ms: f64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub runs: usize,
}

impl Timings {
    pub fn from_samples(mut samples: Vec<f64>) -> Timings {
        assert!(!samples.is_empty(), "no timing samples");
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median =
            if n % 2 == 1 { samples[n / 2] } else { 0.5 * (samples[n / 2 - 1] + samples[n / 2]) };
        Timings {
            median_ms: median,
            min_ms: samples[0],
            mean_ms: samples.iter().sum::<f64>() / n as f64,
            runs: n,
        }
    }
}

/// Runs `f` `warmup` times, then times `runs` runs one by one with events.
/// `f` only enqueues work; each run is timed from its first to its last launch.
pub fn time_runs(
    device: &Device,
    warmup: usize,
    runs: usize,
    f: impl FnMut(usize) -> Result<()>,
) -> Result<Timings> {
    time_back_to_back(device, warmup, runs, 1, f)
}

/// Times `per_sample` runs of `f` enqueued back to back between one pair of events, `samples`
/// times, after `warmup` runs; returns the per-run times. Unlike `time_runs`, the GPU does
/// not wait for the host between runs, as in a CUDA graph or a busy stream: what a kernel
/// costs inside a step rather than alone on an idle GPU.
pub fn time_back_to_back(
    device: &Device,
    warmup: usize,
    samples: usize,
    per_sample: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Timings> {
    for i in 0..warmup {
        f(i)?;
    }
    device.synchronize()?;
    let timer = GpuTimer::new(device)?;
    let per_sample = per_sample.max(1);
    let mut out = Vec::with_capacity(samples);
    for s in 0..samples.max(1) {
        timer.start()?;
        for i in 0..per_sample {
            f(warmup + s * per_sample + i)?;
        }
        out.push(timer.stop_ms()? as f64 / per_sample as f64);
    }
    Ok(Timings::from_samples(out))
}

/// Times `per_graph` runs of `f` captured into one CUDA graph, replayed `samples` times
/// after `warmup` replays; returns the per-run times. What a sequence of kernels costs
/// inside the engine's decode graph: no host work between its launches at all (back to
/// back eager launches of short kernels can measure the host instead). `f(0)` runs once
/// eagerly first, so compilation and one-time queries happen outside the capture.
pub fn time_graph(
    device: &Device,
    warmup: usize,
    samples: usize,
    per_graph: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Timings> {
    f(0)?;
    device.synchronize()?;
    let per_graph = per_graph.max(1);
    crate::graph::begin_capture(device)?;
    let captured = (0..per_graph).try_for_each(&mut f);
    let graph = crate::graph::end_capture(device);
    captured?;
    let graph = graph?;
    for _ in 0..warmup {
        graph.launch()?;
    }
    device.synchronize()?;
    let timer = GpuTimer::new(device)?;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        timer.start()?;
        graph.launch()?;
        out.push(timer.stop_ms()? as f64 / per_graph as f64);
    }
    Ok(Timings::from_samples(out))
}

/// Brackets work for an external profiler started with `--profile-from-start off` (Nsight
/// Compute's `ncu`, Nsight Systems): `cuProfilerStart` / `cuProfilerStop` on the device's
/// context. Outside a profiler both are no-ops.
pub fn profiler_range(device: &Device, start: bool) -> Result<()> {
    device.context().bind_to_thread().call("cuCtxSetCurrent")?;
    // SAFETY: no arguments; the context is current on this thread.
    let r = unsafe {
        if start {
            cudarc::driver::sys::cuProfilerStart()
        } else {
            cudarc::driver::sys::cuProfilerStop()
        }
    };
    r.result().call(if start { "cuProfilerStart" } else { "cuProfilerStop" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let t = Timings::from_samples(vec![3.0, 1.0, 2.0]);
        assert_eq!((t.median_ms, t.min_ms, t.runs), (2.0, 1.0, 3));
        let t = Timings::from_samples(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(t.median_ms, 2.5);
        assert_eq!(t.mean_ms, 2.5);
    }
}

//! Per-op GPU timing of the CUDA backend (`CudaBackend::set_profiling`): events around
//! every op of a step, resolved once the step's stream has synchronised (in `sample`).
//! Profiled steps run eagerly, so the events time each op, not a graph.

use radix_gpu::{Device, GpuTimer};

use crate::error::Result;

/// GPU time per op category, from events around every op (when profiling is on).
#[derive(Clone, Debug, Default)]
pub struct OpTimes {
    pub gemm_ms: f64,
    pub attention_ms: f64,
    pub kv_append_ms: f64,
    pub norm_ms: f64,
    pub other_ms: f64,
    pub sample_ms: f64,
    /// Tensor parallelism: the NCCL all-reduces (with the wait for the other ranks).
    pub all_reduce_ms: f64,
}

impl OpTimes {
    pub fn total_ms(&self) -> f64 {
        self.gemm_ms
            + self.attention_ms
            + self.kv_append_ms
            + self.norm_ms
            + self.other_ms
            + self.sample_ms
            + self.all_reduce_ms
    }

    fn slot(&mut self, op: Op) -> &mut f64 {
        match op {
            Op::Gemm => &mut self.gemm_ms,
            Op::Attention => &mut self.attention_ms,
            Op::KvAppend => &mut self.kv_append_ms,
            Op::Norm => &mut self.norm_ms,
            Op::Other => &mut self.other_ms,
            Op::Sample => &mut self.sample_ms,
            Op::AllReduce => &mut self.all_reduce_ms,
        }
    }
}

/// The category an op's time is added to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Op {
    Gemm,
    Attention,
    KvAppend,
    Norm,
    Other,
    Sample,
    AllReduce,
}

/// Events recorded around ops of the current step, and the totals so far.
#[derive(Default)]
pub(super) struct Profiler {
    pending: Vec<(Op, GpuTimer)>,
    spare: Vec<GpuTimer>,
    times: OpTimes,
}

impl Profiler {
    /// Records the start event of an op (a timer is reused when one is spare).
    pub fn start(&mut self, device: &Device) -> Result<GpuTimer> {
        let timer = match self.spare.pop() {
            Some(t) => t,
            None => GpuTimer::new(device)?,
        };
        timer.start()?;
        Ok(timer)
    }

    /// Records the stop event of the op `start` began.
    pub fn stop(&mut self, op: Op, timer: GpuTimer) -> Result<()> {
        timer.record_stop()?;
        self.pending.push((op, timer));
        Ok(())
    }

    /// Adds up the events recorded since the last call (the stream has synced).
    pub fn collect(&mut self) -> Result<()> {
        for (op, timer) in self.pending.drain(..) {
            *self.times.slot(op) += timer.elapsed_ms()? as f64;
            self.spare.push(timer);
        }
        Ok(())
    }

    pub fn times(&self) -> &OpTimes {
        &self.times
    }
}

//! The CPU backend's all-reduce: ranks are threads of one process, so a rank publishes
//! its partial sum in a shared slot, waits for the others, and adds the slots up itself.
//!
//! Every rank sums the slots in rank order 0, 1, .., size-1, so the result is the same
//! bits on every rank and from run to run (no dependence on thread timing). The sum is
//! computed `size` times over, which costs nothing that matters at the CPU backend's
//! speeds and needs no second exchange.
//!
//! The rendezvous is a generation-counting barrier that can be aborted: when one rank
//! fails between collectives, `abort` wakes the ranks waiting for it with an error
//! instead of leaving them blocked forever (std's `Barrier` cannot be cancelled).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};

use super::{GroupControl, TpShard};
use crate::error::{ModelError, Result};

/// One rank's handle on an in-process group (cheap to clone).
#[derive(Clone)]
pub struct CpuComm {
    shard: TpShard,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    arrived: Condvar,
    /// Each rank's contribution to the collective in flight (allocations reused).
    slots: Vec<RwLock<Vec<f32>>>,
}

#[derive(Default)]
struct State {
    waiting: usize,
    generation: u64,
    aborted: Option<String>,
}

impl CpuComm {
    /// The handles of a group of `size` ranks, rank order, and its control.
    pub fn group(size: usize) -> Result<(Vec<CpuComm>, Arc<dyn GroupControl>)> {
        let shards = TpShard::group(size)?;
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            slots: (0..size).map(|_| RwLock::new(Vec::new())).collect(),
        });
        let comms = shards.into_iter().map(|shard| CpuComm { shard, shared: shared.clone() });
        Ok((comms.collect(), shared))
    }

    pub fn shard(&self) -> TpShard {
        self.shard
    }

    /// Replaces `data` with its sum over the ranks; every rank must call it with the
    /// same length, in the same order of collectives.
    pub fn all_reduce(&self, data: &mut [f32]) -> Result<()> {
        let s = &self.shared;
        if s.size == 1 {
            return Ok(());
        }
        {
            let mut mine = s.slots[self.shard.rank].write().unwrap_or_else(PoisonError::into_inner);
            mine.clear();
            mine.extend_from_slice(data);
        }
        s.wait()?;
        // Every slot is written and none will be until every rank has passed the second
        // rendezvous below.
        let mut result = Ok(());
        for (r, slot) in s.slots.iter().enumerate() {
            let slot = slot.read().unwrap_or_else(PoisonError::into_inner);
            if slot.len() != data.len() {
                // Every rank sees the same mismatch and fails the same way.
                result = Err(ModelError::TensorParallel(format!(
                    "all-reduce of {} values on rank {} but {} on rank {r}",
                    data.len(),
                    self.shard.rank,
                    slot.len()
                )));
                break;
            }
            if r == 0 {
                data.copy_from_slice(&slot);
            } else {
                data.iter_mut().zip(slot.iter()).for_each(|(d, x)| *d += x);
            }
        }
        s.wait()?;
        result
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until every rank has arrived, or the group is aborted.
    fn wait(&self) -> Result<()> {
        let mut st = self.lock();
        let aborted = |why: &str| Err(ModelError::GroupAborted(why.to_string()));
        if let Some(why) = &st.aborted {
            return aborted(why);
        }
        let generation = st.generation;
        st.waiting += 1;
        if st.waiting == self.size {
            st.waiting = 0;
            st.generation += 1;
            self.arrived.notify_all();
            return Ok(());
        }
        while st.generation == generation && st.aborted.is_none() {
            st = self.arrived.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        match &st.aborted {
            Some(why) if st.generation == generation => aborted(why),
            _ => Ok(()),
        }
    }
}

impl GroupControl for Shared {
    fn abort(&self, why: &str) {
        let mut st = self.lock();
        st.aborted.get_or_insert_with(|| why.to_string());
        self.arrived.notify_all();
    }

    fn reset(&self) {
        *self.lock() = State::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_in_rank_order_on_every_rank() {
        let (comms, _) = CpuComm::group(4).unwrap();
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for round in 0..50 {
                            let r = c.shard().rank as f32;
                            let mut x = vec![r + round as f32, 1e8 * (r - 1.5), 0.1 * r];
                            c.all_reduce(&mut x).unwrap();
                            out.extend(x);
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<f32> = (0..50)
            .flat_map(|round| {
                let sum = |f: &dyn Fn(f32) -> f32| (0..4).fold(0.0, |a, r| a + f(r as f32));
                [sum(&|r| r + round as f32), sum(&|r| 1e8 * (r - 1.5)), sum(&|r| 0.1 * r)]
            })
            .collect();
        for r in &results {
            assert_eq!(r, &want);
        }
    }

    #[test]
    fn an_abort_wakes_the_waiting_ranks_and_reset_rearms() {
        let (comms, control) = CpuComm::group(3).unwrap();
        let errors: Vec<String> = std::thread::scope(|s| {
            let waiting: Vec<_> = comms[1..]
                .iter()
                .map(|c| s.spawn(move || c.all_reduce(&mut [1.0]).unwrap_err().to_string()))
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(20));
            control.abort("rank 0 failed: out of memory");
            waiting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errors.iter().all(|e| e.contains("rank 0 failed")), "{errors:?}");
        control.reset();
        std::thread::scope(|s| {
            for c in &comms {
                s.spawn(move || {
                    let mut x = [2.0];
                    c.all_reduce(&mut x).unwrap();
                    assert_eq!(x, [6.0]);
                });
            }
        });
    }

    #[test]
    fn a_length_mismatch_is_an_error_on_every_rank() {
        let (comms, _) = CpuComm::group(2).unwrap();
        std::thread::scope(|s| {
            for c in &comms {
                s.spawn(move || {
                    let mut x = vec![0.0; 1 + c.shard().rank];
                    let e = c.all_reduce(&mut x).unwrap_err().to_string();
                    assert!(e.contains("all-reduce of"), "{e}");
                });
            }
        });
    }
}

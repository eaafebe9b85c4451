//! The waiting sequences, kept per group (the choices of one HTTP request share a group),
//! so that admission can take the next sequence of the group that should run next instead
//! of the next sequence in arrival order: one request of 1,024 choices no longer stands
//! in front of every request sent after it.

use std::collections::{HashMap, VecDeque};

use crate::request::RequestId;
use crate::sequence::Sequence;

/// What decides which group is admitted next, smallest first: priority (lower first),
/// then sequences already running (fewest first), then the arrival of its first waiting
/// sequence (oldest first; preempted sequences keep their arrival, so they come back
/// before newer ones).
pub(super) type AdmissionKey = (i32, usize, u64);

#[derive(Default)]
pub(super) struct WaitQueue {
    groups: HashMap<RequestId, VecDeque<Sequence>>,
    len: usize,
}

/// A group with sequences waiting.
#[derive(Clone, Copy, Debug)]
pub(super) struct WaitingGroup {
    pub group: RequestId,
    pub priority: i32,
    pub waiting: usize,
    pub head_arrival: u64,
}

impl WaitQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A new arrival: behind its group's other waiting sequences.
    pub fn push_back(&mut self, seq: Sequence) {
        self.len += 1;
        self.groups.entry(seq.group).or_default().push_back(seq);
    }

    /// A sequence sent back (preempted, or not admitted after all): first of its group.
    pub fn push_front(&mut self, seq: Sequence) {
        self.len += 1;
        self.groups.entry(seq.group).or_default().push_front(seq);
    }

    pub fn remove(&mut self, id: RequestId) -> Option<Sequence> {
        let (&group, queue) = self.groups.iter_mut().find(|(_, q)| q.iter().any(|s| s.id == id))?;
        let i = queue.iter().position(|s| s.id == id)?;
        let seq = queue.remove(i);
        if queue.is_empty() {
            self.groups.remove(&group);
        }
        self.len -= 1;
        seq
    }

    pub fn iter(&self) -> impl Iterator<Item = &Sequence> {
        self.groups.values().flatten()
    }

    pub fn groups(&self) -> impl Iterator<Item = WaitingGroup> + '_ {
        self.groups.iter().filter_map(|(&group, q)| {
            let head = q.front()?;
            Some(WaitingGroup {
                group,
                priority: head.priority,
                waiting: q.len(),
                head_arrival: head.arrival,
            })
        })
    }

    /// Takes the first waiting sequence of the group with the smallest admission key;
    /// `running` counts each group's running sequences.
    pub fn pop_next(&mut self, running: &HashMap<RequestId, usize>) -> Option<Sequence> {
        let key = |g: &WaitingGroup| -> AdmissionKey {
            (g.priority, running.get(&g.group).copied().unwrap_or(0), g.head_arrival)
        };
        let next = self.groups().min_by_key(key)?.group;
        let queue = self.groups.get_mut(&next)?;
        let seq = queue.pop_front();
        if queue.is_empty() {
            self.groups.remove(&next);
        }
        self.len -= seq.is_some() as usize;
        seq
    }
}

#[cfg(test)]
mod tests {
    use radix_model::SamplingParams;

    use super::*;
    use crate::request::{Request, StopConfig};

    fn seq(id: u64, group: u64, priority: i32) -> Sequence {
        let mut req = Request::new(vec![1], SamplingParams::default(), StopConfig::default());
        req.group = Some(RequestId(group));
        req.priority = priority;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        Sequence::new(RequestId(id), req, id, tx)
    }

    fn order(q: &mut WaitQueue, running: &HashMap<RequestId, usize>) -> Vec<u64> {
        std::iter::from_fn(|| q.pop_next(running)).map(|s| s.id.0).collect()
    }

    #[test]
    fn priority_then_fewest_running_then_arrival() {
        let mut q = WaitQueue::default();
        for (id, group, priority) in [(1, 10, 0), (2, 10, 0), (3, 20, 0), (4, 30, -1), (5, 20, 0)] {
            q.push_back(seq(id, group, priority));
        }
        assert_eq!(q.len(), 5);
        // Group 10 already runs 3 sequences, group 20 none: 20 goes first within
        // priority 0, after the more important group 30.
        let running = HashMap::from([(RequestId(10), 3)]);
        assert_eq!(order(&mut q, &running), vec![4, 3, 5, 1, 2]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_sequence_sent_back_comes_first_in_its_group_and_removal_finds_any() {
        let mut q = WaitQueue::default();
        q.push_back(seq(2, 10, 0));
        q.push_back(seq(3, 10, 0));
        q.push_front(seq(1, 10, 0));
        assert_eq!(q.remove(RequestId(3)).map(|s| s.id), Some(RequestId(3)));
        assert!(q.remove(RequestId(9)).is_none());
        assert_eq!(order(&mut q, &HashMap::new()), vec![1, 2]);
    }
}

//! Fair shares of the running slots. A group is the sequences of one client request (its
//! choices and prompts). When every slot is taken and a group waits, running sequences
//! are preempted so that:
//! - a waiting group outranks running groups of a later priority (lower `priority` runs
//!   first, as in vLLM's priority scheduling): their sequences give way;
//! - within a priority, every group with work gets `max_running / groups` slots: a group
//!   over its share gives way to a waiting one under it.
//!
//! The newest sequence of a group gives way first. Admission (the wait queue) then
//! prefers the groups with the fewest running sequences, so the freed slots go where they
//! were freed for. Nothing moves while a slot is free, so groups cannot trade slots back
//! and forth.

use std::collections::HashMap;

use super::wait_queue::WaitingGroup;
use crate::request::RequestId;

/// What the choice looks at of a running sequence.
#[derive(Clone, Copy, Debug)]
pub(super) struct RunningSeq {
    pub group: RequestId,
    pub priority: i32,
    pub arrival: u64,
}

/// Indices into `running` of the sequences to preempt (see the module doc).
pub(super) fn fairness_victims(
    running: &[RunningSeq],
    waiting: &[WaitingGroup],
    max_running: usize,
) -> Vec<usize> {
    if running.len() < max_running || waiting.is_empty() {
        return Vec::new();
    }
    let mut counts: HashMap<RequestId, usize> = HashMap::new();
    let mut priority: HashMap<RequestId, i32> = HashMap::new();
    for s in running {
        *counts.entry(s.group).or_default() += 1;
        priority.insert(s.group, s.priority);
    }
    let groups = counts.len() + waiting.iter().filter(|w| !counts.contains_key(&w.group)).count();
    let share = (max_running / groups).max(1);
    let mut order = waiting.to_vec();
    order.sort_by_key(|w| (w.priority, counts.get(&w.group).copied().unwrap_or(0), w.head_arrival));
    let mut taken = vec![false; running.len()];
    let mut victims = Vec::new();
    for w in order {
        for _ in 0..w.waiting {
            let mine = counts.get(&w.group).copied().unwrap_or(0);
            // The group to take a slot from: a later priority first, then the largest.
            let from = counts
                .iter()
                .filter(|&(&h, &n)| {
                    let p = priority[&h];
                    h != w.group
                        && n > 0
                        && (p > w.priority || (p == w.priority && n > share && mine < share))
                })
                .max_by_key(|&(&h, &n)| (priority[&h], n, std::cmp::Reverse(h)))
                .map(|(&h, _)| h);
            let Some(from) = from else { break };
            let newest = (0..running.len())
                .filter(|&i| !taken[i] && running[i].group == from)
                .max_by_key(|&i| running[i].arrival)
                .expect("a group with running sequences has one not yet taken");
            taken[newest] = true;
            victims.push(newest);
            *counts.get_mut(&from).expect("counted above") -= 1;
            *counts.entry(w.group).or_default() += 1;
            priority.insert(w.group, w.priority);
        }
    }
    victims
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(groups: &[(u64, i32, usize)]) -> Vec<RunningSeq> {
        let mut arrival = 0;
        let mut out = Vec::new();
        for &(g, priority, n) in groups {
            for _ in 0..n {
                out.push(RunningSeq { group: RequestId(g), priority, arrival });
                arrival += 1;
            }
        }
        out
    }

    fn waiting(g: u64, priority: i32, n: usize) -> WaitingGroup {
        WaitingGroup { group: RequestId(g), priority, waiting: n, head_arrival: 1000 + g }
    }

    fn per_group(r: &[RunningSeq], victims: &[usize]) -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for &v in victims {
            *m.entry(r[v].group.0).or_default() += 1;
        }
        m
    }

    #[test]
    fn free_slots_or_nobody_waiting_preempt_nothing() {
        let r = running(&[(1, 0, 63)]);
        assert!(fairness_victims(&r, &[waiting(2, 0, 1)], 64).is_empty());
        let r = running(&[(1, 0, 64)]);
        assert!(fairness_victims(&r, &[], 64).is_empty());
    }

    #[test]
    fn a_small_request_gets_a_slot_from_a_large_one() {
        let r = running(&[(1, 0, 64)]);
        let v = fairness_victims(&r, &[waiting(1, 0, 900), waiting(2, 0, 1)], 64);
        assert_eq!(v, vec![63], "the newest sequence of the large request gives way");
    }

    #[test]
    fn two_large_requests_end_with_equal_shares() {
        let r = running(&[(1, 0, 64)]);
        let v = fairness_victims(&r, &[waiting(1, 0, 200), waiting(2, 0, 200)], 64);
        assert_eq!(per_group(&r, &v), HashMap::from([(1, 32)]));
        // At equal shares nothing moves (no trading slots back and forth).
        let r = running(&[(1, 0, 32), (2, 0, 32)]);
        assert!(fairness_victims(&r, &[waiting(1, 0, 1), waiting(2, 0, 1)], 64).is_empty());
    }

    #[test]
    fn three_groups_share_what_divides() {
        let r = running(&[(1, 0, 64)]);
        let v = fairness_victims(&r, &[waiting(2, 0, 100), waiting(3, 0, 100)], 64);
        assert_eq!(v.len(), 42, "two groups get 21 slots each: {:?}", per_group(&r, &v));
    }

    #[test]
    fn priority_outranks_shares() {
        // A more important request takes every slot it needs from a less important one.
        let r = running(&[(1, 5, 60), (2, 0, 4)]);
        let v = fairness_victims(&r, &[waiting(3, 0, 10)], 64);
        assert_eq!(per_group(&r, &v), HashMap::from([(1, 10)]));
        // A less important one waits, however few slots it holds.
        let r = running(&[(1, 0, 64)]);
        assert!(fairness_victims(&r, &[waiting(2, 1, 1)], 64).is_empty());
    }
}

//! One step's schedule: which sequences run and how many tokens each computes, under
//! the token budget, the running-request limit and the pages the `KvManager` can give.
//! Fair shares first (`fairness`: sequences over their request's share give way when
//! all slots are taken), then decodes (preempting the least important, newest request
//! when the pool is dry), then prefill chunks of running requests, then waiting
//! sequences: by priority, then of the request with the fewest running, then oldest.

use std::collections::HashMap;

use radix_model::MAX_SCORED_ROWS_PER_STEP;

use super::Engine;
use super::fairness::{RunningSeq, fairness_victims};
use crate::request::RequestId;
use crate::sequence::Sequence;

/// One sequence's share of a step.
pub(super) struct Scheduled {
    /// Index into `running`.
    pub index: usize,
    /// Tokens computed this step.
    pub len: usize,
}

/// What the preemption choice looks at of a running request.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    /// Lower is more important.
    priority: i32,
    arrival: u64,
    /// Already has its tokens (and pages) for this step.
    scheduled: bool,
}

impl Candidate {
    /// Larger gives way first: a later priority, then a later arrival.
    fn rank(&self) -> (i32, u64) {
        (self.priority, self.arrival)
    }
}

/// The request to preempt when `running[needy]` cannot get a page: the least important
/// request not scheduled this step (latest priority, then newest), if it ranks below the
/// needy one (more important and older requests keep their pages); else the needy
/// request itself.
fn preemption_victim(running: &[Candidate], needy: usize) -> usize {
    running
        .iter()
        .enumerate()
        .filter(|(j, c)| *j != needy && !c.scheduled)
        .max_by_key(|(_, c)| c.rank())
        .map(|(j, _)| j)
        .filter(|&j| running[j].rank() > running[needy].rank())
        .unwrap_or(needy)
}

impl Engine {
    pub(super) fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.cfg.max_batched_tokens;
        for seq in &mut self.running {
            seq.step_len = 0;
        }
        // 0. Fair shares: when every slot is taken, sequences over their request's share
        //    (or of a later priority) give way to waiting requests.
        self.rebalance();
        // 1. Decodes, oldest first: each needs one token and at most one new page. When
        //    the pool is dry, a newer request is preempted.
        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            if seq.pending() != 1 {
                i += 1;
                continue;
            }
            if self.kv.reserve(&mut seq.kv, seq.computed + 1) {
                seq.step_len = 1;
                budget -= 1;
                i += 1;
                continue;
            }
            let candidates: Vec<Candidate> = self
                .running
                .iter()
                .map(|s| Candidate {
                    priority: s.priority,
                    arrival: s.arrival,
                    scheduled: s.step_len > 0,
                })
                .collect();
            let victim = preemption_victim(&candidates, i);
            self.preempt(victim, "out of KV pages");
            if victim < i {
                i -= 1;
            }
        }
        // 2. Prefill chunks of running requests, oldest first, under the budget. A prompt
        //    being scored (prompt log-probabilities) makes a logit row per token: those
        //    chunks share `MAX_SCORED_ROWS_PER_STEP` rows.
        let mut any = self.running.iter().any(|s| s.step_len > 0);
        let mut scored_rows = MAX_SCORED_ROWS_PER_STEP;
        for i in 0..self.running.len() {
            let pending = self.running[i].pending();
            if pending <= 1 || budget == 0 {
                continue;
            }
            let mut len = self.chunk(pending, budget, !any);
            let scores = self.running[i].scores_prompt();
            if scores {
                len = len.min(scored_rows);
            }
            let seq = &mut self.running[i];
            if len > 0 && self.kv.reserve(&mut seq.kv, seq.computed + len) {
                if scores {
                    scored_rows -= len;
                }
                seq.step_len = len;
                budget = budget.saturating_sub(len);
                any = true;
            }
        }
        // 3. Waiting sequences by priority, then of the request with the fewest running,
        //    then oldest (`WaitQueue::pop_next`), each first served what the prefix cache
        //    holds of its prompt.
        let mut per_group = self.running_per_group();
        // Prompts to be scored that found no scoring rows left this step: they wait for
        // the next one without holding up the requests behind them.
        let mut deferred = Vec::new();
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(mut seq) = self.waiting.pop_next(&per_group) else { break };
            if seq.scores_prompt() && scored_rows == 0 {
                deferred.push(seq);
                continue;
            }
            // A prompt still to be scored is computed whole: no logits come from cache.
            let cached =
                if seq.scores_prompt() { 0 } else { self.kv.admit(&mut seq.kv, &seq.tokens) };
            seq.computed = cached;
            if seq.preempted == 0 {
                seq.cached_tokens = cached;
            }
            let mut len = self.chunk(seq.pending(), budget, !any);
            if seq.scores_prompt() {
                len = len.min(scored_rows);
            }
            let upto = seq.computed + len;
            if len == 0 || !self.kv.reserve(&mut seq.kv, upto) {
                self.requeue(seq);
                break;
            }
            if seq.scores_prompt() {
                scored_rows -= len;
            }
            seq.step_len = len;
            budget = budget.saturating_sub(len);
            any = true;
            *per_group.entry(seq.group).or_default() += 1;
            self.running.push(seq);
        }
        // Back at the front, in their order.
        for seq in deferred.into_iter().rev() {
            self.waiting.push_front(seq);
        }
        self.running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.step_len > 0)
            .map(|(index, s)| Scheduled { index, len: s.step_len })
            .collect()
    }

    /// Tokens to compute for a sequence with `pending` tokens left and `budget` left.
    fn chunk(&self, pending: usize, budget: usize, first: bool) -> usize {
        if pending <= budget {
            pending
        } else if self.cfg.chunked_prefill {
            budget
        } else if first {
            pending // a whole prompt alone may exceed the budget
        } else {
            0
        }
    }

    fn running_per_group(&self) -> HashMap<RequestId, usize> {
        let mut counts = HashMap::new();
        for s in &self.running {
            *counts.entry(s.group).or_default() += 1;
        }
        counts
    }

    /// Preempts what `fairness_victims` chooses. Their computed pages go to the prefix
    /// cache first, so coming back costs little recomputation.
    fn rebalance(&mut self) {
        if self.running.len() < self.cfg.max_running || self.waiting.is_empty() {
            return;
        }
        let running: Vec<RunningSeq> = self
            .running
            .iter()
            .map(|s| RunningSeq { group: s.group, priority: s.priority, arrival: s.arrival })
            .collect();
        let waiting: Vec<_> = self.waiting.groups().collect();
        let mut victims = fairness_victims(&running, &waiting, self.cfg.max_running);
        // Remove from the back so earlier indices stay valid.
        victims.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
        for i in victims {
            let seq = &mut self.running[i];
            self.kv.cache_computed(&mut seq.kv, &seq.tokens, seq.computed);
            self.preempt(i, "over its request's fair share of the running slots");
        }
    }

    /// Sends `running[i]` back to the front of the queue, releasing its pages.
    fn preempt(&mut self, i: usize, why: &'static str) {
        let mut seq = self.running.remove(i);
        // Its usage keeps the cache hits of its first admission, not of its return.
        seq.preempted += 1;
        tracing::debug!(id = %seq.id, tokens = seq.tokens.len(), "preempted: {why}");
        self.stats.preemptions += 1;
        self.requeue(seq);
    }

    /// Puts `seq` back at the front of the queue holding nothing: it recomputes from
    /// what the cache still holds when it runs again.
    fn requeue(&mut self, mut seq: Sequence) {
        self.kv.free(&mut seq.kv);
        seq.computed = 0;
        seq.step_len = 0;
        self.waiting.push_front(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(arrivals: &[(u64, bool)]) -> Vec<Candidate> {
        arrivals
            .iter()
            .map(|&(arrival, scheduled)| Candidate { priority: 0, arrival, scheduled })
            .collect()
    }

    #[test]
    fn the_newest_unscheduled_request_is_preempted() {
        // The oldest (arrival 0) needs a page: the newest not yet scheduled gives way.
        let r = running(&[(0, false), (1, true), (3, false), (2, false)]);
        assert_eq!(preemption_victim(&r, 0), 2);
    }

    #[test]
    fn scheduled_requests_keep_their_pages() {
        let r = running(&[(0, false), (5, true), (4, true)]);
        assert_eq!(preemption_victim(&r, 0), 0, "nothing else may go: the needy one waits");
    }

    #[test]
    fn older_requests_are_never_preempted_for_a_newer_one() {
        let r = running(&[(0, false), (1, false), (2, false)]);
        assert_eq!(preemption_victim(&r, 2), 2, "the newest needy request preempts itself");
        assert_eq!(preemption_victim(&r, 1), 2);
    }

    #[test]
    fn a_later_priority_gives_way_first() {
        let mut r = running(&[(0, false), (1, false), (2, false)]);
        r[1].priority = 3;
        assert_eq!(preemption_victim(&r, 0), 1, "the least important, though not the newest");
        r[0].priority = 5;
        assert_eq!(preemption_victim(&r, 1), 0, "an older request of a later priority");
    }

    #[test]
    fn a_lone_request_preempts_itself() {
        assert_eq!(preemption_victim(&running(&[(7, false)]), 0), 0);
    }
}

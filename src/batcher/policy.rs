//! When to dispatch, and which requests have expired: a pure function of
//! the queue (in service order), the clock and the latency model, so that
//! tests and the planner's simulator drive the very code the server runs.

use std::time::{Duration, Instant};

use super::latency::LatencyEstimate;

/// The knobs that shape batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    /// Most units (rows, or tokens for text) in one batch.
    pub max_batch_units: usize,
    /// Longest the oldest request waits for company, whatever its slack.
    pub max_queue_delay: Duration,
    /// Target for queue + compute of every request (the p99 goal).
    pub latency_budget: Duration,
}

/// What the policy needs to know of one queued request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedView {
    pub arrival: Instant,
    pub deadline: Instant,
    pub units: usize,
}

/// Why a batch leaves now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchReason {
    /// No more requests fit.
    Full,
    /// Waiting longer would make its most urgent request miss its deadline
    /// or latency budget, given the predicted compute time.
    Slack,
    /// The oldest request has waited `max_queue_delay`.
    MaxDelay,
    /// Shutting down: no more requests will come.
    Draining,
}

/// What the scheduler should do with an executor that is free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Idle,
    /// Dispatch these queue positions (a prefix of the live requests).
    Dispatch {
        members: Vec<usize>,
        reason: DispatchReason,
    },
    /// Look again at this instant (or when anything arrives).
    WaitUntil(Instant),
}

/// The policy's answer for one look at the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Positions of requests that can no longer meet their deadline even if
    /// computed alone right now: answer DEADLINE_EXCEEDED, never compute.
    pub expired: Vec<usize>,
    pub action: Action,
    /// When the next live request would expire, so expiry is driven by a
    /// timer even while every executor is busy.
    pub next_expiry: Option<Instant>,
}

impl BatchPolicy {
    /// Plans for `queue`, given in service order (priority, then deadline).
    /// `draining` dispatches without waiting.
    pub fn plan(&self, queue: &[QueuedView], now: Instant, latency: &LatencyEstimate, draining: bool) -> Plan {
        let mut expired = Vec::new();
        let mut live = Vec::with_capacity(queue.len());
        let mut next_expiry: Option<Instant> = None;
        for (i, q) in queue.iter().enumerate() {
            let alone = latency.predict(q.units);
            match q.deadline.checked_sub(alone) {
                Some(last_start) if last_start >= now => {
                    live.push(i);
                    next_expiry = Some(next_expiry.map_or(last_start, |n| n.min(last_start)));
                }
                _ => expired.push(i),
            }
        }
        let action = self.action(queue, &live, now, latency, draining);
        Plan { expired, action, next_expiry }
    }

    fn action(
        &self,
        queue: &[QueuedView],
        live: &[usize],
        now: Instant,
        latency: &LatencyEstimate,
        draining: bool,
    ) -> Action {
        if live.is_empty() {
            return Action::Idle;
        }
        let mut members = Vec::new();
        let mut units = 0;
        for &i in live {
            // The first request always fits: admission refuses anything
            // larger than a batch.
            if !members.is_empty() && units + queue[i].units > self.max_batch_units {
                break;
            }
            units += queue[i].units;
            members.push(i);
        }
        let full = members.len() < live.len() || units >= self.max_batch_units;
        let compute = latency.predict(units);
        let mut latest_start: Option<Instant> = None;
        let mut oldest = now;
        for &i in &members {
            let q = &queue[i];
            oldest = oldest.min(q.arrival);
            let target = q.deadline.min(q.arrival + self.latency_budget);
            let start = target.checked_sub(compute).unwrap_or(now);
            latest_start = Some(latest_start.map_or(start, |s| s.min(start)));
        }
        let latest_start = latest_start.expect("members is non-empty");
        let delay_due = oldest + self.max_queue_delay;
        let reason = if draining {
            Some(DispatchReason::Draining)
        } else if full {
            Some(DispatchReason::Full)
        } else if now >= latest_start {
            Some(DispatchReason::Slack)
        } else if now >= delay_due {
            Some(DispatchReason::MaxDelay)
        } else {
            None
        };
        match reason {
            Some(reason) => Action::Dispatch { members, reason },
            None => Action::WaitUntil(latest_start.min(delay_due)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> BatchPolicy {
        BatchPolicy { max_batch_units: 8, max_queue_delay: 10 * MS, latency_budget: 20 * MS }
    }

    /// 1 ms per batch plus 0.5 ms per unit.
    fn latency() -> LatencyEstimate {
        LatencyEstimate { fixed_s: 1e-3, per_unit_s: 0.5e-3, requests_per_batch: 1.0 }
    }

    fn req(t0: Instant, arrival_ms: u64, deadline_ms: u64, units: usize) -> QueuedView {
        QueuedView { arrival: t0 + MS * arrival_ms as u32, deadline: t0 + MS * deadline_ms as u32, units }
    }

    #[test]
    fn empty_queue_is_idle() {
        let t0 = Instant::now();
        let plan = policy().plan(&[], t0, &latency(), false);
        assert_eq!(plan, Plan { expired: vec![], action: Action::Idle, next_expiry: None });
    }

    #[test]
    fn full_batch_dispatches_at_once_and_leaves_the_rest() {
        let t0 = Instant::now();
        let queue = [req(t0, 0, 900, 4), req(t0, 0, 900, 4), req(t0, 0, 900, 1)];
        let plan = policy().plan(&queue, t0, &latency(), false);
        assert_eq!(plan.action, Action::Dispatch { members: vec![0, 1], reason: DispatchReason::Full });
    }

    #[test]
    fn waits_until_slack_runs_out_then_dispatches() {
        let t0 = Instant::now();
        // Deadline 5 ms, one unit: compute 1.5 ms, so the last start is 3.5 ms,
        // before the 10 ms max delay and the 20 ms budget.
        let queue = [req(t0, 0, 5, 1)];
        let p = policy();
        let last_start = t0 + Duration::from_micros(3500);
        assert_eq!(p.plan(&queue, t0, &latency(), false).action, Action::WaitUntil(last_start));
        assert_eq!(
            p.plan(&queue, last_start, &latency(), false).action,
            Action::Dispatch { members: vec![0], reason: DispatchReason::Slack }
        );
    }

    #[test]
    fn latency_budget_bounds_the_wait_when_the_deadline_is_far() {
        let t0 = Instant::now();
        let p = BatchPolicy { max_queue_delay: 100 * MS, ..policy() };
        let queue = [req(t0, 0, 1000, 2)];
        // Budget 20 ms minus 2 ms compute.
        assert_eq!(p.plan(&queue, t0, &latency(), false).action, Action::WaitUntil(t0 + 18 * MS));
    }

    #[test]
    fn max_delay_dispatches_when_slack_remains() {
        let t0 = Instant::now();
        let queue = [req(t0, 0, 1000, 1), req(t0, 2, 1000, 1)];
        let p = policy();
        assert_eq!(p.plan(&queue, t0 + 5 * MS, &latency(), false).action, Action::WaitUntil(t0 + 10 * MS));
        assert_eq!(
            p.plan(&queue, t0 + 10 * MS, &latency(), false).action,
            Action::Dispatch { members: vec![0, 1], reason: DispatchReason::MaxDelay }
        );
    }

    #[test]
    fn a_larger_batch_leaves_earlier_because_it_computes_longer() {
        let t0 = Instant::now();
        let p = BatchPolicy { max_batch_units: 64, ..policy() };
        let one = [req(t0, 0, 12, 1)];
        let many = [req(t0, 0, 12, 1), req(t0, 0, 12, 10)];
        // 1 unit: 1.5 ms compute, start by 10.5 ms; 11 units: 6.5 ms, by 5.5 ms.
        assert_eq!(p.plan(&one, t0, &latency(), false).action, Action::WaitUntil(t0 + 10 * MS));
        assert_eq!(p.plan(&many, t0, &latency(), false).action, Action::WaitUntil(t0 + Duration::from_micros(5500)));
    }

    #[test]
    fn hopeless_requests_expire_and_the_timer_targets_the_next() {
        let t0 = Instant::now();
        // At 4 ms: the first (deadline 5 ms, 1.5 ms alone) cannot finish in time.
        let queue = [req(t0, 0, 5, 1), req(t0, 0, 50, 1)];
        let plan = policy().plan(&queue, t0 + 4 * MS, &latency(), false);
        assert_eq!(plan.expired, vec![0]);
        assert_eq!(plan.next_expiry, Some(t0 + Duration::from_micros(48500)));
        assert!(matches!(plan.action, Action::WaitUntil(_)));
    }

    #[test]
    fn draining_dispatches_without_waiting() {
        let t0 = Instant::now();
        let queue = [req(t0, 0, 1000, 1)];
        assert_eq!(
            policy().plan(&queue, t0, &latency(), true).action,
            Action::Dispatch { members: vec![0], reason: DispatchReason::Draining }
        );
    }
}

//! When to dispatch: a pure function of the queue's state and the clock, so
//! tests (and later the planner's simulator) drive the very code the server
//! runs.

use std::time::{Duration, Instant};

/// The knobs that shape batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    /// Most requests in one batch.
    pub max_batch_size: usize,
    /// Longest the oldest request waits for company.
    pub max_queue_delay: Duration,
}

/// What the scheduler should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is waiting.
    Idle,
    /// Dispatch a batch of this many requests now.
    Dispatch(usize),
    /// Wait for more requests, at most until this instant.
    WaitUntil(Instant),
}

impl BatchPolicy {
    /// Decides for a queue of `queued` requests whose oldest arrived at
    /// `oldest`. `draining` (shutdown) dispatches without waiting.
    pub fn decide(&self, queued: usize, oldest: Option<Instant>, now: Instant, draining: bool) -> Decision {
        let Some(oldest) = oldest.filter(|_| queued > 0) else {
            return Decision::Idle;
        };
        let take = queued.min(self.max_batch_size);
        let due = oldest + self.max_queue_delay;
        if queued >= self.max_batch_size || now >= due || draining {
            Decision::Dispatch(take)
        } else {
            Decision::WaitUntil(due)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BatchPolicy {
        BatchPolicy { max_batch_size: 4, max_queue_delay: Duration::from_millis(2) }
    }

    #[test]
    fn empty_queue_is_idle() {
        let now = Instant::now();
        assert_eq!(policy().decide(0, None, now, false), Decision::Idle);
    }

    #[test]
    fn full_batch_dispatches_at_once() {
        let now = Instant::now();
        assert_eq!(policy().decide(9, Some(now), now, false), Decision::Dispatch(4));
    }

    #[test]
    fn partial_batch_waits_until_max_delay_then_dispatches() {
        let t0 = Instant::now();
        let p = policy();
        assert_eq!(p.decide(2, Some(t0), t0, false), Decision::WaitUntil(t0 + Duration::from_millis(2)));
        assert_eq!(p.decide(2, Some(t0), t0 + Duration::from_millis(2), false), Decision::Dispatch(2));
    }

    #[test]
    fn draining_dispatches_without_waiting() {
        let t0 = Instant::now();
        assert_eq!(policy().decide(1, Some(t0), t0, true), Decision::Dispatch(1));
    }

    #[test]
    fn zero_delay_dispatches_whatever_is_queued() {
        let t0 = Instant::now();
        let p = BatchPolicy { max_queue_delay: Duration::ZERO, ..policy() };
        assert_eq!(p.decide(3, Some(t0), t0, false), Decision::Dispatch(3));
    }
}

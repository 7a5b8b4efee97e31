//! When to dispatch, and which requests have expired: a pure function of
//! the queue (in service order), the clock and the latency model, so that
//! tests and the planner's simulator drive the very code the server runs.

use std::time::{Duration, Instant};

use super::arrivals::Arrivals;
use super::latency::LatencyEstimate;

/// How a batch that is not full waits for company.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueWait {
    /// Until its slack runs out or its oldest request has waited
    /// `max_queue_delay`, as Triton and TF Serving do: kept for comparison.
    Fixed,
    /// Only as long as the requests expected to arrive meanwhile pay for
    /// the wait (see [`worth_waiting`]), and never past the fixed bounds;
    /// an idle version runs a cheap request on the receiving thread (the
    /// scheduler's inline lane).
    #[default]
    Adaptive,
}

/// What the policy knows of the traffic beyond the queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic<'a> {
    /// Arrivals expected after the last finish; none: no company expected.
    pub arrivals: Option<&'a Arrivals>,
    /// Since when an executor has stood free. The adaptive wait is bounded
    /// by `max_queue_delay` from the first member that arrived since then,
    /// or from this while none has: requests that queued while every
    /// executor was busy have not been waiting for company, and may still
    /// wait for it.
    pub free_since: Option<Instant>,
    /// How late a timed wait ends, lately: the OS wakes a waiting thread
    /// after its timeout, and a wait costs that much more than asked.
    pub late_wake: Duration,
}

/// How long waiting for company pays, if at all, for a batch of `requests`
/// requests computing `units` padded units, with room for `room` more rows,
/// waiting no longer than `bound`.
///
/// A batch costs `C = a + b·u`; with `n` requests of `β = b·u/n` each, and
/// `m` more expected within a wait `W`, there are two reasons to wait:
/// - *Latency*: leaving now, the `m` arrive while this batch runs and
///   wait for it, then for their own. Waiting, all finish together. The
///   sum of completion times favours waiting when
///   `(n + m)·W < m·(a − n·β)`: a large fixed cost and company coming
///   soon (bursts).
/// - *Throughput*: leaving now, each request costs the executor `C / n`;
///   waiting, `(W + a + β·(n + m)) / (n + m)`, which is less when
///   `W < m·a / n`. Executor time saved is worth something in proportion
///   to the executor's utilisation `ρ` (near idle, nobody would have
///   queued for it): so it favours waiting when `W < ρ·m·a / n`. This is
///   what keeps clients that take turns on a costly model together.
///
/// A wait `W` asked of the OS lasts `W` plus how late timed waits have
/// been ending (`traffic.late_wake`): on a busy machine that is tens of
/// microseconds, as much as a small model's whole batch costs.
///
/// Each wait the profiles offer is scored by the better of the two (per
/// request) and the best positive one is taken; re-planned at every
/// arrival, so the wait ends early when the company comes. With one
/// client, a light load, or a small fixed cost against the time company
/// takes to come, nothing pays and the batch leaves.
pub fn worth_waiting(
    requests: usize,
    units: usize,
    room: usize,
    latency: &LatencyEstimate,
    traffic: &Traffic,
    now: Instant,
    bound: Duration,
) -> Option<Duration> {
    let profile = traffic.arrivals?;
    if requests == 0 || room == 0 || bound.is_zero() || latency.fixed_s.is_nan() || latency.fixed_s <= 0.0 {
        return None;
    }
    let n = requests as f64;
    let a = latency.fixed_s;
    let beta = latency.per_unit_s * units as f64 / n;
    let rho = profile.utilisation();
    let late = traffic.late_wake.as_secs_f64();
    let mut best: Option<(Duration, f64)> = None;
    profile.outlook(now, bound, |wait, expected| {
        let (m, w) = (expected.min(room as f64), wait.as_secs_f64() + late);
        let by_latency = (m * (a - n * beta) - (n + m) * w) / (n + m);
        let by_throughput = rho * m * a / n - w;
        let gain = by_latency.max(by_throughput);
        if gain > best.map_or(0.0, |(_, g)| g) {
            best = Some((wait, gain));
        }
    });
    best.map(|(wait, _)| wait)
}

/// The knobs that shape batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    /// Most rows in one batch (`max_batch_size`).
    pub max_batch_rows: usize,
    /// Most padded units in one batch: rows for row models, longest row ×
    /// rows for text (`max_batch_tokens`).
    pub max_batch_units: usize,
    /// Longest the oldest request waits for company, whatever its slack.
    pub max_queue_delay: Duration,
    /// Target for queue + compute of every request (the p99 goal).
    pub latency_budget: Duration,
    /// Whether waiting for company is fixed or adaptive.
    pub wait: QueueWait,
}

/// Below this share of real units in a batch, padding wastes enough
/// compute that a request of a different length waits for a batch of its
/// own length, if its budget allows. Row models never pad.
pub const MIN_FILL: f64 = 0.75;

/// What the policy needs to know of one queued request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedView {
    pub arrival: Instant,
    pub deadline: Instant,
    pub rows: usize,
    /// Length of its longest row (tokens for text, 1 for row models).
    pub longest: usize,
    /// Its real, unpadded units.
    pub units: usize,
}

impl QueuedView {
    /// The request as a batch on its own.
    pub fn alone(&self) -> BatchShape {
        BatchShape { rows: self.rows, longest: self.longest, units: self.units }
    }
}

/// The size of a (candidate) batch: it computes `rows × longest` padded
/// units, of which `units` are real.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchShape {
    pub rows: usize,
    pub longest: usize,
    pub units: usize,
}

impl BatchShape {
    /// Units the model computes, padding included.
    pub fn padded(&self) -> usize {
        self.rows * self.longest
    }

    /// This batch with `q` added.
    pub fn with(&self, q: &QueuedView) -> Self {
        Self { rows: self.rows + q.rows, longest: self.longest.max(q.longest), units: self.units + q.units }
    }

    /// Share of the computed units that are real (1: no padding).
    pub fn fill(&self) -> f64 {
        if self.padded() == 0 { 1.0 } else { self.units as f64 / self.padded() as f64 }
    }
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
    /// Adaptive wait: no company is expected soon enough to pay for the
    /// wait.
    NoCompany,
    /// Shutting down: no more requests will come.
    Draining,
}

/// Where a dispatched batch goes; the scheduler and the planner's
/// simulator both place batches with [`place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On an idle executor, now.
    Idle,
    /// Staged behind a running batch, to start the moment it ends.
    Stage,
    /// Nowhere yet: it stays queued, where more requests may still join.
    Hold,
}

/// The dispatch rule: an idle executor takes any batch; a full batch (or
/// one formed while draining, when no more requests will come) may be
/// staged behind a running one so that its executor never waits between
/// batches; anything else waits for an idle executor.
pub fn place(reason: DispatchReason, has_idle: bool, has_stage_slot: bool) -> Placement {
    if has_idle {
        Placement::Idle
    } else if has_stage_slot && matches!(reason, DispatchReason::Full | DispatchReason::Draining) {
        Placement::Stage
    } else {
        Placement::Hold
    }
}

/// What the scheduler should do with an executor that is free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Idle,
    /// Dispatch these queue positions (live requests, in service order).
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
    pub fn plan(
        &self,
        queue: &[QueuedView],
        now: Instant,
        latency: &LatencyEstimate,
        traffic: &Traffic,
        draining: bool,
    ) -> Plan {
        let mut expired = Vec::new();
        let mut live = Vec::with_capacity(queue.len());
        let mut next_expiry: Option<Instant> = None;
        for (i, q) in queue.iter().enumerate() {
            let alone = latency.predict(q.alone().padded());
            match q.deadline.checked_sub(alone) {
                Some(last_start) if last_start >= now => {
                    live.push(i);
                    next_expiry = Some(next_expiry.map_or(last_start, |n| n.min(last_start)));
                }
                _ => expired.push(i),
            }
        }
        let action = self.action(queue, &live, now, latency, traffic, draining);
        Plan { expired, action, next_expiry }
    }

    fn action(
        &self,
        queue: &[QueuedView],
        live: &[usize],
        now: Instant,
        latency: &LatencyEstimate,
        traffic: &Traffic,
        draining: bool,
    ) -> Action {
        if live.is_empty() {
            return Action::Idle;
        }
        // The most urgent request always goes: admission refuses anything
        // larger than a batch. Then, in service order, whoever fits without
        // padding the batch below MIN_FILL.
        let head = live[0];
        let mut members = vec![head];
        let mut shape = queue[head].alone();
        let mut full = false;
        let mut skipped = Vec::new();
        for &i in &live[1..] {
            let grown = shape.with(&queue[i]);
            if grown.rows > self.max_batch_rows || grown.padded() > self.max_batch_units {
                full = true;
            } else if grown.fill() < MIN_FILL {
                skipped.push(i);
            } else {
                members.push(i);
                shape = grown;
            }
        }
        // A request left for a batch of its own length must be able to
        // wait for this one to finish; if it cannot, it comes along.
        let done = now + latency.predict(shape.padded());
        for i in skipped {
            let q = &queue[i];
            let target = q.deadline.min(q.arrival + self.latency_budget);
            let grown = shape.with(q);
            if done + latency.predict(q.alone().padded()) > target {
                if grown.rows > self.max_batch_rows || grown.padded() > self.max_batch_units {
                    full = true;
                } else {
                    members.push(i);
                    shape = grown;
                }
            }
        }
        members.sort_unstable();
        let units = shape.padded();
        let full = full || shape.rows >= self.max_batch_rows || units >= self.max_batch_units;
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
        let wait_from = match self.wait {
            QueueWait::Fixed => oldest,
            // From the first member that arrived to a free executor, or
            // from when it stood free if none has yet: requests that queued
            // behind a running batch were not waiting for company, and the
            // clients of that batch, coming back, get the same window a
            // fixed wait gives them.
            QueueWait::Adaptive => traffic.free_since.map_or(oldest, |free| {
                members.iter().map(|&i| queue[i].arrival).filter(|&a| a >= free).min().unwrap_or(free)
            }),
        };
        let delay_due = wait_from + self.max_queue_delay;
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
        let until = latest_start.min(delay_due);
        match (reason, self.wait) {
            (Some(reason), _) => Action::Dispatch { members, reason },
            (None, QueueWait::Fixed) => Action::WaitUntil(until),
            (None, QueueWait::Adaptive) => {
                let room = self.max_batch_rows.saturating_sub(shape.rows);
                match worth_waiting(members.len(), units, room, latency, traffic, now, until - now) {
                    Some(wait) => Action::WaitUntil(now + wait),
                    None => Action::Dispatch { members, reason: DispatchReason::NoCompany },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_or_draining_batches_are_staged_behind_a_running_one() {
        use DispatchReason::*;
        for reason in [Full, Slack, MaxDelay, Draining] {
            assert_eq!(place(reason, true, true), Placement::Idle);
            assert_eq!(place(reason, false, false), Placement::Hold);
        }
        assert_eq!(place(Full, false, true), Placement::Stage);
        assert_eq!(place(Draining, false, true), Placement::Stage);
        assert_eq!(place(Slack, false, true), Placement::Hold);
        assert_eq!(place(MaxDelay, false, true), Placement::Hold);
    }

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    fn policy() -> BatchPolicy {
        BatchPolicy {
            max_batch_rows: 8,
            max_batch_units: 8,
            max_queue_delay: 10 * MS,
            latency_budget: 20 * MS,
            wait: QueueWait::Fixed,
        }
    }

    /// 1 ms per batch plus 0.5 ms per unit.
    fn latency() -> LatencyEstimate {
        LatencyEstimate { fixed_s: 1e-3, per_unit_s: 0.5e-3, requests_per_batch: 1.0 }
    }

    fn req(t0: Instant, arrival_ms: u64, deadline_ms: u64, units: usize) -> QueuedView {
        QueuedView {
            arrival: t0 + MS * arrival_ms as u32,
            deadline: t0 + MS * deadline_ms as u32,
            rows: units,
            longest: 1,
            units,
        }
    }

    /// One text of `tokens` tokens.
    fn text(t0: Instant, deadline_ms: u64, tokens: usize) -> QueuedView {
        QueuedView { arrival: t0, deadline: t0 + MS * deadline_ms as u32, rows: 1, longest: tokens, units: tokens }
    }

    /// 1 ms per batch plus 10 µs per padded token; 32 rows or 1000 tokens.
    fn text_policy() -> BatchPolicy {
        BatchPolicy {
            max_batch_rows: 32,
            max_batch_units: 1000,
            max_queue_delay: 10 * MS,
            latency_budget: 100 * MS,
            wait: QueueWait::Fixed,
        }
    }

    fn text_latency() -> LatencyEstimate {
        LatencyEstimate { fixed_s: 1e-3, per_unit_s: 10e-6, requests_per_batch: 1.0 }
    }

    #[test]
    fn empty_queue_is_idle() {
        let t0 = Instant::now();
        let plan = policy().plan(&[], t0, &latency(), &Traffic::default(), false);
        assert_eq!(plan, Plan { expired: vec![], action: Action::Idle, next_expiry: None });
    }

    #[test]
    fn full_batch_dispatches_at_once_and_leaves_the_rest() {
        let t0 = Instant::now();
        let queue = [req(t0, 0, 900, 4), req(t0, 0, 900, 4), req(t0, 0, 900, 1)];
        let plan = policy().plan(&queue, t0, &latency(), &Traffic::default(), false);
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
        assert_eq!(p.plan(&queue, t0, &latency(), &Traffic::default(), false).action, Action::WaitUntil(last_start));
        assert_eq!(
            p.plan(&queue, last_start, &latency(), &Traffic::default(), false).action,
            Action::Dispatch { members: vec![0], reason: DispatchReason::Slack }
        );
    }

    #[test]
    fn latency_budget_bounds_the_wait_when_the_deadline_is_far() {
        let t0 = Instant::now();
        let p = BatchPolicy { max_queue_delay: 100 * MS, ..policy() };
        let queue = [req(t0, 0, 1000, 2)];
        // Budget 20 ms minus 2 ms compute.
        assert_eq!(p.plan(&queue, t0, &latency(), &Traffic::default(), false).action, Action::WaitUntil(t0 + 18 * MS));
    }

    #[test]
    fn max_delay_dispatches_when_slack_remains() {
        let t0 = Instant::now();
        let queue = [req(t0, 0, 1000, 1), req(t0, 2, 1000, 1)];
        let p = policy();
        assert_eq!(
            p.plan(&queue, t0 + 5 * MS, &latency(), &Traffic::default(), false).action,
            Action::WaitUntil(t0 + 10 * MS)
        );
        assert_eq!(
            p.plan(&queue, t0 + 10 * MS, &latency(), &Traffic::default(), false).action,
            Action::Dispatch { members: vec![0, 1], reason: DispatchReason::MaxDelay }
        );
    }

    #[test]
    fn a_larger_batch_leaves_earlier_because_it_computes_longer() {
        let t0 = Instant::now();
        let p = BatchPolicy { max_batch_rows: 64, max_batch_units: 64, ..policy() };
        let one = [req(t0, 0, 12, 1)];
        let many = [req(t0, 0, 12, 1), req(t0, 0, 12, 10)];
        // 1 unit: 1.5 ms compute, start by 10.5 ms; 11 units: 6.5 ms, by 5.5 ms.
        assert_eq!(p.plan(&one, t0, &latency(), &Traffic::default(), false).action, Action::WaitUntil(t0 + 10 * MS));
        assert_eq!(
            p.plan(&many, t0, &latency(), &Traffic::default(), false).action,
            Action::WaitUntil(t0 + Duration::from_micros(5500))
        );
    }

    #[test]
    fn hopeless_requests_expire_and_the_timer_targets_the_next() {
        let t0 = Instant::now();
        // At 4 ms: the first (deadline 5 ms, 1.5 ms alone) cannot finish in time.
        let queue = [req(t0, 0, 5, 1), req(t0, 0, 50, 1)];
        let plan = policy().plan(&queue, t0 + 4 * MS, &latency(), &Traffic::default(), false);
        assert_eq!(plan.expired, vec![0]);
        assert_eq!(plan.next_expiry, Some(t0 + Duration::from_micros(48500)));
        assert!(matches!(plan.action, Action::WaitUntil(_)));
    }

    #[test]
    fn draining_dispatches_without_waiting() {
        let t0 = Instant::now();
        let queue = [req(t0, 0, 1000, 1)];
        assert_eq!(
            policy().plan(&queue, t0, &latency(), &Traffic::default(), true).action,
            Action::Dispatch { members: vec![0], reason: DispatchReason::Draining }
        );
    }

    #[test]
    fn texts_of_similar_length_are_grouped() {
        let t0 = Instant::now();
        let queue = [text(t0, 1000, 10), text(t0, 1000, 40), text(t0, 1000, 12), text(t0, 1000, 38)];
        let plan = text_policy().plan(&queue, t0 + 10 * MS, &text_latency(), &Traffic::default(), false);
        // The short ones leave together; the long ones wait for their own batch.
        assert_eq!(plan.action, Action::Dispatch { members: vec![0, 2], reason: DispatchReason::MaxDelay });
        let rest = [queue[1], queue[3]];
        let plan = text_policy().plan(&rest, t0 + 10 * MS, &text_latency(), &Traffic::default(), false);
        assert_eq!(plan.action, Action::Dispatch { members: vec![0, 1], reason: DispatchReason::MaxDelay });
    }

    #[test]
    fn a_text_that_cannot_wait_for_its_own_batch_comes_along() {
        let t0 = Instant::now();
        // The short batch computes 1.1 ms; the long text alone 1.4 ms: if it
        // waited it would finish at 2.5 ms, after its 2 ms deadline.
        let queue = [text(t0, 1000, 10), text(t0, 2, 40)];
        let p = text_policy();
        // Together: 80 padded tokens, 1.8 ms, so they must start by 0.2 ms.
        assert_eq!(
            p.plan(&queue, t0, &text_latency(), &Traffic::default(), false).action,
            Action::WaitUntil(t0 + 200 * US)
        );
        assert_eq!(
            p.plan(&queue, t0 + 200 * US, &text_latency(), &Traffic::default(), false).action,
            Action::Dispatch { members: vec![0, 1], reason: DispatchReason::Slack }
        );
    }

    #[test]
    fn padded_tokens_bound_the_batch() {
        let t0 = Instant::now();
        // 300-token texts: three make 900 padded tokens, a fourth would be 1200.
        let queue = [text(t0, 1000, 300), text(t0, 1000, 300), text(t0, 1000, 290), text(t0, 1000, 300)];
        let plan = text_policy().plan(&queue, t0, &text_latency(), &Traffic::default(), false);
        assert_eq!(plan.action, Action::Dispatch { members: vec![0, 1, 2], reason: DispatchReason::Full });
    }

    #[test]
    fn padding_counts_the_longest_row() {
        let shape = BatchShape { rows: 3, longest: 20, units: 45 };
        assert_eq!(shape.padded(), 60);
        assert!((shape.fill() - 0.75).abs() < 1e-12);
    }

    /// The fixed-wait tests' knobs, with a 20 ms bound on the wait.
    fn adaptive() -> BatchPolicy {
        BatchPolicy { wait: QueueWait::Adaptive, max_queue_delay: 20 * MS, latency_budget: 50 * MS, ..policy() }
    }

    fn steady(rate_per_s: f64) -> Arrivals {
        Arrivals::steady(rate_per_s, 1.0, 20 * MS)
    }

    fn at(profile: &Arrivals) -> Traffic<'_> {
        Traffic { arrivals: Some(profile), free_since: None, late_wake: Duration::ZERO }
    }

    #[test]
    fn worth_waiting_weighs_the_fixed_cost_saved_against_the_wait() {
        let t0 = Instant::now();
        let l = LatencyEstimate { fixed_s: 1e-3, per_unit_s: 10e-6, requests_per_batch: 1.0 };
        // 10 000/s: 7 fit within 0.7 ms, saving 7 × 1 ms; it waits (and the
        // batch leaves full when they came).
        let busy = steady(10_000.0);
        let wait = worth_waiting(1, 1, 7, &l, &at(&busy), t0, 2 * MS).expect("worth waiting");
        assert!(wait <= 2 * MS, "{wait:?}");
        // 500/s brings one in 2 ms: it saves 1 ms, less than the wait.
        let rare = steady(500.0);
        assert_eq!(worth_waiting(1, 1, 7, &l, &at(&rare), t0, 2 * MS), None);
        // 1 000/s: each arrival saves exactly the millisecond it took.
        let some = steady(1_000.0);
        assert_eq!(worth_waiting(1, 1, 7, &l, &at(&some), t0, MS), None);
        // Four already queued share the fixed cost, so each newcomer saves
        // 0.25 ms: worth it at 10 000/s, not at 1 000/s.
        assert!(worth_waiting(4, 4, 4, &l, &at(&busy), t0, MS).is_some());
        assert_eq!(worth_waiting(4, 4, 4, &l, &at(&some), t0, MS), None);
        // No profile, no room or no fixed cost: leave now.
        assert_eq!(worth_waiting(1, 1, 7, &l, &Traffic::default(), t0, 2 * MS), None);
        assert_eq!(worth_waiting(8, 8, 0, &l, &at(&busy), t0, 2 * MS), None);
        let flat = LatencyEstimate { fixed_s: 0.0, ..l };
        assert_eq!(worth_waiting(1, 1, 7, &flat, &at(&busy), t0, 2 * MS), None);
    }

    #[test]
    fn a_wait_costs_what_the_os_adds_to_it() {
        let t0 = Instant::now();
        // A small model (20 µs a batch) at 60 000/s: 12 arrive within
        // 200 µs and save 240 µs of executor time, more than the wait...
        let l = LatencyEstimate { fixed_s: 20e-6, per_unit_s: 1e-6, requests_per_batch: 1.0 };
        let busy = steady(60_000.0);
        assert!(worth_waiting(1, 1, 63, &l, &at(&busy), t0, 200 * US).is_some());
        // ...but not more than the wait and the 100 µs the OS takes to end it.
        let late = Traffic { late_wake: 100 * US, ..at(&busy) };
        assert_eq!(worth_waiting(1, 1, 63, &l, &late, t0, 200 * US), None);
    }

    #[test]
    fn adaptive_leaves_at_once_when_no_company_is_coming() {
        let t0 = Instant::now();
        let queue = [req(t0, 0, 100, 1)];
        assert_eq!(
            adaptive().plan(&queue, t0, &latency(), &Traffic::default(), false).action,
            Action::Dispatch { members: vec![0], reason: DispatchReason::NoCompany }
        );
        // The fixed wait would hold it for max_queue_delay.
        let fixed = BatchPolicy { wait: QueueWait::Fixed, ..adaptive() };
        assert_eq!(
            fixed.plan(&queue, t0, &latency(), &Traffic::default(), false).action,
            Action::WaitUntil(t0 + 20 * MS)
        );
    }

    #[test]
    fn adaptive_waits_for_expected_company_within_the_fixed_bounds() {
        let t0 = Instant::now();
        let l = latency();
        let queue = [req(t0, 0, 100, 1)];
        let busy = steady(10_000.0);
        let waits_until =
            |p: &BatchPolicy, now: Instant, traffic: &Traffic| match p.plan(&queue, now, &l, traffic, false).action {
                Action::WaitUntil(at) => Some(at),
                _ => None,
            };
        let until = waits_until(&adaptive(), t0, &at(&busy)).expect("waits");
        assert!(until > t0 && until <= t0 + 20 * MS);
        // The bound counts from when an executor stood free, if that came
        // after the oldest arrival: a request queued behind a running batch
        // may still wait for company once the executor is free.
        let freed = Traffic { free_since: Some(t0 + 30 * MS), ..at(&busy) };
        let p = BatchPolicy { latency_budget: 100 * MS, ..adaptive() };
        let until = waits_until(&p, t0 + 30 * MS, &freed).expect("waits");
        assert!(until > t0 + 30 * MS && until <= t0 + 50 * MS);
        let fixed = BatchPolicy { wait: QueueWait::Fixed, ..p };
        assert!(matches!(
            fixed.plan(&queue, t0 + 30 * MS, &l, &freed, false).action,
            Action::Dispatch { reason: DispatchReason::MaxDelay, .. }
        ));
        // Then it leaves.
        assert_eq!(
            p.plan(&queue, t0 + 50 * MS, &l, &freed, false).action,
            Action::Dispatch { members: vec![0], reason: DispatchReason::MaxDelay }
        );
        // Once a request arrived to the free executor (a client of the
        // batch that just finished, coming back), the bound counts from
        // that arrival, as a fixed wait would for it.
        let back = [req(t0, 0, 100, 1), req(t0, 40, 100, 1)];
        match p.plan(&back, t0 + 50 * MS, &l, &freed, false).action {
            Action::WaitUntil(until) => assert!(until > t0 + 50 * MS && until <= t0 + 60 * MS),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p.plan(&back, t0 + 60 * MS, &l, &freed, false).action,
            Action::Dispatch { reason: DispatchReason::MaxDelay, .. }
        ));
        // A full batch never waits.
        let full: Vec<QueuedView> = (0..8).map(|_| req(t0, 0, 100, 1)).collect();
        assert!(matches!(
            adaptive().plan(&full, t0, &l, &at(&busy), false).action,
            Action::Dispatch { reason: DispatchReason::Full, .. }
        ));
    }

    /// A deterministic single-executor server driven by the policy and the
    /// arrival profile, the clock injected: what the closed- and open-loop
    /// simulations share. A batch takes the predicted time.
    struct Sim {
        profile: Arrivals,
        queue: Vec<QueuedView>,
        busy_until: Option<Instant>,
        /// Requests in the running batch.
        running: usize,
        free_since: Instant,
    }

    impl Sim {
        fn new(t0: Instant, policy: &BatchPolicy) -> Self {
            Self {
                profile: Arrivals::new(t0, policy.max_queue_delay),
                queue: Vec::new(),
                busy_until: None,
                running: 0,
                free_since: t0,
            }
        }

        /// A request arriving at `t` joins the queue.
        fn arrive(&mut self, t: Instant) {
            self.profile.arrived(t);
            self.queue.push(QueuedView { arrival: t, deadline: t + 1000 * MS, rows: 1, longest: 1, units: 1 });
        }

        /// At `now`: the executor frees up when its batch is done and runs
        /// what the policy says is due, calling `answered(arrival, done)`
        /// per request. Returns when something next happens, given the
        /// next arrival `wake`.
        fn step(
            &mut self,
            policy: &BatchPolicy,
            l: &LatencyEstimate,
            now: Instant,
            mut wake: Option<Instant>,
            mut answered: impl FnMut(Instant, Instant),
        ) -> Option<Instant> {
            if let Some(done) = self.busy_until.filter(|b| *b <= now) {
                self.busy_until = None;
                self.profile.finished(done, self.running);
                self.profile.busy(done, 0.0);
                self.free_since = done;
            }
            if self.busy_until.is_none() && !self.queue.is_empty() {
                let traffic = Traffic {
                    arrivals: Some(&self.profile),
                    free_since: Some(self.free_since),
                    late_wake: Duration::ZERO,
                };
                match policy.plan(&self.queue, now, l, &traffic, false).action {
                    Action::Dispatch { members, .. } => {
                        let done = now + l.predict(members.len());
                        for &i in members.iter().rev() {
                            answered(self.queue.remove(i).arrival, done);
                        }
                        self.busy_until = Some(done);
                        self.running = members.len();
                        self.profile.busy(now, 1.0);
                    }
                    Action::WaitUntil(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                    Action::Idle => {}
                }
            }
            if let Some(b) = self.busy_until {
                wake = Some(wake.map_or(b, |w| w.min(b)));
            }
            wake
        }
    }

    /// Closed-loop clients against the simulated server: each client
    /// starts at a random moment within the first `think`, and sends its
    /// next request `think` (±10 %) after its answer. Returns (mean
    /// latency, answers per second) over `rounds` answers per client.
    fn closed_loop(
        policy: BatchPolicy,
        l: LatencyEstimate,
        think: Duration,
        clients: usize,
        rounds: usize,
    ) -> (Duration, f64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(clients as u64);
        let t0 = Instant::now();
        let mut sim = Sim::new(t0, &policy);
        let mut next_send: Vec<Instant> = (0..clients).map(|_| t0 + think.mul_f64(rng.random::<f64>())).collect();
        let mut now = t0;
        let (mut answered, mut total) = (0usize, Duration::ZERO);
        let mut answers = Vec::new();
        while answered < clients * rounds {
            next_send.sort();
            while next_send.first().is_some_and(|t| *t <= now) {
                sim.arrive(next_send.remove(0));
            }
            let first = next_send.first().copied();
            let wake = sim.step(&policy, &l, now, first, |arrival, done| answers.push((arrival, done)));
            for (arrival, done) in answers.drain(..) {
                total += done - arrival;
                answered += 1;
                next_send.push(done + think.mul_f64(0.9 + 0.2 * rng.random::<f64>()));
            }
            now = wake.expect("something is due");
        }
        (total / answered as u32, answered as f64 / (now - t0).as_secs_f64())
    }

    /// The closed-loop cases: (name, latency, think time, the adaptive
    /// policy whose `max_queue_delay` the fixed setting waits).
    fn models() -> [(&'static str, LatencyEstimate, Duration, BatchPolicy); 5] {
        let delay = |d: Duration| BatchPolicy { max_queue_delay: d, ..adaptive() };
        [
            // Fixed cost twice the per-row cost.
            ("cpu", latency(), 100 * US, delay(2 * MS)),
            // 2 ms fixed, 20 µs a row.
            (
                "gpu",
                LatencyEstimate { fixed_s: 2e-3, per_unit_s: 20e-6, requests_per_batch: 1.0 },
                100 * US,
                delay(2 * MS),
            ),
            // A costly model on two cores: 7 ms fixed, 9 ms a text; round
            // trip 0.3 ms.
            (
                "bert",
                LatencyEstimate { fixed_s: 7e-3, per_unit_s: 9e-3, requests_per_batch: 1.0 },
                300 * US,
                delay(2 * MS),
            ),
            // MiniLM as served here, with its model.toml: 6 ms fixed, 3.6 ms
            // a 14-token text, batches of 32 within 500 ms; clients back
            // 1 ms after their answer.
            (
                "minilm",
                LatencyEstimate { fixed_s: 6e-3, per_unit_s: 3.6e-3, requests_per_batch: 1.0 },
                MS,
                BatchPolicy { max_batch_rows: 32, max_batch_units: 32, latency_budget: 500 * MS, ..delay(2 * MS) },
            ),
            // The risk MLP: 20 µs fixed, 2 µs a row, round trips ten times
            // longer than a batch.
            (
                "risk",
                LatencyEstimate { fixed_s: 20e-6, per_unit_s: 2e-6, requests_per_batch: 1.0 },
                200 * US,
                delay(MS / 2),
            ),
        ]
    }

    #[test]
    fn adaptive_never_loses_to_either_fixed_setting_in_closed_loops() {
        // Clients start at random moments: with no wait, two clients of a
        // costly model fall into turns (each computing alone while the
        // other waits), where a fixed wait that caught them together keeps
        // them together. A fixed wait at one client only adds its delay.
        for (name, l, think, adapt) in models() {
            for clients in [1, 2, 3, 4, 8, 16, 64] {
                let run = |p: BatchPolicy| closed_loop(p, l, think, clients, 300);
                let fixed = run(BatchPolicy { wait: QueueWait::Fixed, ..adapt });
                let zero = run(BatchPolicy { wait: QueueWait::Fixed, max_queue_delay: Duration::ZERO, ..adapt });
                let adapt = run(adapt);
                let case = format!("{name}, {clients} clients: adaptive {adapt:?}, fixed {fixed:?}, zero {zero:?}");
                assert!(adapt.1 >= 0.95 * fixed.1.max(zero.1), "throughput: {case}");
                assert!(adapt.0 <= fixed.0.min(zero.0).mul_f64(1.1), "latency: {case}");
            }
        }
    }

    /// Open-loop arrivals at the given times against the simulated
    /// server. Returns the mean latency (arrival to answer).
    fn open_loop(policy: BatchPolicy, l: LatencyEstimate, arrivals: &[Instant]) -> Duration {
        let t0 = arrivals[0];
        let mut sim = Sim::new(t0, &policy);
        let (mut next, mut now) = (0usize, t0);
        let (mut answered, mut total) = (0usize, Duration::ZERO);
        while answered < arrivals.len() {
            while next < arrivals.len() && arrivals[next] <= now {
                sim.arrive(arrivals[next]);
                next += 1;
            }
            let wake = sim.step(&policy, &l, now, arrivals.get(next).copied(), |arrival, done| {
                total += done - arrival;
                answered += 1;
            });
            match wake {
                Some(w) => now = w.max(now),
                None => break,
            }
        }
        assert_eq!(answered, arrivals.len(), "every arrival is answered");
        total / answered as u32
    }

    /// Poisson arrivals at `rate_per_s` for `count` requests (seeded).
    fn poisson(t0: Instant, rate_per_s: f64, count: usize, seed: u64) -> Vec<Instant> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut t = t0;
        (0..count)
            .map(|_| {
                let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / rate_per_s;
                t += Duration::from_secs_f64(gap);
                t
            })
            .collect()
    }

    /// `bursts` bursts of `size` requests within `spread`, every `every`.
    fn bursts(t0: Instant, size: usize, spread: Duration, every: Duration, bursts: usize) -> Vec<Instant> {
        (0..bursts)
            .flat_map(|b| (0..size).map(move |i| t0 + every * b as u32 + spread.mul_f64(i as f64 / size as f64)))
            .collect()
    }

    #[test]
    fn adaptive_keeps_up_with_poisson_arrivals_and_bursts() {
        // A CPU-like model: 1 ms a batch plus 0.1 ms a row, capacity about
        // 5 000 requests/s in full batches of 8.
        let l = LatencyEstimate { fixed_s: 1e-3, per_unit_s: 0.1e-3, requests_per_batch: 1.0 };
        let t0 = Instant::now();
        let zero = BatchPolicy { wait: QueueWait::Fixed, max_queue_delay: Duration::ZERO, ..adaptive() };
        let fixed = BatchPolicy { wait: QueueWait::Fixed, max_queue_delay: 2 * MS, ..adaptive() };
        let adapt = BatchPolicy { max_queue_delay: 2 * MS, ..adaptive() };
        let mut cases: Vec<(String, Vec<Instant>)> = [50.0, 500.0, 2000.0, 4000.0]
            .iter()
            .map(|&r| (format!("Poisson {r}/s"), poisson(t0, r, 2000, r as u64)))
            .collect();
        for (size, spread) in [(8, 32 * US), (32, 32 * US), (32, 2 * MS)] {
            cases.push((format!("bursts of {size} within {spread:?}"), bursts(t0, size, spread, 50 * MS, 60)));
        }
        for (name, arrivals) in cases {
            let (z, f, a) =
                (open_loop(zero, l, &arrivals), open_loop(fixed, l, &arrivals), open_loop(adapt, l, &arrivals));
            let case = format!("{name}: adaptive {a:?}, fixed {f:?}, zero {z:?}");
            assert!(a <= z.min(f).mul_f64(1.1) + 100 * US, "{case}");
        }
    }
}

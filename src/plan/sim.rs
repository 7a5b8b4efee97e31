//! A discrete-event simulation of one model version's serving: Poisson
//! arrivals, the real batch policy (`BatchPolicy::plan`, the very function
//! the scheduler calls), executors that stage a full batch behind a running
//! one as the server does, and a measured batch-time curve.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::batcher::arrivals::Arrivals;
use crate::batcher::latency::{LatencyEstimate, LineFit};
use crate::batcher::policy::{Action, BatchPolicy, Placement, QueuedView, Traffic, place};

/// Batch compute time against rows, measured: linear between the measured
/// points, extrapolated from the last two beyond them.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchCurve {
    /// (rows, seconds), rows ascending.
    pub points: Vec<(usize, f64)>,
}

impl BatchCurve {
    /// Seconds to compute a batch of `rows`.
    pub fn seconds(&self, rows: usize) -> f64 {
        let p = &self.points;
        match p.len() {
            0 => 0.0,
            1 => p[0].1,
            _ => {
                let i = p.iter().position(|(r, _)| *r >= rows).unwrap_or(p.len() - 1).max(1);
                let ((r0, t0), (r1, t1)) = (p[i - 1], p[i]);
                let slope = (t1 - t0) / (r1 as f64 - r0 as f64).max(1e-9);
                (t0 + slope * (rows as f64 - r0 as f64)).max(0.0)
            }
        }
    }

    /// The straight-line fit the server's latency model would learn, for
    /// the policy's predictions.
    pub fn estimate(&self) -> LatencyEstimate {
        if self.points.len() < 2 {
            return LatencyEstimate {
                fixed_s: self.points.first().map_or(0.0, |p| p.1),
                per_unit_s: 0.0,
                requests_per_batch: 1.0,
            };
        }
        let (fixed_s, per_unit_s) = LineFit::of(self.points.iter().map(|p| (p.0 as f64, p.1))).line(0.0);
        LatencyEstimate { fixed_s, per_unit_s, requests_per_batch: 1.0 }
    }
}

/// One simulated configuration under one offered rate.
#[derive(Debug, Clone)]
pub struct SimSetup {
    pub policy: BatchPolicy,
    pub instances: usize,
    pub curve: BatchCurve,
    /// Added to every request's latency outside the batcher (network,
    /// decode, encode), measured through a real server at one client.
    pub overhead: Duration,
    /// When measured: the distribution of time outside queue and compute
    /// at this load, as (quantile, seconds) points ascending; each request
    /// draws its own from it instead of `overhead`.
    pub overhead_quantiles: Option<Vec<(f64, f64)>>,
    /// Requests per second the serving path (runtime, gRPC, client) can
    /// carry, measured through a real server. Requests pass it first, one
    /// at a time, so near it the wait grows as in any queue; `INFINITY`
    /// leaves it out.
    pub serving_capacity: f64,
    /// Requests per second, Poisson.
    pub rate: f64,
    /// Requests simulated (the first tenth warms up and is not counted).
    pub requests: usize,
    /// Each request's deadline after arrival.
    pub timeout: Duration,
    /// Most requests waiting, as the server's `max_queue`: arrivals beyond
    /// it are refused. It also keeps an overloaded simulation short.
    pub max_queue: usize,
    pub seed: u64,
}

/// What the simulation predicts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SimResult {
    pub p50_s: f64,
    pub p99_s: f64,
    pub mean_s: f64,
    /// Mean time from arrival to batch start.
    pub mean_wait_s: f64,
    pub mean_batch: f64,
    /// Answered requests per second of simulated time.
    pub throughput: f64,
    /// Share of counted requests that expired before computing or were
    /// refused with the queue full.
    pub expired: f64,
}

struct Executor {
    busy_until: Option<Instant>,
    staged: Option<Vec<usize>>,
}

/// Runs the simulation.
pub fn simulate(setup: &SimSetup) -> SimResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(setup.seed);
    let t0 = Instant::now();
    let estimate = setup.curve.estimate();
    // `sent`: when the client sends; `arrivals`: when it reaches the
    // batcher, after the serving path.
    let per_request = if setup.serving_capacity.is_finite() { 1.0 / setup.serving_capacity.max(1e-9) } else { 0.0 };
    let mut sent = Vec::with_capacity(setup.requests);
    let mut arrivals = Vec::with_capacity(setup.requests);
    let (mut t, mut path_free) = (0.0f64, 0.0f64);
    for _ in 0..setup.requests {
        t += -(1.0 - rng.random::<f64>()).ln() / setup.rate.max(1e-9);
        path_free = path_free.max(t) + per_request;
        sent.push(t0 + Duration::from_secs_f64(t));
        arrivals.push(t0 + Duration::from_secs_f64(path_free));
    }
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut executors: Vec<Executor> =
        (0..setup.instances.max(1)).map(|_| Executor { busy_until: None, staged: None }).collect();
    // Per request: (started, finished) or expired.
    let mut started = vec![None; setup.requests];
    let mut finished = vec![None; setup.requests];
    let mut expired = vec![false; setup.requests];
    let mut batches = 0usize;
    let mut batched = 0usize;
    let mut next = 0usize;
    let mut timer: Option<Instant>;
    let mut refused = 0usize;
    let mut now = t0;
    // Poisson arrivals: the same rate whenever the server looks. The
    // utilisation starts from one request per batch and follows the run.
    let start_busy = setup.rate * setup.curve.seconds(1) / setup.instances.max(1) as f64;
    let mut profile = Arrivals::steady(setup.rate, start_busy.min(1.0), setup.policy.max_queue_delay);
    let mut free_since = t0;
    loop {
        // Completions at `now`: start what was staged.
        for e in &mut executors {
            if e.busy_until.is_some_and(|b| b <= now) {
                e.busy_until = None;
                free_since = now;
                if let Some(batch) = e.staged.take() {
                    let done = now + Duration::from_secs_f64(setup.curve.seconds(batch.len()));
                    for &r in &batch {
                        started[r] = Some(now);
                        finished[r] = Some(done);
                    }
                    e.busy_until = Some(done);
                }
            }
        }
        while next < arrivals.len() && arrivals[next] <= now {
            if queue.len() < setup.max_queue.max(1) {
                queue.push_back(next);
            } else {
                expired[next] = true;
                refused += 1;
            }
            next += 1;
        }
        // Overloaded beyond doubt: the answer is "no", stop early.
        if refused > setup.requests / 100 {
            return SimResult { expired: 1.0, p99_s: f64::INFINITY, ..Default::default() };
        }
        // Plan as the scheduler does, until nothing more can leave.
        loop {
            let views: Vec<QueuedView> = queue
                .iter()
                .map(|&r| QueuedView {
                    arrival: arrivals[r],
                    deadline: sent[r] + setup.timeout,
                    rows: 1,
                    longest: 1,
                    units: 1,
                })
                .collect();
            // As the scheduler does: the wait is weighed only when an
            // executor is free.
            let can_run = executors.iter().any(|e| e.busy_until.is_none());
            // Its clock wakes on time.
            let traffic = Traffic {
                arrivals: can_run.then_some(&profile),
                free_since: can_run.then_some(free_since),
                late_wake: Duration::ZERO,
            };
            let plan = setup.policy.plan(&views, now, &estimate, &traffic, false);
            let mut members = Vec::new();
            let mut wait = None;
            match plan.action {
                Action::Dispatch { members: m, reason } => {
                    let idle = executors.iter().position(|e| e.busy_until.is_none());
                    let stage = executors.iter().position(|e| e.busy_until.is_some() && e.staged.is_none());
                    // The scheduler's own rule.
                    let target = match place(reason, idle.is_some(), stage.is_some()) {
                        Placement::Idle => idle.map(|i| (i, false)),
                        Placement::Stage => stage.map(|i| (i, true)),
                        Placement::Hold => None,
                    };
                    if let Some((i, staged)) = target {
                        let batch: Vec<usize> = m.iter().map(|&k| queue[k]).collect();
                        batches += 1;
                        batched += batch.len();
                        if staged {
                            executors[i].staged = Some(batch);
                        } else {
                            let done = now + Duration::from_secs_f64(setup.curve.seconds(batch.len()));
                            for &r in &batch {
                                started[r] = Some(now);
                                finished[r] = Some(done);
                            }
                            executors[i].busy_until = Some(done);
                        }
                        members = m;
                    }
                }
                Action::WaitUntil(at) if can_run => wait = Some(at),
                _ => {}
            }
            let mut gone: Vec<usize> = plan.expired.iter().chain(&members).copied().collect();
            for &k in &plan.expired {
                expired[queue[k]] = true;
            }
            gone.sort_unstable();
            for k in gone.into_iter().rev() {
                queue.remove(k);
            }
            let computing = executors.iter().filter(|e| e.busy_until.is_some()).count();
            profile.busy(now, computing as f64 / executors.len() as f64);
            timer = match (wait, plan.next_expiry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if members.is_empty() {
                break;
            }
        }
        let candidates = [
            arrivals.get(next).copied(),
            executors.iter().filter_map(|e| e.busy_until).min(),
            timer.filter(|t| *t > now),
        ];
        match candidates.into_iter().flatten().min() {
            Some(at) => now = at.max(now),
            None => break,
        }
    }
    summarize(setup, &sent, &started, &finished, &expired, batches, batched)
}

/// The value at quantile `u` of a distribution given by (quantile, value)
/// points, linear between them.
pub fn quantile(points: &[(f64, f64)], u: f64) -> f64 {
    let Some(first) = points.first() else { return 0.0 };
    if u <= first.0 {
        return first.1;
    }
    for w in points.windows(2) {
        let ((q0, v0), (q1, v1)) = (w[0], w[1]);
        if u <= q1 {
            return v0 + (v1 - v0) * (u - q0) / (q1 - q0).max(1e-12);
        }
    }
    points[points.len() - 1].1
}

fn summarize(
    setup: &SimSetup,
    arrivals: &[Instant],
    started: &[Option<Instant>],
    finished: &[Option<Instant>],
    expired: &[bool],
    batches: usize,
    batched: usize,
) -> SimResult {
    let skip = setup.requests / 10;
    // The overhead measured at one client includes the path's own service.
    let per_request = if setup.serving_capacity.is_finite() { 1.0 / setup.serving_capacity.max(1e-9) } else { 0.0 };
    let fixed = (setup.overhead.as_secs_f64() - per_request).max(0.0);
    let mut draw = rand::rngs::StdRng::seed_from_u64(setup.seed ^ 0x5eed);
    let mut outside = || match &setup.overhead_quantiles {
        Some(q) => quantile(q, draw.random::<f64>()),
        None => fixed,
    };
    let mut latencies = Vec::new();
    let mut waits = 0.0;
    let mut dropped = 0usize;
    for r in skip..arrivals.len() {
        if expired[r] {
            dropped += 1;
            continue;
        }
        if let (Some(s), Some(f)) = (started[r], finished[r]) {
            latencies.push((f - arrivals[r]).as_secs_f64() + outside());
            waits += (s - arrivals[r]).as_secs_f64();
        }
    }
    if latencies.is_empty() {
        return SimResult { expired: 1.0, ..Default::default() };
    }
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let span = finished.iter().flatten().max().map_or(0.0, |f| (*f - arrivals[skip]).as_secs_f64());
    let counted = arrivals.len() - skip;
    SimResult {
        p50_s: q(0.50),
        p99_s: q(0.99),
        mean_s: latencies.iter().sum::<f64>() / latencies.len() as f64,
        mean_wait_s: waits / latencies.len() as f64,
        mean_batch: batched as f64 / batches.max(1) as f64,
        throughput: latencies.len() as f64 / span.max(1e-9),
        expired: dropped as f64 / counted as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(rate: f64, max_batch: usize, delay_ms: f64, curve: BatchCurve) -> SimSetup {
        SimSetup {
            policy: BatchPolicy {
                max_batch_rows: max_batch,
                max_batch_units: max_batch,
                max_queue_delay: Duration::from_secs_f64(delay_ms / 1000.0),
                latency_budget: Duration::from_secs(10),
                wait: crate::batcher::policy::QueueWait::Fixed,
            },
            instances: 1,
            curve,
            overhead: Duration::ZERO,
            overhead_quantiles: None,
            serving_capacity: f64::INFINITY,
            rate,
            requests: 200_000,
            timeout: Duration::from_secs(100),
            max_queue: 1024,
            seed: 1,
        }
    }

    #[test]
    fn one_at_a_time_matches_the_m_d_1_waiting_time() {
        // Deterministic 1 ms service, Poisson arrivals at 600/s: rho = 0.6,
        // mean wait = rho·D / (2(1 − rho)) = 0.75 ms (Pollaczek–Khinchine).
        let d = 1e-3;
        let curve = BatchCurve { points: vec![(1, d)] };
        let r = simulate(&setup(600.0, 1, 0.0, curve));
        let expected = 0.6 * d / (2.0 * 0.4);
        assert!((r.mean_wait_s - expected).abs() / expected < 0.03, "wait {} vs {expected}", r.mean_wait_s);
        assert!((r.mean_s - (expected + d)).abs() / (expected + d) < 0.03);
        assert!((r.mean_batch - 1.0).abs() < 1e-9);
        assert!((r.throughput - 600.0).abs() / 600.0 < 0.02, "throughput {}", r.throughput);
    }

    #[test]
    fn batching_sustains_a_rate_one_at_a_time_cannot() {
        // 1 ms + 0.1 ms per row: one at a time caps at ~909/s.
        let curve = BatchCurve { points: vec![(1, 1.1e-3), (64, 7.4e-3)] };
        let single = simulate(&setup(1500.0, 1, 0.0, curve.clone()));
        let batched = simulate(&setup(1500.0, 32, 1.0, curve));
        assert!(single.p99_s > 1.0 && single.expired > 0.0, "overloaded without batching: {single:?}");
        assert!(batched.p99_s < 0.02, "batched p99 {}", batched.p99_s);
        assert!(batched.mean_batch > 1.5);
        assert!((batched.throughput - 1500.0).abs() / 1500.0 < 0.03);
    }

    #[test]
    fn the_curve_interpolates_and_extrapolates() {
        let c = BatchCurve { points: vec![(1, 1.0), (3, 2.0), (5, 4.0)] };
        assert_eq!(c.seconds(2), 1.5);
        assert_eq!(c.seconds(4), 3.0);
        assert_eq!(c.seconds(7), 6.0);
        let e = BatchCurve { points: vec![(1, 1.0), (3, 3.0)] }.estimate();
        assert!((e.per_unit_s - 1.0).abs() < 1e-12 && e.fixed_s.abs() < 1e-12);
    }

    #[test]
    fn same_seed_same_answer() {
        let curve = BatchCurve { points: vec![(1, 1e-3), (8, 2e-3)] };
        assert_eq!(simulate(&setup(800.0, 8, 0.5, curve.clone())), simulate(&setup(800.0, 8, 0.5, curve)));
    }

    #[test]
    fn a_saturating_serving_path_adds_its_own_queueing() {
        // Free compute, a path carrying 1000/s: at 800/s it is an M/D/1
        // queue at rho 0.8, mean wait 0.8·1 ms / (2·0.2) = 2 ms, plus 1 ms.
        let curve = BatchCurve { points: vec![(1, 0.0)] };
        let mut s = setup(800.0, 8, 0.0, curve);
        s.serving_capacity = 1000.0;
        s.overhead = Duration::from_millis(1);
        let r = simulate(&s);
        let expected = 2e-3 + 1e-3;
        assert!((r.mean_s - expected).abs() / expected < 0.05, "mean {} vs {expected}", r.mean_s);
    }

    #[test]
    fn measured_overhead_quantiles_shape_the_tail() {
        assert_eq!(quantile(&[(0.0, 1.0), (0.5, 2.0), (1.0, 4.0)], 0.75), 3.0);
        let curve = BatchCurve { points: vec![(1, 0.0)] };
        let mut s = setup(100.0, 8, 0.0, curve);
        // 1 ms typically, 10 ms for the slowest 2 %.
        s.overhead_quantiles = Some(vec![(0.0, 1e-3), (0.98, 1e-3), (0.981, 10e-3), (1.0, 10e-3)]);
        let r = simulate(&s);
        assert!((r.p50_s - 1e-3).abs() < 1e-4 && (r.p99_s - 10e-3).abs() < 1e-4, "{r:?}");
    }
}

//! `kiln bench --find-max-rate`: the highest Poisson rate whose p99 meets a
//! target with every request answered OK. The ground truth for capacity
//! questions, against which `kiln plan` is judged. The search is pure
//! (which rate next, given what passed and failed) so that its mechanics
//! are tested without a server.

use super::report::StepReport;

/// What a step must show to pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// Highest acceptable p99 latency of OK answers, in milliseconds.
    pub p99_ms: f64,
    /// The search stops when the bracket is this narrow, relative to the
    /// failing rate (0.05: within 5 %).
    pub precision: f64,
    /// Most steps run, whatever the bracket.
    pub max_steps: usize,
}

impl Target {
    /// A step passes when every request it sent was answered OK (nothing
    /// refused, expired or left to the client) and the p99 is within the
    /// target.
    pub fn met_by(&self, step: &StepReport) -> bool {
        let ok = step.answered.get("OK").copied().unwrap_or(0);
        step.sent > 0 && ok == step.sent && step.answered.len() == 1 && step.latency_ms.p99 <= self.p99_ms
    }
}

/// What the search found.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Found {
    /// The highest rate that passed, if any.
    pub rate: Option<f64>,
    /// The lowest rate that failed, if any (the answer is below it).
    pub failed_at: Option<f64>,
    pub steps: usize,
}

/// The highest passing and lowest failing rates seen so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bracket {
    pass: Option<f64>,
    fail: Option<f64>,
    steps: usize,
}

impl Bracket {
    /// The next rate to try: `start`, then doubling until a failure (or
    /// halving until a pass), then the middle of the bracket; `None` when
    /// the bracket is within the target's precision or the steps are spent.
    pub fn next(&self, start: f64, target: &Target) -> Option<f64> {
        if self.steps >= target.max_steps {
            return None;
        }
        match (self.pass, self.fail) {
            (None, None) => Some(start),
            (Some(pass), None) => Some(pass * 2.0),
            // Below one request per second there is nothing to serve.
            (None, Some(fail)) => (fail / 2.0 >= 1.0).then_some(fail / 2.0),
            (Some(pass), Some(fail)) => ((fail - pass) / fail > target.precision).then_some((pass + fail) / 2.0),
        }
    }

    /// The outcome of a step at `rate`.
    pub fn record(&mut self, rate: f64, passed: bool) {
        self.steps += 1;
        if passed {
            self.pass = Some(self.pass.map_or(rate, |p| p.max(rate)));
        } else {
            self.fail = Some(self.fail.map_or(rate, |f| f.min(rate)));
        }
    }

    pub fn found(&self) -> Found {
        Found { rate: self.pass, failed_at: self.fail, steps: self.steps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Target = Target { p99_ms: 10.0, precision: 0.05, max_steps: 30 };

    /// Runs the search against a server that meets the target exactly up to
    /// `capacity` requests per second.
    fn search(capacity: f64, start: f64, target: &Target) -> (Found, Vec<f64>) {
        let mut bracket = Bracket::default();
        let mut tried = Vec::new();
        while let Some(rate) = bracket.next(start, target) {
            tried.push(rate);
            bracket.record(rate, rate <= capacity);
        }
        (bracket.found(), tried)
    }

    #[test]
    fn the_search_brackets_the_capacity_within_its_precision() {
        for (capacity, start) in [(12_345.0, 100.0), (80.0, 100.0), (1e6, 1.0), (100.0, 100.0)] {
            let (found, tried) = search(capacity, start, &TARGET);
            let rate = found.rate.expect("a passing rate");
            let failed = found.failed_at.expect("a failing rate");
            assert!(rate <= capacity && failed > capacity, "{capacity}: {found:?} after {tried:?}");
            assert!((failed - rate) / failed <= TARGET.precision, "{capacity}: {found:?}");
            assert!(found.steps < 30, "{capacity}: {} steps", found.steps);
        }
    }

    #[test]
    fn nothing_passes_below_one_request_per_second_and_steps_are_bounded() {
        let (found, _) = search(0.5, 100.0, &TARGET);
        assert_eq!(found.rate, None);
        assert!(found.failed_at.is_some_and(|f| f < 2.0));
        let short = Target { max_steps: 3, ..TARGET };
        assert_eq!(search(1e9, 100.0, &short).0.steps, 3);
    }

    fn step(sent: u64, answered: &[(&str, u64)], p99: f64) -> StepReport {
        StepReport {
            mode: "rate".into(),
            level: 100.0,
            duration_s: 1.0,
            sent,
            answered: answered.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            throughput: 100.0,
            latency_ms: crate::bench::report::Percentiles { p99, ..Default::default() },
            outside_ms: Default::default(),
            server: Default::default(),
        }
    }

    #[test]
    fn a_step_passes_only_with_every_request_ok_within_the_p99() {
        assert!(TARGET.met_by(&step(100, &[("OK", 100)], 9.0)));
        assert!(!TARGET.met_by(&step(100, &[("OK", 100)], 11.0)), "p99 over the target");
        assert!(!TARGET.met_by(&step(100, &[("OK", 99), ("RESOURCE_EXHAUSTED", 1)], 1.0)), "one refused");
        assert!(!TARGET.met_by(&step(100, &[("OK", 99), ("CLIENT_OVERLOADED", 1)], 1.0)), "client fell behind");
        assert!(!TARGET.met_by(&step(100, &[("OK", 99)], 1.0)), "one never answered");
        assert!(!TARGET.met_by(&step(0, &[], 0.0)), "nothing sent");
    }
}

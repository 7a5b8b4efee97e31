//! The arrival rate the adaptive wait plans with: requests per second that
//! arrive while the version already has work (queued or computing). A
//! request that arrives to an empty version proves nothing about company:
//! one client waiting for each answer sends exactly such requests, and
//! waiting for it would only delay it. Counts and busy time decay together
//! (half-life [`HALF_LIFE`]), so the rate follows load within a second or
//! two and falls to nothing when traffic stops.

use std::time::{Duration, Instant};

/// How fast old arrivals stop counting.
pub const HALF_LIFE: Duration = Duration::from_secs(1);

/// Decayed busy time below which the rate is not trusted (reads as zero):
/// after about seven idle half-lives the old evidence no longer counts.
const MIN_BUSY: Duration = Duration::from_millis(10);

/// Decayed counts of arrivals during busy time, and the busy time itself.
#[derive(Debug, Clone)]
pub struct ArrivalRate {
    last: Instant,
    busy: bool,
    /// Arrivals that found work already there, decayed.
    arrivals: f64,
    /// Seconds the version had work, decayed.
    busy_s: f64,
}

impl ArrivalRate {
    pub fn new(now: Instant) -> Self {
        Self { last: now, busy: false, arrivals: 0.0, busy_s: 0.0 }
    }

    /// Folds in the time since the last update.
    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        if elapsed.is_zero() {
            return;
        }
        let keep = 0.5f64.powf(elapsed.as_secs_f64() / HALF_LIFE.as_secs_f64());
        self.arrivals *= keep;
        // Busy for all of `elapsed` (the state only changes at updates);
        // the time itself decays from its midpoint on average, close enough.
        self.busy_s = self.busy_s * keep + if self.busy { elapsed.as_secs_f64() * keep.sqrt() } else { 0.0 };
        self.last = now;
    }

    /// A request arrived; `busy` says whether the version had work then.
    pub fn arrived(&mut self, now: Instant, busy: bool) {
        self.set_busy(now, busy);
        if busy {
            self.arrivals += 1.0;
        }
    }

    /// The version has work (something queued or computing), or not.
    pub fn set_busy(&mut self, now: Instant, busy: bool) {
        self.advance(now);
        self.busy = busy;
    }

    /// Requests per second arriving while there is work; zero until
    /// enough busy time has been seen.
    pub fn per_second(&self) -> f64 {
        if self.busy_s < MIN_BUSY.as_secs_f64() { 0.0 } else { self.arrivals / self.busy_s }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn one_client_waiting_for_each_answer_brings_no_company() {
        let t0 = Instant::now();
        let mut rate = ArrivalRate::new(t0);
        // Each request arrives to an empty version, computes for 1 ms, and
        // the next arrives 0.2 ms after the answer.
        let mut t = t0;
        for _ in 0..500 {
            rate.arrived(t, false);
            rate.set_busy(t, true);
            t += MS;
            rate.set_busy(t, false);
            t += MS / 5;
        }
        assert_eq!(rate.per_second(), 0.0);
    }

    #[test]
    fn arrivals_during_busy_time_measure_the_rate_and_it_decays_when_they_stop() {
        let t0 = Instant::now();
        let mut rate = ArrivalRate::new(t0);
        // Always busy; one arrival every 0.5 ms: 2000 per second.
        let mut t = t0;
        rate.set_busy(t, true);
        for _ in 0..4000 {
            t += MS / 2;
            rate.arrived(t, true);
        }
        let measured = rate.per_second();
        assert!((measured - 2000.0).abs() < 100.0, "{measured}");
        // Then one client alone for three half-lives: its busy time, with
        // no company, dilutes the old rate.
        rate.set_busy(t, false);
        for _ in 0..2500 {
            rate.arrived(t, false);
            rate.set_busy(t, true);
            t += MS;
            rate.set_busy(t, false);
            t += MS / 5;
        }
        assert!(rate.per_second() < measured / 5.0, "{}", rate.per_second());
        // Idle for twenty half-lives: the evidence is gone.
        rate.set_busy(t + 20 * HALF_LIFE, false);
        assert_eq!(rate.per_second(), 0.0);
    }
}

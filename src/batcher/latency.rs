//! The latency model: `t(batch) ≈ fixed + per_unit · units`, fitted online
//! from this version's own batch timings. The single source for when to
//! dispatch, early refusal of hopeless requests, request cost and planning.

use std::sync::Mutex;
use std::time::Duration;

/// Weight of past observations per new one: about the last 50 batches
/// dominate, so the model follows load and thermal changes within seconds
/// without jumping on one slow batch.
const DECAY: f64 = 0.98;
/// Below this weighted variance of batch sizes (in units²) the slope is not
/// identifiable from recent data, and the previous slope is kept.
const MIN_UNITS_VARIANCE: f64 = 0.25;

/// A prediction function at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyEstimate {
    /// Cost of a batch regardless of its size, in seconds.
    pub fixed_s: f64,
    /// Cost of each unit (row or token), in seconds.
    pub per_unit_s: f64,
    /// Typical requests per batch, for sharing the fixed cost in estimates.
    pub requests_per_batch: f64,
}

impl LatencyEstimate {
    /// Predicted compute time of a batch of `units`.
    pub fn predict(&self, units: usize) -> Duration {
        Duration::from_secs_f64((self.fixed_s + self.per_unit_s * units as f64).max(0.0))
    }

    /// Predicted cost of one request of `units`: its share of the fixed
    /// cost at the typical batch size, plus its own units.
    pub fn cost_estimate(&self, units: usize) -> Duration {
        Duration::from_secs_f64(
            (self.fixed_s / self.requests_per_batch.max(1.0) + self.per_unit_s * units as f64).max(0.0),
        )
    }
}

/// Exponentially weighted least squares over (units, seconds) pairs.
#[derive(Debug, Clone)]
pub struct LatencyModel {
    w: f64,
    wx: f64,
    wy: f64,
    wxx: f64,
    wxy: f64,
    requests: f64,
    estimate: LatencyEstimate,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            w: 0.0,
            wx: 0.0,
            wy: 0.0,
            wxx: 0.0,
            wxy: 0.0,
            requests: 0.0,
            estimate: LatencyEstimate { fixed_s: 0.0, per_unit_s: 0.0, requests_per_batch: 1.0 },
        }
    }
}

impl LatencyModel {
    /// Adds one batch timing and refits.
    pub fn observe(&mut self, units: usize, requests: usize, compute: Duration) {
        let (x, y) = (units as f64, compute.as_secs_f64());
        self.w = self.w * DECAY + 1.0;
        self.wx = self.wx * DECAY + x;
        self.wy = self.wy * DECAY + y;
        self.wxx = self.wxx * DECAY + x * x;
        self.wxy = self.wxy * DECAY + x * y;
        self.requests = self.requests * DECAY + requests as f64;
        let (mean_x, mean_y) = (self.wx / self.w, self.wy / self.w);
        let var_x = self.wxx / self.w - mean_x * mean_x;
        let per_unit = if var_x > MIN_UNITS_VARIANCE {
            ((self.wxy / self.w - mean_x * mean_y) / var_x).max(0.0)
        } else {
            self.estimate.per_unit_s
        };
        let fixed = (mean_y - per_unit * mean_x).max(0.0);
        self.estimate = LatencyEstimate {
            fixed_s: fixed,
            per_unit_s: per_unit,
            requests_per_batch: (self.requests / self.w).max(1.0),
        };
    }

    /// The current prediction function.
    pub fn estimate(&self) -> LatencyEstimate {
        self.estimate
    }
}

/// A latency model shared by the executors (which feed it) and the
/// scheduler and admission (which read it).
#[derive(Debug, Default)]
pub struct SharedLatency(Mutex<LatencyModel>);

impl SharedLatency {
    pub fn observe(&self, units: usize, requests: usize, compute: Duration) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).observe(units, requests, compute);
    }

    pub fn estimate(&self) -> LatencyEstimate {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).estimate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn converges_on_a_linear_cost_with_noise() {
        // True cost 200 µs + 30 µs per row, with deterministic ±10 % noise.
        let mut model = LatencyModel::default();
        for i in 0..400 {
            let units = 1 + (i * 7) % 64;
            let noise = 1.0 + 0.1 * (((i * 37) % 21) as f64 - 10.0) / 10.0;
            model.observe(units, 4, secs((200e-6 + 30e-6 * units as f64) * noise));
        }
        let e = model.estimate();
        assert!((e.fixed_s - 200e-6).abs() < 40e-6, "fixed {:e}", e.fixed_s);
        assert!((e.per_unit_s - 30e-6).abs() < 3e-6, "per unit {:e}", e.per_unit_s);
        assert!((e.requests_per_batch - 4.0).abs() < 0.1, "requests per batch {}", e.requests_per_batch);
    }

    #[test]
    fn keeps_the_slope_when_every_batch_has_the_same_size() {
        let mut model = LatencyModel::default();
        for units in [1, 64, 1, 64] {
            model.observe(units, 1, secs(100e-6 + 10e-6 * units as f64));
        }
        let slope = model.estimate().per_unit_s;
        for _ in 0..500 {
            model.observe(32, 32, secs(100e-6 + 10e-6 * 32.0));
        }
        let e = model.estimate();
        assert!((e.per_unit_s - slope).abs() < 1e-6, "{:e} vs {slope:e}", e.per_unit_s);
        assert!((e.predict(32).as_secs_f64() - 420e-6).abs() < 10e-6);
    }

    #[test]
    fn follows_a_slowdown() {
        let mut model = LatencyModel::default();
        for i in 0..200 {
            model.observe(1 + i % 8, 1, secs(1e-3));
        }
        for i in 0..200 {
            model.observe(1 + i % 8, 1, secs(3e-3));
        }
        assert!((model.estimate().predict(4).as_secs_f64() - 3e-3).abs() < 0.2e-3);
    }

    #[test]
    fn cost_estimate_shares_the_fixed_cost() {
        let e = LatencyEstimate { fixed_s: 100e-6, per_unit_s: 10e-6, requests_per_batch: 4.0 };
        assert_eq!(e.cost_estimate(2), Duration::from_secs_f64(25e-6 + 20e-6));
        assert_eq!(e.predict(2), Duration::from_secs_f64(120e-6));
    }
}

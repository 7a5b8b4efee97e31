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

/// Least squares of a line `y = fixed + slope * x` over weighted points,
/// kept as running sums so points can be added (and old ones decayed)
/// one at a time. The one fit Kiln uses: the live latency model and the
/// planner's curve both go through it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineFit {
    w: f64,
    wx: f64,
    wy: f64,
    wxx: f64,
    wxy: f64,
}

impl LineFit {
    /// Fits `points` with equal weights.
    pub fn of(points: impl IntoIterator<Item = (f64, f64)>) -> Self {
        let mut fit = Self::default();
        for (x, y) in points {
            fit.add(x, y, 1.0);
        }
        fit
    }

    /// Scales the points so far by `decay` (1: keep all), then adds one.
    pub fn add(&mut self, x: f64, y: f64, decay: f64) {
        self.w = self.w * decay + 1.0;
        self.wx = self.wx * decay + x;
        self.wy = self.wy * decay + y;
        self.wxx = self.wxx * decay + x * x;
        self.wxy = self.wxy * decay + x * y;
    }

    /// `(fixed, slope)`, both clamped at zero (time never shrinks with
    /// units). While the x values barely vary the slope cannot be told
    /// apart from noise, so `fallback_slope` stands.
    pub fn line(&self, fallback_slope: f64) -> (f64, f64) {
        if self.w == 0.0 {
            return (0.0, fallback_slope);
        }
        let (mean_x, mean_y) = (self.wx / self.w, self.wy / self.w);
        let var_x = self.wxx / self.w - mean_x * mean_x;
        let slope = if var_x > MIN_UNITS_VARIANCE {
            ((self.wxy / self.w - mean_x * mean_y) / var_x).max(0.0)
        } else {
            fallback_slope
        };
        ((mean_y - slope * mean_x).max(0.0), slope)
    }
}

/// Exponentially weighted least squares over (units, seconds) pairs.
#[derive(Debug, Clone)]
pub struct LatencyModel {
    fit: LineFit,
    /// Decayed sum of requests per batch, over the decayed batch count.
    requests: f64,
    estimate: LatencyEstimate,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            fit: LineFit::default(),
            requests: 0.0,
            estimate: LatencyEstimate { fixed_s: 0.0, per_unit_s: 0.0, requests_per_batch: 1.0 },
        }
    }
}

impl LatencyModel {
    /// Adds one batch timing and refits.
    pub fn observe(&mut self, units: usize, requests: usize, compute: Duration) {
        self.fit.add(units as f64, compute.as_secs_f64(), DECAY);
        self.requests = self.requests * DECAY + requests as f64;
        let (fixed, per_unit) = self.fit.line(self.estimate.per_unit_s);
        self.estimate = LatencyEstimate {
            fixed_s: fixed,
            per_unit_s: per_unit,
            requests_per_batch: (self.requests / self.fit.w).max(1.0),
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

    #[test]
    fn the_line_fit_recovers_a_line_and_falls_back_when_x_does_not_vary() {
        let fit = LineFit::of((1..=8).map(|x| (x as f64, 0.5 + 0.25 * x as f64)));
        let (fixed, slope) = fit.line(9.0);
        assert!((fixed - 0.5).abs() < 1e-9 && (slope - 0.25).abs() < 1e-9, "{fixed} {slope}");
        let flat = LineFit::of([(4.0, 1.0), (4.0, 3.0)]);
        assert_eq!(flat.line(0.1), (2.0 - 0.4, 0.1));
        assert_eq!(LineFit::default().line(0.3), (0.0, 0.3));
    }

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

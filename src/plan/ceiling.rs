//! How `kiln plan` finds the serving path's ceiling: closed-loop clients
//! doubled until throughput stops rising, then the best level measured
//! again until two readings agree, reporting the spread seen. One reading
//! at a fixed client count was noise (30 % short on one run, over on the
//! next). The search is pure, driven by readings, so its mechanics are
//! tested on a simulated server.

use serde::Serialize;

/// A rise below this share is "stopped rising".
const FLAT: f64 = 0.03;
/// Two readings within this share of each other agree.
const AGREE: f64 = 0.05;
/// Readings of the best level, at most.
const MAX_REPEATS: usize = 4;
/// Most clients tried.
const MAX_CLIENTS: usize = 512;

/// What the search settled on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ceiling {
    /// Answers per second: the mean of the agreeing readings at `clients`.
    pub throughput: f64,
    pub clients: usize,
    /// (lowest, highest) reading at `clients`.
    pub spread: (f64, f64),
    /// Every (clients, answers per second) reading, in order taken.
    pub readings: Vec<(usize, f64)>,
}

/// The search's state: which client count to measure next.
#[derive(Debug, Default)]
pub struct CeilingSearch {
    readings: Vec<(usize, f64)>,
    /// Set once throughput stopped rising: the level to confirm.
    settled: Option<usize>,
}

impl CeilingSearch {
    /// The next client count to measure, or `None` when done.
    pub fn next(&self) -> Option<usize> {
        let Some(level) = self.settled else {
            return Some(self.readings.last().map_or(1, |(c, _)| c * 2));
        };
        let at = self.at(level);
        (at.len() < MAX_REPEATS && !agree(&at)).then_some(level)
    }

    /// A reading at `clients`.
    pub fn record(&mut self, clients: usize, throughput: f64) {
        self.readings.push((clients, throughput));
        if self.settled.is_some() {
            return;
        }
        let best = self.best_level();
        // Two doublings in a row without a real rise, or the cap: the best
        // level seen is the ceiling's.
        let rises: Vec<f64> = self.readings.windows(2).map(|w| w[1].1 / w[0].1.max(1e-9) - 1.0).collect();
        let flat = rises.len() >= 2 && rises[rises.len() - 2..].iter().all(|r| *r < FLAT);
        if flat || clients * 2 > MAX_CLIENTS {
            self.settled = Some(best);
        }
    }

    fn best_level(&self) -> usize {
        self.readings.iter().fold((1, f64::MIN), |b, (c, t)| if *t > b.1 { (*c, *t) } else { b }).0
    }

    fn at(&self, clients: usize) -> Vec<f64> {
        self.readings.iter().filter(|(c, _)| *c == clients).map(|(_, t)| *t).collect()
    }

    /// The ceiling, once `next` is `None` (or whenever asked).
    pub fn result(&self) -> Ceiling {
        let clients = self.settled.unwrap_or_else(|| self.best_level());
        let at = self.at(clients);
        let (low, high) = at.iter().fold((f64::MAX, f64::MIN), |(l, h), t| (l.min(*t), h.max(*t)));
        // The two closest readings, when some agree; else all of them.
        let mut sorted = at.clone();
        sorted.sort_by(f64::total_cmp);
        let pair = sorted.windows(2).min_by(|a, b| (a[1] - a[0]).total_cmp(&(b[1] - b[0])));
        let used: Vec<f64> = match pair {
            Some(p) if agree(p) => p.to_vec(),
            _ => sorted,
        };
        let throughput = used.iter().sum::<f64>() / used.len().max(1) as f64;
        Ceiling { throughput, clients, spread: (low, high), readings: self.readings.clone() }
    }
}

/// Some two readings are within [`AGREE`] of each other.
fn agree(readings: &[f64]) -> bool {
    readings.iter().enumerate().any(|(i, a)| readings[i + 1..].iter().any(|b| (a - b).abs() <= AGREE * a.max(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search on a server whose throughput is `truth(clients)`
    /// times the next of `noise` (cycled).
    fn search(truth: impl Fn(usize) -> f64, noise: &[f64]) -> Ceiling {
        let mut s = CeilingSearch::default();
        let mut i = 0;
        while let Some(clients) = s.next() {
            s.record(clients, truth(clients) * noise[i % noise.len()]);
            i += 1;
            assert!(i < 100, "the search must end");
        }
        s.result()
    }

    #[test]
    fn raises_load_until_throughput_stops_rising() {
        // Saturates at 30 000/s from 64 clients on: a fixed 32 clients would
        // have read 24 000.
        let c = search(|c| (c as f64 * 750.0).min(30_000.0), &[1.0]);
        assert_eq!(c.clients, 64);
        assert_eq!(c.throughput, 30_000.0);
        assert!(c.readings.iter().any(|(n, _)| *n == 256), "kept going past the knee: {:?}", c.readings);
    }

    #[test]
    fn repeats_noisy_readings_until_two_agree_and_reports_the_spread() {
        // 10 000/s flat from 8 clients; readings swing ±20 % then settle.
        let truth = |c: usize| (c as f64 * 1250.0).min(10_000.0);
        let c = search(truth, &[1.0, 1.0, 1.0, 1.0, 1.2, 1.0, 1.0, 0.8, 1.01, 0.99]);
        let (low, high) = c.spread;
        assert!(low <= c.throughput && c.throughput <= high, "{c:?}");
        assert!((c.throughput - 10_000.0).abs() / 10_000.0 <= AGREE, "{c:?}");
        let repeats = c.readings.iter().filter(|(n, _)| *n == c.clients).count();
        assert!((2..=MAX_REPEATS).contains(&repeats), "{c:?}");
    }

    #[test]
    fn stops_at_the_client_cap() {
        let c = search(|c| c as f64, &[1.0]);
        assert_eq!(c.clients, 512);
        assert!(c.readings.iter().all(|(n, _)| *n <= 512));
    }
}

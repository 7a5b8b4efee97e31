//! Cumulative per-version statistics in the shape of the V2
//! `ModelStatistics` message: counts and nanoseconds that only grow.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A count and a total duration in nanoseconds.
#[derive(Debug, Default)]
pub struct DurationStat {
    count: AtomicU64,
    ns: AtomicU64,
}

impl DurationStat {
    pub fn add(&self, count: u64, duration: Duration) {
        self.count.fetch_add(count, Ordering::Relaxed);
        self.ns.fetch_add(duration.as_nanos() as u64, Ordering::Relaxed);
    }

    /// `(count, ns)` as of now.
    pub fn read(&self) -> (u64, u64) {
        (self.count.load(Ordering::Relaxed), self.ns.load(Ordering::Relaxed))
    }
}

/// Per batch size: executions and their compute time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchStat {
    pub count: u64,
    pub compute_ns: u64,
}

/// Everything `ModelStatistics` reports for one model version.
#[derive(Debug, Default)]
pub struct VersionStats {
    pub success: DurationStat,
    pub fail: DurationStat,
    pub queue: DurationStat,
    pub compute_input: DurationStat,
    pub compute_infer: DurationStat,
    pub compute_output: DurationStat,
    /// Rows computed.
    pub inference_count: AtomicU64,
    /// Batches run.
    pub execution_count: AtomicU64,
    /// Milliseconds since the epoch of the last batch.
    pub last_inference_ms: AtomicU64,
    batches: Mutex<BTreeMap<u64, BatchStat>>,
}

impl VersionStats {
    /// Records one executed batch of `rows` rows.
    pub fn record_batch(&self, rows: u64, compute: Duration) {
        self.inference_count.fetch_add(rows, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let now_ms = super::unix_ms();
        self.last_inference_ms.store(now_ms, Ordering::Relaxed);
        let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        let entry = batches.entry(rows).or_default();
        entry.count += 1;
        entry.compute_ns += compute.as_nanos() as u64;
    }

    /// Per-batch-size statistics, smallest size first.
    pub fn batch_stats(&self) -> Vec<(u64, BatchStat)> {
        let batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        batches.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

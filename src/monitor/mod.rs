//! What Kiln reports about itself and its traffic: Prometheus metrics, the
//! cumulative statistics behind the V2 `ModelStatistics` RPC, drift
//! against a reference profile, the process's health and the sampled
//! request log, and the audit log of admin actions.

pub mod audit;
pub mod drift;
pub mod metrics;
pub mod process;
pub mod request_log;
pub mod stats;

use std::sync::Arc;

/// Milliseconds since the Unix epoch (0 on a clock before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What watches a version's batches after they ran, off the hot path.
#[derive(Clone, Default)]
pub struct BatchObservers {
    pub drift: Option<Arc<drift::DriftHandle>>,
    pub log: Option<Arc<request_log::RequestLog>>,
}

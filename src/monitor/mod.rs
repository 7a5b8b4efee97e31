//! What Kiln reports about itself: Prometheus metrics and the cumulative
//! statistics behind the V2 `ModelStatistics` RPC.

pub mod metrics;
pub mod stats;

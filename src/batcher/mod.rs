//! Dynamic batching: a bounded queue per model version, a pure dispatch
//! policy, and the scheduler task that owns the queue and feeds executors.

pub mod latency;
pub mod policy;
pub mod queue;
pub mod scheduler;

pub use queue::{Batch, Pending, Reply};
pub use scheduler::{BatcherHandle, BatcherSettings};

//! Dynamic batching: a bounded queue per model version, a pure dispatch
//! policy, the scheduler thread that owns the queue and dispatches, the
//! executors that run batches (and know nothing of the scheduler), and the
//! per-batch observer.

pub mod arrivals;
pub mod executor;
pub mod latency;
pub mod observer;
pub mod policy;
pub mod queue;
pub mod scheduler;

pub use queue::{Batch, Pending, Reply};
pub use scheduler::{BatcherHandle, BatcherSettings};

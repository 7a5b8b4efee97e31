//! What waits in a queue and what leaves it as a batch.

use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::InferError;
use crate::request::{InferRequest, InferResponse};

/// The one channel a request's answer goes back on.
pub type Reply = oneshot::Sender<Result<InferResponse, InferError>>;

/// An admitted request waiting for its batch.
#[derive(Debug)]
pub struct Pending {
    pub request: InferRequest,
    pub reply: Reply,
    pub enqueued: Instant,
}

impl Pending {
    /// True when the caller has gone (cancelled or timed out on its side),
    /// so computing it would be wasted work.
    pub fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Requests dispatched together to one executor.
#[derive(Debug)]
pub struct Batch {
    pub requests: Vec<Pending>,
    /// When the scheduler formed it; queue time ends here.
    pub dispatched: Instant,
}

impl Batch {
    /// Rows across all requests.
    pub fn rows(&self) -> usize {
        self.requests.iter().map(|p| p.request.rows).sum()
    }
}

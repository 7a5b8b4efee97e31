//! What waits in a queue, in what order, and what leaves it as a batch.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio::sync::oneshot;

use super::policy::{BatchShape, QueuedView};
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
    /// Set when the request leaves the queue in a batch; its caller reads
    /// it to tell "never computed" (refund the tenant) from "may be
    /// computing" when it stops waiting.
    pub dispatched: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Pending {
    /// True when the caller has gone (cancelled or timed out on its side),
    /// so computing it would be wasted work.
    pub fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn view(&self) -> QueuedView {
        QueuedView {
            arrival: self.enqueued,
            deadline: self.request.deadline,
            rows: self.request.rows,
            longest: self.request.size.longest,
            units: self.request.size.units,
        }
    }
}

/// Requests dispatched together to one executor.
#[derive(Debug)]
pub struct Batch {
    pub requests: Vec<Pending>,
}

impl Batch {
    /// Rows, longest row and real units across all requests.
    pub fn shape(&self) -> BatchShape {
        self.requests.iter().fold(BatchShape::default(), |s, p| s.with(&p.view()))
    }
}

/// Service order: priority level (1 first), then earliest deadline, then
/// arrival.
pub type QueueKey = (u32, Instant, u64);

/// The queue of one model version, in service order.
#[derive(Debug)]
pub struct ServiceQueue {
    items: BTreeMap<QueueKey, Pending>,
    next_seq: u64,
    per_priority: Vec<usize>,
}

impl ServiceQueue {
    /// An empty queue for `levels` priority levels.
    pub fn new(levels: u32) -> Self {
        Self { items: BTreeMap::new(), next_seq: 0, per_priority: vec![0; levels as usize] }
    }

    pub fn push(&mut self, pending: Pending) {
        let key = (pending.request.priority, pending.request.deadline, self.next_seq);
        self.next_seq += 1;
        self.count(key.0, true);
        self.items.insert(key, pending);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Keys and policy views, in service order.
    pub fn views(&self) -> (Vec<QueueKey>, Vec<QueuedView>) {
        self.items.iter().map(|(k, p)| (*k, p.view())).unzip()
    }

    /// Removes one request.
    pub fn take(&mut self, key: &QueueKey) -> Option<Pending> {
        let p = self.items.remove(key)?;
        self.count(key.0, false);
        Some(p)
    }

    /// Removes and returns every request whose caller has gone.
    pub fn take_abandoned(&mut self) -> Vec<Pending> {
        let keys: Vec<QueueKey> = self.items.iter().filter(|(_, p)| p.is_abandoned()).map(|(k, _)| *k).collect();
        keys.iter().filter_map(|k| self.take(k)).collect()
    }

    /// Removes everything, in service order.
    pub fn take_all(&mut self) -> Vec<Pending> {
        self.per_priority.iter_mut().for_each(|c| *c = 0);
        std::mem::take(&mut self.items).into_values().collect()
    }

    /// Requests waiting at each level (index 0 = level 1).
    pub fn depth_by_priority(&self) -> &[usize] {
        &self.per_priority
    }

    fn count(&mut self, level: u32, up: bool) {
        if let Some(c) = self.per_priority.get_mut(level.saturating_sub(1) as usize) {
            if up {
                *c += 1;
            } else {
                *c = c.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pending(priority: u32, deadline: Instant, id: &str) -> Pending {
        let (reply, answer) = oneshot::channel();
        // The caller stays interested for the whole test.
        std::mem::forget(answer);
        Pending {
            dispatched: Default::default(),
            request: InferRequest {
                id: id.into(),
                inputs: crate::model::Inputs::Tensors(vec![]),
                rows: 1,
                outputs: vec![],
                received: Instant::now(),
                priority,
                deadline,
                size: crate::model::Prepared::rows(1),
            },
            reply,
            enqueued: Instant::now(),
        }
    }

    #[test]
    fn serves_priority_first_then_earliest_deadline_then_arrival() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut q = ServiceQueue::new(2);
        q.push(pending(2, t0 + s, "low-early"));
        q.push(pending(1, t0 + 3 * s, "high-late"));
        q.push(pending(1, t0 + 2 * s, "high-early"));
        q.push(pending(1, t0 + 2 * s, "high-early-second"));
        assert_eq!(q.depth_by_priority(), &[3, 1]);
        let order: Vec<String> = q.take_all().into_iter().map(|p| p.request.id).collect();
        assert_eq!(order, ["high-early", "high-early-second", "high-late", "low-early"]);
    }

    #[test]
    fn abandoned_requests_are_taken_out() {
        let t0 = Instant::now();
        let mut q = ServiceQueue::new(1);
        let (reply, answer) = oneshot::channel();
        let mut gone = pending(1, t0, "gone");
        gone.reply = reply;
        drop(answer);
        q.push(gone);
        q.push(pending(1, t0, "kept"));
        let taken: Vec<String> = q.take_abandoned().into_iter().map(|p| p.request.id).collect();
        assert_eq!(taken, ["gone"]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.depth_by_priority(), &[1]);
    }
}

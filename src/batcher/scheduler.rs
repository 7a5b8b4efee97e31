//! The scheduler task: sole owner of one model version's queue. Requests
//! arrive over a channel; batches leave for idle executors when the policy
//! says so; executors report back when they are free again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::policy::{BatchPolicy, Decision};
use super::queue::{Batch, Pending};
use crate::error::InferError;
use crate::executor::{ExecutorPool, InstanceFree};
use crate::monitor::metrics::VersionMetrics;
use crate::request::{InferRequest, InferResponse};

/// Queue settings of one model version.
#[derive(Debug, Clone, Copy)]
pub struct BatcherSettings {
    pub policy: BatchPolicy,
    /// Most requests waiting at once.
    pub max_queue: usize,
}

/// The API's way into a model version's queue. Cheap to clone; when every
/// clone is dropped the scheduler answers what is queued and stops.
#[derive(Clone)]
pub struct BatcherHandle {
    submit: mpsc::UnboundedSender<Pending>,
    depth: Arc<AtomicUsize>,
    max_queue: usize,
    model: String,
    version: u64,
}

impl BatcherHandle {
    /// Queues a request and returns where its answer will arrive. A full
    /// queue refuses at once: the channel is unbounded but `depth` bounds
    /// what is admitted, so memory stays bounded.
    pub fn submit(
        &self,
        request: InferRequest,
    ) -> Result<oneshot::Receiver<Result<InferResponse, InferError>>, InferError> {
        let admitted = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| (d < self.max_queue).then_some(d + 1));
        if admitted.is_err() {
            return Err(InferError::QueueFull { model: self.model.clone(), version: self.version, max_queue: self.max_queue });
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending { request, reply, enqueued: Instant::now() };
        if let Err(mpsc::error::SendError(pending)) = self.submit.send(pending) {
            self.depth.fetch_sub(1, Ordering::AcqRel);
            let _ = pending.reply.send(Err(InferError::Unavailable(format!(
                "model '{}' version {} is shutting down",
                self.model, self.version
            ))));
        }
        Ok(answer)
    }

    /// Requests admitted and not yet dispatched.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }
}

/// Starts the scheduler task for one model version (inside a tokio runtime).
pub fn spawn(
    model: &str,
    version: u64,
    settings: BatcherSettings,
    executors: ExecutorPool,
    metrics: VersionMetrics,
) -> BatcherHandle {
    let (submit, requests) = mpsc::unbounded_channel();
    let depth = Arc::new(AtomicUsize::new(0));
    let scheduler = Scheduler {
        queue: VecDeque::new(),
        depth: depth.clone(),
        policy: settings.policy,
        executors,
        metrics,
    };
    tokio::spawn(scheduler.run(requests));
    BatcherHandle { submit, depth, max_queue: settings.max_queue, model: model.to_string(), version }
}

struct Scheduler {
    queue: VecDeque<Pending>,
    depth: Arc<AtomicUsize>,
    policy: BatchPolicy,
    executors: ExecutorPool,
    metrics: VersionMetrics,
}

impl Scheduler {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Pending>) {
        let mut draining = false;
        loop {
            let wake = self.dispatch_ready(draining);
            if draining && self.queue.is_empty() {
                break;
            }
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                free = self.executors.free.recv() => match free {
                    Some(InstanceFree(i)) => self.executors.idle.push(i),
                    // Every executor thread is gone; nothing more can run.
                    None => break,
                },
                pending = requests.recv(), if !draining => match pending {
                    Some(p) => self.queue.push_back(p),
                    None => draining = true,
                },
                _ = sleep => {}
            }
        }
        // Whatever is left (executors gone) is answered, never dropped silently.
        for pending in self.queue.drain(..) {
            let _ = pending.reply.send(Err(InferError::Unavailable("model is shutting down".into())));
        }
        self.depth.store(0, Ordering::Release);
        self.metrics.queue_depth.set(0.0);
    }

    /// Dispatches batches while an executor is idle and the policy allows;
    /// returns when to look again if the policy asked to wait.
    fn dispatch_ready(&mut self, draining: bool) -> Option<Instant> {
        loop {
            self.drop_abandoned();
            self.metrics.queue_depth.set(self.queue.len() as f64);
            if self.executors.idle.is_empty() {
                return None;
            }
            let now = Instant::now();
            let oldest = self.queue.front().map(|p| p.enqueued);
            match self.policy.decide(self.queue.len(), oldest, now, draining) {
                Decision::Idle => return None,
                Decision::WaitUntil(at) => return Some(at),
                Decision::Dispatch(count) => {
                    let requests: Vec<Pending> = self.queue.drain(..count).collect();
                    self.depth.fetch_sub(count, Ordering::AcqRel);
                    let instance = self.executors.idle.pop().expect("checked non-empty above");
                    self.executors.dispatch(instance, Batch { requests, dispatched: now });
                }
            }
        }
    }

    /// Removes requests whose caller has gone, counting each.
    fn drop_abandoned(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|p| !p.is_abandoned());
        let dropped = before - self.queue.len();
        if dropped > 0 {
            self.depth.fetch_sub(dropped, Ordering::AcqRel);
            self.metrics.rejected("cancelled").increment(dropped as u64);
        }
    }
}

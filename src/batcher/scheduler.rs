//! The scheduler: sole owner of one model version's queue, on its own OS
//! thread. Requests, cancellations and "executor free" notices arrive on one
//! channel; the policy decides what expires and what leaves as a batch.
//!
//! A thread rather than a tokio task because batching delays and expiry
//! times are often below a millisecond and tokio's timer rounds sleeps up to
//! whole milliseconds; `recv_timeout` waits on a futex with microsecond
//! accuracy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Instant;

use tokio::sync::oneshot;

use super::executor::ExecutorPool;
use super::latency::SharedLatency;
use super::observer::BatchObserver;
use super::policy::{Action, BatchPolicy, Placement, place};
use super::queue::{Batch, Pending, ServiceQueue};
use crate::error::InferError;
use crate::model::{Model, ModelSpec};
use crate::monitor::BatchObservers;
use crate::monitor::metrics::VersionMetrics;
use crate::monitor::stats::VersionStats;
use crate::request::{InferRequest, InferResponse};

/// Queue settings of one model version.
#[derive(Debug, Clone, Copy)]
pub struct BatcherSettings {
    pub policy: BatchPolicy,
    /// Most requests waiting at once.
    pub max_queue: usize,
    /// Executor threads.
    pub instances: usize,
    /// Priority levels (1 is the highest).
    pub priority_levels: u32,
}

/// What the scheduler thread hears.
pub(crate) enum Message {
    /// A newly admitted request.
    Submit(Pending),
    /// Executor instance `n` finished a batch.
    Free(usize),
    /// A caller went away: drop its request if it is still queued.
    Sweep,
    /// Every handle is gone: answer what is queued, then stop.
    Close,
}

/// The API's way into a model version's queue. Cheap to clone; when every
/// clone is dropped the scheduler answers what is queued and stops.
#[derive(Clone)]
pub struct BatcherHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    submit: mpsc::Sender<Message>,
    depth: Arc<AtomicUsize>,
    max_queue: usize,
    model: String,
    version: u64,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        let _ = self.submit.send(Message::Close);
    }
}

/// Where an admitted request's answer arrives. Dropping it before the
/// answer (the client cancelled) tells the scheduler to drop the request.
pub struct Ticket {
    answer: oneshot::Receiver<Result<InferResponse, InferError>>,
    sweep: mpsc::Sender<Message>,
    answered: bool,
    dispatched: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Ticket {
    /// Waits for the answer.
    pub async fn answer(&mut self) -> Result<InferResponse, InferError> {
        let result = (&mut self.answer)
            .await
            .unwrap_or_else(|_| Err(InferError::Unavailable("the model stopped before answering".into())));
        self.answered = true;
        result
    }

    /// Whether the request has left the queue in a batch (it may be
    /// computing, or computed); false means it was never computed.
    pub fn dispatched(&self) -> bool {
        self.dispatched.load(Ordering::Acquire)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.answered {
            // Close before telling the scheduler: fields drop only after
            // this body, and the sweep must already see the caller gone.
            self.answer.close();
            let _ = self.sweep.send(Message::Sweep);
        }
    }
}

impl BatcherHandle {
    /// Queues a request and returns where its answer will arrive. A full
    /// queue refuses at once: the channel is unbounded but `depth` bounds
    /// what is admitted, so memory stays bounded.
    pub fn submit(&self, request: InferRequest) -> Result<Ticket, InferError> {
        let inner = &self.inner;
        let admitted =
            inner.depth.fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| (d < inner.max_queue).then_some(d + 1));
        if admitted.is_err() {
            return Err(InferError::QueueFull {
                model: inner.model.clone(),
                version: inner.version,
                max_queue: inner.max_queue,
            });
        }
        let (reply, answer) = oneshot::channel();
        let dispatched = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pending = Pending { request, reply, enqueued: Instant::now(), dispatched: dispatched.clone() };
        if let Err(mpsc::SendError(Message::Submit(pending))) = inner.submit.send(Message::Submit(pending)) {
            inner.depth.fetch_sub(1, Ordering::AcqRel);
            let _ = pending.reply.send(Err(InferError::Unavailable(format!(
                "model '{}' version {} is shutting down",
                inner.model, inner.version
            ))));
        }
        Ok(Ticket { answer, sweep: inner.submit.clone(), answered: false, dispatched })
    }

    /// Requests admitted and not yet dispatched.
    pub fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::Acquire)
    }
}

/// Starts the executors and the scheduler thread of one model version.
pub fn spawn(
    model: Arc<dyn Model>,
    spec: Arc<ModelSpec>,
    settings: BatcherSettings,
    latency: Arc<SharedLatency>,
    stats: Arc<VersionStats>,
    metrics: VersionMetrics,
    observers: BatchObservers,
) -> std::io::Result<BatcherHandle> {
    let (submit, messages) = mpsc::channel();
    let observer = Arc::new(BatchObserver {
        spec: spec.clone(),
        stats,
        metrics: metrics.clone(),
        latency: latency.clone(),
        drift: observers.drift,
        log: observers.log,
    });
    let free = submit.clone();
    // The scheduler is gone only at shutdown; executors keep draining what
    // was staged, so a failed report is fine.
    let finished = move |instance| {
        let _ = free.send(Message::Free(instance));
    };
    let executors = ExecutorPool::start(model, spec.clone(), settings.instances, observer, finished)?;
    let slots = Slots::new(executors.instances());
    let depth = Arc::new(AtomicUsize::new(0));
    let scheduler = Scheduler {
        queue: ServiceQueue::new(settings.priority_levels),
        depth: depth.clone(),
        policy: settings.policy,
        latency,
        executors,
        slots,
        metrics,
        spec: spec.clone(),
        next_expiry: None,
    };
    std::thread::Builder::new()
        .name(format!("kiln-sched-{}-{}", spec.name, spec.version))
        .spawn(move || scheduler.run(messages))?;
    Ok(BatcherHandle {
        inner: Arc::new(HandleInner {
            submit,
            depth,
            max_queue: settings.max_queue,
            model: spec.name.clone(),
            version: spec.version,
        }),
    })
}

/// Batches sent to each executor and not finished: 0 idle, 1 running, 2
/// running with the next one staged behind it. The scheduler's own
/// bookkeeping: executors only report that they finished.
struct Slots {
    in_flight: Vec<u8>,
}

impl Slots {
    fn new(instances: usize) -> Self {
        Self { in_flight: vec![0; instances] }
    }

    fn has_idle(&self) -> bool {
        self.in_flight.contains(&0)
    }

    /// Some instance runs a batch with nothing staged behind it.
    fn has_stage_slot(&self) -> bool {
        self.in_flight.contains(&1)
    }

    fn idle_instance(&self) -> Option<usize> {
        self.in_flight.iter().position(|n| *n == 0)
    }

    fn stage_instance(&self) -> Option<usize> {
        self.in_flight.iter().position(|n| *n == 1)
    }

    fn dispatched(&mut self, i: usize) {
        if let Some(n) = self.in_flight.get_mut(i) {
            *n += 1;
        }
    }

    fn finished(&mut self, i: usize) {
        if let Some(n) = self.in_flight.get_mut(i) {
            *n = n.saturating_sub(1);
        }
    }
}

struct Scheduler {
    queue: ServiceQueue,
    depth: Arc<AtomicUsize>,
    policy: BatchPolicy,
    latency: Arc<SharedLatency>,
    executors: ExecutorPool,
    /// What each executor has been given and not finished.
    slots: Slots,
    metrics: VersionMetrics,
    spec: Arc<ModelSpec>,
    /// The earliest instant a queued request may need expiring.
    next_expiry: Option<Instant>,
}

impl Scheduler {
    fn run(mut self, messages: mpsc::Receiver<Message>) {
        let mut draining = false;
        loop {
            let wake = self.step(draining);
            if draining && self.queue.is_empty() {
                break;
            }
            let message = match wake {
                Some(at) => messages.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => messages.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match message {
                Ok(Message::Submit(p)) => {
                    // Its own expiry may come before anything queued.
                    let alone = self.latency.estimate().predict(p.request.padded_units());
                    let last_start = p.request.deadline.checked_sub(alone).unwrap_or(p.enqueued);
                    self.next_expiry = Some(self.next_expiry.map_or(last_start, |n| n.min(last_start)));
                    self.queue.push(p);
                }
                Ok(Message::Free(i)) => self.slots.finished(i),
                Ok(Message::Sweep) => self.drop_abandoned(),
                Ok(Message::Close) => draining = true,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Only reachable with requests left if every sender vanished; they
        // are answered, never dropped silently.
        for pending in self.queue.take_all() {
            let _ = pending.reply.send(Err(InferError::Unavailable("model is shutting down".into())));
        }
        self.depth.store(0, Ordering::Release);
        self.publish_depth();
    }

    /// Expires what can no longer be met and dispatches what the policy
    /// allows; returns when to look again.
    fn step(&mut self, draining: bool) -> Option<Instant> {
        loop {
            let now = Instant::now();
            let can_run = self.slots.has_idle();
            let can_stage = self.slots.has_stage_slot();
            let expiry_due = self.next_expiry.is_some_and(|at| now >= at);
            if !(can_run || can_stage || expiry_due || draining) {
                // Every executor is busy with a batch staged behind it: only
                // expiry can change anything before the next message.
                self.publish_depth();
                return self.next_expiry;
            }
            let estimate = self.latency.estimate();
            let (keys, views) = self.queue.views();
            let plan = self.policy.plan(&views, now, &estimate, draining);
            for &i in &plan.expired {
                if let Some(p) = self.queue.take(&keys[i]) {
                    self.expire(p, &estimate, now);
                }
            }
            self.next_expiry = plan.next_expiry;
            let (members, reason) = match plan.action {
                Action::Dispatch { members, reason } => (members, reason),
                Action::WaitUntil(at) if can_run => {
                    self.publish_depth();
                    return Some(self.next_expiry.map_or(at, |e| e.min(at)));
                }
                _ => {
                    self.publish_depth();
                    return self.next_expiry;
                }
            };
            let instance = match place(reason, can_run, can_stage) {
                Placement::Idle => self.slots.idle_instance(),
                Placement::Stage => self.slots.stage_instance(),
                Placement::Hold => None,
            };
            let Some(instance) = instance else {
                self.publish_depth();
                return self.next_expiry;
            };
            let requests: Vec<Pending> = members.iter().filter_map(|&i| self.queue.take(&keys[i])).collect();
            for p in &requests {
                p.dispatched.store(true, Ordering::Release);
            }
            self.depth.fetch_sub(requests.len(), Ordering::AcqRel);
            if self.executors.dispatch(instance, Batch { requests }) {
                self.slots.dispatched(instance);
            }
        }
    }

    fn expire(&mut self, pending: Pending, estimate: &super::latency::LatencyEstimate, now: Instant) {
        self.depth.fetch_sub(1, Ordering::AcqRel);
        self.metrics.rejected("expired_in_queue").increment(1);
        let waited = now.saturating_duration_since(pending.enqueued);
        let left = pending.request.deadline.saturating_duration_since(now);
        let _ = pending.reply.send(Err(InferError::Expired(format!(
            "model '{}' version {}: deadline exceeded while queued: waited {} µs, {} µs left, computing it \
             takes about {} µs; it was never computed",
            self.spec.name,
            self.spec.version,
            waited.as_micros(),
            left.as_micros(),
            estimate.predict(pending.request.padded_units()).as_micros()
        ))));
    }

    /// Removes requests whose caller has gone, counting each.
    fn drop_abandoned(&mut self) {
        let dropped = self.queue.take_abandoned().len();
        if dropped > 0 {
            self.depth.fetch_sub(dropped, Ordering::AcqRel);
            self.metrics.rejected("cancelled").increment(dropped as u64);
        }
    }

    fn publish_depth(&self) {
        for (level, depth) in self.queue.depth_by_priority().iter().enumerate() {
            if let Some(g) = self.metrics.queue_depth.get(level) {
                g.set(*depth as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;
    use crate::model::{DataType, ModelError, Tensor, TensorData, TensorSpec};

    /// Doubles its input; blocks each batch until the test opens the gate,
    /// so the test controls when the executor is busy. Negative input fails
    /// the batch; NaN panics.
    struct GatedDoubler {
        gate: Mutex<std::sync::mpsc::Receiver<()>>,
        batches: AtomicUsize,
        rows: AtomicUsize,
    }

    impl Model for GatedDoubler {
        fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
            let _ = self.gate.lock().expect("gate").recv();
            self.batches.fetch_add(1, Ordering::SeqCst);
            self.rows.fetch_add(inputs[0].rows(), Ordering::SeqCst);
            let TensorData::Fp32(v) = &inputs[0].data else { unreachable!("fp32 only") };
            if v.iter().any(|x| x.is_nan()) {
                panic!("NaN reached the model");
            }
            if v.iter().any(|x| *x < 0.0) {
                return Err(ModelError::Compute("negative input".into()));
            }
            Ok(vec![Tensor {
                shape: inputs[0].shape.clone(),
                data: TensorData::Fp32(v.iter().map(|x| x * 2.0).collect()),
            }])
        }
    }

    fn spec() -> Arc<ModelSpec> {
        let t = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 1],
            features: vec![],
        };
        Arc::new(ModelSpec {
            name: "double".into(),
            version: 1,
            platform: "test".into(),
            description: String::new(),
            inputs: vec![t("x")],
            outputs: vec![t("y")],
            weights_sha256: String::new(),
            device: "cpu".into(),
        })
    }

    fn request(x: f32) -> InferRequest {
        let now = Instant::now();
        InferRequest {
            id: String::new(),
            inputs: vec![Tensor { shape: vec![1, 1], data: TensorData::Fp32(vec![x]) }],
            rows: 1,
            outputs: vec![0],
            received: now,
            priority: 1,
            deadline: now + Duration::from_secs(60),
            size: crate::model::Prepared::rows(1),
        }
    }

    fn start(
        max_batch_size: usize,
        max_queue: usize,
    ) -> (BatcherHandle, Arc<GatedDoubler>, std::sync::mpsc::Sender<()>) {
        let (open, gate) = std::sync::mpsc::channel();
        let model =
            Arc::new(GatedDoubler { gate: Mutex::new(gate), batches: AtomicUsize::new(0), rows: AtomicUsize::new(0) });
        let settings = BatcherSettings {
            policy: BatchPolicy {
                max_batch_rows: max_batch_size,
                max_batch_units: max_batch_size,
                max_queue_delay: Duration::ZERO,
                latency_budget: Duration::from_secs(1),
            },
            max_queue,
            instances: 1,
            priority_levels: 1,
        };
        let metrics = VersionMetrics::new("double", 1, 1, max_batch_size);
        let handle =
            spawn(model.clone(), spec(), settings, Arc::default(), Arc::default(), metrics, Default::default())
                .expect("spawn");
        (handle, model, open)
    }

    async fn value_of(mut ticket: Ticket) -> f32 {
        value(ticket.answer().await)
    }

    fn value(answer: Result<InferResponse, InferError>) -> f32 {
        match answer.expect("ok").outputs[0].data {
            TensorData::Fp32(ref v) => v[0],
            _ => unreachable!(),
        }
    }

    /// Waits (bounded) until the scheduler has handed the first request to
    /// the executor, which then blocks on the gate.
    fn wait_for_depth(handle: &BatcherHandle, depth: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while handle.depth() != depth {
            assert!(Instant::now() < deadline, "depth stayed {} (wanted {depth})", handle.depth());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[tokio::test]
    async fn full_queue_refuses_at_once_and_every_admitted_request_is_answered() {
        let (handle, model, open) = start(4, 3);
        let first = handle.submit(request(1.0)).expect("admitted");
        wait_for_depth(&handle, 0); // dispatched, executor blocked on the gate
        let queued: Vec<_> = (0..3).map(|i| handle.submit(request(i as f32)).expect("admitted")).collect();
        match handle.submit(request(9.0)) {
            Err(InferError::QueueFull { max_queue: 3, .. }) => {}
            other => panic!("expected QueueFull, got {:?}", other.map(|_| ())),
        }
        for _ in 0..2 {
            open.send(()).expect("gate");
        }
        assert_eq!(value_of(first).await, 2.0);
        for (i, answer) in queued.into_iter().enumerate() {
            assert_eq!(value_of(answer).await, 2.0 * i as f32);
        }
        // The three queued requests ran as one batch.
        assert_eq!(model.batches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn model_error_and_panic_fail_only_their_batch() {
        let (handle, _model, open) = start(1, 8);
        let mut bad = handle.submit(request(-1.0)).expect("admitted");
        let mut panicking = handle.submit(request(f32::NAN)).expect("admitted");
        let good = handle.submit(request(3.0)).expect("admitted");
        for _ in 0..3 {
            open.send(()).expect("gate");
        }
        assert!(
            matches!(bad.answer().await, Err(InferError::ModelFailed { reason, .. }) if reason.contains("negative"))
        );
        assert!(
            matches!(panicking.answer().await, Err(InferError::ModelFailed { reason, .. }) if reason.contains("panicked"))
        );
        assert_eq!(value_of(good).await, 6.0);
    }

    #[tokio::test]
    async fn cancelled_request_is_never_computed() {
        let (handle, model, open) = start(4, 8);
        let first = handle.submit(request(1.0)).expect("admitted");
        wait_for_depth(&handle, 0);
        let cancelled = handle.submit(request(5.0)).expect("admitted");
        let kept = handle.submit(request(2.0)).expect("admitted");
        drop(cancelled); // the caller went away while queued
        open.send(()).expect("gate");
        open.send(()).expect("gate");
        value_of(first).await;
        assert_eq!(value_of(kept).await, 4.0);
        assert_eq!(model.rows.load(Ordering::SeqCst), 2, "the cancelled row reached the model");
    }

    #[tokio::test]
    async fn dropping_every_handle_still_answers_what_is_queued() {
        let (handle, _model, open) = start(2, 8);
        let answers: Vec<_> = (0..5).map(|i| handle.submit(request(i as f32)).expect("admitted")).collect();
        drop(handle);
        for _ in 0..5 {
            let _ = open.send(());
        }
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(value_of(answer).await, 2.0 * i as f32);
        }
    }
}

//! The scheduler: sole owner of one model version's queue and of its
//! executors, on its own OS thread. Requests, cancellations and executor
//! reports arrive on one channel; the policy decides what expires and what
//! leaves as a batch. It supervises the executors (a dead one is
//! restarted); if it dies itself, or cannot keep an executor alive, the
//! version stops serving: what it held is answered UNAVAILABLE and the
//! version's liveness turns false for health and readiness.
//!
//! A thread rather than a tokio task because batching delays and expiry
//! times are often below a millisecond and tokio's timer rounds sleeps up to
//! whole milliseconds; `recv_timeout` waits on a futex, which this thread
//! asks to wake on time ([`precise_timers`](crate::runtime::precise_timers):
//! Linux's default 50 µs timer slack is longer than many waits). Even so a
//! timed wait ends late by tens of microseconds on a busy machine; the
//! scheduler measures by how much, and the adaptive wait counts it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::arrivals::Arrivals;
use super::executor::{ExecutorPool, InlineRunner, Queue, Report};
use super::latency::SharedLatency;
use super::observer::BatchObserver;
use super::policy::{Action, BatchPolicy, Placement, QueueWait, Traffic, place};
use super::queue::{Batch, Pending, ServiceQueue};
use crate::error::{InferError, panic_message};
use crate::model::{Backend, ModelSpec};
use crate::monitor::metrics::VersionMetrics;
use crate::request::{InferRequest, InferResponse};
use crate::runtime::Threads;

/// Executor deaths within [`RESTART_WINDOW`] after which the scheduler stops
/// restarting and the version stops serving: a crash loop would otherwise
/// fail every batch while health says SERVING.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Longest predicted compute a request may run inline: below about a
/// thread hand-off, computing on the receiving thread costs the runtime
/// less than waking the scheduler and an executor.
const INLINE_MAX: Duration = Duration::from_micros(100);

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
    /// An executor's report: finished a batch, or died.
    Executor(Report),
    /// A caller went away: drop its request if it is still queued.
    Sweep,
    /// Every handle is gone: answer what is queued, then stop.
    Close,
    /// A request ran on the inline lane: the lent executor is back.
    Inline { arrived: Instant, started: Instant, finished: Instant },
}

/// The inline lane, with the adaptive wait only. While a version is idle
/// (nothing queued, an executor free), the scheduler lends that executor
/// to the lane; the first request to take it, if predicted to compute
/// within [`INLINE_MAX`], runs on the thread that submitted it, with no
/// hand-off to the scheduler or an executor thread (which would cost more
/// than the computation). Whoever swaps `open` from true to false owns the
/// executor: a submitter runs one request and reports back; the scheduler
/// takes it back the moment something queues.
struct Lane {
    open: AtomicBool,
    runner: InlineRunner,
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
    /// True while the scheduler serves; false for good once it stopped.
    serving: Arc<watch::Sender<bool>>,
    lane: Option<Arc<Lane>>,
    latency: Arc<SharedLatency>,
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
    serving: Arc<watch::Sender<bool>>,
}

impl Ticket {
    /// Waits for the answer. A request whose holder died (a scheduler or
    /// executor thread that panicked) is answered UNAVAILABLE here.
    pub async fn answer(&mut self) -> Result<InferResponse, InferError> {
        let result = (&mut self.answer).await.unwrap_or_else(|_| {
            Err(InferError::Unavailable(if *self.serving.borrow() {
                "the model's executor stopped before answering (it is restarted; see the server log); retry".into()
            } else {
                "the model version stopped serving before answering (see the server log)".into()
            }))
        });
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
        self.submit_with(request, true)
    }

    /// [`submit`](Self::submit), saying whether the request may take the
    /// inline lane: a caller that knows other requests are on their way
    /// says no, so that they can share its batch.
    pub fn submit_with(&self, request: InferRequest, may_inline: bool) -> Result<Ticket, InferError> {
        let inner = &self.inner;
        if !self.serving() {
            return Err(self.not_serving());
        }
        if may_inline && let Some(lane) = self.claim_lane(&request) {
            return Ok(self.run_inline(lane, request));
        }
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
        Ok(Ticket { answer, sweep: inner.submit.clone(), answered: false, dispatched, serving: inner.serving.clone() })
    }

    /// Claims the inline lane for `request`, if it is open to it.
    fn claim_lane(&self, request: &InferRequest) -> Option<&Lane> {
        let inner = &self.inner;
        let lane = inner.lane.as_deref().filter(|l| l.open.load(Ordering::Acquire))?;
        // Injected faults belong to the scheduler's thread.
        #[cfg(any(test, feature = "test-backends"))]
        if request.id.starts_with("kiln-fault-") {
            return None;
        }
        let compute = inner.latency.estimate().predict(request.padded_units());
        // A hopeless request goes to the scheduler, which refuses it.
        if compute > INLINE_MAX || request.deadline < Instant::now() + compute {
            return None;
        }
        lane.open.compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire).is_ok().then_some(lane)
    }

    /// Runs `request` on this thread, on the claimed lane, and gives the
    /// executor back to the scheduler.
    fn run_inline(&self, lane: &Lane, request: InferRequest) -> Ticket {
        let inner = &self.inner;
        let arrived = Instant::now();
        let (reply, answer) = oneshot::channel();
        let dispatched = Arc::new(AtomicBool::new(true));
        let pending = Pending { request, reply, enqueued: arrived, dispatched: dispatched.clone() };
        // A panic outside the backend's own guard fails this request only:
        // its reply drops, and its ticket reads UNAVAILABLE.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| lane.runner.run(pending)));
        let _ = inner.submit.send(Message::Inline { arrived, started: arrived, finished: Instant::now() });
        Ticket { answer, sweep: inner.submit.clone(), answered: false, dispatched, serving: inner.serving.clone() }
    }

    /// Requests admitted and not yet dispatched.
    pub fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::Acquire)
    }

    /// False once the scheduler has stopped for good (it died, or could
    /// not keep its executors alive): requests are then refused.
    pub fn serving(&self) -> bool {
        *self.inner.serving.borrow()
    }

    /// Follows [`serving`](Self::serving), for health.
    pub fn liveness(&self) -> watch::Receiver<bool> {
        self.inner.serving.subscribe()
    }

    /// Asks the scheduler to answer what is queued and stop (shutdown).
    pub fn close(&self) {
        let _ = self.inner.submit.send(Message::Close);
    }

    fn not_serving(&self) -> InferError {
        InferError::Unavailable(format!(
            "model '{}' version {} is not serving: its scheduler stopped (see the server log)",
            self.inner.model, self.inner.version
        ))
    }
}

/// Starts the executors and the scheduler thread of one model version,
/// registered in `threads`; `observer` watches every batch.
pub fn spawn(
    backend: Arc<dyn Backend>,
    observer: BatchObserver,
    settings: BatcherSettings,
    threads: &Threads,
) -> std::io::Result<BatcherHandle> {
    let (submit, messages) = mpsc::channel();
    let (spec, metrics, latency) = (observer.spec.clone(), observer.metrics.clone(), observer.latency.clone());
    let reports = submit.clone();
    // The scheduler is gone only at shutdown; executors keep draining what
    // was staged, so a failed report is fine.
    let report = move |r| {
        let _ = reports.send(Message::Executor(r));
    };
    let executors = ExecutorPool::start(backend, settings.instances, Arc::new(observer), report, threads)?;
    let slots = Slots::new(executors.instances());
    let lane = (settings.policy.wait == QueueWait::Adaptive)
        .then(|| Arc::new(Lane { open: AtomicBool::new(false), runner: executors.inline_runner() }));
    let depth = Arc::new(AtomicUsize::new(0));
    let serving = Arc::new(watch::Sender::new(true));
    let scheduler = Scheduler {
        _liveness: Liveness(serving.clone()),
        queue: ServiceQueue::new(settings.priority_levels),
        depth: depth.clone(),
        policy: settings.policy,
        latency: latency.clone(),
        executors,
        slots,
        metrics: metrics.clone(),
        spec: spec.clone(),
        next_expiry: None,
        deaths: Vec::new(),
        arrivals: Arrivals::new(Instant::now(), settings.policy.max_queue_delay),
        free_since: Instant::now(),
        late_wake: LateWake::default(),
        lane: lane.clone(),
    };
    let stopped =
        Stopped { spec: spec.clone(), serving: serving.clone(), depth: depth.clone(), ready: metrics.ready.clone() };
    threads.spawn(format!("kiln-sched-{}-{}", spec.name, spec.version), move || {
        crate::runtime::precise_timers();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(move || scheduler.run(messages)));
        match outcome {
            // Shut down: refuse from now on, quietly.
            Ok(Exit::Closed) => {
                stopped.serving.send_replace(false);
            }
            Ok(Exit::Failed(reason)) => stopped.stop(&reason),
            Err(panic) => stopped.stop(&format!("scheduler thread panicked: {}", panic_message(panic.as_ref()))),
        }
    })?;
    Ok(BatcherHandle {
        inner: Arc::new(HandleInner {
            submit,
            depth,
            max_queue: settings.max_queue,
            model: spec.name.clone(),
            version: spec.version,
            serving,
            lane,
            latency,
        }),
    })
}

/// Turns the version not serving when the scheduler unwinds from a panic.
struct Liveness(Arc<watch::Sender<bool>>);

impl Drop for Liveness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.send_replace(false);
        }
    }
}

/// How a scheduler's loop ended.
enum Exit {
    /// Shutdown: everything queued was answered.
    Closed,
    /// It could not go on serving (executors kept dying).
    Failed(String),
}

/// Turns a version that lost its scheduler NOT_SERVING: the liveness that
/// health and readiness follow, `kiln_model_ready`, and a log line. What
/// the scheduler held is answered by its drop (its tickets then read
/// UNAVAILABLE); new requests are refused.
struct Stopped {
    spec: Arc<ModelSpec>,
    serving: Arc<watch::Sender<bool>>,
    depth: Arc<AtomicUsize>,
    ready: metrics::Gauge,
}

impl Stopped {
    fn stop(&self, reason: &str) {
        tracing::error!(
            model = %self.spec.name,
            version = self.spec.version,
            %reason,
            "the version stopped serving: health NOT_SERVING, its requests answered UNAVAILABLE"
        );
        self.serving.send_replace(false);
        self.depth.store(0, Ordering::Release);
        self.ready.set(0.0);
    }
}

/// Batches sent to each executor and not finished: 0 idle, 1 running, 2
/// running with the next one staged behind it; and the idle one lent to
/// the inline lane, if any, which is not the scheduler's to use. The
/// scheduler's own bookkeeping: executors only report that they finished.
struct Slots {
    in_flight: Vec<u8>,
    lent: Option<usize>,
}

impl Slots {
    fn new(instances: usize) -> Self {
        Self { in_flight: vec![0; instances], lent: None }
    }

    fn is_idle(&self, i: usize) -> bool {
        self.in_flight[i] == 0 && self.lent != Some(i)
    }

    fn has_idle(&self) -> bool {
        (0..self.in_flight.len()).any(|i| self.is_idle(i))
    }

    /// Some instance runs a batch with nothing staged behind it.
    fn has_stage_slot(&self) -> bool {
        self.in_flight.contains(&1)
    }

    /// Share of the instances computing.
    fn busy_share(&self) -> f64 {
        let busy = self.in_flight.iter().filter(|n| **n > 0).count();
        busy as f64 / self.in_flight.len().max(1) as f64
    }

    fn idle_instance(&self) -> Option<usize> {
        (0..self.in_flight.len()).find(|&i| self.is_idle(i))
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

/// How late the scheduler's timed waits end: a moving average over the
/// last few dozen, which the adaptive wait counts into what a wait costs.
#[derive(Debug, Default)]
struct LateWake {
    mean_s: f64,
}

impl LateWake {
    /// Weight of the newest reading.
    const GAIN: f64 = 1.0 / 32.0;

    fn woke(&mut self, late: Duration) {
        self.mean_s += (late.as_secs_f64() - self.mean_s) * Self::GAIN;
    }

    fn get(&self) -> Duration {
        Duration::from_secs_f64(self.mean_s.max(0.0))
    }
}

struct Scheduler {
    /// First, so that it drops first: a panicking scheduler turns the
    /// version not serving before its queue drops and the tickets read why.
    _liveness: Liveness,
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
    /// When executors died lately, for the restart limit.
    deaths: Vec<Instant>,
    /// Arrivals by time since the last finish: the adaptive wait's evidence.
    arrivals: Arrivals,
    /// When an executor last became free.
    free_since: Instant,
    /// How late this thread's timed waits end.
    late_wake: LateWake,
    lane: Option<Arc<Lane>>,
}

impl Scheduler {
    fn run(mut self, messages: mpsc::Receiver<Message>) -> Exit {
        let mut draining = false;
        let mut exit = Exit::Closed;
        loop {
            let wake = self.step(draining);
            if draining && self.queue.is_empty() {
                break;
            }
            self.lend();
            let message = match wake {
                Some(at) => {
                    let asked = at.saturating_duration_since(Instant::now());
                    let message = messages.recv_timeout(asked);
                    if !asked.is_zero() && matches!(message, Err(RecvTimeoutError::Timeout)) {
                        self.late_wake.woke(Instant::now().saturating_duration_since(at));
                    }
                    message
                }
                None => messages.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match message {
                Ok(Message::Submit(p)) => {
                    self.arrivals.arrived(p.enqueued);
                    #[cfg(any(test, feature = "test-backends"))]
                    crate::fault::inject("scheduler", &p.request.id);
                    // Its own expiry may come before anything queued.
                    let alone = self.latency.estimate().predict(p.request.padded_units());
                    let last_start = p.request.deadline.checked_sub(alone).unwrap_or(p.enqueued);
                    self.next_expiry = Some(self.next_expiry.map_or(last_start, |n| n.min(last_start)));
                    self.queue.push(p);
                }
                Ok(Message::Executor(Report::Finished { instance, answered })) => {
                    self.slots.finished(instance);
                    let now = Instant::now();
                    self.arrivals.finished(now, answered);
                    self.arrivals.busy(now, self.slots.busy_share());
                    if self.slots.has_idle() {
                        self.free_since = now;
                    }
                }
                Ok(Message::Executor(Report::Died { instance, reason, queue })) => {
                    if let Err(reason) = self.restart(instance, &reason, queue) {
                        exit = Exit::Failed(reason);
                        break;
                    }
                }
                Ok(Message::Inline { arrived, started, finished }) => {
                    self.arrivals.arrived(arrived);
                    self.arrivals.finished(finished, 1);
                    self.arrivals.ran(finished.saturating_duration_since(started), self.slots.in_flight.len());
                    self.free_since = finished;
                    self.slots.lent = None;
                }
                Ok(Message::Sweep) => self.drop_abandoned(),
                Ok(Message::Close) => draining = true,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Some(lane) = &self.lane {
            lane.open.store(false, Ordering::Release);
        }
        // Reached with requests left when every sender vanished or the
        // version failed; they are answered, never dropped silently.
        let message = match &exit {
            Exit::Closed => "model is shutting down".to_string(),
            Exit::Failed(reason) => {
                format!("model '{}' version {} stopped serving: {reason}", self.spec.name, self.spec.version)
            }
        };
        for pending in self.queue.take_all() {
            let _ = pending.reply.send(Err(InferError::Unavailable(message.clone())));
        }
        self.depth.store(0, Ordering::Release);
        self.publish_depth();
        exit
    }

    /// Replaces a dead executor, unless executors die too often (or the
    /// thread cannot start): then the version cannot serve.
    fn restart(&mut self, instance: usize, reason: &str, queue: Queue) -> Result<(), String> {
        let now = Instant::now();
        self.deaths.retain(|at| now.duration_since(*at) < RESTART_WINDOW);
        self.deaths.push(now);
        self.metrics.executor_restarts.increment(1);
        if self.deaths.len() > MAX_RESTARTS {
            return Err(format!(
                "{} executor deaths within {} s (last: {reason}); not restarting",
                self.deaths.len(),
                RESTART_WINDOW.as_secs()
            ));
        }
        self.executors.restart(instance, queue).map_err(|e| format!("executor {instance} cannot be restarted: {e}"))?;
        // The batch it was running is gone; what was staged behind it
        // waits in the queue the new thread took over.
        self.slots.finished(instance);
        tracing::error!(
            model = %self.spec.name,
            version = self.spec.version,
            instance,
            %reason,
            "executor died; restarted it (its batches were answered)"
        );
        Ok(())
    }

    /// Lends an idle executor to the inline lane while nothing is queued.
    fn lend(&mut self) {
        let Some(lane) = &self.lane else { return };
        if self.slots.lent.is_some() || !self.queue.is_empty() {
            return;
        }
        if let Some(i) = self.slots.idle_instance() {
            self.slots.lent = Some(i);
            lane.open.store(true, Ordering::Release);
        }
    }

    /// Takes the lent executor back, unless a request already runs on it
    /// (then it comes back with that request's report).
    fn reclaim(&mut self) {
        if let (Some(lane), Some(_)) = (&self.lane, self.slots.lent)
            && lane.open.compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            self.slots.lent = None;
        }
    }

    /// Expires what can no longer be met and dispatches what the policy
    /// allows; returns when to look again.
    fn step(&mut self, draining: bool) -> Option<Instant> {
        if !self.queue.is_empty() || draining {
            self.reclaim();
        }
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
            // With no executor free only a full batch can leave (staged),
            // whatever the wait would be: the adaptive wait, the costly part
            // of a decision, is weighed only when it can matter.
            let traffic = Traffic {
                arrivals: can_run.then_some(&self.arrivals),
                free_since: can_run.then_some(self.free_since),
                late_wake: self.late_wake.get(),
            };
            let plan = self.policy.plan(&views, now, &estimate, &traffic, draining);
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
                self.arrivals.busy(now, self.slots.busy_share());
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
    use crate::model::{DataType, Inputs, ModelError, Tensor, TensorData, TensorSpec};

    #[test]
    fn late_wakes_are_averaged_over_the_last_few_dozen() {
        let mut late = LateWake::default();
        assert_eq!(late.get(), Duration::ZERO);
        for _ in 0..300 {
            late.woke(Duration::from_micros(80));
        }
        assert!(late.get().abs_diff(Duration::from_micros(80)) < Duration::from_micros(1), "{:?}", late.get());
        // One odd reading moves it by a thirty-second of the difference.
        late.woke(Duration::from_micros(400));
        assert!(late.get().abs_diff(Duration::from_micros(90)) < Duration::from_micros(1), "{:?}", late.get());
    }

    /// Doubles its input; blocks each batch until the test opens the gate,
    /// so the test controls when the executor is busy. Negative input fails
    /// the batch; NaN panics; 777 gives an output shorter than its shape,
    /// so splitting it panics in the executor, outside the model's guard.
    struct GatedDoubler {
        gate: Mutex<std::sync::mpsc::Receiver<()>>,
        batches: AtomicUsize,
        rows: AtomicUsize,
    }

    impl Backend for GatedDoubler {
        fn run(&self, inputs: &Inputs) -> Result<Vec<Tensor>, ModelError> {
            let inputs = inputs.tensors()?;
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
            if v.contains(&777.0) {
                return Ok(vec![Tensor { shape: inputs[0].shape.clone(), data: TensorData::Fp32(vec![]) }]);
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
        InferRequest::row(Tensor { shape: vec![1, 1], data: TensorData::Fp32(vec![x]) })
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
                wait: crate::batcher::policy::QueueWait::Fixed,
            },
            max_queue,
            instances: 1,
            priority_levels: 1,
        };
        let metrics = VersionMetrics::new("double", 1, 1, max_batch_size);
        let handle =
            spawn(model.clone(), BatchObserver::new(spec(), metrics), settings, &Threads::default()).expect("spawn");
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

    #[tokio::test]
    async fn a_dead_executor_is_restarted_and_its_batches_are_answered() {
        let (handle, _model, open) = start(1, 8);
        let mut breaking = handle.submit(request(777.0)).expect("admitted");
        let after = handle.submit(request(4.0)).expect("admitted");
        for _ in 0..2 {
            open.send(()).expect("gate");
        }
        match breaking.answer().await {
            Err(InferError::Unavailable(m)) => assert!(m.contains("executor stopped"), "{m}"),
            other => panic!("expected UNAVAILABLE, got {:?}", other.map(|_| ())),
        }
        // The same instance serves on after its restart.
        assert_eq!(value_of(after).await, 8.0);
        assert!(handle.serving());
    }

    #[tokio::test]
    async fn executors_dying_in_a_loop_stop_the_version_and_everything_is_answered() {
        let (handle, _model, open) = start(1, 64);
        let tickets: Vec<_> = (0..=MAX_RESTARTS).map(|_| handle.submit(request(777.0)).expect("admitted")).collect();
        let queued: Vec<_> = (0..3).map(|i| handle.submit(request(i as f32)).expect("admitted")).collect();
        let mut live = handle.liveness();
        for _ in 0..=MAX_RESTARTS + 3 {
            let _ = open.send(());
        }
        for mut t in tickets.into_iter().chain(queued) {
            // Each broke its executor or was answered when the version stopped.
            assert!(matches!(t.answer().await, Err(InferError::Unavailable(_)) | Ok(_)));
        }
        tokio::time::timeout(Duration::from_secs(10), live.wait_for(|s| !*s)).await.expect("stops").expect("watch");
        assert!(matches!(handle.submit(request(1.0)), Err(InferError::Unavailable(m)) if m.contains("not serving")));
    }

    #[tokio::test]
    async fn a_dead_scheduler_stops_the_version_and_answers_its_queue() {
        let (handle, _model, open) = start(4, 8);
        let first = handle.submit(request(1.0)).expect("admitted");
        wait_for_depth(&handle, 0); // dispatched, executor blocked on the gate
        let queued: Vec<_> = (0..3).map(|i| handle.submit(request(i as f32)).expect("admitted")).collect();
        let mut live = handle.liveness();
        let mut fault = request(0.0);
        fault.id = crate::fault::request_id("scheduler");
        let mut killer = handle.submit(fault).expect("admitted");
        tokio::time::timeout(Duration::from_secs(10), live.wait_for(|s| !*s)).await.expect("stops").expect("watch");
        for mut t in queued {
            match t.answer().await {
                Err(InferError::Unavailable(m)) => assert!(m.contains("stopped serving"), "{m}"),
                other => panic!("expected UNAVAILABLE, got {:?}", other.map(|_| ())),
            }
        }
        assert!(matches!(killer.answer().await, Err(InferError::Unavailable(_))));
        match handle.submit(request(1.0)) {
            Err(InferError::Unavailable(m)) => assert!(m.contains("not serving"), "{m}"),
            other => panic!("expected UNAVAILABLE, got {:?}", other.map(|_| ())),
        }
        // The batch already running is still answered.
        open.send(()).expect("gate");
        assert_eq!(value_of(first).await, 2.0);
    }

    /// Doubles its input and notes the name of the thread it ran on.
    #[derive(Default)]
    struct WhereRun(Mutex<Vec<String>>);

    impl Backend for WhereRun {
        fn run(&self, inputs: &Inputs) -> Result<Vec<Tensor>, ModelError> {
            let inputs = inputs.tensors()?;
            let name = std::thread::current().name().unwrap_or_default().to_string();
            self.0.lock().expect("names").push(name);
            let TensorData::Fp32(v) = &inputs[0].data else { unreachable!("fp32 only") };
            Ok(vec![Tensor {
                shape: inputs[0].shape.clone(),
                data: TensorData::Fp32(v.iter().map(|x| x * 2.0).collect()),
            }])
        }
    }

    fn lane_open(handle: &BatcherHandle) -> bool {
        handle.inner.lane.as_ref().is_some_and(|l| l.open.load(Ordering::Acquire))
    }

    #[tokio::test]
    async fn an_idle_version_runs_a_cheap_request_on_the_callers_thread_and_never_two_at_once() {
        let model = Arc::new(WhereRun::default());
        let settings = BatcherSettings {
            policy: BatchPolicy {
                max_batch_rows: 8,
                max_batch_units: 8,
                max_queue_delay: Duration::from_millis(1),
                latency_budget: Duration::from_secs(1),
                wait: QueueWait::Adaptive,
            },
            max_queue: 8,
            instances: 1,
            priority_levels: 1,
        };
        let metrics = VersionMetrics::new("double", 1, 1, 8);
        let handle =
            spawn(model.clone(), BatchObserver::new(spec(), metrics), settings, &Threads::default()).expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lane_open(&handle) {
            assert!(Instant::now() < deadline, "the idle version never opened its inline lane");
            std::thread::sleep(Duration::from_millis(1));
        }
        let here = std::thread::current().name().unwrap_or_default().to_string();
        // Answered before submit returns, computed on this thread.
        let mut ticket = handle.submit(request(2.0)).expect("admitted");
        assert!(ticket.dispatched());
        assert_eq!(value(ticket.answer().await), 4.0);
        assert_eq!(model.0.lock().expect("names").last(), Some(&here));
        // While a request holds the lane (taken here by hand, as a
        // submitter would), the executor is not the scheduler's: the next
        // request waits, queued, until the lane's holder reports back.
        while !lane_open(&handle) {
            assert!(Instant::now() < deadline, "the lane did not reopen");
            std::thread::sleep(Duration::from_millis(1));
        }
        let lane = handle.inner.lane.clone().expect("adaptive has a lane");
        assert!(lane.open.compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire).is_ok());
        let waiting = handle.submit(request(3.0)).expect("admitted");
        wait_for_depth(&handle, 1);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(handle.depth(), 1, "it must not run beside the lane's request");
        let now = Instant::now();
        handle.inner.submit.send(Message::Inline { arrived: now, started: now, finished: now }).expect("send");
        assert_eq!(value_of(waiting).await, 6.0);
        let names = model.0.lock().expect("names").clone();
        assert_eq!(names.len(), 2);
        assert!(names[1].starts_with("kiln-exec-"), "{names:?}");
    }
}

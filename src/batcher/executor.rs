//! Executor threads: each runs whole batches on the backend, on a dedicated
//! OS thread (the tokio runtime only through the scheduler's inline lane,
//! for single requests predicted to cost less than a thread hand-off),
//! catching the backend's panics so that only the failing batch fails, then
//! splits the outputs back to each request. An executor knows nothing of
//! the scheduler: it reports each finished batch, and its own death,
//! through the callback it was given, and hands what it ran to the batch
//! observer. A dead executor is restarted by whoever owns the pool (the
//! scheduler).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use super::observer::{BatchObserver, Ran};
use super::{Batch, Pending};
use crate::error::{InferError, panic_message};
use crate::model::{Backend, Inputs, ModelSpec, Tensor};
use crate::request::{InferResponse, Timing};
use crate::runtime::Threads;

/// What an executor reports about itself.
#[derive(Debug)]
pub enum Report {
    /// An instance finished a batch of `answered` requests and can take
    /// another.
    Finished { instance: usize, answered: usize },
    /// Instance `n`'s thread died (a panic outside the backend's own
    /// guard) while running a batch, whose requests were answered. Its
    /// queue comes back with it, holding what was staged behind that batch
    /// for the restarted thread.
    Died { instance: usize, reason: String, queue: Queue },
}

/// An instance's queue of batches, handed from a dead thread to its
/// successor so that nothing staged is lost.
#[derive(Debug)]
pub struct Queue(Receiver<Batch>);

type ReportFn = Arc<dyn Fn(Report) + Send + Sync>;

/// The executor threads of one model version: where batches are sent.
pub struct ExecutorPool {
    senders: Vec<Sender<Batch>>,
    worker: Arc<Worker>,
    report: ReportFn,
    threads: Threads,
}

impl ExecutorPool {
    /// Starts `instances` threads sharing one loaded backend; each reports
    /// through `report`.
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        instances: usize,
        observer: Arc<BatchObserver>,
        report: impl Fn(Report) + Send + Sync + 'static,
        threads: &Threads,
    ) -> std::io::Result<Self> {
        let worker = Arc::new(Worker { backend, spec: observer.spec.clone(), observer });
        let mut pool =
            Self { senders: Vec::with_capacity(instances), worker, report: Arc::new(report), threads: threads.clone() };
        for instance in 0..instances {
            let (tx, rx) = std::sync::mpsc::channel::<Batch>();
            pool.spawn(instance, Queue(rx))?;
            pool.senders.push(tx);
        }
        Ok(pool)
    }

    fn spawn(&self, instance: usize, queue: Queue) -> std::io::Result<()> {
        let (worker, report) = (self.worker.clone(), self.report.clone());
        let spec = &self.worker.spec;
        let name = format!("kiln-exec-{}-{}-{instance}", spec.name, spec.version);
        self.threads.spawn(name, move || run_instance(&worker, instance, queue, report.as_ref()))
    }

    /// Starts a fresh thread for instance `n` on the dead one's queue.
    pub fn restart(&self, instance: usize, queue: Queue) -> std::io::Result<()> {
        self.spawn(instance, queue)
    }

    /// Runs single requests on the caller's thread (the inline lane).
    pub(crate) fn inline_runner(&self) -> InlineRunner {
        InlineRunner(self.worker.clone())
    }

    /// Instances there are.
    pub fn instances(&self) -> usize {
        self.senders.len()
    }

    /// Hands a batch to an instance (to run now, or next if it is busy);
    /// false when the thread is gone, in which case the batch is answered
    /// with the failure, never dropped.
    pub fn dispatch(&self, instance: usize, batch: Batch) -> bool {
        match self.senders[instance].send(batch) {
            Ok(()) => true,
            Err(std::sync::mpsc::SendError(batch)) => {
                fail_all(batch.requests, &self.worker.spec, "executor thread stopped".into());
                false
            }
        }
    }
}

/// Runs one request on the caller's own thread, with the pool's backend and
/// observer: the scheduler's inline lane, for requests that find the
/// version idle and take less time to compute than a thread hand-off.
#[derive(Clone)]
pub(crate) struct InlineRunner(Arc<Worker>);

impl InlineRunner {
    pub(crate) fn run(&self, pending: Pending) {
        for (p, response) in self.0.run(Batch { requests: vec![pending] }) {
            let _ = p.reply.send(Ok(response));
        }
    }
}

/// One executor thread's life: batches until the pool closes its channel.
/// A panic outside the backend's guard ends it (the requests of the batch
/// it was running are answered as their replies drop) and its queue goes
/// back with the report, so the pool's owner can restart the instance.
fn run_instance(worker: &Worker, instance: usize, queue: Queue, report: &(dyn Fn(Report) + Send + Sync)) {
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        for batch in &queue.0 {
            let answers = worker.run(batch);
            // Free before the answers go out: a client that sends its next
            // request the moment it is answered must find this instance
            // free, or the scheduler would count it as company.
            report(Report::Finished { instance, answered: answers.len() });
            for (p, response) in answers {
                // A caller that has gone simply does not read its answer.
                let _ = p.reply.send(Ok(response));
            }
        }
    }));
    if let Err(panic) = outcome {
        let reason = format!("executor thread panicked: {}", panic_message(panic.as_ref()));
        report(Report::Died { instance, reason, queue });
    }
}

struct Worker {
    backend: Arc<dyn Backend>,
    spec: Arc<ModelSpec>,
    observer: Arc<BatchObserver>,
}

impl Worker {
    /// Runs one batch: a failed batch is answered here; a computed one's
    /// answers are returned for the caller to send.
    fn run(&self, batch: Batch) -> Vec<(Pending, InferResponse)> {
        let shape = batch.shape();
        let (rows, size) = (shape.rows, batch.requests.len());
        // Queue time ends when the batch starts, staged or not.
        let started = Instant::now();
        self.observer.started(&batch, started);
        let inputs = match guarded(|| self.stack_inputs(&batch.requests)) {
            Ok(inputs) => inputs,
            Err(reason) => {
                self.fail(batch.requests, reason);
                return Vec::new();
            }
        };
        let stacked = Instant::now();
        let outcome = guarded(|| self.compute(&inputs, rows));
        let computed = Instant::now();
        let compute = computed - stacked;
        let outputs = match outcome {
            Ok(outputs) => outputs,
            Err(reason) => {
                self.observer.failed(rows, compute);
                self.fail(batch.requests, reason);
                return Vec::new();
            }
        };
        let mut offset = 0;
        let mut answers = Vec::with_capacity(size);
        for p in batch.requests {
            let response = InferResponse {
                outputs: p.request.outputs.iter().map(|&o| outputs[o].slice_rows(offset, p.request.rows)).collect(),
                timing: Timing {
                    queue_us: started.saturating_duration_since(p.enqueued).as_micros() as u64,
                    compute_us: compute.as_micros() as u64,
                    batch_size: size as u64,
                    // Its real units' share: padding is charged to whoever
                    // needed the longest row, pro rata.
                    cost_us: (compute.as_micros() as u64 * p.request.size.units as u64) / shape.units.max(1) as u64,
                },
            };
            offset += p.request.rows;
            answers.push((p, response));
        }
        let ran = Ran { shape, inputs: &inputs, outputs: &outputs, answers: &answers, started, stacked, computed };
        self.observer.ran(&ran);
        answers
    }

    fn fail(&self, requests: Vec<Pending>, reason: String) {
        tracing::error!(model = %self.spec.name, version = self.spec.version, %reason, "batch failed; the server serves on");
        fail_all(requests, &self.spec, reason);
    }

    /// Stacks the batch's requests' inputs along the batch dimension.
    fn stack_inputs(&self, requests: &[Pending]) -> Result<Inputs, String> {
        let parts: Vec<&Inputs> = requests.iter().map(|p| &p.request.inputs).collect();
        Inputs::concat(&parts).ok_or_else(|| "the batch's inputs could not be stacked".to_string())
    }

    /// Runs the backend and checks that every declared output came back
    /// with one row per input row.
    fn compute(&self, inputs: &Inputs, rows: usize) -> Result<Vec<Tensor>, String> {
        let outputs = self.backend.run(inputs).map_err(|e| e.to_string())?;
        if outputs.len() != self.spec.outputs.len() {
            return Err(format!("model returned {} outputs, declared {}", outputs.len(), self.spec.outputs.len()));
        }
        if let Some((spec, out)) =
            self.spec.outputs.iter().zip(&outputs).find(|(s, o)| o.rows() != rows || o.row_len() != s.row_len())
        {
            return Err(format!("output `{}` came back with shape {:?} for {rows} rows", spec.name, out.shape));
        }
        Ok(outputs)
    }
}

/// Runs `work`, turning a panic into an error so that only this batch
/// fails and the executor thread lives on.
fn guarded<T>(work: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(work)) {
        Ok(result) => result,
        Err(panic) => Err(format!("model panicked: {}", panic_message(panic.as_ref()))),
    }
}

fn fail_all(requests: Vec<Pending>, spec: &ModelSpec, reason: String) {
    for p in requests {
        let _ = p.reply.send(Err(InferError::ModelFailed {
            model: spec.name.clone(),
            version: spec.version,
            reason: reason.clone(),
        }));
    }
}

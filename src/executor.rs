//! Executor threads: each runs whole batches on the model, on a dedicated
//! OS thread (never the tokio runtime), catching panics so that only the
//! failing batch fails, then splits the outputs back to each request.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::batcher::latency::SharedLatency;
use crate::batcher::scheduler::Message;
use crate::batcher::{Batch, Pending};
use crate::error::InferError;
use crate::model::{Model, ModelSpec, Tensor};
use crate::monitor::BatchObservers;
use crate::monitor::metrics::VersionMetrics;
use crate::monitor::request_log::{Entry, RequestLog};
use crate::monitor::stats::VersionStats;
use crate::request::{InferResponse, Timing};

/// The executor threads of one model version, as the scheduler sees them.
pub struct ExecutorPool {
    senders: Vec<std::sync::mpsc::Sender<Batch>>,
    /// Batches sent to each instance and not finished: 0 idle, 1 running,
    /// 2 running with the next one staged behind it.
    in_flight: Vec<u8>,
    spec: Arc<ModelSpec>,
}

impl ExecutorPool {
    /// Starts `instances` threads sharing one loaded model; each reports
    /// `Message::Free` to the scheduler after every batch.
    pub(crate) fn start(
        model: Arc<dyn Model>,
        spec: Arc<ModelSpec>,
        instances: usize,
        latency: Arc<SharedLatency>,
        reporting: Reporting,
        scheduler: std::sync::mpsc::Sender<Message>,
    ) -> std::io::Result<Self> {
        let Reporting { stats, metrics, observers } = reporting;
        let mut senders = Vec::with_capacity(instances);
        for instance in 0..instances {
            let (tx, rx) = std::sync::mpsc::channel::<Batch>();
            let worker = Worker {
                model: model.clone(),
                spec: spec.clone(),
                latency: latency.clone(),
                stats: stats.clone(),
                metrics: metrics.clone(),
                observers: observers.clone(),
            };
            let scheduler = scheduler.clone();
            std::thread::Builder::new().name(format!("kiln-exec-{}-{}-{instance}", spec.name, spec.version)).spawn(
                move || {
                    for batch in rx {
                        worker.run(batch);
                        // The scheduler is gone only at shutdown; keep
                        // draining what was staged.
                        let _ = scheduler.send(Message::Free(instance));
                    }
                },
            )?;
            senders.push(tx);
        }
        Ok(Self { senders, in_flight: vec![0; instances], spec })
    }

    /// True when some instance has nothing to run.
    pub fn has_idle(&self) -> bool {
        self.in_flight.contains(&0)
    }

    /// True when some instance runs a batch with nothing staged behind it.
    pub fn has_stage_slot(&self) -> bool {
        self.in_flight.contains(&1)
    }

    pub fn idle_instance(&self) -> Option<usize> {
        self.in_flight.iter().position(|n| *n == 0)
    }

    pub fn stage_instance(&self) -> Option<usize> {
        self.in_flight.iter().position(|n| *n == 1)
    }

    /// Instance `i` finished a batch.
    pub fn finished(&mut self, i: usize) {
        if let Some(n) = self.in_flight.get_mut(i) {
            *n = n.saturating_sub(1);
        }
    }

    /// Hands a batch to an instance (to run now, or next if it is busy).
    pub fn dispatch(&mut self, instance: usize, batch: Batch) {
        match self.senders[instance].send(batch) {
            Ok(()) => self.in_flight[instance] += 1,
            // The thread is gone (it never panics out of a batch, so this
            // means the process is going down): answer, do not drop.
            Err(std::sync::mpsc::SendError(batch)) => {
                fail_all(batch.requests, &self.spec, "executor thread stopped".into())
            }
        }
    }
}

/// Where an executor reports what it ran: statistics, metrics, and the
/// observers (drift, request log) that see every batch.
pub(crate) struct Reporting {
    pub stats: Arc<VersionStats>,
    pub metrics: VersionMetrics,
    pub observers: BatchObservers,
}

struct Worker {
    model: Arc<dyn Model>,
    spec: Arc<ModelSpec>,
    latency: Arc<SharedLatency>,
    stats: Arc<VersionStats>,
    metrics: VersionMetrics,
    observers: BatchObservers,
}

/// Batch ids for the request log, unique in the process.
static NEXT_BATCH_ID: AtomicU64 = AtomicU64::new(1);

impl Worker {
    fn run(&self, batch: Batch) {
        let shape = batch.shape();
        let (rows, units) = (shape.rows, shape.padded());
        let size = batch.requests.len();
        // Queue time ends when the batch starts, staged or not.
        let started = Instant::now();
        for p in &batch.requests {
            let waited = started.saturating_duration_since(p.enqueued);
            self.stats.queue.add(1, waited);
            self.metrics.queue_duration.record(waited.as_secs_f64());
        }
        self.metrics.batch_size.record(size as f64);
        self.metrics.batch_units.record(units as f64);
        self.metrics.batch_fill_ratio.record(units as f64 / self.metrics.max_batch_units as f64);
        self.metrics.padding_ratio.record(1.0 - shape.fill());

        let inputs = match guarded(|| self.stack_inputs(&batch.requests)) {
            Ok(inputs) => inputs,
            Err(reason) => return self.fail(batch.requests, reason),
        };
        let stacked = Instant::now();
        let outcome = guarded(|| self.compute(&inputs, rows));
        let computed = Instant::now();
        let compute = computed - stacked;
        self.stats.record_batch(rows as u64, compute);
        self.metrics.compute_duration.record(compute.as_secs_f64());
        let outputs = match outcome {
            Ok(outputs) => outputs,
            Err(reason) => return self.fail(batch.requests, reason),
        };
        self.latency.observe(units, size, compute);
        self.metrics.publish_latency(&self.latency.estimate());
        if let Some(drift) = self.observers.drift.as_ref().filter(|d| d.enabled()) {
            let request_units = batch.requests.iter().map(|p| p.request.size.units as u32).collect();
            let unknown = batch.requests.iter().map(|p| p.request.size.unknown as u64).sum();
            drift.offer(drift.layout().sample(&inputs, &outputs, request_units, unknown));
        }
        let batch_id = NEXT_BATCH_ID.fetch_add(1, Ordering::Relaxed);

        let mut offset = 0;
        let mut replies = Vec::with_capacity(size);
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
            if let Some(log) = self.observers.log.as_ref().filter(|l| l.sampled()) {
                self.log_request(log, batch_id, &p, &response);
            }
            offset += p.request.rows;
            replies.push((p.reply, response));
        }
        // Every request of the batch is charged the batch's stage times, as
        // Triton does; perf_analyzer requires the three counts to agree.
        let n = size as u64;
        self.stats.compute_input.add(n, stacked - started);
        self.stats.compute_infer.add(n, compute);
        self.stats.compute_output.add(n, computed.elapsed());
        self.metrics.add_busy(started.elapsed());
        for (reply, response) in replies {
            // A caller that has gone simply does not read its answer.
            let _ = reply.send(Ok(response));
        }
    }

    fn log_request(&self, log: &RequestLog, batch_id: u64, p: &Pending, response: &InferResponse) {
        log.write(Entry {
            spec: &self.spec,
            request_id: &p.request.id,
            batch_id,
            timing: response.timing,
            server_us: p.request.received.elapsed().as_micros() as u64,
            inputs: &p.request.inputs,
            outputs: p
                .request
                .outputs
                .iter()
                .zip(&response.outputs)
                .map(|(o, t)| (self.spec.outputs[*o].name.as_str(), t.clone()))
                .collect(),
        });
    }

    fn fail(&self, requests: Vec<Pending>, reason: String) {
        tracing::error!(model = %self.spec.name, version = self.spec.version, %reason, "batch failed; the server serves on");
        fail_all(requests, &self.spec, reason);
    }

    /// Stacks each declared input across the batch's requests.
    fn stack_inputs(&self, requests: &[Pending]) -> Result<Vec<Tensor>, String> {
        (0..self.spec.inputs.len())
            .map(|i| {
                let parts: Vec<&Tensor> = requests.iter().map(|p| &p.request.inputs[i]).collect();
                Tensor::concat_rows(&parts).ok_or_else(|| format!("input {i} could not be stacked"))
            })
            .collect()
    }

    /// Runs the model and checks that every declared output came back with
    /// one row per input row.
    fn compute(&self, inputs: &[Tensor], rows: usize) -> Result<Vec<Tensor>, String> {
        let outputs = self.model.run(inputs).map_err(|e| e.to_string())?;
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

/// The message a panic carried, if it was a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
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

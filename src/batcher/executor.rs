//! Executor threads: each runs whole batches on the model, on a dedicated
//! OS thread (never the tokio runtime), catching panics so that only the
//! failing batch fails, then splits the outputs back to each request. An
//! executor knows nothing of the scheduler: it reports each finished batch
//! through the callback it was given, and hands what it ran to the batch
//! observer.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use super::observer::{BatchObserver, Ran};
use super::{Batch, Pending};
use crate::error::{InferError, panic_message};
use crate::model::{Model, ModelSpec, Tensor};
use crate::request::{InferResponse, Timing};

/// The executor threads of one model version: where batches are sent.
pub struct ExecutorPool {
    senders: Vec<std::sync::mpsc::Sender<Batch>>,
    spec: Arc<ModelSpec>,
}

impl ExecutorPool {
    /// Starts `instances` threads sharing one loaded model; each calls
    /// `finished(instance)` after every batch it ran.
    pub(crate) fn start(
        model: Arc<dyn Model>,
        spec: Arc<ModelSpec>,
        instances: usize,
        observer: Arc<BatchObserver>,
        finished: impl Fn(usize) + Clone + Send + 'static,
    ) -> std::io::Result<Self> {
        let mut senders = Vec::with_capacity(instances);
        for instance in 0..instances {
            let (tx, rx) = std::sync::mpsc::channel::<Batch>();
            let worker = Worker { model: model.clone(), spec: spec.clone(), observer: observer.clone() };
            let finished = finished.clone();
            std::thread::Builder::new().name(format!("kiln-exec-{}-{}-{instance}", spec.name, spec.version)).spawn(
                move || {
                    for batch in rx {
                        worker.run(batch);
                        finished(instance);
                    }
                },
            )?;
            senders.push(tx);
        }
        Ok(Self { senders, spec })
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
                fail_all(batch.requests, &self.spec, "executor thread stopped".into());
                false
            }
        }
    }
}

struct Worker {
    model: Arc<dyn Model>,
    spec: Arc<ModelSpec>,
    observer: Arc<BatchObserver>,
}

impl Worker {
    fn run(&self, batch: Batch) {
        let shape = batch.shape();
        let (rows, size) = (shape.rows, batch.requests.len());
        // Queue time ends when the batch starts, staged or not.
        let started = Instant::now();
        self.observer.started(&batch, started);
        let inputs = match guarded(|| self.stack_inputs(&batch.requests)) {
            Ok(inputs) => inputs,
            Err(reason) => return self.fail(batch.requests, reason),
        };
        let stacked = Instant::now();
        let outcome = guarded(|| self.compute(&inputs, rows));
        let computed = Instant::now();
        let compute = computed - stacked;
        let outputs = match outcome {
            Ok(outputs) => outputs,
            Err(reason) => {
                self.observer.failed(rows, compute);
                return self.fail(batch.requests, reason);
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
        for (p, response) in answers {
            // A caller that has gone simply does not read its answer.
            let _ = p.reply.send(Ok(response));
        }
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

fn fail_all(requests: Vec<Pending>, spec: &ModelSpec, reason: String) {
    for p in requests {
        let _ = p.reply.send(Err(InferError::ModelFailed {
            model: spec.name.clone(),
            version: spec.version,
            reason: reason.clone(),
        }));
    }
}

//! Executor threads: each runs whole batches on the model, on a dedicated
//! OS thread (never the tokio runtime), catching panics so that only the
//! failing batch fails, then splits the outputs back to each request.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::batcher::{Batch, Pending};
use crate::error::InferError;
use crate::model::{Model, ModelSpec, Tensor};
use crate::monitor::metrics::VersionMetrics;
use crate::monitor::stats::VersionStats;
use crate::request::{InferResponse, Timing};

/// An executor instance saying it has finished its batch.
#[derive(Debug, Clone, Copy)]
pub struct InstanceFree(pub usize);

/// The executor threads of one model version, as the scheduler sees them.
pub struct ExecutorPool {
    senders: Vec<std::sync::mpsc::Sender<Batch>>,
    /// Instances with no batch.
    pub idle: Vec<usize>,
    /// Where instances report that they are free again.
    pub free: mpsc::UnboundedReceiver<InstanceFree>,
    spec: Arc<ModelSpec>,
}

impl ExecutorPool {
    /// Starts `instances` threads sharing one loaded model.
    pub fn start(
        model: Arc<dyn Model>,
        spec: Arc<ModelSpec>,
        instances: usize,
        stats: Arc<VersionStats>,
        metrics: VersionMetrics,
    ) -> std::io::Result<Self> {
        let (free_tx, free) = mpsc::unbounded_channel();
        let mut senders = Vec::with_capacity(instances);
        for instance in 0..instances {
            let (tx, rx) = std::sync::mpsc::channel::<Batch>();
            let worker = Worker {
                model: model.clone(),
                spec: spec.clone(),
                stats: stats.clone(),
                metrics: metrics.clone(),
            };
            let free_tx = free_tx.clone();
            std::thread::Builder::new()
                .name(format!("kiln-exec-{}-{}-{instance}", spec.name, spec.version))
                .spawn(move || {
                    for batch in rx {
                        worker.run(batch);
                        if free_tx.send(InstanceFree(instance)).is_err() {
                            break;
                        }
                    }
                })?;
            senders.push(tx);
        }
        Ok(Self { senders, idle: (0..instances).rev().collect(), free, spec })
    }

    /// Hands a batch to an idle instance.
    pub fn dispatch(&mut self, instance: usize, batch: Batch) {
        if let Err(std::sync::mpsc::SendError(batch)) = self.senders[instance].send(batch) {
            // The thread is gone (it never panics out of a batch, so this
            // means the process is going down): answer, do not drop.
            fail_all(batch.requests, &self.spec, "executor thread stopped".into());
        }
    }
}

struct Worker {
    model: Arc<dyn Model>,
    spec: Arc<ModelSpec>,
    stats: Arc<VersionStats>,
    metrics: VersionMetrics,
}

impl Worker {
    fn run(&self, batch: Batch) {
        let started = Instant::now();
        let rows = batch.rows();
        let size = batch.requests.len();
        for p in &batch.requests {
            let waited = batch.dispatched.saturating_duration_since(p.enqueued);
            self.stats.queue.add(1, waited);
            self.metrics.queue_duration.record(waited.as_secs_f64());
        }
        self.metrics.batch_size.record(size as f64);
        self.metrics.batch_units.record(rows as f64);

        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.compute(&batch.requests, rows)));
        let compute = started.elapsed();
        self.stats.record_batch(rows as u64, compute);
        self.stats.compute_infer.add(size as u64, compute);
        self.metrics.compute_duration.record(compute.as_secs_f64());

        let outputs = match outcome {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(reason)) => return fail_all(batch.requests, &self.spec, reason),
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                tracing::error!(model = %self.spec.name, version = self.spec.version, %reason, "model panicked; failing this batch only");
                return fail_all(batch.requests, &self.spec, format!("model panicked: {reason}"));
            }
        };
        let timing = |p: &Pending| Timing {
            queue_us: batch.dispatched.saturating_duration_since(p.enqueued).as_micros() as u64,
            compute_us: compute.as_micros() as u64,
            batch_size: size as u64,
        };
        let mut offset = 0;
        for p in batch.requests {
            let response = InferResponse {
                outputs: p.request.outputs.iter().map(|&o| outputs[o].slice_rows(offset, p.request.rows)).collect(),
                timing: timing(&p),
            };
            offset += p.request.rows;
            // A caller that has gone simply does not read its answer.
            let _ = p.reply.send(Ok(response));
        }
    }

    /// Stacks the requests' inputs, runs the model, and checks that every
    /// declared output came back with one row per input row.
    fn compute(&self, requests: &[Pending], rows: usize) -> Result<Vec<Tensor>, String> {
        let inputs = (0..self.spec.inputs.len())
            .map(|i| {
                let parts: Vec<&Tensor> = requests.iter().map(|p| &p.request.inputs[i]).collect();
                Tensor::concat_rows(&parts).ok_or_else(|| format!("input {i} could not be stacked"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = self.model.run(&inputs).map_err(|e| e.to_string())?;
        if outputs.len() != self.spec.outputs.len() {
            return Err(format!("model returned {} outputs, declared {}", outputs.len(), self.spec.outputs.len()));
        }
        if let Some((spec, out)) = self.spec.outputs.iter().zip(&outputs).find(|(s, o)| o.rows() != rows || o.row_len() != s.row_len()) {
            return Err(format!("output `{}` came back with shape {:?} for {rows} rows", spec.name, out.shape));
        }
        Ok(outputs)
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

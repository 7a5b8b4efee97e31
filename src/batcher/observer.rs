//! The per-batch bookkeeping, in one place and off the compute loop: when a
//! batch starts (queue times, batch size and fill), and once it ran
//! (statistics, compute time, the latency model, the drift sample, the
//! request log, busy time). Executors call it; it never decides anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::latency::SharedLatency;
use super::policy::BatchShape;
use super::{Batch, Pending};
use crate::model::{Inputs, ModelSpec, Tensor};
use crate::monitor::drift::DriftHandle;
use crate::monitor::metrics::VersionMetrics;
use crate::monitor::request_log::{Entry, RequestLog};
use crate::monitor::stats::VersionStats;
use crate::request::InferResponse;

/// What one batch was and gave, as the executor ran it.
pub struct Ran<'a> {
    pub shape: BatchShape,
    pub inputs: &'a Inputs,
    pub outputs: &'a [Tensor],
    /// Each request with its answer, before the answers are sent.
    pub answers: &'a [(Pending, InferResponse)],
    pub started: Instant,
    pub stacked: Instant,
    pub computed: Instant,
}

/// Everything that watches one version's batches.
pub struct BatchObserver {
    pub spec: Arc<ModelSpec>,
    pub stats: Arc<VersionStats>,
    pub metrics: VersionMetrics,
    /// Fed with every batch's compute time; read by the scheduler and
    /// admission.
    pub latency: Arc<SharedLatency>,
    pub drift: Option<Arc<DriftHandle>>,
    pub log: Option<Arc<RequestLog>>,
}

impl BatchObserver {
    /// An observer with fresh statistics and latency model, no drift and no
    /// request log (benches and tests).
    pub fn new(spec: Arc<ModelSpec>, metrics: VersionMetrics) -> Self {
        Self { spec, stats: Arc::default(), metrics, latency: Arc::default(), drift: None, log: None }
    }
}

/// Batch ids for the request log, unique in the process.
static NEXT_BATCH_ID: AtomicU64 = AtomicU64::new(1);

impl BatchObserver {
    /// A batch leaves the queue for the model: its requests' queue time
    /// ends here, staged or not.
    pub fn started(&self, batch: &Batch, started: Instant) {
        for p in &batch.requests {
            let waited = started.saturating_duration_since(p.enqueued);
            self.stats.queue.add(1, waited);
            self.metrics.queue_duration.record(waited.as_secs_f64());
        }
        let shape = batch.shape();
        let units = shape.padded();
        self.metrics.batch_size.record(batch.requests.len() as f64);
        self.metrics.batch_units.record(units as f64);
        self.metrics.batch_fill_ratio.record(units as f64 / self.metrics.max_batch_units as f64);
        self.metrics.padding_ratio.record(1.0 - shape.fill());
    }

    /// The model failed on a batch of `rows` after computing for `compute`.
    pub fn failed(&self, rows: usize, compute: Duration) {
        self.stats.record_batch(rows as u64, compute);
        self.metrics.compute_duration.record(compute.as_secs_f64());
    }

    /// A batch ran and its answers are ready to send.
    pub fn ran(&self, ran: &Ran<'_>) {
        let compute = ran.computed - ran.stacked;
        let size = ran.answers.len();
        self.stats.record_batch(ran.shape.rows as u64, compute);
        self.metrics.compute_duration.record(compute.as_secs_f64());
        self.latency.observe(ran.shape.padded(), size, compute);
        self.metrics.publish_latency(&self.latency.estimate());
        if let Some(drift) = self.drift.as_ref().filter(|d| d.enabled()) {
            let request_units = ran.answers.iter().map(|(p, _)| p.request.size.units as u32).collect();
            let unknown = ran.answers.iter().map(|(p, _)| p.request.size.unknown as u64).sum();
            drift.offer(drift.layout().sample(ran.inputs, ran.outputs, request_units, unknown));
        }
        if let Some(log) = &self.log {
            let batch_id = NEXT_BATCH_ID.fetch_add(1, Ordering::Relaxed);
            for (p, response) in ran.answers {
                if log.sampled() {
                    self.log_request(log, batch_id, p, response);
                }
            }
        }
        // Every request of the batch is charged the batch's stage times, as
        // Triton does; perf_analyzer requires the three counts to agree.
        let n = size as u64;
        self.stats.compute_input.add(n, ran.stacked - ran.started);
        self.stats.compute_infer.add(n, compute);
        self.stats.compute_output.add(n, ran.computed.elapsed());
        self.metrics.add_busy(ran.started.elapsed());
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
}

//! The batcher's own cost per request: submit → queue → batch → executor →
//! split → answer, with a model that does no work, so that only Kiln's
//! machinery is timed. One batch of N one-row requests per iteration.
//!
//!   cargo bench --bench batcher_overhead

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::batcher::BatcherSettings;
use kiln::batcher::observer::BatchObserver;
use kiln::batcher::policy::BatchPolicy;
use kiln::model::{Backend, Inputs, ModelError, ModelSpec, Tensor, TensorData, TensorSpec};
use kiln::monitor::metrics::VersionMetrics;
use kiln::request::InferRequest;
use kiln::runtime::Threads;

/// Answers zeros of the right shape without computing anything.
struct NoWork;

impl Backend for NoWork {
    fn run(&self, inputs: &Inputs) -> Result<Vec<Tensor>, ModelError> {
        let rows = inputs.rows();
        Ok(vec![Tensor { shape: vec![rows, 1], data: TensorData::Fp32(vec![0.0; rows]) }])
    }
}

fn spec() -> Arc<ModelSpec> {
    Arc::new(ModelSpec::in_memory("nowork", vec![TensorSpec::fp32("x", 30)], vec![TensorSpec::fp32("y", 1)]))
}

fn request() -> InferRequest {
    InferRequest::row(Tensor { shape: vec![1, 30], data: TensorData::Fp32(vec![0.5; 30]) })
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("batcher_round_trip");
    for batch in [1usize, 8, 64] {
        // Batches leave only when full, so each iteration is one batch of N.
        let settings = BatcherSettings {
            policy: BatchPolicy {
                max_batch_rows: batch,
                max_batch_units: batch,
                max_queue_delay: Duration::from_secs(10),
                latency_budget: Duration::from_secs(10),
                wait: kiln::batcher::policy::QueueWait::Fixed,
            },
            max_queue: 4096,
            instances: 1,
            priority_levels: 1,
        };
        let observer = BatchObserver::new(spec(), VersionMetrics::new("nowork", 1, 1, batch));
        let handle = kiln::batcher::scheduler::spawn(Arc::new(NoWork), observer, settings, &Threads::default())
            .expect("batcher starts");
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| {
                runtime.block_on(async {
                    let tickets: Vec<_> = (0..batch).map(|_| handle.submit(request()).expect("admitted")).collect();
                    for mut t in tickets {
                        t.answer().await.expect("answered");
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);

//! The batcher's own cost per request: submit → queue → batch → executor →
//! split → answer, with a model that does no work, so that only Kiln's
//! machinery is timed. One batch of N one-row requests per iteration.
//! Beside it, the batch policy's cost per decision (`plan` over a queue of
//! N waiting requests, fixed and adaptive wait), the work the scheduler
//! does each time the queue or the clock moves.
//!
//!   cargo bench --bench batcher_overhead

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::batcher::BatcherSettings;
use kiln::batcher::arrivals::Arrivals;
use kiln::batcher::latency::LatencyEstimate;
use kiln::batcher::observer::BatchObserver;
use kiln::batcher::policy::{BatchPolicy, QueueWait, QueuedView, Traffic};
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

/// One `plan` call over `n` one-row requests that arrived 10 µs apart,
/// none full and none due, so the policy weighs every request each time.
fn policy_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_decision");
    let now = std::time::Instant::now();
    let latency = LatencyEstimate { fixed_s: 200e-6, per_unit_s: 20e-6, requests_per_batch: 4.0 };
    // A profile learnt from 16 clients coming back 100-250 µs after each
    // finish, every millisecond for ten seconds, the last finish just now.
    let start = now - Duration::from_secs(10);
    let mut profile = Arrivals::new(start, Duration::from_millis(2));
    for k in 0..10_000u32 {
        let finish = start + Duration::from_millis(1) * k;
        profile.finished(finish, 16);
        for c in 0..16u32 {
            profile.arrived(finish + Duration::from_micros(100 + 10 * c as u64));
        }
    }
    profile.finished(now, 16);
    for n in [1usize, 16, 256] {
        let queue: Vec<QueuedView> = (0..n)
            .map(|i| QueuedView {
                arrival: now - Duration::from_micros(10 * (n - i) as u64),
                deadline: now + Duration::from_secs(1),
                rows: 1,
                longest: 1,
                units: 1,
            })
            .collect();
        for (name, wait) in [("fixed", QueueWait::Fixed), ("adaptive", QueueWait::Adaptive)] {
            let policy = BatchPolicy {
                max_batch_rows: 512,
                max_batch_units: 512,
                max_queue_delay: Duration::from_millis(2),
                latency_budget: Duration::from_millis(50),
                wait,
            };
            let traffic = Traffic { arrivals: Some(&profile), free_since: Some(now), late_wake: Duration::ZERO };
            group.bench_with_input(BenchmarkId::new(name, n), &queue, |b, queue| {
                b.iter(|| policy.plan(std::hint::black_box(queue), now, &latency, &traffic, false))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, overhead, policy_decision);
criterion_main!(benches);

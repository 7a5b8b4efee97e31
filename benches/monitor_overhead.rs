//! What monitoring costs per request, beside what the request itself costs,
//! measured side by side on the built-in risk model in one run:
//!
//! - `compute`: the model on a batch (the request's own compute);
//! - `drift_handoff`: what the executor thread adds after each batch (copy
//!   the watched values, `try_send` to the drift thread);
//! - `drift_window`: what the drift thread spends binning the sample (off
//!   the request's path, but on the same cores);
//! - `request_log`: one sampled request's JSON line with an HMAC of its
//!   inputs, queued to the writer thread.
//!
//! Throughput is in rows, so each line reads as time per request of one row.
//!
//!   cargo bench --bench monitor_overhead

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::config::{DriftSection, InputLogMode, RepositorySource, RequestLogConfig};
use kiln::model::{Inputs, Tensor, TensorData};
use kiln::monitor::drift::DriftHandle;
use kiln::monitor::drift::window::{Window, WindowSettings};
use kiln::monitor::request_log::{Entry, RequestLog};
use kiln::request::Timing;
use kiln::runtime::Threads;

fn training_rows() -> Vec<f32> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/wdbc-train.csv")).expect("data");
    text.lines()
        .skip(1)
        .flat_map(|l| l.split(',').take(30).map(|v| v.parse::<f32>().expect("number")).collect::<Vec<_>>())
        .collect()
}

fn monitor_costs(c: &mut Criterion) {
    let loaded = kiln::repository::load(&RepositorySource::BuiltIn).expect("built-in repository loads");
    let version = &loaded[0].versions[&1];
    let (model, spec, layout) = (version.model.clone(), version.spec.clone(), version.drift_layout.clone());
    let reference = version.reference.clone().expect("the risk model ships a reference");
    let rows = training_rows();
    let threads = Threads::default();
    let drift = DriftHandle::start(
        "risk",
        1,
        layout.clone(),
        &DriftSection::default(),
        Some(reference.clone()),
        &threads,
        None,
    )
    .expect("drift thread starts");
    let mut window = Window::new(reference, layout.clone(), WindowSettings::from(&DriftSection::default()));
    let dir = tempfile::tempdir().expect("temp dir");
    let log = RequestLog::start(
        &RequestLogConfig {
            path: dir.path().join("requests.jsonl"),
            sample_rate: 1.0,
            max_bytes: 16 << 20,
            keep_files: 1,
            inputs: InputLogMode::Hash,
            hmac_key: Some("bench".into()),
            outputs: None,
        },
        &threads,
    )
    .expect("request log starts");

    let mut group = c.benchmark_group("monitor");
    group.measurement_time(Duration::from_secs(3));
    for batch in [1usize, 8, 64] {
        let input = Tensor { shape: vec![batch, 30], data: TensorData::Fp32(rows[..batch * 30].to_vec()) };
        let inputs = Inputs::Tensors(vec![input]);
        let outputs = model.backend.run(&inputs).expect("runs");
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("compute", batch), &inputs, |b, inputs| {
            b.iter(|| model.backend.run(inputs).expect("runs"))
        });
        group.bench_with_input(BenchmarkId::new("drift_handoff", batch), &inputs, |b, inputs| {
            b.iter(|| drift.offer(layout.sample(inputs, &outputs, vec![1; batch], 0)))
        });
        let sample = layout.sample(&inputs, &outputs, vec![1; batch], 0);
        group.bench_with_input(BenchmarkId::new("drift_window", batch), &sample, |b, sample| {
            b.iter(|| window.ingest(Duration::from_secs(1), sample))
        });
    }
    let one = Inputs::Tensors(vec![Tensor { shape: vec![1, 30], data: TensorData::Fp32(rows[..30].to_vec()) }]);
    let probability = Tensor { shape: vec![1, 1], data: TensorData::Fp32(vec![0.5]) };
    group.throughput(Throughput::Elements(1));
    group.bench_function("request_log/1", |b| {
        b.iter(|| {
            log.write(Entry {
                spec: &spec,
                request_id: "bench",
                batch_id: 1,
                timing: Timing::default(),
                server_us: 100,
                inputs: &one,
                outputs: vec![("probability", probability.clone())],
            })
        })
    });
    group.finish();
}

criterion_group!(benches, monitor_costs);
criterion_main!(benches);

//! The built-in risk model's compute per batch size, in-process (no gRPC):
//! the floor under any served latency, and what batching buys.
//!
//!   cargo bench --bench model_throughput

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::config::RepositorySource;
use kiln::model::{Inputs, Tensor, TensorData};

fn risk_batches(c: &mut Criterion) {
    let loaded = kiln::repository::load(&RepositorySource::BuiltIn).expect("built-in repository loads");
    let model = loaded[0].versions[&1].model.backend.clone();
    let mut group = c.benchmark_group("risk_mlp");
    for batch in [1usize, 8, 64] {
        let input = Tensor { shape: vec![batch, 30], data: TensorData::Fp32(vec![1.0; batch * 30]) };
        let inputs = Inputs::Tensors(vec![input]);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &inputs, |b, inputs| {
            b.iter(|| model.run(inputs).expect("runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, risk_batches);
criterion_main!(benches);

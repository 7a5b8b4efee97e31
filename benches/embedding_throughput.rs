//! all-MiniLM-L6-v2 embeddings per second in-process (no gRPC, tokenizing
//! outside the timing, as the server does before the executor), at batch
//! sizes 1, 8, 32 and 64 of the ~14-token sentences in data/sentences.txt.
//! The ceiling for `kiln bench` against a served MiniLM.
//!
//!   scripts/fetch-minilm.sh && cargo bench --bench embedding_throughput
//!
//! One model thread unless RAYON_NUM_THREADS says otherwise, as `kiln serve`.

use criterion::{BenchmarkId, Criterion, Throughput};
use kiln::config::RepositorySource;
use kiln::model::{Tensor, TensorData};

fn sentences() -> Vec<Vec<u8>> {
    kiln::bench::inputs::sentences().map(|l| l.as_bytes().to_vec()).collect()
}

fn minilm_batches(c: &mut Criterion) {
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    assert!(models.join("minilm/1/model.safetensors").exists(), "run scripts/fetch-minilm.sh first");
    let loaded = kiln::repository::load(&RepositorySource::Dir(models)).expect("models/ loads");
    let minilm = loaded.iter().find(|m| m.name == "minilm").expect("minilm in models/");
    let model = minilm.versions.values().next().expect("a version").model.clone();
    let corpus = sentences();
    let mut group = c.benchmark_group("minilm_embeddings");
    group.sample_size(10);
    for batch in [1usize, 8, 32, 64] {
        let texts: Vec<Vec<u8>> = corpus.iter().cycle().take(batch).cloned().collect();
        let inputs = vec![Tensor { shape: vec![batch], data: TensorData::Bytes(texts) }];
        let (inputs, _) = model.prepare(inputs, &Default::default()).expect("tokenizes");
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &inputs, |b, inputs| {
            b.iter(|| model.backend.run(inputs).expect("runs"))
        });
    }
    group.finish();
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: no other thread has started yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    let mut criterion = Criterion::default().configure_from_args();
    minilm_batches(&mut criterion);
    criterion.final_summary();
}

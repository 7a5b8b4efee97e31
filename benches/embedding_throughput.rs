//! all-MiniLM-L6-v2 embeddings per second in-process (no gRPC, tokenizing
//! outside the timing, as the server does before the executor), at batch
//! sizes 1, 8, 32 and 64 of the ~14-token sentences in data/sentences.txt.
//! The ceiling for `kiln bench` against a served MiniLM.
//!
//! Each batch size runs on both engines side by side in one run: `packed`
//! (Kiln's CPU encoder, the default) and `candle` (candle-transformers'
//! BERT, `[bert] engine = "candle"`), so their ratio is measured on the same
//! machine in the same minutes.
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

/// MiniLM loaded with `engine` (a copy of models/minilm whose model.toml
/// names it, the weights linked).
fn minilm(engine: &str) -> std::sync::Arc<kiln::model::Model> {
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    assert!(models.join("minilm/1/model.safetensors").exists(), "run scripts/fetch-minilm.sh first");
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("minilm");
    std::fs::create_dir_all(copy.join("1")).expect("mkdir");
    let toml = std::fs::read_to_string(models.join("minilm/model.toml")).expect("model.toml");
    let toml = toml.replacen("[bert]\n", &format!("[bert]\nengine = \"{engine}\"\n"), 1);
    std::fs::write(copy.join("model.toml"), toml).expect("write");
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        std::os::unix::fs::symlink(models.join("minilm/1").join(file), copy.join("1").join(file)).expect("link");
    }
    let loaded = kiln::repository::load(&RepositorySource::Dir(dir.path().to_path_buf())).expect("loads");
    loaded[0].versions.values().next().expect("a version").model.clone()
}

fn minilm_batches(c: &mut Criterion) {
    let engines = [("packed", minilm("packed")), ("candle", minilm("candle"))];
    let corpus = sentences();
    let mut group = c.benchmark_group("minilm_embeddings");
    group.sample_size(10);
    for batch in [1usize, 8, 32, 64] {
        let texts: Vec<Vec<u8>> = corpus.iter().cycle().take(batch).cloned().collect();
        let inputs = vec![Tensor { shape: vec![batch], data: TensorData::Bytes(texts) }];
        let (inputs, _) = engines[0].1.prepare(inputs, &Default::default()).expect("tokenizes");
        group.throughput(Throughput::Elements(batch as u64));
        for (name, model) in &engines {
            group.bench_with_input(BenchmarkId::new(*name, batch), &inputs, |b, inputs| {
                b.iter(|| model.backend.run(inputs).expect("runs"))
            });
        }
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

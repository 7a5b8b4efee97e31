//! The model repository: reads `NAME/model.toml` and numbered version
//! folders from disk (or from the copy compiled into the binary) and loads
//! and warms up each version. `runtime` starts serving what it loaded; the
//! served set is [`Repository`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::batcher::BatcherHandle;
use crate::batcher::latency::SharedLatency;
use crate::config::{ConfigError, ModelToml, RepositorySource};
use crate::model::tokenize::TokenizeOptions;
use crate::model::{self, Model, ModelError, ModelSpec, VersionFiles, registry};
use crate::monitor::drift::DriftHandle;
use crate::monitor::drift::layout::Layout;
use crate::monitor::drift::reference::Reference;
use crate::monitor::metrics::VersionMetrics;
use crate::monitor::stats::VersionStats;

/// The built-in risk model's weights file.
pub const WEIGHTS_FILE: &str = model::candle::mlp::WEIGHTS_FILE;

/// A version's drift reference profile, written by `kiln profile`.
pub const REFERENCE_FILE: &str = "reference.json";

/// Why the repository could not be served.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Model { path: String, source: ModelError },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// One model's files, read but not yet loaded.
struct ModelFiles {
    name: String,
    /// Shown in errors: the path of `model.toml`.
    config_file: String,
    config_text: String,
    /// Version number and the folder's files.
    versions: Vec<(u64, VersionFiles)>,
}

/// The repository compiled into the binary: the `risk` model.
fn built_in() -> Vec<ModelFiles> {
    vec![ModelFiles {
        name: "risk".into(),
        config_file: "<built-in>/risk/model.toml".into(),
        config_text: include_str!("../models/risk/model.toml").into(),
        versions: vec![(
            1,
            VersionFiles {
                folder: "<built-in>/risk/1".into(),
                files: [
                    (WEIGHTS_FILE.to_string(), include_bytes!("../models/risk/1/model.safetensors").to_vec()),
                    (REFERENCE_FILE.to_string(), include_bytes!("../models/risk/1/reference.json").to_vec()),
                ]
                .into(),
            },
        )],
    }]
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RepositoryError + '_ {
    move |source| RepositoryError::Io { path: path.display().to_string(), source }
}

fn read_dir(dir: &Path) -> Result<Vec<ModelFiles>, RepositoryError> {
    let mut models = Vec::new();
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).map_err(io_err(dir))?.collect::<Result<Vec<_>, _>>().map_err(io_err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let config_path = path.join("model.toml");
        let config_file = config_path.display().to_string();
        if !config_path.is_file() {
            return Err(ConfigError::new(config_file, "missing: every model folder needs a model.toml").into());
        }
        let config_text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
        let mut versions = Vec::new();
        for v in std::fs::read_dir(&path).map_err(io_err(&path))? {
            let v = v.map_err(io_err(&path))?;
            let Some(number) = v.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if !v.path().is_dir() {
                continue;
            }
            // `1`, `01` and `+1` all parse as version 1: loading both would
            // let one silently win.
            if let Some((_, other)) = versions.iter().find(|(n, _): &&(u64, VersionFiles)| *n == number) {
                let mut folders = [other.folder.clone(), v.path().display().to_string()];
                folders.sort();
                return Err(ConfigError::new(
                    &folders[0],
                    format!("version folders {} and {} are both version {number}; remove one", folders[0], folders[1]),
                )
                .into());
            }
            let mut files = VersionFiles { folder: v.path().display().to_string(), ..Default::default() };
            for name in registry::known_files().into_iter().chain([REFERENCE_FILE]) {
                let path = v.path().join(name);
                if path.is_file() {
                    files.files.insert(name.to_string(), std::fs::read(&path).map_err(io_err(&path))?);
                }
            }
            versions.push((number, files));
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        models.push(ModelFiles { name, config_file, config_text, versions });
    }
    if models.is_empty() {
        return Err(ConfigError::new(dir.display().to_string(), "no model folders (NAME/model.toml) found").into());
    }
    Ok(models)
}

/// A model version loaded into memory, not yet serving.
pub struct LoadedVersion {
    pub spec: Arc<ModelSpec>,
    /// Its backend and, for text models, its tokenizer.
    pub model: Arc<Model>,
    /// Seeded by the warm-up, so the first requests are judged sensibly.
    pub latency: Arc<SharedLatency>,
    /// What drift watches, and the reference it compares with (if any).
    pub drift_layout: Layout,
    pub reference: Option<Reference>,
}

/// Rounds of warm-up at each of the two batch sizes.
const WARM_UP_ROUNDS: usize = 3;

/// Runs the model a few times on one short row and on a full batch of
/// longer rows, prepared as requests are, so that the first requests find
/// warm caches and the latency model has a slope in units.
fn warm_up(model: &Model, max_rows: usize, max_units: usize) -> Result<SharedLatency, ModelError> {
    let latency = SharedLatency::default();
    let sample = |rows: usize, words: usize| -> Result<(model::Inputs, usize), ModelError> {
        let inputs = model::sample_inputs(&model.spec, rows, &|_| vec!["warm"; words].join(" ").into_bytes());
        let (inputs, size) = model.prepare(inputs, &TokenizeOptions { max_tokens: None, truncate: Some(true) })?;
        Ok((inputs, rows * size.longest))
    };
    // The very first run pays one-off costs (allocation, page faults).
    model.backend.run(&sample(1, 1)?.0)?;
    let (_, long_units) = sample(1, 24)?;
    let full_rows = max_rows.min(max_units / long_units.max(1)).max(1);
    for _ in 0..WARM_UP_ROUNDS {
        for (rows, words) in [(1, 1), (full_rows, 24)] {
            let (inputs, units) = sample(rows, words)?;
            let started = std::time::Instant::now();
            model.backend.run(&inputs)?;
            latency.observe(units, 1, started.elapsed());
        }
    }
    Ok(latency)
}

/// Parses and checks a `reference.json` against the model it belongs to.
fn read_reference(bytes: &[u8], layout: &Layout, file: &str) -> Result<Reference, RepositoryError> {
    let reference: Reference = serde_json::from_slice(bytes).map_err(|e| ConfigError::new(file, e.to_string()))?;
    reference.check(layout).map_err(|m| ConfigError::new(file, m))?;
    Ok(reference)
}

/// A model with its config and loaded versions, not yet serving.
pub struct LoadedModel {
    pub name: String,
    pub config: ModelToml,
    pub default_version: u64,
    pub versions: BTreeMap<u64, LoadedVersion>,
}

/// Reads and loads every model (blocking: file I/O and weight loading).
pub fn load(source: &RepositorySource) -> Result<Vec<LoadedModel>, RepositoryError> {
    read(source)?.into_iter().map(load_model).collect()
}

/// Reads and loads one model of the repository.
pub fn load_one(source: &RepositorySource, name: &str) -> Result<LoadedModel, RepositoryError> {
    let files = read(source)?;
    let known: Vec<String> = files.iter().map(|m| m.name.clone()).collect();
    let found = files.into_iter().find(|m| m.name == name).ok_or_else(|| {
        ConfigError::new(format!("{source:?}"), format!("no model '{name}' in the repository; it has {known:?}"))
    })?;
    load_model(found)
}

fn read(source: &RepositorySource) -> Result<Vec<ModelFiles>, RepositoryError> {
    match source {
        RepositorySource::BuiltIn => Ok(built_in()),
        RepositorySource::Dir(dir) => read_dir(dir),
    }
}

fn load_model(files: ModelFiles) -> Result<LoadedModel, RepositoryError> {
    let config = ModelToml::parse(&files.config_file, &files.config_text)?;
    if files.versions.is_empty() {
        return Err(ConfigError::new(
            files.config_file,
            format!("model '{}' has no version folder (e.g. {}/1/{WEIGHTS_FILE})", files.name, files.name),
        )
        .into());
    }
    let mut versions = BTreeMap::new();
    for (number, version_files) in &files.versions {
        let path = &version_files.folder;
        let kind = registry::find(&config.kind)
            .ok_or_else(|| ConfigError::new(&files.config_file, registry::unknown(&config.kind)))?;
        for needed in kind.files {
            if !version_files.files.contains_key(*needed) {
                let missing =
                    std::io::Error::new(std::io::ErrorKind::NotFound, format!("the {} kind needs it", kind.name));
                return Err(RepositoryError::Io { path: format!("{path}/{needed}"), source: missing });
            }
        }
        let model = model::load(&files.name, *number, &files.config_file, &config, version_files)
            .map_err(|source| RepositoryError::Model { path: path.clone(), source })?;
        let spec = model.spec.clone();
        // A bad reference fails before the warm-up, which takes seconds for
        // text models.
        let drift_layout = Layout::of(&spec, model.tokenizer.is_some(), config.drift.class_threshold);
        let reference = match version_files.files.get(REFERENCE_FILE) {
            None => None,
            Some(bytes) => Some(read_reference(bytes, &drift_layout, &format!("{path}/{REFERENCE_FILE}"))?),
        };
        let latency = warm_up(&model, config.max_batch_size, config.max_batch_units())
            .map_err(|source| RepositoryError::Model { path: path.clone(), source })?;
        let estimate = latency.estimate();
        tracing::info!(
            model = %files.name,
            version = number,
            device = %spec.device,
            sha256 = %spec.weights_sha256,
            fixed_us = estimate.fixed_s * 1e6,
            per_unit_us = estimate.per_unit_s * 1e6,
            "loaded and warmed up"
        );
        versions.insert(
            *number,
            LoadedVersion { spec, model: Arc::new(model), latency: Arc::new(latency), drift_layout, reference },
        );
    }
    let highest = *versions.keys().next_back().expect("checked non-empty above");
    let default_version = match config.default_version {
        Some(v) if versions.contains_key(&v) => v,
        Some(v) => {
            return Err(ConfigError::new(
                files.config_file,
                format!(
                    "field `default_version`: version {v} has no folder; found {:?}",
                    versions.keys().collect::<Vec<_>>()
                ),
            )
            .into());
        }
        None => highest,
    };
    Ok(LoadedModel { name: files.name, config, default_version, versions })
}

/// A model version that is serving: its spec, queue and counters.
pub struct ServedVersion {
    pub spec: Arc<ModelSpec>,
    pub latency: Arc<SharedLatency>,
    /// Its backend and, for text models, the tokenizer requests go
    /// through before they queue.
    pub model: Arc<Model>,
    pub config: Arc<ModelToml>,
    pub batcher: BatcherHandle,
    pub stats: Arc<VersionStats>,
    pub metrics: VersionMetrics,
    pub drift: Arc<DriftHandle>,
}

/// A model and its serving versions.
pub struct ServedModel {
    pub name: String,
    pub config: Arc<ModelToml>,
    pub default_version: u64,
    pub versions: BTreeMap<u64, Arc<ServedVersion>>,
}

/// Every model being served, by name.
pub struct Repository {
    pub models: BTreeMap<String, ServedModel>,
}

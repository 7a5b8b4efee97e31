//! The model repository: looks at `NAME/model.toml` and numbered version
//! folders on disk (or the copy compiled into the binary), reads and
//! loads and warms up the versions a model's policy serves. `runtime`
//! starts serving what it loaded and reloads on change; the served set is
//! [`Repository`], read through [`LiveRepository`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::batcher::latency::SharedLatency;
use crate::config::{ConfigError, ModelToml, RepositorySource};
use crate::model::tokenize::TokenizeOptions;
use crate::model::{self, Model, ModelError, ModelSpec, VersionFiles, registry};
use crate::monitor::drift::layout::Layout;
use crate::monitor::drift::reference::Reference;

pub mod policy;
pub mod release;
mod served;

pub use served::{IndexEntry, LiveRepository, Repository, ServedModel, ServedVersion, VersionState};

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

/// What one look at a version folder sees: each file a kind could read,
/// with its length and modification time. Reading weights to hash them
/// on every poll would cost seconds for a large model; a copy in progress
/// changes length or time, and the reloader waits for two equal looks.
pub type Fingerprint = Vec<(String, u64, Option<std::time::SystemTime>)>;

/// One model folder as a poll sees it, nothing loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelScan {
    pub name: String,
    /// Shown in errors: the path of `model.toml`.
    pub config_file: String,
    pub config_text: String,
    /// Version number, its folder and fingerprint.
    pub versions: BTreeMap<u64, (String, Fingerprint)>,
    /// `release.json`, when there is one.
    pub release_text: Option<String>,
}

/// The built-in model's config and files.
const BUILT_IN_CONFIG: &str = include_str!("../../models/risk/model.toml");

fn built_in_files() -> VersionFiles {
    VersionFiles {
        folder: "<built-in>/risk/1".into(),
        files: [
            (WEIGHTS_FILE.to_string(), include_bytes!("../../models/risk/1/model.safetensors").to_vec()),
            (REFERENCE_FILE.to_string(), include_bytes!("../../models/risk/1/reference.json").to_vec()),
        ]
        .into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RepositoryError + '_ {
    move |source| RepositoryError::Io { path: path.display().to_string(), source }
}

/// The files a version folder may hold that Kiln reads.
fn version_file_names() -> impl Iterator<Item = &'static str> {
    registry::known_files().into_iter().chain([REFERENCE_FILE])
}

/// Looks at every model folder of the repository without loading
/// anything: one entry per folder, an error for a folder that is not a
/// model (so one bad folder does not hide the others from a poll). Hidden
/// folders are skipped: tools stage copies in them before renaming.
pub fn scan(
    source: &RepositorySource,
) -> Result<BTreeMap<String, Result<ModelScan, RepositoryError>>, RepositoryError> {
    let dir = match source {
        RepositorySource::BuiltIn => {
            let scan = ModelScan {
                name: "risk".into(),
                config_file: "<built-in>/risk/model.toml".into(),
                config_text: BUILT_IN_CONFIG.into(),
                versions: [(1, ("<built-in>/risk/1".to_string(), Fingerprint::new()))].into(),
                release_text: None,
            };
            return Ok([("risk".to_string(), Ok(scan))].into());
        }
        RepositorySource::Dir(dir) => dir,
    };
    let mut models = BTreeMap::new();
    let entries: Vec<_> =
        std::fs::read_dir(dir).map_err(io_err(dir))?.collect::<Result<Vec<_>, _>>().map_err(io_err(dir))?;
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !path.is_dir() || name.starts_with('.') {
            continue;
        }
        models.insert(name.clone(), scan_model(&path, name));
    }
    Ok(models)
}

fn scan_model(path: &Path, name: String) -> Result<ModelScan, RepositoryError> {
    let config_path = path.join("model.toml");
    let config_file = config_path.display().to_string();
    if !config_path.is_file() {
        return Err(ConfigError::new(config_file, "missing: every model folder needs a model.toml").into());
    }
    let config_text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let mut versions: BTreeMap<u64, (String, Fingerprint)> = BTreeMap::new();
    for v in std::fs::read_dir(path).map_err(io_err(path))? {
        let v = v.map_err(io_err(path))?;
        let Some(number) = v.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if !v.path().is_dir() {
            continue;
        }
        let folder = v.path().display().to_string();
        // `1`, `01` and `+1` all parse as version 1: loading both would
        // let one silently win.
        if let Some((other, _)) = versions.get(&number) {
            let mut folders = [other.clone(), folder];
            folders.sort();
            return Err(ConfigError::new(
                &folders[0],
                format!("version folders {} and {} are both version {number}; remove one", folders[0], folders[1]),
            )
            .into());
        }
        let mut fingerprint = Fingerprint::new();
        for file in version_file_names() {
            if let Ok(meta) = std::fs::metadata(v.path().join(file)) {
                fingerprint.push((file.to_string(), meta.len(), meta.modified().ok()));
            }
        }
        versions.insert(number, (folder, fingerprint));
    }
    let release_path = path.join(release::RELEASE_FILE);
    let release_text = match release_path.is_file() {
        true => Some(std::fs::read_to_string(&release_path).map_err(io_err(&release_path))?),
        false => None,
    };
    Ok(ModelScan { name, config_file, config_text, versions, release_text })
}

/// Reads the files of one version the scan found.
pub fn read_version(source: &RepositorySource, folder: &str) -> Result<VersionFiles, RepositoryError> {
    if let RepositorySource::BuiltIn = source {
        return Ok(built_in_files());
    }
    let dir = Path::new(folder);
    let mut files = VersionFiles { folder: folder.to_string(), ..Default::default() };
    for name in version_file_names() {
        let path = dir.join(name);
        if path.is_file() {
            files.files.insert(name.to_string(), std::fs::read(&path).map_err(io_err(&path))?);
        }
    }
    Ok(files)
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
    /// Promoted default, pause and split, from `release.json`.
    pub release: release::Release,
    /// What was on disk when it was read: the reloader compares with it.
    pub scan: ModelScan,
}

/// Reads and loads every model (blocking: file I/O and weight loading).
/// Any model or version that fails stops the start: a server that starts
/// serves everything its repository holds.
pub fn load(source: &RepositorySource) -> Result<Vec<LoadedModel>, RepositoryError> {
    let models = scan(source)?;
    if models.is_empty() {
        return Err(ConfigError::new(source.to_string(), "no model folders (NAME/model.toml) found").into());
    }
    models.into_values().map(|m| load_model(source, m?)).collect()
}

/// Reads and loads one model of the repository.
pub fn load_one(source: &RepositorySource, name: &str) -> Result<LoadedModel, RepositoryError> {
    let mut all = scan(source)?;
    let known: Vec<String> = all.keys().cloned().collect();
    let found = all.remove(name).ok_or_else(|| {
        ConfigError::new(source.to_string(), format!("no model '{name}' in the repository; it has {known:?}"))
    })??;
    load_model(source, found)
}

/// The versions `config`'s policy serves out of what the scan found.
pub fn selected(config: &ModelToml, scan: &ModelScan) -> Result<Vec<u64>, ConfigError> {
    if scan.versions.is_empty() {
        return Err(ConfigError::new(
            &scan.config_file,
            format!("model '{}' has no version folder (e.g. {}/1/{WEIGHTS_FILE})", scan.name, scan.name),
        ));
    }
    let numbers = config.version_policy.select(scan.versions.keys().copied());
    if numbers.is_empty() {
        return Err(ConfigError::new(
            &scan.config_file,
            format!(
                "field `version_policy`: {} selects none of the version folders {:?}",
                config.version_policy.describe(),
                scan.versions.keys().collect::<Vec<_>>()
            ),
        ));
    }
    Ok(numbers)
}

/// The release state the scan found (none: the default state).
pub fn read_release(scan: &ModelScan) -> Result<release::Release, ConfigError> {
    match &scan.release_text {
        None => Ok(release::Release::default()),
        Some(text) => {
            let file = scan.config_file.replace("model.toml", release::RELEASE_FILE);
            release::Release::parse(&file, text)
        }
    }
}

/// The version a request without one goes to: `default_version` when it
/// is served, else the highest served.
pub fn default_version(config: &ModelToml, served: &[u64]) -> Result<u64, String> {
    match config.default_version {
        Some(v) if served.contains(&v) => Ok(v),
        Some(v) => Err(format!(
            "field `default_version`: version {v} is not served (version_policy {}; serving {served:?})",
            config.version_policy.describe()
        )),
        None => served.iter().max().copied().ok_or_else(|| "no version is served".to_string()),
    }
}

fn load_model(source: &RepositorySource, scan: ModelScan) -> Result<LoadedModel, RepositoryError> {
    let config = ModelToml::parse(&scan.config_file, &scan.config_text)?;
    let numbers = selected(&config, &scan)?;
    let release = read_release(&scan)?;
    let default_version = default_version(&config, &numbers).map_err(|m| ConfigError::new(&scan.config_file, m))?;
    let default_version = release.promoted.filter(|v| numbers.contains(v)).unwrap_or(default_version);
    let mut versions = BTreeMap::new();
    for number in numbers {
        let files = read_version(source, &scan.versions[&number].0)?;
        versions.insert(number, load_version(&scan.name, number, &scan.config_file, &config, &files)?);
    }
    Ok(LoadedModel { name: scan.name.clone(), config, default_version, versions, release, scan })
}

/// Loads and warms up one version (blocking: seconds for a text model).
pub fn load_version(
    name: &str,
    number: u64,
    config_file: &str,
    config: &ModelToml,
    version_files: &VersionFiles,
) -> Result<LoadedVersion, RepositoryError> {
    let path = &version_files.folder;
    let kind =
        registry::find(&config.kind).ok_or_else(|| ConfigError::new(config_file, registry::unknown(&config.kind)))?;
    for needed in kind.files {
        if !version_files.files.contains_key(*needed) {
            let missing = std::io::Error::new(std::io::ErrorKind::NotFound, format!("the {} kind needs it", kind.name));
            return Err(RepositoryError::Io { path: format!("{path}/{needed}"), source: missing });
        }
    }
    let model = model::load(name, number, config_file, config, version_files)
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
        model = %name,
        version = number,
        device = %spec.device,
        sha256 = %spec.weights_sha256,
        fixed_us = estimate.fixed_s * 1e6,
        per_unit_us = estimate.per_unit_s * 1e6,
        "loaded and warmed up"
    );
    Ok(LoadedVersion { spec, model: Arc::new(model), latency: Arc::new(latency), drift_layout, reference })
}

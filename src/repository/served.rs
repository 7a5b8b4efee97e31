//! What is serving: the snapshot every request routes through, swapped
//! whole when a version loads or unloads, so a request sees one
//! consistent repository from routing to answer.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::batcher::BatcherHandle;
use crate::batcher::latency::SharedLatency;
use crate::config::ModelToml;
use crate::model::{Model, ModelSpec};
use crate::monitor::drift::DriftHandle;
use crate::monitor::metrics::VersionMetrics;
use crate::monitor::stats::VersionStats;

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
    /// Trips after consecutive model failures: its requests then go to
    /// the model's fallback for a while.
    pub breaker: Arc<crate::pipeline::fallback::Breaker>,
    /// Shadow copies this version is computing now (bounded by the
    /// release state's `max_inflight`).
    pub shadow_inflight: std::sync::atomic::AtomicU32,
    /// Which load of this version it is: its threads' names end in
    /// `#generation`, so unloading it joins its threads and not those of
    /// the copy that replaced it.
    pub generation: u64,
}

/// A model and its serving versions.
#[derive(Clone)]
pub struct ServedModel {
    pub name: String,
    pub config: Arc<ModelToml>,
    pub default_version: u64,
    pub versions: BTreeMap<u64, Arc<ServedVersion>>,
    /// Promoted default, pause and canary split.
    pub release: Arc<super::release::Release>,
}

/// A version's state as `RepositoryIndex` reports it (Triton's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// Reading and warming up; takes traffic once ready.
    Loading,
    Ready,
    /// Answering what it admitted; takes no new requests.
    Unloading,
    /// Not serving: failed to load, or unloaded.
    Unavailable,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loading => "LOADING",
            Self::Ready => "READY",
            Self::Unloading => "UNLOADING",
            Self::Unavailable => "UNAVAILABLE",
        }
    }
}

/// A state and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub state: VersionState,
    pub reason: String,
}

/// Every model being served, by name, and what is known of the rest.
#[derive(Clone, Default)]
pub struct Repository {
    /// Models with at least one version taking requests.
    pub models: BTreeMap<String, ServedModel>,
    /// Versions not taking requests (loading, failed, unloading,
    /// unloaded) by model then version; `None` is the model itself (a
    /// `model.toml` refused, a model unloaded). A note on a served model
    /// says why a change to it was not applied.
    pub notes: BTreeMap<String, BTreeMap<Option<u64>, IndexEntry>>,
}

impl Repository {
    /// The note on a model, or on one of its versions.
    pub fn note(&self, model: &str, version: Option<u64>) -> Option<&IndexEntry> {
        self.notes.get(model).and_then(|n| n.get(&version))
    }

    /// Every served version, with its model's name.
    pub fn versions(&self) -> impl Iterator<Item = &Arc<ServedVersion>> {
        self.models.values().flat_map(|m| m.versions.values())
    }
}

/// The repository as it is now: read once per request, replaced whole by
/// the model control. Watchers (health) are told of each replacement.
pub struct LiveRepository {
    current: tokio::sync::watch::Sender<Arc<Repository>>,
}

impl LiveRepository {
    pub fn new(repo: Repository) -> Self {
        Self { current: tokio::sync::watch::Sender::new(Arc::new(repo)) }
    }

    /// The current snapshot; hold it for one request, not longer (an
    /// unloading version waits for every holder).
    pub fn get(&self) -> Arc<Repository> {
        self.current.borrow().clone()
    }

    /// Replaces the snapshot.
    pub fn publish(&self, repo: Repository) {
        self.current.send_replace(Arc::new(repo));
    }

    /// Told of every replacement.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Repository>> {
        self.current.subscribe()
    }
}

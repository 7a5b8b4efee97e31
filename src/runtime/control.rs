//! Model control: the served set follows the repository while the server
//! runs. Under `poll` a thread looks at the folder every interval; under
//! `explicit` only RepositoryModelLoad / RepositoryModelUnload change it.
//! Either way one function, [`Runtime::reconcile`], brings a model in line
//! with its folder: new versions load and warm up before they take
//! traffic, a version that fails never does (and is reported), a changed
//! `model.toml` applies or is refused whole, and what leaves the served
//! set drains: every request routed to it is answered by it before its
//! threads stop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::Runtime;
use crate::config::{ModelControl, ModelToml, RepositorySource};
use crate::error::InferError;
use crate::monitor::metrics::MODEL_CHANGES;
use crate::repository::release::{Action, RELEASE_FILE, Release};
use crate::repository::{
    self, Fingerprint, IndexEntry, LoadedVersion, ModelScan, ServedModel, ServedVersion, VersionState,
};

/// How a note on a `release.json` that was not applied begins.
const RELEASE_REFUSED: &str = "release.json not applied";

/// Longest an unloading version waits for the requests routed to it to be
/// answered before it stops anyway (requests are bounded by their
/// deadlines well before this).
const UNLOAD_WAIT: Duration = Duration::from_secs(60);

/// How often a waiting thread looks again (stop flag, routed requests).
const STEP: Duration = Duration::from_millis(5);

/// One model folder as a look saw it, or why it is not a model.
type Scanned = Result<ModelScan, String>;

/// What was last applied from one model's folder.
#[derive(Default)]
struct Applied {
    /// The `model.toml` text behind the serving config.
    config_text: String,
    /// Served versions and the files they were loaded from.
    loaded: BTreeMap<u64, Fingerprint>,
    /// Versions that failed to load from these files: tried again when
    /// the files change, or when an operator asks.
    failed: BTreeMap<u64, Fingerprint>,
    /// A `model.toml` text that was refused, likewise.
    refused: Option<String>,
    /// The `release.json` text behind the serving release state.
    release_text: Option<String>,
}

/// The model control's own state; one change at a time holds it.
#[derive(Default)]
pub(super) struct ControlState {
    stopped: bool,
    generation: u64,
    models: BTreeMap<String, Applied>,
    /// Versions answering what they admitted before they stop.
    draining: Vec<Weak<ServedVersion>>,
}

impl ControlState {
    /// The next load's generation (it names the load's threads).
    pub(super) fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Records what the start-up load served.
    pub(super) fn applied(&mut self, name: &str, scan: &ModelScan, served: impl Iterator<Item = u64>) {
        let loaded = served.filter_map(|v| scan.versions.get(&v).map(|(_, fp)| (v, fp.clone()))).collect();
        self.models
            .insert(name.into(), Applied { config_text: scan.config_text.clone(), loaded, ..Default::default() });
    }

    /// Stops every further change; returns the versions still draining.
    pub(super) fn stop(&mut self) -> Vec<Arc<ServedVersion>> {
        self.stopped = true;
        self.draining.iter().filter_map(Weak::upgrade).collect()
    }
}

/// Counts one repository change (start-up loads included).
pub(super) fn count(model: &str, action: &'static str, outcome: &'static str) {
    metrics::counter!(MODEL_CHANGES, "model" => model.to_string(), "action" => action, "outcome" => outcome)
        .increment(1);
}

fn entry(state: VersionState, reason: impl Into<String>) -> IndexEntry {
    IndexEntry { state, reason: reason.into() }
}

/// What one reconcile decided, applied at its end.
struct Change {
    /// The model's notes as they will be published.
    notes: BTreeMap<Option<u64>, IndexEntry>,
    /// Problems met, for an operator's call.
    problems: Vec<String>,
}

impl Change {
    fn problem(&mut self, version: Option<u64>, state: VersionState, reason: String) {
        self.notes.insert(version, entry(state, reason.clone()));
        self.problems.push(match version {
            Some(v) => format!("version {v}: {reason}"),
            None => reason,
        });
    }
}

impl Runtime {
    pub(super) fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Under `poll`, starts the thread that looks at the repository every
    /// `interval`. A model folder is acted on only when two looks in a row
    /// saw it the same, so a version still being copied is not loaded
    /// half-written.
    pub fn watch_repository(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        if self.options.control != ModelControl::Poll {
            return Ok(());
        }
        let runtime = self.clone();
        self.threads.spawn("kiln-repo-poll", move || runtime.poll(interval))
    }

    fn poll(self: &Arc<Self>, interval: Duration) {
        let mut warned = None;
        let mut previous = self.look(&mut warned);
        loop {
            let until = Instant::now() + interval;
            while Instant::now() < until {
                if self.lock().stopped {
                    return;
                }
                std::thread::sleep((STEP * 4).min(until - Instant::now()));
            }
            let now = self.look(&mut warned);
            if let (Some(now), Some(before)) = (&now, &previous) {
                let known: Vec<String> = self.lock().models.keys().cloned().collect();
                let names: BTreeSet<&String> = now.keys().chain(before.keys()).chain(known.iter()).collect();
                for name in names {
                    let seen = now.get(name);
                    if seen == before.get(name) {
                        self.reconcile(name, seen.cloned(), false);
                    }
                }
            }
            previous = now;
        }
    }

    /// The repository as one look sees it; `None` (logged once per
    /// message) when the folder itself cannot be read: a volume that went
    /// away does not unload every model.
    fn look(&self, warned: &mut Option<String>) -> Option<BTreeMap<String, Scanned>> {
        match repository::scan(&self.options.source) {
            Ok(models) => {
                *warned = None;
                Some(models.into_iter().map(|(name, scan)| (name, scan.map_err(|e| e.to_string()))).collect())
            }
            Err(e) => {
                let message = e.to_string();
                if warned.as_ref() != Some(&message) {
                    tracing::warn!(error = %message, "repository not readable: serving what is loaded");
                    *warned = Some(message);
                }
                None
            }
        }
    }

    /// RepositoryModelLoad: reads `name`'s folder now and brings the model
    /// in line with it, trying again what failed before. Blocking (a load
    /// takes seconds); an error says what did not load.
    pub fn load_model(self: &Arc<Self>, name: &str, who: &str) -> Result<(), InferError> {
        self.explicit_only("RepositoryModelLoad")?;
        let mut scanned = repository::scan(&self.options.source)
            .map_err(|e| InferError::FailedPrecondition(format!("repository: {e}")))?;
        let known: Vec<String> = scanned.keys().cloned().collect();
        let found = scanned.remove(name).ok_or_else(|| {
            InferError::NotFound(format!("no model folder '{name}' in the repository; it has: {}", known.join(", ")))
        })?;
        tracing::info!(model = name, by = who, "RepositoryModelLoad");
        let problems = self.reconcile(name, Some(found.map_err(|e| e.to_string())), true);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InferError::FailedPrecondition(format!("model '{name}': {}", problems.join("; "))))
        }
    }

    /// RepositoryModelUnload: takes the model out of routing at once; its
    /// versions answer what they admitted, then stop.
    pub fn unload_model(self: &Arc<Self>, name: &str, who: &str) -> Result<(), InferError> {
        self.explicit_only("RepositoryModelUnload")?;
        let mut state = self.lock();
        if state.stopped {
            return Err(InferError::Unavailable("the server is shutting down".into()));
        }
        let repo = self.repo.get();
        let Some(model) = repo.models.get(name).cloned() else {
            return Err(InferError::NotFound(match repo.notes.contains_key(name) {
                true => format!("model '{name}' is not loaded"),
                false => format!("unknown model '{name}'"),
            }));
        };
        drop(repo);
        tracing::info!(model = name, by = who, "RepositoryModelUnload");
        state.models.remove(name);
        let why = format!("unloaded by {who} (RepositoryModelUnload)");
        let mut notes = BTreeMap::from([(None, entry(VersionState::Unavailable, why.clone()))]);
        let versions: Vec<_> = model.versions.into_iter().collect();
        for (v, _) in &versions {
            notes.insert(Some(*v), entry(VersionState::Unloading, why.clone()));
        }
        self.publish(name, None, notes);
        for (_, version) in versions {
            self.drain(&mut state, version, why.clone());
        }
        count(name, "unload", "ok");
        Ok(())
    }

    fn explicit_only(&self, call: &str) -> Result<(), InferError> {
        match self.options.control {
            ModelControl::Explicit => Ok(()),
            ModelControl::Poll => Err(InferError::FailedPrecondition(format!(
                "{call} is refused: this server polls its repository (model_control = poll), so the folder decides \
                 what is served; add, change or remove version folders, or serve with --model-control explicit"
            ))),
        }
    }

    /// Replaces one model in the served snapshot (`None`: not served) with
    /// its notes.
    fn publish(&self, name: &str, model: Option<ServedModel>, notes: BTreeMap<Option<u64>, IndexEntry>) {
        let mut repo = (*self.repo.get()).clone();
        match model {
            Some(m) => repo.models.insert(name.to_string(), m),
            None => repo.models.remove(name),
        };
        if notes.is_empty() {
            repo.notes.remove(name);
        } else {
            repo.notes.insert(name.to_string(), notes);
        }
        self.repo.publish(repo);
    }

    /// Loads one version the scan found (blocking), with the thread
    /// setting applied.
    fn load_version(&self, scan: &ModelScan, number: u64, config: &ModelToml) -> Result<LoadedVersion, String> {
        let (folder, _) = &scan.versions[&number];
        let files = repository::read_version(&self.options.source, folder).map_err(|e| e.to_string())?;
        let loaded = repository::load_version(&scan.name, number, &scan.config_file, config, &files)
            .map_err(|e| e.to_string())?;
        super::choose_threads(&scan.name, number, config, &loaded, self.options.model_threads)
            .map_err(|e| e.to_string())?;
        Ok(loaded)
    }

    /// Brings one model in line with its folder (`None`: the folder is
    /// gone). `explicit`: an operator asked, so what failed before is
    /// tried again. Returns the problems met; nothing is published when
    /// nothing changed.
    fn reconcile(self: &Arc<Self>, name: &str, scanned: Option<Scanned>, explicit: bool) -> Vec<String> {
        let mut state = self.lock();
        if state.stopped {
            return vec!["the server is shutting down".into()];
        }
        let repo = self.repo.get();
        let served = repo.models.get(name).cloned();
        let old_notes = repo.notes.get(name).cloned().unwrap_or_default();
        drop(repo);
        let mut applied = state.models.remove(name).unwrap_or_default();
        let mut change = Change { notes: old_notes.clone(), problems: Vec::new() };
        let scan = match scanned {
            Some(Ok(scan)) => scan,
            None => {
                // Nothing left to serve: a folder that is gone unloads.
                if let Some(model) = served {
                    let why = "its folder was removed from the repository".to_string();
                    tracing::info!(model = name, "model folder removed: unloading");
                    let mut notes = BTreeMap::new();
                    for v in model.versions.keys() {
                        notes.insert(Some(*v), entry(VersionState::Unloading, why.clone()));
                    }
                    self.publish(name, None, notes);
                    for (_, version) in model.versions {
                        self.drain(&mut state, version, why.clone());
                    }
                    count(name, "unload", "ok");
                } else if !old_notes.is_empty() {
                    self.publish(name, None, BTreeMap::new());
                }
                return Vec::new();
            }
            Some(Err(reason)) => {
                let state_now = if served.is_some() { VersionState::Ready } else { VersionState::Unavailable };
                let reason = match served {
                    Some(_) => format!("folder not applied, still serving what was loaded: {reason}"),
                    None => reason,
                };
                if old_notes.get(&None).is_none_or(|n| n.reason != reason) || explicit {
                    tracing::error!(model = name, error = %reason, "model folder not usable");
                    count(name, "load", "failed");
                    change.problem(None, state_now, reason);
                    self.publish(name, served, change.notes);
                } else {
                    change.problems.push(reason);
                }
                state.models.insert(name.to_string(), applied);
                return change.problems;
            }
        };

        // The config: unchanged, refused before, or new (applied whole or
        // refused whole, while the old one keeps serving).
        let current = served.as_ref().map(|m| m.config.clone());
        let unchanged = current.is_some() && applied.config_text == scan.config_text;
        // Notes on what was wrong with the folder or its config go once
        // that is put right.
        if change.notes.get(&None).is_some_and(|n| {
            n.reason.starts_with("folder not applied")
                || n.reason.starts_with(RELEASE_REFUSED)
                || (unchanged && n.reason.starts_with("model.toml"))
        }) {
            change.notes.remove(&None);
        }
        if unchanged {
            applied.refused = None;
        }
        // Versions gone from disk: nothing to retry, nothing to report
        // unless they were served.
        applied.failed.retain(|v, _| scan.versions.contains_key(v));
        change.notes.retain(|v, n| {
            v.is_none_or(|v| scan.versions.contains_key(&v))
                || n.state == VersionState::Unloading
                || n.reason.starts_with("unloaded")
        });
        let refused_before = !explicit && applied.refused.as_deref() == Some(scan.config_text.as_str());
        let (config, config_changed) = match (unchanged || refused_before, current) {
            (true, Some(config)) => (config, false),
            (true, None) => {
                state.models.insert(name.to_string(), applied);
                return vec![old_notes.get(&None).map(|n| n.reason.clone()).unwrap_or_default()];
            }
            (false, current) => match ModelToml::parse(&scan.config_file, &scan.config_text) {
                Ok(config) => (Arc::new(config), true),
                Err(e) => {
                    self.refuse_config(name, &mut applied, &scan, &mut change, current.is_some(), e.to_string());
                    match current {
                        Some(config) => (config, false),
                        None => {
                            self.publish(name, None, change.notes);
                            state.models.insert(name.to_string(), applied);
                            return change.problems;
                        }
                    }
                }
            },
        };
        if explicit {
            applied.failed.clear();
        }

        // Versions: the policy over what is there and has not failed;
        // each newly chosen one loads and warms up before anything changes.
        let served_version = |v: u64| served.as_ref().and_then(|m| m.versions.get(&v));
        let mut candidates: BTreeSet<u64> = scan
            .versions
            .iter()
            .filter(|(v, (_, fp))| applied.failed.get(v) != Some(fp) || served_version(**v).is_some())
            .map(|(v, _)| *v)
            .collect();
        let mut loaded: BTreeMap<u64, LoadedVersion> = BTreeMap::new();
        // Served versions whose new files failed keep their loaded copy.
        let mut keep: BTreeSet<u64> = BTreeSet::new();
        let wanted = loop {
            let wanted = config.version_policy.select(candidates.iter().copied());
            let to_load: Vec<u64> = wanted
                .iter()
                .copied()
                .filter(|v| !loaded.contains_key(v) && !keep.contains(v))
                .filter(|v| {
                    let files = &scan.versions[v].1;
                    let changed = applied.loaded.get(v) != Some(files) && applied.failed.get(v) != Some(files);
                    config_changed || served_version(*v).is_none() || changed
                })
                .collect();
            if to_load.is_empty() {
                break wanted;
            }
            let mut loading = change.notes.clone();
            for v in &to_load {
                if served_version(*v).is_none() {
                    loading.insert(Some(*v), entry(VersionState::Loading, "loading and warming up"));
                }
            }
            self.publish(name, served.clone(), loading);
            for v in to_load {
                match self.load_version(&scan, v, &config) {
                    Ok(version) => {
                        loaded.insert(v, version);
                    }
                    Err(reason) if config_changed && served.is_some() => {
                        let reason = format!("version {v} does not load with it: {reason}");
                        return self.refuse_change(&mut state, name, applied, &scan, change, served, reason);
                    }
                    Err(reason) => {
                        tracing::error!(model = name, version = v, error = %reason, "version failed to load: not served");
                        count(name, "load", "failed");
                        applied.failed.insert(v, scan.versions[&v].1.clone());
                        if served_version(v).is_some() {
                            keep.insert(v);
                            let reason =
                                format!("new files not loaded, still serving the copy loaded before: {reason}");
                            change.problem(Some(v), VersionState::Ready, reason);
                        } else {
                            candidates.remove(&v);
                            change.problem(Some(v), VersionState::Unavailable, reason);
                        }
                    }
                }
            }
        };
        if wanted.is_empty() {
            let reason = format!(
                "version_policy {} selects none of the version folders that load (found {:?})",
                config.version_policy.describe(),
                scan.versions.keys().collect::<Vec<_>>()
            );
            if config_changed && served.is_some() {
                return self.refuse_change(&mut state, name, applied, &scan, change, served, reason);
            }
            change.problem(None, VersionState::Unavailable, reason);
        }
        let default_version = match repository::default_version(&config, &wanted) {
            Ok(v) => Some(v),
            Err(reason) if config_changed && served.is_some() => {
                return self.refuse_change(&mut state, name, applied, &scan, change, served, reason);
            }
            Err(reason) => {
                if !wanted.is_empty() {
                    change.problem(None, VersionState::Ready, format!("{reason}; the highest served answers instead"));
                }
                wanted.iter().max().copied()
            }
        };

        // A new config's fallback must serve, fit and make no cycle.
        if config_changed && config.fallback.is_some() {
            let newest = wanted.last().copied();
            let spec = newest.and_then(|v| {
                loaded.get(&v).map(|l| l.spec.clone()).or_else(|| served_version(v).map(|s| s.spec.clone()))
            });
            if let Some(spec) = spec
                && let Err(reason) = crate::pipeline::fallback::check(&self.repo.get(), name, &config, &spec)
            {
                return self.refuse_change(&mut state, name, applied, &scan, change, served, reason);
            }
        }
        let release = self.release_state(name, &scan, served.as_ref(), &mut applied, &mut change, &old_notes);

        // Start what loaded, then swap: from here new requests route to
        // the new set, and what left it drains.
        let mut versions = BTreeMap::new();
        for v in &wanted {
            let Some(version) = loaded.remove(v) else {
                if let Some(kept) = served_version(*v) {
                    if applied.loaded.get(v) == Some(&scan.versions[v].1) {
                        change.notes.remove(&Some(*v));
                    }
                    versions.insert(*v, kept.clone());
                }
                continue;
            };
            let stats = served_version(*v).map(|s| s.stats.clone());
            match self.start_version(name, *v, version, &config, stats, &mut state) {
                Ok(started) => {
                    tracing::info!(model = name, version = v, "version serving");
                    count(name, "load", "ok");
                    applied.loaded.insert(*v, scan.versions[v].1.clone());
                    applied.failed.remove(v);
                    change.notes.remove(&Some(*v));
                    versions.insert(*v, Arc::new(started));
                }
                Err(e) => {
                    count(name, "load", "failed");
                    change.problem(Some(*v), VersionState::Unavailable, e.to_string());
                    if let Some(kept) = served_version(*v) {
                        versions.insert(*v, kept.clone());
                    }
                }
            }
        }
        if config_changed {
            if served.is_some() {
                tracing::info!(model = name, "model.toml change applied");
                count(name, "config", "ok");
            }
            applied.config_text = scan.config_text.clone();
            applied.refused = None;
            if change.notes.get(&None).is_some_and(|n| n.reason.starts_with("model.toml")) {
                change.notes.remove(&None);
            }
        }
        // A model that serves again sheds the note that it did not.
        if !versions.is_empty() && change.notes.get(&None).is_some_and(|n| n.state == VersionState::Unavailable) {
            change.notes.remove(&None);
        }
        let mut leaving = Vec::new();
        if let Some(old) = &served {
            for (v, version) in &old.versions {
                match versions.get(v) {
                    Some(now) if Arc::ptr_eq(now, version) => {}
                    Some(_) => leaving.push((version.clone(), "replaced by a new load".to_string())),
                    None => {
                        let why = match scan.versions.contains_key(v) {
                            true => format!(
                                "version_policy {} now serves {:?}",
                                config.version_policy.describe(),
                                versions.keys().collect::<Vec<_>>()
                            ),
                            false => "its folder was removed".to_string(),
                        };
                        change.notes.insert(Some(*v), entry(VersionState::Unloading, why.clone()));
                        leaving.push((version.clone(), why));
                    }
                }
            }
        }
        applied.loaded.retain(|v, _| versions.contains_key(v));
        let promoted = release.promoted.filter(|v| versions.contains_key(v));
        let model = default_version.filter(|_| !versions.is_empty()).map(|default_version| ServedModel {
            name: name.to_string(),
            config: config.clone(),
            default_version: promoted.unwrap_or(default_version),
            versions,
            release,
        });
        let same = match (&served, &model) {
            (Some(a), Some(b)) => {
                Arc::ptr_eq(&a.config, &b.config)
                    && Arc::ptr_eq(&a.release, &b.release)
                    && a.default_version == b.default_version
                    && a.versions.len() == b.versions.len()
                    && a.versions.iter().zip(&b.versions).all(|((x, p), (y, q))| x == y && Arc::ptr_eq(p, q))
            }
            (None, None) => true,
            _ => false,
        };
        if !same || change.notes != old_notes {
            self.publish(name, model, change.notes);
        }
        for (version, why) in leaving {
            self.drain(&mut state, version, why);
        }
        state.models.insert(name.to_string(), applied);
        change.problems
    }

    /// The release state to serve: what serves while `release.json` is
    /// unchanged (and always for the built-in repository, which has no
    /// folder to keep it in), else the file's, else (a file that does not
    /// parse) what serves, with a note.
    fn release_state(
        &self,
        name: &str,
        scan: &ModelScan,
        served: Option<&ServedModel>,
        applied: &mut Applied,
        change: &mut Change,
        old_notes: &BTreeMap<Option<u64>, IndexEntry>,
    ) -> Arc<Release> {
        let current = served.map(|m| m.release.clone());
        if let Some(current) = &current
            && (applied.release_text == scan.release_text || matches!(self.options.source, RepositorySource::BuiltIn))
        {
            return current.clone();
        }
        match repository::read_release(scan) {
            Ok(release) => {
                if served.is_some() {
                    tracing::info!(model = name, "release.json change applied");
                }
                applied.release_text = scan.release_text.clone();
                Arc::new(release)
            }
            Err(e) => {
                let reason = format!("{RELEASE_REFUSED}, the previous release state serves: {e}");
                if old_notes.get(&None).is_none_or(|n| n.reason != reason) {
                    tracing::error!(model = name, error = %e, "release.json refused");
                }
                let state = if served.is_some() { VersionState::Ready } else { VersionState::Unavailable };
                change.problem(None, state, reason);
                current.unwrap_or_default()
            }
        }
    }

    /// An admin's release action: applied to the served model at once
    /// (the next request sees it), written to `release.json` under a
    /// folder repository so restarts and replicas see it. Returns the
    /// state before and after.
    pub fn release(self: &Arc<Self>, name: &str, action: &Action, who: &str) -> Result<(Release, Release), InferError> {
        let mut state = self.lock();
        if state.stopped {
            return Err(InferError::Unavailable("the server is shutting down".into()));
        }
        let repo = self.repo.get();
        let model = crate::pipeline::router::model(&repo, name)?.clone();
        let notes = repo.notes.get(name).cloned().unwrap_or_default();
        drop(repo);
        let served: Vec<u64> = model.versions.keys().copied().collect();
        let refused = |m: String| InferError::FailedPrecondition(format!("{} model '{name}': {m}", action.name()));
        let mut next = model.release.apply(action, &served, model.default_version).map_err(refused)?;
        next.updated_by = who.to_string();
        next.updated_ms = crate::monitor::unix_ms();
        if let RepositorySource::Dir(dir) = &self.options.source {
            let text = serde_json::to_string_pretty(&next).map_err(|e| refused(e.to_string()))? + "\n";
            let folder = dir.join(name);
            let staging = folder.join(format!(".{RELEASE_FILE}.tmp"));
            std::fs::write(&staging, &text)
                .and_then(|()| std::fs::rename(&staging, folder.join(RELEASE_FILE)))
                .map_err(|e| refused(format!("cannot write {}: {e}", folder.join(RELEASE_FILE).display())))?;
            if let Some(applied) = state.models.get_mut(name) {
                applied.release_text = Some(text);
            }
        }
        let policy_default = repository::default_version(&model.config, &served).unwrap_or(model.default_version);
        let default_version = next.promoted.filter(|v| model.versions.contains_key(v)).unwrap_or(policy_default);
        let before = (*model.release).clone();
        let release = Arc::new(next.clone());
        self.publish(name, Some(ServedModel { default_version, release, ..model }), notes);
        Ok((before, next))
    }

    /// Starts the thread that acts on drift alerts of models whose
    /// `[drift] on_alert` says so: the model is paused (its fallback, when
    /// it has one, answers), logged and written to `audit`. Resuming is an
    /// operator's decision.
    pub fn act_on_drift(self: &Arc<Self>, audit: Arc<crate::monitor::audit::AuditLog>) -> std::io::Result<()> {
        let taken = self.alert_rx.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(alerts) = taken else { return Ok(()) };
        let runtime = self.clone();
        self.threads.spawn("kiln-drift-actions", move || {
            loop {
                match alerts.recv_timeout(STEP * 20) {
                    Ok(alert) => runtime.on_drift_alert(&alert, &audit),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                if runtime.lock().stopped {
                    return;
                }
            }
        })
    }

    fn on_drift_alert(
        self: &Arc<Self>,
        alert: &crate::monitor::drift::DriftAlert,
        audit: &crate::monitor::audit::AuditLog,
    ) {
        let repo = self.repo.get();
        let Some(model) = repo.models.get(&alert.model) else { return };
        let on_alert = model.config.drift.on_alert;
        if on_alert == crate::monitor::drift::config::OnAlert::None || model.release.paused.is_some() {
            return;
        }
        drop(repo);
        let how = if on_alert == crate::monitor::drift::config::OnAlert::Fallback { "fallback" } else { "pause" };
        let reason = format!(
            "drift alert on {} of version {} (value {:.3}); on_alert = {how}",
            alert.feature, alert.version, alert.value
        );
        let who = "the drift monitor";
        let done = self.release(&alert.model, &Action::Pause(reason.clone()), who);
        let outcome = match &done {
            Ok(_) => {
                tracing::warn!(model = %alert.model, %reason, "drift alert acted on: model paused until an admin resumes it");
                "ok".to_string()
            }
            Err(e) => {
                tracing::error!(model = %alert.model, error = %e, "drift alert not acted on");
                e.to_string()
            }
        };
        let (before, after) = match &done {
            Ok((before, after)) => (Some(before), Some(after)),
            Err(_) => (None, None),
        };
        audit.record(&crate::monitor::audit::Entry {
            time_ms: crate::monitor::unix_ms(),
            who,
            action: "pause",
            model: &alert.model,
            reason: &reason,
            outcome: &outcome,
            before,
            after,
        });
    }

    /// Refuses a `model.toml` change whole and ends the reconcile: the
    /// settings loaded before keep serving, the model's notes say why.
    #[allow(clippy::too_many_arguments)]
    fn refuse_change(
        &self,
        state: &mut ControlState,
        name: &str,
        mut applied: Applied,
        scan: &ModelScan,
        mut change: Change,
        served: Option<ServedModel>,
        reason: String,
    ) -> Vec<String> {
        self.refuse_config(name, &mut applied, scan, &mut change, served.is_some(), reason);
        self.publish(name, served, change.notes);
        state.models.insert(name.to_string(), applied);
        change.problems
    }

    /// Refuses a `model.toml` change: logged, counted, noted on the model;
    /// the settings loaded before keep serving.
    fn refuse_config(
        &self,
        name: &str,
        applied: &mut Applied,
        scan: &ModelScan,
        change: &mut Change,
        serving: bool,
        reason: String,
    ) {
        let reason = match serving {
            true => format!("model.toml not applied, the previous settings keep serving: {reason}"),
            false => format!("model.toml: {reason}"),
        };
        tracing::error!(model = name, error = %reason, "model.toml refused");
        count(name, "config", "refused");
        applied.refused = Some(scan.config_text.clone());
        let state = if serving { VersionState::Ready } else { VersionState::Unavailable };
        change.problem(None, state, reason);
    }

    /// Takes a version that left the served set to its end on its own
    /// thread: it waits until every request routed to it has its answer
    /// (each holds the version while in flight), then stops its scheduler
    /// (answering anything still queued), executors and drift monitor.
    fn drain(self: &Arc<Self>, state: &mut ControlState, version: Arc<ServedVersion>, why: String) {
        state.draining.retain(|w| w.strong_count() > 0);
        state.draining.push(Arc::downgrade(&version));
        let (name, number) = (version.spec.name.clone(), version.spec.version);
        let runtime = self.clone();
        let thread = format!("kiln-drain-{name}-{number}#{}", version.generation);
        let spawned = self.threads.spawn(thread, move || runtime.finish_drain(version, &why));
        if let Err(e) = spawned {
            tracing::error!(model = %name, version = number, error = %e, "no thread to unload the version");
        }
    }

    fn finish_drain(&self, version: Arc<ServedVersion>, why: &str) {
        let until = Instant::now() + UNLOAD_WAIT;
        while Arc::strong_count(&version) > 1 && Instant::now() < until {
            std::thread::sleep(STEP);
        }
        let suffix = format!("#{}", version.generation);
        version.batcher.close();
        let batchers = |n: &str| n.ends_with(&suffix) && (n.starts_with("kiln-sched-") || n.starts_with("kiln-exec-"));
        self.threads.join_where(UNLOAD_WAIT, batchers);
        version.drift.close();
        self.threads.join_where(UNLOAD_WAIT, |n| n.ends_with(&suffix) && n.starts_with("kiln-drift-"));
        let (name, number) = (version.spec.name.clone(), version.spec.version);
        let state = self.lock();
        if state.stopped {
            return;
        }
        let repo = self.repo.get();
        let serving = repo.models.get(&name).is_some_and(|m| m.versions.contains_key(&number));
        let mut notes = repo.notes.get(&name).cloned().unwrap_or_default();
        let model = repo.models.get(&name).cloned();
        drop(repo);
        // A copy that replaced it shares the gauge and keeps it at 1.
        if !serving {
            version.metrics.ready.set(0.0);
        }
        drop(version);
        if let Some(note) = notes.get_mut(&Some(number))
            && note.state == VersionState::Unloading
        {
            *note = entry(VersionState::Unavailable, format!("unloaded: {why}"));
            self.publish(&name, model, notes);
        }
        tracing::info!(model = %name, version = number, why, "version unloaded: every request it admitted answered");
        drop(state);
    }
}

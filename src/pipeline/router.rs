//! Picks the model version a request goes to: the one it names, else the
//! canary split's choice for its routing key, else the model's default
//! (promoted or the policy's). A paused model, and a model or version the
//! server knows but does not serve now (loading, failed, unloaded), are
//! answered with why.

use std::sync::Arc;

use crate::error::InferError;
use crate::repository::{IndexEntry, Repository, ServedModel, ServedVersion, VersionState};

/// Why a known model or version takes no requests: transient states are
/// UNAVAILABLE (retry), the rest NOT_FOUND with the reason.
fn not_serving(what: String, note: &IndexEntry) -> InferError {
    let message = format!("{what} is not serving ({}): {}", note.state.as_str(), note.reason);
    match note.state {
        VersionState::Loading | VersionState::Unloading => InferError::Unavailable(message),
        VersionState::Ready | VersionState::Unavailable => InferError::NotFound(message),
    }
}

/// Finds a model by name.
pub fn model<'r>(repo: &'r Repository, name: &str) -> Result<&'r ServedModel, InferError> {
    repo.models.get(name).ok_or_else(|| {
        if let Some(note) = repo.note(name, None) {
            return not_serving(format!("model '{name}'"), note);
        }
        let known: Vec<&str> = repo.models.keys().map(String::as_str).collect();
        InferError::NotFound(format!("unknown model '{name}'; this server has: {}", known.join(", ")))
    })
}

/// Resolves `name` and an optional `version` ("" = default) to a serving
/// version.
pub fn route(repo: &Repository, name: &str, version: &str) -> Result<Arc<ServedVersion>, InferError> {
    let model = model(repo, name)?;
    if version.is_empty() {
        return model
            .versions
            .get(&model.default_version)
            .cloned()
            .ok_or_else(|| InferError::Unavailable(format!("model '{name}' has no default version serving")));
    }
    let number = version.parse::<u64>().ok();
    if let Some(found) = number.and_then(|v| model.versions.get(&v)) {
        return Ok(found.clone());
    }
    let known: Vec<String> = model.versions.keys().map(u64::to_string).collect();
    match number.and_then(|v| repo.note(name, Some(v))) {
        Some(note) => {
            Err(not_serving(format!("model '{name}' version {version} (serving: {})", known.join(", ")), note))
        }
        None => Err(InferError::NotFound(format!(
            "model '{name}' has no version '{version}'; versions: {}",
            known.join(", ")
        ))),
    }
}

/// Routes an inference request: refused while the model is paused; a
/// request naming no version follows the split (sticky per `key`, made
/// only when there is a split).
pub fn route_infer(
    repo: &Repository,
    name: &str,
    version: &str,
    key: impl FnOnce() -> Vec<u8>,
) -> Result<Arc<ServedVersion>, InferError> {
    let model = model(repo, name)?;
    if let Some(reason) = &model.release.paused {
        return Err(InferError::Unavailable(format!(
            "model '{name}' is paused ({reason}); an admin resumes it (kiln admin resume {name})"
        )));
    }
    if version.is_empty()
        && !model.release.split.is_empty()
        && let Some(found) = model.release.pick(&key()).and_then(|v| model.versions.get(&v))
    {
        return Ok(found.clone());
    }
    route(repo, name, version)
}

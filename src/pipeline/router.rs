//! Picks the model version a request goes to: the one it names, else the
//! model's default.

use std::sync::Arc;

use crate::error::InferError;
use crate::repository::{Repository, ServedModel, ServedVersion};

/// Finds a model by name.
pub fn model<'r>(repo: &'r Repository, name: &str) -> Result<&'r ServedModel, InferError> {
    repo.models.get(name).ok_or_else(|| {
        let known: Vec<&str> = repo.models.keys().map(String::as_str).collect();
        InferError::NotFound(format!("unknown model '{name}'; this server has: {}", known.join(", ")))
    })
}

/// Resolves `name` and an optional `version` ("" = default) to a serving
/// version.
pub fn route(repo: &Repository, name: &str, version: &str) -> Result<Arc<ServedVersion>, InferError> {
    let model = model(repo, name)?;
    if version.is_empty() {
        return Ok(model.versions[&model.default_version].clone());
    }
    let found = version.parse::<u64>().ok().and_then(|v| model.versions.get(&v));
    found.cloned().ok_or_else(|| {
        let known: Vec<String> = model.versions.keys().map(u64::to_string).collect();
        InferError::NotFound(format!("model '{name}' has no version '{version}'; versions: {}", known.join(", ")))
    })
}

//! Fallback: what answers when a model cannot. `fallback` in model.toml
//! names another model or version, or a fixed answer; it answers while the
//! model is paused, while its version is unhealthy (consecutive failures
//! trip a breaker for a while), and with `fallback_on_deadline` when the
//! model cannot meet a request's deadline. Checked when a model loads: the
//! target serves, takes the same inputs and gives the same outputs, and
//! following fallbacks never comes back.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::config::{FallbackToml, ModelToml};
use crate::error::InferError;
use crate::model::{DataType, ModelSpec, Tensor, TensorData};
use crate::repository::{Repository, ServedModel, ServedVersion};
use crate::request::{InferResponse, Timing};

/// Consecutive model failures that trip a version's breaker.
pub const TRIP_AFTER: u32 = 5;

/// How long a tripped version's requests go to the fallback before it is
/// tried again (one more failure trips it again at once).
pub const TRIPPED_FOR: Duration = Duration::from_secs(10);

/// A version's health as its answers show it.
#[derive(Default)]
pub struct Breaker {
    consecutive: AtomicU32,
    tripped_until: Mutex<Option<Instant>>,
}

impl Breaker {
    /// Notes how a request the version admitted ended.
    pub fn record<T>(&self, result: &Result<T, InferError>) {
        match result {
            Ok(_) => self.consecutive.store(0, Ordering::Relaxed),
            Err(InferError::ModelFailed { .. }) => {
                if self.consecutive.fetch_add(1, Ordering::Relaxed) + 1 >= TRIP_AFTER {
                    *self.tripped_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(Instant::now() + TRIPPED_FOR);
                }
            }
            Err(_) => {}
        }
    }

    /// Why the version should not be sent requests now, if it should not.
    pub fn tripped(&self) -> Option<String> {
        let until = *self.tripped_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        until
            .filter(|u| Instant::now() < *u)
            .map(|_| format!("unhealthy: {} consecutive failures", self.consecutive.load(Ordering::Relaxed)))
    }
}

/// Where a model's fallback answer comes from.
pub enum Target<'a> {
    Version(std::sync::Arc<ServedVersion>),
    Answer(&'a std::collections::BTreeMap<String, Vec<f64>>),
}

/// The fallback `model` has now, if any serves and fits `spec`.
pub fn resolve<'a>(repo: &Repository, model: &'a ServedModel, spec: &ModelSpec) -> Result<Target<'a>, String> {
    let Some(f) = &model.config.fallback else { return Err("no fallback".into()) };
    if let Some(answer) = &f.answer {
        return Ok(Target::Answer(answer));
    }
    let name = f.model.as_deref().unwrap_or(&model.name);
    let target = repo.models.get(name).ok_or_else(|| format!("fallback model '{name}' is not serving"))?;
    let number = f.version.unwrap_or(target.default_version);
    let version =
        target.versions.get(&number).ok_or_else(|| format!("fallback '{name}' version {number} is not serving"))?;
    if name != model.name {
        compatible(spec, &version.spec)?;
    }
    Ok(Target::Version(version.clone()))
}

/// Whether `fallback` takes what `primary` takes and gives what it gives.
pub fn compatible(primary: &ModelSpec, fallback: &ModelSpec) -> Result<(), String> {
    let same =
        |a: &crate::model::TensorSpec, b: &crate::model::TensorSpec| a.datatype == b.datatype && a.shape == b.shape;
    for input in &primary.inputs {
        match fallback.inputs.iter().find(|i| i.name == input.name) {
            Some(i) if same(i, input) => {}
            _ => return Err(format!("fallback '{}' does not take input `{}` as declared", fallback.name, input.name)),
        }
    }
    if fallback.inputs.len() != primary.inputs.len() {
        return Err(format!("fallback '{}' needs inputs '{}' does not have", fallback.name, primary.name));
    }
    for output in &primary.outputs {
        match fallback.outputs.iter().find(|o| o.name == output.name) {
            Some(o) if same(o, output) => {}
            _ => {
                return Err(format!("fallback '{}' does not give output `{}` as declared", fallback.name, output.name));
            }
        }
    }
    Ok(())
}

/// Checks `name`'s fallback (with `config` and interface `spec`) against
/// what `repo` serves: its target serves and fits, and following
/// fallbacks from it never comes back to a model on the way.
pub fn check(repo: &Repository, name: &str, config: &ModelToml, spec: &ModelSpec) -> Result<(), String> {
    let Some(f) = &config.fallback else { return Ok(()) };
    if f.answer.is_some() {
        return Ok(());
    }
    let target_name = f.model.as_deref().unwrap_or(name);
    if target_name == name && f.version.is_none() {
        return Err("field `fallback`: a model cannot fall back to its own default; name a version".into());
    }
    let target =
        repo.models.get(target_name).ok_or_else(|| format!("field `fallback`: model '{target_name}' is not served"))?;
    if target_name != name {
        let number = f.version.unwrap_or(target.default_version);
        let version = target
            .versions
            .get(&number)
            .ok_or_else(|| format!("field `fallback`: model '{target_name}' version {number} is not served"))?;
        compatible(spec, &version.spec).map_err(|m| format!("field `fallback`: {m}"))?;
    }
    let mut chain = vec![name.to_string()];
    let mut next: Option<(&str, &FallbackToml)> = Some((name, f));
    while let Some((from, f)) = next {
        let to = f.model.as_deref().unwrap_or(from);
        if f.answer.is_some() || to == from {
            break;
        }
        chain.push(to.to_string());
        if chain[..chain.len() - 1].iter().any(|m| m == to) {
            return Err(format!("field `fallback`: fallbacks form a cycle: {}", chain.join(" -> ")));
        }
        next = repo.models.get(to).and_then(|m| m.config.fallback.as_ref().map(|f| (to, f)));
    }
    Ok(())
}

/// The fixed answer for `rows` rows: each requested output's values
/// repeated per row, in its declared type.
pub fn fixed_answer(
    answer: &std::collections::BTreeMap<String, Vec<f64>>,
    spec: &ModelSpec,
    outputs: &[usize],
    rows: usize,
) -> InferResponse {
    let tensors = outputs
        .iter()
        .map(|&o| {
            let declared = &spec.outputs[o];
            let one = answer.get(&declared.name).cloned().unwrap_or_default();
            let values: Vec<f64> = (0..rows).flat_map(|_| one.iter().copied()).collect();
            let data = match declared.datatype {
                DataType::Fp64 => TensorData::Fp64(values),
                DataType::Int32 => TensorData::Int32(values.iter().map(|v| *v as i32).collect()),
                DataType::Int64 => TensorData::Int64(values.iter().map(|v| *v as i64).collect()),
                // Checked numeric at load; FP32 is the rest.
                _ => TensorData::Fp32(values.iter().map(|v| *v as f32).collect()),
            };
            let mut shape = vec![rows];
            shape.extend(declared.shape[1..].iter().map(|d| *d as usize));
            Tensor { shape, data }
        })
        .collect();
    InferResponse { outputs: tensors, timing: Timing { queue_us: 0, compute_us: 0, batch_size: 0, cost_us: 0 } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_trips_after_consecutive_failures_only() {
        let b = Breaker::default();
        let failed: Result<(), InferError> =
            Err(InferError::ModelFailed { model: "m".into(), version: 1, reason: "x".into() });
        for _ in 0..TRIP_AFTER - 1 {
            b.record(&failed);
        }
        b.record(&Ok::<(), InferError>(()));
        for _ in 0..TRIP_AFTER - 1 {
            b.record(&failed);
        }
        assert!(b.tripped().is_none(), "a success in between resets the count");
        b.record(&Err::<(), _>(InferError::Expired("late".into())));
        assert!(b.tripped().is_none(), "only the model's own failures count");
        b.record(&failed);
        assert!(b.tripped().is_some_and(|w| w.contains("5 consecutive failures")));
    }
}

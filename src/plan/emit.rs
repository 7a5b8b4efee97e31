//! `kiln plan --emit k8s`: the plan as a kustomize overlay on
//! `deploy/k8s/base` (replica floor and ceiling, the HPA's per-pod request
//! target) and the model's `model.toml` with the recommended batching
//! settings written in.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use super::Plan;
use crate::config::ModelToml;

/// The share of a replica's planned maximum rate the HPA aims each pod at:
/// the planned maximum is where p99 just meets the budget, so a pod run at
/// it has no room for the minute a scale-up takes.
pub const TARGET_SHARE: f64 = 0.8;

/// The fewest replicas an overlay runs, whatever the rate needs.
pub const MIN_REPLICAS: u64 = 2;

/// One file of the overlay: its name inside the overlay folder and text.
pub type File = (String, String);

/// Why an overlay could not be written.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("--emit k8s needs --rate: the replica count is sized for it")]
    NoRate,
    #[error("the rewritten model.toml does not parse: {0}")]
    Config(String),
}

/// The overlay's files for `plan`, `model_toml` being the model's current
/// `model.toml` text and `base` the path from the overlay folder to the
/// kustomize base. `command` is recorded in each file's header.
pub fn k8s_overlay(plan: &Plan, model_toml: &str, base: &str, command: &str) -> Result<Vec<File>, EmitError> {
    let (Some(rate), Some(replicas)) = (plan.rate, plan.replicas) else {
        return Err(EmitError::NoRate);
    };
    let r = &plan.recommended;
    let per_pod = (r.max_rate * TARGET_SHARE).floor().max(1.0);
    // Never fewer than two, so one pod can drain or be evicted (the PDB
    // allows one away) while the rate is still carried.
    let min_replicas = replicas.max(MIN_REPLICAS);
    // Room to absorb twice the planned rate before the ceiling stops it.
    let max_replicas = (min_replicas * 2).max(min_replicas + 2);
    let header = format!(
        "# Written by `{command}`.\n# Model {}: {rate} requests/s at a p99 budget of {} ms. One replica \
         sustains {:.0} requests/s\n# at the recommended settings (predicted p99 {:.2} ms): replicas needed \
         {replicas}, run {min_replicas}.\n",
        plan.model, plan.budget_ms, r.max_rate, r.p99_ms
    );
    let kustomization = format!(
        "{header}apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {base}\n\
         patches:\n  - path: replicas.yaml\n    target:\n      kind: Deployment\n      name: kiln\n  \
         - path: hpa.yaml\n    target:\n      kind: HorizontalPodAutoscaler\n      name: kiln\n"
    );
    let deployment = format!(
        "{header}apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: kiln\nspec:\n  replicas: {min_replicas}\n"
    );
    let mut hpa = format!(
        "{header}# Each pod is aimed at {TARGET_SHARE} of its planned maximum ({per_pod} requests/s); the \
         busy\n# and queue targets of the base stay, whichever asks for more pods wins.\n\
         apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: kiln\nspec:\n  \
         minReplicas: {min_replicas}\n  maxReplicas: {max_replicas}\n  metrics:\n"
    );
    for (name, value) in [
        ("kiln_requests_per_second", format!("\"{per_pod}\"")),
        ("kiln_executor_busy_ratio", "700m".to_string()),
        ("kiln_queue_depth", "\"8\"".to_string()),
    ] {
        let _ = write!(
            hpa,
            "    - type: Pods\n      pods:\n        metric:\n          name: {name}\n        target:\n          \
             type: AverageValue\n          averageValue: {value}\n"
        );
    }
    let settings = [
        ("max_batch_size", r.max_batch_size.to_string()),
        ("max_queue_delay_ms", r.max_queue_delay_ms.to_string()),
        ("instances", r.instances.to_string()),
        ("latency_budget_ms", plan.budget_ms.to_string()),
    ];
    let toml = set_top_level(model_toml, &settings);
    ModelToml::parse("model.toml", &toml).map_err(|e| EmitError::Config(e.to_string()))?;
    Ok(vec![
        ("kustomization.yaml".into(), kustomization),
        ("replicas.yaml".into(), deployment),
        ("hpa.yaml".into(), hpa),
        ("model.toml".into(), toml),
    ])
}

/// `text` with each top-level `key = value` line given the new value, and
/// keys it lacks added before its first table, so comments and layout stay
/// as they were.
pub fn set_top_level(text: &str, settings: &[(&str, String)]) -> String {
    let mut out = Vec::new();
    let mut done = vec![false; settings.len()];
    let mut in_table = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') && !in_table {
            in_table = true;
            for ((key, value), done) in settings.iter().zip(&mut done) {
                if !*done {
                    out.push(format!("{key} = {value}"));
                    *done = true;
                }
            }
        }
        let key = trimmed.split('=').next().map(str::trim).unwrap_or("");
        match settings.iter().position(|(k, _)| *k == key).filter(|_| !in_table && trimmed.contains('=')) {
            Some(i) => {
                out.push(format!("{} = {}", settings[i].0, settings[i].1));
                done[i] = true;
            }
            None => out.push(line.to_string()),
        }
    }
    for ((key, value), done) in settings.iter().zip(&done) {
        if !done {
            out.push(format!("{key} = {value}"));
        }
    }
    out.join("\n") + "\n"
}

/// The path from folder `from` to `to`, both taken from the current
/// directory when relative, as kustomize wants a base named.
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let absolute = |p: &Path| std::env::current_dir().map(|d| normalise(&d.join(p))).unwrap_or_else(|_| normalise(p));
    let (from, to) = (absolute(from), absolute(to));
    let common = from.components().zip(to.components()).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in from.components().skip(common) {
        out.push("..");
    }
    for c in to.components().skip(common) {
        out.push(c);
    }
    out
}

/// `.` and `..` folded away without touching the filesystem.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_level_keys_are_replaced_in_place_and_missing_ones_added_before_the_first_table() {
        let text = "# head\nkind = \"mlp\"\nmax_batch_size = 64 # old\n\n[mlp]\nmax_batch_size = 3\n";
        let out = set_top_level(text, &[("max_batch_size", "16".into()), ("instances", "2".into())]);
        assert_eq!(out, "# head\nkind = \"mlp\"\nmax_batch_size = 16\n\ninstances = 2\n[mlp]\nmax_batch_size = 3\n");
    }

    #[test]
    fn keys_are_appended_when_there_is_no_table() {
        assert_eq!(set_top_level("kind = \"mlp\"", &[("instances", "2".into())]), "kind = \"mlp\"\ninstances = 2\n");
    }

    #[test]
    fn relative_paths_climb_out_of_the_overlay() {
        assert_eq!(
            relative(Path::new("/r/deploy/k8s/overlays/plan"), Path::new("/r/deploy/k8s/base")),
            Path::new("../../base")
        );
        assert_eq!(
            relative(Path::new("/tmp/x"), Path::new("/r/./deploy/k8s/base")),
            Path::new("../../r/deploy/k8s/base")
        );
    }
}

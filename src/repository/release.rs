//! A model's release state: the promoted default (and the defaults before
//! it, for rollback), a pause, and a canary split. Kept in
//! `NAME/release.json` beside `model.toml`, polled like the versions, so a
//! restart and every replica mounting the repository see the same state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// The file in a model's folder.
pub const RELEASE_FILE: &str = "release.json";

/// Defaults remembered for rollback.
const HISTORY: usize = 16;

/// Most versions one split may name, and the largest weight.
const MAX_SPLIT: usize = 64;
const MAX_WEIGHT: u32 = 1_000_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The default set by promote; the policy's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<u64>,
    /// Defaults before each promote, latest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<u64>,
    /// Why the model is paused; absent when it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// Version -> weight for requests that name no version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub split: BTreeMap<u64, u32>,
    /// A candidate version that silently gets copies of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    /// Who made the last change, and when (Unix ms).
    #[serde(default)]
    pub updated_by: String,
    #[serde(default)]
    pub updated_ms: u64,
}

/// Shadow traffic: a sampled share of requests copied to `version`, at
/// most `max_inflight` at once; its answers are compared, never returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub version: u64,
    /// Share of requests copied, in (0, 1].
    pub sample: f64,
    /// Most shadow copies in flight; beyond it copies are dropped.
    pub max_inflight: u32,
}

impl Eq for Shadow {}

impl Shadow {
    fn check(&self) -> Result<(), String> {
        if !(self.sample > 0.0 && self.sample <= 1.0) {
            return Err(format!("field `shadow.sample`: a share in (0, 1], got {}", self.sample));
        }
        if !(1..=1024).contains(&self.max_inflight) {
            return Err(format!("field `shadow.max_inflight`: 1 to 1024, got {}", self.max_inflight));
        }
        Ok(())
    }
}

/// One operator action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Promote(u64),
    Rollback,
    Pause(String),
    Resume,
    Split(BTreeMap<u64, u32>),
    /// Starts (or, with `None`, stops) shadow traffic.
    Shadow(Option<Shadow>),
}

impl Action {
    /// The audit log's and the metric's name for it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Promote(_) => "promote",
            Self::Rollback => "rollback",
            Self::Pause(_) => "pause",
            Self::Resume => "resume",
            Self::Split(_) => "split",
            Self::Shadow(_) => "shadow",
        }
    }
}

impl Release {
    /// Parses `release.json`; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let release: Self = serde_json::from_str(text).map_err(|e| ConfigError::new(file, e.to_string()))?;
        release.check_split().map_err(|m| ConfigError::new(file, m))?;
        if let Some(shadow) = &release.shadow {
            shadow.check().map_err(|m| ConfigError::new(file, m))?;
        }
        Ok(release)
    }

    fn check_split(&self) -> Result<(), String> {
        if self.split.len() > MAX_SPLIT {
            return Err(format!("field `split`: at most {MAX_SPLIT} versions, got {}", self.split.len()));
        }
        if let Some((v, w)) = self.split.iter().find(|(_, w)| **w > MAX_WEIGHT) {
            return Err(format!("field `split`: version {v}'s weight {w} is over {MAX_WEIGHT}"));
        }
        if !self.split.is_empty() && self.split.values().all(|w| *w == 0) {
            return Err("field `split`: every weight is 0; give one version a weight, or send no split".into());
        }
        Ok(())
    }

    /// The state after `action` on a model serving `served` (ascending)
    /// whose default is `default`; an error says why it cannot be done.
    pub fn apply(&self, action: &Action, served: &[u64], default: u64) -> Result<Self, String> {
        let mut next = self.clone();
        let serving = |v: &u64| served.contains(v);
        match action {
            Action::Promote(v) => {
                if !serving(v) {
                    return Err(format!("version {v} is not serving (serving {served:?})"));
                }
                if *v != default {
                    next.history.push(default);
                    let excess = next.history.len().saturating_sub(HISTORY);
                    next.history.drain(..excess);
                }
                next.promoted = Some(*v);
                next.split.clear();
            }
            Action::Rollback => {
                while let Some(v) = next.history.pop() {
                    if serving(&v) && v != default {
                        next.promoted = Some(v);
                        next.split.clear();
                        return Ok(next);
                    }
                }
                let lower = served.iter().rev().find(|v| **v < default).copied();
                let Some(v) = lower else {
                    return Err(format!("nothing to roll back to: no earlier default, and no version below {default}"));
                };
                next.promoted = Some(v);
                next.split.clear();
            }
            Action::Pause(reason) => next.paused = Some(reason.clone()),
            Action::Resume => {
                if next.paused.is_none() {
                    return Err("the model is not paused".into());
                }
                next.paused = None;
            }
            Action::Split(weights) => {
                if let Some(v) = weights.keys().find(|v| !serving(v)) {
                    return Err(format!("version {v} is not serving (serving {served:?})"));
                }
                next.split = weights.clone();
                next.check_split()?;
            }
            Action::Shadow(None) => {
                if next.shadow.take().is_none() {
                    return Err("no shadow traffic to stop".into());
                }
            }
            Action::Shadow(Some(shadow)) => {
                if !serving(&shadow.version) {
                    return Err(format!("version {} is not serving (serving {served:?})", shadow.version));
                }
                shadow.check()?;
                next.shadow = Some(shadow.clone());
            }
        }
        Ok(next)
    }

    /// The version a request that names none goes to under the split:
    /// the same `key` always lands on the same version while the weights
    /// stand. `None` when there is no split (the default serves).
    pub fn pick(&self, key: &[u8]) -> Option<u64> {
        let total: u64 = self.split.values().map(|w| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut point = fnv1a(key) % total;
        for (v, w) in &self.split {
            if point < u64::from(*w) {
                return Some(*v);
            }
            point -= u64::from(*w);
        }
        None
    }
}

/// A fast, stable hash (FNV-1a, 64 bits): stickiness must not change
/// across restarts or replicas, which the standard hasher does not promise.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promote_and_rollback_walk_the_history() {
        let none = Release::default();
        let promoted = none.apply(&Action::Promote(1), &[1, 2, 3], 3).expect("promote");
        assert_eq!((promoted.promoted, promoted.history.clone()), (Some(1), vec![3]));
        let back = promoted.apply(&Action::Rollback, &[1, 2, 3], 1).expect("rollback");
        assert_eq!(back.promoted, Some(3), "back to the default before the promote");
        let lower = none.apply(&Action::Rollback, &[1, 2, 3], 3).expect("rollback without history");
        assert_eq!(lower.promoted, Some(2), "the next lower served version");
        let err = none.apply(&Action::Rollback, &[1], 1).unwrap_err();
        assert!(err.contains("nothing to roll back to"), "{err}");
        let err = none.apply(&Action::Promote(7), &[1, 2], 2).unwrap_err();
        assert!(err.contains("version 7 is not serving"), "{err}");
    }

    #[test]
    fn pause_resume_and_split_are_checked() {
        let paused = Release::default().apply(&Action::Pause("bad answers".into()), &[1], 1).expect("pause");
        assert_eq!(paused.paused.as_deref(), Some("bad answers"));
        assert!(paused.apply(&Action::Resume, &[1], 1).expect("resume").paused.is_none());
        assert!(Release::default().apply(&Action::Resume, &[1], 1).is_err());
        let zero = Release::default().apply(&Action::Split([(1, 0)].into()), &[1], 1).unwrap_err();
        assert!(zero.contains("every weight is 0"), "{zero}");
        let unknown = Release::default().apply(&Action::Split([(9, 1)].into()), &[1], 1).unwrap_err();
        assert!(unknown.contains("version 9"), "{unknown}");
    }

    #[test]
    fn shadow_needs_a_served_version_and_bounded_share() {
        let on = Shadow { version: 2, sample: 0.5, max_inflight: 4 };
        let r = Release::default().apply(&Action::Shadow(Some(on.clone())), &[1, 2], 1).expect("shadow");
        assert_eq!(r.shadow, Some(on.clone()));
        assert!(r.apply(&Action::Shadow(None), &[1, 2], 1).expect("off").shadow.is_none());
        let bad = Shadow { sample: 0.0, ..on.clone() };
        assert!(
            Release::default().apply(&Action::Shadow(Some(bad)), &[1, 2], 1).unwrap_err().contains("shadow.sample")
        );
        let gone = Shadow { version: 9, ..on };
        assert!(Release::default().apply(&Action::Shadow(Some(gone)), &[1, 2], 1).unwrap_err().contains("version 9"));
    }

    #[test]
    fn a_split_is_sticky_per_key_and_close_to_its_weights() {
        let r = Release::default().apply(&Action::Split([(1, 90), (2, 10)].into()), &[1, 2], 2).expect("split");
        let mut counts = BTreeMap::new();
        for i in 0..10_000 {
            let key = format!("request-{i}");
            let v = r.pick(key.as_bytes()).expect("split");
            assert_eq!(r.pick(key.as_bytes()), Some(v), "the same key lands on the same version");
            *counts.entry(v).or_insert(0) += 1;
        }
        let share = f64::from(counts[&2]) / 10_000.0;
        assert!((0.08..0.12).contains(&share), "version 2 took {share}");
        assert_eq!(Release::default().pick(b"x"), None, "no split: the default serves");
    }

    #[test]
    fn the_file_round_trips_and_bad_files_name_the_field() {
        let r = Release { promoted: Some(2), split: [(1, 5)].into(), ..Default::default() };
        let text = serde_json::to_string(&r).expect("json");
        assert_eq!(Release::parse("release.json", &text).expect("parse"), r);
        let err = Release::parse("m/release.json", r#"{"split": {"1": 0}}"#).unwrap_err().to_string();
        assert!(err.contains("m/release.json") && err.contains("split"), "{err}");
        let err = Release::parse("m/release.json", r#"{"pasued": "x"}"#).unwrap_err().to_string();
        assert!(err.contains("pasued"), "{err}");
    }
}

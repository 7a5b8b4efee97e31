//! Which of a model's version folders are served: `version_policy` in
//! `model.toml`, named as Triton and TF Serving name it. Pure, so the
//! reloader and the start-up load agree and the rule is tested alone.

use serde::Deserialize;

/// `version_policy = { latest = N }`, `{ all = true }` or
/// `{ specific = [1, 3] }`. The default, as in Triton and TF Serving, is
/// the latest one: a new version folder replaces the one before it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum VersionPolicy {
    /// The N highest version numbers that load.
    Latest(u32),
    /// Every version folder (`all = true`).
    All(bool),
    /// Exactly these versions.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        Self::Latest(1)
    }
}

impl VersionPolicy {
    /// Refuses settings that could never serve anything.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Latest(0) => Err("field `version_policy.latest`: must be at least 1".into()),
            Self::All(false) => {
                Err("field `version_policy.all`: only `true` means something (use `latest` or `specific`)".into())
            }
            Self::Specific(v) if v.is_empty() => {
                Err("field `version_policy.specific`: list at least one version".into())
            }
            _ => Ok(()),
        }
    }

    /// The versions to serve out of `candidates` (the folders that are
    /// there and have not failed to load), highest last.
    pub fn select(&self, candidates: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut all: Vec<u64> = candidates.into_iter().collect();
        all.sort_unstable();
        all.dedup();
        match self {
            Self::Latest(n) => all.split_off(all.len().saturating_sub(*n as usize)),
            Self::All(_) => all,
            Self::Specific(wanted) => all.into_iter().filter(|v| wanted.contains(v)).collect(),
        }
    }

    /// How the policy reads in messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Latest(n) => format!("latest {n}"),
            Self::All(_) => "all".into(),
            Self::Specific(v) => format!("specific {v:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_all_and_specific_select_as_named() {
        assert_eq!(VersionPolicy::default().select([3, 1, 2]), vec![3]);
        assert_eq!(VersionPolicy::Latest(2).select([3, 1, 2]), vec![2, 3]);
        assert_eq!(VersionPolicy::Latest(5).select([2, 1]), vec![1, 2]);
        assert_eq!(VersionPolicy::All(true).select([2, 7, 1]), vec![1, 2, 7]);
        assert_eq!(VersionPolicy::Specific(vec![1, 9]).select([1, 2, 3]), vec![1]);
        assert!(VersionPolicy::Latest(1).select([]).is_empty());
    }

    #[test]
    fn policies_that_serve_nothing_are_refused_by_field() {
        assert!(VersionPolicy::Latest(0).check().unwrap_err().contains("version_policy.latest"));
        assert!(VersionPolicy::All(false).check().unwrap_err().contains("version_policy.all"));
        assert!(VersionPolicy::Specific(vec![]).check().unwrap_err().contains("version_policy.specific"));
        assert!(VersionPolicy::Specific(vec![2]).check().is_ok());
    }

    #[test]
    fn parses_from_model_toml_tables() {
        #[derive(Deserialize)]
        struct T {
            version_policy: VersionPolicy,
        }
        let parse = |s: &str| toml::from_str::<T>(s).map(|t| t.version_policy);
        assert_eq!(parse("version_policy = { latest = 2 }").expect("latest"), VersionPolicy::Latest(2));
        assert_eq!(parse("version_policy = { all = true }").expect("all"), VersionPolicy::All(true));
        assert_eq!(
            parse("[version_policy]\nspecific = [1, 3]").expect("specific"),
            VersionPolicy::Specific(vec![1, 3])
        );
        let err = parse("version_policy = { newest = 2 }").unwrap_err().to_string();
        assert!(err.contains("latest"), "{err}");
    }
}

//! The one list of model kinds: each kind's name, the files a version
//! folder must hold, how its `model.toml` section is checked and how it
//! loads. Adding a kind touches this list and the kind's own folder only;
//! nothing else matches on a kind.

use super::{LoadContext, Loaded, ModelError};

/// What `model.toml` parsing learns from a kind's section, for the
/// settings that depend on it (batch units, `max_batch_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SectionFacts {
    /// Text kinds: the most tokens per text. A batch is then sized in
    /// padded tokens rather than rows.
    pub max_tokens: Option<usize>,
}

/// One kind of model.
pub struct Kind {
    /// `kind = "..."` in `model.toml`, and the name of its own section.
    pub name: &'static str,
    /// Shown as `platform` in metadata.
    pub platform: &'static str,
    /// Files every version folder must hold. The first identifies the
    /// version: its sha256 is the `weights_sha256` every answer carries.
    pub files: &'static [&'static str],
    /// Parses and checks the kind's section (absent: its defaults); the
    /// message names the field.
    pub section: fn(Option<&toml::Value>) -> Result<SectionFacts, String>,
    pub load: fn(&LoadContext<'_>) -> Result<Loaded, ModelError>,
}

impl Kind {
    /// The file whose hash identifies a version.
    pub fn identity(&self) -> &'static str {
        self.files[0]
    }
}

/// Every kind this build can load.
pub fn kinds() -> Vec<&'static Kind> {
    #[allow(unused_mut)]
    let mut kinds = vec![&super::candle::mlp::KIND, &super::candle::bert::KIND];
    #[cfg(feature = "test-backends")]
    kinds.push(&super::test_backend::KIND);
    kinds
}

/// The kind called `name`.
pub fn find(name: &str) -> Option<&'static Kind> {
    kinds().into_iter().find(|k| k.name == name)
}

/// The message for a kind this build does not have.
pub fn unknown(name: &str) -> String {
    let known: Vec<&str> = kinds().iter().map(|k| k.name).collect();
    format!("field `kind`: unknown kind {name:?}; this build has {}", known.join(", "))
}

/// Every file some kind reads from a version folder; the repository
/// ignores the rest.
pub fn known_files() -> Vec<&'static str> {
    let mut files: Vec<&str> = kinds().iter().flat_map(|k| k.files.iter().copied()).collect();
    files.sort_unstable();
    files.dedup();
    files
}

/// Deserializes a kind's section with its defaults when absent, naming the
/// section in errors.
pub fn section<T: serde::de::DeserializeOwned + Default>(name: &str, value: Option<&toml::Value>) -> Result<T, String> {
    match value {
        None => Ok(T::default()),
        Some(v) => v.clone().try_into().map_err(|e: toml::de::Error| format!("section `[{name}]`: {}", e.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_kind_names_its_files() {
        let kinds = kinds();
        for (i, k) in kinds.iter().enumerate() {
            assert!(!k.files.is_empty(), "{} names no identity file", k.name);
            assert!(kinds[..i].iter().all(|o| o.name != k.name), "{} registered twice", k.name);
        }
        assert!(known_files().contains(&"tokenizer.json"));
        assert!(unknown("onnx").contains("unknown kind \"onnx\"; this build has mlp, bert"));
    }
}

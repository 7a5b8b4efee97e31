//! API keys: each maps to a tenant and the models it may call. A key is
//! `kiln_<id>_<secret>`; the keys file holds its id, tenant, models and the
//! SHA-256 of the whole key, never the key. The secret part is 256 random
//! bits, so a fast hash is enough: there is nothing to guess.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::secret::{Secret, digest_eq, hex, sha256, unhex};
use crate::config::ConfigError;

const PREFIX: &str = "kiln_";
const ID_BYTES: usize = 4;
const SECRET_BYTES: usize = 32;

/// One `[[key]]` of the keys file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The key's public part: it names the caller in logs and `admins`.
    pub id: String,
    /// The tenant whose budget the key spends.
    pub tenant: String,
    /// Models the key may call; empty means every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// SHA-256 of the whole key, hex.
    pub sha256: String,
}

impl KeyEntry {
    pub fn may_call(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

/// The keys a server accepts, by id.
#[derive(Debug, Default)]
pub struct KeyRing {
    /// Shared, so that naming the caller of each call copies no strings.
    by_id: HashMap<String, (Arc<KeyEntry>, [u8; 32])>,
}

/// Tenant, model and key-id names: printable, no quotes or spaces, so that
/// they can be metric labels and log fields as they are.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
}

impl KeyRing {
    /// Parses a keys file's text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let parsed: KeysFile = toml::from_str(text).map_err(|e| ConfigError::new(file, e.to_string()))?;
        let mut by_id = HashMap::new();
        for (i, entry) in parsed.key.into_iter().enumerate() {
            let at = |field: &str, what: &str| ConfigError::new(file, format!("key {} field `{field}`: {what}", i + 1));
            for (field, value) in [("id", &entry.id), ("tenant", &entry.tenant)] {
                if !valid_name(value) {
                    return Err(at(field, "must be 1 to 128 of A-Z a-z 0-9 - _ . : @"));
                }
            }
            let Some(digest) = unhex::<32>(&entry.sha256) else {
                return Err(at("sha256", "must be 64 hex digits (what `kiln keys new` prints)"));
            };
            let id = entry.id.clone();
            if by_id.insert(id.clone(), (Arc::new(entry), digest)).is_some() {
                return Err(at("id", &format!("'{id}' appears twice")));
            }
        }
        Ok(Self { by_id })
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The entry of `presented` if it is one of the keys, compared in
    /// constant time against the stored digest.
    pub fn verify(&self, presented: &str) -> Option<&Arc<KeyEntry>> {
        let id = presented.strip_prefix(PREFIX)?.split('_').next()?;
        let (entry, digest) = self.by_id.get(id)?;
        digest_eq(&sha256(presented.as_bytes()), digest).then_some(entry)
    }
}

/// A freshly generated key: shown once, stored only as its entry.
pub struct NewKey {
    pub key: Secret,
    pub entry: KeyEntry,
}

/// Generates a key for `tenant`, limited to `models` (empty: all).
pub fn generate(tenant: &str, models: Vec<String>) -> NewKey {
    let id = hex(&rand::random::<[u8; ID_BYTES]>());
    let key = format!("{PREFIX}{id}_{}", hex(&rand::random::<[u8; SECRET_BYTES]>()));
    let entry = KeyEntry { id, tenant: tenant.to_string(), models, sha256: hex(&sha256(key.as_bytes())) };
    NewKey { key: Secret::new(key), entry }
}

/// The entry as the keys file's TOML, to append.
pub fn entry_toml(entry: &KeyEntry) -> String {
    #[derive(Serialize)]
    struct One<'a> {
        key: [&'a KeyEntry; 1],
    }
    toml::to_string(&One { key: [entry] }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_verifies_through_its_printed_entry_and_nothing_else_does() {
        let new = generate("checkout", vec!["risk".into()]);
        let text = entry_toml(&new.entry);
        assert!(!text.contains(new.key.expose()), "the file never holds the key");
        let ring = KeyRing::parse("keys.toml", &text).expect("parses");
        let entry = ring.verify(new.key.expose()).expect("accepted");
        assert_eq!(
            (entry.tenant.as_str(), entry.may_call("risk"), entry.may_call("minilm")),
            ("checkout", true, false)
        );
        let key = new.key.expose();
        let mut flipped = key.to_string().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        for wrong in [&key[..key.len() - 1], std::str::from_utf8(&flipped).expect("ascii"), "", "kiln_", "Bearer"] {
            assert!(ring.verify(wrong).is_none(), "{wrong}");
        }
    }

    #[test]
    fn bad_files_name_the_key_and_field() {
        let digest = "a".repeat(64);
        for (text, expected) in [
            (format!("[[key]]\nid = \"a b\"\ntenant = \"t\"\nsha256 = \"{digest}\"\n"), "key 1 field `id`"),
            (format!("[[key]]\nid = \"a\"\ntenant = \"\"\nsha256 = \"{digest}\"\n"), "key 1 field `tenant`"),
            ("[[key]]\nid = \"a\"\ntenant = \"t\"\nsha256 = \"xyz\"\n".to_string(), "key 1 field `sha256`"),
            (
                format!(
                    "[[key]]\nid = \"a\"\ntenant = \"t\"\nsha256 = \"{digest}\"\n[[key]]\nid = \"a\"\ntenant = \"u\"\nsha256 = \"{digest}\"\n"
                ),
                "'a' appears twice",
            ),
            ("[[key]]\nid = \"a\"\n".to_string(), "missing field"),
        ] {
            let err = KeyRing::parse("keys.toml", &text).expect_err(&text).to_string();
            assert!(err.contains(expected) && err.starts_with("keys.toml"), "{text}: {err}");
        }
    }
}

//! Who is calling: an API key (`authorization: Bearer <key>` or
//! `x-api-key`), or under mutual TLS a client certificate whose common name
//! names the tenant. With auth on, the caller's tenant is the only tenant
//! it may spend; with auth off, a tenant name is the client's claim.
//! Admin calls need the admin token or an identity listed as an admin.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::keys::{KeyEntry, KeyRing};
use super::secret::Secret;
use crate::config::{AuthConfig, ConfigError};
use crate::error::InferError;

/// The tenant of traffic that names none while auth is off: a budget of
/// its own in `[tenants.default]`, so naming no tenant escapes nothing.
pub const DEFAULT_TENANT: &str = "default";

/// The verified common name of a client certificate (mutual TLS), put
/// on each request of its connection.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    pub common_name: Option<String>,
}

/// An authenticated (or, with auth off, anonymous) caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Auth is off: nothing is known of the caller.
    Anonymous,
    Key(Arc<KeyEntry>),
    /// A client certificate whose common name is the tenant.
    Certificate(String),
}

impl Caller {
    /// The name `[auth] admins` lists: `key:<id>` or `cert:<common name>`.
    pub fn identity(&self) -> Option<String> {
        match self {
            Self::Anonymous => None,
            Self::Key(k) => Some(format!("key:{}", k.id)),
            Self::Certificate(name) => Some(format!("cert:{name}")),
        }
    }

    fn tenant(&self) -> Option<&str> {
        match self {
            Self::Anonymous => None,
            Self::Key(k) => Some(&k.tenant),
            Self::Certificate(name) => Some(name),
        }
    }

    /// Refuses a model the caller's key does not list.
    pub fn permit(&self, model: &str) -> Result<(), InferError> {
        match self {
            Self::Key(k) if !k.may_call(model) => Err(InferError::PermissionDenied(format!(
                "API key '{}' may not call model '{model}' (it may call: {})",
                k.id,
                k.models.join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// The tenant a request spends: an authenticated caller's own (the
    /// `tenant` parameter and `x-kiln-tenant` may only repeat it), else
    /// what the request claims, else [`DEFAULT_TENANT`].
    pub fn tenant_for(&self, parameter: Option<&str>, header: Option<&str>) -> Result<String, InferError> {
        let Some(own) = self.tenant() else {
            return Ok(parameter.or(header).unwrap_or(DEFAULT_TENANT).to_string());
        };
        for (source, named) in [("parameter 'tenant'", parameter), ("metadata 'x-kiln-tenant'", header)] {
            if let Some(named) = named
                && named != own
            {
                return Err(InferError::PermissionDenied(format!(
                    "{source} names tenant '{named}', but this caller is tenant '{own}': omit it or name '{own}'"
                )));
            }
        }
        Ok(own.to_string())
    }
}

/// The credential a call carries, if any.
fn credential(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, rest) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

const HOW: &str = "send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'";

/// The server's authentication settings, with the keys reloaded live.
pub struct Auth {
    keys: Option<RwLock<Arc<KeyRing>>>,
    keys_file: Option<PathBuf>,
    tenant_from_client_cert: bool,
    admins: Vec<String>,
    admin_token: Option<Secret>,
    admin_insecure: bool,
}

impl Auth {
    /// Reads the keys file (an error stops the start).
    pub fn new(config: &AuthConfig, admin_token: Option<Secret>, admin_insecure: bool) -> Result<Self, ConfigError> {
        let keys = match &config.keys_file {
            None => None,
            Some(path) => Some(RwLock::new(Arc::new(read_keys(path)?))),
        };
        Ok(Self {
            keys,
            keys_file: config.keys_file.clone(),
            tenant_from_client_cert: config.tenant_from_client_cert,
            admins: config.admins.clone(),
            admin_token,
            admin_insecure,
        })
    }

    /// Whether calls must name their caller.
    pub fn enabled(&self) -> bool {
        self.keys.is_some() || self.tenant_from_client_cert
    }

    /// Reloads the keys file whenever it changes; a file that does not
    /// parse is logged and the keys in use are kept.
    pub fn watch(self: &Arc<Self>) {
        let Some(path) = self.keys_file.clone() else { return };
        let auth = self.clone();
        super::watch::spawn(vec![path.clone()], move |contents| {
            let parsed = match contents.into_iter().next() {
                Some(Ok(bytes)) => KeyRing::parse(&path.display().to_string(), &String::from_utf8_lossy(&bytes)),
                Some(Err(e)) => Err(ConfigError::new(path.display().to_string(), format!("cannot read: {e}"))),
                None => return,
            };
            match (parsed, &auth.keys) {
                (Ok(ring), Some(keys)) => {
                    tracing::info!(keys = ring.len(), file = %path.display(), "API keys reloaded");
                    *keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ring);
                }
                (Err(e), _) => tracing::warn!(error = %e, "API keys not reloaded: keeping the keys in use"),
                (Ok(_), None) => {}
            }
        });
    }

    /// Who is calling. With auth off every caller is anonymous.
    pub fn caller(&self, headers: &http::HeaderMap, cert: Option<&ClientCertificate>) -> Result<Caller, InferError> {
        if !self.enabled() {
            return Ok(Caller::Anonymous);
        }
        if let Some(given) = credential(headers) {
            return self.key(given).map(Caller::Key).ok_or_else(|| {
                InferError::Unauthenticated(format!("API key not accepted: it is not one of this server's keys; {HOW}"))
            });
        }
        if self.tenant_from_client_cert
            && let Some(name) = cert.and_then(|c| c.common_name.as_ref())
        {
            return Ok(Caller::Certificate(name.clone()));
        }
        Err(InferError::Unauthenticated(format!("this server requires an API key: {HOW}")))
    }

    fn key(&self, given: &str) -> Option<Arc<KeyEntry>> {
        let keys = self.keys.as_ref()?.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        keys.verify(given).cloned()
    }

    /// Admits an admin call: the admin token, or a caller listed in
    /// `[auth] admins`, or `--admin-insecure`. Names who it was, for logs.
    pub fn admin(&self, headers: &http::HeaderMap, cert: Option<&ClientCertificate>) -> Result<Admin, InferError> {
        if self.admin_insecure {
            return Ok(Admin("anyone (--admin-insecure)".into()));
        }
        if self.admin_token.is_none() && self.admins.is_empty() {
            return Err(InferError::PermissionDenied(
                "the admin service is closed: the server has no admin token and no [auth] admins (use \
                 --admin-insecure only for local use)"
                    .into(),
            ));
        }
        let given = credential(headers);
        if let (Some(token), Some(given)) = (&self.admin_token, given)
            && token.matches(given.as_bytes())
        {
            return Ok(Admin("the admin token".into()));
        }
        match self.caller(headers, cert) {
            Ok(caller) => match caller.identity() {
                Some(id) if self.admins.contains(&id) => Ok(Admin(id)),
                Some(id) => Err(InferError::PermissionDenied(format!("'{id}' is not an admin ([auth] admins)"))),
                None if given.is_some() => Err(InferError::Unauthenticated("admin credentials not accepted".into())),
                None => Err(InferError::Unauthenticated(
                    "admin calls need metadata 'authorization: Bearer <admin token or admin key>'".into(),
                )),
            },
            Err(_) if given.is_some() => Err(InferError::Unauthenticated("admin credentials not accepted".into())),
            Err(_) => Err(InferError::Unauthenticated(
                "admin calls need metadata 'authorization: Bearer <admin token or admin key>'".into(),
            )),
        }
    }
}

/// Who an admin call came from, as logs name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin(pub String);

/// Reads and parses a keys file.
fn read_keys(path: &std::path::Path) -> Result<KeyRing, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&file, format!("cannot read: {e}")))?;
    KeyRing::parse(&file, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::keys::{entry_toml, generate};

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), v.parse().expect("header"))).collect()
    }

    fn with_keys(admins: &[&str], token: Option<&str>) -> (Auth, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (generate("checkout", vec!["risk".into()]), generate("ops", vec![]));
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, entry_toml(&a.entry) + &entry_toml(&b.entry)).expect("write");
        let config = AuthConfig {
            keys_file: Some(path),
            admins: admins.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let auth = Auth::new(&config, token.map(Secret::new), false).expect("auth");
        (auth, a.key.expose().to_string(), dir)
    }

    #[test]
    fn keys_name_the_caller_and_its_tenant() {
        let (auth, key, _dir) = with_keys(&[], None);
        let bearer = format!("Bearer {key}");
        for h in [headers(&[("authorization", &bearer)]), headers(&[("x-api-key", &key)])] {
            let caller = auth.caller(&h, None).expect("accepted");
            assert_eq!(caller.tenant_for(None, None).expect("own"), "checkout");
            assert_eq!(caller.tenant_for(Some("checkout"), Some("checkout")).expect("repeated"), "checkout");
            let err = caller.tenant_for(None, Some("search")).expect_err("spoofed");
            assert!(matches!(err, InferError::PermissionDenied(_)) && err.to_string().contains("x-kiln-tenant"));
            caller.permit("risk").expect("listed");
            assert!(matches!(caller.permit("minilm"), Err(InferError::PermissionDenied(_))));
        }
        for h in [headers(&[]), headers(&[("authorization", "Bearer kiln_00000000_00")]), headers(&[("x-api-key", "")])]
        {
            let err = auth.caller(&h, None).expect_err("refused");
            assert!(matches!(err, InferError::Unauthenticated(_)), "{err}");
            assert!(!err.to_string().contains("kiln_0000"), "never echoes what was sent: {err}");
        }
    }

    #[test]
    fn without_auth_a_tenant_is_a_claim_and_none_is_default() {
        let caller = Caller::Anonymous;
        assert_eq!(caller.tenant_for(None, None).expect("default"), DEFAULT_TENANT);
        assert_eq!(caller.tenant_for(Some("a"), Some("b")).expect("claim"), "a");
        assert_eq!(caller.tenant_for(None, Some("b")).expect("claim"), "b");
    }

    #[test]
    fn admin_needs_the_token_or_a_listed_identity() {
        let token = "an-admin-token-of-some-length";
        let (auth, key, _dir) = with_keys(&[], Some(token));
        auth.admin(&headers(&[("authorization", &format!("Bearer {token}"))]), None).expect("token");
        let as_key = auth.admin(&headers(&[("x-api-key", &key)]), None).expect_err("an ordinary key");
        assert!(matches!(as_key, InferError::PermissionDenied(_)), "{as_key}");
        let wrong = auth.admin(&headers(&[("authorization", "Bearer nope")]), None).expect_err("wrong");
        assert!(matches!(wrong, InferError::Unauthenticated(_)), "{wrong}");
        let none = auth.admin(&headers(&[]), None).expect_err("nothing");
        assert!(matches!(none, InferError::Unauthenticated(_)), "{none}");

        let (auth, _, _dir) = with_keys(&[], None);
        let closed = auth.admin(&headers(&[]), None).expect_err("closed");
        assert!(closed.to_string().contains("closed"), "{closed}");
    }

    #[test]
    fn a_listed_admin_key_is_admitted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = generate("ops", vec![]);
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, entry_toml(&admin.entry)).expect("write");
        let config =
            AuthConfig { keys_file: Some(path), admins: vec![format!("key:{}", admin.entry.id)], ..Default::default() };
        let auth = Auth::new(&config, None, false).expect("auth");
        auth.admin(&headers(&[("x-api-key", admin.key.expose())]), None).expect("listed");
        let open = Auth::new(&AuthConfig::default(), None, true).expect("auth");
        open.admin(&headers(&[]), None).expect("--admin-insecure");
    }
}

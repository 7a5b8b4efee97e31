//! The server's own configuration: what `kiln::serve` needs, merged from
//! flags and the `--config` file (tenants, `[request_log]`, `[limits]`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, LimitsConfig, MAX_DURATION_MS};
use crate::security::Secret;

/// The shortest admin token accepted: 16 characters of a random token
/// (`openssl rand -hex 32` gives 64) leave nothing to guess online.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// `[tls]`, or `--tls-cert`/`--tls-key`/`--tls-client-ca`: TLS on every
/// listener; with a client CA, mutual TLS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's own first. Reloaded on change.
    pub cert: PathBuf,
    /// PEM private key of the first certificate. Reloaded on change.
    pub key: PathBuf,
    /// PEM CA certificates: when set, every client must present a
    /// certificate one of them signed.
    pub client_ca: Option<PathBuf>,
}

/// `[auth]`: who may call.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// TOML file of `[[key]]` entries (`kiln keys new` prints them):
    /// with it, every call but health checks needs an API key. Reloaded
    /// when it changes.
    pub keys_file: Option<PathBuf>,
    /// Identities that may call the admin service: `key:<id>` or
    /// `cert:<common name>`.
    #[serde(default)]
    pub admins: Vec<String>,
    /// Under mutual TLS, a client certificate's common name is its tenant
    /// (and calls without a key are let in on the certificate).
    #[serde(default)]
    pub tenant_from_client_cert: bool,
    /// File holding the admin token (the `KILN_ADMIN_TOKEN` environment
    /// variable is the other way in).
    pub admin_token_file: Option<PathBuf>,
}

/// Reads a secret from a file: surrounding whitespace trimmed, and
/// refused when empty.
pub fn read_secret_file(path: &std::path::Path, what: &str) -> Result<Secret, ConfigError> {
    let file = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::new(&file, format!("cannot read {what}: {e}")))?;
    let secret = Secret::new(text.trim());
    if secret.is_empty() {
        return Err(ConfigError::new(file, format!("{what} file is empty")));
    }
    Ok(secret)
}

/// Default bound on one gRPC message, both directions: gRPC's own default.
/// The largest request the built-in models take is far smaller (64 risk
/// rows are 8 KiB; 64 MiniLM texts at their `max_text_bytes` are 1 MiB), and
/// every byte of a message is held for the whole call, so a larger bound
/// only buys room for abuse. Raise it for models with big tensors.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The largest `max_message_bytes` gRPC framing can carry (a u32 length).
pub const MAX_MESSAGE_BYTES_LIMIT: usize = u32::MAX as usize;

/// Where the models come from.
#[derive(Debug, Clone)]
pub enum RepositorySource {
    /// The repository compiled into the binary (the `risk` model).
    BuiltIn,
    /// A folder of `NAME/model.toml` + `NAME/VERSION/...`.
    Dir(PathBuf),
}

impl std::fmt::Display for RepositorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BuiltIn => f.write_str("<built-in>"),
            Self::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// How the served set follows the repository (Triton's model control
/// modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelControl {
    /// The folder is looked at every `repository_poll`: new versions load,
    /// removed ones unload, a changed `model.toml` applies.
    Poll,
    /// Changes apply only through RepositoryModelLoad / RepositoryModelUnload.
    Explicit,
}

/// Default interval between looks at a polled repository.
pub const DEFAULT_REPOSITORY_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// A tenant's compute budget: a token bucket of compute-seconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Compute-seconds per second the tenant may spend on average (0.5 =
    /// half of one executor's time).
    pub budget: f64,
    /// Compute-seconds it may spend in a burst above the average.
    pub burst: f64,
}

/// Everything `kiln::serve` needs to know, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub repository: RepositorySource,
    /// `None`: poll a folder, explicit for the built-in repository (it
    /// cannot change on disk).
    pub model_control: Option<ModelControl>,
    /// Interval between looks at the repository under `poll`.
    pub repository_poll: std::time::Duration,
    /// JSON-lines file every admin action is appended to (the server log
    /// has each line too).
    pub audit_log: Option<PathBuf>,
    /// Tenants with a compute budget. A tenant not listed spends
    /// `default`'s budget when `default` is listed, else is not limited.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Upper bound on one request or response message, in bytes.
    pub max_message_bytes: usize,
    /// How long a shutdown may take to answer what was admitted; past it
    /// the rest is answered UNAVAILABLE. Below Kubernetes' default 30 s
    /// termination grace period, so a drain ends before SIGKILL.
    pub drain_timeout: std::time::Duration,
    /// Threads that tokenize text requests before they queue.
    pub prepare_threads: usize,
    /// Threads per model computation: a count, or chosen by timing.
    pub model_threads: crate::model::threads::ModelThreads,
    /// Bearer token the admin service accepts.
    pub admin_token: Option<Secret>,
    /// Opens the admin service to anyone (local use only).
    pub admin_insecure: bool,
    /// TLS on every listener.
    pub tls: Option<TlsConfig>,
    /// API keys, admins, tenants from client certificates.
    pub auth: AuthConfig,
    /// The sampled request log, when configured.
    pub request_log: Option<RequestLogConfig>,
    /// Bytes in flight, connections, HTTP/2 settings and timeouts.
    pub limits: LimitsConfig,
}

impl ServeConfig {
    /// The model control mode in effect.
    pub fn control(&self) -> ModelControl {
        match (self.model_control, &self.repository) {
            (Some(mode), _) => mode,
            (None, RepositorySource::Dir(_)) => ModelControl::Poll,
            (None, RepositorySource::BuiltIn) => ModelControl::Explicit,
        }
    }

    /// Checks the merged settings (flags over file) before anything starts.
    pub fn check(&self) -> Result<(), ConfigError> {
        let here = "server config";
        if !(1..=MAX_MESSAGE_BYTES_LIMIT).contains(&self.max_message_bytes) {
            return Err(ConfigError::new(
                here,
                format!("`max_message_bytes`: must be 1 to {MAX_MESSAGE_BYTES_LIMIT}, got {}", self.max_message_bytes),
            ));
        }
        if self.drain_timeout.is_zero() || self.drain_timeout > std::time::Duration::from_millis(MAX_DURATION_MS) {
            return Err(ConfigError::new(
                here,
                format!(
                    "`drain_timeout`: must be above 0 and at most {MAX_DURATION_MS} ms, got {:?}",
                    self.drain_timeout
                ),
            ));
        }
        if self.repository_poll < std::time::Duration::from_millis(10)
            || self.repository_poll > std::time::Duration::from_millis(MAX_DURATION_MS)
        {
            return Err(ConfigError::new(
                here,
                format!(
                    "`repository_poll_ms`: must be 10 to {MAX_DURATION_MS} ms, got {}",
                    self.repository_poll.as_millis()
                ),
            ));
        }
        if self.control() == ModelControl::Poll && matches!(self.repository, RepositorySource::BuiltIn) {
            return Err(ConfigError::new(
                here,
                "`model_control = poll`: the built-in repository cannot change; serve a folder (--repo) to poll it",
            ));
        }
        if let Some(token) = &self.admin_token
            && token.len() < MIN_ADMIN_TOKEN_CHARS
        {
            return Err(ConfigError::new(
                here,
                format!("admin token: must be at least {MIN_ADMIN_TOKEN_CHARS} characters"),
            ));
        }
        if self.auth.tenant_from_client_cert && self.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            return Err(ConfigError::new(
                here,
                "`auth.tenant_from_client_cert`: needs mutual TLS (a client CA: --tls-client-ca or `tls.client_ca`)",
            ));
        }
        for admin in &self.auth.admins {
            if !(admin.starts_with("key:") || admin.starts_with("cert:")) {
                return Err(ConfigError::new(
                    here,
                    format!("`auth.admins`: '{admin}' must be key:<key id> or cert:<common name>"),
                ));
            }
        }
        if let Some(log) = &self.request_log {
            log.check_key(here)?;
        }
        self.limits.check(self.max_message_bytes).map_err(|m| ConfigError::new(here, m))
    }
}

/// How a logged request's inputs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputLogMode {
    /// Not at all: keep only what is needed.
    #[default]
    None,
    /// A keyed HMAC-SHA256 of each input: equal inputs link, values cannot
    /// be recovered by hashing guesses without the key.
    Hash,
    /// The values themselves.
    Full,
}

/// `[request_log]` section of the server config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLogConfig {
    /// JSON-lines file; rotated to `FILE.1`, `FILE.2`, ... past `max_bytes`.
    pub path: PathBuf,
    /// Log outputs when `inputs = "none"` (they are always logged with
    /// inputs): by default a log without inputs holds no outputs either.
    #[serde(default)]
    pub outputs: Option<bool>,
    /// Share of answered requests logged, in [0, 1].
    #[serde(default = "crate::config::defaults::log_sample_rate")]
    pub sample_rate: f64,
    /// Size at which the file is rotated.
    #[serde(default = "crate::config::defaults::log_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept besides the live one.
    #[serde(default = "crate::config::defaults::log_keep_files")]
    pub keep_files: usize,
    #[serde(default)]
    pub inputs: InputLogMode,
    /// HMAC key for `inputs = "hash"`; the `KILN_REQUEST_LOG_KEY`
    /// environment variable is read when absent, so it need not sit in a file.
    pub hmac_key: Option<Secret>,
}

impl RequestLogConfig {
    fn check(&mut self, file: &str) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(ConfigError::new(
                file,
                format!("field `request_log.sample_rate`: must be in [0, 1], got {}", self.sample_rate),
            ));
        }
        if self.max_bytes == 0 {
            return Err(ConfigError::new(file, "field `request_log.max_bytes`: must be at least 1"));
        }
        // Each rotation renames every kept file.
        if self.keep_files > 1000 {
            return Err(ConfigError::new(
                file,
                format!("field `request_log.keep_files`: at most 1000, got {}", self.keep_files),
            ));
        }
        if self.hmac_key.is_none() {
            self.hmac_key = std::env::var("KILN_REQUEST_LOG_KEY").ok().map(Secret::new);
        }
        self.check_key(file)
    }

    /// Whether outputs are logged.
    pub fn logs_outputs(&self) -> bool {
        self.outputs.unwrap_or(self.inputs != InputLogMode::None)
    }

    /// An empty key is refused from every source (file, environment, a
    /// config built in code); hashing needs one.
    pub fn check_key(&self, file: &str) -> Result<(), ConfigError> {
        if self.hmac_key.as_ref().is_some_and(Secret::is_empty) {
            return Err(ConfigError::new(
                file,
                "field `request_log.hmac_key` (or KILN_REQUEST_LOG_KEY): must not be empty; an empty key is no key",
            ));
        }
        if self.inputs == InputLogMode::Hash && self.hmac_key.is_none() {
            return Err(ConfigError::new(
                file,
                "field `request_log.hmac_key`: `inputs = \"hash\"` needs a key (or KILN_REQUEST_LOG_KEY); an \
                 unkeyed hash of a few numbers can be reversed by trying values",
            ));
        }
        Ok(())
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            repository: RepositorySource::BuiltIn,
            model_control: None,
            repository_poll: DEFAULT_REPOSITORY_POLL,
            audit_log: None,
            tenants: BTreeMap::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            drain_timeout: std::time::Duration::from_secs(25),
            prepare_threads: 1,
            model_threads: crate::model::threads::ModelThreads::Auto,
            admin_token: None,
            admin_insecure: false,
            tls: None,
            auth: AuthConfig::default(),
            request_log: None,
            limits: LimitsConfig::default(),
        }
    }
}

/// The file given to `kiln serve --config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// `poll` or `explicit` (`--model-control`).
    pub model_control: Option<ModelControl>,
    /// Milliseconds between looks at a polled repository.
    pub repository_poll_ms: Option<u64>,
    /// JSON-lines file of admin actions (`--audit-log`).
    pub audit_log: Option<PathBuf>,
    /// Overrides the default message size bound.
    pub max_message_bytes: Option<usize>,
    /// `[tenants.NAME]` sections: `budget` and `burst` in compute-seconds.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// `[tls]`: certificate, key, client CA.
    pub tls: Option<TlsConfig>,
    /// `[auth]`: API keys, admins, the admin token's file.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[request_log]`: the sampled request log.
    pub request_log: Option<RequestLogConfig>,
    /// `[limits]`: bytes in flight, connections, HTTP/2 settings, timeouts.
    #[serde(default)]
    pub limits: LimitsConfig,
}

impl ServerFile {
    /// Reads and checks a server config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&file, format!("cannot read: {e}")))?;
        let mut parsed: Self = toml::from_str(&text).map_err(|e| ConfigError::new(&file, e.to_string()))?;
        if let Some(log) = parsed.request_log.as_mut() {
            log.check(&file)?;
        }
        if let Some(bytes) = parsed.max_message_bytes
            && !(1..=MAX_MESSAGE_BYTES_LIMIT).contains(&bytes)
        {
            return Err(ConfigError::new(
                file,
                format!("field `max_message_bytes`: must be 1 to {MAX_MESSAGE_BYTES_LIMIT}, got {bytes}"),
            ));
        }
        parsed
            .limits
            .check(parsed.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES))
            .map_err(|m| ConfigError::new(&file, m))?;
        for (name, t) in &parsed.tenants {
            for (field, value) in [("budget", t.budget), ("burst", t.burst)] {
                if !(value.is_finite() && value > 0.0) {
                    return Err(ConfigError::new(
                        &file,
                        format!(
                            "field `tenants.{name}.{field}`: must be a positive number of compute-seconds, got {value}"
                        ),
                    ));
                }
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_file_limits_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kiln.toml");
        for (text, field) in [
            ("[limits]\nbody_timeout_ms = 0\n", "`limits.body_timeout_ms`"),
            ("[limits]\nmax_inflight_bytes = 10\n", "`limits.max_inflight_bytes`"),
            ("max_message_bytes = 0\n", "`max_message_bytes`"),
            ("[limits]\nconnections = 3\n", "connections"),
        ] {
            std::fs::write(&path, text).expect("write");
            let err = ServerFile::load(&path).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        std::fs::write(&path, "[limits]\nmax_connections = 8\nidle_timeout_ms = 100\n").expect("write");
        let limits = ServerFile::load(&path).expect("valid").limits;
        assert_eq!((limits.max_connections, limits.idle_timeout_ms), (8, 100));
        assert_eq!(limits.body_timeout_ms, LimitsConfig::default().body_timeout_ms);
    }
}

//! The `kiln` commands, one file each; `main.rs` parses the command line
//! and calls one of them. What they share: the client target, writing
//! reports, the one place that sets the model's thread count.

pub mod admin;
pub mod bench;
pub mod certs;
pub mod drift;
pub mod health;
pub mod infer;
pub mod keys;
pub mod plan;
pub mod profile;
pub mod repository;
pub mod serve;

use std::io::Write;

/// Which server and model a client command talks to.
#[derive(clap::Args)]
pub struct Target {
    /// Server address, host:port.
    #[arg(long, env = "KILN_URL", default_value = "127.0.0.1:8001")]
    pub url: String,
    /// Model name.
    #[arg(long, env = "KILN_MODEL")]
    pub model: String,
    /// Model version; the model's default when absent.
    #[arg(long, default_value = "")]
    pub version: String,
    #[command(flatten)]
    pub security: ClientSecurity,
}

/// TLS and the credential a client command sends.
#[derive(clap::Args)]
pub struct ClientSecurity {
    /// CA certificate (PEM) that signed the server's: connect with TLS.
    #[arg(long, env = "KILN_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for a server that requires mutual TLS.
    #[arg(long = "tls-cert", env = "KILN_TLS_CLIENT_CERT", requires = "tls_ca")]
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long = "tls-key", env = "KILN_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<std::path::PathBuf>,
    /// File holding the API key to send (`authorization: Bearer`); the
    /// `KILN_API_KEY` environment variable is the other way in.
    #[arg(long, env = "KILN_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
}

impl ClientSecurity {
    /// The TLS settings and the key to send: from --api-key-file, else
    /// `KILN_API_KEY`, else `fallback_env` when given (the admin token).
    pub fn credentials(&self, fallback_env: Option<&str>) -> anyhow::Result<kiln::client::Credentials> {
        let tls = self.tls_ca.as_ref().map(|ca| kiln::client::ClientTls {
            ca: ca.clone(),
            cert: self.tls_client_cert.clone(),
            key: self.tls_client_key.clone(),
        });
        let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let bearer = match &self.api_key_file {
            Some(path) => Some(kiln::config::read_secret_file(path, "API key")?),
            None => from_env("KILN_API_KEY")
                .or_else(|| fallback_env.and_then(from_env))
                .map(|v| kiln::security::Secret::new(v.trim())),
        };
        Ok(kiln::client::Credentials { tls, bearer })
    }
}

/// The server an operator command talks to, and as whom.
#[derive(clap::Args)]
pub struct AdminTarget {
    /// Server address, host:port.
    #[arg(long, env = "KILN_URL", default_value = "127.0.0.1:8001", global = true)]
    pub url: String,
    #[command(flatten)]
    pub security: ClientSecurity,
    /// File holding the admin token; also the `KILN_ADMIN_TOKEN`
    /// environment variable, or an admin's API key.
    #[arg(long, env = "KILN_ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<std::path::PathBuf>,
}

impl AdminTarget {
    /// The admin credentials (see [`admin_credentials`]).
    pub fn credentials(&self) -> anyhow::Result<kiln::client::Credentials> {
        admin_credentials(&self.security, self.admin_token_file.as_deref())
    }
}

/// Credentials for an admin call: the admin token from `token_file`, else
/// `KILN_ADMIN_TOKEN`, else an admin's API key (--api-key-file,
/// `KILN_API_KEY`).
pub fn admin_credentials(
    security: &ClientSecurity,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<kiln::client::Credentials> {
    let mut credentials = security.credentials(None)?;
    if let Some(path) = token_file {
        credentials.bearer = Some(kiln::config::read_secret_file(path, "admin token")?);
    } else if let Some(token) = std::env::var("KILN_ADMIN_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        credentials.bearer = Some(kiln::security::Secret::new(token.trim()));
    }
    Ok(credentials)
}

/// Writes a report to standard output. A reader that went away (`| head`)
/// is not an error worth a panic: the rest is simply not wanted.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("[{:?}] {}", s.code(), s.message())
}

/// Sets the CPU threads one model computation may use (candle and rayon
/// read `RAYON_NUM_THREADS` when their pools start). Called before the
/// command starts any thread.
pub fn set_model_threads(threads: usize) {
    // SAFETY: called first thing in a command, before any other thread
    // exists, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string()) };
}

/// A multi-threaded runtime with every driver, for commands that drive
/// load or serve.
pub fn multi_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// A one-thread runtime, for commands that make a call or two.
pub fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

//! `kiln serve`: the server config merged from flags, environment and the
//! `--config` file, checked before anything binds, served until SIGINT or
//! SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kiln::config::{DEFAULT_MAX_MESSAGE_BYTES, RepositorySource, ServeConfig, ServerFile, TlsConfig, read_secret_file};
use kiln::security::Secret;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model repository folder (NAME/model.toml, NAME/VERSION/...). Without
    /// it, the built-in repository (the `risk` model) is served.
    #[arg(long, env = "KILN_REPO")]
    pub repo: Option<PathBuf>,
    /// How the served models follow the repository: `poll` (the default
    /// for --repo) loads new version folders, unloads removed ones and
    /// applies a changed model.toml while serving; `explicit` (the default
    /// for the built-in repository) changes only on RepositoryModelLoad /
    /// RepositoryModelUnload from an admin.
    #[arg(long, env = "KILN_MODEL_CONTROL", value_enum)]
    pub model_control: Option<kiln::config::ModelControl>,
    /// Milliseconds between looks at the repository under `poll` (a folder
    /// is acted on once two looks in a row saw it the same).
    #[arg(long, env = "KILN_REPOSITORY_POLL_MS")]
    pub repository_poll_ms: Option<u64>,
    /// JSON-lines file every admin action (promote, rollback, pause,
    /// resume, split) is appended to, with who, before and after; the
    /// server log has each line too.
    #[arg(long, env = "KILN_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Server config file (TOML): `max_message_bytes`; `[tenants.NAME]`
    /// sections with `budget` (compute-seconds per second) and `burst`
    /// (compute-seconds) that cap what each tenant may spend; `[limits]`
    /// (bytes in flight, connections, HTTP/2 settings, timeouts: what one
    /// client may hold of the server); `[request_log]`.
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address. Port 8001 as Triton, so its clients find it.
    #[arg(long, env = "KILN_GRPC_ADDR", default_value = "0.0.0.0:8001")]
    pub grpc: SocketAddr,
    /// Prometheus `/metrics` listen address. Port 8002 as Triton.
    #[arg(long, env = "KILN_METRICS_ADDR", default_value = "0.0.0.0:8002")]
    pub metrics: SocketAddr,
    /// HTTP listen address (KServe V2 REST with binary tensors, OpenAI
    /// `/v1/embeddings`), or `off`. Port 8000 as Triton.
    #[arg(long, env = "KILN_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    pub http: HttpAddr,
    /// CPU threads one model computation may use: `auto` (time one thread
    /// against all cores at warm-up and keep the faster, for text models;
    /// row models use one), or a count (sets RAYON_NUM_THREADS). More
    /// threads shorten a large batch but compete with the gRPC runtime for
    /// the same cores.
    #[arg(long, env = "KILN_MODEL_THREADS", default_value = "auto")]
    pub model_threads: kiln::model::threads::ModelThreads,
    /// Threads of the async runtime that decodes, validates and answers
    /// requests. Default: one per core.
    #[arg(long, env = "KILN_RUNTIME_THREADS")]
    pub runtime_threads: Option<usize>,
    /// Largest request or response message in bytes (default 4 MiB, gRPC's
    /// own). Bigger batches need more, but every admitted message is held in
    /// memory for the whole call; `[limits] max_inflight_bytes` in the
    /// config file bounds all of them together.
    #[arg(long, env = "KILN_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Threads that tokenize text requests before they queue. Tokenizing
    /// a sentence takes tens of microseconds against milliseconds of model
    /// compute, so one is enough on a small machine.
    #[arg(long, env = "KILN_PREPARE_THREADS", default_value_t = 1)]
    pub prepare_threads: usize,
    /// File holding the admin token (kiln.admin.v1 accepts it as
    /// `authorization: Bearer <token>`); the `KILN_ADMIN_TOKEN` environment
    /// variable and `[auth] admin_token_file` are the other ways in. At
    /// least 16 characters. Without a token or `[auth] admins`, admin is
    /// closed.
    #[arg(long, env = "KILN_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token itself. Discouraged (it shows in the process list,
    /// and a warning says so): use --admin-token-file or KILN_ADMIN_TOKEN.
    #[arg(long)]
    pub admin_token: Option<String>,
    /// Opens the admin service to anyone, for local use; logged as a warning.
    #[arg(long)]
    pub admin_insecure: bool,
    /// PEM certificate chain: TLS on every listener (with --tls-key).
    /// Reloaded when the file changes. Also `[tls] cert`.
    #[arg(long, env = "KILN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert. Also `[tls] key`.
    #[arg(long, env = "KILN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: mutual TLS, every client must present a
    /// certificate one of them signed. Also `[tls] client_ca`.
    #[arg(long, env = "KILN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// API keys file (`kiln keys new` prints its entries): every call but
    /// health checks needs a key. Reloaded when it changes. Also
    /// `[auth] keys_file`.
    #[arg(long, env = "KILN_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// Seconds a shutdown (SIGTERM, SIGINT) may take to answer what was
    /// admitted; past it the rest is answered UNAVAILABLE. Keep it below the
    /// orchestrator's kill deadline (Kubernetes: 30 s by default). A second
    /// signal exits at once.
    #[arg(long, env = "KILN_DRAIN_TIMEOUT", default_value_t = 25.0)]
    pub drain_timeout: f64,
}

/// Runs the server on a runtime sized by the flags.
pub fn run(args: ServeArgs) -> Result<()> {
    // Each is a thread count: bounded so a typo cannot spawn a million
    // threads before anything fails.
    for (flag, value) in
        [("--runtime-threads", args.runtime_threads), ("--prepare-threads", Some(args.prepare_threads))]
    {
        if let Some(n) = value
            && !(1..=1024).contains(&n)
        {
            bail!("{flag} must be 1 to 1024, got {n}");
        }
    }
    // Under `auto`, models computed by candle follow one thread; the ones
    // that choose their own are timed at warm-up.
    super::set_model_threads(match args.model_threads {
        kiln::model::threads::ModelThreads::Fixed(n) => n,
        kiln::model::threads::ModelThreads::Auto => 1,
    });
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.runtime_threads {
        runtime.worker_threads(n);
    }
    runtime.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut file = match &args.config {
        Some(path) => ServerFile::load(path)?,
        None => ServerFile::default(),
    };
    let admin_token = admin_token(&args, &file)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(TlsConfig { cert: cert.clone(), key: key.clone(), client_ca: args.tls_client_ca.clone() })
        }
        _ => file.tls.take(),
    };
    if args.api_keys.is_some() {
        file.auth.keys_file = args.api_keys.clone();
    }
    let config = ServeConfig {
        repository: args.repo.map(RepositorySource::Dir).unwrap_or(RepositorySource::BuiltIn),
        model_control: args.model_control.or(file.model_control),
        repository_poll: args
            .repository_poll_ms
            .or(file.repository_poll_ms)
            .map_or(kiln::config::DEFAULT_REPOSITORY_POLL, std::time::Duration::from_millis),
        audit_log: args.audit_log.or(file.audit_log.take()),
        max_message_bytes: args.max_message_bytes.or(file.max_message_bytes).unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
        tenants: file.tenants,
        prepare_threads: args.prepare_threads.max(1),
        model_threads: args.model_threads,
        admin_token,
        admin_insecure: args.admin_insecure,
        tls,
        auth: file.auth,
        request_log: file.request_log,
        limits: file.limits,
        drain_timeout: {
            if !(args.drain_timeout.is_finite() && args.drain_timeout > 0.0 && args.drain_timeout <= 3600.0) {
                bail!("--drain-timeout must be above 0 and at most 3600 seconds, got {}", args.drain_timeout);
            }
            std::time::Duration::from_secs_f64(args.drain_timeout)
        },
    };
    // Before binding: a bad setting stops here, not after "listening".
    config.check()?;
    let grpc =
        tokio::net::TcpListener::bind(args.grpc).await.with_context(|| format!("binding gRPC on {}", args.grpc))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics)
        .await
        .with_context(|| format!("binding metrics on {}", args.metrics))?;
    let http = match args.http.0 {
        None => None,
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding HTTP on {addr}"))?)
        }
    };
    let http_addr =
        http.as_ref().map(|l| l.local_addr()).transpose()?.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(grpc = %grpc.local_addr()?, http = %http_addr, metrics = %metrics.local_addr()?, "kiln listening");
    let listeners = kiln::Listeners { grpc, http, metrics: Some(metrics) };
    kiln::serve(config, listeners, shutdown_signal()?).await?;
    Ok(())
}

/// The admin token from the first source given: --admin-token-file,
/// KILN_ADMIN_TOKEN, --admin-token (with a warning), `[auth]
/// admin_token_file`. Empty is refused from every source.
fn admin_token(args: &ServeArgs, file: &ServerFile) -> Result<Option<Secret>> {
    if let Some(path) = &args.admin_token_file {
        return Ok(Some(read_secret_file(path, "admin token")?));
    }
    if let Ok(token) = std::env::var("KILN_ADMIN_TOKEN") {
        if token.trim().is_empty() {
            bail!("KILN_ADMIN_TOKEN is set but empty");
        }
        return Ok(Some(Secret::new(token.trim())));
    }
    if let Some(token) = &args.admin_token {
        if token.is_empty() {
            bail!("--admin-token must not be empty");
        }
        tracing::warn!(
            "--admin-token puts the token in the process list, where any local user can read it; use \
             --admin-token-file or KILN_ADMIN_TOKEN"
        );
        return Ok(Some(Secret::new(token.clone())));
    }
    match &file.auth.admin_token_file {
        Some(path) => Ok(Some(read_secret_file(path, "admin token")?)),
        None => Ok(None),
    }
}

/// Completes at the first SIGINT or SIGTERM; the second exits the process
/// at once with status 130, without waiting for the drain.
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    let mut signals = Signals::new()?;
    let (first_tx, first) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        signals.next().await;
        let _ = first_tx.send(());
        signals.next().await;
        tracing::warn!("second shutdown signal: exiting now, without finishing the drain");
        std::process::exit(130);
    });
    Ok(async move {
        let _ = first.await;
    })
}

/// SIGINT and SIGTERM, as many as come.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?,
        })
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        let term = self.term.recv();
        #[cfg(not(unix))]
        let term = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    }
}

/// `--http`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct HttpAddr(pub Option<SocketAddr>);

impl std::str::FromStr for HttpAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self(None)),
            addr => addr.parse().map(|a| Self(Some(a))).map_err(|e| format!("expected ADDR:PORT or `off`: {e}")),
        }
    }
}

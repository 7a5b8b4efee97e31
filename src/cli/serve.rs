//! `kiln serve`: the server config merged from flags, environment and the
//! `--config` file, checked before anything binds, served until SIGINT or
//! SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kiln::config::{DEFAULT_MAX_MESSAGE_BYTES, RepositorySource, ServeConfig, ServerFile};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model repository folder (NAME/model.toml, NAME/VERSION/...). Without
    /// it, the built-in repository (the `risk` model) is served.
    #[arg(long, env = "KILN_REPO")]
    pub repo: Option<PathBuf>,
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
    /// CPU threads one model computation may use (sets RAYON_NUM_THREADS).
    /// More threads shorten a large batch but compete with the gRPC runtime
    /// for the same cores; on a small machine, one is often fastest overall.
    #[arg(long, env = "KILN_MODEL_THREADS", default_value_t = 1)]
    pub model_threads: usize,
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
    /// Bearer token the admin service (kiln.admin.v1) requires; without it
    /// the admin service answers anyone (it only reads, for now). Also
    /// `admin_token` in the config file.
    #[arg(long, env = "KILN_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
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
    for (flag, value) in [
        ("--model-threads", Some(args.model_threads)),
        ("--runtime-threads", args.runtime_threads),
        ("--prepare-threads", Some(args.prepare_threads)),
    ] {
        if let Some(n) = value
            && !(1..=1024).contains(&n)
        {
            bail!("{flag} must be 1 to 1024, got {n}");
        }
    }
    super::set_model_threads(args.model_threads);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.runtime_threads {
        runtime.worker_threads(n);
    }
    runtime.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => ServerFile::load(path)?,
        None => ServerFile::default(),
    };
    let config = ServeConfig {
        repository: args.repo.map(RepositorySource::Dir).unwrap_or(RepositorySource::BuiltIn),
        max_message_bytes: args.max_message_bytes.or(file.max_message_bytes).unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
        tenants: file.tenants,
        prepare_threads: args.prepare_threads.max(1),
        admin_token: args.admin_token.filter(|t| !t.is_empty()).or(file.admin_token),
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
    tracing::info!(grpc = %grpc.local_addr()?, metrics = %metrics.local_addr()?, "kiln listening");
    kiln::serve(config, grpc, Some(metrics), shutdown_signal()?).await?;
    Ok(())
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

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
        ..ServeConfig::default()
    };
    // Before binding: a bad setting stops here, not after "listening".
    config.check()?;
    let grpc =
        tokio::net::TcpListener::bind(args.grpc).await.with_context(|| format!("binding gRPC on {}", args.grpc))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics)
        .await
        .with_context(|| format!("binding metrics on {}", args.metrics))?;
    tracing::info!(grpc = %grpc.local_addr()?, metrics = %metrics.local_addr()?, "kiln listening");
    kiln::serve(config, grpc, Some(metrics), shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

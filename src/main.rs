//! The `kiln` command: serve, infer, bench, plan, profile and drift. A thin
//! wrapper over the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use kiln::api::pb;
use kiln::client::{self, Client};
use kiln::config::{DEFAULT_MAX_MESSAGE_BYTES, RepositorySource, ServeConfig, ServerFile};

#[derive(Parser)]
#[command(name = "kiln", version, about = "KServe V2 gRPC inference server with latency-budget-aware batching")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model repository over gRPC (KServe V2) with Prometheus metrics.
    Serve(ServeArgs),
    /// Send one request and print the outputs.
    Infer(InferArgs),
    /// Load-test a running server: closed loop (--concurrency) and open
    /// loop (--rate, Poisson arrivals); prints a table per step.
    Bench(BenchArgs),
    /// Recommend max_batch_size, max_queue_delay_ms and instances for a p99
    /// budget, from measurements and a simulation of the batch policy.
    Plan(PlanArgs),
    /// Write a version's drift reference (reference.json) by running the
    /// model over a data file: CSV with a header (columns named as the
    /// model's features) for row models, one text per line for text models.
    Profile(ProfileArgs),
    /// Print a model's drift report from a running server, most drifted
    /// first, and plot reference against live histograms.
    Drift(DriftArgs),
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// Model repository folder; the built-in repository without it.
    #[arg(long, env = "KILN_REPO")]
    repo: Option<PathBuf>,
    /// Model name.
    #[arg(long, env = "KILN_MODEL")]
    model: String,
    /// Version to profile; the model's default when absent.
    #[arg(long)]
    version: Option<u64>,
    /// The data the reference describes: what the model was trained on,
    /// or a stretch of traffic known to be good.
    #[arg(long)]
    data: PathBuf,
    /// Where to write; default: reference.json in the version's folder
    /// (required for the built-in repository).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DriftArgs {
    #[command(flatten)]
    target: Target,
    /// Bearer token, when the server has one configured.
    #[arg(long, env = "KILN_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Where to draw reference against live histograms (SVG).
    #[arg(long, default_value = "drift.svg")]
    plot: PathBuf,
    /// Features drawn, most drifted first.
    #[arg(long, default_value_t = 6)]
    top: usize,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Model repository folder; the built-in repository without it.
    #[arg(long, env = "KILN_REPO")]
    repo: Option<PathBuf>,
    /// Model name.
    #[arg(long, env = "KILN_MODEL")]
    model: String,
    /// p99 latency target in milliseconds.
    #[arg(long)]
    budget_ms: f64,
    /// Total requests per second to size replicas for.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests per simulation run (more: steadier p99, slower plan).
    #[arg(long, default_value_t = 20_000)]
    sim_requests: usize,
    /// CPU threads for the model, as `kiln serve --model-threads`.
    #[arg(long, env = "KILN_MODEL_THREADS", default_value_t = 1)]
    model_threads: usize,
    /// Also write the plan as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw predicted p99 against offered rate (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Which server and model a client command talks to.
#[derive(clap::Args)]
struct Target {
    /// Server address, host:port.
    #[arg(long, env = "KILN_URL", default_value = "127.0.0.1:8001")]
    url: String,
    /// Model name.
    #[arg(long, env = "KILN_MODEL")]
    model: String,
    /// Model version; the model's default when absent.
    #[arg(long, default_value = "")]
    version: String,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    target: Target,
    /// Closed-loop steps: clients each sending its next request when the
    /// last is answered, e.g. 1,8,32.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Open-loop steps: Poisson arrivals at these requests per second, e.g.
    /// 500,1000,2000. Latency counts from the intended send time.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Most requests per step (the step also ends at --duration).
    #[arg(long)]
    requests: Option<u64>,
    /// HTTP/2 connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Rows (or texts) per request.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Inputs to send instead of generated ones: CSV rows of numbers, or
    /// one text per line for text models.
    #[arg(long)]
    input_file: Option<PathBuf>,
    /// Open loop: most requests outstanding; arrivals beyond it are counted
    /// as CLIENT_OVERLOADED instead of queueing in the client.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write one CSV line per step.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw throughput against p99 and the latency percentiles (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Model repository folder (NAME/model.toml, NAME/VERSION/...). Without
    /// it, the built-in repository (the `risk` model) is served.
    #[arg(long, env = "KILN_REPO")]
    repo: Option<PathBuf>,
    /// Server config file (TOML): `max_message_bytes`, and `[tenants.NAME]`
    /// sections with `budget` (compute-seconds per second) and `burst`
    /// (compute-seconds) that cap what each tenant may spend.
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address. Port 8001 as Triton, so its clients find it.
    #[arg(long, env = "KILN_GRPC_ADDR", default_value = "0.0.0.0:8001")]
    grpc: SocketAddr,
    /// Prometheus `/metrics` listen address. Port 8002 as Triton.
    #[arg(long, env = "KILN_METRICS_ADDR", default_value = "0.0.0.0:8002")]
    metrics: SocketAddr,
    /// CPU threads one model computation may use (sets RAYON_NUM_THREADS).
    /// More threads shorten a large batch but compete with the gRPC runtime
    /// for the same cores; on a small machine, one is often fastest overall.
    #[arg(long, env = "KILN_MODEL_THREADS", default_value_t = 1)]
    model_threads: usize,
    /// Threads of the async runtime that decodes, validates and answers
    /// requests. Default: one per core.
    #[arg(long, env = "KILN_RUNTIME_THREADS")]
    runtime_threads: Option<usize>,
    /// Largest request or response message in bytes (default 4 MiB, gRPC's
    /// own). Bigger batches need more, but every admitted message is held in
    /// memory for the whole call; `[limits] max_inflight_bytes` in the
    /// config file bounds all of them together.
    #[arg(long, env = "KILN_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Threads that tokenize text requests before they queue. Tokenizing
    /// a sentence takes tens of microseconds against milliseconds of model
    /// compute, so one is enough on a small machine.
    #[arg(long, env = "KILN_PREPARE_THREADS", default_value_t = 1)]
    prepare_threads: usize,
    /// Bearer token the admin service (kiln.admin.v1) requires; without it
    /// the admin service answers anyone (it only reads, for now). Also
    /// `admin_token` in the config file.
    #[arg(long, env = "KILN_ADMIN_TOKEN")]
    admin_token: Option<String>,
}

#[derive(clap::Args)]
struct InferArgs {
    #[command(flatten)]
    target: Target,
    /// A JSON object of named features (or an array of them, one per row),
    /// a JSON array of numbers, or CSV rows of numbers in feature order.
    /// Read from standard input when absent or `-`.
    // A CSV row may start with a negative number; it is not a flag.
    #[arg(allow_hyphen_values = true)]
    input: Option<String>,
}

fn main() -> std::process::ExitCode {
    // The message alone: a user error is not a crash, and anyhow's Debug
    // form would append a backtrace whenever RUST_BACKTRACE is set.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes a report to standard output. A reader that went away (`| head`)
/// is not an error worth a panic: the rest is simply not wanted.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => {
            if args.model_threads == 0 {
                bail!("--model-threads must be at least 1");
            }
            // SAFETY: no other thread exists yet; candle and rayon read this
            // variable to size their thread pools.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", args.model_threads.to_string()) };
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = args.runtime_threads {
                runtime.worker_threads(n.max(1));
            }
            runtime.enable_all().build()?.block_on(serve(args))
        }
        Command::Infer(args) => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(infer(args))
        }
        Command::Bench(args) => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench(args)),
        Command::Plan(args) => {
            // SAFETY: no other thread exists yet (see Serve).
            unsafe { std::env::set_var("RAYON_NUM_THREADS", args.model_threads.max(1).to_string()) };
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(plan(args))
        }
        Command::Profile(args) => profile(args),
        Command::Drift(args) => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(drift(args))
        }
    }
}

fn profile(args: ProfileArgs) -> Result<()> {
    let source = args.repo.clone().map(RepositorySource::Dir).unwrap_or(RepositorySource::BuiltIn);
    let loaded = kiln::repository::load_one(&source, &args.model)?;
    let number = args.version.unwrap_or(loaded.default_version);
    let Some(version) = loaded.versions.get(&number) else {
        bail!(
            "model '{}' has no version {number}; it has {:?}",
            args.model,
            loaded.versions.keys().collect::<Vec<_>>()
        );
    };
    let out = match (&args.out, &args.repo) {
        (Some(out), _) => out.clone(),
        (None, Some(repo)) => repo.join(&args.model).join(number.to_string()).join(kiln::repository::REFERENCE_FILE),
        (None, None) => bail!("the built-in repository is read-only: give --out FILE"),
    };
    let reference = kiln::monitor::drift::profile::profile(
        version.model.as_ref(),
        &version.spec,
        &version.drift_layout,
        &args.data,
    )?;
    std::fs::write(&out, serde_json::to_string_pretty(&reference)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    emit(&format!(
        "wrote {}: {} rows, {} features, {} outputs{}\n",
        out.display(),
        reference.rows,
        reference.features.len(),
        reference.outputs.len(),
        if reference.text.is_some() { ", text statistics" } else { "" }
    ));
    Ok(())
}

async fn drift(args: DriftArgs) -> Result<()> {
    let t = &args.target;
    let report =
        client::drift::fetch(&t.url, &t.model, &t.version, args.admin_token.as_deref()).await?.map_err(status_error)?;
    emit(&client::drift::table(&report));
    if report.state == "ready" {
        std::fs::write(&args.plot, client::drift::svg(&report, args.top))
            .with_context(|| format!("writing {}", args.plot.display()))?;
        emit(&format!("plot: {}\n", args.plot.display()));
    }
    Ok(())
}

async fn plan(args: PlanArgs) -> Result<()> {
    if !(args.budget_ms.is_finite() && args.budget_ms > 0.0) {
        bail!("--budget-ms must be a positive number of milliseconds");
    }
    if let Some(r) = args.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--rate {r}: must be positive requests per second");
    }
    let options = kiln::plan::PlanOptions {
        repository: args.repo.map(RepositorySource::Dir).unwrap_or(RepositorySource::BuiltIn),
        model: args.model,
        budget: std::time::Duration::from_secs_f64(args.budget_ms / 1000.0),
        rate: args.rate,
        sim_requests: args.sim_requests.max(1000),
    };
    let plan = kiln::plan::plan(&options).await?;
    emit(&plan.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&plan)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plan.svg()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn bench(args: BenchArgs) -> Result<()> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    if let Some(r) = args.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rate {r}: rates must be positive requests per second");
    }
    let mut steps: Vec<kiln::bench::Load> =
        args.concurrency.iter().map(|n| kiln::bench::Load::Concurrency(*n)).collect();
    steps.extend(args.rate.iter().map(|r| kiln::bench::Load::Rate(*r)));
    if steps.is_empty() {
        steps.push(kiln::bench::Load::Concurrency(1));
    }
    let options = kiln::bench::BenchOptions {
        url: args.target.url,
        model: args.target.model,
        version: args.target.version,
        steps,
        duration: std::time::Duration::from_secs_f64(args.duration),
        max_requests: args.requests,
        connections: args.connections.max(1),
        rows: args.rows.max(1),
        input_file: args.input_file,
        max_in_flight: args.max_in_flight.max(1),
        progress: true,
    };
    let report = kiln::bench::run(&options).await?;
    emit(&report.table());
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(path) = &args.json {
        write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = &args.csv {
        write(path, report.csv())?;
    }
    if let Some(path) = &args.plot {
        write(path, report.svg())?;
    }
    Ok(())
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

async fn infer(args: InferArgs) -> Result<()> {
    let text = match args.input.as_deref() {
        None | Some("-") => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
        Some(t) => t.to_string(),
    };
    let target = &args.target;
    let mut client = Client::connect(&target.url).await?;
    let config = client
        .raw
        .model_config(pb::ModelConfigRequest { name: target.model.clone(), version: target.version.clone() })
        .await
        .map_err(status_error)?
        .into_inner()
        .config
        .context("server sent no model config")?;
    let input = config.input.first().context("model declares no input")?;
    let names: Option<Vec<String>> = config
        .parameters
        .get(&format!("{}.feature_names", input.name))
        .and_then(|p| serde_json::from_str(&p.string_value).ok());
    let rows = parse_rows(&text, names.as_deref())?;
    let mut request = client::fp32_request(&target.model, &input.name, &rows);
    request.model_version = target.version.clone();
    let response = client.raw.model_infer(request).await.map_err(status_error)?.into_inner();
    let mut outputs = serde_json::Map::new();
    for (i, out) in response.outputs.iter().enumerate() {
        let values = client::output_fp32(&response, i).context("output is not FP32")?;
        let width = (out.shape.get(1).copied().unwrap_or(1).max(1)) as usize;
        let rows: Vec<&[f32]> = values.chunks(width).collect();
        outputs.insert(out.name.clone(), serde_json::json!(rows));
    }
    let mut params = serde_json::Map::new();
    for k in response.parameters.keys() {
        let v = client::int_parameter(&response, k)
            .map(serde_json::Value::from)
            .or_else(|| client::string_parameter(&response, k).map(serde_json::Value::from));
        if let Some(v) = v {
            params.insert(k.clone(), v);
        }
    }
    let report = serde_json::json!({
        "model": response.model_name,
        "version": response.model_version,
        "outputs": outputs,
        "parameters": params,
    });
    // A reader that stops early (`| head`) is not an error.
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("[{:?}] {}", s.code(), s.message())
}

/// Rows of features from JSON (objects by feature name, or arrays) or CSV.
fn parse_rows(text: &str, names: Option<&[String]>) -> Result<Vec<Vec<f32>>> {
    let trimmed = text.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let value: serde_json::Value = serde_json::from_str(trimmed).context("input is not valid JSON")?;
        let items = match value {
            serde_json::Value::Array(items) if items.iter().all(|v| v.is_object() || v.is_array()) => items,
            other => vec![other],
        };
        return items.iter().map(|item| json_row(item, names)).collect();
    }
    trimmed
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            line.split(',')
                .map(|v| v.trim().parse::<f32>().with_context(|| format!("CSV value {v:?} is not a number")))
                .collect()
        })
        .collect()
}

fn json_row(item: &serde_json::Value, names: Option<&[String]>) -> Result<Vec<f32>> {
    let number = |v: &serde_json::Value, what: &str| -> Result<f32> {
        v.as_f64().map(|x| x as f32).with_context(|| format!("{what}: {v} is not a number"))
    };
    match item {
        serde_json::Value::Array(values) => {
            values.iter().enumerate().map(|(i, v)| number(v, &format!("element {i}"))).collect()
        }
        serde_json::Value::Object(map) => {
            let names = names.context("the model publishes no feature names; send an array in feature order")?;
            if let Some(unknown) = map.keys().find(|k| !names.contains(k)) {
                bail!("unknown feature {unknown:?}; the model's features are: {}", names.join(", "));
            }
            let missing: Vec<&str> = names.iter().filter(|n| !map.contains_key(*n)).map(String::as_str).collect();
            if !missing.is_empty() {
                bail!("missing features: {}", missing.join(", "));
            }
            names.iter().map(|n| number(&map[n], n)).collect()
        }
        other => bail!("expected a JSON object or array per row, got {other}"),
    }
}

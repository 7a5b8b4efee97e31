//! Wires the stages together and runs them until shutdown: loads the
//! repository, starts batchers and executors, serves gRPC (V2 inference,
//! admin, health, reflection) and the Prometheus endpoint, each listener
//! through the same accept loop and limits.

mod accept;
pub mod drain;
mod io;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use std::time::Duration;

use crate::api::admin_pb::admin_server::AdminServer;
use crate::api::grpc::admin::AdminService;
use crate::api::grpc::deadline;
use crate::api::grpc::inference::InferenceService;
use crate::api::grpc::ingress::{InflightBudget, Ingress, IngressState, SMALL_MESSAGE_BYTES};
use crate::api::pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::config::ServeConfig;
use crate::model::tokenize::{PreparePool, Tokenization};
use crate::monitor;
use crate::repository::{self, LiveRepository, RepositoryError};
use crate::runtime::{self, Runtime, RuntimeOptions, Threads};

/// How long shutdown waits for the serving threads once the calls are
/// answered: the batchers only have leftovers by then.
const THREAD_JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("model repository: {0}")]
    Repository(#[from] RepositoryError),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("loading models: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("starting threads: {0}")]
    Threads(#[from] std::io::Error),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Tls(#[from] crate::security::TlsError),
}

/// Completes once the server's stop signal has been sent.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The listeners a server answers on, already bound: gRPC always, the
/// HTTP front end and the Prometheus endpoint when given.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

/// Serves `config` on already-bound listeners until `shutdown` completes,
/// then drains: health turns NOT_SERVING first (Watch streams end), new
/// calls are refused UNAVAILABLE, and every admitted request is answered
/// before this returns; past `drain_timeout`, UNAVAILABLE.
///
/// Tests bind `127.0.0.1:0` and read the address from the listener.
pub async fn serve(
    config: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let Listeners { grpc, http, metrics } = listeners;
    config.check()?;
    // Certificates and keys before the models: a bad file fails fast.
    let tls = config.tls.as_ref().map(crate::security::Tls::load).transpose()?;
    let auth = Arc::new(crate::security::Auth::new(&config.auth, config.admin_token.clone(), config.admin_insecure)?);
    announce_security(&config, tls.as_deref(), &auth);
    let prometheus = monitor::metrics::install();
    let options = RuntimeOptions {
        source: config.repository.clone(),
        control: config.control(),
        model_threads: config.model_threads,
    };
    let setting = config.model_threads;
    let loaded = tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
        let loaded = repository::load(&options.source)?;
        for model in &loaded {
            for (number, version) in &model.versions {
                runtime::choose_threads(&model.name, *number, &model.config, version, setting)?;
            }
        }
        Ok((loaded, options))
    })
    .await??;
    let (loaded, options) = loaded;
    let runtime = Arc::new(Runtime::start(loaded, config.request_log.as_ref(), Threads::default(), options)?);
    check_fallbacks(&runtime.repo.get())?;
    runtime.watch_repository(config.repository_poll)?;
    tracing::info!(
        mode = ?runtime.control_mode(),
        poll_ms = config.repository_poll.as_millis() as u64,
        "model control"
    );
    let repo = runtime.repo.clone();

    let drain = Arc::new(drain::Drain::default());
    let (health, _) = tonic_health::server::health_reporter();
    let health_service = tonic_health::pb::health_server::HealthServer::new(drain::DrainingHealth::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
        drain.clone(),
    ))
    .max_decoding_message_size(SMALL_MESSAGE_BYTES);
    health.set_serving::<GrpcInferenceServiceServer<InferenceService>>().await;
    let health_stopped = Arc::new(tokio::sync::Mutex::new(false));
    tokio::spawn(follow_health(repo.clone(), health.clone(), health_stopped.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(SMALL_MESSAGE_BYTES);

    let ready = Arc::new(AtomicBool::new(true));
    let ready_http = ready.clone();
    let pipeline = Arc::new(crate::pipeline::Pipeline::new(
        crate::pipeline::admission::Admission::new(&config.tenants),
        Tokenization::new(PreparePool::new(config.prepare_threads, config.limits.prepare_queue, runtime.threads())?),
        drain.clone(),
    ));
    let inference =
        GrpcInferenceServiceServer::new(InferenceService::new(runtime.clone(), pipeline.clone(), ready.clone()))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal = {
        let (repo, drain) = (repo.clone(), drain.clone());
        async move {
            shutdown.await;
            tracing::info!("shutting down: health NOT_SERVING, new calls UNAVAILABLE, answering what was admitted");
            // Refuse new calls before anyone can see NOT_SERVING and retry.
            drain.start();
            ready.store(false, Ordering::Release);
            // Model statuses stop following the repository first.
            let mut stopped = health_stopped.lock().await;
            *stopped = true;
            health.set_not_serving::<GrpcInferenceServiceServer<InferenceService>>().await;
            let snapshot = repo.get();
            for name in snapshot.models.keys().chain(snapshot.notes.keys()) {
                health.set_service_status(name, ServingStatus::NotServing).await;
            }
            drop(stopped);
            let _ = stop_tx.send(true);
        }
    };

    let budget = InflightBudget::new(config.limits.max_inflight_bytes);
    let metrics_task = metrics.map(|listener| {
        let stop = stop_rx.clone();
        let service = monitor::metrics::MetricsService::new(prometheus.clone(), budget.clone());
        let limits = config.limits.clone();
        let grace = config.drain_timeout;
        let tls = tls.as_ref().map(|t| t.acceptor(false));
        tokio::spawn(async move {
            let upkeep = tokio::spawn(monitor::metrics::upkeep(prometheus));
            accept::accept_loop(listener, service, accept::Protocol::Http1, tls, limits, stopped(stop), grace, || {})
                .await;
            upkeep.abort();
        })
    });

    let audit = Arc::new(
        monitor::audit::AuditLog::open(config.audit_log.as_deref())
            .map_err(|e| crate::config::ConfigError::new("server config", format!("`audit_log`: {e}")))?,
    );
    runtime.act_on_drift(audit.clone())?;
    let admin =
        AdminServer::new(AdminService::new(runtime.clone(), audit)).max_decoding_message_size(SMALL_MESSAGE_BYTES);
    let busy_task = tokio::spawn(publish_busy(repo.clone()));
    let routes = tonic::service::Routes::new(inference)
        .add_service(admin)
        .add_service(health_service)
        .add_service(reflection)
        .prepare();
    if let Some(tls) = &tls {
        tls.watch();
    }
    auth.watch();
    let http_task = http.map(|listener| {
        let state = Arc::new(crate::api::http::HttpState {
            auth: auth.clone(),
            repo: repo.clone(),
            pipeline: pipeline.clone(),
            budget: budget.clone(),
            max_message_bytes: config.max_message_bytes,
            body_timeout: config.limits.body_timeout(),
            drain: drain.clone(),
            ready: ready_http.clone(),
        });
        let stop = stop_rx.clone();
        let (limits, grace, drain) = (config.limits.clone(), config.drain_timeout, drain.clone());
        let tls = tls.as_ref().map(|t| t.acceptor(false));
        let service = crate::api::http::HttpService::new(state);
        tokio::spawn(async move {
            let expire = || drain.expire();
            accept::accept_loop(listener, service, accept::Protocol::Http1, tls, limits, stopped(stop), grace, expire)
                .await;
        })
    });
    let ingress = Arc::new(IngressState {
        auth,
        repo: repo.clone(),
        budget,
        max_message_bytes: config.max_message_bytes,
        body_timeout: config.limits.body_timeout(),
        drain: drain.clone(),
    });
    let service =
        tower::ServiceBuilder::new().map_request(deadline::take_grpc_timeout).service(Ingress::new(routes, ingress));
    let expire = || drain.expire();
    accept::accept_loop(
        grpc,
        service,
        accept::Protocol::Http2,
        tls.as_ref().map(|t| t.acceptor(true)),
        config.limits.clone(),
        signal,
        config.drain_timeout,
        expire,
    )
    .await;
    busy_task.abort();
    pipeline.close();
    let stopping = runtime.clone();
    let joined = tokio::task::spawn_blocking(move || stopping.shutdown(THREAD_JOIN_TIMEOUT)).await?;
    if joined.running.is_empty() {
        tracing::info!(threads = joined.joined, "clean stop: every serving thread joined");
    } else {
        tracing::warn!(joined = joined.joined, running = ?joined.running, "threads still running at exit");
    }
    if let Some(task) = http_task {
        let _ = task.await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    Ok(())
}

/// Every model's fallback serves, fits and makes no cycle: a start-up
/// error naming the model's file otherwise.
fn check_fallbacks(repo: &repository::Repository) -> Result<(), ServeError> {
    for model in repo.models.values() {
        let Some(version) = model.versions.get(&model.default_version) else { continue };
        crate::pipeline::fallback::check(repo, &model.name, &model.config, &version.spec)
            .map_err(|m| crate::config::ConfigError::new(format!("{}/model.toml", model.name), m))?;
    }
    Ok(())
}

/// Says at start what protects the server, and warns about what does not.
fn announce_security(config: &ServeConfig, tls: Option<&crate::security::Tls>, auth: &crate::security::Auth) {
    match tls {
        Some(tls) if tls.mutual() => tracing::info!("TLS on every listener; clients must present a certificate"),
        Some(_) => tracing::info!("TLS on every listener"),
        None => {
            tracing::warn!("no TLS: calls, keys and tokens cross the network in clear text (--tls-cert, --tls-key)")
        }
    }
    if auth.enabled() {
        tracing::info!("auth on: every call but health checks needs an API key or client certificate");
    } else {
        tracing::info!("auth off: a tenant name is the client's claim, not an identity ([auth] keys_file)");
    }
    if config.admin_insecure {
        tracing::warn!("--admin-insecure: the admin service answers anyone; for local use only");
    }
}

/// Keeps each model's health status in line with the repository: SERVING
/// while its default version takes requests, NOT_SERVING when it is
/// unloaded, failed or its scheduler stopped for good (`ModelReady` and
/// `kiln_model_ready` say so per version). Ends when shutdown takes over
/// (`stopped`).
async fn follow_health(
    repo: Arc<LiveRepository>,
    health: tonic_health::server::HealthReporter,
    stopped: Arc<tokio::sync::Mutex<bool>>,
) {
    let mut changes = repo.subscribe();
    let mut shown: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        let snapshot = changes.borrow_and_update().clone();
        let mut names: Vec<String> = snapshot.models.keys().chain(snapshot.notes.keys()).cloned().collect();
        names.extend(shown.keys().cloned());
        let mut liveness = Vec::new();
        let mut now = BTreeMap::new();
        for name in names {
            let default = snapshot.models.get(&name).and_then(|m| m.versions.get(&m.default_version));
            if let Some(version) = default {
                liveness.push(version.batcher.liveness());
            }
            now.insert(name, default.is_some_and(|v| v.batcher.serving()));
        }
        drop(snapshot);
        {
            let stopped = stopped.lock().await;
            if *stopped {
                return;
            }
            for (name, serving) in &now {
                if shown.get(name) != Some(serving) {
                    let status = if *serving { ServingStatus::Serving } else { ServingStatus::NotServing };
                    health.set_service_status(name, status).await;
                }
            }
        }
        shown = now;
        let stops = liveness.into_iter().map(|mut live| {
            Box::pin(async move {
                let _ = live.wait_for(|serving| !*serving).await;
            })
        });
        let any_stop = async move {
            if stops.len() == 0 {
                std::future::pending::<()>().await;
            }
            futures::future::select_all(stops).await;
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = any_stop => {}
        }
    }
}

/// Publishes each version's executor busy ratio once a second.
async fn publish_busy(repo: Arc<LiveRepository>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for version in repo.get().versions() {
            version.metrics.publish_busy(version.config.instances);
        }
    }
}

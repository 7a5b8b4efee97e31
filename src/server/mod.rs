//! Wires the stages together and runs them until shutdown: loads the
//! repository, starts batchers and executors, serves gRPC (V2 inference,
//! admin, health, reflection) and the Prometheus endpoint, each listener
//! through the same accept loop and limits.

mod accept;
pub mod drain;
mod io;

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
use crate::repository::{self, Repository, RepositoryError};
use crate::runtime::{Runtime, Threads};

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

/// Serves `config` on already-bound listeners until `shutdown` completes,
/// then drains: health turns NOT_SERVING first (Watch streams end), new
/// calls are refused UNAVAILABLE, and every admitted request is answered
/// before this returns; past `drain_timeout`, UNAVAILABLE.
///
/// Tests bind `127.0.0.1:0` and read the address from the listener.
pub async fn serve(
    config: ServeConfig,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.check()?;
    // Certificates and keys before the models: a bad file fails fast.
    let tls = config.tls.as_ref().map(crate::security::Tls::load).transpose()?;
    let auth = Arc::new(crate::security::Auth::new(&config.auth, config.admin_token.clone(), config.admin_insecure)?);
    announce_security(&config, tls.as_deref(), &auth);
    let prometheus = monitor::metrics::install();
    let source = config.repository.clone();
    let setting = config.model_threads;
    let loaded = tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
        let loaded = repository::load(&source)?;
        choose_model_threads(&loaded, setting)?;
        Ok(loaded)
    })
    .await??;
    let runtime = Arc::new(Runtime::start(loaded, config.request_log.as_ref(), Threads::default())?);
    let repo = runtime.repo.clone();

    let drain = Arc::new(drain::Drain::default());
    let (health, _) = tonic_health::server::health_reporter();
    let health_service = tonic_health::pb::health_server::HealthServer::new(drain::DrainingHealth::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
        drain.clone(),
    ))
    .max_decoding_message_size(SMALL_MESSAGE_BYTES);
    health.set_serving::<GrpcInferenceServiceServer<InferenceService>>().await;
    for name in repo.models.keys() {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    watch_liveness(&repo, &health);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(SMALL_MESSAGE_BYTES);

    let ready = Arc::new(AtomicBool::new(true));
    let pipeline = Arc::new(crate::pipeline::Pipeline::new(
        crate::pipeline::admission::Admission::new(&config.tenants),
        Tokenization::new(PreparePool::new(config.prepare_threads, config.limits.prepare_queue, runtime.threads())?),
        drain.clone(),
    ));
    let inference =
        GrpcInferenceServiceServer::new(InferenceService::new(repo.clone(), pipeline.clone(), ready.clone()))
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
            health.set_not_serving::<GrpcInferenceServiceServer<InferenceService>>().await;
            for name in repo.models.keys() {
                health.set_service_status(name, ServingStatus::NotServing).await;
            }
            let _ = stop_tx.send(true);
        }
    };

    let budget = InflightBudget::new(config.limits.max_inflight_bytes);
    let metrics_task = metrics.map(|listener| {
        let mut stop = stop_rx.clone();
        let service = monitor::metrics::MetricsService::new(prometheus.clone(), budget.clone());
        let limits = config.limits.clone();
        let grace = config.drain_timeout;
        let tls = tls.as_ref().map(|t| t.acceptor(false));
        tokio::spawn(async move {
            let upkeep = tokio::spawn(monitor::metrics::upkeep(prometheus));
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            accept::accept_loop(listener, service, accept::Protocol::Http1, tls, limits, stopped, grace, || {}).await;
            upkeep.abort();
        })
    });

    let admin = AdminServer::new(AdminService::new(repo.clone())).max_decoding_message_size(SMALL_MESSAGE_BYTES);
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
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    Ok(())
}

/// Applies `--model-threads` to every version (timing the ones that
/// choose their own threads under `auto`) and warns when a version's
/// instances × threads exceed the cores.
fn choose_model_threads(
    loaded: &[repository::LoadedModel],
    setting: crate::model::threads::ModelThreads,
) -> Result<(), ServeError> {
    for model in loaded {
        for (number, version) in &model.versions {
            let chosen = crate::model::threads::apply(&version.model, model.config.max_batch_size, setting)
                .map_err(|e| ServeError::Threads(std::io::Error::other(e.to_string())))?;
            let threads = chosen.unwrap_or_else(candle_core::utils::get_num_threads);
            crate::model::threads::check_oversubscription(&model.name, *number, model.config.instances, threads);
        }
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

/// Follows each version's liveness: a version whose scheduler stopped for
/// good turns its model NOT_SERVING when it is the model's default (the
/// version a request without one goes to); `ModelReady` and
/// `kiln_model_ready` say so per version.
fn watch_liveness(repo: &Repository, health: &tonic_health::server::HealthReporter) {
    for model in repo.models.values() {
        if let Some(version) = model.versions.get(&model.default_version) {
            let (mut live, health, name) = (version.batcher.liveness(), health.clone(), model.name.clone());
            tokio::spawn(async move {
                if live.wait_for(|serving| !*serving).await.is_ok() {
                    health.set_service_status(&name, ServingStatus::NotServing).await;
                }
            });
        }
    }
}

/// Publishes each version's executor busy ratio once a second.
async fn publish_busy(repo: Arc<Repository>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for model in repo.models.values() {
            for version in model.versions.values() {
                version.metrics.publish_busy(version.config.instances);
            }
        }
    }
}

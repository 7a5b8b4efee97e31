//! Wires the stages together and runs them until shutdown: loads the
//! repository, starts batchers and executors, serves gRPC (V2 inference,
//! health, reflection) and the Prometheus endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::api::inference::InferenceService;
use crate::api::pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::config::ServeConfig;
use crate::monitor;
use crate::repository::{self, Repository, RepositoryError};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("model repository: {0}")]
    Repository(#[from] RepositoryError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("loading models: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Serves `config` on already-bound listeners until `shutdown` completes,
/// then stops gracefully: health turns NOT_SERVING first, new calls are
/// refused, and every queued request is answered before this returns.
///
/// Tests bind `127.0.0.1:0` and read the address from the listener.
pub async fn serve(
    config: ServeConfig,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let prometheus = monitor::metrics::install();
    let source = config.repository.clone();
    let loaded = tokio::task::spawn_blocking(move || repository::load(&source)).await??;
    let repo = Arc::new(Repository::start(loaded)?);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GrpcInferenceServiceServer<InferenceService>>().await;
    for name in repo.models.keys() {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let ready = Arc::new(AtomicBool::new(true));
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(repo.clone(), ready.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal = {
        let repo = repo.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: health NOT_SERVING, answering what is queued");
            ready.store(false, Ordering::Release);
            health.set_not_serving::<GrpcInferenceServiceServer<InferenceService>>().await;
            for name in repo.models.keys() {
                health.set_service_status(name, ServingStatus::NotServing).await;
            }
            let _ = stop_tx.send(true);
        }
    };

    let metrics_task = metrics.map(|listener| {
        let mut stop = stop_rx.clone();
        tokio::spawn(monitor::metrics::serve_http(listener, prometheus, async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });

    // Nagle's algorithm with delayed ACKs stalls small responses by ~40 ms;
    // the builder's tcp_nodelay does not reach a listener we bind ourselves.
    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_service(inference)
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, signal);
    // A long-lived stream (a health Watch) would hold graceful shutdown
    // open forever; after the grace period the rest are closed.
    let mut stopped = stop_rx.clone();
    let grace = config.shutdown_grace;
    let deadline = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        r = server => r,
        _ = deadline => {
            tracing::warn!(?grace, "shutdown grace period over; closing the remaining connections");
            Ok(())
        }
    };
    repo.mark_stopped();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    result?;
    Ok(())
}

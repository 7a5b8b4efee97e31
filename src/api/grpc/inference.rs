//! The V2 `GRPCInferenceService`: health, metadata, config, statistics,
//! repository index and inference. RPCs Kiln does not support answer
//! UNIMPLEMENTED through the generated default stubs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::deadline::GrpcDeadline;
use super::decode::V2Request;
use super::encode;
use crate::api::pb::{self, grpc_inference_service_server::GrpcInferenceService};
use crate::api::status;
use crate::error::InferError;
use crate::monitor::stats::{DurationStat, VersionStats};
use crate::pipeline::controls;
use crate::pipeline::{Call, Pipeline, router};
use crate::repository::{Repository, ServedVersion, VersionState};
use crate::runtime::Runtime;
use crate::security::Caller;

/// Metadata naming the tenant when the request parameter does not.
const TENANT_HEADER: &str = "x-kiln-tenant";

/// The caller the door identified (anonymous when auth is off, or for a
/// service called without the door, as in-process tests do).
fn caller<T>(request: &Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or(Caller::Anonymous)
}

/// Whether `version` of `model` is one the repository knows of without
/// serving it.
fn noted_version(repo: &Repository, model: &str, version: &str) -> bool {
    version.parse::<u64>().ok().is_some_and(|v| repo.note(model, Some(v)).is_some())
}

/// Runs a model-control change (blocking: a load takes seconds) off the
/// async runtime.
async fn off_runtime(change: impl FnOnce() -> Result<(), InferError> + Send + 'static) -> Result<(), Status> {
    match tokio::task::spawn_blocking(change).await {
        Ok(result) => result.map_err(|e| status::to_status(&e)),
        Err(e) => Err(Status::internal(format!("the change stopped: {e}"))),
    }
}

/// Kiln serves one repository: the name, when given, must be empty.
fn one_repository(name: &str) -> Result<(), Status> {
    match name.is_empty() {
        true => Ok(()),
        false => Err(Status::invalid_argument(format!(
            "field 'repository_name': this server has one repository; leave it empty (got '{name}')"
        ))),
    }
}

fn denied(e: InferError) -> Status {
    status::to_status(&e)
}

/// Shared state of the inference service.
pub struct InferenceService {
    /// What is served now, and the model control that changes it.
    runtime: Arc<Runtime>,
    pipeline: Arc<Pipeline>,
    ready: Arc<AtomicBool>,
}

impl InferenceService {
    /// `ready` turns false when shutdown starts, so health checks see it
    /// before the listener closes.
    pub fn new(runtime: Arc<Runtime>, pipeline: Arc<Pipeline>, ready: Arc<AtomicBool>) -> Self {
        Self { runtime, pipeline, ready }
    }

    /// The repository as it is now; held for one call.
    fn repo(&self) -> Arc<Repository> {
        self.runtime.repo.get()
    }

    fn version(&self, name: &str, version: &str) -> Result<Arc<ServedVersion>, Status> {
        router::route(&self.repo(), name, version).map_err(|e| status::to_status(&e))
    }
}

fn duration(stat: &DurationStat) -> Option<pb::StatisticDuration> {
    let (count, ns) = stat.read();
    Some(pb::StatisticDuration { count, ns })
}

/// The statistics a caller asked for: every model it may see (`name`
/// empty), every version of one model, or one version.
pub(crate) fn select_statistics(
    repo: &Repository,
    who: &Caller,
    name: &str,
    version: &str,
) -> Result<Vec<pb::ModelStatistics>, InferError> {
    let all = |m: &crate::repository::ServedModel| {
        m.versions.iter().map(|(v, served)| statistics(&m.name, *v, &served.stats)).collect::<Vec<_>>()
    };
    if name.is_empty() {
        return Ok(repo.models.values().filter(|m| who.permit(&m.name).is_ok()).flat_map(all).collect());
    }
    who.permit(name)?;
    if version.is_empty() {
        return Ok(all(router::model(repo, name)?));
    }
    let served = router::route(repo, name, version)?;
    Ok(vec![statistics(name, served.spec.version, &served.stats)])
}

fn statistics(name: &str, version: u64, s: &VersionStats) -> pb::ModelStatistics {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    pb::ModelStatistics {
        name: name.to_string(),
        version: version.to_string(),
        last_inference: load(&s.last_inference_ms),
        inference_count: load(&s.inference_count),
        execution_count: load(&s.execution_count),
        inference_stats: Some(pb::InferStatistics {
            success: duration(&s.success),
            fail: duration(&s.fail),
            queue: duration(&s.queue),
            compute_input: duration(&s.compute_input),
            compute_infer: duration(&s.compute_infer),
            compute_output: duration(&s.compute_output),
            cache_hit: Some(pb::StatisticDuration::default()),
            cache_miss: Some(pb::StatisticDuration::default()),
        }),
        batch_stats: s
            .batch_stats()
            .into_iter()
            .map(|(size, b)| pb::InferBatchStatistics {
                batch_size: size,
                compute_input: Some(pb::StatisticDuration { count: b.count, ns: 0 }),
                compute_infer: Some(pb::StatisticDuration { count: b.count, ns: b.compute_ns }),
                compute_output: Some(pb::StatisticDuration { count: b.count, ns: 0 }),
            })
            .collect(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse { ready: self.ready.load(Ordering::Acquire) }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        who.permit(&r.name).map_err(denied)?;
        let repo = self.repo();
        let version = match router::route(&repo, &r.name, &r.version) {
            Ok(version) => version,
            // Known but not serving (loading, failed, unloaded): not ready.
            Err(_) if repo.note(&r.name, None).is_some() || noted_version(&repo, &r.name, &r.version) => {
                return Ok(Response::new(pb::ModelReadyResponse { ready: false }));
            }
            Err(e) => return Err(status::to_status(&e)),
        };
        let ready = self.ready.load(Ordering::Acquire) && version.batcher.serving();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "kiln".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: ["model_configuration", "model_repository", "statistics", "parameters"]
                .map(String::from)
                .to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        who.permit(&r.name).map_err(denied)?;
        let version = self.version(&r.name, &r.version)?;
        let repo = self.repo();
        let model = router::model(&repo, &r.name).map_err(|e| status::to_status(&e))?;
        Ok(Response::new(encode::model_metadata(model, &version.spec)))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        who.permit(&r.name).map_err(denied)?;
        let version = self.version(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(encode::model_config(&version.spec, &version.config)),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let model_stats = select_statistics(&self.repo(), &who, &r.name, &r.version).map_err(denied)?;
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        one_repository(&r.repository_name)?;
        let repo = self.repo();
        let entry = |name: &str, version: String, state: VersionState, reason: &str| {
            pb::repository_index_response::ModelIndex {
                name: name.to_string(),
                version,
                state: state.as_str().into(),
                reason: reason.to_string(),
            }
        };
        let mut models = Vec::new();
        let names: std::collections::BTreeSet<&String> = repo.models.keys().chain(repo.notes.keys()).collect();
        for name in names.into_iter().filter(|m| who.permit(m).is_ok()) {
            let served = repo.models.get(name);
            let notes = repo.notes.get(name);
            let model_note = notes.and_then(|n| n.get(&None));
            let mut versions: std::collections::BTreeSet<u64> =
                served.map(|m| m.versions.keys().copied().collect()).unwrap_or_default();
            versions.extend(notes.into_iter().flat_map(|n| n.keys().flatten().copied()));
            for v in &versions {
                let (state, reason) =
                    match (served.is_some_and(|m| m.versions.contains_key(v)), notes.and_then(|n| n.get(&Some(*v)))) {
                        (true, note) => (VersionState::Ready, note.or(model_note).map_or("", |n| n.reason.as_str())),
                        (false, Some(note)) => (note.state, note.reason.as_str()),
                        (false, None) => continue,
                    };
                models.push(entry(name, v.to_string(), state, reason));
            }
            if served.is_none()
                && let Some(note) = model_note
            {
                models.push(entry(name, String::new(), note.state, &note.reason));
            }
        }
        if r.ready {
            models.retain(|m| m.state == VersionState::Ready.as_str());
        }
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let who = super::admin_name(&request);
        let r = request.into_inner();
        one_repository(&r.repository_name)?;
        if let Some(name) = r.parameters.keys().next() {
            return Err(Status::invalid_argument(format!(
                "parameter '{name}': RepositoryModelLoad takes none here (a config or files sent with the call are \
                 not supported); put the files in the repository folder"
            )));
        }
        let runtime = self.runtime.clone();
        off_runtime(move || runtime.load_model(&r.model_name, &who)).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let who = super::admin_name(&request);
        let r = request.into_inner();
        one_repository(&r.repository_name)?;
        // tritonclient always sends `unload_dependents`; Kiln models have none.
        if let Some(name) = r.parameters.keys().find(|k| *k != "unload_dependents") {
            return Err(Status::invalid_argument(format!(
                "parameter '{name}': RepositoryModelUnload takes only 'unload_dependents'"
            )));
        }
        let runtime = self.runtime.clone();
        off_runtime(move || runtime.unload_model(&r.model_name, &who)).await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let received = Instant::now();
        let deadline = match request.extensions().get::<GrpcDeadline>().copied() {
            None => None,
            Some(GrpcDeadline::At(at)) => Some(at),
            Some(GrpcDeadline::Invalid) => {
                return Err(Status::invalid_argument("metadata 'grpc-timeout': not a valid gRPC timeout"));
            }
        };
        let call = Call {
            received,
            deadline,
            caller: caller(&request),
            tenant: request.metadata().get(TENANT_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string),
            protocol: crate::monitor::metrics::Protocol::Grpc,
        };
        let req = Arc::new(V2Request(request.into_inner()));
        let served =
            controls::serve(&self.pipeline, &self.repo(), &req, &call).await.map_err(|e| status::to_status(&e))?;
        Ok(Response::new(encode::infer_response(served)))
    }
}

//! The V2 `GRPCInferenceService`: health, metadata, config, statistics,
//! repository index and inference. RPCs Kiln does not support answer
//! UNIMPLEMENTED through the generated default stubs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::deadline::GrpcDeadline;
use super::pb::{self, grpc_inference_service_server::GrpcInferenceService};
use super::{decode, encode, status};
use crate::admission::{Admission, VersionLimits};
use crate::error::InferError;
use crate::model::{ModelError, PrepareOptions};
use crate::monitor::stats::{DurationStat, VersionStats};
use crate::prepare::{PrepareError, PreparePool};
use crate::repository::{Repository, ServedVersion};
use crate::request::InferRequest;
use crate::router;

/// Metadata naming the tenant when the request parameter does not.
const TENANT_HEADER: &str = "x-kiln-tenant";

/// Shared state of the inference service.
pub struct InferenceService {
    repo: Arc<Repository>,
    admission: Arc<Admission>,
    prepare: Arc<PreparePool>,
    ready: Arc<AtomicBool>,
}

/// Where the call came from, beyond its message.
struct CallContext {
    received: Instant,
    grpc_deadline: Option<GrpcDeadline>,
    tenant: Option<String>,
}

impl InferenceService {
    /// `ready` turns false when shutdown starts, so health checks see it
    /// before the listener closes.
    pub fn new(
        repo: Arc<Repository>,
        admission: Arc<Admission>,
        prepare: Arc<PreparePool>,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Self { repo, admission, prepare, ready }
    }

    /// Prepares the inputs (tokenizes text) on the pool and records the
    /// request's size for the batcher. Refusals that need no token count
    /// (size limits, deadline, queue, tenant budget) come first, so no
    /// tokenizer time is spent on a request that would be refused anyway.
    async fn prepare(
        &self,
        request: &mut InferRequest,
        options: PrepareOptions,
        version: &ServedVersion,
        precheck: impl FnOnce() -> Result<Instant, InferError>,
    ) -> Result<(), InferError> {
        if !version.model.prepares() {
            if options != PrepareOptions::default() {
                return Err(InferError::InvalidArgument(format!(
                    "parameters 'max_tokens' and 'truncate' apply to text models; model '{}' takes {}",
                    version.spec.name, version.spec.platform
                )));
            }
            return Ok(());
        }
        let failed = |reason: String| InferError::ModelFailed {
            model: version.spec.name.clone(),
            version: version.spec.version,
            reason,
        };
        let refused = |e: ModelError| match e {
            ModelError::Input(message) => InferError::InvalidArgument(message),
            other => failed(other.to_string()),
        };
        version.model.check_size(&request.inputs).map_err(refused)?;
        let deadline = precheck()?;
        let model = version.model.clone();
        let mut inputs = std::mem::take(&mut request.inputs);
        let (inputs, prepared) = self
            .prepare
            .run(deadline, move || {
                let prepared = model.prepare(&mut inputs, &options);
                (inputs, prepared)
            })
            .await
            .map_err(|e| match e {
                PrepareError::QueueFull { .. } => InferError::Overloaded {
                    reason: "prepare_queue",
                    message: format!("model '{}': {e}", version.spec.name),
                },
                PrepareError::Expired => InferError::Expired(format!("model '{}': {e}", version.spec.name)),
                PrepareError::Stopped | PrepareError::Panicked(_) => failed(e.to_string()),
            })?;
        request.inputs = inputs;
        request.size = prepared.map_err(refused)?;
        Ok(())
    }

    fn version(&self, name: &str, version: &str) -> Result<Arc<ServedVersion>, Status> {
        router::route(&self.repo, name, version).map_err(|e| status::to_status(&e))
    }

    /// Decode, admit, queue, wait (bounded by the deadline), answer. The
    /// tenant's budget is settled whatever happens.
    async fn infer(
        &self,
        req: &pb::ModelInferRequest,
        version: &ServedVersion,
        call: &CallContext,
    ) -> Result<pb::ModelInferResponse, InferError> {
        let grpc_deadline = match call.grpc_deadline {
            None => None,
            Some(GrpcDeadline::At(at)) => Some(at),
            Some(GrpcDeadline::Invalid) => {
                return Err(InferError::InvalidArgument("metadata 'grpc-timeout': not a valid gRPC timeout".into()));
            }
        };
        let (mut request, params) = decode::decode(req, &version.spec, version.config.max_batch_size, call.received)
            .inspect_err(|e| {
                if let InferError::NonFinite { input, column, .. } = e {
                    version.drift.refused_non_finite(*input, *column);
                }
            })?;
        let tenant = params.tenant.clone().or_else(|| call.tenant.clone());
        let limits = VersionLimits {
            model: &version.spec.name,
            number: version.spec.version,
            config: &version.config,
            estimate: version.latency.estimate(),
        };
        let precheck = || {
            let deadline = Admission::deadline(&version.config, call.received, &params, grpc_deadline);
            self.admission.precheck(&limits, deadline, version.batcher.depth(), tenant.as_deref())?;
            Ok(deadline)
        };
        self.prepare(&mut request, params.text, version, precheck).await?;
        let admitted = self.admission.admit(&limits, &mut request, &params, grpc_deadline, tenant.as_deref())?;
        let outputs = request.outputs.clone();
        let mut ticket = version.batcher.submit(request).inspect_err(|_| self.admission.settle(&admitted, Some(0)))?;
        let deadline = admitted.deadline;
        let answer = tokio::time::timeout_at(deadline.into(), ticket.answer()).await;
        let expired = || {
            InferError::Expired(format!(
                "model '{}' version {}: deadline exceeded after {} µs, before the answer was ready",
                version.spec.name,
                version.spec.version,
                call.received.elapsed().as_micros()
            ))
        };
        match answer {
            Ok(Ok(response)) => {
                let cost_us = response.timing.cost_us;
                self.admission.settle(&admitted, Some(cost_us));
                version.metrics.add_cost(admitted.tenant_label(), cost_us as f64 / 1e6);
                // Never answer OK after the deadline, even by a hair.
                let answered = Instant::now();
                if answered > deadline {
                    version.metrics.rejected("deadline").increment(1);
                    return Err(expired());
                }
                let server_us = answered.saturating_duration_since(call.received).as_micros() as u64;
                Ok(encode::infer_response(req.id.clone(), &version.spec, &outputs, response, server_us))
            }
            Err(_elapsed) => {
                // Still queued: never computed, refund it (the scheduler's
                // own expiry races this timer). Dispatched: it may be
                // computing now, and the estimate stands as its cost.
                self.admission.settle(&admitted, if ticket.dispatched() { None } else { Some(0) });
                version.metrics.rejected("deadline").increment(1);
                Err(expired())
            }
            Ok(Err(e)) => {
                // Expired in the queue or refused at shutdown: never
                // computed, nothing to charge. A model failure did compute.
                let computed = matches!(e, InferError::ModelFailed { .. });
                self.admission.settle(&admitted, if computed { None } else { Some(0) });
                Err(e)
            }
        }
    }
}

fn duration(stat: &DurationStat) -> Option<pb::StatisticDuration> {
    let (count, ns) = stat.read();
    Some(pb::StatisticDuration { count, ns })
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
        let r = request.into_inner();
        self.version(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelReadyResponse { ready: self.ready.load(Ordering::Acquire) }))
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
        let r = request.into_inner();
        let version = self.version(&r.name, &r.version)?;
        let model = router::model(&self.repo, &r.name).map_err(|e| status::to_status(&e))?;
        Ok(Response::new(encode::model_metadata(model, &version.spec)))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = request.into_inner();
        let version = self.version(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(encode::model_config(&version.spec, &version.config)),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = request.into_inner();
        let mut model_stats = Vec::new();
        if r.name.is_empty() {
            for m in self.repo.models.values() {
                for (v, served) in &m.versions {
                    model_stats.push(statistics(&m.name, *v, &served.stats));
                }
            }
        } else if r.version.is_empty() {
            let m = router::model(&self.repo, &r.name).map_err(|e| status::to_status(&e))?;
            for (v, served) in &m.versions {
                model_stats.push(statistics(&m.name, *v, &served.stats));
            }
        } else {
            let served = self.version(&r.name, &r.version)?;
            model_stats.push(statistics(&r.name, served.spec.version, &served.stats));
        }
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        _: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let models = self
            .repo
            .models
            .values()
            .flat_map(|m| {
                m.versions.keys().map(|v| pb::repository_index_response::ModelIndex {
                    name: m.name.clone(),
                    version: v.to_string(),
                    state: "READY".into(),
                    reason: String::new(),
                })
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let call = CallContext {
            received: Instant::now(),
            grpc_deadline: request.extensions().get::<GrpcDeadline>().copied(),
            tenant: request.metadata().get(TENANT_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string),
        };
        let req = request.into_inner();
        let version = match router::route(&self.repo, &req.model_name, &req.model_version) {
            Ok(v) => v,
            // Unknown names are not metric labels: a client could grow the set.
            Err(e) => return Err(status::to_status(&e)),
        };
        let result = self.infer(&req, &version, &call).await;
        let elapsed = call.received.elapsed();
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => status::code(e),
        };
        version.metrics.requests(status::code_name(code)).increment(1);
        version.metrics.request_duration.record(elapsed.as_secs_f64());
        match result {
            Ok(response) => {
                version.stats.success.add(1, elapsed);
                Ok(Response::new(response))
            }
            Err(e) => {
                version.stats.fail.add(1, elapsed);
                if let Some(reason) = e.rejection_reason() {
                    version.metrics.rejected(reason).increment(1);
                }
                Err(status::to_status(&e))
            }
        }
    }
}

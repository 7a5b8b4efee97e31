//! `kiln.admin.v1.Admin`: the operator service: the drift report (which
//! reveals the reference histograms of the training data) and the release
//! controls, each change written to the audit log before it is answered.
//! The door (`ingress`) lets only admins in.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use crate::api::admin_pb::{self, admin_server::Admin};
use crate::api::status;
use crate::error::InferError;
use crate::monitor::audit::{AuditLog, Entry};
use crate::monitor::drift::DriftState;
use crate::pipeline::router;
use crate::repository::release::Action;
use crate::repository::{LiveRepository, ServedModel};
use crate::runtime::Runtime;

pub struct AdminService {
    repo: Arc<LiveRepository>,
    runtime: Arc<Runtime>,
    audit: Arc<AuditLog>,
}

impl AdminService {
    pub fn new(runtime: Arc<Runtime>, audit: Arc<AuditLog>) -> Self {
        Self { repo: runtime.repo.clone(), runtime, audit }
    }

    /// Runs one release action for the admin the door named, records it
    /// in the audit log (refusals too) and answers the new state.
    async fn change(
        &self,
        request: Request<admin_pb::ReleaseChange>,
        action: impl FnOnce(&admin_pb::ReleaseChange) -> Result<Action, Status>,
    ) -> Result<Response<admin_pb::ReleaseState>, Status> {
        let who = super::admin_name(&request);
        let req = request.into_inner();
        if req.model.is_empty() {
            return Err(Status::invalid_argument("field 'model': name the model"));
        }
        let action = action(&req)?;
        let runtime = self.runtime.clone();
        let (model, act, by) = (req.model.clone(), action.clone(), who.clone());
        let done = tokio::task::spawn_blocking(move || runtime.release(&model, &act, &by))
            .await
            .map_err(|e| Status::internal(format!("the change stopped: {e}")))?;
        let (before, after, outcome) = match &done {
            Ok((before, after)) => (Some(before), Some(after), "ok".to_string()),
            Err(e) => (None, None, e.to_string()),
        };
        self.audit.record(&Entry {
            time_ms: crate::monitor::unix_ms(),
            who: &who,
            action: action.name(),
            model: &req.model,
            reason: &req.reason,
            outcome: &outcome,
            before,
            after,
        });
        done.map_err(|e| status::to_status(&e))?;
        self.state(&req.model)
    }

    fn state(&self, name: &str) -> Result<Response<admin_pb::ReleaseState>, Status> {
        let repo = self.repo.get();
        let model = router::model(&repo, name).map_err(|e| status::to_status(&e))?;
        Ok(Response::new(release_state(model)))
    }
}

fn release_state(model: &ServedModel) -> admin_pb::ReleaseState {
    let r = &model.release;
    admin_pb::ReleaseState {
        model: model.name.clone(),
        versions: model.versions.keys().map(u64::to_string).collect(),
        default_version: model.default_version.to_string(),
        promoted: r.promoted.map(|v| v.to_string()).unwrap_or_default(),
        paused: r.paused.is_some(),
        pause_reason: r.paused.clone().unwrap_or_default(),
        split: r.split.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
        updated_by: r.updated_by.clone(),
        updated_ms: r.updated_ms,
        shadow_version: r.shadow.as_ref().map(|s| s.version.to_string()).unwrap_or_default(),
        shadow_sample: r.shadow.as_ref().map_or(0.0, |s| s.sample),
        shadow_max_inflight: r.shadow.as_ref().map_or(0, |s| s.max_inflight),
    }
}

/// `version` as a number, naming the field when it is not one.
fn version_number(version: &str) -> Result<u64, Status> {
    version.parse().map_err(|_| Status::invalid_argument(format!("field 'version': a version number, got '{version}'")))
}

fn refused(e: InferError) -> Status {
    status::to_status(&e)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn drift_report(
        &self,
        request: Request<admin_pb::DriftReportRequest>,
    ) -> Result<Response<admin_pb::DriftReportResponse>, Status> {
        let req = request.into_inner();
        if req.model.is_empty() {
            return Err(Status::invalid_argument("field 'model': name the model whose drift to report"));
        }
        let version = router::route(&self.repo.get(), &req.model, &req.version).map_err(refused)?;
        let mut out = admin_pb::DriftReportResponse {
            model: version.spec.name.clone(),
            version: version.spec.version as i64,
            ..Default::default()
        };
        match version.drift.state() {
            DriftState::Off(why) => {
                out.state = "off".into();
                out.detail = why;
            }
            DriftState::Capturing { rows, needed } => {
                out.state = "capturing".into();
                out.detail = format!("capturing the reference from traffic: {rows} of {needed} rows");
            }
            DriftState::Collecting { rows, needed, reference_source } => {
                out.state = "collecting".into();
                out.detail = format!("the window holds {rows} rows; statistics start at {needed}");
                out.window_rows = rows;
                out.reference_source = reference_source;
            }
            DriftState::Ready { report, reference_source, evaluated } => {
                out.state = "ready".into();
                out.reference_source = reference_source;
                out.window_rows = report.rows;
                out.window_seconds = report.span.as_secs_f64();
                out.evaluated_ms = evaluated.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                out.features = report
                    .statistics
                    .into_iter()
                    .map(|s| admin_pb::FeatureDrift {
                        name: s.name,
                        kind: s.kind.name().into(),
                        statistic: s.statistic.into(),
                        value: s.value,
                        warn: s.warn,
                        alert: s.alert,
                        status: s.status.name().into(),
                        edges: s.edges,
                        reference: s.reference,
                        live: s.live,
                        out_of_range_rate: s.out_of_range_rate,
                        missing_rate: s.missing_rate,
                        non_finite_rate: s.non_finite_rate,
                    })
                    .collect();
                out.classes = report
                    .classes
                    .into_iter()
                    .map(|c| admin_pb::ClassRate { name: c.name, reference: c.reference, live: c.live })
                    .collect();
                if let Some((reference, live)) = report.unknown_token_rate {
                    out.reference_unknown_token_rate = reference;
                    out.live_unknown_token_rate = live;
                }
            }
        }
        Ok(Response::new(out))
    }

    async fn release_status(
        &self,
        request: Request<admin_pb::ReleaseChange>,
    ) -> Result<Response<admin_pb::ReleaseState>, Status> {
        self.state(&request.into_inner().model)
    }

    async fn promote(
        &self,
        request: Request<admin_pb::ReleaseChange>,
    ) -> Result<Response<admin_pb::ReleaseState>, Status> {
        self.change(request, |r| Ok(Action::Promote(version_number(&r.version)?))).await
    }

    async fn rollback(
        &self,
        request: Request<admin_pb::ReleaseChange>,
    ) -> Result<Response<admin_pb::ReleaseState>, Status> {
        self.change(request, |_| Ok(Action::Rollback)).await
    }

    async fn pause(
        &self,
        request: Request<admin_pb::ReleaseChange>,
    ) -> Result<Response<admin_pb::ReleaseState>, Status> {
        self.change(request, |r| {
            let reason = if r.reason.is_empty() { "paused by an admin".to_string() } else { r.reason.clone() };
            Ok(Action::Pause(reason))
        })
        .await
    }

    async fn resume(
        &self,
        request: Request<admin_pb::ReleaseChange>,
    ) -> Result<Response<admin_pb::ReleaseState>, Status> {
        self.change(request, |_| Ok(Action::Resume)).await
    }

    async fn split(
        &self,
        request: Request<admin_pb::ReleaseChange>,
    ) -> Result<Response<admin_pb::ReleaseState>, Status> {
        self.change(request, |r| {
            let weights = r.weights.iter().map(|(v, w)| Ok((version_number(v)?, *w))).collect::<Result<_, Status>>()?;
            Ok(Action::Split(weights))
        })
        .await
    }

    async fn shadow(
        &self,
        request: Request<admin_pb::ReleaseChange>,
    ) -> Result<Response<admin_pb::ReleaseState>, Status> {
        self.change(request, |r| {
            if r.version.is_empty() {
                return Ok(Action::Shadow(None));
            }
            let shadow = crate::repository::release::Shadow {
                version: version_number(&r.version)?,
                sample: if r.sample == 0.0 { 1.0 } else { r.sample },
                max_inflight: if r.max_inflight == 0 { 8 } else { r.max_inflight },
            };
            Ok(Action::Shadow(Some(shadow)))
        })
        .await
    }
}

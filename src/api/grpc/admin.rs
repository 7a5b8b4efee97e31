//! `kiln.admin.v1.Admin`: the operator service. It only reads for now (the
//! drift report, which reveals the reference histograms of the training
//! data); the door (`ingress`) lets only admins in.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use crate::api::admin_pb::{self, admin_server::Admin};
use crate::api::status;
use crate::monitor::drift::DriftState;
use crate::pipeline::router;
use crate::repository::LiveRepository;

pub struct AdminService {
    repo: Arc<LiveRepository>,
}

impl AdminService {
    pub fn new(repo: Arc<LiveRepository>) -> Self {
        Self { repo }
    }
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
        let version = router::route(&self.repo.get(), &req.model, &req.version).map_err(|e| status::to_status(&e))?;
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
}

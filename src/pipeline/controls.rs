//! The release controls around one request, the same for every front end:
//! the canary split picks the version, a tripped breaker or a paused model
//! sends the request to the model's fallback, a shadow version gets a copy,
//! an unmeetable deadline may fall back too, and the answer is counted on
//! the version that gave it. A front end supplies its request as a
//! [`FrontRequest`] (decodable against any version of the model) and
//! encodes the [`Served`] answer in its own protocol.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Answer, Call, Decoded, Pipeline, fallback, router, shadow};
use crate::error::InferError;
use crate::monitor::metrics::FALLBACK_TOTAL;
use crate::repository::{Repository, ServedModel, ServedVersion};

/// A front end's request, as the controls need it.
pub trait FrontRequest: Send + Sync + 'static {
    fn model(&self) -> &str;
    /// The version asked for; empty for the model's choice.
    fn version(&self) -> &str;
    /// What keeps a request on one side of a canary split (made only when
    /// the model has one).
    fn routing_key(&self) -> Vec<u8>;
    /// The request decoded against `version`'s declared interface.
    fn decode(&self, version: &ServedVersion) -> Result<Decoded, InferError>;
}

/// An answer and the version whose interface it follows.
pub struct Served {
    pub version: Arc<ServedVersion>,
    pub answer: Answer,
    /// `reason: why` when the model's fallback answered instead.
    pub fallback: Option<String>,
}

/// A response parameter's value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum AnswerParam {
    Int(u64),
    Str(String),
}

impl Served {
    /// The parameters every answer carries, on every front end: where the
    /// time went (`server_us`: receipt to answer, within the deadline by
    /// construction), exactly which weights computed it, and why the
    /// fallback answered when it did.
    pub fn parameters(&self) -> Vec<(&'static str, AnswerParam)> {
        let (spec, t) = (&self.version.spec, self.answer.response.timing);
        let mut out = vec![
            ("server_us", AnswerParam::Int(self.answer.server_us)),
            ("queue_us", AnswerParam::Int(t.queue_us)),
            ("compute_us", AnswerParam::Int(t.compute_us)),
            ("batch_size", AnswerParam::Int(t.batch_size)),
            ("cost_us", AnswerParam::Int(t.cost_us)),
            ("model_version", AnswerParam::Str(spec.version.to_string())),
            ("weights_sha256", AnswerParam::Str(spec.weights_sha256.clone())),
        ];
        if let Some(note) = &self.fallback {
            out.push(("fallback", AnswerParam::Str(note.clone())));
        }
        out
    }
}

/// Routes, runs and counts one request under its model's release controls.
/// Errors before a version is chosen (unknown model or version, a paused
/// model without a fallback) are not counted: their names come from the
/// client, and metric labels must not.
pub async fn serve<R: FrontRequest>(
    pipeline: &Arc<Pipeline>,
    repo: &Repository,
    req: &Arc<R>,
    call: &Call,
) -> Result<Served, InferError> {
    let routed = router::route_infer(repo, req.model(), req.version(), || req.routing_key());
    let fallback = repo.models.get(req.model()).filter(|m| m.config.fallback.is_some());
    let version = match (routed, fallback) {
        (Ok(version), Some(model)) => match version.breaker.tripped() {
            Some(why) => return fall_back(pipeline, repo, model, &version, req.as_ref(), call, "unhealthy", why).await,
            None => version,
        },
        (Ok(version), None) => version,
        (Err(e), Some(model)) if model.release.paused.is_some() => {
            let Some(primary) = model.versions.get(&model.default_version) else {
                return Err(e);
            };
            return fall_back(pipeline, repo, model, primary, req.as_ref(), call, "paused", e.to_string()).await;
        }
        (Err(e), _) => return Err(e),
    };
    let shadow = shadow_copy(pipeline, repo, req, &version, call);
    let result = run(pipeline, req.as_ref(), &version, call, false).await;
    version.breaker.record(&result);
    if let (Some(shadow), Ok(answer)) = (shadow, &result) {
        let _ = shadow.send(answer.clone());
    }
    if let (Err(e @ InferError::DeadlineUnmeetable(_)), Some(model)) = (&result, fallback)
        && model.config.fallback_on_deadline
    {
        let why = e.to_string();
        if let Ok(served) = fall_back(pipeline, repo, model, &version, req.as_ref(), call, "deadline", why).await {
            return Ok(served);
        }
    }
    let answer = finish(&version, call, result)?;
    Ok(Served { version, answer, fallback: None })
}

/// Answers with `model`'s fallback because `primary` cannot (`reason`
/// labels the count, `why` goes in the answer's `fallback` parameter). An
/// error when no fallback can answer either.
#[allow(clippy::too_many_arguments)]
async fn fall_back(
    pipeline: &Pipeline,
    repo: &Repository,
    model: &ServedModel,
    primary: &Arc<ServedVersion>,
    req: &dyn FrontRequest,
    call: &Call,
    reason: &'static str,
    why: String,
) -> Result<Served, InferError> {
    let target = fallback::resolve(repo, model, &primary.spec)
        .map_err(|m| InferError::Unavailable(format!("{why}; the fallback cannot answer: {m}")))?;
    let served = match target {
        fallback::Target::Version(version) => {
            let result = run(pipeline, req, &version, call, false).await;
            version.breaker.record(&result);
            let answer = finish(&version, call, result)?;
            Served { version, answer, fallback: None }
        }
        fallback::Target::Answer(fixed) => {
            let result = req.decode(primary).map(|d| Answer {
                response: fallback::fixed_answer(fixed, &primary.spec, &d.outputs, d.rows),
                units: d.rows,
                id: d.id,
                outputs: d.outputs,
                server_us: call.received.elapsed().as_micros() as u64,
            });
            Served { version: primary.clone(), answer: finish(primary, call, result)?, fallback: None }
        }
    };
    metrics::counter!(FALLBACK_TOTAL, "model" => model.name.clone(), "reason" => reason).increment(1);
    Ok(Served { fallback: Some(format!("{reason}: {why}")), ..served })
}

/// Under shadow traffic, maybe copies the request to the candidate version
/// on its own task (lowest priority, bounded in flight); the returned
/// sender takes the primary's answer to compare with. Nothing the copy
/// does reaches the caller.
fn shadow_copy<R: FrontRequest>(
    pipeline: &Arc<Pipeline>,
    repo: &Repository,
    req: &Arc<R>,
    primary: &Arc<ServedVersion>,
    call: &Call,
) -> Option<tokio::sync::oneshot::Sender<Answer>> {
    let model = repo.models.get(&primary.spec.name)?;
    let copy = model.release.shadow.as_ref()?;
    if copy.version == primary.spec.version || rand::random::<f64>() >= copy.sample {
        return None;
    }
    let target = model.versions.get(&copy.version)?.clone();
    if target.shadow_inflight.fetch_add(1, Ordering::AcqRel) >= copy.max_inflight {
        target.shadow_inflight.fetch_sub(1, Ordering::AcqRel);
        shadow::dropped(&model.name, "inflight");
        return None;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<Answer>();
    let (pipeline, req, call, primary) = (pipeline.clone(), req.clone(), call.clone(), primary.clone());
    tokio::spawn(async move {
        let result = run(&pipeline, req.as_ref(), &target, &call, true).await;
        let seconds = call.received.elapsed().as_secs_f64();
        target.shadow_inflight.fetch_sub(1, Ordering::AcqRel);
        let name = &target.spec.name;
        match (result, rx.await) {
            (Ok(answer), Ok(first)) => {
                let comparisons = shadow::compare((&primary.spec, &first), (&target.spec, &answer));
                shadow::record(name, target.spec.version, seconds, &comparisons);
            }
            (Err(_), _) => shadow::dropped(name, "refused"),
            (Ok(_), Err(_)) => shadow::dropped(name, "primary_failed"),
        }
    });
    Some(tx)
}

/// Decodes the request against `version` and runs it through the
/// pipeline; a shadow copy runs at the model's lowest priority and never
/// counts toward drift.
async fn run(
    pipeline: &Pipeline,
    req: &dyn FrontRequest,
    version: &ServedVersion,
    call: &Call,
    shadow: bool,
) -> Result<Answer, InferError> {
    let mut decoded = req.decode(version).inspect_err(|e| {
        if let InferError::NonFinite { input, column, .. } = e
            && !shadow
        {
            version.drift.refused_non_finite(*input, *column);
        }
    })?;
    if shadow {
        decoded.params.priority = Some(u64::from(version.config.priority_levels));
    }
    pipeline.infer(version, decoded, call).await
}

/// Counts a request's answer on the version that gave it: by code, its
/// latency, the statistics extension's figures, and a refusal's reason.
fn finish(version: &ServedVersion, call: &Call, result: Result<Answer, InferError>) -> Result<Answer, InferError> {
    let elapsed = call.received.elapsed();
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(e) => crate::api::status::code(e),
    };
    version.metrics.requests(crate::api::status::code_name(code), call.protocol).increment(1);
    version.metrics.request_duration(call.protocol).record(elapsed.as_secs_f64());
    match &result {
        Ok(_) => version.stats.success.add(1, elapsed),
        Err(e) => {
            version.stats.fail.add(1, elapsed);
            if let Some(reason) = e.rejection_reason() {
                version.metrics.rejected(reason).increment(1);
            }
        }
    }
    result
}

//! One request's path, shared by every front end. A front end decodes its
//! message into a [`Decoded`] request for the version [`router`] picked and
//! calls [`Pipeline::infer`], which takes it through the stages, each a
//! type built once by the stage that knows it:
//!
//! `Decoded` → [`Prepared`] (tokenized, sized) → admitted ([`InferRequest`]
//! with its priority and deadline, and the tenant's [`Charge`](admission::Charge)) → queued
//! (a [`Ticket`](crate::batcher::scheduler::Ticket)) → answered
//! ([`Answer`]), settling the tenant's budget whatever happens.

pub mod admission;
pub mod controls;
pub mod fallback;
pub mod params;
pub mod router;
pub mod shadow;
pub mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::error::InferError;
use crate::model::tokenize::{PrepareError, Tokenization, TokenizeError, TokenizeOptions};
use crate::model::{self, Inputs, Tensor};
use crate::repository::ServedVersion;
use crate::request::{InferRequest, InferResponse};
use crate::server::drain::Drain;
use admission::{Admission, VersionLimits};
use params::RequestParams;

/// Stage 1, built by a front end's decoder: inputs checked against the
/// version's declared interface, and Kiln's parameters.
#[derive(Debug)]
pub struct Decoded {
    /// The client's request id, echoed in the answer.
    pub id: String,
    /// One tensor per declared input, in declared order.
    pub inputs: Vec<Tensor>,
    /// Rows along the batch dimension.
    pub rows: usize,
    /// Indices into the declared outputs, in the order to answer.
    pub outputs: Vec<usize>,
    pub params: RequestParams,
}

/// What a front end knows of the call beyond its message.
#[derive(Debug, Clone)]
pub struct Call {
    /// When the server received it: the start of its latency and deadline.
    pub received: Instant,
    /// The transport's own deadline (gRPC's `grpc-timeout`).
    pub deadline: Option<Instant>,
    /// Who is calling: its tenant is the one it spends (auth on).
    pub caller: crate::security::Caller,
    /// The tenant the transport names (`x-kiln-tenant`) when the request's
    /// `tenant` parameter does not.
    pub tenant: Option<String>,
    /// The front end it came through.
    pub protocol: crate::monitor::metrics::Protocol,
}

/// Stage 2: inputs in the form the backend computes on (token rows for
/// text), and the size the batcher plans with (tokens for text).
#[derive(Debug)]
pub struct Prepared {
    pub id: String,
    pub inputs: Inputs,
    pub rows: usize,
    pub outputs: Vec<usize>,
    pub params: RequestParams,
    pub size: model::Prepared,
}

/// The last stage: a computed answer within its deadline.
#[derive(Debug, Clone)]
pub struct Answer {
    pub id: String,
    /// Indices into the declared outputs, in the order answered.
    pub outputs: Vec<usize>,
    pub response: InferResponse,
    /// Receipt to answer, never past the deadline.
    pub server_us: u64,
    /// Real units computed: rows, or unpadded tokens for text (what
    /// OpenAI's `usage.prompt_tokens` reports).
    pub units: usize,
}

/// The stages' shared state: tenant budgets and the tokenization service.
pub struct Pipeline {
    admission: Admission,
    tokenization: Tokenization,
    drain: Arc<Drain>,
    /// Calls between entering `infer` and leaving it: a request alone in
    /// the server may take a batcher's inline lane; with others in flight
    /// it queues, where they can share its batch.
    calls: AtomicUsize,
}

/// Counts one call in `infer` while it lives.
struct InCall<'a>(&'a AtomicUsize);

impl<'a> InCall<'a> {
    fn enter(calls: &'a AtomicUsize) -> Self {
        calls.fetch_add(1, Ordering::AcqRel);
        Self(calls)
    }
}

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pipeline {
    pub fn new(admission: Admission, tokenization: Tokenization, drain: Arc<Drain>) -> Self {
        Self { admission, tokenization, drain, calls: AtomicUsize::new(0) }
    }

    /// Stops the tokenization service once its queued work is done.
    pub fn close(&self) {
        self.tokenization.close();
    }

    /// Prepares, admits, queues and waits for one request (bounded by its
    /// deadline), settling the tenant's budget whatever happens.
    pub async fn infer(&self, version: &ServedVersion, decoded: Decoded, call: &Call) -> Result<Answer, InferError> {
        let _in_call = InCall::enter(&self.calls);
        let tenant = Some(call.caller.tenant_for(decoded.params.tenant.as_deref(), call.tenant.as_deref())?);
        let limits = VersionLimits {
            model: &version.spec.name,
            number: version.spec.version,
            config: &version.config,
            estimate: version.latency.estimate(),
        };
        let deadline = Admission::deadline(&version.config, call.received, &decoded.params, call.deadline);
        let precheck = || self.admission.precheck(&limits, deadline, version.batcher.depth(), tenant.as_deref());
        let prepared = self.prepare(version, decoded, deadline, precheck).await?;
        let decision = self.admission.admit(
            &limits,
            prepared.rows,
            &prepared.size,
            &prepared.params,
            deadline,
            tenant.as_deref(),
        )?;
        let charge = decision.charge;
        let (id, outputs, units) = (prepared.id.clone(), prepared.outputs.clone(), prepared.size.units);
        let request = InferRequest {
            id: prepared.id,
            inputs: prepared.inputs,
            rows: prepared.rows,
            outputs: prepared.outputs,
            received: call.received,
            priority: decision.priority,
            deadline,
            size: prepared.size,
        };
        let alone = self.calls.load(Ordering::Acquire) == 1;
        let mut ticket =
            version.batcher.submit_with(request, alone).inspect_err(|_| self.admission.settle(&charge, Some(0)))?;
        let answer = tokio::select! {
            answer = tokio::time::timeout_at(deadline.into(), ticket.answer()) => answer,
            _ = self.drain.expired() => {
                // The drain timeout passed before the answer: UNAVAILABLE,
                // counted, and refunded unless it may be computing.
                self.admission.settle(&charge, if ticket.dispatched() { None } else { Some(0) });
                version.metrics.rejected("drain").increment(1);
                return Err(InferError::Unavailable(format!(
                    "model '{}': the server shut down (drain_timeout) before the answer was ready",
                    version.spec.name
                )));
            }
        };
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
                self.admission.settle(&charge, Some(cost_us));
                version.metrics.add_cost(charge.tenant_label(), cost_us as f64 / 1e6);
                // Never answer OK after the deadline, even by a hair.
                let answered = Instant::now();
                if answered > deadline {
                    version.metrics.rejected("deadline").increment(1);
                    return Err(expired());
                }
                let server_us = answered.saturating_duration_since(call.received).as_micros() as u64;
                Ok(Answer { id, outputs, response, server_us, units })
            }
            Err(_elapsed) => {
                // Still queued: never computed, refund it (the scheduler's
                // own expiry races this timer). Dispatched: it may be
                // computing now, and the estimate stands as its cost.
                self.admission.settle(&charge, if ticket.dispatched() { None } else { Some(0) });
                version.metrics.rejected("deadline").increment(1);
                Err(expired())
            }
            Ok(Err(e)) => {
                // Expired in the queue or refused at shutdown: never
                // computed, nothing to charge. A model failure did compute.
                let computed = matches!(e, InferError::ModelFailed { .. });
                self.admission.settle(&charge, if computed { None } else { Some(0) });
                Err(e)
            }
        }
    }

    /// Prepares the inputs (tokenizes text) on the tokenization service and
    /// sizes the request for the batcher. Refusals that need no token count
    /// (size limits, then `precheck`: deadline, queue, tenant budget) come
    /// first, so no tokenizer time is spent on a request refused anyway.
    async fn prepare(
        &self,
        version: &ServedVersion,
        decoded: Decoded,
        deadline: Instant,
        precheck: impl FnOnce() -> Result<(), InferError>,
    ) -> Result<Prepared, InferError> {
        let Decoded { id, inputs, rows, outputs, params } = decoded;
        let options = params.text;
        let prepared = |inputs, size| Prepared { id, inputs, rows, outputs, params, size };
        let Some(tokenizer) = &version.model.tokenizer else {
            if options != TokenizeOptions::default() {
                return Err(InferError::InvalidArgument(format!(
                    "parameters 'max_tokens' and 'truncate' apply to text models; model '{}' takes {}",
                    version.spec.name, version.spec.platform
                )));
            }
            return Ok(prepared(Inputs::Tensors(inputs), model::Prepared::rows(rows)));
        };
        let failed = |reason: String| InferError::ModelFailed {
            model: version.spec.name.clone(),
            version: version.spec.version,
            reason,
        };
        tokenizer.check_size(&inputs).map_err(|e| match e {
            model::ModelError::Input(message) => InferError::InvalidArgument(message),
            other => failed(other.to_string()),
        })?;
        precheck()?;
        let (tokens, size) =
            self.tokenization.encode(tokenizer, inputs, options, deadline).await.map_err(|e| match e {
                TokenizeError::Input(message) => InferError::InvalidArgument(message),
                TokenizeError::Service(e @ PrepareError::QueueFull { .. }) => InferError::Overloaded {
                    reason: "prepare_queue",
                    message: format!("model '{}': {e}", version.spec.name),
                },
                TokenizeError::Service(e @ PrepareError::Expired) => {
                    InferError::Expired(format!("model '{}': {e}", version.spec.name))
                }
                TokenizeError::Service(e) => failed(e.to_string()),
                TokenizeError::Failed(reason) => failed(reason),
            })?;
        Ok(prepared(Inputs::Tokens(tokens), size))
    }
}

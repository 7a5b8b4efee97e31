//! Kiln's own request and response types, shared by the stages behind the
//! API: validated inputs in, split outputs and timings out.

use std::time::Instant;

use crate::model::{Inputs, Prepared, Tensor};

/// A validated inference request for one model version.
#[derive(Debug)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: String,
    /// What the backend computes on: one tensor per declared input (in
    /// declared order), or a text model's token rows.
    pub inputs: Inputs,
    /// Rows along the batch dimension (the same for every input).
    pub rows: usize,
    /// Indices into the model's declared outputs, in the order to answer.
    pub outputs: Vec<usize>,
    /// When the server received it; the start of its latency.
    pub received: Instant,
    /// Its priority level, 1 the highest (set at admission).
    pub priority: u32,
    /// When its answer is due at the latest (set at admission).
    pub deadline: Instant,
    /// Its size as the batcher plans with it (tokens for text), set when
    /// its inputs are prepared.
    pub size: Prepared,
}

impl InferRequest {
    /// Units it costs computed alone: its rows, padded to its longest row.
    pub fn padded_units(&self) -> usize {
        self.rows * self.size.longest
    }

    /// A one-row request of `input` (a row model's one input), answering
    /// output 0 at priority 1 within 60 s: for in-process callers (tests,
    /// benches) that drive a batcher directly.
    pub fn row(input: Tensor) -> Self {
        let now = Instant::now();
        Self {
            id: String::new(),
            inputs: Inputs::Tensors(vec![input]),
            rows: 1,
            outputs: vec![0],
            received: now,
            priority: 1,
            deadline: now + std::time::Duration::from_secs(60),
            size: Prepared::rows(1),
        }
    }
}

/// Where a request's time went, returned as response parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// Waiting in the queue, from enqueue to batch dispatch.
    pub queue_us: u64,
    /// The whole batch's compute time.
    pub compute_us: u64,
    /// Requests in the batch that computed this answer.
    pub batch_size: u64,
    /// This request's share of the batch's compute time (its real units
    /// over the batch's real units).
    pub cost_us: u64,
}

/// A computed answer: the requested outputs, in the requested order.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub outputs: Vec<Tensor>,
    pub timing: Timing,
}

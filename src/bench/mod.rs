//! `kiln bench`: a load generator for a running server. Closed loop (N
//! clients, each sending its next request when the last is answered) and
//! open loop (Poisson arrivals at a fixed rate, latency counted from the
//! intended send time so a stalled server cannot hide behind a slowed
//! client: no coordinated omission). Every request sent is accounted for,
//! by gRPC code.

pub mod find;
pub mod inputs;
pub mod report;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use crate::api::pb;
use crate::client::{Client, ClientError, int_parameter};
pub use inputs::RequestPool;
pub use report::{Report, StepReport};

/// One load step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// This many clients in a closed loop.
    Concurrency(usize),
    /// Poisson arrivals at this many requests per second.
    Rate(f64),
}

/// Everything one `kiln bench` run needs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub url: String,
    /// TLS and the API key.
    pub credentials: crate::client::Credentials,
    pub model: String,
    pub version: String,
    pub steps: Vec<Load>,
    /// Each step stops after this long...
    pub duration: Duration,
    /// ...or after this many requests, whichever comes first.
    pub max_requests: Option<u64>,
    /// HTTP/2 connections the load is spread over.
    pub connections: usize,
    /// Rows (texts) per request.
    pub rows: usize,
    /// CSV rows or text lines to send instead of generated inputs.
    pub input_file: Option<std::path::PathBuf>,
    /// Requests in flight at most in an open loop; arrivals beyond it are
    /// counted as `CLIENT_OVERLOADED` rather than queued in the client.
    pub max_in_flight: usize,
    /// A progress line on stderr (when it is a terminal).
    pub progress: bool,
}

/// Why a bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Connect(#[from] ClientError),
    #[error("model '{0}': {1}")]
    Metadata(String, String),
    #[error(transparent)]
    Inputs(#[from] inputs::InputError),
    #[error("{0}")]
    Options(String),
}

/// What one step observed, shared by its request tasks.
struct Recorder {
    pub(crate) latency_us: Histogram<u64>,
    /// Of OK answers: latency minus the server's queue and compute time,
    /// i.e. the network, gRPC, decoding, encoding and the client.
    pub(crate) outside_us: Histogram<u64>,
    pub(crate) codes: BTreeMap<String, u64>,
    pub(crate) sent: u64,
    pub(crate) queue_us: u64,
    pub(crate) compute_us: u64,
    pub(crate) batch_size: u64,
    /// OK answers carrying the server's timing parameters.
    pub(crate) timed: u64,
    /// Their queue and compute times, in µs.
    pub(crate) queue_h: Histogram<u64>,
    pub(crate) compute_h: Histogram<u64>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            // 1 µs to 10 min at 3 significant digits; larger values saturate.
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid"),
            outside_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid"),
            codes: BTreeMap::new(),
            sent: 0,
            queue_us: 0,
            compute_us: 0,
            batch_size: 0,
            timed: 0,
            queue_h: Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid"),
            compute_h: Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid"),
        }
    }

    fn record(&mut self, latency: Duration, outcome: &Result<pb::ModelInferResponse, tonic::Status>) {
        let code = match outcome {
            Ok(response) => {
                self.latency_us.saturating_record(latency.as_micros().max(1) as u64);
                if let (Some(q), Some(c), Some(b)) = (
                    int_parameter(response, "queue_us"),
                    int_parameter(response, "compute_us"),
                    int_parameter(response, "batch_size"),
                ) {
                    let inside = (q.max(0) + c.max(0)) as u64;
                    self.outside_us.saturating_record((latency.as_micros() as u64).saturating_sub(inside).max(1));
                    self.queue_us += q.max(0) as u64;
                    self.compute_us += c.max(0) as u64;
                    self.batch_size += b.max(0) as u64;
                    self.timed += 1;
                    self.queue_h.saturating_record(q.max(0) as u64);
                    self.compute_h.saturating_record(c.max(0) as u64);
                }
                "OK".to_string()
            }
            Err(status) => code_name(status.code()),
        };
        *self.codes.entry(code).or_default() += 1;
    }
}

/// The gRPC code's canonical name, e.g. `DEADLINE_EXCEEDED`.
pub fn code_name(code: tonic::Code) -> String {
    let words = format!("{code:?}");
    let mut out = String::new();
    for (i, ch) in words.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// Connected clients and the requests to send, shared by every step.
struct Session {
    clients: Vec<Client>,
    pool: Arc<RequestPool>,
}

impl Session {
    async fn open(options: &BenchOptions) -> Result<Self, BenchError> {
        let mut clients = Vec::new();
        for _ in 0..options.connections.max(1) {
            clients.push(Client::connect_with(&options.url, &options.credentials).await?);
        }
        let metadata = clients[0]
            .raw
            .model_metadata(pb::ModelMetadataRequest { name: options.model.clone(), version: options.version.clone() })
            .await
            .map_err(|s| BenchError::Metadata(options.model.clone(), s.message().to_string()))?
            .into_inner();
        let pool = Arc::new(RequestPool::new(
            &metadata,
            &options.version,
            options.rows.max(1),
            options.input_file.as_deref(),
            256,
        )?);
        Ok(Self { clients, pool })
    }

    async fn step(&self, options: &BenchOptions, load: Load) -> StepReport {
        run_step(options, load, &self.clients, &self.pool).await
    }
}

fn report(options: &BenchOptions, steps: Vec<StepReport>) -> Report {
    Report {
        url: options.url.clone(),
        model: options.model.clone(),
        version: options.version.clone(),
        rows_per_request: options.rows.max(1),
        steps,
    }
}

/// Runs every step in order and reports each.
pub async fn run(options: &BenchOptions) -> Result<Report, BenchError> {
    if options.steps.is_empty() {
        return Err(BenchError::Options("no load steps: give --concurrency and/or --rate".into()));
    }
    let session = Session::open(options).await?;
    let mut steps = Vec::new();
    for load in &options.steps {
        steps.push(session.step(options, *load).await);
    }
    Ok(report(options, steps))
}

/// Open-loop steps searching for the highest rate that meets `target`:
/// doubling from `start` until a step fails, then bisecting. Every step
/// run is in the report, in the order run.
pub async fn find_max_rate(
    options: &BenchOptions,
    target: &find::Target,
    start: f64,
) -> Result<(find::Found, Report), BenchError> {
    if !(start.is_finite() && start > 0.0) {
        return Err(BenchError::Options(format!("starting rate {start}: must be a positive number")));
    }
    let session = Session::open(options).await?;
    let mut bracket = find::Bracket::default();
    let mut steps = Vec::new();
    while let Some(rate) = bracket.next(start, target) {
        let step = session.step(options, Load::Rate(rate)).await;
        bracket.record(rate, target.met_by(&step));
        steps.push(step);
    }
    Ok((bracket.found(), report(options, steps)))
}

async fn run_step(options: &BenchOptions, load: Load, clients: &[Client], pool: &Arc<RequestPool>) -> StepReport {
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let issued = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let end = started + options.duration;
    let budget = options.max_requests.unwrap_or(u64::MAX);
    // Takes a ticket to send one more request, if the step is not over.
    let take = {
        let issued = issued.clone();
        move || issued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < budget).then_some(n + 1)).ok()
    };
    let progress = options.progress && std::io::stderr().is_terminal();
    let ticker = progress.then(|| {
        let (recorder, stop, label) = (recorder.clone(), stop.clone(), describe(load));
        let total = options.duration;
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let done = recorder.lock().map(|r| r.codes.values().sum::<u64>()).unwrap_or(0);
                let fraction = (started.elapsed().as_secs_f64() / total.as_secs_f64()).min(1.0);
                let bar = "#".repeat((fraction * 30.0) as usize);
                eprint!("\r{label:>16} [{bar:<30}] {done} answered");
                let _ = std::io::stderr().flush();
            }
            eprint!("\r{:80}\r", "");
        })
    });

    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Concurrency(n) => {
            for worker in 0..n.max(1) {
                let mut client = clients[worker % clients.len()].clone();
                let (pool, recorder, take) = (pool.clone(), recorder.clone(), take.clone());
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let Some(i) = take() else { break };
                        let request = pool.get(i as usize);
                        let sent = Instant::now();
                        let outcome = client.raw.model_infer(request).await.map(|r| r.into_inner());
                        let mut r = recorder.lock().unwrap_or_else(|p| p.into_inner());
                        r.record(sent.elapsed(), &outcome);
                    }
                });
            }
        }
        Load::Rate(rate) => {
            // Pacing on an OS thread: tokio's timer rounds sleeps up to whole
            // milliseconds, which would send up to 1 ms late and charge the
            // lateness to the server.
            let (due, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
            let pacer_stop = stop.clone();
            let take = take.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(7);
                let mut intended = started;
                loop {
                    // Exponential gaps: a Poisson process at `rate`.
                    let gap = -(1.0 - rng.random::<f64>()).ln() / rate.max(1e-9);
                    intended += Duration::from_secs_f64(gap);
                    if intended >= end || pacer_stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Some(i) = take() else { break };
                    std::thread::sleep(intended.saturating_duration_since(Instant::now()));
                    if due.send((i, intended)).is_err() {
                        break;
                    }
                }
            });
            let in_flight = Arc::new(AtomicU64::new(0));
            let mut n = 0usize;
            while let Some((i, at)) = arrivals.recv().await {
                if in_flight.load(Ordering::Acquire) >= options.max_in_flight as u64 {
                    let mut r = recorder.lock().unwrap_or_else(|p| p.into_inner());
                    *r.codes.entry("CLIENT_OVERLOADED".into()).or_default() += 1;
                    continue;
                }
                in_flight.fetch_add(1, Ordering::AcqRel);
                let mut client = clients[n % clients.len()].clone();
                n += 1;
                let (pool, recorder, in_flight) = (pool.clone(), recorder.clone(), in_flight.clone());
                tasks.spawn(async move {
                    let request = pool.get(i as usize);
                    let outcome = client.raw.model_infer(request).await.map(|r| r.into_inner());
                    // From the intended send time, not the actual one.
                    let latency = at.elapsed();
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    let mut r = recorder.lock().unwrap_or_else(|p| p.into_inner());
                    r.record(latency, &outcome);
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Release);
    if let Some(t) = ticker {
        let _ = t.await;
    }
    let mut r = recorder.lock().unwrap_or_else(|p| p.into_inner());
    // Counted where each request was issued (its ticket), apart from where
    // answers are recorded, so a lost answer shows as sent > answered.
    r.sent = issued.load(Ordering::Acquire);
    StepReport::from_recorder(load, elapsed, &r)
}

/// `concurrency 8` or `rate 500/s`.
pub fn describe(load: Load) -> String {
    match load {
        Load::Concurrency(n) => format!("concurrency {n}"),
        Load::Rate(r) => format!("rate {r}/s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_canonical_ones() {
        assert_eq!(code_name(tonic::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
    }
}

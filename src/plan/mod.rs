//! `kiln plan`: recommends batching settings for a latency budget without a
//! brute-force sweep. It measures the model's batch-time curve in-process,
//! the per-request serving overhead and ceiling through a real server on
//! 127.0.0.1, then simulates the server's own batch policy (see `sim`)
//! under Poisson arrivals for each candidate configuration.

pub mod ceiling;
pub mod emit;
pub mod sim;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::batcher::policy::BatchPolicy;
use crate::bench::{BenchOptions, Load};
use crate::config::{RepositorySource, ServeConfig};
use crate::model::{Model, ModelSpec, Tensor};
use sim::{BatchCurve, SimResult, SimSetup, simulate};

/// The highest share of a measured capacity the planner will load.
const HEADROOM: f64 = 0.95;

/// Loads, as fractions of the measured ceiling, at which the serving path's
/// latency distribution is measured.
const TAIL_LOADS: [f64; 5] = [0.1, 0.3, 0.5, 0.7, 0.9];

/// What to plan for.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub repository: RepositorySource,
    pub model: String,
    /// p99 target for queue + compute + serving overhead.
    pub budget: Duration,
    /// Total rate to size replicas for.
    pub rate: Option<f64>,
    /// Requests per simulation run.
    pub sim_requests: usize,
}

/// Why planning failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Repository(#[from] crate::repository::RepositoryError),
    #[error("no model '{0}' in the repository")]
    NoModel(String),
    #[error("measuring the model: {0}")]
    Model(#[from] crate::model::ModelError),
    #[error("measuring through a server: {0}")]
    Serve(String),
}

/// The measurements the simulation runs on.
#[derive(Debug, Clone, Serialize)]
pub struct Measurements {
    /// (batch size, seconds) measured in-process.
    pub curve: Vec<(usize, f64)>,
    /// Mean time a request spends outside queue and compute, at one client.
    pub overhead_ms: f64,
    /// Answers per second a real server gave where raising its closed-loop
    /// clients stopped raising throughput: beyond it the serving path
    /// (gRPC, decode, encode, the client) saturates first.
    pub serving_ceiling: f64,
    /// How that ceiling was found: every reading, the level and the spread.
    pub serving_search: ceiling::Ceiling,
    /// Time outside queue and compute under open-loop load at fractions of
    /// the ceiling: on a small machine its tail, not the model, sets p99.
    pub serving_tail: Vec<ServingPoint>,
}

/// The serving path's own latency at one offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct ServingPoint {
    pub rate: f64,
    pub outside_ms: crate::bench::report::Percentiles,
}

impl ServingPoint {
    /// (quantile, seconds) points for the simulator.
    fn quantiles(&self) -> Vec<(f64, f64)> {
        let o = &self.outside_ms;
        [(0.5, o.p50), (0.9, o.p90), (0.99, o.p99), (0.999, o.p999), (1.0, o.max)]
            .iter()
            .map(|(q, ms)| (*q, ms / 1e3))
            .collect()
    }
}

/// The measured outside-time distribution at `rate`, linear between the
/// measured rates (and the nearest beyond them).
fn outside_at(tail: &[ServingPoint], rate: f64) -> Option<Vec<(f64, f64)>> {
    let first = tail.first()?;
    let last = tail.last()?;
    if rate <= first.rate {
        return Some(first.quantiles());
    }
    if rate >= last.rate {
        return Some(last.quantiles());
    }
    let i = tail.iter().position(|p| p.rate >= rate)?.max(1);
    let (a, b) = (&tail[i - 1], &tail[i]);
    let t = (rate - a.rate) / (b.rate - a.rate).max(1e-9);
    Some(a.quantiles().iter().zip(b.quantiles()).map(|((q, x), (_, y))| (*q, x + (y - x) * t)).collect())
}

/// One candidate configuration and its predicted capacity.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub max_batch_size: usize,
    pub max_queue_delay_ms: f64,
    pub instances: usize,
    /// Highest Poisson rate whose predicted p99 meets the budget.
    pub max_rate: f64,
    /// Predicted at `max_rate`.
    pub p99_ms: f64,
    pub mean_batch: f64,
    /// Limited by the serving path (gRPC, decode, encode, client) rather
    /// than the model and the batch policy.
    pub serving_bound: bool,
}

/// Predicted p99 at one offered rate, for the plot.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub rate: f64,
    pub p99_ms: f64,
    pub mean_batch: f64,
}

/// The planner's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model: String,
    pub budget_ms: f64,
    pub measured: Measurements,
    pub recommended: Candidate,
    /// The model's own `model.toml` settings, predicted the same way, to
    /// compare with `kiln bench` against a server running them.
    pub current: Candidate,
    pub current_p99_by_rate: Vec<CurvePoint>,
    pub candidates: Vec<Candidate>,
    /// Replicas needed for `--rate`, at the recommended settings.
    pub replicas: Option<u64>,
    pub rate: Option<f64>,
    pub p99_by_rate: Vec<CurvePoint>,
    pub seconds_taken: f64,
}

fn sample(spec: &ModelSpec, rows: usize) -> Vec<Tensor> {
    let sentences: Vec<&str> = crate::bench::inputs::sentences().collect();
    crate::model::sample_inputs(spec, rows, &|i| sentences[i % sentences.len()].as_bytes().to_vec())
}

/// Median seconds per batch at 1, 2, 4, ... `max_rows` rows.
pub fn measure_curve(model: &Model, max_rows: usize) -> Result<BatchCurve, PlanError> {
    let mut points = Vec::new();
    let mut rows = 1;
    while rows <= max_rows {
        let (inputs, _) = model.prepare(sample(&model.spec, rows), &Default::default())?;
        let model = model.backend.as_ref();
        model.run(&inputs)?;
        // Enough runs for a stable median, bounded to about a second.
        let mut times = Vec::new();
        let started = Instant::now();
        while times.len() < 5 || (times.len() < 200 && started.elapsed() < Duration::from_millis(300)) {
            let t = Instant::now();
            model.run(&inputs)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        points.push((rows, times[times.len() / 2]));
        rows *= 2;
    }
    Ok(BatchCurve { points })
}

/// Serving overhead and ceiling, through a real server on 127.0.0.1.
async fn measure_serving(options: &PlanOptions) -> Result<(f64, ceiling::Ceiling, Vec<ServingPoint>), PlanError> {
    let err = |e: &dyn std::fmt::Display| PlanError::Serve(e.to_string());
    // The server gets its own runtime, as a separate `kiln serve` process
    // would, so the client's tasks do not share its worker threads.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| err(&e))?;
    let addr = listener.local_addr().map_err(|e| err(&e))?;
    listener.set_nonblocking(true).map_err(|e| err(&e))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServeConfig { repository: options.repository.clone(), ..Default::default() };
    let server = std::thread::Builder::new()
        .name("kiln-plan-server".into())
        .spawn(move || -> Result<(), String> {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let grpc = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                let listeners = crate::Listeners { grpc, http: None, metrics: None };
                crate::serve(config, listeners, async move {
                    let _ = stopped.await;
                })
                .await
                .map_err(|e| e.to_string())
            })
        })
        .map_err(|e| err(&e))?;
    let mut bench = BenchOptions {
        url: addr.to_string(),
        credentials: Default::default(),
        model: options.model.clone(),
        version: String::new(),
        steps: vec![Load::Concurrency(1)],
        duration: Duration::from_millis(1500),
        max_requests: None,
        connections: 4,
        rows: 1,
        input_file: None,
        max_in_flight: 10_000,
        progress: false,
    };
    // The server loads and warms up before it answers.
    let mut report = None;
    for _ in 0..600 {
        match crate::bench::run(&bench).await {
            Ok(r) => {
                report = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let one = report.ok_or_else(|| PlanError::Serve("the server did not start".into()))?;
    // Clients doubled until throughput stops rising, the best level then
    // read again until two readings agree.
    let mut search = ceiling::CeilingSearch::default();
    bench.duration = Duration::from_secs(1);
    while let Some(clients) = search.next() {
        bench.steps = vec![Load::Concurrency(clients)];
        let reading = crate::bench::run(&bench).await.map_err(|e| err(&e))?;
        search.record(clients, reading.steps[0].throughput);
    }
    let found = search.result();
    let ceiling = found.throughput;
    bench.steps = TAIL_LOADS.iter().map(|f| Load::Rate((f * ceiling).max(1.0))).collect();
    bench.duration = Duration::from_millis(1500);
    let loaded = crate::bench::run(&bench).await.map_err(|e| err(&e))?;
    let tail = loaded.steps.iter().map(|s| ServingPoint { rate: s.level, outside_ms: s.outside_ms }).collect();
    let _ = stop.send(());
    let _ = tokio::task::spawn_blocking(move || server.join()).await;
    let s = &one.steps[0];
    let overhead_ms = (s.latency_ms.mean - s.server.queue_ms - s.server.compute_ms).max(0.0);
    Ok((overhead_ms, found, tail))
}

/// Largest rate (to 2 %) whose predicted p99 meets `budget`, and the
/// prediction there.
fn max_rate(setup_at: impl Fn(f64) -> SimSetup, budget: f64, ceiling: f64) -> (f64, SimResult) {
    let at = |rate: f64| simulate(&setup_at(rate));
    let ok = |r: &SimResult| r.p99_s <= budget && r.expired < 0.001;
    let mut lo = 0.0;
    let mut best = SimResult::default();
    let mut hi = ceiling.max(1.0);
    let top = at(hi);
    if ok(&top) {
        return (hi, top);
    }
    while hi - lo > 0.02 * hi.max(1.0) {
        let mid = (lo + hi) / 2.0;
        let r = at(mid.max(0.1));
        if ok(&r) {
            lo = mid;
            best = r;
        } else {
            hi = mid;
        }
    }
    (lo, best)
}

/// Why no configuration met the budget: the serving path's own tail, when
/// even the lightest load measured put it over the budget (on a busy
/// machine that, not the model, is what fails), else one request's cost.
fn no_candidate(budget_s: f64, alone_ms: f64, tail: &[ServingPoint]) -> String {
    let budget_ms = budget_s * 1e3;
    match tail.first() {
        Some(p) if p.outside_ms.p99 > budget_ms => format!(
            "no configuration meets a {budget_ms} ms p99: the serving path alone (time outside queue and compute) \
             had a p99 of {:.2} ms at {:.0} requests/s, the lightest load measured, before any batching; \
             measure on a quieter machine, or plan for a larger budget",
            p.outside_ms.p99, p.rate
        ),
        _ => format!("no configuration meets a {budget_ms} ms p99: one request alone takes {alone_ms:.2} ms"),
    }
}

/// Measures, simulates every candidate and recommends one.
pub async fn plan(options: &PlanOptions) -> Result<Plan, PlanError> {
    let started = Instant::now();
    let source = options.repository.clone();
    let loaded = tokio::task::spawn_blocking(move || crate::repository::load(&source))
        .await
        .map_err(|e| PlanError::Serve(e.to_string()))??;
    let m = loaded.into_iter().find(|m| m.name == options.model).ok_or(PlanError::NoModel(options.model.clone()))?;
    let version = m.versions.get(&m.default_version).ok_or(PlanError::NoModel(options.model.clone()))?;
    let model = version.model.clone();
    let on_gpu = model.spec.device != "cpu";
    let config = m.config.clone();
    let max_queue = config.max_queue;
    let curve = tokio::task::spawn_blocking(move || measure_curve(&model, 64))
        .await
        .map_err(|e| PlanError::Serve(e.to_string()))??;
    drop(m);
    let (overhead_ms, serving_search, serving_tail) = measure_serving(options).await?;
    let serving_ceiling = serving_search.throughput;
    let budget = options.budget.as_secs_f64();
    let setup = |max_batch: usize, delay_ms: f64, instances: usize, rate: f64| SimSetup {
        policy: BatchPolicy {
            max_batch_rows: max_batch,
            max_batch_units: max_batch,
            max_queue_delay: Duration::from_secs_f64(delay_ms / 1e3),
            latency_budget: options.budget,
            wait: config.queue_delay,
        },
        instances,
        curve: curve.clone(),
        overhead: Duration::from_secs_f64(overhead_ms / 1e3),
        // The measured distribution already holds the path's own queueing.
        overhead_quantiles: outside_at(&serving_tail, rate),
        serving_capacity: f64::INFINITY,
        rate,
        requests: options.sim_requests,
        timeout: options.budget * 10,
        max_queue,
        seed: 11,
    };
    let candidate = |max_batch: usize, delay_ms: f64, instances: usize| {
        // A queue at its capacity has no steady state: search below it.
        let compute_bound = instances as f64 * max_batch as f64 / curve.seconds(max_batch).max(1e-9);
        // Nor past the highest load the serving path was measured at.
        let measured_top = serving_tail.last().map_or(serving_ceiling, |p| p.rate);
        let ceiling = (HEADROOM * compute_bound).min(measured_top);
        let (rate, at) = max_rate(|rate| setup(max_batch, delay_ms, instances, rate), budget, ceiling);
        Candidate {
            max_batch_size: max_batch,
            max_queue_delay_ms: delay_ms,
            instances,
            max_rate: rate,
            p99_ms: at.p99_s * 1e3,
            mean_batch: at.mean_batch,
            // At the measured top, with the model alone able to go well
            // past it: the serving path sets the limit.
            serving_bound: rate >= 0.98 * measured_top && compute_bound > 1.5 * measured_top,
        }
    };
    let p99_by_rate = |c: &Candidate| -> Vec<CurvePoint> {
        (1..=12)
            .map(|i| {
                let rate = c.max_rate.max(1.0) * i as f64 / 10.0;
                let r = simulate(&setup(c.max_batch_size, c.max_queue_delay_ms, c.instances, rate));
                CurvePoint { rate, p99_ms: r.p99_s * 1e3, mean_batch: r.mean_batch }
            })
            .collect()
    };
    let current = candidate(config.max_batch_size, config.max_queue_delay_ms, config.instances);
    let mut candidates = Vec::new();
    // On a CPU, instances share the cores the curve was measured on; only
    // a GPU gains from a second one.
    let instance_choices: &[usize] = if on_gpu { &[1, 2] } else { &[1] };
    for &instances in instance_choices {
        for max_batch in [1usize, 2, 4, 8, 16, 32, 64] {
            if curve.seconds(max_batch) + overhead_ms / 1e3 > budget {
                continue;
            }
            for delay_ms in [0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0] {
                if delay_ms / 1e3 >= budget {
                    continue;
                }
                // A setting with no rate meeting the budget is no candidate
                // (its p99 would read as 0).
                let c = candidate(max_batch, delay_ms, instances);
                if c.max_rate > 0.0 {
                    candidates.push(c);
                }
            }
        }
    }
    // Highest rate; among near-equals (within 2 %), the lowest p99.
    candidates.sort_by(|a, b| b.max_rate.total_cmp(&a.max_rate));
    let top = candidates.first().map_or(0.0, |c| c.max_rate);
    let recommended = candidates
        .iter()
        .filter(|c| c.max_rate >= 0.98 * top)
        .min_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
        .cloned()
        .ok_or_else(|| PlanError::Serve(no_candidate(budget, curve.seconds(1) * 1e3 + overhead_ms, &serving_tail)))?;
    let current_p99_by_rate = p99_by_rate(&current);
    let p99_by_rate = p99_by_rate(&recommended);
    let replicas = options.rate.map(|r| (r / recommended.max_rate.max(1e-9)).ceil().max(1.0) as u64);
    Ok(Plan {
        model: options.model.clone(),
        budget_ms: budget * 1e3,
        measured: Measurements {
            curve: curve.points.clone(),
            overhead_ms,
            serving_ceiling,
            serving_search,
            serving_tail,
        },
        recommended,
        current,
        current_p99_by_rate,
        candidates,
        replicas,
        rate: options.rate,
        p99_by_rate,
        seconds_taken: started.elapsed().as_secs_f64(),
    })
}

impl Plan {
    /// The human report.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "kiln plan: model {} with a p99 budget of {} ms\n\nmeasured in-process (batch: ms): ",
            self.model, self.budget_ms
        );
        let curve: Vec<String> = self.measured.curve.iter().map(|(b, s)| format!("{b}: {:.3}", s * 1e3)).collect();
        let _ = writeln!(out, "{}", curve.join(", "));
        let _ = writeln!(
            out,
            "measured through a server on 127.0.0.1: {:.3} ms per request outside queue and compute; ceiling {:.0} \
             answers/s at {} clients (readings there {:.0} to {:.0})",
            self.measured.overhead_ms,
            self.measured.serving_ceiling,
            self.measured.serving_search.clients,
            self.measured.serving_search.spread.0,
            self.measured.serving_search.spread.1
        );
        let tail: Vec<String> =
            self.measured.serving_tail.iter().map(|p| format!("{:.0}/s: {:.2}", p.rate, p.outside_ms.p99)).collect();
        let _ =
            writeln!(out, "serving path p99 outside queue and compute (ms), by offered rate: {}\n", tail.join(", "));
        let _ = writeln!(
            out,
            "{:>10} {:>9} {:>9} {:>12} {:>9} {:>7}",
            "max_batch", "delay ms", "instances", "max rate/s", "p99 ms", "batch"
        );
        for c in self.candidates.iter().take(10) {
            let _ = writeln!(
                out,
                "{:>10} {:>9} {:>9} {:>12.0} {:>9.2} {:>7.1}{}",
                c.max_batch_size,
                c.max_queue_delay_ms,
                c.instances,
                c.max_rate,
                c.p99_ms,
                c.mean_batch,
                if c.serving_bound { "  (serving-bound)" } else { "" }
            );
        }
        let r = &self.recommended;
        let _ = writeln!(
            out,
            "\nrecommended: max_batch_size = {}, max_queue_delay_ms = {}, instances = {}, latency_budget_ms = {}\n\
             maximum sustainable rate per replica: {:.0} requests/s (predicted p99 {:.2} ms){}",
            r.max_batch_size,
            r.max_queue_delay_ms,
            r.instances,
            self.budget_ms,
            r.max_rate,
            r.p99_ms,
            if r.serving_bound { "; the serving path, not the model, sets it" } else { "" }
        );
        let c = &self.current;
        let _ = writeln!(
            out,
            "model.toml now (max_batch_size = {}, max_queue_delay_ms = {}, instances = {}): {:.0} requests/s at \
             predicted p99 {:.2} ms",
            c.max_batch_size, c.max_queue_delay_ms, c.instances, c.max_rate, c.p99_ms
        );
        if let (Some(rate), Some(n)) = (self.rate, self.replicas) {
            let _ = writeln!(out, "replicas for {rate} requests/s: {n}");
        }
        let _ = writeln!(out, "({} configurations simulated in {:.1} s)", self.candidates.len(), self.seconds_taken);
        out
    }

    /// Predicted p99 against offered rate at the recommended settings.
    pub fn svg(&self) -> String {
        let points: Vec<(f64, f64)> = self.p99_by_rate.iter().map(|p| (p.rate, p.p99_ms)).collect();
        crate::plot::line_chart(
            &format!("kiln plan: {} (predicted p99, budget {} ms)", self.model, self.budget_ms),
            "offered rate (requests/s)",
            "predicted p99 (ms)",
            &points,
            Some(self.budget_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Percentiles;

    fn point(rate: f64, p99: f64) -> ServingPoint {
        ServingPoint { rate, outside_ms: Percentiles { p99, ..Default::default() } }
    }

    #[test]
    fn no_candidate_names_the_serving_path_when_its_own_tail_misses_the_budget() {
        let slow = no_candidate(0.010, 0.4, &[point(1000.0, 14.0), point(3000.0, 20.0)]);
        assert!(slow.contains("serving path alone") && slow.contains("14.00 ms at 1000"), "{slow}");
        let costly = no_candidate(0.010, 12.0, &[point(1000.0, 2.0)]);
        assert!(costly.contains("one request alone takes 12.00 ms"), "{costly}");
        assert!(no_candidate(0.010, 12.0, &[]).contains("one request alone"));
    }
}

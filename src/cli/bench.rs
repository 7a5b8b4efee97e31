//! `kiln bench`: closed- and open-loop load against a running server, with
//! a table, JSON, CSV and SVG reports.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::{Target, emit};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub target: Target,
    /// Closed-loop steps: clients each sending its next request when the
    /// last is answered, e.g. 1,8,32.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Open-loop steps: Poisson arrivals at these requests per second, e.g.
    /// 500,1000,2000. Latency counts from the intended send time.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Most requests per step (the step also ends at --duration).
    #[arg(long)]
    pub requests: Option<u64>,
    /// HTTP/2 connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Rows (or texts) per request.
    #[arg(long, default_value_t = 1)]
    pub rows: usize,
    /// Inputs to send instead of generated ones: CSV rows of numbers, or
    /// one text per line for text models.
    #[arg(long)]
    pub input_file: Option<PathBuf>,
    /// Open loop: most requests outstanding; arrivals beyond it are counted
    /// as CLIENT_OVERLOADED instead of queueing in the client.
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Also write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write one CSV line per step.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Draw throughput against p99 and the latency percentiles (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    super::multi_thread()?.block_on(bench(args))
}

async fn bench(args: BenchArgs) -> Result<()> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    if let Some(r) = args.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rate {r}: rates must be positive requests per second");
    }
    let mut steps: Vec<kiln::bench::Load> =
        args.concurrency.iter().map(|n| kiln::bench::Load::Concurrency(*n)).collect();
    steps.extend(args.rate.iter().map(|r| kiln::bench::Load::Rate(*r)));
    if steps.is_empty() {
        steps.push(kiln::bench::Load::Concurrency(1));
    }
    let options = kiln::bench::BenchOptions {
        url: args.target.url,
        model: args.target.model,
        version: args.target.version,
        steps,
        duration: std::time::Duration::from_secs_f64(args.duration),
        max_requests: args.requests,
        connections: args.connections.max(1),
        rows: args.rows.max(1),
        input_file: args.input_file,
        max_in_flight: args.max_in_flight.max(1),
        progress: true,
    };
    let report = kiln::bench::run(&options).await?;
    emit(&report.table());
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(path) = &args.json {
        write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = &args.csv {
        write(path, report.csv())?;
    }
    if let Some(path) = &args.plot {
        write(path, report.svg())?;
    }
    Ok(())
}

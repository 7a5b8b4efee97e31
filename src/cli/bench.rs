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
    /// Search for the highest Poisson rate whose p99 meets --p99-ms with
    /// every request answered OK: doubling from the first --rate (default
    /// 100/s) until a step fails, then bisecting to within 5 %. Each step
    /// lasts --duration; the report lists every step run.
    #[arg(long, requires = "p99_ms", conflicts_with = "concurrency")]
    pub find_max_rate: bool,
    /// The p99 target of --find-max-rate, in milliseconds.
    #[arg(long)]
    pub p99_ms: Option<f64>,
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
        credentials: args.target.security.credentials(None)?,
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
    let (report, found) = match (args.find_max_rate, args.p99_ms) {
        (true, Some(p99_ms)) => {
            if !(p99_ms.is_finite() && p99_ms > 0.0) {
                bail!("--p99-ms {p99_ms}: must be a positive number of milliseconds");
            }
            let target = kiln::bench::find::Target { p99_ms, precision: 0.05, max_steps: 30 };
            let start = args.rate.first().copied().unwrap_or(100.0);
            let (found, report) = kiln::bench::find_max_rate(&options, &target, start).await?;
            emit(&report.table());
            emit(&match (found.rate, found.failed_at) {
                (Some(rate), Some(failed)) => format!(
                    "highest rate meeting p99 <= {p99_ms} ms with every request OK: {rate:.0} requests/s \
                     (failed at {failed:.0}/s; {} steps)\n",
                    found.steps
                ),
                (Some(rate), None) => format!(
                    "every step met p99 <= {p99_ms} ms up to {rate:.0} requests/s; the search stopped after {} \
                     steps without finding the limit\n",
                    found.steps
                ),
                (None, _) => format!("no rate down to 1 request/s met p99 <= {p99_ms} ms with every request OK\n"),
            });
            (report, Some(found))
        }
        _ => {
            let report = kiln::bench::run(&options).await?;
            emit(&report.table());
            (report, None)
        }
    };
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(path) = &args.json {
        let mut json = serde_json::to_value(&report)?;
        if let Some(found) = found {
            json["found"] = serde_json::to_value(found)?;
        }
        write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(path) = &args.csv {
        write(path, report.csv())?;
    }
    if let Some(path) = &args.plot {
        write(path, report.svg())?;
    }
    Ok(())
}

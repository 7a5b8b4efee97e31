//! `kiln plan`: recommended batching settings for a p99 budget, from
//! measurements and a simulation of the batch policy.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kiln::config::RepositorySource;

use super::emit;

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Model repository folder; the built-in repository without it.
    #[arg(long, env = "KILN_REPO")]
    pub repo: Option<PathBuf>,
    /// Model name.
    #[arg(long, env = "KILN_MODEL")]
    pub model: String,
    /// p99 latency target in milliseconds.
    #[arg(long)]
    pub budget_ms: f64,
    /// Total requests per second to size replicas for.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests per simulation run (more: steadier p99, slower plan).
    #[arg(long, default_value_t = 20_000)]
    pub sim_requests: usize,
    /// CPU threads for the model, as `kiln serve --model-threads`.
    #[arg(long, env = "KILN_MODEL_THREADS", default_value_t = 1)]
    pub model_threads: usize,
    /// Also write the plan as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw predicted p99 against offered rate (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(args: PlanArgs) -> Result<()> {
    super::set_model_threads(args.model_threads);
    super::multi_thread()?.block_on(plan(args))
}

async fn plan(args: PlanArgs) -> Result<()> {
    if !(args.budget_ms.is_finite() && args.budget_ms > 0.0) {
        bail!("--budget-ms must be a positive number of milliseconds");
    }
    if let Some(r) = args.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--rate {r}: must be positive requests per second");
    }
    let options = kiln::plan::PlanOptions {
        repository: args.repo.map(RepositorySource::Dir).unwrap_or(RepositorySource::BuiltIn),
        model: args.model,
        budget: std::time::Duration::from_secs_f64(args.budget_ms / 1000.0),
        rate: args.rate,
        sim_requests: args.sim_requests.max(1000),
    };
    let plan = kiln::plan::plan(&options).await?;
    emit(&plan.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&plan)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plan.svg()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

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
    /// Also write the plan as deployment files: `k8s`, a kustomize overlay
    /// on --k8s-base (replicas and the HPA sized for --rate) with the
    /// model's model.toml carrying the recommended settings, into --out.
    #[arg(long, value_enum, requires = "out")]
    pub emit: Option<Emit>,
    /// The folder --emit writes (created if missing).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The kustomize base the overlay patches.
    #[arg(long, default_value = "deploy/k8s/base")]
    pub k8s_base: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Emit {
    K8s,
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
    if args.emit.is_some() && args.rate.is_none() {
        bail!("{}", kiln::plan::emit::EmitError::NoRate);
    }
    if args.emit.is_some() && !args.k8s_base.join("kustomization.yaml").is_file() {
        bail!(
            "--k8s-base {}: no kustomization.yaml there (run from Kiln's repository root, or name deploy/k8s/base)",
            args.k8s_base.display()
        );
    }
    let command = std::env::args().map(|a| if a.contains(' ') { format!("{a:?}") } else { a }).collect::<Vec<_>>();
    let source = args.repo.clone().map(RepositorySource::Dir).unwrap_or(RepositorySource::BuiltIn);
    let options = kiln::plan::PlanOptions {
        repository: source.clone(),
        model: args.model.clone(),
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
    if let (Some(Emit::K8s), Some(out)) = (args.emit, &args.out) {
        let scan = kiln::repository::scan(&source)?.remove(&args.model).context("the model left the repository")??;
        let base = kiln::plan::emit::relative(out, &args.k8s_base);
        let files =
            kiln::plan::emit::k8s_overlay(&plan, &scan.config_text, &base.to_string_lossy(), &command.join(" "))?;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        for (name, text) in files {
            let path = out.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        emit(&format!(
            "kustomize overlay and model.toml written to {} (`kubectl apply -k {}`; copy model.toml to the \
             repository volume's {}/model.toml)\n",
            out.display(),
            out.display(),
            args.model
        ));
    }
    Ok(())
}

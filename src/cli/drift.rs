//! `kiln drift`: a model's drift report from a running server, most
//! drifted first, with reference against live histograms plotted.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kiln::client;

use super::{Target, emit, status_error};

#[derive(clap::Args)]
pub struct DriftArgs {
    #[command(flatten)]
    pub target: Target,
    /// File holding the admin token; also the `KILN_ADMIN_TOKEN`
    /// environment variable, or an admin's API key (--api-key-file,
    /// `KILN_API_KEY`).
    #[arg(long, env = "KILN_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Where to draw reference against live histograms (SVG).
    #[arg(long, default_value = "drift.svg")]
    pub plot: PathBuf,
    /// Features drawn, most drifted first.
    #[arg(long, default_value_t = 6)]
    pub top: usize,
}

pub fn run(args: DriftArgs) -> Result<()> {
    super::current_thread()?.block_on(drift(args))
}

async fn drift(args: DriftArgs) -> Result<()> {
    let t = &args.target;
    let credentials = super::admin_credentials(&t.security, args.admin_token_file.as_deref())?;
    let report = client::drift::fetch(&t.url, &t.model, &t.version, &credentials).await?.map_err(status_error)?;
    emit(&client::drift::table(&report));
    if report.state == "ready" {
        std::fs::write(&args.plot, client::drift::svg(&report, args.top))
            .with_context(|| format!("writing {}", args.plot.display()))?;
        emit(&format!("plot: {}\n", args.plot.display()));
    }
    Ok(())
}

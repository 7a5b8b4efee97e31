//! `kiln profile`: a version's drift reference profile, written by running
//! the model over a data file.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kiln::config::RepositorySource;

use super::emit;

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Model repository folder; the built-in repository without it.
    #[arg(long, env = "KILN_REPO")]
    pub repo: Option<PathBuf>,
    /// Model name.
    #[arg(long, env = "KILN_MODEL")]
    pub model: String,
    /// Version to profile; the model's default when absent.
    #[arg(long)]
    pub version: Option<u64>,
    /// The data the reference describes: what the model was trained on,
    /// or a stretch of traffic known to be good.
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write; default: reference.json in the version's folder
    /// (required for the built-in repository).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: ProfileArgs) -> Result<()> {
    let source = args.repo.clone().map(RepositorySource::Dir).unwrap_or(RepositorySource::BuiltIn);
    let loaded = kiln::repository::load_one(&source, &args.model)?;
    let number = args.version.unwrap_or(loaded.default_version);
    let Some(version) = loaded.versions.get(&number) else {
        bail!(
            "model '{}' has no version {number}; it has {:?}",
            args.model,
            loaded.versions.keys().collect::<Vec<_>>()
        );
    };
    let out = match (&args.out, &args.repo) {
        (Some(out), _) => out.clone(),
        (None, Some(repo)) => repo.join(&args.model).join(number.to_string()).join(kiln::repository::REFERENCE_FILE),
        (None, None) => bail!("the built-in repository is read-only: give --out FILE"),
    };
    let reference = kiln::monitor::drift::profile::profile(&version.model, &version.drift_layout, &args.data)?;
    std::fs::write(&out, serde_json::to_string_pretty(&reference)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    emit(&format!(
        "wrote {}: {} rows, {} features, {} outputs{}\n",
        out.display(),
        reference.rows,
        reference.features.len(),
        reference.outputs.len(),
        if reference.text.is_some() { ", text statistics" } else { "" }
    ));
    Ok(())
}

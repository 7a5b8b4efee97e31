//! `kiln repository`: what a running server's repository holds (every
//! version with its state and the reason), and, under explicit model
//! control, loading and unloading a model (admin calls).

use anyhow::Result;
use kiln::api::pb;
use kiln::client::Client;

use super::{emit, status_error};

#[derive(clap::Args)]
pub struct RepositoryArgs {
    #[command(subcommand)]
    pub action: Action,
    #[command(flatten)]
    pub target: super::AdminTarget,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Every model version the server knows, with its state and why.
    Index,
    /// Reads the model's folder now and serves what its policy selects
    /// (RepositoryModelLoad; explicit model control only).
    Load { model: String },
    /// Stops serving the model; what it admitted is answered first
    /// (RepositoryModelUnload; explicit model control only).
    Unload { model: String },
}

pub fn run(args: RepositoryArgs) -> Result<()> {
    super::current_thread()?.block_on(repository(args))
}

async fn repository(args: RepositoryArgs) -> Result<()> {
    let credentials = match args.action {
        Action::Index => args.target.security.credentials(None)?,
        _ => args.target.credentials()?,
    };
    let mut client = Client::connect_with(&args.target.url, &credentials).await?;
    match &args.action {
        Action::Index => {
            let index = client.raw.repository_index(pb::RepositoryIndexRequest::default()).await;
            let mut out = format!("{:<16} {:>7}  {:<11}  reason\n", "model", "version", "state");
            for m in index.map_err(status_error)?.into_inner().models {
                let line = format!("{:<16} {:>7}  {:<11}  {}", m.name, m.version, m.state, m.reason);
                out += line.trim_end();
                out.push('\n');
            }
            emit(&out);
        }
        Action::Load { model } => {
            let request = pb::RepositoryModelLoadRequest { model_name: model.clone(), ..Default::default() };
            client.raw.repository_model_load(request).await.map_err(status_error)?;
            emit(&format!("loaded {model}\n"));
        }
        Action::Unload { model } => {
            let request = pb::RepositoryModelUnloadRequest { model_name: model.clone(), ..Default::default() };
            client.raw.repository_model_unload(request).await.map_err(status_error)?;
            emit(&format!("unloading {model}: what it admitted is answered, then it stops\n"));
        }
    }
    Ok(())
}

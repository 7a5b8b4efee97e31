//! `kiln health`: the gRPC health check of a running server (or one of its
//! models), for container healthchecks and scripts: exit code 0 when
//! SERVING, 1 otherwise, with one line saying which.

use anyhow::Result;

use super::{ClientSecurity, emit};

#[derive(clap::Args)]
pub struct HealthArgs {
    /// Server address, host:port.
    #[arg(long, env = "KILN_URL", default_value = "127.0.0.1:8001")]
    pub url: String,
    /// A model to check instead of the server.
    #[arg(long)]
    pub model: Option<String>,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub security: ClientSecurity,
}

/// Runs the check; the process exits 1 unless SERVING.
pub fn run(args: HealthArgs) -> Result<()> {
    let serving = super::current_thread()?.block_on(check(&args));
    let what = args.model.as_deref().map_or("server".to_string(), |m| format!("model {m}"));
    match serving {
        Ok(true) => {
            emit(&format!("{what} at {}: SERVING\n", args.url));
            Ok(())
        }
        Ok(false) => {
            emit(&format!("{what} at {}: NOT_SERVING\n", args.url));
            std::process::exit(1)
        }
        Err(e) => {
            emit(&format!("{what} at {}: no answer: {e}\n", args.url));
            std::process::exit(1)
        }
    }
}

async fn check(args: &HealthArgs) -> Result<bool> {
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        anyhow::bail!("--timeout must be above 0 and at most 3600 seconds, got {}", args.timeout);
    }
    let credentials = args.security.credentials(None)?;
    let service = args.model.clone().unwrap_or_default();
    let call = kiln::client::healthy(&args.url, &credentials, &service);
    let answer = tokio::time::timeout(std::time::Duration::from_secs_f64(args.timeout), call).await;
    match answer {
        Err(_) => anyhow::bail!("no answer within {} s", args.timeout),
        Ok(connected) => Ok(connected?.map_err(super::status_error)?),
    }
}

//! `kiln admin`: the release controls of a running server (status,
//! promote, rollback, pause, resume, split), each an admin call written to
//! the server's audit log.

use anyhow::{Result, bail};
use kiln::api::admin_pb::{ReleaseChange, ReleaseState};
use std::collections::HashMap;

use super::{emit, status_error};

#[derive(clap::Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub action: Action,
    #[command(flatten)]
    pub target: super::AdminTarget,
    /// Why, for the audit log (and, for pause, the answer callers get).
    #[arg(long, default_value = "", global = true)]
    pub reason: String,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Versions serving, the default, the split, whether paused, who changed it last.
    Status {
        model: String,
    },
    /// Make VERSION the default for the next request (ends a split).
    Promote {
        model: String,
        version: String,
    },
    /// Back to the default before the last promote, else the next lower version.
    Rollback {
        model: String,
    },
    /// Refuse the model's inference calls (UNAVAILABLE, with --reason).
    Pause {
        model: String,
    },
    Resume {
        model: String,
    },
    /// Split requests that name no version: `2=90 3=10` (weights); none ends the split.
    Split {
        model: String,
        weights: Vec<String>,
    },
    /// Copy a share of requests to VERSION (answers compared, never
    /// returned); without VERSION, stop.
    Shadow {
        model: String,
        version: Option<String>,
        /// Share of requests copied, in (0, 1].
        #[arg(long, default_value_t = 1.0)]
        sample: f64,
        /// Most copies in flight; beyond it copies are dropped and counted.
        #[arg(long, default_value_t = 8)]
        max_inflight: u32,
    },
}

pub fn run(args: AdminArgs) -> Result<()> {
    super::current_thread()?.block_on(admin(args))
}

fn weights(pairs: &[String]) -> Result<HashMap<String, u32>> {
    let mut out = HashMap::new();
    for pair in pairs {
        let Some((version, weight)) = pair.split_once('=') else { bail!("'{pair}': write VERSION=WEIGHT, e.g. 2=90") };
        let weight: u32 = weight.parse().map_err(|_| anyhow::anyhow!("'{pair}': the weight must be a whole number"))?;
        out.insert(version.to_string(), weight);
    }
    Ok(out)
}

async fn admin(args: AdminArgs) -> Result<()> {
    let credentials = args.target.credentials()?;
    let mut client = kiln::client::admin(&args.target.url, &credentials).await?;
    let change = |model: &str, version: &str| ReleaseChange {
        model: model.into(),
        version: version.into(),
        reason: args.reason.clone(),
        ..Default::default()
    };
    let state = match &args.action {
        Action::Status { model } => client.release_status(change(model, "")).await,
        Action::Promote { model, version } => client.promote(change(model, version)).await,
        Action::Rollback { model } => client.rollback(change(model, "")).await,
        Action::Pause { model } => client.pause(change(model, "")).await,
        Action::Resume { model } => client.resume(change(model, "")).await,
        Action::Split { model, weights: w } => {
            client.split(ReleaseChange { weights: weights(w)?, ..change(model, "") }).await
        }
        Action::Shadow { model, version, sample, max_inflight } => {
            let version = version.as_deref().unwrap_or("");
            client
                .shadow(ReleaseChange { sample: *sample, max_inflight: *max_inflight, ..change(model, version) })
                .await
        }
    };
    emit(&table(&state.map_err(status_error)?.into_inner()));
    Ok(())
}

fn table(s: &ReleaseState) -> String {
    let mut split: Vec<String> = s.split.iter().map(|(v, w)| format!("{v}={w}")).collect();
    split.sort();
    let or_none = |t: String| if t.is_empty() { "-".to_string() } else { t };
    format!(
        "model     {}\nversions  {}\ndefault   {}{}\nsplit     {}\nshadow    {}\npaused    {}\nchanged   {}\n",
        s.model,
        s.versions.join(", "),
        s.default_version,
        if s.promoted.is_empty() { " (the policy's)" } else { " (promoted)" },
        or_none(split.join(" ")),
        match s.shadow_version.is_empty() {
            true => "-".to_string(),
            false => format!(
                "version {} ({:.0} % of requests, at most {} at once)",
                s.shadow_version,
                s.shadow_sample * 100.0,
                s.shadow_max_inflight
            ),
        },
        if s.paused { format!("yes: {}", s.pause_reason) } else { "no".into() },
        or_none(match s.updated_by.is_empty() {
            true => String::new(),
            false => format!("by {} at {}", s.updated_by, utc(s.updated_ms)),
        }),
    )
}

/// Unix milliseconds as `YYYY-MM-DD hh:mm:ss UTC` (the civil calendar from
/// a day count, after Howard Hinnant's `civil_from_days`).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_reads_unix_milliseconds() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_796_239_598_836), "2026-12-02 19:26:38 UTC");
    }
}

//! The audit log: one JSON line per admin action (time, who, action,
//! model, reason, the release state before and after, and whether it was
//! done), appended to a 0600 file when one is configured and always to the
//! server log, and counted. It is written before the caller is answered.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use crate::monitor::metrics::ADMIN_ACTIONS;
use crate::repository::release::Release;

/// One admin action as the audit log records it.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub time_ms: u64,
    pub who: &'a str,
    pub action: &'a str,
    pub model: &'a str,
    pub reason: &'a str,
    /// `ok`, or why it was refused.
    pub outcome: &'a str,
    pub before: Option<&'a Release>,
    pub after: Option<&'a Release>,
}

/// Where admin actions are recorded.
#[derive(Default)]
pub struct AuditLog {
    file: Option<Mutex<std::fs::File>>,
}

impl AuditLog {
    /// Appends to `path` (created 0600) when given.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            None => None,
            Some(path) => {
                let mut options = std::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                Some(Mutex::new(options.open(path)?))
            }
        };
        Ok(Self { file })
    }

    /// Records one action. A failed write is logged, never hidden: the
    /// server log holds the same line.
    pub fn record(&self, entry: &Entry<'_>) {
        let outcome = if entry.outcome == "ok" { "ok" } else { "refused" };
        metrics::counter!(ADMIN_ACTIONS, "action" => entry.action.to_string(), "outcome" => outcome).increment(1);
        let line = serde_json::to_string(entry).unwrap_or_default();
        tracing::info!(target: "kiln::audit", "{line}");
        if let Some(file) = &self.file {
            let mut file = file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = writeln!(file, "{line}").and_then(|()| file.flush()) {
                tracing::error!(error = %e, "audit log not written (the server log has the line)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_json_line_per_action_to_a_private_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Some(&path)).expect("open");
        let after = Release { paused: Some("drift".into()), ..Default::default() };
        for outcome in ["ok", "the model is not paused"] {
            log.record(&Entry {
                time_ms: 1,
                who: "key:ops",
                action: "pause",
                model: "risk",
                reason: "drift",
                outcome,
                before: Some(&Release::default()),
                after: Some(&after),
            });
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["who"], "key:ops");
        assert_eq!(lines[0]["after"]["paused"], "drift");
        assert_eq!(lines[1]["outcome"], "the model is not paused");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}

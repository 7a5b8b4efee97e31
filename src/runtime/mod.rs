//! The serving runtime: per-version wiring in one place (drift monitor,
//! batch observer, scheduler and executors) over the loaded repository,
//! every thread registered in one [`Threads`], and the shutdown that stops
//! them in order and waits for each: a clean stop is one where
//! [`Runtime::shutdown`] finds nothing still running.

mod threads;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use threads::{Joined, Threads};

use crate::batcher::BatcherSettings;
use crate::batcher::observer::BatchObserver;
use crate::batcher::policy::BatchPolicy;
use crate::config::{ModelToml, RequestLogConfig};
use crate::monitor::drift::DriftHandle;
use crate::monitor::metrics::VersionMetrics;
use crate::monitor::request_log::RequestLog;
use crate::monitor::stats::VersionStats;
use crate::repository::{LoadedModel, LoadedVersion, Repository, RepositoryError, ServedModel, ServedVersion};

/// What is serving, and the threads that serve it.
pub struct Runtime {
    pub repo: Arc<Repository>,
    threads: Threads,
    log: Option<Arc<RequestLog>>,
}

/// The batcher's settings from a model's config.
pub fn batcher_settings(config: &ModelToml) -> BatcherSettings {
    BatcherSettings {
        policy: BatchPolicy {
            max_batch_rows: config.max_batch_size,
            max_batch_units: config.max_batch_units(),
            max_queue_delay: Duration::from_secs_f64(config.max_queue_delay_ms / 1000.0),
            latency_budget: Duration::from_secs_f64(config.latency_budget_ms / 1000.0),
            wait: config.queue_delay,
        },
        max_queue: config.max_queue,
        instances: config.instances,
        priority_levels: config.priority_levels,
    }
}

impl Runtime {
    /// Starts the request log (if configured) and every loaded version's
    /// threads, registering them in `threads`.
    pub fn start(
        loaded: Vec<LoadedModel>,
        log: Option<&RequestLogConfig>,
        threads: Threads,
    ) -> Result<Self, RepositoryError> {
        let log = match log {
            Some(c) => Some(Arc::new(
                RequestLog::start(c, &threads)
                    .map_err(|source| RepositoryError::Io { path: c.path.display().to_string(), source })?,
            )),
            None => None,
        };
        let mut models = BTreeMap::new();
        for m in loaded {
            let config = Arc::new(m.config);
            let mut versions = BTreeMap::new();
            for (number, v) in m.versions {
                let served = start_version(&m.name, number, v, &config, log.clone(), &threads)
                    .map_err(|source| RepositoryError::Io { path: format!("{}/{number}", m.name), source })?;
                versions.insert(number, Arc::new(served));
            }
            models.insert(
                m.name.clone(),
                ServedModel { name: m.name, config, default_version: m.default_version, versions },
            );
        }
        Ok(Self { repo: Arc::new(Repository { models }), threads, log })
    }

    /// The registry every serving thread is in.
    pub fn threads(&self) -> &Threads {
        &self.threads
    }

    /// Stops serving: each scheduler answers what is queued and stops, its
    /// executors finish their batches, then the drift monitors and the
    /// request log take what those batches gave and stop. Waits up to
    /// `timeout` for every registered thread (the tokenization service's
    /// too, once it is closed). Blocking: call it off the async runtime.
    pub fn shutdown(&self, timeout: Duration) -> Joined {
        let versions = || self.repo.models.values().flat_map(|m| m.versions.values());
        for version in versions() {
            version.batcher.close();
            version.metrics.ready.set(0.0);
        }
        let batchers = |name: &str| name.starts_with("kiln-sched-") || name.starts_with("kiln-exec-");
        let first = self.threads.join_where(timeout, batchers);
        for version in versions() {
            version.drift.close();
        }
        if let Some(log) = &self.log {
            log.close();
        }
        let rest = self.threads.join(timeout.saturating_sub(Duration::from_millis(1)));
        Joined { joined: first.joined + rest.joined, running: rest.running }
    }
}

/// Wires one version: its statistics, metrics, drift monitor, batch
/// observer, scheduler and executors.
fn start_version(
    name: &str,
    number: u64,
    v: LoadedVersion,
    config: &Arc<ModelToml>,
    log: Option<Arc<RequestLog>>,
    threads: &Threads,
) -> std::io::Result<ServedVersion> {
    let stats = Arc::new(VersionStats::default());
    let metrics = VersionMetrics::new(name, number, config.priority_levels, config.max_batch_units());
    metrics.publish_latency(&v.latency.estimate());
    let drift = Arc::new(DriftHandle::start(name, number, v.drift_layout, &config.drift, v.reference, threads)?);
    let observer = BatchObserver {
        spec: v.spec.clone(),
        stats: stats.clone(),
        metrics: metrics.clone(),
        latency: v.latency.clone(),
        drift: Some(drift.clone()),
        log,
    };
    let batcher =
        crate::batcher::scheduler::spawn(v.model.backend.clone(), observer, batcher_settings(config), threads)?;
    metrics.ready.set(1.0);
    Ok(ServedVersion {
        spec: v.spec,
        model: v.model,
        latency: v.latency,
        config: config.clone(),
        batcher,
        stats,
        metrics,
        drift,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RepositorySource;

    #[tokio::test]
    async fn shutdown_answers_what_was_queued_and_joins_every_thread() {
        let loaded = crate::repository::load(&RepositorySource::BuiltIn).expect("built-in loads");
        let runtime = Runtime::start(loaded, None, Threads::default()).expect("starts");
        let started = runtime.threads().running();
        assert!(started.iter().any(|n| n.starts_with("kiln-sched-risk-1")), "{started:?}");
        assert!(started.iter().any(|n| n.starts_with("kiln-exec-risk-1")), "{started:?}");
        let version = runtime.repo.models["risk"].versions[&1].clone();
        let tickets: Vec<_> = (0..20)
            .map(|_| {
                let input =
                    crate::model::Tensor { shape: vec![1, 30], data: crate::model::TensorData::Fp32(vec![1.0; 30]) };
                version.batcher.submit(crate::request::InferRequest::row(input)).expect("admitted")
            })
            .collect();
        let stopper = std::thread::spawn(move || runtime.shutdown(Duration::from_secs(30)));
        for mut ticket in tickets {
            assert!(ticket.answer().await.is_ok(), "a request queued before shutdown was not computed");
        }
        let joined = stopper.join().expect("shutdown returns");
        assert!(joined.running.is_empty(), "still running: {:?}", joined.running);
        assert_eq!(joined.joined, started.len(), "every thread started was joined");
        assert!(!version.batcher.serving(), "a stopped version refuses new requests");
    }
}

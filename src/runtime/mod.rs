//! The serving runtime: per-version wiring in one place (drift monitor,
//! batch observer, scheduler and executors) over the loaded repository,
//! every thread registered in one [`Threads`], and the shutdown that stops
//! them in order and waits for each: a clean stop is one where
//! [`Runtime::shutdown`] finds nothing still running.

mod control;
mod threads;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use threads::{Joined, Threads, precise_timers};

use crate::batcher::BatcherSettings;
use crate::batcher::observer::BatchObserver;
use crate::batcher::policy::BatchPolicy;
use crate::config::{ModelControl, ModelToml, RepositorySource, RequestLogConfig};
use crate::model::threads::ModelThreads;
use crate::monitor::drift::DriftHandle;
use crate::monitor::metrics::VersionMetrics;
use crate::monitor::request_log::RequestLog;
use crate::monitor::stats::VersionStats;
use crate::repository::{
    LiveRepository, LoadedModel, LoadedVersion, Repository, RepositoryError, ServedModel, ServedVersion,
};

/// What is serving, the threads that serve it, and the model control
/// that changes it.
pub struct Runtime {
    pub repo: Arc<LiveRepository>,
    threads: Threads,
    log: Option<Arc<RequestLog>>,
    options: RuntimeOptions,
    control: std::sync::Mutex<control::ControlState>,
    /// Drift alerts of versions whose `on_alert` acts, and their receiver
    /// until [`Runtime::act_on_drift`] takes it.
    alerts: std::sync::mpsc::Sender<crate::monitor::drift::DriftAlert>,
    alert_rx: std::sync::Mutex<Option<std::sync::mpsc::Receiver<crate::monitor::drift::DriftAlert>>>,
}

/// What the runtime needs beyond the loaded models.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Where versions are read from when they change.
    pub source: RepositorySource,
    pub control: ModelControl,
    pub model_threads: ModelThreads,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            source: RepositorySource::BuiltIn,
            control: ModelControl::Explicit,
            model_threads: ModelThreads::Fixed(1),
        }
    }
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

/// Applies `--model-threads` to a loaded version (timing the ones that
/// choose their own threads under `auto`) and warns when its instances ×
/// threads exceed the cores. Blocking.
pub fn choose_threads(
    name: &str,
    number: u64,
    config: &ModelToml,
    version: &LoadedVersion,
    setting: ModelThreads,
) -> Result<(), RepositoryError> {
    let chosen = crate::model::threads::apply(&version.model, config.max_batch_size, setting)
        .map_err(|source| RepositoryError::Model { path: format!("{name}/{number}"), source })?;
    let threads = chosen.unwrap_or_else(candle_core::utils::get_num_threads);
    crate::model::threads::check_oversubscription(name, number, config.instances, threads);
    Ok(())
}

impl Runtime {
    /// Starts the request log (if configured) and every loaded version's
    /// threads, registering them in `threads`.
    pub fn start(
        loaded: Vec<LoadedModel>,
        log: Option<&RequestLogConfig>,
        threads: Threads,
        options: RuntimeOptions,
    ) -> Result<Self, RepositoryError> {
        let log = match log {
            Some(c) => Some(Arc::new(
                RequestLog::start(c, &threads)
                    .map_err(|source| RepositoryError::Io { path: c.path.display().to_string(), source })?,
            )),
            None => None,
        };
        let (alerts, alert_rx) = std::sync::mpsc::channel();
        let runtime = Self {
            repo: Arc::new(LiveRepository::new(Repository::default())),
            threads,
            log,
            options,
            control: Default::default(),
            alerts,
            alert_rx: std::sync::Mutex::new(Some(alert_rx)),
        };
        let mut repo = Repository::default();
        let mut state = runtime.lock();
        for m in loaded {
            let config = Arc::new(m.config);
            let mut versions = BTreeMap::new();
            for (number, v) in m.versions {
                let served = runtime.start_version(&m.name, number, v, &config, None, &mut state)?;
                control::count(&m.name, "load", "ok");
                versions.insert(number, Arc::new(served));
            }
            state.applied(&m.name, &m.scan, versions.keys().copied());
            let release = Arc::new(m.release);
            repo.models.insert(
                m.name.clone(),
                ServedModel { name: m.name, config, default_version: m.default_version, versions, release },
            );
        }
        drop(state);
        runtime.repo.publish(repo);
        Ok(runtime)
    }

    /// The registry every serving thread is in.
    pub fn threads(&self) -> &Threads {
        &self.threads
    }

    /// The model control mode in effect.
    pub fn control_mode(&self) -> ModelControl {
        self.options.control
    }

    /// Stops serving: the model control first (a load in progress ends
    /// and publishes nothing more), then each scheduler answers what is
    /// queued and stops (unloading versions too), its executors finish
    /// their batches, then the drift monitors and the request log take
    /// what those batches gave and stop. Waits up to `timeout` for every
    /// registered thread (the tokenization service's too, once it is
    /// closed). Blocking: call it off the async runtime.
    pub fn shutdown(&self, timeout: Duration) -> Joined {
        let draining = self.lock().stop();
        let repo = self.repo.get();
        let versions: Vec<Arc<ServedVersion>> = repo.versions().cloned().chain(draining).collect();
        drop(repo);
        for version in &versions {
            version.batcher.close();
            version.metrics.ready.set(0.0);
        }
        let batchers = |name: &str| name.starts_with("kiln-sched-") || name.starts_with("kiln-exec-");
        let first = self.threads.join_where(timeout, batchers);
        for version in &versions {
            version.drift.close();
        }
        drop(versions);
        if let Some(log) = &self.log {
            log.close();
        }
        let rest = self.threads.join(timeout.saturating_sub(Duration::from_millis(1)));
        Joined { joined: first.joined + rest.joined, running: rest.running }
    }

    /// Wires one version: its statistics (carried over from the copy it
    /// replaces), metrics, drift monitor, batch observer, scheduler and
    /// executors, every thread named with the copy's generation.
    fn start_version(
        &self,
        name: &str,
        number: u64,
        v: LoadedVersion,
        config: &Arc<ModelToml>,
        stats: Option<Arc<VersionStats>>,
        state: &mut control::ControlState,
    ) -> Result<ServedVersion, RepositoryError> {
        let generation = state.next_generation();
        let threads = self.threads.labelled(&format!("#{generation}"));
        let started = (|| -> std::io::Result<ServedVersion> {
            let stats = stats.unwrap_or_default();
            let metrics = VersionMetrics::new(name, number, config.priority_levels, config.max_batch_units());
            metrics.publish_latency(&v.latency.estimate());
            metrics.publish_queue_capacity(config.max_queue);
            let acts = config.drift.on_alert != crate::monitor::drift::config::OnAlert::None;
            let alerts = acts.then(|| self.alerts.clone());
            let drift = Arc::new(DriftHandle::start(
                name,
                number,
                v.drift_layout,
                &config.drift,
                v.reference,
                &threads,
                alerts,
            )?);
            let observer = BatchObserver {
                spec: v.spec.clone(),
                stats: stats.clone(),
                metrics: metrics.clone(),
                latency: v.latency.clone(),
                drift: Some(drift.clone()),
                log: self.log.clone(),
            };
            let batcher = crate::batcher::scheduler::spawn(
                v.model.backend.clone(),
                observer,
                batcher_settings(config),
                &threads,
            )?;
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
                breaker: Default::default(),
                shadow_inflight: Default::default(),
                generation,
            })
        })();
        started.map_err(|source| RepositoryError::Io { path: format!("{name}/{number}"), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RepositorySource;

    #[tokio::test]
    async fn shutdown_answers_what_was_queued_and_joins_every_thread() {
        let loaded = crate::repository::load(&RepositorySource::BuiltIn).expect("built-in loads");
        let runtime = Runtime::start(loaded, None, Threads::default(), RuntimeOptions::default()).expect("starts");
        let started = runtime.threads().running();
        assert!(started.iter().any(|n| n.starts_with("kiln-sched-risk-1")), "{started:?}");
        assert!(started.iter().any(|n| n.starts_with("kiln-exec-risk-1")), "{started:?}");
        let version = runtime.repo.get().models["risk"].versions[&1].clone();
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

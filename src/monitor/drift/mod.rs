//! Drift monitoring, off the hot path: after each batch the executor hands
//! a compact sample to this version's drift thread over a bounded channel
//! (`try_send`: a full channel drops and counts, never waits). The thread
//! keeps the live window, judges it once per interval against the
//! reference, exports the statistics, and logs each status change once.

pub mod config;
pub mod layout;
pub mod profile;
pub mod reference;
pub mod window;

#[cfg(test)]
mod tests;

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metrics::Counter;

use self::layout::{BatchSample, Layout};
use self::reference::{ProfileData, Reference};
use self::window::{Report, Transition, Window, WindowSettings};
use crate::config::{DriftSection, ReferenceSource};
use crate::monitor::metrics as names;

/// What the drift thread is doing, for the admin RPC.
#[derive(Debug, Clone, PartialEq)]
pub enum DriftState {
    /// Not monitored, and why.
    Off(String),
    /// `reference = "auto"`: collecting the reference from traffic.
    Capturing { rows: u64, needed: u64 },
    /// Watching, but the window holds too few rows to judge.
    Collecting { rows: u64, needed: u64, reference_source: String },
    /// The last judgement.
    Ready { report: Report, reference_source: String, evaluated: SystemTime },
}

enum DriftEvent {
    Batch(BatchSample),
    /// A request refused for a NaN or infinite value of this watched feature.
    Refused(Option<usize>),
}

/// The executor's and the API's side of one version's drift monitor.
pub struct DriftHandle {
    /// `None` when drift is off, or once closed (the thread then stops).
    tx: Mutex<Option<SyncSender<DriftEvent>>>,
    enabled: bool,
    layout: Arc<Layout>,
    dropped: Counter,
    state: Arc<Mutex<DriftState>>,
}

impl DriftHandle {
    /// Starts the drift thread of one version. Without a reference and
    /// without `reference = "auto"` nothing is started and the state says
    /// why.
    pub fn start(
        model: &str,
        version: u64,
        layout: Layout,
        config: &DriftSection,
        reference: Option<Reference>,
        threads: &crate::runtime::Threads,
        alerts: Option<std::sync::mpsc::Sender<DriftAlert>>,
    ) -> std::io::Result<Self> {
        let labels = Labels { model: model.to_string(), version: version.to_string() };
        let dropped = metrics::counter!(names::DRIFT_DROPPED, "model" => labels.model.clone(), "version" => labels.version.clone());
        dropped.increment(0);
        let layout = Arc::new(layout);
        let (phase, state) = match (reference, config.reference) {
            (_, ReferenceSource::Off) => (None, DriftState::Off("drift.reference = \"off\" in model.toml".into())),
            (Some(r), _) => {
                let source = r.source.clone();
                let window = Window::new(r, (*layout).clone(), WindowSettings::from(config));
                let needed = config.min_samples as u64;
                (
                    Some(Phase::Watching(Box::new(window))),
                    DriftState::Collecting { rows: 0, needed, reference_source: source },
                )
            }
            (None, ReferenceSource::Auto) => {
                tracing::info!(
                    model,
                    version,
                    rows = config.auto_samples,
                    "drift: no reference.json; capturing the reference from the first requests (reference = \"auto\")"
                );
                let needed = config.auto_samples as u64;
                (Some(Phase::Capturing(ProfileData::new(&layout))), DriftState::Capturing { rows: 0, needed })
            }
            (None, ReferenceSource::File) => (
                None,
                DriftState::Off(
                    "no reference.json in the version folder; write one with `kiln profile`, or set \
                     drift.reference = \"auto\""
                        .into(),
                ),
            ),
        };
        let state = Arc::new(Mutex::new(state));
        let tx = match phase {
            None => None,
            Some(phase) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(config.channel_capacity);
                let task = DriftTask {
                    labels,
                    layout: layout.clone(),
                    config: config.clone(),
                    phase,
                    state: state.clone(),
                    started: Instant::now(),
                    alerts,
                };
                threads.spawn(format!("kiln-drift-{model}-{version}"), move || task.run(rx))?;
                Some(tx)
            }
        };
        Ok(Self { enabled: tx.is_some(), tx: Mutex::new(tx), layout, dropped, state })
    }

    /// True when samples are wanted.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Hands one batch's sample over, or drops and counts it when the
    /// drift thread is behind.
    pub fn offer(&self, sample: BatchSample) {
        let rows = sample.rows as u64;
        if !self.send(DriftEvent::Batch(sample)) {
            self.dropped.increment(rows);
        }
    }

    /// True when the event went to the drift thread; false when drift is
    /// off (nothing to count) or the thread is behind or closed.
    fn send(&self, event: DriftEvent) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            None => !self.enabled,
            Some(tx) => match tx.try_send(event) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
        }
    }

    /// Stops the drift thread once it has taken what is queued.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Notes a request refused for a non-finite value of input `input`,
    /// column `column`.
    pub fn refused_non_finite(&self, input: usize, column: usize) {
        if !self.enabled {
            return;
        }
        let feature = self.layout.features.iter().position(|f| f.input == input && f.column == column);
        if !self.send(DriftEvent::Refused(feature)) {
            self.dropped.increment(1);
        }
    }

    /// The latest state.
    pub fn state(&self) -> DriftState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Clone)]
struct Labels {
    model: String,
    version: String,
}

enum Phase {
    Capturing(ProfileData),
    Watching(Box<Window>),
}

struct DriftTask {
    labels: Labels,
    layout: Arc<Layout>,
    config: DriftSection,
    phase: Phase,
    state: Arc<Mutex<DriftState>>,
    started: Instant,
    /// Told of each statistic that reaches alert, when `on_alert` acts.
    alerts: Option<std::sync::mpsc::Sender<DriftAlert>>,
}

/// A statistic of a version that reached alert.
#[derive(Debug, Clone)]
pub struct DriftAlert {
    pub model: String,
    pub version: String,
    pub feature: String,
    pub value: f64,
}

impl DriftTask {
    fn run(mut self, rx: Receiver<DriftEvent>) {
        let interval = WindowSettings::from(&self.config).interval.max(Duration::from_millis(1));
        let mut next = Instant::now() + interval;
        loop {
            match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
                // The executor is gone: the version stopped.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next {
                self.evaluate();
                while next <= Instant::now() {
                    next += interval;
                }
            }
        }
    }

    fn handle(&mut self, event: DriftEvent) {
        let now = self.started.elapsed();
        match (&mut self.phase, event) {
            (Phase::Watching(window), DriftEvent::Batch(sample)) => window.ingest(now, &sample),
            (Phase::Watching(window), DriftEvent::Refused(feature)) => window.refused(now, feature),
            (Phase::Capturing(data), DriftEvent::Batch(sample)) => {
                data.add(&self.layout, &sample);
                let needed = self.config.auto_samples as u64;
                if data.rows >= needed {
                    let source =
                        format!("captured from the first {} rows of traffic (reference = \"auto\")", data.rows);
                    let reference = Reference::build(&self.layout, data, source.clone());
                    tracing::info!(model = %self.labels.model, version = %self.labels.version, rows = data.rows, "drift: reference captured; live windows start now");
                    self.phase = Phase::Watching(Box::new(Window::new(
                        reference,
                        (*self.layout).clone(),
                        WindowSettings::from(&self.config),
                    )));
                    set_state(
                        &self.state,
                        DriftState::Collecting {
                            rows: 0,
                            needed: self.config.min_samples as u64,
                            reference_source: source,
                        },
                    );
                } else {
                    set_state(&self.state, DriftState::Capturing { rows: data.rows, needed });
                }
            }
            (Phase::Capturing(_), DriftEvent::Refused(_)) => {}
        }
    }

    fn evaluate(&mut self) {
        let now = self.started.elapsed();
        let Phase::Watching(window) = &mut self.phase else { return };
        let source = window.reference().source.clone();
        metrics::gauge!(names::DRIFT_WINDOW_ROWS, "model" => self.labels.model.clone(), "version" => self.labels.version.clone())
            .set(window.rows(now) as f64);
        match window.evaluate(now) {
            None => {
                let rows = window.rows(now);
                let needed = self.config.min_samples as u64;
                set_state(&self.state, DriftState::Collecting { rows, needed, reference_source: source });
            }
            Some((report, transitions)) => {
                publish(&self.labels, &report);
                for t in &transitions {
                    log_transition(&self.labels, t);
                    if t.to == window::Level::Alert
                        && let Some(alerts) = &self.alerts
                    {
                        let alert = DriftAlert {
                            model: self.labels.model.clone(),
                            version: self.labels.version.clone(),
                            feature: t.feature.clone(),
                            value: t.value,
                        };
                        let _ = alerts.send(alert);
                    }
                }
                set_state(
                    &self.state,
                    DriftState::Ready { report, reference_source: source, evaluated: SystemTime::now() },
                );
            }
        }
    }
}

fn set_state(slot: &Mutex<DriftState>, state: DriftState) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = state;
}

/// One line per status change, naming model, version, feature and value.
fn log_transition(labels: &Labels, t: &Transition) {
    let (model, version, feature, from, to) = (&labels.model, &labels.version, &t.feature, t.from.name(), t.to.name());
    if t.to > t.from {
        tracing::warn!(model = %model, version = %version, feature = %feature, value = t.value, from, to, "drift status raised");
    } else {
        tracing::info!(model = %model, version = %version, feature = %feature, value = t.value, from, to, "drift status cleared");
    }
}

/// Exports one judgement.
fn publish(labels: &Labels, report: &Report) {
    let (m, v) = (labels.model.clone(), labels.version.clone());
    for s in &report.statistics {
        let f = s.name.clone();
        if s.statistic == "psi" {
            metrics::gauge!(names::DRIFT_PSI, "model" => m.clone(), "version" => v.clone(), "feature" => f.clone())
                .set(s.value);
        } else {
            metrics::gauge!(names::DRIFT_EMBEDDING_DISTANCE, "model" => m.clone(), "version" => v.clone()).set(s.value);
        }
        metrics::gauge!(names::DRIFT_STATUS, "model" => m.clone(), "version" => v.clone(), "feature" => f.clone())
            .set(s.status as u8 as f64);
        if s.kind == window::Kind::Input {
            for (kind, rate) in
                [("out_of_range", s.out_of_range_rate), ("missing", s.missing_rate), ("non_finite", s.non_finite_rate)]
            {
                metrics::gauge!(names::DRIFT_INPUT_RATE, "model" => m.clone(), "version" => v.clone(), "feature" => f.clone(), "kind" => kind)
                    .set(rate);
            }
        }
    }
    for c in &report.classes {
        metrics::gauge!(names::DRIFT_CLASS_RATE, "model" => m.clone(), "version" => v.clone(), "class" => c.name.clone())
            .set(c.live);
    }
    if let Some((_, live)) = report.unknown_token_rate {
        metrics::gauge!(names::DRIFT_INPUT_RATE, "model" => m.clone(), "version" => v.clone(), "feature" => "text", "kind" => "unknown_token")
            .set(live);
    }
}

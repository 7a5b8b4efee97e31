//! `kiln bench` results: per step, throughput, latency percentiles, answers
//! by gRPC code and the server's own queue/compute split; as a table, JSON,
//! CSV and an SVG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::{Load, Recorder};
use crate::plot::Svg;

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub model: String,
    pub version: String,
    pub rows_per_request: usize,
    pub steps: Vec<StepReport>,
}

/// Latency percentiles of OK answers, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// The server's own account (response parameters) over OK answers.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ServerSplit {
    pub queue_ms: f64,
    pub compute_ms: f64,
    pub batch_size: f64,
    /// Medians, in µs: a handful of slow batches moves the means above.
    pub queue_p50_us: u64,
    pub compute_p50_us: u64,
}

/// One load step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// `concurrency` or `rate`.
    pub mode: String,
    /// Clients, or offered requests per second.
    pub level: f64,
    pub duration_s: f64,
    pub sent: u64,
    /// Answers by gRPC code (`OK`, `DEADLINE_EXCEEDED`, ...); they sum to
    /// `sent`. `CLIENT_OVERLOADED` counts open-loop arrivals the client
    /// could not send because `--max-in-flight` requests were outstanding.
    pub answered: BTreeMap<String, u64>,
    /// OK answers per second.
    pub throughput: f64,
    pub latency_ms: Percentiles,
    /// OK answers' time outside the server's queue and compute (network,
    /// gRPC, decoding, encoding, the client itself).
    pub outside_ms: Percentiles,
    pub server: ServerSplit,
}

impl StepReport {
    pub(super) fn from_recorder(load: Load, elapsed: Duration, r: &Recorder) -> Self {
        let ok = r.codes.get("OK").copied().unwrap_or(0);
        let ms = |us: u64| us as f64 / 1000.0;
        let percentiles = |h: &hdrhistogram::Histogram<u64>| {
            if h.is_empty() {
                Percentiles::default()
            } else {
                Percentiles {
                    p50: ms(h.value_at_quantile(0.50)),
                    p90: ms(h.value_at_quantile(0.90)),
                    p99: ms(h.value_at_quantile(0.99)),
                    p999: ms(h.value_at_quantile(0.999)),
                    max: ms(h.max()),
                    mean: h.mean() / 1000.0,
                }
            }
        };
        let latency_ms = percentiles(&r.latency_us);
        let outside_ms = percentiles(&r.outside_us);
        let per = |total: u64| if r.timed == 0 { 0.0 } else { total as f64 / r.timed as f64 };
        let (mode, level) = match load {
            Load::Concurrency(n) => ("concurrency", n as f64),
            Load::Rate(rate) => ("rate", rate),
        };
        Self {
            mode: mode.into(),
            level,
            duration_s: elapsed.as_secs_f64(),
            sent: r.sent,
            answered: r.codes.clone(),
            throughput: ok as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_ms,
            outside_ms,
            server: ServerSplit {
                queue_ms: per(r.queue_us) / 1000.0,
                compute_ms: per(r.compute_us) / 1000.0,
                batch_size: per(r.batch_size),
                queue_p50_us: r.queue_h.value_at_quantile(0.5),
                compute_p50_us: r.compute_h.value_at_quantile(0.5),
            },
        }
    }

    fn errors(&self) -> String {
        let errors: Vec<String> =
            self.answered.iter().filter(|(c, _)| c.as_str() != "OK").map(|(c, n)| format!("{c}={n}")).collect();
        if errors.is_empty() { "-".into() } else { errors.join(" ") }
    }

    fn label(&self) -> String {
        match self.mode.as_str() {
            "concurrency" => format!("c={}", self.level),
            _ => format!("{}/s", self.level),
        }
    }
}

impl Report {
    /// The human table for stdout.
    pub fn table(&self) -> String {
        let mut out = format!(
            "kiln bench {} model={} rows/request={}\n{:<10} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}  {}\n",
            self.url,
            self.model,
            self.rows_per_request,
            "load",
            "sent",
            "ok/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "queue ms",
            "comp ms",
            "batch",
            "errors"
        );
        for s in &self.steps {
            let _ = writeln!(
                out,
                "{:<10} {:>7} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>6.1}  {}",
                s.label(),
                s.sent,
                s.throughput,
                s.latency_ms.p50,
                s.latency_ms.p90,
                s.latency_ms.p99,
                s.latency_ms.p999,
                s.server.queue_ms,
                s.server.compute_ms,
                s.server.batch_size,
                s.errors()
            );
        }
        out
    }

    /// One CSV line per step.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "mode,level,duration_s,sent,ok,errors,throughput,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,mean_ms,\
             server_queue_ms,server_compute_ms,server_batch_size\n",
        );
        for s in &self.steps {
            let ok = s.answered.get("OK").copied().unwrap_or(0);
            let l = &s.latency_ms;
            let _ = writeln!(
                out,
                "{},{},{:.3},{},{ok},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3}",
                s.mode,
                s.level,
                s.duration_s,
                s.sent,
                s.sent - ok,
                s.throughput,
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                l.mean,
                s.server.queue_ms,
                s.server.compute_ms,
                s.server.batch_size
            );
        }
        out
    }

    /// Two panels: throughput against p99 per step, and each step's latency
    /// percentiles.
    pub fn svg(&self) -> String {
        let (w, h, pad) = (900.0, 380.0, 60.0);
        let panel = (w - 3.0 * pad) / 2.0;
        let mut svg = Svg::page(w, h, 12, pad, 20.0, &format!("kiln bench: {} ({})", self.model, self.url));
        let max_tp = self.steps.iter().map(|s| s.throughput).fold(1e-9, f64::max) * 1.1;
        let max_p99 = self.steps.iter().map(|s| s.latency_ms.p999).fold(1e-9, f64::max) * 1.1;
        let top = 40.0;
        let bottom = h - pad;
        let y_of = |ms: f64| bottom - (ms / max_p99) * (bottom - top);
        // Left panel: throughput (x) against p99 (y).
        svg.axes(pad, top, panel, bottom, "OK answers / s", "p99 latency (ms)", max_tp, max_p99);
        let points: Vec<(f64, f64)> =
            self.steps.iter().map(|s| (pad + s.throughput / max_tp * panel, y_of(s.latency_ms.p99))).collect();
        svg.polyline(&points, "#c0392b");
        for (s, p) in self.steps.iter().zip(&points) {
            svg.point(*p, "#c0392b", Some(&s.label()));
        }
        // Right panel: percentiles (x: p50 .. p99.9) per step.
        let left = 2.0 * pad + panel;
        svg.axes(left, top, panel, bottom, "percentile: 50 90 99 99.9", "latency (ms)", 3.0, max_p99);
        let colours = ["#2c3e50", "#27ae60", "#2980b9", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#c0392b"];
        for (i, s) in self.steps.iter().enumerate() {
            let l = &s.latency_ms;
            let pts: Vec<(f64, f64)> = [l.p50, l.p90, l.p99, l.p999]
                .iter()
                .enumerate()
                .map(|(k, v)| (left + k as f64 / 3.0 * panel, y_of(*v)))
                .collect();
            let colour = colours[i % colours.len()];
            svg.polyline(&pts, colour);
            svg.text((left + 8.0, top + 14.0 * (i + 1) as f64), &s.label(), Some(colour));
        }
        svg.finish()
    }
}

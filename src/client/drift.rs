//! `kiln drift`: asks a server's admin service for a model's drift report,
//! and renders it as a table ranked by drift and as an SVG of reference
//! against live histograms.

use std::fmt::Write;

use super::ClientError;
use crate::api::admin_pb::{DriftReportRequest, DriftReportResponse, FeatureDrift, admin_client::AdminClient};
use crate::plot::{Svg, escape};

/// Fetches the drift report of `model` (its default version when
/// `version` is empty), with the admin token or an admin's key as the
/// bearer credential.
pub async fn fetch(
    url: &str,
    model: &str,
    version: &str,
    credentials: &super::Credentials,
) -> Result<Result<DriftReportResponse, tonic::Status>, ClientError> {
    let channel = super::secure_channel(url, credentials.tls.as_ref()).await?;
    let bearer = super::Bearer::new(credentials.bearer.as_ref())?;
    let request = tonic::Request::new(DriftReportRequest { model: model.into(), version: version.into() });
    Ok(AdminClient::with_interceptor(channel, bearer).drift_report(request).await.map(tonic::Response::into_inner))
}

/// The features, most drifted first: by value over its alert threshold, so
/// PSI and centroid distances rank on one scale.
pub fn ranked(report: &DriftReportResponse) -> Vec<&FeatureDrift> {
    let mut features: Vec<&FeatureDrift> = report.features.iter().collect();
    let severity = |f: &FeatureDrift| if f.alert > 0.0 { f.value / f.alert } else { 0.0 };
    features.sort_by(|a, b| severity(b).total_cmp(&severity(a)));
    features
}

/// A plain-text report.
pub fn table(report: &DriftReportResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "model {} version {}: {}", report.model, report.version, report.state);
    if !report.detail.is_empty() {
        let _ = writeln!(out, "  {}", report.detail);
    }
    if !report.reference_source.is_empty() {
        let _ = writeln!(out, "reference: {}", report.reference_source);
    }
    if report.state != "ready" {
        return out;
    }
    let _ = writeln!(out, "window: {} rows over {:.0} s", report.window_rows, report.window_seconds);
    let _ = writeln!(
        out,
        "{:<34} {:<7} {:<16} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8}",
        "feature", "kind", "statistic", "value", "warn", "alert", "status", "out_rng", "missing"
    );
    for f in ranked(report) {
        let _ = writeln!(
            out,
            "{:<34} {:<7} {:<16} {:>9.4} {:>7.3} {:>7.3} {:>8} {:>8.4} {:>8.4}",
            f.name, f.kind, f.statistic, f.value, f.warn, f.alert, f.status, f.out_of_range_rate, f.missing_rate
        );
    }
    if !report.classes.is_empty() {
        let _ = writeln!(out, "\n{:<34} {:>10} {:>10}", "output class", "reference", "live");
        for c in &report.classes {
            let _ = writeln!(out, "{:<34} {:>10.4} {:>10.4}", c.name, c.reference, c.live);
        }
    }
    if report.reference_unknown_token_rate > 0.0 || report.live_unknown_token_rate > 0.0 {
        let _ = writeln!(
            out,
            "unknown tokens: reference {:.4}, live {:.4}",
            report.reference_unknown_token_rate, report.live_unknown_token_rate
        );
    }
    out
}

const PANEL_W: f64 = 300.0;
const PANEL_H: f64 = 180.0;
const COLUMNS: usize = 2;

/// Reference (grey) against live (orange) bin shares for the `top` most
/// drifted histogram features, one panel each.
pub fn svg(report: &DriftReportResponse, top: usize) -> String {
    let panels: Vec<&FeatureDrift> = ranked(report).into_iter().filter(|f| !f.reference.is_empty()).take(top).collect();
    let rows = panels.len().div_ceil(COLUMNS).max(1);
    let (width, height) = (PANEL_W * COLUMNS as f64 + 20.0, PANEL_H * rows as f64 + 50.0);
    let title = format!(
        "{} v{}: reference (grey) vs live (orange), {} rows",
        escape(&report.model),
        report.version,
        report.window_rows
    );
    let mut svg = Svg::page(width, height, 11, 10.0, 18.0, &title);
    for (i, f) in panels.iter().enumerate() {
        let x0 = 10.0 + PANEL_W * (i % COLUMNS) as f64;
        let y0 = 35.0 + PANEL_H * (i / COLUMNS) as f64;
        let heading = format!("{} — {} {:.3} ({})", escape(&f.name), f.statistic, f.value, f.status);
        svg.text((x0, y0 + 12.0), &heading, None);
        let (plot_top, plot_h, plot_w) = (y0 + 20.0, PANEL_H - 45.0, PANEL_W - 20.0);
        let highest = f.reference.iter().chain(&f.live).fold(0.0f64, |a, b| a.max(*b)).max(1e-9);
        let bins = f.reference.len().max(1) as f64;
        let slot = plot_w / bins;
        for (b, (r, l)) in f.reference.iter().zip(f.live.iter().chain(std::iter::repeat(&0.0))).enumerate() {
            let x = x0 + slot * b as f64;
            for (offset, value, colour) in [(0.1, r, "#999999"), (0.5, l, "#e8741c")] {
                let h = plot_h * value / highest;
                svg.bar(x + slot * offset, plot_top + plot_h - h, slot * 0.4, h, colour);
            }
        }
        svg.line((x0, plot_top + plot_h), (x0 + plot_w, plot_top + plot_h), "black", false);
        if let (Some(first), Some(last)) = (f.edges.first(), f.edges.last()) {
            svg.text((x0, plot_top + plot_h + 14.0), &format!("bins split at {first:.4} … {last:.4}"), None);
        }
    }
    svg.finish()
}

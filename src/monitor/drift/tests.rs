//! Drift maths on seeded synthetic traffic: reference traffic stays quiet,
//! a scaled feature or a shifted output is caught, and the hysteresis
//! raises an alert exactly once.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::layout::{BatchSample, Layout, TextSample};
use super::reference::{ProfileData, Reference};
use super::window::{CENTROID_FEATURE, Level, Report, TOKENS_FEATURE, Window, WindowSettings};
use crate::model::{DataType, FeatureSpec, ModelSpec, TensorSpec};

const FEATURES: [&str; 4] = ["normal", "uniform", "skewed", "discrete"];

fn spec() -> ModelSpec {
    let feature = |name: &str| FeatureSpec {
        name: name.into(),
        valid_range: None,
        missing_value: (name == "uniform").then_some(-1.0),
    };
    let input = TensorSpec { features: FEATURES.iter().map(|n| feature(n)).collect(), ..TensorSpec::fp32("x", 4) };
    ModelSpec::in_memory("synthetic", vec![input], vec![TensorSpec::fp32("p", 1)])
}

/// How live traffic differs from the reference.
#[derive(Clone, Copy, Default)]
struct Shift {
    scale_skewed: Option<f32>,
    score_bias: f32,
    missing_uniform: f64,
}

/// One batch of `rows` rows; the score depends on `normal` only, so that
/// scaling another feature leaves the output alone.
fn batch(rng: &mut ChaCha8Rng, rows: usize, shift: Shift) -> BatchSample {
    let mut features = Vec::with_capacity(rows * 4);
    let mut scores = Vec::with_capacity(rows);
    for _ in 0..rows {
        let normal: f32 = 10.0 + 2.0 * (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5);
        let uniform: f32 = if rng.random_bool(shift.missing_uniform) { -1.0 } else { rng.random() };
        let skewed: f32 = -rng.random::<f32>().max(1e-6).ln() * shift.scale_skewed.unwrap_or(1.0);
        let discrete = rng.random_range(0..3) as f32;
        features.extend([normal, uniform, skewed, discrete]);
        scores.push(1.0 / (1.0 + (-(normal - 10.5) - shift.score_bias).exp()));
    }
    BatchSample { rows, features, scores, request_units: vec![1; rows], text: None }
}

fn reference(layout: &Layout) -> Reference {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut data = ProfileData::new(layout);
    for _ in 0..300 {
        data.add(layout, &batch(&mut rng, 10, Shift::default()));
    }
    Reference::build(layout, &data, "synthetic".into())
}

fn settings() -> WindowSettings {
    WindowSettings {
        interval: Duration::from_secs(1),
        intervals: 10,
        max_rows: 100_000,
        min_rows: 500,
        psi_warn: 0.1,
        psi_alert: 0.25,
        hysteresis: 3,
    }
}

/// Feeds `rows` rows of live traffic within the interval starting at `second`.
fn feed(window: &mut Window, rng: &mut ChaCha8Rng, second: u64, rows: usize, shift: Shift) {
    for i in 0..rows / 10 {
        let at = Duration::from_secs(second) + Duration::from_micros(i as u64);
        window.ingest(at, &batch(rng, 10, shift));
    }
}

fn value(report: &Report, name: &str) -> f64 {
    report.statistics.iter().find(|s| s.name == name).map(|s| s.value).expect("statistic is reported")
}

fn window() -> Window {
    let layout = Layout::of(&spec(), false, 0.5);
    Window::new(reference(&layout), layout, settings())
}

#[test]
fn traffic_drawn_from_the_reference_keeps_every_psi_under_warn() {
    let mut w = window();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    feed(&mut w, &mut rng, 0, 3000, Shift::default());
    let (report, transitions) = w.evaluate(Duration::from_secs(1)).expect("enough rows");
    assert!(transitions.is_empty());
    assert_eq!(report.statistics.len(), 4 + 1 + 1, "4 inputs, 1 output, request units");
    for s in &report.statistics {
        assert!(s.value < 0.1, "{} has PSI {} on reference traffic", s.name, s.value);
        assert_eq!(s.status, Level::Ok);
    }
}

#[test]
fn one_feature_scaled_by_three_raises_that_psi_and_no_other() {
    let mut w = window();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    feed(&mut w, &mut rng, 0, 3000, Shift { scale_skewed: Some(3.0), ..Shift::default() });
    let (report, _) = w.evaluate(Duration::from_secs(1)).expect("enough rows");
    assert!(value(&report, "skewed") > 0.25, "{report:?}");
    for s in report.statistics.iter().filter(|s| s.name != "skewed") {
        assert!(s.value < 0.1, "{} moved to {} though only 'skewed' was scaled", s.name, s.value);
    }
    let skewed = report.statistics.iter().find(|s| s.name == "skewed").expect("reported");
    assert!(skewed.out_of_range_rate > 0.0, "values past the training maximum are counted");
}

#[test]
fn an_output_shift_shows_in_the_output_psi_and_class_rates() {
    let mut w = window();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    feed(&mut w, &mut rng, 0, 3000, Shift { score_bias: 2.0, ..Shift::default() });
    let (report, _) = w.evaluate(Duration::from_secs(1)).expect("enough rows");
    assert!(value(&report, "output:p") > 0.25, "{report:?}");
    for f in FEATURES {
        assert!(value(&report, f) < 0.1, "input {f} did not change");
    }
    let positive = report.classes.iter().find(|c| c.name == "at_or_above_0.5").expect("class reported");
    assert!(positive.live > positive.reference + 0.2, "{positive:?}");
}

#[test]
fn an_alert_is_raised_once_after_hysteresis_and_cleared_once() {
    let mut w = window();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let drifted = Shift { scale_skewed: Some(3.0), ..Shift::default() };
    let mut raised = Vec::new();
    let mut cleared = Vec::new();
    for second in 0..30u64 {
        let shift = if second < 15 { drifted } else { Shift::default() };
        feed(&mut w, &mut rng, second, 1000, shift);
        if let Some((_, transitions)) = w.evaluate(Duration::from_secs(second + 1)) {
            for t in transitions {
                assert_eq!(t.feature, "skewed", "{t:?}");
                if t.to > t.from { raised.push((second, t)) } else { cleared.push((second, t)) }
            }
        }
    }
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(raised[0].1.to, Level::Alert);
    assert_eq!(raised[0].0, 2, "the third consecutive alerting evaluation raises it");
    assert_eq!(cleared.len(), 1, "{cleared:?}");
    assert_eq!(cleared[0].1.to, Level::Ok);
}

#[test]
fn missing_values_and_refusals_are_rates_not_distribution() {
    let mut w = window();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    feed(&mut w, &mut rng, 0, 2000, Shift { missing_uniform: 0.2, ..Shift::default() });
    for _ in 0..100 {
        w.refused(Duration::from_millis(10), Some(2));
    }
    let (report, _) = w.evaluate(Duration::from_secs(1)).expect("enough rows");
    let uniform = report.statistics.iter().find(|s| s.name == "uniform").expect("reported");
    assert!((uniform.missing_rate - 0.2).abs() < 0.03, "{}", uniform.missing_rate);
    assert!(uniform.value < 0.1, "missing values stay out of the histogram: PSI {}", uniform.value);
    let skewed = report.statistics.iter().find(|s| s.name == "skewed").expect("reported");
    assert!((skewed.non_finite_rate - 100.0 / 2100.0).abs() < 1e-9, "{}", skewed.non_finite_rate);
}

#[test]
fn the_window_forgets_by_time_and_by_rows() {
    let mut w = window();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    feed(&mut w, &mut rng, 0, 1000, Shift::default());
    assert_eq!(w.rows(Duration::from_secs(9)), 1000);
    assert_eq!(w.rows(Duration::from_secs(10)), 0, "ten one-second intervals: gone at 10 s");
    assert!(w.evaluate(Duration::from_secs(10)).is_none(), "too few rows to judge");

    let layout = Layout::of(&spec(), false, 0.5);
    let mut bounded = Window::new(reference(&layout), layout, WindowSettings { max_rows: 1500, ..settings() });
    for second in 0..5 {
        feed(&mut bounded, &mut rng, second, 1000, Shift::default());
    }
    let rows = bounded.rows(Duration::from_secs(4));
    assert!((1000..=1500).contains(&rows), "bounded by whole intervals: {rows}");
}

#[test]
fn text_statistics_catch_longer_texts_and_a_moved_centroid() {
    let mut text_spec = spec();
    text_spec.inputs[0] =
        TensorSpec { name: "text".into(), datatype: DataType::Bytes, shape: vec![-1], features: vec![] };
    text_spec.outputs[0].shape = vec![-1, 8];
    let layout = Layout::of(&text_spec, true, 0.5);
    let hidden = 8;
    let texts = |rng: &mut ChaCha8Rng, rows: usize, longer: usize, centre: f32| {
        let lengths: Vec<u32> = (0..rows).map(|_| rng.random_range(5..20) + longer as u32).collect();
        let embeddings: Vec<f32> = (0..rows * hidden)
            .map(|i| if i % hidden == 0 { centre } else { 0.3 } + rng.random::<f32>() - 0.5)
            .collect();
        let units = lengths.clone();
        let unknown = lengths.iter().map(|l| u64::from(*l)).sum::<u64>() / 100;
        BatchSample {
            rows,
            features: vec![],
            scores: vec![],
            request_units: units,
            text: Some(TextSample { token_lengths: lengths, unknown_tokens: unknown, embeddings }),
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut data = ProfileData::new(&layout);
    for _ in 0..200 {
        data.add(&layout, &texts(&mut rng, 10, 0, 1.0));
    }
    let reference = Reference::build(&layout, &data, "synthetic text".into());
    let judge = |rng: &mut ChaCha8Rng, longer: usize, centre: f32| {
        let mut w = Window::new(reference.clone(), layout.clone(), settings());
        for i in 0..200u64 {
            w.ingest(Duration::from_micros(i), &texts(rng, 10, longer, centre));
        }
        w.evaluate(Duration::from_secs(1)).expect("enough rows").0
    };
    let same = judge(&mut rng, 0, 1.0);
    let centroid = same.statistics.iter().find(|s| s.name == CENTROID_FEATURE).expect("centroid judged");
    assert!(centroid.value < centroid.warn, "{centroid:?}");
    assert!(value(&same, TOKENS_FEATURE) < 0.1);
    let (reference_unknown, live_unknown) = same.unknown_token_rate.expect("text model");
    assert!((reference_unknown - live_unknown).abs() < 0.005);

    let moved = judge(&mut rng, 10, 0.2);
    let centroid = moved.statistics.iter().find(|s| s.name == CENTROID_FEATURE).expect("centroid judged");
    assert!(centroid.value > centroid.alert, "{centroid:?}");
    assert!(value(&moved, TOKENS_FEATURE) > 0.25);
}

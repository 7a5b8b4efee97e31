//! How many threads one model computation uses. `auto` (the default) times
//! each model that chooses its own threads at a typical batch with one
//! thread and with every core, keeps the faster and logs both; row models
//! computed by candle follow `RAYON_NUM_THREADS` (one under `auto`: their
//! batches take microseconds, where threads cost more than they save).
//! More threads per computation than cores, counting every instance, is
//! warned about: the executors would take the cores from each other and
//! from the runtime that answers requests.

use std::time::{Duration, Instant};

use super::tokenize::TokenizeOptions;
use super::{Backend, Model, ModelError};

/// `--model-threads`: a number, or chosen by measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelThreads {
    Auto,
    Fixed(usize),
}

impl std::str::FromStr for ModelThreads {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            n => match n.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => Ok(Self::Fixed(n)),
                _ => Err(format!("expected `auto` or 1 to 1024, got {s:?}")),
            },
        }
    }
}

/// The cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The faster of one thread and `all` threads; a tie keeps one thread,
/// which leaves the other cores to the runtime and other instances.
pub fn faster(one: Duration, all: Duration, cores: usize) -> usize {
    if cores > 1 && all < one { cores } else { 1 }
}

/// Rows and words of the typical batch timed: eight sentences of the
/// length the built-in corpus has.
const TYPICAL_ROWS: usize = 8;
const TYPICAL_WORDS: usize = 14;
/// Runs per setting; the best counts (the least disturbed by neighbours).
const RUNS: usize = 3;

fn best_of(backend: &dyn Backend, inputs: &super::Inputs) -> Result<Duration, ModelError> {
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let started = Instant::now();
        backend.run(inputs)?;
        best = best.min(started.elapsed());
    }
    Ok(best)
}

/// Applies `setting` to a model that chooses its own threads (others are
/// left as they are); returns the threads it computes with, if it chooses.
pub fn apply(model: &Model, max_batch_size: usize, setting: ModelThreads) -> Result<Option<usize>, ModelError> {
    let backend = model.backend.as_ref();
    let cores = cores();
    match setting {
        ModelThreads::Fixed(n) => Ok(backend.set_threads(n).then_some(n)),
        ModelThreads::Auto => {
            if !backend.set_threads(1) {
                return Ok(None);
            }
            let rows = TYPICAL_ROWS.min(max_batch_size).max(1);
            let inputs = super::sample_inputs(&model.spec, rows, &|_| vec!["warm"; TYPICAL_WORDS].join(" ").into());
            let (inputs, _) = model.prepare(inputs, &TokenizeOptions { max_tokens: None, truncate: Some(true) })?;
            let one = best_of(backend, &inputs)?;
            backend.set_threads(cores);
            let all = best_of(backend, &inputs)?;
            let chosen = faster(one, all, cores);
            backend.set_threads(chosen);
            tracing::info!(
                model = %model.spec.name,
                version = model.spec.version,
                rows,
                one_thread_ms = one.as_secs_f64() * 1e3,
                all_cores_ms = all.as_secs_f64() * 1e3,
                cores,
                threads = chosen,
                "model threads chosen by measurement"
            );
            Ok(Some(chosen))
        }
    }
}

/// Warns when a version's instances × threads exceed the cores.
pub fn check_oversubscription(model: &str, version: u64, instances: usize, threads: usize) {
    let cores = cores();
    if instances * threads > cores {
        tracing::warn!(
            model,
            version,
            instances,
            threads,
            cores,
            "instances × model threads exceed the cores: executors will take cores from each other and from \
             the request runtime (lower --model-threads or instances)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_faster_setting_wins_and_a_tie_keeps_one_thread() {
        let ms = Duration::from_millis;
        assert_eq!(faster(ms(10), ms(6), 2), 2);
        assert_eq!(faster(ms(6), ms(10), 2), 1);
        assert_eq!(faster(ms(8), ms(8), 4), 1);
        assert_eq!(faster(ms(10), ms(1), 1), 1, "one core has nothing to choose");
    }

    #[test]
    fn the_flag_reads_auto_or_a_bounded_count() {
        assert_eq!("auto".parse::<ModelThreads>(), Ok(ModelThreads::Auto));
        assert_eq!("3".parse::<ModelThreads>(), Ok(ModelThreads::Fixed(3)));
        for bad in ["0", "2000", "two", ""] {
            assert!(bad.parse::<ModelThreads>().is_err(), "{bad}");
        }
    }
}

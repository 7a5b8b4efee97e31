//! Every default of every config file, in one place, so that a reader
//! finds what a missing key means without hunting through the owners.

pub(crate) fn device() -> String {
    "auto".into()
}
pub(crate) fn max_batch_size() -> usize {
    64
}
pub(crate) fn max_queue_delay_ms() -> f64 {
    1.0
}
pub(crate) fn max_queue() -> usize {
    1024
}
pub(crate) fn instances() -> usize {
    1
}
pub(crate) fn latency_budget_ms() -> f64 {
    100.0
}
pub(crate) fn default_timeout_ms() -> f64 {
    10_000.0
}
pub(crate) fn priority_levels() -> u32 {
    1
}
pub(crate) fn normalize() -> bool {
    true
}
pub(crate) fn max_tokens() -> usize {
    512
}
pub(crate) fn truncate() -> bool {
    true
}
/// Past 1-2k padded tokens per batch CPU throughput of a small BERT
/// falls (measured with MiniLM on two cores).
pub(crate) const MAX_BATCH_TOKENS: usize = 2048;
pub(crate) fn auto_samples() -> usize {
    1000
}
pub(crate) fn window_seconds() -> f64 {
    300.0
}
pub(crate) fn window_intervals() -> usize {
    10
}
pub(crate) fn window_max_samples() -> usize {
    20_000
}
pub(crate) fn min_samples() -> usize {
    500
}
/// The usual PSI reading: under 0.1 no change, 0.1-0.25 some, above
/// 0.25 a shift worth acting on.
pub(crate) fn psi_warn() -> f64 {
    0.1
}
pub(crate) fn psi_alert() -> f64 {
    0.25
}
pub(crate) fn hysteresis() -> u32 {
    3
}
pub(crate) fn channel_capacity() -> usize {
    1024
}
pub(crate) fn class_threshold() -> f64 {
    0.5
}
pub(crate) fn log_sample_rate() -> f64 {
    0.01
}
pub(crate) fn log_max_bytes() -> u64 {
    64 * 1024 * 1024
}
pub(crate) fn log_keep_files() -> usize {
    3
}

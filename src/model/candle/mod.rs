//! The kinds that compute with candle, and what they share: picking the
//! device and turning candle's errors into the seam's.

pub mod bert;
pub mod device;
pub mod mlp;
pub mod packed;

use super::ModelError;
pub use device::{device_name, select_device};

/// A candle error while computing.
pub(crate) fn compute(e: candle_core::Error) -> ModelError {
    ModelError::Compute(e.to_string())
}

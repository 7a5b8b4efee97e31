//! Configuration, split by owner: the server's own (`server`, `limits`),
//! `model.toml`'s core (`model`), each kind's section beside its model
//! (re-exported here),
//! `[drift]` beside drift. One serde struct per file format, defaults in
//! one place (`defaults`), and errors that name the file and the field.

pub(crate) mod defaults;
pub mod limits;
pub mod model;
pub mod server;

pub use crate::model::candle::bert::{BertSection, Pooling, TEXT_BYTES_PER_TOKEN};
pub use crate::model::candle::mlp::{Activation, MlpSection};
pub use crate::monitor::drift::config::{DriftSection, ReferenceSource};
pub use limits::{LimitsConfig, MAX_DURATION_MS};
pub use model::{DeviceChoice, FallbackToml, FeatureToml, ModelToml, TensorToml};
pub use server::{
    AuthConfig, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_REPOSITORY_POLL, InputLogMode, MAX_MESSAGE_BYTES_LIMIT,
    MIN_ADMIN_TOKEN_CHARS, ModelControl, RepositorySource, RequestLogConfig, ServeConfig, ServerFile, TenantConfig,
    TlsConfig, read_secret_file,
};

/// A configuration file that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file (or built-in path) at fault.
    pub file: String,
    /// What is wrong, naming the field.
    pub message: String,
}

impl ConfigError {
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self { file: file.into(), message: message.into() }
    }
}

//! Kiln: a KServe V2 gRPC inference server that batches requests within
//! each model's latency budget and runs them on candle models.
//!
//! The modules follow a request: `api` → `router` → `batcher` →
//! `executor` → `model`, with `monitor` beside. `serve` is the one entry
//! point; the binary and the tests both call it.

pub mod api;
pub mod batcher;
pub mod bench;
pub mod client;
pub mod config;
pub mod error;
pub mod executor;
pub mod model;
pub mod monitor;
pub mod pipeline;
pub mod plan;
pub mod prepare;
pub mod repository;
pub mod request;
pub mod server;

pub use server::{ServeError, serve};

//! Kiln: a KServe V2 gRPC inference server that batches requests within
//! each model's latency budget and runs them on candle models.
//!
//! The modules, in the order a request meets them:
//!
//! - `server`: the accept loops (HTTP/2 for gRPC, HTTP/1 for metrics),
//!   connection limits and the drain on shutdown. [`serve`] is the one
//!   entry point; the binary and the tests both call it.
//! - [`api`]: the front ends. `api::grpc` holds the door (message size,
//!   bytes in flight, the [`wire`](api::wire) check before decoding), the V2
//!   and admin services and V2 decoding and encoding; beside it, health and
//!   the one error → status mapping ([`api::status`]).
//! - `pipeline`: one request's path, shared by every front end: validation
//!   against the declared interface, the router (which version),
//!   tokenizing on the [`model::tokenize`] service, admission (deadline,
//!   cost caps, tenant budgets, queue bound), then the batcher and the
//!   answer.
//! - [`batcher`]: the queue per version, the pure batch policy (also driven
//!   by [`plan`]), the latency model, the scheduler thread (which owns and
//!   supervises the executors), the executors that run batches and split
//!   their outputs, and the per-batch observer.
//! - [`model`]: the [`Backend`](model::Backend) seam (Kiln's own tensors
//!   and token rows, no candle or config types), the kind registry, the
//!   candle kinds (`model::candle`: `mlp`, `bert`), tokenization, specs.
//! - [`repository`]: reads the model folders (or the built-in copy) and
//!   loads and warms up each version; [`runtime`] wires each version's
//!   threads, registers every thread, and joins them all on shutdown.
//! - [`monitor`] beside them all: metrics, statistics, drift, request log.
//!
//! Tools on the same types: [`client`] (the V2 client of `kiln infer`,
//! `kiln bench` and the tests), [`bench`](mod@bench) (load generation) and [`plan`]
//! (capacity planning), drawing with `plot`. [`config`] holds every
//! setting, split by owner. `fault` (test builds and the `test-backends`
//! feature only) injects panics for the supervision tests.
//!
//! `server`, `pipeline` and `plot` are implementation details and private;
//! of `api`, only the protocol types (`pb`, `admin_pb`), the error mapping
//! (`status`) and the wire check (`wire`) are public. The benches and
//! integration tests use that surface: [`serve`], [`config`], [`client`],
//! [`api`]'s protocol types, [`model`] (tensors, specs, the `Backend`
//! trait), [`repository::load`], [`runtime::Threads`], [`batcher`]
//! (`scheduler::spawn`, settings, the observer), [`bench`](mod@bench),
//! [`plan`] and [`monitor`].

pub mod api;
pub mod batcher;
pub mod bench;
pub mod client;
pub mod config;
pub mod error;
#[cfg(any(test, feature = "test-backends"))]
pub mod fault;
pub mod model;
pub mod monitor;
mod pipeline;
pub mod plan;
mod plot;
pub mod repository;
pub mod request;
pub mod runtime;
pub mod security;
mod server;

pub use server::{Listeners, ServeError, serve};

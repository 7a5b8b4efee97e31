//! The `kiln` commands, one file each; `main.rs` parses the command line
//! and calls one of them. What they share: the client target, writing
//! reports, the one place that sets the model's thread count.

pub mod bench;
pub mod certs;
pub mod drift;
pub mod infer;
pub mod keys;
pub mod plan;
pub mod profile;
pub mod serve;

use std::io::Write;

/// Which server and model a client command talks to.
#[derive(clap::Args)]
pub struct Target {
    /// Server address, host:port.
    #[arg(long, env = "KILN_URL", default_value = "127.0.0.1:8001")]
    pub url: String,
    /// Model name.
    #[arg(long, env = "KILN_MODEL")]
    pub model: String,
    /// Model version; the model's default when absent.
    #[arg(long, default_value = "")]
    pub version: String,
}

/// Writes a report to standard output. A reader that went away (`| head`)
/// is not an error worth a panic: the rest is simply not wanted.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("[{:?}] {}", s.code(), s.message())
}

/// Sets the CPU threads one model computation may use (candle and rayon
/// read `RAYON_NUM_THREADS` when their pools start). Called before the
/// command starts any thread.
pub fn set_model_threads(threads: usize) {
    // SAFETY: called first thing in a command, before any other thread
    // exists, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string()) };
}

/// A multi-threaded runtime with every driver, for commands that drive
/// load or serve.
pub fn multi_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// A one-thread runtime, for commands that make a call or two.
pub fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

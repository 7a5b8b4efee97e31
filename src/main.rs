//! The `kiln` command: serve, infer, bench, plan, profile and drift. A thin
//! wrapper over the library: it parses the command line and calls the
//! command, each in its own file under `cli/`.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kiln", version, about = "KServe V2 gRPC inference server with latency-budget-aware batching")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model repository over gRPC (KServe V2) with Prometheus metrics.
    Serve(cli::serve::ServeArgs),
    /// Send one request and print the outputs.
    Infer(cli::infer::InferArgs),
    /// Load-test a running server: closed loop (--concurrency) and open
    /// loop (--rate, Poisson arrivals); prints a table per step.
    Bench(cli::bench::BenchArgs),
    /// Recommend max_batch_size, max_queue_delay_ms and instances for a p99
    /// budget, from measurements and a simulation of the batch policy.
    Plan(cli::plan::PlanArgs),
    /// Write a version's drift reference (reference.json) by running the
    /// model over a data file: CSV with a header (columns named as the
    /// model's features) for row models, one text per line for text models.
    Profile(cli::profile::ProfileArgs),
    /// Print a model's drift report from a running server, most drifted
    /// first, and plot reference against live histograms.
    Drift(cli::drift::DriftArgs),
    /// Release controls of a running server: status, promote, rollback, pause, resume, split.
    Admin(cli::admin::AdminArgs),
    /// Health check of a running server or model: exit code 0 when SERVING (container healthchecks).
    Health(cli::health::HealthArgs),
    /// A running server's model repository: index, load, unload.
    Repository(cli::repository::RepositoryArgs),
    /// Make API keys for the keys file.
    Keys(cli::keys::KeysArgs),
    /// Make throwaway certificates to try TLS locally.
    Certs(cli::certs::CertsArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(args) => cli::serve::run(args),
        Command::Infer(args) => cli::infer::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Plan(args) => cli::plan::run(args),
        Command::Profile(args) => cli::profile::run(args),
        Command::Drift(args) => cli::drift::run(args),
        Command::Admin(args) => cli::admin::run(args),
        Command::Health(args) => cli::health::run(args),
        Command::Repository(args) => cli::repository::run(args),
        Command::Keys(args) => cli::keys::run(args),
        Command::Certs(args) => cli::certs::run(args),
    };
    // The message alone: a user error is not a crash, and anyhow's Debug
    // form would append a backtrace whenever RUST_BACKTRACE is set.
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

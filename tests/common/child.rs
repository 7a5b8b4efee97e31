//! `kiln serve` run as a child process, the binary a user runs: for
//! memory measured on its own (VmHWM) and for flags, environment and
//! config files as the CLI reads them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The `kiln` binary under test; `KILN_BIN` points at another build (the
/// hardening note's before/after figures come from running against both).
pub fn kiln_bin() -> String {
    std::env::var("KILN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kiln").to_string())
}

/// `kiln serve` as a child process on ephemeral ports.
pub struct Server {
    child: Child,
    pub grpc: SocketAddr,
    /// Everything it logged so far.
    pub log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Serves the built-in repository with `config` as its `--config` file.
    pub fn with_config(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, config).expect("write config");
        let mut command = Command::new(kiln_bin());
        command
            .args(["serve", "--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--http", "127.0.0.1:0", "--config"])
            .arg(&path);
        Self::spawn(command, dir).expect("kiln serve started")
    }

    /// Runs `command` (a `kiln serve` whose listen addresses are port 0)
    /// until it logs its gRPC address; `Err` holds the log when it exits
    /// first.
    pub fn spawn(mut command: Command, dir: tempfile::TempDir) -> Result<Self, String> {
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command.env("NO_COLOR", "1").stderr(Stdio::piped()).spawn().expect("start kiln");
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let log = Arc::new(Mutex::new(String::new()));
        let (found, address) = std::sync::mpsc::channel();
        // Keeps draining the log so the child never blocks on a full pipe.
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(rest) = line.split("grpc=").nth(1) {
                    let _ = found.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
                let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
                kept.push_str(&line);
                kept.push('\n');
            }
        });
        match address.recv_timeout(Duration::from_secs(60)) {
            Ok(grpc) => Ok(Self { child, grpc: grpc.parse().expect("an address"), log, _dir: dir }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(log.lock().unwrap_or_else(|p| p.into_inner()).clone())
            }
        }
    }

    fn status(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status")
    }

    fn kib(&self, field: &str) -> u64 {
        let status = self.status();
        let line = status.lines().find(|l| l.starts_with(field)).expect("field in /proc status");
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number")
    }

    /// Resets the peak resident memory to the current one (Linux >= 4.0).
    pub fn reset_peak(&self) -> u64 {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").expect("reset VmHWM");
        self.kib("VmHWM:") * 1024
    }

    /// Peak resident memory since the last reset.
    pub fn peak(&self) -> u64 {
        self.kib("VmHWM:") * 1024
    }

    /// Sends `signal` (`TERM`, `INT`) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal}");
    }

    /// Waits (bounded by `within`) for the process to exit; its status.
    pub fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A client, once the server accepts calls.
    pub async fn client(&self) -> kiln::client::Client {
        for _ in 0..500 {
            if let Ok(c) = kiln::client::Client::connect(&self.grpc.to_string()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("could not connect to {}", self.grpc)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

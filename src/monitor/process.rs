//! The process's own health in the standard Prometheus names: resident
//! memory, CPU seconds, threads and open file descriptors, read from
//! `/proc/self` at scrape time (Linux; elsewhere the lines are absent).

/// Clock ticks per second in `/proc/self/stat`: USER_HZ, 100 on every
/// mainstream Linux architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// The process metrics in Prometheus text format.
pub fn render() -> String {
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    if let Some(kib) = field("VmRSS:") {
        line("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", kib * 1024.0);
    }
    if let Some(threads) = field("Threads:") {
        line("process_threads", "gauge", "Operating-system threads in the process.", threads);
    }
    if let Some(seconds) = cpu_seconds() {
        line("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds.", seconds);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        line("process_open_fds", "gauge", "Open file descriptors.", fds.count() as f64);
    }
    out
}

/// utime + stime from `/proc/self/stat` (fields 14 and 15; the command
/// name in field 2 may hold spaces, so count from its closing parenthesis).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn reads_this_process() {
        let text = super::render();
        for name in
            ["process_resident_memory_bytes", "process_threads", "process_cpu_seconds_total", "process_open_fds"]
        {
            assert!(text.contains(&format!("\n{name} ")), "{name} missing in:\n{text}");
        }
    }
}

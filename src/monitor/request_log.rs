//! The sampled request log: one JSON line per sampled answered request
//! (request id, model version, batch id, timings, outputs, and inputs as
//! configured), written by its own thread and rotated by size. A full
//! channel drops the line and counts it; inference never waits on disk.
//!
//! Privacy: the files are mode 0600; without inputs no outputs are logged
//! either unless asked for; a request id is cut to [`MAX_ID_BYTES`]. A
//! failed write (a full disk) cuts its partial line off again, or when it
//! cannot, starts the next line on a line of its own, so a reader never
//! finds two records glued together. Failures warn at most once a minute.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use metrics::Counter;
use serde_json::{Value, json};

use crate::config::{InputLogMode, RequestLogConfig};
use crate::model::{Inputs, ModelSpec, Tensor, TensorData};
use crate::monitor::metrics::REQUEST_LOG_DROPPED;
use crate::request::Timing;

/// Lines waiting for the writer before new ones are dropped.
const CHANNEL_LINES: usize = 4096;

/// Longest request id logged: ids are the client's, of any length.
pub const MAX_ID_BYTES: usize = 128;

/// The least time between two warnings about the log file.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The executor's side of the request log.
pub struct RequestLog {
    /// Taken by `close`: the writer finishes the queued lines and stops.
    tx: std::sync::Mutex<Option<SyncSender<String>>>,
    sample_rate: f64,
    inputs: InputLogMode,
    outputs: bool,
    key: Vec<u8>,
    dropped: Counter,
}

/// One answered request, as the executor knows it.
pub struct Entry<'a> {
    pub spec: &'a ModelSpec,
    pub request_id: &'a str,
    pub batch_id: u64,
    pub timing: Timing,
    /// Receipt to the end of its batch.
    pub server_us: u64,
    /// Its own rows of every input, in declared order.
    pub inputs: &'a Inputs,
    /// (name, its rows) of each output it asked for.
    pub outputs: Vec<(&'a str, Tensor)>,
}

impl RequestLog {
    /// Opens (creating) the file and starts the writer thread.
    pub fn start(config: &RequestLogConfig, threads: &crate::runtime::Threads) -> std::io::Result<Self> {
        let writer = Writer::open(config.path.clone(), config.max_bytes, config.keep_files, open_private)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_LINES);
        threads.spawn("kiln-request-log", move || writer.run(rx))?;
        Ok(Self {
            tx: std::sync::Mutex::new(Some(tx)),
            sample_rate: config.sample_rate,
            inputs: config.inputs,
            outputs: config.logs_outputs(),
            key: config.hmac_key.as_ref().map(|k| k.expose().as_bytes().to_vec()).unwrap_or_default(),
            dropped: metrics::counter!(REQUEST_LOG_DROPPED),
        })
    }

    /// Draws whether the next request is logged.
    pub fn sampled(&self) -> bool {
        self.sample_rate >= 1.0 || (self.sample_rate > 0.0 && rand::random::<f64>() < self.sample_rate)
    }

    /// Queues one entry's line.
    pub fn write(&self, entry: Entry<'_>) {
        let line = self.line(entry).to_string();
        let sent = match self.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            Some(tx) => tx.try_send(line).is_ok(),
            None => false,
        };
        if !sent {
            self.dropped.increment(1);
        }
    }

    /// Stops taking lines; the writer writes what is queued, then stops.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    }

    fn line(&self, e: Entry<'_>) -> Value {
        let now_ms = super::unix_ms();
        let mut line = json!({
            "time_ms": now_ms,
            "request_id": capped(e.request_id),
            "model": e.spec.name,
            "version": e.spec.version,
            "weights_sha256": e.spec.weights_sha256,
            "batch_id": e.batch_id,
            "timings": {
                "queue_us": e.timing.queue_us,
                "compute_us": e.timing.compute_us,
                "cost_us": e.timing.cost_us,
                "batch_size": e.timing.batch_size,
                "server_us": e.server_us,
            },
        });
        if e.request_id.len() > MAX_ID_BYTES {
            line["request_id_truncated"] = true.into();
        }
        if self.outputs {
            line["outputs"] = e
                .outputs
                .iter()
                .map(|(name, t)| (name.to_string(), values(t)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        // Each declared input's name with its values (JSON) and raw bytes
        // (hashed); a text model's one input is logged as its token rows.
        let inputs: Vec<(&str, Value, Vec<u8>)> = match (self.inputs, e.inputs) {
            (InputLogMode::None, _) => Vec::new(),
            (_, Inputs::Tensors(tensors)) => {
                e.spec.inputs.iter().zip(tensors).map(|(s, t)| (s.name.as_str(), values(t), t.data.to_raw())).collect()
            }
            (_, Inputs::Tokens(rows)) => {
                e.spec.inputs.first().map_or_else(Vec::new, |s| vec![(s.name.as_str(), json!(rows), token_raw(rows))])
            }
        };
        match self.inputs {
            InputLogMode::None => {}
            InputLogMode::Full => {
                line["inputs"] =
                    inputs.into_iter().map(|(n, v, _)| (n.to_string(), v)).collect::<serde_json::Map<_, _>>().into();
            }
            InputLogMode::Hash => {
                line["inputs_hmac_sha256"] = inputs
                    .into_iter()
                    .map(|(n, _, raw)| (n.to_string(), Value::from(hmac_hex(&self.key, &raw))))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
        }
        line
    }
}

/// The first [`MAX_ID_BYTES`] of a request id, cut at a character.
fn capped(id: &str) -> &str {
    let mut end = id.len().min(MAX_ID_BYTES);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

/// Keyed HMAC-SHA256 of `bytes`, in hex.
pub fn hmac_hex(key: &[u8], bytes: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(bytes);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Token rows as bytes to hash: each row a 4-byte little-endian length,
/// then its ids as little-endian u32.
fn token_raw(rows: &[Vec<u32>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.iter().map(|r| 4 + 4 * r.len()).sum());
    for row in rows {
        out.extend_from_slice(&(row.len() as u32).to_le_bytes());
        out.extend(row.iter().flat_map(|id| id.to_le_bytes()));
    }
    out
}

/// A tensor's values as JSON (text as strings).
fn values(t: &Tensor) -> Value {
    match &t.data {
        TensorData::Fp32(v) => json!(v),
        TensorData::Fp64(v) => json!(v),
        TensorData::Int32(v) => json!(v),
        TensorData::Int64(v) => json!(v),
        TensorData::Bytes(v) => json!(v.iter().map(|b| String::from_utf8_lossy(b)).collect::<Vec<_>>()),
    }
}

/// The file under the writer: appended to, and cut back after a failed
/// write. Tests inject one that fails mid-line.
pub trait LogFile: Write + Send {
    fn set_len(&mut self, len: u64) -> std::io::Result<()>;
}

impl LogFile for File {
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }
}

/// Opens a log file to append, mode 0600 (tightened if it existed).
fn open_private(path: &Path) -> std::io::Result<(Box<dyn LogFile>, u64)> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    crate::security::restrict(&mut options);
    let file = options.open(path)?;
    crate::security::tighten(&file)?;
    let len = file.metadata()?.len();
    Ok((Box::new(file), len))
}

type Opener = fn(&Path) -> std::io::Result<(Box<dyn LogFile>, u64)>;

/// At most one warning per [`WARN_EVERY`], counting the ones held back.
#[derive(Default)]
struct Warnings {
    last: Option<Instant>,
    held: u64,
}

impl Warnings {
    fn warn(&mut self, path: &Path, what: &str, error: &std::io::Error) {
        if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            self.held += 1;
            return;
        }
        tracing::warn!(path = %path.display(), error = %error, similar_since_last = self.held, "request log: {what}");
        self.last = Some(Instant::now());
        self.held = 0;
    }
}

/// Appends lines to the file, rotating it past `max_bytes`.
struct Writer {
    path: PathBuf,
    file: Box<dyn LogFile>,
    open: Opener,
    /// Bytes of whole lines in the file.
    bytes: u64,
    max_bytes: u64,
    keep_files: usize,
    /// A failed write left a partial line that could not be cut off.
    torn: bool,
    warnings: Warnings,
}

impl Writer {
    fn open(path: PathBuf, max_bytes: u64, keep_files: usize, open: Opener) -> std::io::Result<Self> {
        let (file, bytes) = open(&path)?;
        Ok(Self { path, file, open, bytes, max_bytes, keep_files, torn: false, warnings: Warnings::default() })
    }

    fn run(mut self, rx: Receiver<String>) {
        for line in rx {
            if let Err(e) = self.append(&line) {
                self.warnings.warn(&self.path, "write failed; line lost", &e);
            }
        }
    }

    fn append(&mut self, line: &str) -> std::io::Result<()> {
        let size = line.len() as u64 + 1;
        if self.bytes > 0
            && self.bytes + size > self.max_bytes
            && let Err(e) = self.rotate()
        {
            // Keep logging into the current file rather than lose lines.
            self.warnings.warn(&self.path, "rotation failed; writing on past max_bytes", &e);
        }
        if self.torn && self.file.set_len(self.bytes).is_ok() {
            self.torn = false;
        }
        let mut record = Vec::with_capacity(line.len() + 2);
        if self.torn {
            record.push(b'\n');
        }
        record.extend_from_slice(line.as_bytes());
        record.push(b'\n');
        match self.file.write_all(&record).and_then(|()| self.file.flush()) {
            Ok(()) => {
                self.bytes += record.len() as u64;
                self.torn = false;
                Ok(())
            }
            Err(e) => {
                // Part of the record may be in the file: cut it off.
                self.torn = self.file.set_len(self.bytes).is_err();
                Err(e)
            }
        }
    }

    /// FILE → FILE.1 → FILE.2 …, keeping `keep_files` old files.
    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |n: usize| -> PathBuf { PathBuf::from(format!("{}.{n}", self.path.display())) };
        if self.keep_files == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep_files));
            for n in (1..self.keep_files).rev() {
                if Path::new(&numbered(n)).exists() {
                    std::fs::rename(numbered(n), numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        let (file, bytes) = (self.open)(&self.path)?;
        self.file = file;
        self.bytes = bytes;
        self.torn = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hmac_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    fn spec() -> ModelSpec {
        let mut spec = ModelSpec::in_memory(
            "m",
            vec![crate::model::TensorSpec::fp32("x", 2)],
            vec![crate::model::TensorSpec::fp32("y", 1)],
        );
        spec.version = 2;
        spec
    }

    #[test]
    fn each_input_mode_writes_what_it_promises() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = spec();
        let x = [Tensor { shape: vec![1, 2], data: TensorData::Fp32(vec![1.5, -2.0]) }];
        let sent = Inputs::Tensors(x.to_vec());
        let y = Tensor { shape: vec![1, 1], data: TensorData::Fp32(vec![0.25]) };
        let line = |inputs: InputLogMode| {
            let log = RequestLog::start(
                &RequestLogConfig {
                    path: dir.path().join("log.jsonl"),
                    sample_rate: 1.0,
                    max_bytes: 1 << 20,
                    keep_files: 1,
                    inputs,
                    hmac_key: Some(crate::security::Secret::new("k")),
                    outputs: None,
                },
                &crate::runtime::Threads::default(),
            )
            .expect("starts");
            log.line(Entry {
                spec: &spec,
                request_id: "r1",
                batch_id: 9,
                timing: Timing { queue_us: 3, compute_us: 4, batch_size: 1, cost_us: 4 },
                server_us: 10,
                inputs: &sent,
                outputs: vec![("y", y.clone())],
            })
        };
        let none = line(InputLogMode::None);
        assert_eq!(none["request_id"], "r1");
        assert_eq!(none["version"], 2);
        assert_eq!(none["batch_id"], 9);
        assert_eq!(none["timings"]["queue_us"], 3);
        assert!(none.get("outputs").is_none(), "no inputs, no outputs unless asked: {none}");
        assert!(none.get("inputs").is_none() && none.get("inputs_hmac_sha256").is_none());
        let full = line(InputLogMode::Full);
        assert_eq!(full["outputs"]["y"], json!([0.25]));
        assert_eq!(full["inputs"]["x"], json!([1.5, -2.0]));
        let hashed = line(InputLogMode::Hash);
        assert_eq!(hashed["inputs_hmac_sha256"]["x"], hmac_hex(b"k", &x[0].data.to_raw()).as_str());
        assert!(hashed.get("inputs").is_none());
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("requests.jsonl");
        let mut w = Writer::open(path.clone(), 25, 2, open_private).expect("open");
        for i in 0..10 {
            w.append(&format!("line number {i:02}")).expect("append");
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        assert_eq!(read(&path), "line number 09\n");
        assert_eq!(read(&dir.path().join("requests.jsonl.1")), "line number 08\n");
        assert_eq!(read(&dir.path().join("requests.jsonl.2")), "line number 07\n");
        assert!(!dir.path().join("requests.jsonl.3").exists());
    }

    #[test]
    fn warnings_are_held_back_within_a_minute_and_counted() {
        let mut w = Warnings::default();
        let e = std::io::Error::other("disk full");
        w.warn(Path::new("x"), "write failed", &e);
        let first = w.last.expect("warned");
        for _ in 0..5 {
            w.warn(Path::new("x"), "write failed", &e);
        }
        assert_eq!((w.last, w.held), (Some(first), 5), "held back, not printed");
        // A machine up for under a minute cannot go back a minute.
        if let Some(earlier) = first.checked_sub(WARN_EVERY) {
            w.last = Some(earlier);
            w.warn(Path::new("x"), "write failed", &e);
            assert_eq!(w.held, 0, "a minute later it warns again");
        }
    }

    #[test]
    fn long_ids_are_cut_at_a_character() {
        let id = "é".repeat(100);
        let cut = capped(&id);
        assert!(cut.len() <= MAX_ID_BYTES && cut.len() >= MAX_ID_BYTES - 1 && id.starts_with(cut));
        assert_eq!(capped("short"), "short");
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private_even_if_they_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("requests.jsonl");
        std::fs::write(&path, "").expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut w = Writer::open(path.clone(), 10, 1, open_private).expect("open");
        w.append("one line").expect("append");
        w.append("rotated").expect("append");
        for p in [path.clone(), dir.path().join("requests.jsonl.1")] {
            let mode = std::fs::metadata(&p).expect("exists").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    /// A file that takes only `room` more bytes (part of a write, then an
    /// error, as a full disk does), and whose `set_len` may fail too.
    struct FullDisk {
        file: File,
        room: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        cut_fails: bool,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            use std::sync::atomic::Ordering;
            let room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"));
            }
            let n = self.file.write(&buf[..buf.len().min(room)])?;
            self.room.fetch_sub(n, Ordering::SeqCst);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }

    impl LogFile for FullDisk {
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            if self.cut_fails { Err(std::io::Error::other("cannot truncate")) } else { self.file.set_len(len) }
        }
    }

    #[test]
    fn a_write_failing_mid_line_never_glues_two_lines() {
        for cut_fails in [false, true] {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("requests.jsonl");
            let room = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
            let file = OpenOptions::new().create(true).append(true).open(&path).expect("open");
            let mut w = Writer {
                path: path.clone(),
                file: Box::new(FullDisk { file, room: room.clone(), cut_fails }),
                open: open_private,
                bytes: 0,
                max_bytes: 1 << 20,
                keep_files: 1,
                torn: false,
                warnings: Warnings::default(),
            };
            w.append("{\"first\":1}").expect("fits");
            room.store(5, std::sync::atomic::Ordering::SeqCst);
            w.append("{\"second\":2}").expect_err("the disk fills mid-line");
            room.store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
            w.append("{\"third\":3}").expect("space again");
            let text = std::fs::read_to_string(&path).expect("read");
            let whole: Vec<&str> = text.lines().filter(|l| serde_json::from_str::<Value>(l).is_ok()).collect();
            assert_eq!(whole, ["{\"first\":1}", "{\"third\":3}"], "cut_fails={cut_fails}: {text:?}");
            if cut_fails {
                assert_eq!(text, "{\"first\":1}\n{\"sec\n{\"third\":3}\n", "the torn line stands alone");
            } else {
                assert_eq!(text, "{\"first\":1}\n{\"third\":3}\n", "the partial line was cut off");
            }
        }
    }
}

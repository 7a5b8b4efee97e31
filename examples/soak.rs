//! Soak driver for `scripts/soak.sh`: open-loop traffic at a fixed rate to
//! a running Kiln (127.0.0.1 only), mixing good, malformed, oversized,
//! amplifying, expiring and cancelled requests with silent and half-open
//! connections, for a bounded time. It reports the server's resident
//! memory, descriptors and threads after warm-up and at the end (both
//! measured with this driver's connections closed), and the answers by
//! gRPC code.
//!
//!   soak --url 127.0.0.1:8001 --pid PID --rate 3000 --warmup 30 --duration 180

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln::client::{Client, ParameterChoice};
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy)]
struct Args {
    url: SocketAddr,
    pid: u32,
    rate: f64,
    warmup: f64,
    duration: f64,
}

fn args() -> Args {
    let mut parsed =
        Args { url: "127.0.0.1:8001".parse().expect("addr"), pid: 0, rate: 1000.0, warmup: 30.0, duration: 180.0 };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--url" => parsed.url = value.parse().expect("--url HOST:PORT on 127.0.0.1"),
            "--pid" => parsed.pid = value.parse().expect("--pid"),
            "--rate" => parsed.rate = value.parse().expect("--rate"),
            "--warmup" => parsed.warmup = value.parse().expect("--warmup"),
            "--duration" => parsed.duration = value.parse().expect("--duration"),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(parsed.url.ip().is_loopback(), "the soak sends traffic to 127.0.0.1 only");
    assert!(parsed.pid > 0, "--pid of the server is required");
    parsed
}

/// Resident bytes, open descriptors and threads of `pid`.
fn usage(pid: u32) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (field("VmRSS:") * 1024, fds, field("Threads:") as usize)
}

type Codes = Arc<Mutex<BTreeMap<String, u64>>>;

fn count(codes: &Codes, kind: &str, code: &str) {
    *codes.lock().expect("counts").entry(format!("{kind:>10} {code}")).or_default() += 1;
}

fn code_of(result: &Result<tonic::Response<kiln::api::pb::ModelInferResponse>, tonic::Status>) -> String {
    match result {
        Ok(_) => "OK".into(),
        Err(s) => kiln::api::status::code_name(s.code()).into(),
    }
}

/// One gRPC message sent as raw bytes over its own HTTP/2 connection.
async fn raw_call(addr: SocketAddr, message: Bytes) -> String {
    let Ok(stream) = TcpStream::connect(addr).await else { return "CONNECT_FAILED".into() };
    let Ok((mut send, connection)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await
    else {
        return "HANDSHAKE_FAILED".into();
    };
    tokio::spawn(connection);
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.extend_from_slice(&message);
    let request = http::Request::post(format!("http://{addr}/inference.GRPCInferenceService/ModelInfer"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(frame.freeze()))
        .expect("request");
    match send.send_request(request).await {
        Ok(response) => tonic::Status::from_header_map(response.headers())
            .map(|s| kiln::api::status::code_name(s.code()).to_string())
            .unwrap_or_else(|| "OK".into()),
        Err(_) => "TRANSPORT".into(),
    }
}

/// Silent connections (never send the preface) and half-open ones (an
/// HTTP/2 handshake, then nothing), opened a few each second.
async fn idle_connections(addr: SocketAddr, until: Instant, codes: Codes) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < until {
        tick.tick().await;
        if let Ok(silent) = TcpStream::connect(addr).await {
            count(&codes, "silent", "opened");
            tokio::spawn(async move {
                let mut silent = silent;
                let mut buf = [0u8; 64];
                let _ =
                    tokio::time::timeout(Duration::from_secs(60), tokio::io::AsyncReadExt::read(&mut silent, &mut buf))
                        .await;
            });
        }
        if let Ok(stream) = TcpStream::connect(addr).await
            && let Ok((send, connection)) = hyper::client::conn::http2::handshake::<_, _, http_body_util::Full<Bytes>>(
                TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await
        {
            count(&codes, "half-open", "opened");
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(60), connection).await;
                drop(send);
            });
        }
    }
}

async fn traffic(args: Args, seconds: f64, codes: Codes) {
    let clients: Vec<Client> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(Client::connect(&args.url.to_string()).await.expect("connect"));
        }
        v
    };
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let idle = tokio::spawn(idle_connections(args.url, until, codes.clone()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let good_row = vec![
        17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053, 8.589, 153.4,
        0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193, 25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119,
        0.2654, 0.4601, 0.1189f32,
    ];
    let amplifier = {
        let mut m = vec![0x0a, 4];
        m.extend_from_slice(b"risk");
        m.extend([0x2a, 0x00].repeat(1 << 20));
        Bytes::from(m)
    };
    let oversized = Bytes::from(vec![0u8; 5 << 20]);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2000));
    let start = Instant::now();
    let mut sent = 0u64;
    let (mut last_big, mut last_amp) = (start, start);
    while Instant::now() < until {
        // Open loop: the n-th request leaves at n / rate.
        let due = start + Duration::from_secs_f64(sent as f64 / args.rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            // Timer granularity is a millisecond: requests due within it
            // leave together, which an open loop at these rates tolerates.
            tokio::time::sleep(wait.min(Duration::from_millis(5))).await;
            if Instant::now() < due {
                continue;
            }
        }
        sent += 1;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            count(&codes, "client", "OVERLOADED");
            continue;
        };
        let mut client = clients[sent as usize % clients.len()].clone();
        let codes = codes.clone();
        let pick: f64 = rng.random();
        // Twice a second an oversized message, once a second an amplifying
        // one, each on its own connection.
        let raw = if last_big.elapsed() > Duration::from_millis(500) {
            last_big = Instant::now();
            Some(("oversized", oversized.clone()))
        } else if last_amp.elapsed() > Duration::from_secs(1) {
            last_amp = Instant::now();
            Some(("amplifier", amplifier.clone()))
        } else {
            None
        };
        if let Some((kind, body)) = raw {
            tokio::spawn(async move {
                count(&codes, kind, &raw_call(args.url, body).await);
                drop(permit);
            });
            continue;
        }
        let row = good_row.clone();
        tokio::spawn(async move {
            let request = kiln::client::fp32_request("risk", "features", std::slice::from_ref(&row));
            if pick < 0.65 {
                count(&codes, "good", &code_of(&client.raw.model_infer(request).await));
            } else if pick < 0.75 {
                let bad = kiln::client::fp32_request("risk", "features", &[row[..29].to_vec()]);
                count(&codes, "malformed", &code_of(&client.raw.model_infer(bad).await));
            } else if pick < 0.85 {
                let mut expiring = request;
                expiring.parameters.insert(
                    "timeout".into(),
                    kiln::api::pb::InferParameter { parameter_choice: Some(ParameterChoice::Uint64Param(1)) },
                );
                count(&codes, "expiring", &code_of(&client.raw.model_infer(expiring).await));
            } else {
                // Cancelled by the client shortly after sending.
                let call = client.raw.model_infer(request);
                match tokio::time::timeout(Duration::from_micros(200), call).await {
                    Ok(result) => count(&codes, "cancelled", &format!("{} (finished first)", code_of(&result))),
                    Err(_) => count(&codes, "cancelled", "CANCELLED"),
                }
            }
            drop(permit);
        });
    }
    let _ = idle.await;
    // Every request answered or given up before the measurement.
    let _ = tokio::time::timeout(Duration::from_secs(30), in_flight.acquire_many(2000)).await;
}

/// Waits for the server to close what this driver opened, then measures.
async fn quiet_usage(pid: u32) -> (u64, usize, usize) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    usage(pid)
}

#[tokio::main]
async fn main() {
    let args = args();
    let codes: Codes = Arc::default();
    println!("warm-up: {} s at {} req/s", args.warmup, args.rate);
    traffic(args, args.warmup, codes.clone()).await;
    let warm = quiet_usage(args.pid).await;
    codes.lock().expect("counts").clear();
    println!("soak: {} s at {} req/s", args.duration, args.rate);
    traffic(args, args.duration, codes.clone()).await;
    let end = quiet_usage(args.pid).await;
    println!("\nanswers during the soak, by kind and code:");
    for (key, n) in codes.lock().expect("counts").iter() {
        println!("  {key:40} {n}");
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("\n{:12} {:>12} {:>8} {:>8}", "", "RSS MiB", "fds", "threads");
    println!("{:12} {:>12.1} {:>8} {:>8}", "after warm-up", mib(warm.0), warm.1, warm.2);
    println!("{:12} {:>12.1} {:>8} {:>8}", "at the end", mib(end.0), end.1, end.2);
    let rss_ok = end.0 as f64 <= warm.0 as f64 * 1.10;
    let ok = rss_ok && end.1 == warm.1 && end.2 == warm.2;
    println!(
        "\nRSS {:+.1} % (limit +10 %), fds {:+}, threads {:+}: {}",
        (end.0 as f64 / warm.0 as f64 - 1.0) * 100.0,
        end.1 as i64 - warm.1 as i64,
        end.2 as i64 - warm.2 as i64,
        if ok { "PASS" } else { "FAIL" }
    );
    std::process::exit(if ok { 0 } else { 1 });
}

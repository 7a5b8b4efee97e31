//! Security against a live server: TLS and mutual TLS with the Rust
//! client, certificate rotation without a restart (a Kubernetes-style
//! symlink swap, and a bad pair kept out), plaintext refused with a clear
//! answer; API keys, models, tenants and admin; and a scan of everything
//! the server printed for the secrets it was given.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use common::child::{Server, kiln_bin};
use kiln::api::pb;
use kiln::client::{Client, ClientTls, Credentials, ParameterChoice, fp32_request};
use kiln::config::{AuthConfig, RepositorySource, ServeConfig, TenantConfig, TlsConfig};
use kiln::security::certs::{DevCa, Pair};
use kiln::security::keys::{entry_toml, generate};
use tonic::Code;

fn logged(needle: &str) -> bool {
    common::CapturedLog::install().text().contains(needle)
}

fn row() -> Vec<f32> {
    common::wdbc().0[0].clone()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

fn tls_client(dir: &Path, ca: &str, client: Option<&Pair>) -> Credentials {
    let ca_path = dir.join(format!("trust-{}.pem", rand::random::<u32>()));
    write(&ca_path, ca);
    let (cert, key) = match client {
        Some(pair) => {
            let n = rand::random::<u32>();
            let (c, k) = (dir.join(format!("c-{n}.pem")), dir.join(format!("k-{n}.pem")));
            write(&c, &pair.cert);
            write(&k, &pair.key);
            (Some(c), Some(k))
        }
        None => (None, None),
    };
    Credentials { tls: Some(ClientTls { ca: ca_path, cert, key }), bearer: None }
}

/// One inference over `credentials`; the status when it fails.
async fn infer(addr: &str, credentials: &Credentials) -> Result<(), tonic::Status> {
    let mut client = Client::connect_with(addr, credentials)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e}: {:?}", std::error::Error::source(&e))))?;
    client.infer_fp32("risk", "features", &[row()]).await.map(|_| ())
}

/// A Kubernetes-style secret volume: `tls.crt -> ..data/tls.crt`, with
/// `..data` a symlink to a timestamped folder that is swapped atomically.
struct SecretVolume {
    root: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(root: &Path, pair: &Pair) -> Self {
        let mut volume = Self { root: root.to_path_buf(), generation: 0 };
        volume.publish(pair);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).expect("symlink");
        }
        volume
    }

    fn publish(&mut self, pair: &Pair) {
        self.generation += 1;
        let folder = format!("..{}", self.generation);
        std::fs::create_dir_all(self.root.join(&folder)).expect("mkdir");
        write(&self.root.join(&folder).join("tls.crt"), &pair.cert);
        write(&self.root.join(&folder).join("tls.key"), &pair.key);
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&folder, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.root.join("..data")).expect("atomic swap");
    }

    fn files(&self) -> (PathBuf, PathBuf) {
        (self.root.join("tls.crt"), self.root.join("tls.key"))
    }
}

/// Waits (bounded) until `check` holds; the watch polls every second.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..150 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 15 s: {what}");
}

/// GET /metrics over TLS by hand (HTTP/1.1), or in plain text.
async fn metrics_over(addr: std::net::SocketAddr, ca: Option<&str>) -> String {
    metrics_as(addr, ca, None).await
}

/// GET /metrics, presenting `client` under mutual TLS.
async fn metrics_as(addr: std::net::SocketAddr, ca: Option<&str>, client: Option<&Pair>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut out = String::new();
    match ca {
        None => {
            let mut tcp = tcp;
            tcp.write_all(request).await.expect("write");
            let _ = tcp.read_to_string(&mut out).await;
        }
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(cert.expect("pem")).expect("root");
            }
            let config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(roots);
            let config = match client {
                None => config.with_no_client_auth(),
                Some(pair) => {
                    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(pair.cert.as_bytes())
                        .collect::<Result<Vec<_>, _>>()
                        .expect("pem");
                    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).expect("key");
                    config.with_client_auth_cert(chain, key).expect("client auth")
                }
            };
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            // A refused handshake reads as no answer at all.
            let Ok(mut tls) = connector.connect(name, tcp).await else { return out };
            tls.write_all(request).await.expect("write");
            let _ = tls.read_to_string(&mut out).await;
        }
    }
    out
}

use rustls_pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_rotates_and_refuses_plaintext_clearly() {
    common::CapturedLog::install();
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let (first_ca, next_ca) = (DevCa::new().expect("ca"), DevCa::new().expect("ca"));
    let volume_dir = dir.path().join("secret");
    std::fs::create_dir_all(&volume_dir).expect("mkdir");
    let mut volume = SecretVolume::new(&volume_dir, &first_ca.server(&hosts).expect("pair"));
    let (cert, key) = volume.files();
    let trusting_first = tls_client(dir.path(), &first_ca.cert, None);
    let server = TestServer::start_with(
        ServeConfig { tls: Some(TlsConfig { cert, key, client_ca: None }), ..Default::default() },
        trusting_first.clone(),
    )
    .await;
    let addr = server.addr.to_string();

    // TLS works; a plaintext client is told what is wrong, in gRPC terms.
    infer(&addr, &trusting_first).await.expect("an inference over TLS");
    let plain = infer(&addr, &Credentials::default()).await.expect_err("plaintext on a TLS port");
    assert_eq!(plain.code(), Code::FailedPrecondition, "{plain:?}");
    assert!(plain.message().contains("accepts TLS only"), "{plain:?}");
    // The metrics port speaks TLS too, and tells a plain scraper so.
    let scraped = metrics_over(server.metrics_addr, Some(&first_ca.cert)).await;
    assert!(scraped.starts_with("HTTP/1.1 200") && scraped.contains("kiln_build_info"), "{scraped}");
    let plain = metrics_over(server.metrics_addr, None).await;
    assert!(plain.starts_with("HTTP/1.1 400") && plain.contains("accepts TLS only"), "{plain}");

    // Rotation: the secret volume swaps to a pair from another CA.
    let trusting_next = tls_client(dir.path(), &next_ca.cert, None);
    infer(&addr, &trusting_next).await.expect_err("the new CA is not in use yet");
    volume.publish(&next_ca.server(&hosts).expect("pair"));
    eventually("the rotated pair is served", async || infer(&addr, &trusting_next).await.is_ok()).await;
    infer(&addr, &trusting_first).await.expect_err("the old pair is gone");

    // A mismatched pair is logged and kept out: the last good pair stays.
    let (a, b) = (first_ca.server(&hosts).expect("pair"), first_ca.server(&hosts).expect("pair"));
    volume.publish(&Pair { cert: a.cert, key: b.key });
    eventually("the bad pair is reported", async || logged("TLS certificate not reloaded")).await;
    infer(&addr, &trusting_next).await.expect("still the last good pair");
    let metrics = metrics_over(server.metrics_addr, Some(&next_ca.cert)).await;
    assert!(metrics.contains("kiln_tls_handshake_failures_total"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_requires_a_client_certificate_the_ca_signed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let (ca, stranger) = (DevCa::new().expect("ca"), DevCa::new().expect("ca"));
    let server_pair = ca.server(&hosts).expect("pair");
    let files = TlsConfig {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: Some(dir.path().join("ca.pem")),
    };
    write(&files.cert, &server_pair.cert);
    write(&files.key, &server_pair.key);
    write(files.client_ca.as_ref().expect("set"), &ca.cert);
    let checkout = ca.client("checkout").expect("client pair");
    let with_cert = tls_client(dir.path(), &ca.cert, Some(&checkout));
    let tenants = [("checkout".to_string(), TenantConfig { budget: 1.0, burst: 1.0 })].into();
    let config = ServeConfig {
        tls: Some(files),
        tenants,
        auth: AuthConfig { tenant_from_client_cert: true, ..Default::default() },
        ..Default::default()
    };
    let server = TestServer::start_with(config, with_cert.clone()).await;
    let addr = server.addr.to_string();

    infer(&addr, &with_cert).await.expect("a certificate the CA signed");
    // Under TLS 1.3 the client may finish its side of the handshake before
    // the server refuses its (missing) certificate, so the failure shows at
    // connect or at the first call, with whatever code the client picks.
    let err = infer(&addr, &tls_client(dir.path(), &ca.cert, None)).await.expect_err("no certificate");
    assert_ne!(err.code(), Code::Ok, "{err:?}");
    let forged = stranger.client("checkout").expect("pair");
    infer(&addr, &tls_client(dir.path(), &ca.cert, Some(&forged))).await.expect_err("another CA's certificate");

    // The certificate's common name is the tenant: it may not claim another.
    let mut client = Client::connect_with(&addr, &with_cert).await.expect("connect");
    let spoof = common::with_param(
        fp32_request("risk", "features", &[row()]),
        "tenant",
        ParameterChoice::StringParam("search".into()),
    );
    let status = client.raw.model_infer(spoof).await.expect_err("another tenant");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("tenant 'checkout'"), "{status:?}");
    // The metrics port asks for a certificate too.
    let metrics = metrics_as(server.metrics_addr, Some(&ca.cert), Some(&checkout)).await;
    assert!(metrics.contains("tenant=\"checkout\""), "the certificate's tenant is charged: {metrics}");
    assert_eq!(metrics_over(server.metrics_addr, Some(&ca.cert)).await, "", "no certificate, no metrics");
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_tls_handshake_failures_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(failures.is_some_and(|n| n >= 2.0), "both refused handshakes are counted: {failures:?}");
}

/// A repository with two copies of the risk model, `risk` and `fraud`.
fn two_models() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/risk");
    for name in ["risk", "fraud"] {
        std::fs::create_dir_all(dir.path().join(name).join("1")).expect("mkdir");
        std::fs::copy(source.join("model.toml"), dir.path().join(name).join("model.toml")).expect("copy");
        std::fs::copy(source.join("1/model.safetensors"), dir.path().join(name).join("1/model.safetensors"))
            .expect("copy");
    }
    dir
}

fn with_key(key: &str) -> Credentials {
    Credentials { tls: None, bearer: Some(key.into()) }
}

async fn call(addr: &str, credentials: &Credentials, request: pb::ModelInferRequest) -> Result<(), tonic::Status> {
    let mut client = Client::connect_with(addr, credentials).await.expect("connect");
    client.raw.model_infer(request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_name_callers_models_and_tenants_and_probes_stay_open() {
    let repo = two_models();
    let dir = tempfile::tempdir().expect("tempdir");
    let checkout = generate("checkout", vec!["risk".into()]);
    let ops = generate("ops", vec![]);
    let keys_file = dir.path().join("keys.toml");
    write(&keys_file, &(entry_toml(&checkout.entry) + &entry_toml(&ops.entry)));
    let tenants: std::collections::BTreeMap<_, _> = [
        ("checkout".to_string(), TenantConfig { budget: 1.0, burst: 1.0 }),
        ("search".to_string(), TenantConfig { budget: 1.0, burst: 1.0 }),
    ]
    .into();
    let config = ServeConfig {
        repository: RepositorySource::Dir(repo.path().to_path_buf()),
        tenants,
        auth: AuthConfig {
            keys_file: Some(keys_file.clone()),
            admins: vec![format!("key:{}", ops.entry.id)],
            ..Default::default()
        },
        admin_token: Some("an-admin-token-long-enough".into()),
        ..Default::default()
    };
    let server = TestServer::start(config).await;
    let addr = server.addr.to_string();
    let risk = || fp32_request("risk", "features", &[row()]);
    let as_checkout = with_key(checkout.key.expose());

    // Probes need nothing; everything else needs a known key.
    let mut anonymous = Client::connect(&addr).await.expect("connect");
    assert!(anonymous.raw.server_ready(pb::ServerReadyRequest {}).await.expect("open").into_inner().ready);
    anonymous.raw.server_live(pb::ServerLiveRequest {}).await.expect("open");
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health.check(tonic_health::pb::HealthCheckRequest { service: "risk".into() }).await.expect("health is open");
    for (who, credentials) in [("no key", Credentials::default()), ("unknown key", with_key("kiln_0badc0de_00"))] {
        let status = call(&addr, &credentials, risk()).await.expect_err(who);
        assert_eq!(status.code(), Code::Unauthenticated, "{who}: {status:?}");
        let status = anonymous.raw.model_metadata(pb::ModelMetadataRequest { name: "risk".into(), version: "".into() });
        assert_eq!(status.await.expect_err(who).code(), Code::Unauthenticated);
    }

    // A key calls the models it lists, and sees only those.
    call(&addr, &as_checkout, risk()).await.expect("checkout may call risk");
    let status = call(&addr, &as_checkout, fp32_request("fraud", "features", &[row()])).await.expect_err("not listed");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("may not call model 'fraud'"), "{status:?}");
    let mut client = Client::connect_with(&addr, &as_checkout).await.expect("connect");
    let index = client.raw.repository_index(pb::RepositoryIndexRequest::default()).await.expect("index");
    let names: Vec<String> = index.into_inner().models.into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["risk"]);
    let config = client.raw.model_config(pb::ModelConfigRequest { name: "fraud".into(), version: "".into() });
    assert_eq!(config.await.expect_err("not listed").code(), Code::PermissionDenied);
    call(&addr, &with_key(ops.key.expose()), fp32_request("fraud", "features", &[row()])).await.expect("ops: all");

    // The tenant is the key's: a parameter or header naming another is
    // refused before admission, so search's budget never moves.
    let spoofed = common::with_param(risk(), "tenant", ParameterChoice::StringParam("search".into()));
    let status = call(&addr, &as_checkout, spoofed).await.expect_err("spoofed parameter");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let mut by_header = tonic::Request::new(risk());
    by_header.metadata_mut().insert("x-kiln-tenant", "search".parse().expect("ascii"));
    let status = client.raw.model_infer(by_header).await.expect_err("spoofed header");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let same = common::with_param(risk(), "tenant", ParameterChoice::StringParam("checkout".into()));
    call(&addr, &as_checkout, same).await.expect("repeating its own tenant is fine");
    let metrics = server.metrics_text().await;
    assert!(metrics.contains("tenant=\"checkout\""), "{metrics}");
    assert!(!metrics.contains("tenant=\"search\""), "search was never charged: {metrics}");

    // Admin: the token or a listed key; an ordinary key is forbidden.
    let drift = |credentials: Credentials| {
        let addr = addr.clone();
        async move { kiln::client::drift::fetch(&addr, "risk", "", &credentials).await.expect("connects") }
    };
    drift(with_key("an-admin-token-long-enough")).await.expect("the admin token");
    drift(with_key(ops.key.expose())).await.expect("a listed admin key");
    assert_eq!(drift(as_checkout.clone()).await.expect_err("ordinary").code(), Code::PermissionDenied);
    assert_eq!(drift(Credentials::default()).await.expect_err("nothing").code(), Code::Unauthenticated);
    assert_eq!(drift(with_key("an-admin-token-long-enougH")).await.expect_err("near").code(), Code::Unauthenticated);

    // A key added to the file is accepted without a restart.
    let late = generate("search", vec![]);
    write(&keys_file, &(entry_toml(&checkout.entry) + &entry_toml(&ops.entry) + &entry_toml(&late.entry)));
    let late_key = with_key(late.key.expose());
    eventually("the new key is accepted", async || call(&addr, &late_key, risk()).await.is_ok()).await;
    // A broken file is refused and the keys in use are kept.
    write(&keys_file, "[[key]]\nid = 3\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    call(&addr, &as_checkout, risk()).await.expect("the keys in use are kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_auth_naming_no_tenant_spends_the_default_budget() {
    let tenants = [("default".to_string(), TenantConfig { budget: 1e-9, burst: 0.0005 })].into();
    let server = TestServer::start(ServeConfig { tenants, ..Default::default() }).await;
    let mut client = server.client().await;
    let mut refused = None;
    for _ in 0..2000 {
        if let Err(status) = client.infer_fp32("risk", "features", &[row()]).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the default budget runs out");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("tenant 'default'"), "{status:?}");
    // An unlisted name is no way around it either.
    let other = common::with_param(
        fp32_request("risk", "features", &[row()]),
        "tenant",
        ParameterChoice::StringParam("made-up".into()),
    );
    assert_eq!(client.raw.model_infer(other).await.expect_err("unlisted").code(), Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_logs_metrics_or_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin_token = format!("admin-{}", kiln::security::secret::hex(&rand::random::<[u8; 16]>()));
    let hmac_key = format!("hmac-{}", kiln::security::secret::hex(&rand::random::<[u8; 16]>()));
    let key = generate("checkout", vec!["risk".into()]);
    let keys_file = dir.path().join("keys.toml");
    write(&keys_file, &entry_toml(&key.entry));
    let token_file = dir.path().join("admin-token");
    write(&token_file, &format!("{admin_token}\n"));
    let log_path = dir.path().join("requests.jsonl");
    let config = dir.path().join("kiln.toml");
    write(
        &config,
        &format!(
            "[auth]\nkeys_file = \"{}\"\nadmin_token_file = \"{}\"\n\
             [request_log]\npath = \"{}\"\nsample_rate = 1.0\ninputs = \"hash\"\nhmac_key = \"{hmac_key}\"\n",
            keys_file.display(),
            token_file.display(),
            log_path.display()
        ),
    );
    let mut command = Command::new(kiln_bin());
    command
        .args(["serve", "--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--http", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .env_remove("KILN_ADMIN_TOKEN");
    let server = Server::spawn(command, tempfile::tempdir().expect("tempdir")).expect("starts");
    let addr = server.grpc.to_string();
    // Near misses of every secret, which a careless error would echo.
    let real = key.key.expose().to_string();
    let wrong_key = format!("{}0", &real[..real.len() - 1]);
    let mut answers = Vec::new();
    for credentials in [
        with_key(&real),
        with_key(&wrong_key),
        with_key(&admin_token),
        with_key(&format!("{admin_token}x")),
        with_key(&hmac_key),
    ] {
        for model in ["risk", "fraud"] {
            if let Err(status) = call(&addr, &credentials, fp32_request(model, "features", &[row()])).await {
                answers.push(status.message().to_string());
            }
        }
        if let Err(status) = kiln::client::drift::fetch(&addr, "risk", "", &credentials).await.expect("connects") {
            answers.push(status.message().to_string());
        }
    }
    assert!(answers.len() >= 8, "the wrong credentials were refused: {answers:?}");
    // A keys file that does not parse is reported without its contents.
    write(&keys_file, &format!("{}\nbroken = [", entry_toml(&key.entry)));
    let logged_reload = async {
        for _ in 0..100 {
            if server.log.lock().expect("log").contains("API keys not reloaded") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(logged_reload.await, "the bad keys file is reported");
    let log = server.log.lock().expect("log").clone();
    let metrics_addr: std::net::SocketAddr = log
        .split("metrics=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("the metrics address is logged");
    let metrics = metrics_over(metrics_addr, None).await;
    assert!(metrics.contains("kiln_ingress_refused_total{reason=\"unauthenticated\"}"), "{metrics}");
    let request_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!request_log.is_empty(), "the accepted call was logged");
    let secret_part = |k: &str| k.rsplit('_').next().unwrap_or(k).to_string();
    for secret in [&admin_token, &hmac_key, &secret_part(&real), &secret_part(&wrong_key)] {
        let answers = answers.join("\n");
        for (place, text) in
            [("log", &log), ("request log", &request_log), ("answers", &answers), ("metrics", &metrics)]
        {
            assert!(!text.contains(secret.as_str()), "a secret appears in the {place}");
        }
    }
    assert!(log.contains("DEBUG"), "the scan read a debug-level log");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&log_path).expect("log").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn empty_and_short_secrets_are_refused_from_every_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |config: &str, env: &[(&str, &str)], args: &[&str]| {
        let path = dir.path().join("kiln.toml");
        write(&path, config);
        let mut command = Command::new(kiln_bin());
        command
            .args(["serve", "--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--http", "127.0.0.1:0", "--config"])
            .arg(&path);
        command.args(args).env_remove("KILN_ADMIN_TOKEN").env_remove("KILN_REQUEST_LOG_KEY");
        for (k, v) in env {
            command.env(k, v);
        }
        let output = command.output().expect("runs");
        assert!(!output.status.success(), "{config} {env:?} {args:?} should not start");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let log = dir.path().join("r.jsonl");
    let empty_file = dir.path().join("empty");
    write(&empty_file, "\n");
    let request_log = |extra: &str| format!("[request_log]\npath = \"{}\"\ninputs = \"hash\"\n{extra}", log.display());
    for (config, env, args, expected) in [
        (request_log("hmac_key = \"\"\n"), vec![], vec![], "must not be empty"),
        (request_log(""), vec![("KILN_REQUEST_LOG_KEY", "")], vec![], "must not be empty"),
        (String::new(), vec![("KILN_ADMIN_TOKEN", "")], vec![], "empty"),
        (String::new(), vec![("KILN_ADMIN_TOKEN", "short")], vec![], "at least 16 characters"),
        (String::new(), vec![], vec!["--admin-token-file", empty_file.to_str().expect("utf-8")], "empty"),
        (String::new(), vec![], vec!["--admin-token", ""], "empty"),
    ] {
        let stderr = run(&config, &env, &args);
        assert!(stderr.contains(expected), "{config} {env:?} {args:?}: {stderr}");
    }
}

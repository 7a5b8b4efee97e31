//! TLS for every listener: rustls with the ring provider, a certificate
//! pair reloaded when its files change (a bad new pair is logged and the
//! old one kept), and, with a client CA, mutual TLS where every client
//! must present a certificate that CA signed. ALPN offers `h2` on the
//! gRPC port and `http/1.1` on the metrics port.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Why a certificate, key or CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

fn invalid(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid { path: path.display().to_string(), message: message.into() }
}

/// Every certificate in a PEM file, in order.
pub fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "holds no certificate (expected -----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// A certificate chain and its private key, checked to belong together.
fn certified_key(files: &TlsConfig, cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(&files.cert, cert_pem)?;
    // The key parser's error never quotes the key.
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| invalid(&files.key, "not a PEM private key (PKCS#8, PKCS#1 or SEC1)"))?;
    let signer =
        provider().key_provider.load_private_key(key).map_err(|e| invalid(&files.key, format!("unusable key: {e}")))?;
    let pair = CertifiedKey::new(chain, signer);
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(pair),
        Err(e) => Err(invalid(&files.key, format!("does not match the certificate in {}: {e}", files.cert.display()))),
    }
}

/// Serves whichever pair was loaded last.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// The TLS settings of a running server.
pub struct Tls {
    files: TlsConfig,
    current: Arc<Current>,
    h2: Arc<ServerConfig>,
    h1: Arc<ServerConfig>,
}

impl Tls {
    /// Loads the pair (and the client CA); an error here stops the start.
    pub fn load(files: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let pair = certified_key(files, &read(&files.cert)?, &read(&files.key)?)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(pair))));
        let verifier = match &files.client_ca {
            None => WebPkiClientVerifier::no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(path, &read(path)?)? {
                    roots.add(cert).map_err(|e| invalid(path, format!("not a usable CA certificate: {e}")))?;
                }
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| invalid(path, format!("client CA: {e}")))?
            }
        };
        let config = |alpn: &[u8]| -> Result<Arc<ServerConfig>, TlsError> {
            let mut config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier.clone())
                .with_cert_resolver(current.clone());
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(config))
        };
        Ok(Arc::new(Self { files: files.clone(), h2: config(b"h2")?, h1: config(b"http/1.1")?, current }))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for a gRPC (`h2`) or HTTP/1.1 listener.
    pub fn acceptor(&self, http2: bool) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(if http2 { self.h2.clone() } else { self.h1.clone() })
    }

    /// Replaces the pair with `cert_pem` and `key_pem` if they are a valid
    /// pair; otherwise keeps serving the old one and says why.
    pub fn reload(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let pair = certified_key(&self.files, cert_pem, key_pem)?;
        *self.current.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(pair);
        Ok(())
    }

    /// Reloads the pair whenever its files change, for the server's life.
    pub fn watch(self: &Arc<Self>) {
        let tls = self.clone();
        let paths: Vec<PathBuf> = vec![self.files.cert.clone(), self.files.key.clone()];
        super::watch::spawn(paths, move |contents| {
            let result = match contents.as_slice() {
                [Ok(cert), Ok(key)] => tls.reload(cert, key),
                [Err(e), _] => Err(TlsError::Read { path: tls.files.cert.display().to_string(), source: clone_io(e) }),
                [_, Err(e)] => Err(TlsError::Read { path: tls.files.key.display().to_string(), source: clone_io(e) }),
                _ => return,
            };
            match result {
                Ok(()) => tracing::info!(cert = %tls.files.cert.display(), "TLS certificate reloaded"),
                Err(e) => tracing::warn!(error = %e, "TLS certificate not reloaded: still serving the previous pair"),
            }
        });
    }
}

fn clone_io(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

/// The common name of a verified client certificate, for the request.
pub fn client_name<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> Option<String> {
    let (_, session) = stream.get_ref();
    session.peer_certificates()?.first().and_then(|cert| super::subject::common_name(cert))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::certs::DevCa;

    #[test]
    fn a_mismatched_or_broken_pair_is_refused_and_the_old_one_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DevCa::new().expect("ca");
        let (one, two) =
            (ca.server(&["localhost".into()]).expect("one"), ca.server(&["localhost".into()]).expect("two"));
        let files = TlsConfig { cert: dir.path().join("c.pem"), key: dir.path().join("k.pem"), client_ca: None };
        std::fs::write(&files.cert, &one.cert).expect("write");
        std::fs::write(&files.key, &one.key).expect("write");
        let tls = Tls::load(&files).expect("loads");
        let serving = || tls.current.0.read().expect("lock").cert[0].clone();
        let first = serving();
        let err = tls.reload(one.cert.as_bytes(), two.key.as_bytes()).expect_err("mismatch");
        assert!(err.to_string().contains("does not match the certificate"), "{err}");
        let err = tls.reload(b"garbage", one.key.as_bytes()).expect_err("no certificate");
        assert!(err.to_string().contains("c.pem"), "{err}");
        let err = tls.reload(one.cert.as_bytes(), b"-----BEGIN PRIVATE KEY-----\nAAAA\n").expect_err("bad key");
        assert!(!err.to_string().contains("AAAA"), "{err}");
        assert_eq!(serving(), first, "the old pair is still served");
        tls.reload(two.cert.as_bytes(), two.key.as_bytes()).expect("a good pair");
        assert_ne!(serving(), first);
    }
}

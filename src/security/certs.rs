//! Throwaway certificates for trying TLS locally and for the tests: a CA,
//! server certificates for the given host names and client certificates
//! whose common name is the tenant (`kiln certs dev`). Not for production:
//! a real deployment takes its certificates from its own CA (cert-manager,
//! a service mesh).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, PEM-encoded.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// A certificate authority that signs server and client certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate, to trust.
    pub cert: String,
}

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Kiln development");
    name.push(DnType::CommonName, common_name);
    name
}

impl DevCa {
    pub fn new() -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = named("Kiln development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), cert })
    }

    fn sign(&self, mut params: CertificateParams, usage: ExtendedKeyUsagePurpose) -> Result<Pair, rcgen::Error> {
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// A server certificate for `hosts` (DNS names or IP addresses).
    pub fn server(&self, hosts: &[String]) -> Result<Pair, rcgen::Error> {
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name = named(hosts.first().map_or("kiln", String::as_str));
        self.sign(params, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose subject common name is `name`.
    pub fn client(&self, name: &str) -> Result<Pair, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = named(name);
        self.sign(params, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Writes `ca.pem`, `server.pem`, `server.key`, `client.pem` and
/// `client.key` into `dir` (keys mode 0600); returns the file names.
pub fn write_dev_set(dir: &Path, hosts: &[String], client: &str) -> anyhow::Result<Vec<String>> {
    let ca = DevCa::new()?;
    let server = ca.server(hosts)?;
    let client = ca.client(client)?;
    std::fs::create_dir_all(dir)?;
    let files = [
        ("ca.pem", &ca.cert, false),
        ("server.pem", &server.cert, false),
        ("server.key", &server.key, true),
        ("client.pem", &client.cert, false),
        ("client.key", &client.key, true),
    ];
    for (name, text, private) in files {
        crate::security::write_file(&dir.join(name), text.as_bytes(), private)?;
    }
    Ok(files.iter().map(|(n, _, _)| n.to_string()).collect())
}

//! Security: TLS on every listener (`tls`), who is calling and what it
//! may do (`auth`, `keys`), secrets that are never printed (`secret`),
//! files reloaded when they change (`watch`), and throwaway certificates
//! for local use and tests (`certs`). The threat model is in the README.

pub mod auth;
pub mod certs;
pub mod keys;
pub mod secret;
mod subject;
pub mod tls;
pub mod watch;

pub use auth::{Admin, Auth, Caller, ClientCertificate, DEFAULT_TENANT};
pub use secret::Secret;
pub use tls::{Tls, TlsError};

/// Writes `bytes` to `path`; a private file is created mode 0600 (and
/// tightened if it existed), so no other local user can read it.
pub fn write_file(path: &std::path::Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        restrict(&mut options);
    }
    let mut file = options.open(path)?;
    if private {
        tighten(&file)?;
    }
    file.write_all(bytes)
}

/// Creates files mode 0600.
pub fn restrict(options: &mut std::fs::OpenOptions) {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(options, 0o600);
}

/// Sets an open file's mode to 0600 (a file created earlier keeps its
/// mode when opened again).
pub fn tighten(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(())
}

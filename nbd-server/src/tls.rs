//! TLS for NBD (`NBD_OPT_STARTTLS`) with rustls. After the server
//! acknowledges STARTTLS it runs the handshake on the raw socket, then a
//! pump thread moves bytes between the TLS session and one end of a socket
//! pair; the protocol code reads and writes the other end exactly as it would
//! a plain connection (reader thread, workers replying under a write lock).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use nbd_proto::tls::RawConn;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// TLS settings of a server.
#[derive(Clone)]
pub struct TlsSettings {
    pub config: Arc<ServerConfig>,
    /// Refuse everything but STARTTLS before TLS (FORCEDTLS). When false,
    /// plaintext clients are served too (SELECTIVETLS with every export open).
    pub required: bool,
    /// With `required`: loopback and unix-socket peers may still stay
    /// plain (a per-connection decision from the peer's address), for
    /// local tools on the appliance itself.
    pub plain_local: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("required", &self.required)
            .field("plain_local", &self.plain_local)
            .finish()
    }
}

/// Loads a PEM certificate chain and key; with `client_ca`, clients must
/// present a certificate signed by it.
pub fn load(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let ferr = |p: &Path, e: &dyn std::fmt::Display| TlsError::File {
        path: p.display().to_string(),
        msg: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ferr(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| ferr(cert, &e))?;
    if certs.is_empty() {
        return Err(ferr(cert, &"no certificate in file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ferr(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| ferr(ca, &e))? {
                roots.add(c.map_err(|e| ferr(ca, &e))?)?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ferr(ca, &e))?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

/// Whether a peer (as the listener names it: `unix` or `IP:PORT`) is on
/// this machine's loopback: a unix socket, 127.0.0.0/8, ::1 or an
/// IPv4-mapped loopback address.
pub fn peer_is_local(peer: &str) -> bool {
    if peer == "unix" {
        return true;
    }
    match peer.parse::<std::net::SocketAddr>() {
        Ok(a) => match a.ip() {
            std::net::IpAddr::V4(ip) => ip.is_loopback(),
            std::net::IpAddr::V6(ip) => {
                ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        },
        Err(_) => false,
    }
}

/// Runs the TLS handshake on `raw` and returns the plaintext side.
pub fn start(mut raw: Box<dyn RawConn>, cfg: Arc<ServerConfig>) -> io::Result<UnixStream> {
    let mut conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
    // The pump bounds what is buffered (it takes more plaintext only once
    // the last was sent), so rustls's own 64 KiB cap would only make
    // large replies fail.
    conn.set_buffer_limit(None);
    while conn.is_handshaking() {
        conn.complete_io(&mut raw)?;
    }
    nbd_proto::tls::spawn_pump(rustls::Connection::Server(conn), raw)
}

/// Command-line TLS options shared by `cdm-nbd` and `snapshotd`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain; enables STARTTLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Also serve plaintext clients (default with TLS: refuse them).
    #[arg(long, requires = "tls_cert")]
    pub tls_optional: bool,
}

impl TlsArgs {
    pub fn settings(&self) -> Result<Option<TlsSettings>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some(TlsSettings {
                config: load(c, k, self.tls_client_ca.as_deref())?,
                required: !self.tls_optional,
                plain_local: false,
            })),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod peer_tests {
    use super::peer_is_local;

    #[test]
    fn loopback_and_unix_peers_are_local_others_not() {
        for p in [
            "unix",
            "127.0.0.1:5000",
            "127.9.9.9:1",
            "[::1]:7",
            "[::ffff:127.0.0.1]:9",
        ] {
            assert!(peer_is_local(p), "{p}");
        }
        for p in [
            "10.231.0.1:5000",
            "[2001:db8::1]:7",
            "[::ffff:10.0.0.1]:9",
            "0.0.0.0:1",
            "junk",
        ] {
            assert!(!peer_is_local(p), "{p}");
        }
    }
}

//! TLS for NBD (`NBD_OPT_STARTTLS`) with rustls, both ends. After STARTTLS
//! is acknowledged the handshake runs on the raw socket, then a pump thread
//! moves bytes between the TLS session and one end of a socket pair; the
//! protocol code reads and writes the other end exactly as it would a plain
//! connection (the pipelined client's reader thread, the server's workers).
//! The server side (nbd-server) uses [`pump`] and [`RawConn`] from here.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

/// A raw connection TLS can run over.
pub trait RawConn: Read + Write + AsRawFd + Send {
    fn set_nonblocking(&self, nb: bool) -> io::Result<()>;
}

impl RawConn for TcpStream {
    fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        TcpStream::set_nonblocking(self, nb)
    }
}

impl RawConn for UnixStream {
    fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        UnixStream::set_nonblocking(self, nb)
    }
}

/// Why a client's TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("CA file {path}: {msg}")]
    CaFile { path: String, msg: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A client's TLS settings: trust only the CA it was given (no system
/// roots: the appliance's certificate comes from its own CA, pinned).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// Where the CA came from, for error messages.
    source: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.source)
            .finish()
    }
}

impl ClientTls {
    /// Trusts only the certificates in the PEM file `path`.
    pub fn from_ca_file(path: &Path) -> Result<ClientTls, TlsError> {
        let bad = |msg: String| TlsError::CaFile {
            path: path.display().to_string(),
            msg,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let roots = roots_from_pem(&pem).map_err(bad)?;
        Ok(ClientTls {
            config: client_config(roots)?,
            source: path.display().to_string(),
        })
    }

    /// Trusts only the certificates in `pem`.
    pub fn from_ca_pem(pem: &[u8]) -> Result<ClientTls, TlsError> {
        let roots = roots_from_pem(pem).map_err(|msg| TlsError::CaFile {
            path: "(PEM)".into(),
            msg,
        })?;
        Ok(ClientTls {
            config: client_config(roots)?,
            source: "(PEM)".into(),
        })
    }

    /// The rustls configuration (for other clients of the same server,
    /// such as the HTTPS API client).
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// The CA's file, as given.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// A root store of every certificate in `pem` (at least one).
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|e| format!("not a PEM certificate: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(roots)
}

fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// The name a certificate must carry for `endpoint` (`HOST:PORT`,
/// `[V6]:PORT`): a DNS name or an IP address.
pub fn server_name(endpoint: &str) -> io::Result<ServerName<'static>> {
    let host = match endpoint.rsplit_once(':') {
        Some((h, _)) => h,
        None => endpoint,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a name TLS can verify: {e}"),
        )
    })
}

/// Runs the client's TLS handshake on `raw` (after STARTTLS was
/// acknowledged), verifying the server's certificate for `endpoint`'s host
/// against the pinned CA; returns the plaintext side.
pub fn start_client(raw: TcpStream, endpoint: &str, tls: &ClientTls) -> io::Result<UnixStream> {
    let name = server_name(endpoint)?;
    let mut conn = ClientConnection::new(tls.config.clone(), name).map_err(io::Error::other)?;
    conn.set_buffer_limit(None);
    let mut raw = raw;
    while conn.is_handshaking() {
        conn.complete_io(&mut raw)
            .map_err(|e| explain(e, endpoint, &tls.source))?;
    }
    spawn_pump(Connection::Client(conn), Box::new(raw))
}

/// A failed certificate check, said so that the fix is plain.
fn explain(e: io::Error, endpoint: &str, ca: &str) -> io::Error {
    let text = e.to_string();
    let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        format!(
            ": the server's certificate is not signed by the CA in {ca} (wrong CA file, or \
             another appliance)"
        )
    } else if text.contains("NotValidForName") {
        format!(
            ": the server's certificate does not name {endpoint}'s host (snapshotd \
             --tls-san adds names)"
        )
    } else {
        String::new()
    };
    io::Error::new(
        e.kind(),
        format!("TLS handshake with {endpoint} failed: {text}{hint}"),
    )
}

/// Starts the pump thread for an established session and returns the
/// plaintext end of its socket pair.
pub fn spawn_pump(conn: Connection, raw: Box<dyn RawConn>) -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    raw.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || {
            // A broken session shows up to the protocol code as a closed
            // socket, which it reports; nothing more to say here.
            let _ = pump(conn, raw, theirs);
        })?;
    Ok(ours)
}

fn poll2(a: RawFd, ea: i16, b: RawFd, eb: i16) -> io::Result<(i16, i16)> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: ea,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: eb,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc >= 0 {
            return Ok((fds[0].revents, fds[1].revents));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Moves every decrypted byte rustls holds into `out`; true at close_notify.
fn drain_plaintext(conn: &mut Connection, buf: &mut [u8], out: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Moves bytes between the TLS session `conn` on `raw` (non-blocking) and
/// the plaintext socket `plain` (non-blocking) until both sides are done.
pub fn pump(
    mut conn: Connection,
    mut raw: Box<dyn RawConn>,
    mut plain: UnixStream,
) -> io::Result<()> {
    const MAX_PENDING: usize = 8 << 20;
    let mut to_plain: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let (mut raw_eof, mut plain_eof) = (false, false);
    // The handshake may already have read the client's first records (a
    // TLS 1.3 client can send right after its Finished): deliver them before
    // waiting on the socket, or both sides would wait forever.
    conn.process_new_packets().map_err(io::Error::other)?;
    raw_eof |= drain_plaintext(&mut conn, &mut buf, &mut to_plain)?;
    loop {
        while conn.wants_write() {
            match conn.write_tls(&mut raw) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        while !to_plain.is_empty() {
            match plain.write(&to_plain) {
                Ok(n) => {
                    to_plain.drain(..n);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if raw_eof && to_plain.is_empty() {
            let _ = plain.shutdown(std::net::Shutdown::Write);
            if plain_eof {
                return Ok(());
            }
        }
        if plain_eof && !conn.wants_write() {
            return Ok(());
        }
        let mut ev_raw = 0;
        if !raw_eof && to_plain.len() < MAX_PENDING {
            ev_raw |= libc::POLLIN;
        }
        if conn.wants_write() {
            ev_raw |= libc::POLLOUT;
        }
        let mut ev_plain = 0;
        // Backpressure: take more plaintext only once the last was sent.
        if !plain_eof && !conn.wants_write() {
            ev_plain |= libc::POLLIN;
        }
        if !to_plain.is_empty() {
            ev_plain |= libc::POLLOUT;
        }
        let (r_raw, r_plain) = poll2(raw.as_raw_fd(), ev_raw, plain.as_raw_fd(), ev_plain)?;
        if r_raw & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !raw_eof {
            match conn.read_tls(&mut raw) {
                Ok(0) => raw_eof = true,
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        let _ = conn.write_tls(&mut raw);
                        return Err(io::Error::other(e));
                    }
                    raw_eof |= drain_plaintext(&mut conn, &mut buf, &mut to_plain)?;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => raw_eof = true,
            }
        }
        if r_plain & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !plain_eof {
            match plain.read(&mut buf) {
                Ok(0) => {
                    plain_eof = true;
                    conn.send_close_notify();
                }
                Ok(n) => conn.writer().write_all(&buf[..n])?,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_endpoint_host() {
        let dns = |e: &str| match server_name(e).unwrap() {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            other => panic!("{e}: {other:?}"),
        };
        let ip = |e: &str| match server_name(e).unwrap() {
            ServerName::IpAddress(a) => std::net::IpAddr::from(a),
            other => panic!("{e}: {other:?}"),
        };
        assert_eq!(dns("appliance.example:10809"), "appliance.example");
        assert_eq!(
            ip("10.0.0.5:10809"),
            "10.0.0.5".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(
            ip("[::1]:10809"),
            "::1".parse::<std::net::IpAddr>().unwrap()
        );
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let d = std::env::temp_dir().join(format!("nbd-proto-ca-{}", std::process::id()));
        std::fs::write(&d, "not a certificate\n").unwrap();
        let e = ClientTls::from_ca_file(&d).unwrap_err().to_string();
        std::fs::remove_file(&d).unwrap();
        assert!(e.contains("no certificate"), "{e}");
        let e = ClientTls::from_ca_file(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}

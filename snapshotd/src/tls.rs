//! The appliance's TLS: its own CA and server certificate (made on first
//! start under `DATA/tls`, reused afterwards), or a certificate the admin
//! gives; the HTTPS listener of the API; the NBD STARTTLS settings. One
//! certificate serves both, so an agent pins one CA for everything.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sha2::Digest;

/// The CA lives ten years: agents pin it at enrolment.
const CA_DAYS: i64 = 3650;
/// The server certificate lives a year and is made again from the same CA
/// when it has less than [`RENEW_DAYS`] left (or lacks a wanted name).
const SERVER_DAYS: i64 = 365;
const RENEW_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Gen(#[from] rcgen::Error),
    #[error("{path}: {msg}")]
    Bad { path: String, msg: String },
    #[error(transparent)]
    Load(#[from] nbd_server::tls::TlsError),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// TLS options of snapshotd (HTTPS API and NBD STARTTLS).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// HTTPS API listener, HOST:PORT (port 0: see --ready-file). Serves the
    /// same routes as --api, with the certificate below.
    #[arg(long, value_name = "ADDR")]
    pub api_tls: Option<String>,
    /// PEM certificate chain for HTTPS and NBD STARTTLS instead of the
    /// appliance's own (DATA/tls/server.crt, made on first start).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --tls-cert: the CA certificate (PEM) that `GET /v1/ca` hands to
    /// clients [default: the last certificate of the --tls-cert chain].
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Another DNS name or IP address for the appliance's own server
    /// certificate (besides localhost, the host name and every address of
    /// the machine); repeatable.
    #[arg(long, value_name = "NAME")]
    pub tls_san: Vec<String>,
    /// NBD: require client certificates signed by this CA (PEM).
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plain HTTP (--api) and plaintext NBD to non-loopback peers
    /// too; by default they must use HTTPS and STARTTLS.
    #[arg(long, alias = "tls-optional")]
    pub plain_remote: bool,
}

/// The certificate the appliance serves and the CA it hands out.
#[derive(Debug, Clone)]
pub struct Material {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA certificate (PEM) for `GET /v1/ca`.
    pub ca_pem: String,
    /// Where that CA is on disk (for scripts/run to print).
    pub ca_path: PathBuf,
}

/// What was recorded about the server certificate last made.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct ServerInfo {
    sans: Vec<String>,
    /// Unix seconds.
    not_after: i64,
}

/// The certificate to serve: the given one, or the appliance's own under
/// `dir` (made or renewed as needed) with `extra_sans` besides the
/// machine's names.
pub fn material(args: &TlsArgs, dir: &Path) -> Result<Material, TlsError> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let ca_path = args.tls_ca.clone().unwrap_or_else(|| cert.clone());
        let text = std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
        let ca_pem = if args.tls_ca.is_some() {
            text
        } else {
            last_pem_block(&text).ok_or_else(|| TlsError::Bad {
                path: ca_path.display().to_string(),
                msg: "no certificate in file".into(),
            })?
        };
        return Ok(Material {
            cert: cert.clone(),
            key: key.clone(),
            ca_pem,
            ca_path,
        });
    }
    let mut sans = machine_names();
    for s in &args.tls_san {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    ensure_own(dir, &sans)
}

fn last_pem_block(text: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.rfind(BEGIN)?;
    let end = text[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &text[start..end]))
}

/// `localhost`, the loopback addresses, the host name (if it is a valid DNS
/// name) and every address of the machine's interfaces.
pub fn machine_names() -> Vec<String> {
    let mut v: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if is_dns_name(h) && !v.iter().any(|x| x == h) {
            v.push(h.to_string());
        }
    }
    for ip in interface_addrs() {
        let s = ip.to_string();
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 254
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() < 64
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Addresses of every interface (getifaddrs); none if it fails.
fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if fam == libc::AF_INET {
                // SAFETY: the family says it is a sockaddr_in.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
            } else if fam == libc::AF_INET6 {
                // SAFETY: the family says it is a sockaddr_in6.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                // Link-local addresses need a scope no URL carries.
                if ip.segments()[0] & 0xffc0 != 0xfe80 {
                    out.push(IpAddr::V6(ip));
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The appliance's own CA and server certificate under `dir`: the CA is
/// made once and kept (agents pin it); the server certificate is made
/// again when it lacks one of `sans` or nears its end.
pub fn ensure_own(dir: &Path, sans: &[String]) -> Result<Material, TlsError> {
    let ca_crt = dir.join("ca.crt");
    let (srv_crt, srv_key) = (dir.join("server.crt"), dir.join("server.key"));
    let info_path = dir.join("server.json");
    let ca_kp = ensure_ca(dir)?;
    let info: ServerInfo = std::fs::read(&info_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let now = time::OffsetDateTime::now_utc();
    let fresh = info.not_after > (now + time::Duration::days(RENEW_DAYS)).unix_timestamp();
    let covered = sans.iter().all(|s| info.sans.contains(s));
    if !(fresh && covered && srv_crt.exists() && srv_key.exists()) {
        // Keep the names it had: an address gone today may be back tomorrow.
        let mut all = info.sans.clone();
        for s in sans {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        let not_after = issue_server(&ca_kp, &all, &srv_crt, &srv_key)?;
        let rec = ServerInfo {
            sans: all,
            not_after,
        };
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| TlsError::Bad {
            path: info_path.display().to_string(),
            msg: e.to_string(),
        })?;
        write_atomic(&info_path, &json, 0o644)?;
        tracing::info!(names = ?rec.sans, "made the appliance's server certificate");
    } else {
        tighten(&srv_key)?;
    }
    let ca_pem = std::fs::read_to_string(&ca_crt).map_err(io_err(&ca_crt))?;
    Ok(Material {
        cert: srv_crt,
        key: srv_key,
        ca_pem,
        ca_path: ca_crt,
    })
}

/// The appliance's CA key under `dir`, made (with its certificate) on
/// first use. A new CA invalidates every certificate it did not sign: the
/// records of the server and client certificates made before go with it.
fn ensure_ca(dir: &Path) -> Result<KeyPair, TlsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if ca_key.exists() && ca_crt.exists() {
        tighten(&ca_key)?;
        let pem = std::fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
        return Ok(KeyPair::from_pem(&pem)?);
    }
    let kp = KeyPair::generate()?;
    let ca = ca_params(&kp)?.self_signed(&kp)?;
    // The key first: a CA certificate without its key is useless.
    write_atomic(&ca_key, kp.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&ca_crt, ca.pem().as_bytes(), 0o644)?;
    // Whatever server or client certificate was here was signed by
    // another CA.
    let _ = std::fs::remove_file(dir.join("server.json"));
    let _ = std::fs::remove_file(dir.join("client.json"));
    tracing::info!(path = %ca_crt.display(), "made the appliance's CA");
    Ok(kp)
}

/// The appliance's client certificate, which it shows to the peers it
/// replicates to (`docs/replication.md`, "Identity and TLS").
#[derive(Debug, Clone)]
pub struct ClientMaterial {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Hex SHA-256 of the certificate (DER): what peers pin at pairing.
    pub sha256: String,
    /// The CA certificate (PEM) that signed it.
    pub ca_pem: String,
}

/// What was recorded about the client certificate last made.
#[derive(serde::Serialize, serde::Deserialize, Default, PartialEq)]
struct ClientInfo {
    name: String,
    identity: String,
}

/// The client certificate under `dir` (`client.crt`, `client.key`),
/// issued by the appliance's own CA for `name` (CN) and `identity` (SAN
/// URI `cdm:IDENTITY`), made on first start and reused. It lives as long
/// as the CA: peers pin its SHA-256, so a new one means pairing again,
/// which only a new name or identity (or CA) forces.
pub fn ensure_client(dir: &Path, name: &str, identity: &str) -> Result<ClientMaterial, TlsError> {
    let ca_kp = ensure_ca(dir)?;
    let (crt, key, info_path) = (
        dir.join("client.crt"),
        dir.join("client.key"),
        dir.join("client.json"),
    );
    let want = ClientInfo {
        name: name.to_string(),
        identity: identity.to_string(),
    };
    let had: Option<ClientInfo> = std::fs::read(&info_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if had.as_ref() != Some(&want) || !crt.exists() || !key.exists() {
        if had.is_some() {
            tracing::warn!(
                name,
                identity,
                "the appliance's name or identity changed: made a new client certificate;                  its peers must pair with it again"
            );
        }
        let ca = ca_params(&ca_kp)?.self_signed(&ca_kp)?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "cdm appliance");
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        let uri = format!("cdm:{identity}");
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.as_str().try_into()?)];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(CA_DAYS);
        let kp = KeyPair::generate()?;
        let cert = p.signed_by(&kp, &ca, &ca_kp)?;
        write_atomic(&key, kp.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&crt, cert.pem().as_bytes(), 0o644)?;
        let json = serde_json::to_vec_pretty(&want).map_err(|e| TlsError::Bad {
            path: info_path.display().to_string(),
            msg: e.to_string(),
        })?;
        write_atomic(&info_path, &json, 0o644)?;
        tracing::info!(name, identity, "made the appliance's client certificate");
    } else {
        tighten(&key)?;
    }
    let ca_path = dir.join("ca.crt");
    Ok(ClientMaterial {
        sha256: pem_sha256(&crt)?,
        cert: crt,
        key,
        ca_pem: std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?,
    })
}

/// Hex SHA-256 of the DER of the first certificate in a PEM file.
fn pem_sha256(path: &Path) -> Result<String, TlsError> {
    let text = std::fs::read(path).map_err(io_err(path))?;
    let der = first_der(&text).ok_or_else(|| TlsError::Bad {
        path: path.display().to_string(),
        msg: "no certificate in file".into(),
    })?;
    Ok(hex::encode(sha2::Sha256::digest(&der)))
}

/// The DER of the first certificate in PEM text.
pub fn first_der(pem: &[u8]) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

/// Hex SHA-256 of the DER of the first certificate in PEM text.
pub fn ca_sha256(pem: &str) -> Option<String> {
    first_der(pem.as_bytes()).map(|d| hex::encode(sha2::Sha256::digest(&d)))
}

/// The rustls configuration of the replication listener: the appliance's
/// server certificate, and client certificates checked by `verifier`.
pub fn replication_config(
    m: &Material,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |p: &Path, msg: String| TlsError::Bad {
        path: p.display().to_string(),
        msg,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&m.cert)
        .map_err(|e| bad(&m.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&m.cert, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&m.key).map_err(|e| bad(&m.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumed sessions: a resumption skips the client certificate's
    // verification, and a peer unpaired since must meet today's roots.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A rustls client configuration for replication: trusts only `ca_pem`
/// (the peer's CA pinned at pairing) and shows the appliance's client
/// certificate.
pub fn replication_client(
    ca_pem: &str,
    client: &ClientMaterial,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |p: &Path, msg: String| TlsError::Bad {
        path: p.display().to_string(),
        msg,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| bad(Path::new("peer CA"), e.to_string()))?;
        roots.add(c)?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&client.cert)
        .map_err(|e| bad(&client.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&client.cert, e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_file(&client.key).map_err(|e| bad(&client.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// The CA's parameters, derived from its key alone: the same key gives the
/// same subject, so a server certificate made years later chains to the CA
/// certificate agents pinned.
fn ca_params(kp: &KeyPair) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let id = hex::encode(&sha2::Sha256::digest(kp.public_key_raw())[..8]);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cdm appliance");
    dn.push(DnType::CommonName, format!("cdm appliance CA {id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(CA_DAYS);
    Ok(p)
}

/// Signs a new server certificate for `sans`; returns its end (unix s).
fn issue_server(ca_kp: &KeyPair, sans: &[String], crt: &Path, key: &Path) -> Result<i64, TlsError> {
    let ca = ca_params(ca_kp)?.self_signed(ca_kp)?;
    let mut p = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cdm appliance");
    dn.push(
        DnType::CommonName,
        sans.iter()
            .find(|s| s.parse::<IpAddr>().is_err() && *s != "localhost")
            .map_or("cdm appliance", String::as_str),
    );
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(SERVER_DAYS);
    let not_after = p.not_after.unix_timestamp();
    let kp = KeyPair::generate()?;
    let cert = p.signed_by(&kp, &ca, ca_kp)?;
    write_atomic(key, kp.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(crt, cert.pem().as_bytes(), 0o644)?;
    Ok(not_after)
}

/// [`cdm_common::fs::write_atomic`] with this module's error.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    cdm_common::fs::write_atomic(path, data, mode).map_err(|e| io_err(&e.path)(e.source))
}

/// A key file others may read is made 0600 (with a warning).
fn tighten(path: &Path) -> Result<(), TlsError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
        tracing::warn!(path = %path.display(), old = format!("{mode:o}"), "tightened a TLS key to 0600");
    }
    Ok(())
}

/// The rustls configuration of the HTTPS listener (HTTP/1.1).
pub fn https_config(m: &Material) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let base = nbd_server::tls::load(&m.cert, &m.key, None)?;
    let mut cfg = (*base).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// NBD STARTTLS settings: TLS required from non-loopback TCP peers unless
/// `plain_remote`; loopback and unix-socket clients may stay plain.
pub fn nbd_settings(
    m: &Material,
    args: &TlsArgs,
) -> Result<nbd_server::tls::TlsSettings, TlsError> {
    Ok(nbd_server::tls::TlsSettings {
        config: nbd_server::tls::load(&m.cert, &m.key, args.tls_client_ca.as_deref())?,
        required: !args.plain_remote,
        plain_local: true,
    })
}

/// A listener of TLS connections for `axum::serve`: a task accepts TCP
/// connections and runs each handshake on its own task (a slow or silent
/// client holds up nobody), handing over the ones that finish.
pub struct HttpsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

/// A handshake not done in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

impl HttpsListener {
    /// Must be called inside the runtime that serves it.
    pub fn new(
        l: tokio::net::TcpListener,
        cfg: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<HttpsListener> {
        let local = l.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        tokio::spawn(async move {
            loop {
                let (sock, peer) = match l.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: wait a little
                        // rather than spin.
                        tracing::warn!(error = %e, "HTTPS accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let (acc, out) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let _ = out.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(HttpsListener { rx, local })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};

    /// A full TLS handshake in memory: a client trusting only `ca_pem`
    /// connects to the certificate in `m` under `name`.
    fn handshake(ca_pem: &str, m: &Material, name: &str) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ccfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let sn = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let mut c = rustls::ClientConnection::new(Arc::new(ccfg), sn).map_err(|e| e.to_string())?;
        let scfg = https_config(m).map_err(|e| e.to_string())?;
        let mut s = rustls::ServerConnection::new(scfg).map_err(|e| e.to_string())?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).map_err(|e| e.to_string())?;
            s.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            s.process_new_packets().map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).map_err(|e| e.to_string())?;
            c.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            c.process_new_packets().map_err(|e| e.to_string())?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err("handshake did not finish".into())
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn own_certificate_has_the_names_asked_for_and_no_others() {
        let d = tempfile::tempdir().unwrap();
        let sans = vec![
            "localhost".to_string(),
            "127.0.0.1".into(),
            "cdm.example".into(),
            "10.231.0.9".into(),
        ];
        let m = ensure_own(&d.path().join("tls"), &sans).unwrap();
        for name in ["localhost", "127.0.0.1", "cdm.example", "10.231.0.9"] {
            handshake(&m.ca_pem, &m, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["other.example", "10.231.0.10"] {
            let e = handshake(&m.ca_pem, &m, name).unwrap_err();
            assert!(
                e.contains("NotValidForName") || e.contains("not valid"),
                "{name}: {e}"
            );
        }
        // Another appliance's CA does not vouch for it.
        let other = ensure_own(&d.path().join("other"), &sans).unwrap();
        let e = handshake(&other.ca_pem, &m, "localhost").unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
    }

    #[test]
    fn keys_are_private_and_everything_is_reused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tls");
        let sans = vec!["localhost".to_string(), "127.0.0.1".into()];
        let m = ensure_own(&dir, &sans).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&dir.join("server.key")), 0o600);
        assert_eq!(mode(&dir.join("ca.crt")), 0o644);
        let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
        let (ca, crt, key) = (read("ca.crt"), read("server.crt"), read("server.key"));
        // A second start reuses all of it (and tightens a loosened key).
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let again = ensure_own(&dir, &sans).unwrap();
        assert_eq!(
            (read("ca.crt"), read("server.crt"), read("server.key")),
            (ca.clone(), crt.clone(), key)
        );
        assert_eq!(mode(&dir.join("server.key")), 0o600);
        assert_eq!(again.ca_pem, m.ca_pem);
        // A new name makes a new server certificate from the same CA, which
        // the CA pinned before still verifies.
        let more = vec![
            "localhost".to_string(),
            "127.0.0.1".into(),
            "new.example".into(),
        ];
        let m3 = ensure_own(&dir, &more).unwrap();
        assert_eq!(read("ca.crt"), ca);
        assert_ne!(read("server.crt"), crt);
        handshake(&m.ca_pem, &m3, "new.example").unwrap();
        handshake(&m.ca_pem, &m3, "127.0.0.1").unwrap();
        // No temporary file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ca.crt",
                "ca.key",
                "server.crt",
                "server.json",
                "server.key"
            ]
        );
    }

    #[test]
    fn machine_names_include_loopback_and_valid_host_names_only() {
        let n = machine_names();
        assert!(n.iter().any(|s| s == "localhost"));
        assert!(n.iter().any(|s| s == "127.0.0.1"));
        assert!(is_dns_name("cdm-1.example"));
        assert!(!is_dns_name("bad_name"));
        assert!(!is_dns_name("-x"));
    }

    #[test]
    fn given_certificate_hands_out_its_last_chain_certificate() {
        let d = tempfile::tempdir().unwrap();
        let m = ensure_own(&d.path().join("tls"), &["localhost".to_string()]).unwrap();
        let chain = d.path().join("chain.pem");
        let text = format!("{}{}", std::fs::read_to_string(&m.cert).unwrap(), m.ca_pem);
        std::fs::write(&chain, text).unwrap();
        let args = TlsArgs {
            tls_cert: Some(chain.clone()),
            tls_key: Some(m.key.clone()),
            ..Default::default()
        };
        let given = material(&args, &d.path().join("unused")).unwrap();
        assert_eq!(given.ca_pem.trim(), m.ca_pem.trim());
        assert_eq!(given.cert, chain);
        assert!(!d.path().join("unused").exists());
    }
}

//! Paired appliances: their records, and the trust the replication
//! listener derives from them (the CAs its client-certificate verifier
//! accepts, and the pinned client certificate that names each peer). Both
//! change with the pairings, without a restart.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cdm_api::replication::Peer;
use redb::TableDefinition;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::http::PeerId;
use crate::state::{State, StateError};

/// Peers by name.
pub const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("repl_peers");

/// A paired appliance as stored.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PeerRec {
    pub name: String,
    pub identity: String,
    /// Its HTTPS API, on the side that made the pairing call.
    pub url: Option<String>,
    /// `HOST:PORT` of its replication listener.
    pub endpoint: Option<String>,
    pub paired_unix: u64,
    /// Its CA certificate(s), PEM: they verify its server certificate and
    /// its client certificate.
    pub ca_pem: String,
    /// Hex SHA-256 of its (first) CA certificate.
    pub ca_sha256: String,
    /// Hex SHA-256 of its client certificate (DER), pinned at pairing.
    pub client_cert_sha256: String,
}

impl PeerRec {
    pub fn public(&self) -> Peer {
        Peer {
            name: self.name.clone(),
            identity: self.identity.clone(),
            url: self.url.clone(),
            replication_endpoint: self.endpoint.clone(),
            paired_unix: self.paired_unix,
            ca_sha256: self.ca_sha256.clone(),
        }
    }
}

pub fn all(state: &State) -> Result<Vec<PeerRec>, StateError> {
    state.all(PEERS)
}

pub fn get(state: &State, name: &str) -> Result<Option<PeerRec>, StateError> {
    state.get(PEERS, name)
}

/// The trust of the replication listener, rebuilt from the peer records
/// whenever they change.
#[derive(Debug)]
pub struct Trust {
    provider: Arc<CryptoProvider>,
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// None while no peer is paired: every client is refused.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// Hex SHA-256 of a pinned client certificate → its peer.
    by_cert: HashMap<String, PeerId>,
}

impl Trust {
    pub fn new() -> Arc<Trust> {
        Arc::new(Trust {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            inner: RwLock::new(Inner::default()),
        })
    }

    /// Trusts exactly the CAs and client certificates of `peers`. A peer
    /// whose CA does not parse is left out (and logged), not the others.
    pub fn set(&self, peers: &[PeerRec]) {
        let mut roots = rustls::RootCertStore::empty();
        let mut by_cert = HashMap::new();
        for p in peers {
            let mut ok = true;
            for c in CertificateDer::pem_slice_iter(p.ca_pem.as_bytes()) {
                match c
                    .map_err(|e| e.to_string())
                    .and_then(|c| roots.add(c).map_err(|e| e.to_string()))
                {
                    Ok(()) => {}
                    Err(e) => {
                        ok = false;
                        tracing::error!(peer = %p.name, error = %e, "peer CA unusable: peer not trusted");
                    }
                }
            }
            if ok {
                by_cert.insert(
                    p.client_cert_sha256.clone(),
                    PeerId {
                        name: p.name.clone(),
                        identity: p.identity.clone(),
                        cert_sha256: p.client_cert_sha256.clone(),
                    },
                );
            }
        }
        let verifier = if roots.is_empty() {
            None
        } else {
            match WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the replication client verifier: every client is refused");
                    None
                }
            }
        };
        let mut g = cdm_common::lock::write(&self.inner);
        g.verifier = verifier;
        g.by_cert = by_cert;
    }

    /// Reloads from the state store.
    pub fn reload(&self, state: &State) -> Result<(), StateError> {
        self.set(&all(state)?);
        Ok(())
    }

    /// The peer whose pinned client certificate is `der`.
    pub fn peer_of(&self, der: &[u8]) -> Option<PeerId> {
        let fp = hex::encode(sha2::Sha256::digest(der));
        cdm_common::lock::read(&self.inner)
            .by_cert
            .get(&fp)
            .cloned()
    }

    fn current(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        cdm_common::lock::read(&self.inner).verifier.clone()
    }
}

/// The listener's client-certificate verifier: requires a certificate
/// chaining to a paired peer's CA, with the roots of the moment.
#[derive(Debug)]
pub struct PeerVerifier(pub Arc<Trust>);

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The roots change under us; a client shows the one certificate
        // it has anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.0.current() {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{ensure_client, ensure_own, replication_client, replication_config};
    use rustls_pki_types::ServerName;

    /// A TLS handshake in memory between `client` and `server`, and the
    /// client certificate the server saw.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<Option<Vec<u8>>, String> {
        let sn = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let mut c = rustls::ClientConnection::new(client, sn).map_err(|e| e.to_string())?;
        let mut s = rustls::ServerConnection::new(server).map_err(|e| e.to_string())?;
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
                return Ok(s
                    .peer_certificates()
                    .and_then(|v| v.first())
                    .map(|c| c.to_vec()));
            }
        }
        Err("handshake did not finish".into())
    }

    fn rec(name: &str, ca_pem: &str, cert_sha: &str) -> PeerRec {
        PeerRec {
            name: name.into(),
            identity: format!("id-{name}"),
            url: None,
            endpoint: None,
            paired_unix: 0,
            ca_pem: ca_pem.into(),
            ca_sha256: String::new(),
            client_cert_sha256: cert_sha.into(),
        }
    }

    #[test]
    fn only_paired_client_certificates_pass_and_trust_follows_the_pairings() {
        let d = tempfile::tempdir().unwrap();
        let sans = vec!["localhost".to_string()];
        let b = ensure_own(&d.path().join("b"), &sans).unwrap();
        let a_dir = d.path().join("a");
        ensure_own(&a_dir, &sans).unwrap();
        let a = ensure_client(&a_dir, "site-a", "aaaa").unwrap();
        let c_dir = d.path().join("c");
        ensure_own(&c_dir, &sans).unwrap();
        let c = ensure_client(&c_dir, "site-c", "cccc").unwrap();

        let trust = Trust::new();
        let server = replication_config(&b, Arc::new(PeerVerifier(trust.clone()))).unwrap();
        let from_a = replication_client(&b.ca_pem, &a).unwrap();
        let from_c = replication_client(&b.ca_pem, &c).unwrap();
        // Nobody paired: refused at the handshake.
        assert!(handshake(from_a.clone(), server.clone()).is_err());
        // A paired: A passes and is named by its pinned certificate; C not.
        trust.set(&[rec("site-a", &a.ca_pem, &a.sha256)]);
        let seen = handshake(from_a.clone(), server.clone()).unwrap().unwrap();
        assert_eq!(trust.peer_of(&seen).unwrap().name, "site-a");
        let e = handshake(from_c.clone(), server.clone()).unwrap_err();
        assert!(e.contains("UnknownIssuer") || e.contains("alert"), "{e}");
        // A certificate of a paired CA that is not the pinned one is named
        // by nobody (the listener answers 403 unpaired).
        trust.set(&[rec("site-a", &a.ca_pem, &"0".repeat(64))]);
        let seen = handshake(from_a.clone(), server.clone()).unwrap().unwrap();
        assert_eq!(trust.peer_of(&seen), None);
        // Unpaired: refused again, on the same server configuration.
        trust.set(&[]);
        assert!(handshake(from_a, server).is_err());
    }

    #[test]
    fn client_certificate_is_private_reused_and_remade_for_a_new_name() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tls");
        let m = ensure_client(&dir, "site-a", "aaaa").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&m.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ensure_client(&dir, "site-a", "aaaa").unwrap();
        assert_eq!(again.sha256, m.sha256);
        let renamed = ensure_client(&dir, "site-b", "aaaa").unwrap();
        assert_ne!(renamed.sha256, m.sha256);
        // Issued by the appliance's own CA, the one the server uses.
        let own = ensure_own(&dir, &["localhost".to_string()]).unwrap();
        assert_eq!(own.ca_pem, renamed.ca_pem);
        let text = std::fs::read_to_string(&renamed.cert).unwrap();
        assert!(text.contains("BEGIN CERTIFICATE"));
    }
}

//! Pairing (`docs/replication.md`, "Pairing"): one-use tokens on the side
//! that is paired with, and the pairing call from the other side, which
//! pins the peer's CA from the token before it sends anything.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::Engine;
use cdm_api::auth::Caller;
use cdm_api::control::rfc3339;
use cdm_api::replication::*;
use cdm_api::{ApiError, ApiResult};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::peers::{self, PeerRec, PEERS};
use super::service::Replication;
use crate::appliance::st;
use crate::state::Sync;

/// Pairing tokens by hex SHA-256 of the token.
pub const PAIRINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("repl_pairings");

/// Tokens live an hour unless asked otherwise, at most a week.
const TTL: u64 = 3600;
const TTL_MAX: u64 = 7 * 86_400;
const PREFIX: &str = "cdmpair1";
/// A pairing call's whole exchange (fetching the CA, then pairing).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize, Clone, Debug)]
struct TokenRec {
    created_by: String,
    created_unix: u64,
    expires_unix: u64,
}

fn token_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn invalid(m: &str) -> ApiError {
    ApiError::new(401, "invalid_token", m)
}

/// The CA hash a token names, if it has the token's form.
pub fn token_ca(token: &str) -> Option<&str> {
    let mut it = token.split('.');
    let (p, secret, ca) = (it.next()?, it.next()?, it.next()?);
    let ok = p == PREFIX
        && it.next().is_none()
        && !secret.is_empty()
        && ca.len() == 64
        && ca.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some(ca)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `HOST` of `https://HOST:PORT/...` (brackets kept on IPv6) and its port.
fn url_host(u: &str) -> ApiResult<String> {
    let parsed = url::Url::parse(u)
        .map_err(|e| ApiError::bad_request(format!("bad peer url {u:?}: {e}")))?;
    if parsed.scheme() != "https" {
        return Err(ApiError::bad_request(format!(
            "peer url {u:?} must be https:// (the peer's --api-tls)"
        )));
    }
    let host = match parsed.host() {
        Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        Some(h) => h.to_string(),
        None => return Err(ApiError::bad_request(format!("peer url {u:?} has no host"))),
    };
    Ok(host)
}

impl Replication {
    /// `POST /v1/replication/pairings`.
    pub fn create_pairing(&self, c: &Caller, req: PairingCreate) -> ApiResult<PairingToken> {
        let ttl = req.ttl_seconds.unwrap_or(TTL);
        if ttl == 0 || ttl > TTL_MAX {
            return Err(ApiError::bad_request(format!(
                "ttl_seconds must be 1 to {TTL_MAX}"
            )));
        }
        let ca = crate::tls::ca_sha256(&self.server_ca)
            .ok_or_else(|| ApiError::internal("the appliance's CA does not parse"))?;
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let token = format!("{PREFIX}.{secret}.{ca}");
        let now = self.clock.now();
        let rec = TokenRec {
            created_by: c.user.clone(),
            created_unix: now,
            expires_unix: now + ttl,
        };
        self.state
            .put(PAIRINGS, token_key(&token).as_str(), &rec, Sync::Now)
            .map_err(st)?;
        self.events.emit(
            "replication.pairing_created",
            "replication",
            &c.user,
            json!({"expires_unix": rec.expires_unix}),
        );
        Ok(PairingToken {
            token,
            expires_at: rfc3339(rec.expires_unix),
            expires_unix: rec.expires_unix,
        })
    }

    /// `POST /v1/replication/pair`: another appliance pairs with this one.
    pub fn pair(&self, req: PairRequest, client: Option<std::net::IpAddr>) -> ApiResult<PairReply> {
        let key = token_key(&req.token);
        let rec: TokenRec = self
            .state
            .get(PAIRINGS, key.as_str())
            .map_err(st)?
            .ok_or_else(|| invalid("unknown or already used pairing token"))?;
        if rec.expires_unix <= self.clock.now() {
            return Err(invalid("this pairing token has expired"));
        }
        if req.identity == self.identity {
            return Err(ApiError::bad_request(
                "an appliance cannot pair with itself (same identity)",
            ));
        }
        if !is_hex64(&req.client_cert_sha256) || req.identity.is_empty() {
            return Err(ApiError::bad_request(
                "client_cert_sha256 must be 64 hex digits and identity given",
            ));
        }
        let ca_sha256 = crate::tls::ca_sha256(&req.ca)
            .ok_or_else(|| ApiError::bad_request("ca holds no PEM certificate"))?;
        let cert = req.client_cert_sha256.to_ascii_lowercase();
        self.refuse_takeover(&req.name, &req.identity, &cert, &ca_sha256)?;
        // Spent here, in one write transaction: of two calls with the same
        // token only one removes it.
        if !self.state.remove(PAIRINGS, key.as_str()).map_err(st)? {
            return Err(invalid("unknown or already used pairing token"));
        }
        let endpoint = match (client, req.replication_port) {
            (Some(ip), Some(port)) => Some(std::net::SocketAddr::new(ip, port).to_string()),
            _ => None,
        };
        let peer = PeerRec {
            name: req.name.clone(),
            identity: req.identity.clone(),
            url: None,
            endpoint,
            paired_unix: self.clock.now(),
            ca_pem: req.ca.clone(),
            ca_sha256,
            client_cert_sha256: cert,
        };
        self.store_peer(&peer, "pair")?;
        Ok(PairReply {
            name: self.name.clone(),
            identity: self.identity.clone(),
            ca: self.ca_bundle(),
            client_cert_sha256: self.client.sha256.clone(),
            replication_port: self.port.get().copied(),
        })
    }

    /// 409 for a pairing that would take over what a paired peer holds:
    /// its identity or client certificate under another name, or, under
    /// its own name, another pin. Replicas are bound to the pinned
    /// certificate, so replacing a pin takes an explicit unpair first.
    fn refuse_takeover(&self, name: &str, identity: &str, cert: &str, ca: &str) -> ApiResult<()> {
        for p in peers::all(&self.state).map_err(st)? {
            let why = if p.name == name {
                if p.identity != identity {
                    "is paired under this name with another identity"
                } else if p.client_cert_sha256 != cert || p.ca_sha256 != ca {
                    "is paired under this name with another certificate"
                } else {
                    continue;
                }
            } else if p.identity == identity {
                "holds this identity"
            } else if p.client_cert_sha256 == cert {
                "holds this client certificate"
            } else {
                continue;
            };
            return Err(ApiError::conflict(format!(
                "peer {} {why}: unpair it first (DELETE /v1/replication/peers/{})",
                p.name, p.name
            )));
        }
        Ok(())
    }

    fn store_peer(&self, peer: &PeerRec, actor: &str) -> ApiResult<()> {
        self.state
            .put(PEERS, peer.name.as_str(), peer, Sync::Now)
            .map_err(st)?;
        self.reload_trust()?;
        self.events.emit(
            "replication.paired",
            &peer.name,
            actor,
            json!({"peer": peer.name, "identity": peer.identity, "endpoint": peer.endpoint}),
        );
        Ok(())
    }

    /// `POST /v1/replication/peers`: pairs with the appliance at `req.url`.
    pub fn create_peer(&self, c: &Caller, req: PeerCreate) -> ApiResult<Peer> {
        let want_ca = token_ca(&req.token)
            .ok_or_else(|| invalid("not a pairing token (cdmpair1.SECRET.CA_SHA256)"))?
            .to_ascii_lowercase();
        let host = url_host(&req.url)?;
        let base = req.url.trim_end_matches('/').to_string();
        if let Some(old) = peers::get(&self.state, &req.name).map_err(st)? {
            if old.ca_sha256 != want_ca {
                return Err(ApiError::conflict(format!(
                    "peer {} is paired with another appliance: unpair it first",
                    req.name
                )));
            }
        }
        let ca_pem = fetch_ca(&base)?;
        let got = crate::tls::ca_sha256(&ca_pem).unwrap_or_default();
        if got != want_ca {
            return Err(ApiError::new(
                409,
                "ca_mismatch",
                format!(
                    "the CA at {base} (SHA-256 {got}) is not the one the token names ({want_ca}): \
                     wrong URL, wrong token, or someone in between"
                ),
            ));
        }
        let reply = self.call_pair(&base, &ca_pem, &req.token)?;
        // The CA the peer hands over must contain the one we pinned.
        let bundle_ok = rustls_pki_types::pem::PemObject::pem_slice_iter(reply.ca.as_bytes())
            .filter_map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.ok())
            .any(|c| hex::encode(Sha256::digest(&c)) == want_ca);
        if !bundle_ok || !is_hex64(&reply.client_cert_sha256) {
            return Err(ApiError::new(
                502,
                "bad_peer",
                format!("{base} answered the pairing with a CA other than the token's"),
            ));
        }
        let cert = reply.client_cert_sha256.to_ascii_lowercase();
        self.refuse_takeover(&req.name, &reply.identity, &cert, &want_ca)?;
        let peer = PeerRec {
            name: req.name.clone(),
            identity: reply.identity.clone(),
            url: Some(base),
            endpoint: reply.replication_port.map(|p| format!("{host}:{p}")),
            paired_unix: self.clock.now(),
            ca_pem: reply.ca.clone(),
            ca_sha256: want_ca,
            client_cert_sha256: cert,
        };
        self.store_peer(&peer, &c.user)?;
        Ok(peer.public())
    }

    /// The pairing call itself, to a peer whose CA is pinned.
    fn call_pair(&self, base: &str, ca_pem: &str, token: &str) -> ApiResult<PairReply> {
        let cfg = crate::tls::replication_client(ca_pem, &self.client)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let agent = ureq::AgentBuilder::new()
            .timeout(CALL_TIMEOUT)
            .tls_config(cfg)
            .build();
        let body = PairRequest {
            token: token.to_string(),
            name: self.name.clone(),
            identity: self.identity.clone(),
            ca: self.ca_bundle(),
            client_cert_sha256: self.client.sha256.clone(),
            replication_port: self.port.get().copied(),
        };
        let url = format!("{base}{}", cdm_api::replication_routes::PAIR_PATH);
        match agent.post(&url).send_json(&body) {
            Ok(r) => r.into_json::<PairReply>().map_err(|e| {
                ApiError::new(502, "bad_peer", format!("{url} answered no pairing: {e}"))
            }),
            Err(ureq::Error::Status(status, r)) => {
                let v: serde_json::Value = r.into_json().unwrap_or_default();
                let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
                // The peer's own codes for what the admin can act on.
                let code = match v["error"]["code"].as_str() {
                    Some("invalid_token") => "invalid_token",
                    Some("conflict") => "conflict",
                    Some("bad_request") => "bad_request",
                    _ => "peer_refused",
                };
                Err(ApiError::new(
                    status,
                    code,
                    format!("the peer refused the pairing ({status}): {msg}"),
                ))
            }
            Err(ureq::Error::Transport(t)) => Err(unreachable(&url, &t)),
        }
    }

    /// `GET /v1/replication/peers`.
    pub fn peers(&self) -> ApiResult<Vec<Peer>> {
        let v = peers::all(&self.state).map_err(st)?;
        Ok(v.iter().map(PeerRec::public).collect())
    }

    /// `DELETE /v1/replication/peers/{name}`: refused while links use it;
    /// the listener stops trusting it at once.
    pub fn delete_peer(&self, c: &Caller, name: &str) -> ApiResult<()> {
        let used: Vec<u64> = self
            .link_recs()?
            .into_iter()
            .filter(|l| l.peer == name)
            .map(|l| l.id)
            .collect();
        if !used.is_empty() {
            return Err(ApiError::conflict(format!(
                "peer {name} is used by links {used:?}: delete them first"
            )));
        }
        if !self.state.remove(PEERS, name).map_err(st)? {
            return Err(ApiError::not_found(format!("peer {name} not found")));
        }
        self.reload_trust()?;
        self.events
            .emit("replication.unpaired", name, &c.user, json!({"peer": name}));
        Ok(())
    }
}

fn unreachable(url: &str, t: &ureq::Transport) -> ApiError {
    ApiError::new(502, "peer_unreachable", format!("cannot reach {url}: {t}"))
}

/// `GET base/v1/ca`, trusting any certificate for this one call: what it
/// answers is checked against the token's hash before anything is sent.
fn fetch_ca(base: &str) -> ApiResult<String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::internal(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let agent = ureq::AgentBuilder::new()
        .timeout(CALL_TIMEOUT)
        .tls_config(Arc::new(cfg))
        .build();
    let url = format!("{base}/v1/ca");
    match agent.get(&url).call() {
        Ok(r) => r
            .into_string()
            .map_err(|e| ApiError::new(502, "bad_peer", format!("{url}: {e}"))),
        Err(ureq::Error::Status(s, _)) => Err(ApiError::new(
            502,
            "bad_peer",
            format!("{url} answered {s}: is it a cdm appliance's HTTPS API?"),
        )),
        Err(ureq::Error::Transport(t)) => Err(unreachable(&url, &t)),
    }
}

/// Accepts any server certificate (signatures still checked): only for
/// fetching a CA whose hash is compared with a token's right after.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_form_is_checked() {
        let ca = "ab".repeat(32);
        assert_eq!(token_ca(&format!("cdmpair1.xyz.{ca}")), Some(ca.as_str()));
        assert_eq!(token_ca(&format!("cdmpair2.xyz.{ca}")), None);
        assert_eq!(token_ca(&format!("cdmpair1..{ca}")), None);
        assert_eq!(token_ca("cdmpair1.xyz.abcd"), None);
        assert_eq!(token_ca(&format!("cdmpair1.x.{ca}.more")), None);
        assert_eq!(token_ca(&format!("cdmpair1.x.{}", "zz".repeat(32))), None);
    }

    #[test]
    fn peer_urls_must_be_https_with_a_host() {
        assert_eq!(url_host("https://10.0.0.2:8443").unwrap(), "10.0.0.2");
        assert_eq!(url_host("https://[::1]:8443/").unwrap(), "[::1]");
        assert_eq!(url_host("https://b.example:1").unwrap(), "b.example");
        assert_eq!(url_host("http://10.0.0.2:8080").unwrap_err().status, 400);
        assert_eq!(url_host("nonsense").unwrap_err().status, 400);
    }

    /// Pairing may not take over another peer: its identity, its client
    /// certificate, or (re-pairing under its name) its pinned certificate.
    #[test]
    fn a_pairing_cannot_take_over_a_paired_peer() {
        let d = tempfile::tempdir().unwrap();
        let r = crate::replication::runs::tests::service(d.path());
        let admin = Caller {
            user: "admin".into(),
            role: cdm_api::auth::Role::Admin,
            grants: Vec::new(),
            token_id: String::new(),
            token_name: String::new(),
        };
        let ca_a = r.client.ca_pem.clone();
        let other_dir = tempfile::tempdir().unwrap();
        let ca_c = crate::tls::ensure_own(other_dir.path(), &["c".to_string()])
            .unwrap()
            .ca_pem;
        let pair = |name: &str, identity: &str, ca: &str, cert: &str| {
            let t = r.create_pairing(&admin, PairingCreate::default()).unwrap();
            r.pair(
                PairRequest {
                    token: t.token,
                    name: name.into(),
                    identity: identity.into(),
                    ca: ca.into(),
                    client_cert_sha256: cert.into(),
                    replication_port: None,
                },
                None,
            )
        };
        let (cert_a, cert_c) = ("1a".repeat(32), "2c".repeat(32));
        pair("site-a", "aaaa", &ca_a, &cert_a).unwrap();
        // The same peer again (same pin) may re-pair.
        pair("site-a", "aaaa", &ca_a, &cert_a).unwrap();
        let conflict = |e: ApiError| assert_eq!((e.status, e.code), (409, "conflict"), "{e:?}");
        // Another name claiming A's identity, or A's certificate.
        conflict(pair("site-c", "aaaa", &ca_c, &cert_c).unwrap_err());
        conflict(pair("site-c", "cccc", &ca_c, &cert_a).unwrap_err());
        // A's name with another certificate or CA: A's pin stays.
        conflict(pair("site-a", "aaaa", &ca_c, &cert_c).unwrap_err());
        conflict(pair("site-a", "aaaa", &ca_a, &cert_c).unwrap_err());
        let a = peers::get(&r.state, "site-a").unwrap().unwrap();
        assert_eq!(a.client_cert_sha256, cert_a);
        assert!(peers::get(&r.state, "site-c").unwrap().is_none());
        // Unpaired first, the name may be paired anew.
        r.delete_peer(&admin, "site-a").unwrap();
        pair("site-a", "aaaa", &ca_c, &cert_c).unwrap();
    }
}

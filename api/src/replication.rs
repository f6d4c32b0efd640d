//! Replication's resources (`docs/replication.md`): pairing tokens, peers,
//! links and their transfers, and the pairing call appliances make to each
//! other.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/replication/pairings`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct PairingCreate {
    /// Default 3600, at most 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A one-use pairing token: `cdmpair1.<secret>.<hex SHA-256 of the CA>`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct PairingToken {
    pub token: String,
    /// RFC 3339.
    pub expires_at: String,
    pub expires_unix: u64,
}

/// `POST /v1/replication/peers`: pair with the appliance at `url`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct PeerCreate {
    /// The name this appliance gives the peer.
    pub name: String,
    /// The peer's HTTPS API, `https://HOST:PORT`.
    pub url: String,
    /// A pairing token the peer made.
    pub token: String,
}

/// `POST /v1/replication/pair` (appliance to appliance; the token is the
/// credential) and its answer (the same fields of the answering side,
/// `token` empty).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct PairRequest {
    pub token: String,
    /// The caller's name.
    pub name: String,
    /// The caller's identity (its pool UUID in hex).
    pub identity: String,
    /// The caller's CA certificate(s), PEM.
    pub ca: String,
    /// Hex SHA-256 of the caller's client certificate (DER).
    pub client_cert_sha256: String,
    /// The caller's replication listener port, if it has one.
    pub replication_port: Option<u16>,
}

/// The answer to [`PairRequest`].
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct PairReply {
    pub name: String,
    pub identity: String,
    pub ca: String,
    pub client_cert_sha256: String,
    pub replication_port: Option<u16>,
}

/// A paired appliance.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub identity: String,
    /// Its HTTPS API (on the side that made the pairing call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `HOST:PORT` of its replication listener, null if it has none.
    pub replication_endpoint: Option<String>,
    pub paired_unix: u64,
    /// Hex SHA-256 of its CA certificate (DER).
    pub ca_sha256: String,
}

/// When a link runs: after every new point of its volume, or every
/// `interval_seconds`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum LinkSchedule {
    /// `"after_every_point"`.
    Named(String),
    Interval {
        interval_seconds: u64,
    },
}

impl Default for LinkSchedule {
    fn default() -> Self {
        LinkSchedule::Named(AFTER_EVERY_POINT.into())
    }
}

pub const AFTER_EVERY_POINT: &str = "after_every_point";

/// `POST /v1/replication/links`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct LinkCreate {
    /// The volume to replicate (or `policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Replicate the volume of every application with this protection policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<LinkSchedule>,
    /// Retention on the target (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_days: Option<u64>,
    /// Outside every window (absent: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mibps: Option<u64>,
    /// `HH:MM-HH:MM=MIBPS` (UTC), like protection policies.
    #[serde(default)]
    pub bandwidth_windows: Vec<String>,
    /// Default: twice the interval, or 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Send encrypted volumes as stored (ciphertext): the target keeps
    /// them sealed under this appliance's key and needs no key of its own
    /// (default false: the target re-encrypts with its own key). Refused
    /// for a volume that is not encrypted. A sealed volume (a raw replica
    /// cascaded on) is always sent raw, whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<bool>,
}

/// One transfer of one point.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq)]
pub struct Transfer {
    pub id: u64,
    pub volume: String,
    /// The source's snapshot id.
    pub snapshot: u64,
    /// The point id of the base, null for a full transfer.
    pub base: Option<String>,
    pub full: bool,
    pub started_unix: u64,
    pub seconds: f64,
    /// On the wire: fingerprints and compressed data.
    pub bytes_sent: u64,
    /// Changed bytes.
    pub bytes_logical: u64,
    pub blocks_total: u64,
    /// Blocks the target had already.
    pub blocks_known: u64,
    pub resumed_from_batch: Option<u64>,
    /// Sent as stored ciphertext (a raw link, or a sealed source volume).
    #[serde(default)]
    pub raw: bool,
    /// `ok`, `failed` or `cancelled`.
    pub result: String,
    pub message: String,
}

/// A replication link (on the source).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Link {
    pub id: u64,
    pub volume: Option<String>,
    pub policy: Option<String>,
    pub peer: String,
    pub schedule: LinkSchedule,
    pub keep_last: Option<u64>,
    pub keep_days: Option<u64>,
    pub bandwidth_mibps: Option<u64>,
    pub bandwidth_windows: Vec<String>,
    pub rpo_seconds: u64,
    pub enabled: bool,
    /// Encrypted volumes are sent as stored ciphertext (sealed volumes
    /// always are).
    #[serde(default)]
    pub raw: bool,
    /// `idle`, `running`, `failing` or `paused`.
    pub state: String,
    /// Now minus the creation time of the newest point on the target; null
    /// before the first transfer.
    pub lag_seconds: Option<u64>,
    pub last_transfer: Option<Transfer>,
    pub last_error: Option<String>,
}

/// `POST /v1/volumes/{name}/demote`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct VolumeDemote {
    /// The peer that will feed the volume.
    pub peer: String,
}

/// `POST /v1/volumes/{name}/key`: the key a sealed volume (a raw
/// replica) was encrypted with on its source, exactly one of the two. Kept
/// in memory only, never stored or logged.
#[derive(Serialize, Deserialize, ToSchema, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct VolumeKey {
    /// The source's key file (32 or 64 bytes) in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file_hex: Option<String>,
    /// The source's passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<String>,
}

/// Never prints the key.
impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeKey")
            .field("key_file_hex", &self.key_file_hex.as_ref().map(|_| ".."))
            .field("passphrase", &self.passphrase.as_ref().map(|_| ".."))
            .finish()
    }
}

/// What `/repl/whoami` on the replication listener answers: how this
/// appliance knows the caller (a check of a pairing from the other side).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct WhoAmI {
    /// This appliance's name and identity.
    pub name: String,
    pub identity: String,
    /// The caller as a peer.
    pub peer: String,
    pub peer_identity: String,
}

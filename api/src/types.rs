//! The JSON resources of the API, shared by the server, `cdmctl` and tests.
//! Times are Unix seconds (`*_unix`); sizes are bytes.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `POST /v1/volumes`: a new stage disk.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    /// 1–128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
    pub name: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Block (chunk) size: a power of two from 4096 to 1048576; default 65536.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Fingerprint deduplication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<bool>,
    /// zstd level: 0 = off, 1 (fastest) … 29 (smallest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<u8>,
    /// `none`, `aes-256-xts`, `aes-128-xts` or `sm4-xts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

/// `PATCH /v1/volumes/{name}`: grow a volume.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct VolumeUpdate {
    /// New size in bytes; volumes only grow.
    pub size: u64,
}

/// `POST /v1/volumes/{name}/revert`: the live volume back to a snapshot.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct VolumeRevert {
    /// A snapshot of this volume; what was written since is dropped.
    pub snapshot: u64,
}

/// Where a clone came from.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub volume: Option<String>,
    pub snapshot: u64,
}

/// A volume: a stage disk, or a writable clone of a snapshot.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Volume {
    pub name: String,
    pub id: u64,
    /// `stage` or `clone`.
    pub kind: String,
    pub size: u64,
    pub block_size: u32,
    pub created_unix: u64,
    /// The snapshot a clone was made from (until promoted).
    pub origin: Option<Origin>,
    /// Bytes of data the volume maps.
    pub allocated_bytes: u64,
    /// Bytes only this volume references (what deleting it frees).
    pub unique_bytes: u64,
    pub snapshots: usize,
    pub dedup: bool,
    pub compression: u8,
    pub encryption: String,
    /// Stored as ciphertext under another appliance's key (a raw replica,
    /// or a volume promoted from one).
    #[serde(default)]
    pub sealed: bool,
    /// Whether its data can be read here: false only for a sealed volume
    /// whose key is not loaded (`POST /v1/volumes/{name}/key`).
    #[serde(default = "yes")]
    pub key_loaded: bool,
    /// NBD export name (read-write).
    pub export: String,
    /// NBD clients connected now.
    pub clients: usize,
    /// How fragmented the volume is: given by `GET /v1/volumes/{name}`
    /// (one walk of its tree), absent from listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fragmentation: Option<Fragmentation>,
}

/// How scattered a volume's data is on the pool: a run is a maximal
/// sequence of extents contiguous both logically and physically (what one
/// sequential device read fetches). Freshly, sequentially written data is
/// one run; `defrag` jobs bring runs back down.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq)]
pub struct Fragmentation {
    /// Bytes of mapped blocks.
    pub mapped_bytes: u64,
    /// Extents (whole blocks and sub-block pieces).
    pub extents: u64,
    pub runs: u64,
    pub extents_per_mib: f64,
    /// About the device seeks a sequential read of 1 MiB costs.
    pub runs_per_mib: f64,
    /// Average run length in bytes.
    pub avg_run_bytes: u64,
}

/// `POST /v1/volumes/{name}/snapshots`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Any JSON object kept with the snapshot (backup job, LSN, host…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// A snapshot: a read-only point in time of a volume.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Snapshot {
    pub id: u64,
    pub volume: String,
    pub label: String,
    pub created_unix: u64,
    pub metadata: Value,
    pub size: u64,
    pub block_size: u32,
    pub allocated_bytes: u64,
    /// Bytes only this snapshot references (what deleting it frees).
    pub unique_bytes: u64,
    /// Stored as ciphertext under another appliance's key (a point of a
    /// raw replica).
    #[serde(default)]
    pub sealed: bool,
    /// Whether its data can be read here (false: a sealed point whose
    /// key is not loaded).
    #[serde(default = "yes")]
    pub key_loaded: bool,
    /// NBD export name (read-only): `VOLUME@ID`.
    pub export: String,
    /// Clones made from this snapshot that still name it as origin.
    pub clones: Vec<String>,
    /// Replication links whose next transfer starts from this point (docs/replication.md, "Holds"): retention keeps it, a delete needs `force`.
    #[serde(default)]
    pub held_by: Vec<u64>,
    /// Where its data is (issue 21, object tier): `local` (all in the
    /// pool), `tiered` (its uniquely owned data in the object store, read
    /// through the local cache) or `recalling` (being brought back).
    #[serde(default = "local")]
    pub location: String,
}

/// `POST /v1/volumes/{name}/snapshots/{id}/clones`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct CloneCreate {
    pub name: String,
}

/// A connected NBD client.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct ExportClient {
    pub id: u64,
    pub peer: String,
    pub since_unix: u64,
}

/// `POST /v1/mounts`: mount a snapshot's filesystem on the appliance.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct MountCreate {
    /// `VOLUME@ID`.
    pub snapshot: String,
    /// Instant recovery: make a writable clone and mount that (read-write);
    /// otherwise the snapshot itself is mounted read-only.
    #[serde(default)]
    pub writable: bool,
    /// Name of the clone (writable mounts); default `VOLUME-ID-rw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<String>,
    /// Partition number; absent: the first partition if the disk has a
    /// table, else the whole disk; 0: the whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

/// A filesystem mounted on the appliance from a snapshot or a clone.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Mount {
    pub name: String,
    /// `VOLUME@ID` it came from.
    pub snapshot: String,
    /// The clone mounted read-write (writable mounts).
    pub clone: Option<String>,
    pub writable: bool,
    pub partition: Option<u32>,
    /// Where it is mounted on the appliance.
    pub path: String,
    /// Loop device over the FUSE file.
    pub device: String,
    /// `ext4`, `xfs`, … as probed.
    pub fstype: String,
    /// `mounted`, or `failed` with `message` (e.g. not re-established after
    /// a restart), or `gone` (unmounted behind the appliance's back).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub created_unix: u64,
}

/// A partition of a snapshot's disk.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct PartitionInfo {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// `mbr:0x83`, `gpt:<type GUID>`.
    pub kind: String,
    pub bootable: bool,
}

/// A file or directory inside a snapshot's filesystem.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    /// `file`, `dir`, `symlink`, `block`, `char`, `fifo`, `socket`.
    pub kind: String,
    pub size: u64,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Symlinks: where they point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Which file, in which partition; paging for large directories.
#[derive(Serialize, Deserialize, ToSchema, utoipa::IntoParams, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    /// Absolute path inside the filesystem.
    #[serde(default = "root_path")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

fn yes() -> bool {
    true
}

fn local() -> String {
    LOCATIONS[0].to_string()
}

/// The values of [`Snapshot::location`].
pub const LOCATIONS: [&str; 3] = ["local", "tiered", "recalling"];

fn root_path() -> String {
    "/".into()
}

/// A file or tar being streamed from a snapshot: its size if known, then
/// chunks; an `Err` chunk aborts the transfer (the client sees a cut body,
/// never a silently short file).
pub struct Download {
    pub size: Option<u64>,
    pub name: String,
    pub chunks: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
}

/// An NBD export and who uses it.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Export {
    pub name: String,
    /// `stage`, `clone` or `snapshot`.
    pub kind: String,
    pub read_only: bool,
    pub size: u64,
    /// NBD URIs, one per listener (`nbd://HOST:PORT/NAME`, `nbd+unix:///NAME?socket=PATH`).
    pub uris: Vec<String>,
    pub clients: Vec<ExportClient>,
}

/// `POST /v1/jobs`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct JobCreate {
    /// `scrub` (verify every checksum in the pool), `retention` (apply
    /// retention policies and the pool quota now), `delete-volume`,
    /// `vm-backup` (every VM of a category, through cdm-agent), `defrag`
    /// (rewrite a volume's fragmented blocks it owns alone in logical
    /// order, rate-limited); with an object tier configured (`PUT
    /// /v1/tier`): `tier` (move a volume's points due by its policy, or
    /// `snapshot` now, to the object store), `recall` (bring `snapshot`
    /// back to the pool) or `tier-gc` (remove objects nothing refers to).
    pub kind: String,
    /// For `delete-volume`, `defrag`, `tier` and `recall`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// For `recall` (required) and `tier` (optional: this point now,
    /// whatever its age): a snapshot id of `volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<u64>,
    /// For `delete-volume`: also delete snapshots, even with clients or clones.
    #[serde(default)]
    pub force: bool,
    /// For `vm-backup`: the VM inventory on the appliance (a directory of
    /// libvirt domain XML files, or a TOML/JSON inventory file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<String>,
    /// For `vm-backup`: the category (`os:linux`, `app:PostgreSQL`,
    /// `keyword:db`, `path:DIR`, `pool:NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// For `vm-backup`: VMs at a time (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<usize>,
    /// For `defrag`: most MB (10^6 bytes) rewritten per second (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mb_s: Option<u64>,
    /// For `defrag`: the block to start at (default 0), to resume a pass
    /// from a stopped job's `result.next_block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_block: Option<u64>,
}

/// A long operation.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
pub struct Job {
    pub id: u64,
    pub kind: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// 0.0 … 1.0.
    pub progress: f64,
    pub done: u64,
    pub total: u64,
    pub message: String,
    pub created_by: String,
    pub created_unix: u64,
    pub finished_unix: Option<u64>,
    /// Outcome details (a scrub report, expired snapshots…).
    pub result: Option<Value>,
    /// Agent jobs (`backup`, `restore`): the application.
    #[serde(default)]
    pub application: Option<u64>,
    /// Agent jobs: the host that runs it.
    #[serde(default)]
    pub host: Option<String>,
    /// Agent jobs: 1 for the first try, 2 for its first retry…
    #[serde(default)]
    pub attempt: u32,
    /// Agent jobs: what the agent is asked to do.
    #[serde(default)]
    pub params: Option<Value>,
    /// A queued retry is not handed out before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_unix: Option<u64>,
    /// When an agent took the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix: Option<u64>,
    /// A cancel was asked while an agent ran the job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
}

/// Something that happened on the appliance.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Event {
    /// Increasing sequence number.
    pub id: u64,
    pub time_unix: u64,
    /// `MODULE.ACTION`, e.g. `volume.created`, `snapshot.expired`, `alert.raised`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What it is about (a volume name, `VOLUME@ID`, a user…).
    pub subject: String,
    /// Who caused it (a user, `scheduler`, `nbd`).
    pub actor: String,
    pub data: Value,
}

/// One change made through the API.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct AuditEntry {
    pub id: u64,
    pub time_unix: u64,
    pub user: String,
    /// Name of the token used.
    pub token: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// `POST /v1/users`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    pub name: String,
    /// `admin`, `operator` or `auditor`.
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Extra rights: `delete` lets an operator delete volumes, snapshots and clones.
    #[serde(default)]
    pub grants: Vec<String>,
}

/// `PATCH /v1/users/{name}`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<Vec<String>>,
}

/// A user.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct User {
    pub name: String,
    pub role: String,
    pub grants: Vec<String>,
    pub has_password: bool,
    pub created_unix: u64,
}

/// `POST /v1/users/{name}/tokens`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: String,
    /// Lifetime in seconds; none = until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// An API token (its secret is never shown again after creation).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub user: String,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
}

/// A new token with its secret: shown once.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct TokenCreated {
    pub id: String,
    pub name: String,
    pub user: String,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
    /// Use as `Authorization: Bearer TOKEN`.
    pub token: String,
}

/// `POST /v1/login`: a password login that returns a session token.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub name: String,
    pub password: String,
}

/// `POST /v1/webhooks`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct WebhookCreate {
    /// `http://` or `https://` receiver.
    pub url: String,
    /// Event types (`volume.created`), module wildcards (`snapshot.*`) or `*`.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// HMAC-SHA256 key for the `X-Cdm-Signature` header; generated if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

fn all_events() -> Vec<String> {
    vec!["*".to_string()]
}

/// A webhook subscription.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Webhook {
    pub id: u64,
    pub url: String,
    pub events: Vec<String>,
    pub created_unix: u64,
    /// Only in the answer to `POST /v1/webhooks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// One attempt series to deliver one event to one webhook.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Delivery {
    pub id: u64,
    pub webhook: u64,
    pub event: u64,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (gave up).
    pub state: String,
    pub attempts: u32,
    /// HTTP status of the last attempt, if one answered.
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub updated_unix: u64,
    pub next_attempt_unix: Option<u64>,
}

/// When a volume is snapshotted automatically.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Every N seconds (at least 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    /// Five-field cron expression in UTC: `MIN HOUR DOM MON DOW`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
}

/// Which snapshots are kept (as restic's `forget`): a snapshot is kept when
/// any rule that is set keeps it, when it is one of the newest `min_keep`
/// (at least 1), or when clones were made from it; the others expire. With
/// no rule set nothing expires (but the pool quota may still expire old
/// snapshots).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep the newest N snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep snapshots younger than N days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_days: Option<u32>,
    /// Never fewer than this many (at least 1).
    #[serde(default = "one")]
    pub min_keep: u32,
}

fn one() -> u32 {
    1
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep_last: None,
            keep_days: None,
            min_keep: 1,
        }
    }
}

// Named for what it is (the engine's data-pipeline policy is another type);
// the OpenAPI schema keeps the name `Policy` that clients already know. A
// plain comment, so the schema's description stays as it was.
/// A volume's snapshot schedule and retention (`PUT /v1/volumes/{name}/policy`).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[schema(as = Policy)]
pub struct SnapshotPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    #[serde(default)]
    pub retention: Retention,
    /// Object tier (issue 21): points older than N days (at least 1) move
    /// their uniquely owned data to the object store (`PUT /v1/tier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_after_days: Option<u32>,
    /// Object tier: points beyond the newest K (at least 1) move too,
    /// whatever their age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_keep_last: Option<u32>,
}

/// Pool-wide settings (`PUT /v1/pool/policy`).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolPolicy {
    /// When used space exceeds this, the oldest snapshots are expired (each
    /// volume keeps its newest `min_keep`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
}

/// The pool.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct PoolInfo {
    pub uuid: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Commit generation of the newest superblock.
    pub generation: u64,
    pub volumes: usize,
    pub snapshots: usize,
    pub policy: PoolPolicy,
    /// `none` (no key set up), `locked` (set up, snapshotd started without
    /// it: encrypted volumes unavailable) or `unlocked`.
    pub encryption_key: String,
    /// Data reduction (made again when the pool has changed).
    pub reduction: PoolReduction,
    /// `ok`; `full` (data writes refused: free space is down to the
    /// metadata reserve; commits, snapshots and deletes still work);
    /// `no_space` or `io_error` (commits fail: reads only, writes and
    /// changes refused until a retried commit gets through).
    #[serde(default)]
    pub state: String,
    /// Why, when `state` is not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_message: Option<String>,
    /// Part of `used_bytes` already freed (deletes), reusable once the
    /// next commits are made…
    #[serde(default)]
    pub freeing_bytes: u64,
    /// …which is within this many seconds (periodic commits).
    #[serde(default)]
    pub freeing_reusable_within_s: u64,
    /// Space kept for metadata: data writes get ENOSPC this far from full.
    #[serde(default)]
    pub reserve_bytes: u64,
    /// The pool file has all its blocks on the host filesystem
    /// (preallocated), so a full host filesystem cannot stop its commits;
    /// false for a sparse pool.
    #[serde(default)]
    pub preallocated: bool,
}

/// `POST /v1/pool/grow`: enlarge the pool.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct PoolGrow {
    /// New size in bytes, a multiple of 4096; pools only grow.
    pub size: u64,
}

/// Bytes at each stage of the data pipeline.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct ReductionFigures {
    /// Mapped blocks × block size (for the pool: every volume and snapshot
    /// counted as a full copy).
    pub logical_bytes: u64,
    /// Distinct chunks × block size.
    pub after_dedup_bytes: u64,
    /// What those chunks occupy stored (compressed where it paid).
    pub after_compression_bytes: u64,
    /// logical / after compression.
    pub ratio: f64,
}

/// Per volume: what it would need on its own.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct VolumeReductionFigures {
    pub name: String,
    #[serde(flatten)]
    pub figures: ReductionFigures,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct PoolReduction {
    pub pool: ReductionFigures,
    /// Pool bytes holding data, including not yet reclaimed parts of packs.
    pub data_allocated_bytes: u64,
    pub volumes: Vec<VolumeReductionFigures>,
}

/// `POST /v1/clock` (only with `--fake-clock`, for tests of schedules and retention).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ClockAdvance {
    pub advance_secs: u64,
}

/// The appliance's clock.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Clock {
    pub now_unix: u64,
    pub fake: bool,
}

/// `GET /health`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Machine-readable `code` (`bad_request`, `invalid_json`, `unauthorized`,
/// `forbidden`, `not_found`, `conflict`, `payload_too_large`, `unsupported`,
/// `no_space`, `not_configured`, `internal`, `unavailable`) and a human
/// `message`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Query of `GET /v1/events`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only events with a larger id.
    pub after: Option<u64>,
    /// Only this type, or a module wildcard (`snapshot.*`).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Newest N (default 100, at most 10000).
    pub limit: Option<usize>,
}

/// Query of `GET /v1/audit`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub after: Option<u64>,
    pub user: Option<String>,
    pub limit: Option<usize>,
}

/// Paging of a list (`GET /v1/volumes/{name}/snapshots`); the answer's
/// `X-Total-Count` header counts the whole list.
#[derive(Serialize, Deserialize, Clone, Debug, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// At most N items (default: all).
    pub limit: Option<usize>,
    /// Skip the first N (default 0).
    pub offset: Option<usize>,
    /// Newest first (default: oldest first).
    #[serde(default)]
    pub newest_first: bool,
}

/// Query of deletions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Delete even with snapshots, clones or connected clients.
    #[serde(default)]
    pub force: bool,
}

/// Roles, in decreasing power.
pub const ROLES: [&str; 3] = ["admin", "operator", "auditor"];
/// Grants an operator can hold.
pub const GRANTS: [&str; 1] = ["delete"];
/// Encryption modes a volume can ask for.
pub const ENCRYPTIONS: [&str; 4] = ["none", "aes-256-xts", "aes-128-xts", "sm4-xts"];

/// A virtual machine as an agent classified it by inspecting its disks
/// (no booting): operating system, applications, where its disks live.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub name: String,
    #[serde(default)]
    pub uuid: Option<String>,
    /// `linux`, `windows`, `unix`, or empty when no operating system was found.
    #[serde(default)]
    pub os_family: String,
    /// Distribution and version (`debian 12`), or the Windows product name.
    #[serde(default)]
    pub os: String,
    /// Applications found (Oracle, MySQL, PostgreSQL, SQL Server, DB2, Sybase, Exchange, Domino).
    #[serde(default)]
    pub apps: Vec<String>,
    #[serde(default)]
    pub storage_path: String,
    /// Resource pool.
    #[serde(default)]
    pub pool: String,
    /// Disk sources.
    #[serde(default)]
    pub disks: Vec<String>,
    /// The inspection results, as the agent reported them.
    #[serde(default)]
    pub details: Value,
}

/// `PUT /v1/vms`: the whole inventory an agent classified.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct VmInventory {
    pub vms: Vec<VmRecord>,
}

/// A category and what is in it.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct VmGroup {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    pub groups: Vec<VmGroup>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
}

/// `GET /v1/vms/tree`: the VMs regrouped by a category.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct VmTree {
    pub by: String,
    pub groups: Vec<VmGroup>,
}

/// `GET /v1/vms/tree` query.
#[derive(Deserialize, utoipa::IntoParams, Clone, Debug)]
pub struct VmTreeQuery {
    /// `os`, `app`, `keyword:WORD`, `path` or `pool`.
    #[serde(default = "by_os")]
    pub by: String,
}

fn by_os() -> String {
    "os".into()
}

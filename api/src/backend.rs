//! What the API needs from the appliance. `snapshotd` implements it over the
//! pool, the NBD server and its state store; the routes call it from
//! blocking threads, after checking the caller's role.

use serde_json::Value;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::types::*;

/// The appliance behind the API. Every method may block (disk I/O, commits).
/// Methods that change something record who did it (`caller`) in events.
pub trait Backend:
    crate::control_backend::ControlBackend
    + crate::replication_backend::ReplicationBackend
    + crate::drills::DrillBackend
    + crate::vm_recovery::VmRecoveryBackend
    + crate::appliance::ApplianceBackend
    + crate::tier::TierBackend
    + Send
    + Sync
    + 'static
{
    /// Resolves a bearer token to its user (401 if unknown, revoked or expired).
    /// For a host credential (after [`crate::auth::host_may`]): 403 unless
    /// the data the request reaches is the host's own (the volumes of its
    /// applications, the clones it made, what a restore it runs needs).
    fn host_access(&self, caller: &Caller, method: &str, path: &str) -> ApiResult<()>;
    fn authenticate(&self, token: &str) -> ApiResult<Caller>;
    /// Password login: a new session token.
    /// `client` is the caller's address (when the server knows it), for
    /// rate limiting; a locked-out attempt answers 429 with `retry_after`.
    fn login(&self, req: Login, client: Option<std::net::IpAddr>) -> ApiResult<TokenCreated>;
    /// Revokes the token the caller used.
    fn logout(&self, caller: &Caller) -> ApiResult<()>;

    fn pool(&self) -> ApiResult<PoolInfo>;
    fn set_pool_policy(&self, caller: &Caller, p: PoolPolicy) -> ApiResult<PoolInfo>;
    /// Grows the pool to `size` bytes (400 if smaller or not a multiple of
    /// 4 KiB, 507 `no_space` if the host filesystem cannot hold it).
    fn grow_pool(&self, caller: &Caller, size: u64) -> ApiResult<PoolInfo>;

    fn create_volume(&self, caller: &Caller, req: VolumeCreate) -> ApiResult<Volume>;
    fn list_volumes(&self) -> ApiResult<Vec<Volume>>;
    fn volume(&self, name: &str) -> ApiResult<Volume>;
    fn grow_volume(&self, caller: &Caller, name: &str, size: u64) -> ApiResult<Volume>;
    /// The live volume's contents (and size) made those of its snapshot
    /// `snapshot`; 404 for an unknown volume or snapshot, 409 while the
    /// volume is exported to a client or mounted, or is a replica.
    fn revert_volume(&self, caller: &Caller, name: &str, snapshot: u64) -> ApiResult<Volume>;
    /// Refused (409) with snapshots, clones of its snapshots or connected
    /// clients unless `force`.
    fn delete_volume(&self, caller: &Caller, name: &str, force: bool) -> ApiResult<()>;
    fn policy(&self, volume: &str) -> ApiResult<SnapshotPolicy>;
    fn set_policy(
        &self,
        caller: &Caller,
        volume: &str,
        p: SnapshotPolicy,
    ) -> ApiResult<SnapshotPolicy>;

    fn create_snapshot(
        &self,
        caller: &Caller,
        volume: &str,
        req: SnapshotCreate,
    ) -> ApiResult<Snapshot>;
    fn list_snapshots(&self, volume: &str) -> ApiResult<Vec<Snapshot>>;
    fn snapshot(&self, volume: &str, id: u64) -> ApiResult<Snapshot>;
    /// Refused (409) with clones or connected clients unless `force`.
    fn delete_snapshot(&self, caller: &Caller, volume: &str, id: u64, force: bool)
        -> ApiResult<()>;

    fn create_clone(
        &self,
        caller: &Caller,
        volume: &str,
        snapshot: u64,
        name: &str,
    ) -> ApiResult<Volume>;
    fn list_clones(&self) -> ApiResult<Vec<Volume>>;
    /// Makes a clone an ordinary stage disk, independent of its origin.
    fn promote_clone(&self, caller: &Caller, name: &str) -> ApiResult<Volume>;
    fn delete_clone(&self, caller: &Caller, name: &str, force: bool) -> ApiResult<()>;

    fn list_exports(&self) -> ApiResult<Vec<Export>>;

    /// Mounts a snapshot (read-only) or a new clone of it (read-write) on
    /// the appliance: FUSE file, loop device, kernel mount.
    fn create_mount(&self, caller: &Caller, req: MountCreate) -> ApiResult<Mount>;
    fn list_mounts(&self) -> ApiResult<Vec<Mount>>;

    /// The VM inventory agents classified: replaced whole by `put_vms`.
    fn put_vms(&self, caller: &Caller, vms: Vec<VmRecord>) -> ApiResult<Vec<VmRecord>>;
    fn list_vms(&self) -> ApiResult<Vec<VmRecord>>;
    /// Unmounts; with `delete_clone` also deletes a writable mount's clone.
    fn delete_mount(&self, caller: &Caller, name: &str, delete_clone: bool) -> ApiResult<()>;

    /// File-level restore, read in process from the snapshot's image.
    fn partitions(&self, volume: &str, snapshot: u64) -> ApiResult<Vec<PartitionInfo>>;
    fn list_files(&self, volume: &str, snapshot: u64, q: FilesQuery) -> ApiResult<Vec<FileEntry>>;
    fn stat_file(&self, volume: &str, snapshot: u64, q: FilesQuery) -> ApiResult<FileEntry>;
    /// A regular file's bytes, or with `tar` a tar of the tree at the path.
    fn download(
        &self,
        volume: &str,
        snapshot: u64,
        q: FilesQuery,
        tar: bool,
    ) -> ApiResult<Download>;

    fn start_job(&self, caller: &Caller, req: JobCreate) -> ApiResult<Job>;
    /// The newest 200 jobs that pass the filters, newest first.
    fn list_jobs(&self, q: crate::control::JobQuery) -> ApiResult<Vec<Job>>;
    fn job(&self, id: u64) -> ApiResult<Job>;

    fn events(&self, q: EventQuery) -> ApiResult<Vec<Event>>;
    fn audit(&self, q: AuditQuery) -> ApiResult<Vec<AuditEntry>>;
    /// Records one change made through the API.
    fn record_audit(&self, caller: &Caller, method: &str, path: &str, status: u16);
    /// Whether a change may be made now: refused (503) while its audit
    /// record could not be stored anywhere.
    fn audit_ready(&self) -> ApiResult<()> {
        Ok(())
    }

    fn create_webhook(&self, caller: &Caller, req: WebhookCreate) -> ApiResult<Webhook>;
    fn list_webhooks(&self) -> ApiResult<Vec<Webhook>>;
    fn webhook(&self, id: u64) -> ApiResult<Webhook>;
    fn delete_webhook(&self, caller: &Caller, id: u64) -> ApiResult<()>;
    fn deliveries(&self, id: u64) -> ApiResult<Vec<Delivery>>;

    fn create_user(&self, caller: &Caller, req: UserCreate) -> ApiResult<User>;
    fn list_users(&self) -> ApiResult<Vec<User>>;
    fn user(&self, name: &str) -> ApiResult<User>;
    fn update_user(&self, caller: &Caller, name: &str, req: UserUpdate) -> ApiResult<User>;
    fn delete_user(&self, caller: &Caller, name: &str) -> ApiResult<()>;
    fn create_token(
        &self,
        caller: &Caller,
        user: &str,
        req: TokenCreate,
    ) -> ApiResult<TokenCreated>;
    fn list_tokens(&self, user: &str) -> ApiResult<Vec<Token>>;
    fn delete_token(&self, caller: &Caller, user: &str, id: &str) -> ApiResult<()>;

    fn clock(&self) -> ApiResult<Clock>;
    /// Moves a fake clock forward (404 when the clock is real).
    fn advance_clock(&self, caller: &Caller, secs: u64) -> ApiResult<Clock>;

    /// Prometheus text exposition.
    fn metrics(&self) -> ApiResult<String>;
    /// Extra JSON for `/health` (pool state); must be cheap.
    fn health(&self) -> ApiResult<Value>;
    /// The CA certificate (PEM) that signed the appliance's TLS certificate,
    /// for clients to pin (`GET /v1/ca`).
    fn ca_pem(&self) -> ApiResult<String> {
        Err(ApiError::not_found("this server has no TLS CA"))
    }
}

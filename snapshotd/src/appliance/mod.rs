//! The appliance behind the API: the [`Backend`] over the pool, the NBD
//! server, the state store, events, jobs and the scheduler.
//!
//! One file per resource, as the API's routes group them; this file holds
//! the shared state, the error mappings and the [`Backend`] table that
//! hands each route to its resource's file.

mod clones;
mod control;
mod defrag;
mod drill_local;
mod drills;
mod exports;
mod jobs;
mod logs;
mod policies;
mod pool;
mod replication;
pub use pool::COMMIT_INTERVAL_S;
mod snapshots;
mod throttle;
mod tier;
mod updates;
pub use updates::UpdateSetup;
mod users;
mod vm_recovery;
mod vm_restore;
mod vms;
mod volumes;
mod webhooks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cdm_api::auth::Caller;
use cdm_api::backend::Backend;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use cdmfs::Pool;
use nbd_server::Server;
use serde_json::Value;

use crate::clock::Clock as Time;
use crate::events::Events;
use crate::jobs::Jobs;
use crate::scheduler::Scheduler;
use crate::state::{State, StateError};

/// What a job needs to run `cdm-agent` against this appliance.
#[derive(Clone, Debug)]
pub struct AgentSetup {
    pub api_url: String,
    pub state_dir: std::path::PathBuf,
}

pub struct Appliance {
    /// Set once at start (main): how jobs reach this appliance.
    pub agent: std::sync::OnceLock<AgentSetup>,
    /// Set once at start (main): the pool file, whose allocation
    /// `GET /v1/pool` reports.
    pub pool_file: std::sync::OnceLock<std::path::PathBuf>,
    /// Set once at start (main): the CA certificate (PEM) `GET /v1/ca` serves.
    pub tls_ca: std::sync::OnceLock<String>,
    /// Set once at start (main): replication between appliances.
    pub replication: std::sync::OnceLock<Arc<crate::replication::Replication>>,
    pub pool: Arc<Pool>,
    pub nbd: Arc<Server>,
    pub state: Arc<State>,
    pub events: Arc<Events>,
    pub clock: Arc<Time>,
    pub jobs: Arc<Jobs>,
    pub scheduler: Arc<Scheduler>,
    /// Hosts, applications, protection policies and agent jobs.
    pub control: Arc<crate::control::Control>,
    /// NBD listen addresses (`HOST:PORT` or `unix:PATH`), for export URIs.
    pub nbd_addrs: Vec<String>,
    /// SHA-256 of tokens already verified with Argon2id → token id: Argon2
    /// runs once per token per process, not on every request.
    verified: Mutex<HashMap<[u8; 32], String>>,
    /// Itself, for jobs that outlive a request.
    me: std::sync::Weak<Appliance>,
    /// Unique bytes per volume id and when they were computed: listings
    /// reuse them for [`UNIQUE_TTL`] instead of walking every tree under the
    /// pool lock on each request.
    unique: Mutex<HashMap<u64, (std::time::Instant, u64)>>,
    /// Policy of new volumes where a request does not say.
    defaults: cdmfs::DataPolicy,
    /// Instant mounts, when snapshotd runs with `--mount DIR`.
    pub mounts: Option<crate::recovery::Mounts>,
    /// The last space report and the pool's change count it describes (it
    /// walks every tree, so it is made again only after the pool changed).
    reduction: Mutex<Option<(u64, cdmfs::ReductionReport)>>,
    /// Failed logins per user name and client address.
    login_throttle: throttle::LoginThrottle,
    /// Fragmentation figures and running `defrag` jobs.
    defrag: defrag::DefragState,
    /// The audit log, with its fallback for a failing state database.
    audit: crate::audit::AuditLog,
    /// Set once at start (main): where recovered VMs keep their serial
    /// logs, QMP sockets and domain XML (`DATA/vm-recoveries`).
    pub vm_recovery_dir: std::sync::OnceLock<std::path::PathBuf>,
    /// The recovered VMs' qemu processes.
    vm_runs: vm_recovery::VmRuns,
    /// Set once at start (main) with `--appliance`: the appliance image's
    /// status file and update tool; unset, its routes answer 404.
    pub updates: std::sync::OnceLock<UpdateSetup>,
}

/// How long a listing may show a volume's unique bytes before recomputing.
const UNIQUE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn st(e: StateError) -> ApiError {
    match e {
        // The device under the database failed: it is reopened at the next
        // request, so this is worth retrying.
        StateError::Io(_) => ApiError::unavailable(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

/// Maps engine errors onto API statuses.
pub fn engine(e: cdmfs::Error) -> ApiError {
    use cdmfs::Error as E;
    match e {
        E::NotFound(_) => ApiError::not_found(e.to_string()),
        E::Exists(_) | E::Busy(_) | E::ReadOnly(_) => ApiError::conflict(e.to_string()),
        E::Invalid(_) | E::OutOfRange { .. } => ApiError::bad_request(e.to_string()),
        E::NoSpace => ApiError::new(507, "no_space", e.to_string()),
        // A device out of space (a sparse pool on a full filesystem).
        E::Io(ref io)
            if io.raw_os_error() == Some(libc::ENOSPC)
                || io.kind() == std::io::ErrorKind::StorageFull =>
        {
            ApiError::new(507, "no_space", e.to_string())
        }
        // The device fails: worth retrying once it recovers.
        E::Io(_) => ApiError::unavailable(e.to_string()),
        E::KeyRequired | E::WrongKey(_) => ApiError::conflict(e.to_string()),
        E::SealKeyRequired(_) => ApiError::new(409, "key_required", e.to_string()),
        E::Failed => ApiError::unavailable(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

impl Appliance {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: Arc<Pool>,
        nbd: Arc<Server>,
        state: Arc<State>,
        events: Arc<Events>,
        clock: Arc<Time>,
        jobs: Arc<Jobs>,
        scheduler: Arc<Scheduler>,
        nbd_addrs: Vec<String>,
        defaults: cdmfs::DataPolicy,
        mounts: Option<crate::recovery::Mounts>,
    ) -> Arc<Appliance> {
        let audit = crate::audit::AuditLog::new(state.clone());
        // Records kept aside by an earlier run whose database was failing.
        match audit.replay() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                records = n,
                "audit records kept aside are now in the state database"
            ),
            Err(e) => tracing::error!(error = %e, "audit records kept aside cannot be stored yet"),
        }
        let control = crate::control::Control::new(
            state.clone(),
            clock.clone(),
            events.clone(),
            pool.clone(),
            jobs.clone(),
        );
        Arc::new_cyclic(|me| {
            drills::hook(&control, me.clone());
            Appliance {
                control,
                audit,
                agent: std::sync::OnceLock::new(),
                pool_file: std::sync::OnceLock::new(),
                tls_ca: std::sync::OnceLock::new(),
                replication: std::sync::OnceLock::new(),
                me: me.clone(),
                pool,
                nbd,
                state,
                events,
                clock,
                jobs,
                scheduler,
                nbd_addrs,
                verified: Mutex::new(HashMap::new()),
                unique: Mutex::new(HashMap::new()),
                defaults,
                mounts,
                reduction: Mutex::new(None),
                login_throttle: throttle::LoginThrottle::default(),
                defrag: defrag::DefragState::default(),
                vm_recovery_dir: std::sync::OnceLock::new(),
                vm_runs: vm_recovery::VmRuns::default(),
                updates: std::sync::OnceLock::new(),
            }
        })
    }

    /// Commits the pool: every change a route makes is durable before it answers.
    pub(super) fn commit(&self) -> ApiResult<()> {
        self.pool.flush().map_err(engine)
    }

    /// Itself as an `Arc`, for jobs that outlive the request.
    pub(super) fn self_arc(&self) -> ApiResult<Arc<Appliance>> {
        self.me
            .upgrade()
            .ok_or_else(|| ApiError::unavailable("appliance is shutting down"))
    }
}

pub(super) use cdm_common::lock::lock;

impl Backend for Appliance {
    // control.rs
    fn host_access(&self, c: &Caller, method: &str, path: &str) -> ApiResult<()> {
        self.host_path_access(c, method, path)
    }
    // users.rs
    fn authenticate(&self, token: &str) -> ApiResult<Caller> {
        self.session_authenticate(token)
    }
    fn login(&self, req: Login, client: Option<std::net::IpAddr>) -> ApiResult<TokenCreated> {
        self.session_login(req, client)
    }
    fn logout(&self, c: &Caller) -> ApiResult<()> {
        self.session_logout(c)
    }
    fn create_user(&self, c: &Caller, req: UserCreate) -> ApiResult<User> {
        self.user_create(c, req)
    }
    fn list_users(&self) -> ApiResult<Vec<User>> {
        self.user_list()
    }
    fn user(&self, name: &str) -> ApiResult<User> {
        self.user_get(name)
    }
    fn update_user(&self, c: &Caller, name: &str, req: UserUpdate) -> ApiResult<User> {
        self.user_update(c, name, req)
    }
    fn delete_user(&self, c: &Caller, name: &str) -> ApiResult<()> {
        self.user_delete(c, name)
    }
    fn create_token(&self, c: &Caller, user: &str, req: TokenCreate) -> ApiResult<TokenCreated> {
        self.token_create(c, user, req)
    }
    fn list_tokens(&self, user: &str) -> ApiResult<Vec<Token>> {
        self.token_list(user)
    }
    fn delete_token(&self, c: &Caller, user: &str, id: &str) -> ApiResult<()> {
        self.token_delete(c, user, id)
    }
    // pool.rs
    fn pool(&self) -> ApiResult<PoolInfo> {
        self.pool_get()
    }
    fn set_pool_policy(&self, c: &Caller, p: PoolPolicy) -> ApiResult<PoolInfo> {
        self.pool_set_policy(c, p)
    }
    fn grow_pool(&self, c: &Caller, size: u64) -> ApiResult<PoolInfo> {
        self.pool_grow(c, size)
    }
    fn clock(&self) -> ApiResult<Clock> {
        self.clock_get()
    }
    fn advance_clock(&self, c: &Caller, secs: u64) -> ApiResult<Clock> {
        self.clock_advance(c, secs)
    }
    fn metrics(&self) -> ApiResult<String> {
        self.metrics_render()
    }
    fn health(&self) -> ApiResult<Value> {
        self.health_get()
    }
    fn ca_pem(&self) -> ApiResult<String> {
        self.tls_ca
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("the appliance's TLS is not set up yet"))
    }
    // volumes.rs
    fn create_volume(&self, c: &Caller, req: VolumeCreate) -> ApiResult<Volume> {
        self.volume_create(c, req)
    }
    fn list_volumes(&self) -> ApiResult<Vec<Volume>> {
        self.volume_list()
    }
    fn volume(&self, name: &str) -> ApiResult<Volume> {
        self.volume_get(name)
    }
    fn grow_volume(&self, c: &Caller, name: &str, size: u64) -> ApiResult<Volume> {
        self.volume_grow(c, name, size)
    }
    fn revert_volume(&self, c: &Caller, name: &str, snapshot: u64) -> ApiResult<Volume> {
        self.volume_revert(c, name, snapshot)
    }
    fn delete_volume(&self, c: &Caller, name: &str, force: bool) -> ApiResult<()> {
        self.volume_delete(c, name, force)
    }
    // policies.rs
    fn policy(&self, volume: &str) -> ApiResult<SnapshotPolicy> {
        self.policy_get(volume)
    }
    fn set_policy(&self, c: &Caller, volume: &str, p: SnapshotPolicy) -> ApiResult<SnapshotPolicy> {
        self.policy_set(c, volume, p)
    }
    // snapshots.rs
    fn create_snapshot(
        &self,
        c: &Caller,
        volume: &str,
        req: SnapshotCreate,
    ) -> ApiResult<Snapshot> {
        self.snapshot_create(c, volume, req)
    }
    fn list_snapshots(&self, volume: &str) -> ApiResult<Vec<Snapshot>> {
        self.snapshot_list(volume)
    }
    fn snapshot(&self, volume: &str, id: u64) -> ApiResult<Snapshot> {
        self.snapshot_get(volume, id)
    }
    fn delete_snapshot(&self, c: &Caller, volume: &str, id: u64, force: bool) -> ApiResult<()> {
        self.snapshot_delete(c, volume, id, force)
    }
    // clones.rs
    fn create_clone(
        &self,
        c: &Caller,
        volume: &str,
        snapshot: u64,
        name: &str,
    ) -> ApiResult<Volume> {
        self.clone_create(c, volume, snapshot, name)
    }
    fn list_clones(&self) -> ApiResult<Vec<Volume>> {
        self.clone_list()
    }
    fn promote_clone(&self, c: &Caller, name: &str) -> ApiResult<Volume> {
        self.clone_promote(c, name)
    }
    fn delete_clone(&self, c: &Caller, name: &str, force: bool) -> ApiResult<()> {
        self.clone_delete(c, name, force)
    }
    // vms.rs
    fn put_vms(&self, c: &Caller, vms: Vec<VmRecord>) -> ApiResult<Vec<VmRecord>> {
        self.vms_put(c, vms)
    }
    fn list_vms(&self) -> ApiResult<Vec<VmRecord>> {
        self.vms_list()
    }
    // exports.rs
    fn list_exports(&self) -> ApiResult<Vec<Export>> {
        self.export_list()
    }
    // jobs.rs
    fn start_job(&self, c: &Caller, req: JobCreate) -> ApiResult<Job> {
        self.job_start(c, req)
    }
    fn list_jobs(&self, q: cdm_api::control::JobQuery) -> ApiResult<Vec<Job>> {
        self.control.list_jobs(q)
    }
    fn job(&self, id: u64) -> ApiResult<Job> {
        self.job_get(id)
    }
    // logs.rs
    fn events(&self, q: EventQuery) -> ApiResult<Vec<Event>> {
        self.event_list(q)
    }
    fn audit(&self, q: AuditQuery) -> ApiResult<Vec<AuditEntry>> {
        self.audit_list(q)
    }
    fn record_audit(&self, c: &Caller, method: &str, path: &str, status: u16) {
        self.audit_record(c, method, path, status)
    }
    fn audit_ready(&self) -> ApiResult<()> {
        self.audit.ready().map_err(ApiError::unavailable)
    }
    // webhooks.rs
    fn create_webhook(&self, c: &Caller, req: WebhookCreate) -> ApiResult<Webhook> {
        self.webhook_create(c, req)
    }
    fn list_webhooks(&self) -> ApiResult<Vec<Webhook>> {
        self.webhook_list()
    }
    fn webhook(&self, id: u64) -> ApiResult<Webhook> {
        self.webhook_get(id)
    }
    fn delete_webhook(&self, c: &Caller, id: u64) -> ApiResult<()> {
        self.webhook_delete(c, id)
    }
    fn deliveries(&self, id: u64) -> ApiResult<Vec<Delivery>> {
        self.webhook_deliveries(id)
    }
    // mounts and file-level restore: crate::recovery
    fn create_mount(&self, c: &Caller, req: MountCreate) -> ApiResult<Mount> {
        self.mount_create(c, req)
    }
    fn list_mounts(&self) -> ApiResult<Vec<Mount>> {
        self.mount_list()
    }
    fn delete_mount(&self, c: &Caller, name: &str, delete_clone: bool) -> ApiResult<()> {
        self.mount_delete(c, name, delete_clone)
    }
    fn partitions(&self, volume: &str, snapshot: u64) -> ApiResult<Vec<PartitionInfo>> {
        self.files_partitions(volume, snapshot)
    }
    fn list_files(&self, volume: &str, snapshot: u64, q: FilesQuery) -> ApiResult<Vec<FileEntry>> {
        self.files_list(volume, snapshot, q)
    }
    fn stat_file(&self, volume: &str, snapshot: u64, q: FilesQuery) -> ApiResult<FileEntry> {
        self.files_stat(volume, snapshot, q)
    }
    fn download(
        &self,
        volume: &str,
        snapshot: u64,
        q: FilesQuery,
        tar: bool,
    ) -> ApiResult<Download> {
        self.files_download(volume, snapshot, q, tar)
    }
}

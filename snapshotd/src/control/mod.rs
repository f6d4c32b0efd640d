//! The control plane (`docs/control-plane.md`): enrolled hosts and their
//! agents, applications, protection policies, the queue of agent jobs,
//! the catalog of points and each application's RPO.
//!
//! One file per job of the code: `hosts.rs` (enrolment, heartbeats,
//! retirement), `apps.rs` (applications, policies, points), `queue.rs`
//! (agent jobs: creation, dispatch, progress, finish, cancel, failures,
//! retries), `rpo.rs` (the scheduler's tick: policy backups, RPO states,
//! their events and metrics). Every change to agent jobs happens under the
//! queue's lock, so two requests never race on one job or one application.

mod apps;
mod archive;
pub mod drills;
mod hosts;
mod queue;
mod rpo;

pub use rpo::rpo_status;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cdm_api::auth::Caller;
use cdm_api::control::*;
use cdm_api::types::Job;
use cdm_api::{ApiError, ApiResult};
use cdmfs::Pool;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::appliance::st;
use crate::clock::Clock;
use crate::events::Events;
use crate::jobs::Jobs;
use crate::state::{State, APPS, APP_STATE, JOBS};
use cdm_common::lock::lock;

/// Default running jobs per host and on the whole appliance.
pub const HOST_JOBS: usize = 2;
pub const MAX_JOBS: usize = 8;
/// A running job without a progress call for this long (real time) fails;
/// a cancelled one that does not stop ends after `CANCEL_GRACE_SECS`.
pub const STALL_SECS: u64 = 300;
pub const CANCEL_GRACE_SECS: u64 = 60;
/// A queued job of a host offline this long (without a policy RPO) fails.
const OFFLINE_QUEUED_SECS: u64 = 3600;

/// A one-use enrolment token, stored under the SHA-256 of the token.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct EnrolRec {
    pub name: Option<String>,
    pub created_by: String,
    pub created_unix: u64,
    pub expires_unix: u64,
    pub used: bool,
}

/// An enrolled host as stored.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct HostRec {
    pub name: String,
    pub hostname: String,
    pub version: String,
    pub os: String,
    pub capabilities: Vec<String>,
    /// Id of its credential (a token of user `host:NAME`).
    pub token_id: String,
    pub enrolled_unix: u64,
    pub last_seen_unix: Option<u64>,
    pub retired: bool,
    /// Job ids its agent last reported running.
    pub running: Vec<u64>,
}

/// An application as stored (its RPO is computed when read).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct AppRec {
    pub id: u64,
    pub host: String,
    pub kind: String,
    pub name: String,
    pub config: Value,
    pub volume: String,
    pub policy: Option<String>,
    pub discovered: bool,
    pub size_bytes: Option<u64>,
    pub created_unix: u64,
    /// When its policy was assigned: without points, the RPO counts from here.
    pub policy_since_unix: Option<u64>,
}

impl AppRec {
    /// Whether `vol` holds this application's points: its volume, or for a
    /// `vm` application one of its VMs' disks, `VOLUME-VM-diskN` (the
    /// agent's `vm backup --volume-prefix VOLUME`). The one home of this
    /// rule: host scoping, points, RPO and retention all ask it.
    /// A database's log volume (its archived WAL or binlogs): its host
    /// writes it, it holds no point.
    pub fn owns_log_volume(&self, vol: &str) -> bool {
        matches!(self.kind.as_str(), "postgresql" | "mariadb")
            && vol.strip_prefix(self.volume.as_str()) == Some("-log")
    }

    pub fn owns_volume(&self, vol: &str) -> bool {
        if vol == self.volume {
            return true;
        }
        self.kind == "vm"
            && vol
                .strip_prefix(self.volume.as_str())
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.rsplit_once("-disk"))
                .is_some_and(|(vm, n)| {
                    !vm.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                })
    }

    /// The newest point of this application in `newest` (newest point per
    /// volume name).
    pub fn newest_in(&self, newest: &HashMap<String, u64>) -> Option<u64> {
        if self.kind != "vm" {
            return newest.get(&self.volume).copied();
        }
        newest
            .iter()
            .filter(|(v, _)| self.owns_volume(v))
            .map(|(_, t)| *t)
            .max()
    }
}

/// What the scheduler keeps per application: when its next policy backup
/// is due and the RPO state it last announced. Changed only under the
/// `rpo` lock.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AppState {
    /// The application's id (the key), so one scan reads them all.
    #[serde(default)]
    pub app: u64,
    pub next_due_unix: Option<u64>,
    pub rpo_state: Option<String>,
    /// The application's last finished backup job: kept here, as `JOBS`
    /// is trimmed (a restart must not forget a failure).
    #[serde(default)]
    pub last_job: Option<JobBrief>,
    /// The bad state (`late`, `failing`) announced and not yet recovered:
    /// `recovered` follows it even through `unprotected`.
    #[serde(default)]
    pub alerted: Option<String>,
}

/// A host's long poll (see `cdm_api::control_backend::PollWait`).
struct HostPoll {
    notify: Arc<tokio::sync::Notify>,
    current: Arc<AtomicU64>,
}

/// The user behind a host's credential.
pub fn host_user(name: &str) -> String {
    format!("host:{name}")
}

pub struct Control {
    state: Arc<State>,
    clock: Arc<Clock>,
    events: Arc<Events>,
    pool: Arc<Pool>,
    jobs: Arc<Jobs>,
    max_jobs: AtomicUsize,
    host_jobs: AtomicUsize,
    /// Agent jobs queued or running, by id (oldest first). Every change
    /// to an agent job, and every creation of one, holds this lock.
    active: Mutex<BTreeMap<u64, Job>>,
    /// Each host's long poll: woken when work may be there (a job queued or
    /// free to start, the host retired, a newer poll).
    polls: Mutex<HashMap<String, HostPoll>>,
    polls_waiting: Arc<AtomicU64>,
    /// When each host was last heard from, on the appliance clock.
    seen: Mutex<HashMap<String, u64>>,
    /// The last finished backup job of each application.
    last_backup: Mutex<HashMap<u64, JobBrief>>,
    /// When each running job last showed life (handed out, progress), in
    /// real time: the appliance clock may be a test's.
    reported: Mutex<HashMap<u64, std::time::Instant>>,
    /// When a cancel of each running job was asked, in real time.
    cancels: Mutex<HashMap<u64, std::time::Instant>>,
    /// `STALL_SECS` and `CANCEL_GRACE_SECS`, or what the daemon was told.
    stall_secs: AtomicU64,
    cancel_grace_secs: AtomicU64,
    /// Names of hosts being enrolled (their credential being made).
    enrolling: Mutex<std::collections::HashSet<String>>,
    /// One RPO evaluation at a time (the tick and ending jobs): a change
    /// is announced once.
    rpo: Mutex<()>,
    /// The daemon is stopping: long polls answer at once (an agent's
    /// pending poll would otherwise hold the API's shutdown up to 30 s).
    closing: std::sync::atomic::AtomicBool,
    /// Deletes a clone as the appliance does (set once at start): drill
    /// clones left by an agent that failed or crashed.
    clone_remover: std::sync::OnceLock<CloneRemover>,
    /// Starts a drill of any kind (the appliance's, which runs those of
    /// file trees and VM disks itself); set once at start.
    drill_starter: std::sync::OnceLock<DrillStarter>,
    /// The drill clones an earlier run left were looked for (first tick).
    drills_swept: std::sync::atomic::AtomicBool,
    /// Seconds between agents' heartbeats (`--heartbeat-seconds`).
    heartbeat_secs: AtomicU64,
    /// What agents last said of the log archivers they run, by application.
    archives: Mutex<HashMap<u64, archive::ArchiveSeen>>,
}

/// See `Control::clone_remover`.
pub type CloneRemover = Arc<dyn Fn(&str) -> ApiResult<()> + Send + Sync>;
/// See `Control::drill_starter`.
pub type DrillStarter =
    Arc<dyn Fn(&Caller, u64, cdm_api::drills::DrillCreate) -> ApiResult<Job> + Send + Sync>;

impl Control {
    pub fn new(
        state: Arc<State>,
        clock: Arc<Clock>,
        events: Arc<Events>,
        pool: Arc<Pool>,
        jobs: Arc<Jobs>,
    ) -> Arc<Control> {
        let now = clock.now();
        let c = Control {
            state,
            clock,
            events,
            pool,
            jobs,
            max_jobs: AtomicUsize::new(MAX_JOBS),
            host_jobs: AtomicUsize::new(HOST_JOBS),
            active: Mutex::new(BTreeMap::new()),
            polls: Mutex::new(HashMap::new()),
            polls_waiting: Arc::new(AtomicU64::new(0)),
            seen: Mutex::new(HashMap::new()),
            last_backup: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            stall_secs: AtomicU64::new(STALL_SECS),
            cancel_grace_secs: AtomicU64::new(CANCEL_GRACE_SECS),
            enrolling: Mutex::new(std::collections::HashSet::new()),
            rpo: Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
            clone_remover: std::sync::OnceLock::new(),
            drills_swept: std::sync::atomic::AtomicBool::new(false),
            drill_starter: std::sync::OnceLock::new(),
            heartbeat_secs: AtomicU64::new(HEARTBEAT_SECS),
            archives: Mutex::new(HashMap::new()),
        };
        if let Err(e) = c.load(now) {
            tracing::error!(error = %e, "cannot load the control plane's jobs");
        }
        Arc::new(c)
    }

    /// Loads the queued and agent-run jobs, the last backup of each
    /// application, and when hosts were seen. A host counts as seen at this
    /// start: its agent had no appliance to talk to while it was down.
    fn load(&self, now: u64) -> Result<(), crate::state::StateError> {
        let jobs: Vec<Job> = self.state.scan(JOBS, 0, usize::MAX, false, |j: &Job| {
            j.host.is_some() && ["backup", "restore", "drill"].contains(&j.kind.as_str())
        })?;
        let mut active = lock(&self.active);
        let mut last = lock(&self.last_backup);
        for j in jobs {
            if j.state == "queued" || j.state == "running" {
                active.insert(j.id, j);
            } else if let (Some(app), "backup") = (j.application, j.kind.as_str()) {
                last.insert(app, brief(&j));
            }
        }
        // What APP_STATE kept wins: the job rows may be trimmed.
        for s in self
            .state
            .scan(APP_STATE, 0, usize::MAX, false, |_: &AppState| true)?
        {
            if let Some(j) = s.last_job {
                last.insert(s.app, j);
            }
        }
        drop((active, last));
        let hosts: Vec<HostRec> = self.state.all(crate::state::HOSTS)?;
        let mut seen = lock(&self.seen);
        for h in hosts.iter().filter(|h| !h.retired) {
            seen.insert(h.name.clone(), now.max(h.last_seen_unix.unwrap_or(0)));
        }
        Ok(())
    }

    /// How drill clones left behind are deleted (the appliance's own
    /// clone delete); set once at start.
    pub fn set_clone_remover(&self, f: CloneRemover) {
        let _ = self.clone_remover.set(f);
    }

    /// How scheduled drills start (the appliance's, for every kind).
    pub fn set_drill_starter(&self, f: DrillStarter) {
        let _ = self.drill_starter.set(f);
    }

    /// Ends every long poll now and the ones to come (the daemon stops).
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for p in lock(&self.polls).values() {
            p.current.fetch_add(1, Ordering::SeqCst);
            p.notify.notify_waiters();
        }
    }

    /// Begins a long poll of `host`: the host's previous one ends.
    pub(super) fn poll_begin(&self, host: &str) -> cdm_api::control_backend::PollWait {
        let mut polls = lock(&self.polls);
        let p = polls.entry(host.to_string()).or_insert_with(|| HostPoll {
            notify: Arc::new(tokio::sync::Notify::new()),
            current: Arc::new(AtomicU64::new(0)),
        });
        let gen = p.current.fetch_add(1, Ordering::SeqCst) + 1;
        p.notify.notify_waiters();
        // A stopping daemon answers every poll at once.
        let gen = if self.closing.load(Ordering::SeqCst) {
            gen.wrapping_add(1)
        } else {
            gen
        };
        self.polls_waiting.fetch_add(1, Ordering::SeqCst);
        cdm_api::control_backend::PollWait {
            notify: p.notify.clone(),
            gen,
            current: p.current.clone(),
            waiting: self.polls_waiting.clone(),
        }
    }

    /// Agents' long polls pending now.
    pub fn polls_waiting(&self) -> u64 {
        self.polls_waiting.load(Ordering::SeqCst)
    }

    /// Wakes `host`'s pending long poll, if any.
    fn wake_host(&self, host: &str) {
        if let Some(p) = lock(&self.polls).get(host) {
            p.notify.notify_waiters();
        }
    }

    /// `--max-jobs` and `--max-jobs-per-host`.
    pub fn set_limits(&self, max_jobs: usize, host_jobs: usize) {
        self.max_jobs.store(max_jobs.max(1), Ordering::Relaxed);
        self.host_jobs.store(host_jobs.max(1), Ordering::Relaxed);
    }

    /// `--job-stall-seconds` and `--cancel-grace-seconds`.
    pub fn set_timeouts(&self, stall_secs: u64, cancel_grace_secs: u64) {
        self.stall_secs.store(stall_secs.max(1), Ordering::Relaxed);
        self.cancel_grace_secs
            .store(cancel_grace_secs.max(1), Ordering::Relaxed);
    }

    /// `--heartbeat-seconds`: the interval agents are told to beat at.
    pub fn set_heartbeat(&self, secs: u64) {
        self.heartbeat_secs
            .store(secs.clamp(1, 3600), Ordering::Relaxed);
    }

    fn heartbeat_secs(&self) -> u64 {
        self.heartbeat_secs.load(Ordering::Relaxed)
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Whether host `name` was heard from within three heartbeats.
    fn online(&self, name: &str, now: u64) -> bool {
        let every = self.heartbeat_secs();
        lock(&self.seen)
            .get(name)
            .is_some_and(|t| now.saturating_sub(*t) <= 3 * every)
    }

    fn touch(&self, name: &str) {
        let now = self.now();
        let mut seen = lock(&self.seen);
        let t = seen.entry(name.to_string()).or_insert(now);
        *t = (*t).max(now);
    }

    fn apps(&self) -> ApiResult<Vec<AppRec>> {
        self.state
            .scan(APPS, 0, usize::MAX, false, |_: &AppRec| true)
            .map_err(st)
    }

    /// Every application's scheduler state, by id.
    fn app_states(&self) -> ApiResult<HashMap<u64, AppState>> {
        let v: Vec<AppState> = self
            .state
            .scan(APP_STATE, 0, usize::MAX, false, |_: &AppState| true)
            .map_err(st)?;
        Ok(v.into_iter().map(|s| (s.app, s)).collect())
    }

    fn app_state(&self, id: u64) -> ApiResult<AppState> {
        let s: Option<AppState> = self.state.get(APP_STATE, id).map_err(st)?;
        Ok(s.unwrap_or(AppState {
            app: id,
            ..AppState::default()
        }))
    }

    fn app_rec(&self, id: u64) -> ApiResult<AppRec> {
        self.state
            .get(APPS, id)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("application {id} not found")))
    }

    fn policy_rec(&self, name: &str) -> ApiResult<Option<ProtectionPolicy>> {
        self.state.get(crate::state::PROTECTION, name).map_err(st)
    }

    /// Emits `job.STATE` (or `job.created`) for an agent job.
    fn job_event(&self, kind: &str, j: &Job, actor: &str) {
        self.events.emit(
            kind,
            &format!("job {}", j.id),
            actor,
            json!({"id": j.id, "kind": j.kind, "application": j.application, "host": j.host, "message": j.message}),
        );
    }

    /// The retention of every application volume whose policy keeps a
    /// number or an age of points (applied with the volumes' own).
    pub fn retention_by_volume(&self) -> ApiResult<HashMap<String, cdm_api::types::Retention>> {
        let policies = self.policy_map()?;
        let vm_volumes: Vec<String> = self
            .pool
            .list_volumes()
            .map_err(crate::appliance::engine)?
            .into_iter()
            .map(|v| v.name)
            .collect();
        let mut out = HashMap::new();
        for a in self.apps()? {
            let Some(p) = a.policy.as_ref().and_then(|p| policies.get(p)) else {
                continue;
            };
            if p.keep_last.is_none() && p.keep_days.is_none() {
                continue;
            }
            let r = cdm_api::types::Retention {
                keep_last: p.keep_last,
                keep_days: p.keep_days,
                min_keep: p.min_keep.unwrap_or(1).max(1),
            };
            // A vm application keeps each of its VMs' disks to the policy.
            if a.kind == "vm" {
                for v in vm_volumes.iter().filter(|v| a.owns_volume(v)) {
                    out.insert(v.clone(), r.clone());
                }
            }
            out.insert(a.volume, r);
        }
        Ok(out)
    }

    /// The scheduler's tick: fails the jobs of vanished hosts, queues due
    /// policy backups, evaluates every application's RPO.
    pub fn tick(&self) {
        // Retries whose backoff ended on the appliance clock are no event.
        self.wake_ready_locked(&lock(&self.active));
        if let Err(e) = self.fail_vanished() {
            tracing::error!(error = %e.message, "cannot check the hosts of running jobs");
        }
        if let Err(e) = self.fail_silent() {
            tracing::error!(error = %e.message, "cannot check silent jobs");
        }
        if let Err(e) = self.run_policies() {
            tracing::error!(error = %e.message, "cannot queue policy backups");
        }
        if let Err(e) = self.evaluate_rpo(None) {
            tracing::error!(error = %e.message, "cannot evaluate RPOs");
        }
        if !self.drills_swept.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.sweep_drill_clones() {
                tracing::error!(error = %e.message, "cannot look for drill clones left behind");
            }
        }
        if let Err(e) = self.run_drills() {
            tracing::error!(error = %e.message, "cannot queue policy drills");
        }
    }
}

pub(crate) fn brief(j: &Job) -> JobBrief {
    JobBrief {
        id: j.id,
        state: j.state.clone(),
        message: j.message.clone(),
    }
}

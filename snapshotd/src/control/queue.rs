//! The queue of agent jobs (`backup`, `restore`): creation (one backup at
//! a time per application), dispatch to the host's agent when it pulls
//! (oldest first, within the per-host and appliance limits), progress and
//! logs, finish (idempotent), cancel, the failures of vanished hosts and
//! restarted agents, and retries with backoff on the appliance clock.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use cdm_api::auth::Caller;
use cdm_api::control::*;
use cdm_api::types::Job;
use cdm_api::{ApiError, ApiResult};
use serde_json::{json, Value};

use super::{brief, lock, AppRec, Control, HostRec, OFFLINE_QUEUED_SECS};
use crate::appliance::st;
use crate::state::{Sync, HOSTS, JOBS};

/// A job's log keeps its first `LOG_HEAD` lines and its last `LOG_TAIL`,
/// each of at most `LINE_MAX` bytes: at most 8 MiB per job, whatever the
/// agent sends (the lines between are dropped, and the log says so).
pub const LOG_HEAD: u64 = 1000;
pub const LOG_TAIL: u64 = 1000;
const LINE_MAX: usize = 4096;

/// Backoff before retry number `attempt` (the failed one's attempt).
pub fn backoff(attempt: u32) -> u64 {
    60u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
}

fn clip(mut s: String) -> String {
    if s.len() > LINE_MAX {
        let mut cut = LINE_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

type Active = BTreeMap<u64, Job>;

impl Control {
    /// Stores a new queued agent job; `params` gets the job's id.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn queue_locked(
        &self,
        active: &mut Active,
        kind: &str,
        app: &AppRec,
        host: &str,
        attempt: u32,
        not_before: Option<u64>,
        by: &str,
        sync: Sync,
        params: impl FnOnce(u64) -> Value,
    ) -> ApiResult<Job> {
        let now = self.now();
        let j = self
            .state
            .append(JOBS, sync, |id| Job {
                id,
                kind: kind.to_string(),
                state: "queued".into(),
                message: "queued".into(),
                created_by: by.to_string(),
                created_unix: now,
                application: Some(app.id),
                host: Some(host.to_string()),
                attempt,
                params: Some(params(id)),
                not_before_unix: not_before,
                ..Job::default()
            })
            .map_err(st)?;
        active.insert(j.id, j.clone());
        self.job_event("job.created", &j, by);
        self.wake_host(host);
        Ok(j)
    }

    pub(super) fn backup_busy(active: &Active, app: u64) -> bool {
        active
            .values()
            .any(|j| j.kind == "backup" && j.application == Some(app))
    }

    /// Queues a backup of `app` unless one is queued or running (409 `busy`).
    /// `sync`: `Lazy` when the caller syncs once after many (the tick).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn queue_backup(
        &self,
        active: &mut Active,
        app: &AppRec,
        attempt: u32,
        not_before: Option<u64>,
        scheduled: bool,
        by: &str,
        sync: Sync,
    ) -> ApiResult<Job> {
        if Self::backup_busy(active, app.id) {
            return Err(ApiError::new(
                409,
                "busy",
                format!(
                    "a backup of application {} is already queued or running",
                    app.id
                ),
            ));
        }
        let h: Option<HostRec> = self.state.get(HOSTS, app.host.as_str()).map_err(st)?;
        if h.is_none_or(|h| h.retired) {
            return Err(ApiError::conflict(format!(
                "host {} of application {} is not enrolled",
                app.host, app.id
            )));
        }
        let label = format!("backup-{}", crate::clock::stamp(self.now()));
        let (app_id, policy) = (app.id, app.policy.clone());
        self.queue_locked(
            active,
            "backup",
            app,
            &app.host,
            attempt,
            not_before,
            by,
            sync,
            |id| {
                json!({"label": label, "scheduled": scheduled,
                   "metadata": {"application": app_id, "job": id, "policy": policy}})
            },
        )
    }

    pub fn start_backup(&self, c: &Caller, id: u64) -> ApiResult<Job> {
        let app = self.app_rec(id)?;
        let mut active = lock(&self.active);
        self.queue_backup(&mut active, &app, 1, None, false, &c.user, Sync::Now)
    }

    pub fn start_restore(&self, c: &Caller, id: u64, req: RestoreCreate) -> ApiResult<Job> {
        if !["instant", "clone", "regular"].contains(&req.kind.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown restore kind {:?}: use instant, clone or regular",
                req.kind
            )));
        }
        if req.kind == "regular" && req.target.is_none() {
            return Err(ApiError::bad_request(
                "a regular restore needs \"target\" (a directory on the host)",
            ));
        }
        let app = self.app_rec(id)?;
        let points = self.points(id)?;
        let pitr = req.pitr_target(&app.kind).map_err(ApiError::bad_request)?;
        if let Some((key, value)) = &pitr {
            return self.start_pitr_restore(c, &app, &points, &req, key, value);
        }
        let snap = match req.snapshot {
            Some(s) => points
                .iter()
                .find(|p| p.snapshot == s)
                .ok_or_else(|| ApiError::not_found(format!("application {id} has no point {s}")))?,
            None => points
                .first()
                .ok_or_else(|| ApiError::conflict(format!("application {id} has no point yet")))?,
        };
        let host = self.restore_host(&app, &req)?;
        let (vol, sid, name) = (snap.volume.clone(), snap.snapshot, req.name.clone());
        let (kind, port, target) = (req.kind.clone(), req.port, req.target.clone());
        // The clone's name is fixed here (the agent's default otherwise):
        // the restoring host's grant names exactly that clone.
        let clone_named = kind != "regular";
        let params = move |id: u64| {
            let name = name.or_else(|| clone_named.then(|| format!("{vol}-{sid}-job{id}")));
            json!({"kind": kind, "volume": vol, "snapshot": sid, "name": name, "port": port, "target": target})
        };
        let mut active = lock(&self.active);
        self.queue_locked(
            &mut active,
            "restore",
            &app,
            &host,
            1,
            None,
            &c.user,
            Sync::Now,
            params,
        )
    }

    /// The enrolled host a restore runs on (default: the application's).
    fn restore_host(&self, app: &AppRec, req: &RestoreCreate) -> ApiResult<String> {
        let host = req.host.clone().unwrap_or_else(|| app.host.clone());
        let h: Option<HostRec> = self.state.get(HOSTS, host.as_str()).map_err(st)?;
        if h.is_none_or(|h| h.retired) {
            return Err(ApiError::not_found(format!("host {host} is not enrolled")));
        }
        Ok(host)
    }

    /// A restore to a point in time: the agent picks the point against the
    /// archive it reads; what the appliance knows (a time before the first
    /// point) is refused here, with where the range starts.
    fn start_pitr_restore(
        &self,
        c: &Caller,
        app: &AppRec,
        points: &[Point],
        req: &RestoreCreate,
        key: &str,
        value: &str,
    ) -> ApiResult<Job> {
        let first = points.iter().min_by_key(|p| p.snapshot).ok_or_else(|| {
            ApiError::conflict(format!("application {} has no point yet", app.id))
        })?;
        if key == "target_time" {
            let t = cdm_api::instant::parse_rfc3339(value).unwrap_or(i64::MIN);
            if t < first.created_unix as i64 * 1_000_000 {
                return Err(ApiError::bad_request(format!(
                    "target_time {value} is before the first point ({}, snapshot {}): point-in-time restores of this application start there",
                    first.created, first.snapshot
                )));
            }
        }
        // Any enrolled host: while the job runs it may read the points and
        // the log volume, snapshot and clone that (Appliance::pitr_granted).
        let host = self.restore_host(app, req)?;
        let (vol, name, kind, port) = (
            first.volume.clone(),
            req.name.clone(),
            req.kind.clone(),
            req.port,
        );
        let key = key.to_string();
        let value = value.to_string();
        // The clone's name is fixed here (the agent's default otherwise):
        // the restoring host's grants name exactly that clone.
        let params = move |id: u64| {
            let name = name.unwrap_or_else(|| format!("{vol}-pitr-job{id}"));
            json!({"kind": kind, "volume": vol, key: value, "name": name, "port": port})
        };
        let mut active = lock(&self.active);
        self.queue_locked(
            &mut active,
            "restore",
            app,
            &host,
            1,
            None,
            &c.user,
            Sync::Now,
            params,
        )
    }

    /// Hands out this host's queued jobs that may start now, oldest first,
    /// within the limits; marks them running.
    fn dispatch_locked(
        &self,
        active: &mut Active,
        host: &str,
        want: Option<usize>,
    ) -> ApiResult<Vec<AgentJob>> {
        let now = self.now();
        let running = |h: Option<&str>| {
            active
                .values()
                .filter(|j| j.state == "running" && (h.is_none() || j.host.as_deref() == h))
                .count()
        };
        let total = self.max_jobs.load(Ordering::Relaxed);
        let per_host = self.host_jobs.load(Ordering::Relaxed);
        let slots = total
            .saturating_sub(running(None))
            .min(per_host.saturating_sub(running(Some(host))))
            .min(want.unwrap_or(usize::MAX));
        let ids: Vec<u64> = active
            .values()
            .filter(|j| {
                j.state == "queued"
                    && j.host.as_deref() == Some(host)
                    && j.not_before_unix.is_none_or(|t| t <= now)
            })
            .map(|j| j.id)
            .take(slots)
            .collect();
        let mut out = Vec::new();
        for id in ids {
            let Some(app) = active
                .get(&id)
                .and_then(|j| j.application)
                .map(|a| self.state.get::<_, AppRec>(crate::state::APPS, a))
                .transpose()
                .map_err(st)?
                .flatten()
            else {
                self.end_locked(
                    active,
                    id,
                    "failed",
                    "the application was deleted",
                    None,
                    "appliance",
                    false,
                )?;
                continue;
            };
            let policy = match &app.policy {
                Some(p) => self.policy_rec(p)?,
                None => None,
            };
            let Some(j) = active.get_mut(&id) else {
                continue;
            };
            j.state = "running".into();
            j.message = "running".into();
            j.started_unix = Some(now);
            self.state.put(JOBS, id, &*j, Sync::Now).map_err(st)?;
            let j = j.clone();
            lock(&self.reported).insert(id, std::time::Instant::now());
            tracing::info!(job = id, kind = %j.kind, host, "agent job handed out");
            out.push(AgentJob {
                id,
                kind: j.kind.clone(),
                attempt: j.attempt,
                application: self.public_app(app.clone(), now)?,
                params: j.params.clone().unwrap_or(Value::Null),
                volume_settings: policy
                    .as_ref()
                    .map(|p| p.volume.clone())
                    .unwrap_or_default(),
                bandwidth_mibps: policy.as_ref().and_then(|p| p.bandwidth_mibps),
                bandwidth_windows: policy.map(|p| p.bandwidth_windows).unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Begins the caller's long poll (its previous one ends).
    pub fn poll(&self, c: &Caller) -> ApiResult<cdm_api::control_backend::PollWait> {
        let host = Self::caller_host(c)?;
        self.touch(host);
        Ok(self.poll_begin(host))
    }

    /// This host's jobs that may start now, at most `slots` (the agent's
    /// free ones), handed out as running. The long poll around it is the
    /// route's, awaiting [`Control::poll_begin`]'s notification.
    pub fn pull(&self, c: &Caller, slots: Option<usize>) -> ApiResult<Vec<AgentJob>> {
        let host = Self::caller_host(c)?.to_string();
        self.touch(&host);
        let mut active = lock(&self.active);
        let h: Option<HostRec> = self.state.get(HOSTS, host.as_str()).map_err(st)?;
        if h.is_none_or(|h| h.retired) {
            return Err(ApiError::unauthorized(format!("host {host} was retired")));
        }
        if self.closing.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        self.dispatch_locked(&mut active, &host, slots)
    }

    /// Wakes the polls of hosts with a queued job that may start now (a
    /// backoff ended on the appliance clock, a slot of the appliance freed).
    pub(super) fn wake_ready_locked(&self, active: &Active) {
        let now = self.now();
        let hosts: std::collections::BTreeSet<&str> = active
            .values()
            .filter(|j| j.state == "queued" && j.not_before_unix.is_none_or(|t| t <= now))
            .filter_map(|j| j.host.as_deref())
            .collect();
        for h in hosts {
            self.wake_host(h);
        }
    }

    /// This host's job `id`, as the agent protocol looks it up: 404 if it
    /// is not the host's, 409 if it is no longer running.
    fn own_job(&self, active: &Active, host: &str, id: u64) -> ApiResult<Job> {
        if let Some(j) = active.get(&id).filter(|j| j.host.as_deref() == Some(host)) {
            return Ok(j.clone());
        }
        let j: Option<Job> = self.state.get(JOBS, id).map_err(st)?;
        match j {
            Some(j) if j.host.as_deref() == Some(host) => Ok(j),
            _ => Err(ApiError::not_found(format!(
                "job {id} is not a job of host {host}"
            ))),
        }
    }

    fn append_log(&self, id: u64, lines: Vec<String>, sync: Sync) -> ApiResult<()> {
        let now = self.now();
        let lines: Vec<LogLine> = lines
            .into_iter()
            .map(|l| LogLine {
                time_unix: now,
                line: clip(l),
            })
            .collect();
        self.state
            .append_lines(id, &lines, LOG_HEAD, LOG_TAIL, sync)
            .map_err(st)?;
        Ok(())
    }

    pub fn progress(&self, c: &Caller, id: u64, req: AgentProgress) -> ApiResult<ProgressReply> {
        let host = Self::caller_host(c)?.to_string();
        let mut active = lock(&self.active);
        let j = self.own_job(&active, &host, id)?;
        if j.state != "running" {
            return Err(ApiError::conflict(format!(
                "job {id} is {}: {}",
                j.state, j.message
            )));
        }
        self.append_log(id, req.log, Sync::Lazy)?;
        lock(&self.reported).insert(id, std::time::Instant::now());
        let Some(j) = active.get_mut(&id) else {
            return Err(ApiError::conflict(format!("job {id} is no longer running")));
        };
        j.done = req.done;
        j.total = req.total;
        j.progress = if req.total == 0 {
            0.0
        } else {
            (req.done as f64 / req.total as f64).min(1.0)
        };
        self.state.put(JOBS, id, &*j, Sync::Lazy).map_err(st)?;
        Ok(ProgressReply {
            cancel: j.cancel_requested,
        })
    }

    pub fn finish(&self, c: &Caller, id: u64, req: AgentFinish) -> ApiResult<Job> {
        if !["succeeded", "failed", "cancelled"].contains(&req.state.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown state {:?}: use succeeded, failed or cancelled",
                req.state
            )));
        }
        let host = Self::caller_host(c)?.to_string();
        let mut active = lock(&self.active);
        let j = self.own_job(&active, &host, id)?;
        if j.state == "queued" {
            return Err(ApiError::conflict(format!(
                "job {id} was not handed out yet"
            )));
        }
        let message = match req.state.as_str() {
            "succeeded" => "done".to_string(),
            "cancelled" => "cancelled".to_string(),
            _ => req
                .error
                .clone()
                .unwrap_or_else(|| "the agent reported a failure".into()),
        };
        // This very finish, retried (its answer was lost): stored already.
        let again = j.state == req.state && j.message == message;
        // Else the log is kept whatever the answer: an agent's last lines
        // and its own error matter most when the appliance ended the job.
        if !again {
            let mut log = req.log;
            if j.state != "running" {
                if let Some(e) = &req.error {
                    log.push(format!("agent: {e}"));
                }
            }
            self.append_log(id, log, Sync::Lazy)?;
        }
        match j.state.as_str() {
            "running" => {}
            // The agent retries until it gets an answer: the same outcome
            // again is no error.
            s if s == req.state => return Ok(j),
            s => {
                return Err(ApiError::conflict(format!(
                    "job {id} already ended {s}: {}",
                    j.message
                )))
            }
        }
        self.end_locked(
            &mut active,
            id,
            &req.state,
            &message,
            req.result,
            &c.user,
            true,
        )
    }

    /// Ends an active job: stores it, emits its event, queues a retry of a
    /// failed scheduled backup (when `retry`), updates the application's RPO.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn end_locked(
        &self,
        active: &mut Active,
        id: u64,
        to: &str,
        message: &str,
        result: Option<Value>,
        actor: &str,
        retry: bool,
    ) -> ApiResult<Job> {
        let Some(mut j) = active.remove(&id) else {
            return Err(ApiError::conflict(format!("job {id} is not active")));
        };
        lock(&self.reported).remove(&id);
        lock(&self.cancels).remove(&id);
        j.state = to.to_string();
        j.message = message.to_string();
        j.finished_unix = Some(self.now());
        j.result = result;
        if to == "succeeded" {
            j.progress = 1.0;
            j.done = j.done.max(j.total);
        }
        // A drill's report is there by the time its job reads as ended.
        if j.kind == "drill" {
            self.drill_ended(&j);
        }
        if let Err(e) = self.state.put(JOBS, id, &j, Sync::Now) {
            // Keep it active rather than lose it: the next try stores it.
            active.insert(id, j);
            return Err(st(e));
        }
        tracing::info!(job = id, kind = %j.kind, state = to, message, "agent job ended");
        // A slot freed: a host waiting for one may start a job now.
        self.wake_ready_locked(active);
        self.job_event(&format!("job.{to}"), &j, actor);
        if let (Some(app), "backup") = (j.application, j.kind.as_str()) {
            lock(&self.last_backup).insert(app, brief(&j));
            if let Err(e) = self.keep_last_job(app, brief(&j)) {
                tracing::error!(error = %e.message, "cannot store an application's last backup");
            }
            if retry && to == "failed" {
                self.retry_locked(active, &j)?;
            }
            if let Err(e) = self.evaluate_rpo(Some(app)) {
                tracing::error!(error = %e.message, "cannot evaluate an RPO");
            }
        }
        Ok(j)
    }

    /// Queues the next attempt of a failed scheduled backup, after the
    /// backoff, while its policy allows more.
    fn retry_locked(&self, active: &mut Active, j: &Job) -> ApiResult<()> {
        let scheduled = j
            .params
            .as_ref()
            .and_then(|p| p["scheduled"].as_bool())
            .unwrap_or(false);
        let Some(app_id) = j.application.filter(|_| scheduled) else {
            return Ok(());
        };
        let Ok(app) = self.app_rec(app_id) else {
            return Ok(());
        };
        let Some(p) = app
            .policy
            .as_deref()
            .map(|p| self.policy_rec(p))
            .transpose()?
            .flatten()
        else {
            return Ok(());
        };
        if j.attempt.max(1) > p.retries {
            return Ok(());
        }
        let at = self.now() + backoff(j.attempt.max(1));
        match self.queue_backup(
            active,
            &app,
            j.attempt.max(1) + 1,
            Some(at),
            true,
            "scheduler",
            Sync::Now,
        ) {
            Ok(r) => tracing::info!(
                job = r.id,
                after = j.id,
                not_before = at,
                "backup retry queued"
            ),
            Err(e) => tracing::warn!(job = j.id, error = %e.message, "no retry queued"),
        }
        Ok(())
    }

    pub fn cancel(&self, c: &Caller, id: u64) -> ApiResult<Job> {
        let mut active = lock(&self.active);
        let state = active.get(&id).map(|j| j.state.clone());
        match state.as_deref() {
            Some("queued") => {
                let m = format!("cancelled by {}", c.user);
                self.end_locked(&mut active, id, "cancelled", &m, None, &c.user, false)
            }
            Some(_) => {
                let Some(j) = active.get_mut(&id) else {
                    return Err(ApiError::not_found(format!("job {id} not found")));
                };
                j.cancel_requested = true;
                j.message = format!("cancel asked by {}", c.user);
                self.state.put(JOBS, id, &*j, Sync::Now).map_err(st)?;
                // An agent that does not report never learns of the cancel:
                // the job ends anyway after the grace.
                lock(&self.cancels)
                    .entry(id)
                    .or_insert_with(std::time::Instant::now);
                Ok(j.clone())
            }
            None => {
                let j = self
                    .jobs
                    .get(id)
                    .map_err(st)?
                    .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
                if j.state == "running" {
                    Err(ApiError::conflict(format!(
                        "a {} job cannot be cancelled",
                        j.kind
                    )))
                } else {
                    Err(ApiError::conflict(format!(
                        "job {id} already ended {}",
                        j.state
                    )))
                }
            }
        }
    }

    /// Compares the jobs an agent says it runs with the host's running
    /// jobs. A restarted agent (`first`) runs none of the others; else a
    /// job handed out more than two heartbeats (at least 30 s) ago and missing from the
    /// list never reached the agent (its poll's answer was lost) or ended
    /// without a finish the appliance got: it fails, and is retried.
    pub(super) fn reconcile(&self, host: &str, running: &[u64], first: bool) -> ApiResult<()> {
        let now = self.now();
        // At least 30 s: with short heartbeats a job pulled but not yet
        // listed as running must not be failed and started twice.
        let grace = (2 * self.heartbeat_secs()).max(30);
        let mut active = lock(&self.active);
        let dead: Vec<u64> = active
            .values()
            .filter(|j| {
                j.state == "running"
                    && j.host.as_deref() == Some(host)
                    && !running.contains(&j.id)
                    && (first
                        || j.started_unix
                            .is_some_and(|t| now.saturating_sub(t) > grace))
            })
            .map(|j| j.id)
            .collect();
        let m = if first {
            format!("the agent on {host} restarted while the job ran")
        } else {
            format!("the agent on {host} does not run the job (it never got it, or its outcome was lost)")
        };
        for id in dead {
            self.end_locked(&mut active, id, "failed", &m, None, "appliance", true)?;
        }
        Ok(())
    }

    /// Fails running jobs with no progress call for the stall time (real
    /// time), and ends cancelled ones whose agent did not stop them within
    /// the grace.
    pub(super) fn fail_silent(&self) -> ApiResult<()> {
        let stall = std::time::Duration::from_secs(self.stall_secs.load(Ordering::Relaxed));
        let grace = std::time::Duration::from_secs(self.cancel_grace_secs.load(Ordering::Relaxed));
        let mut active = lock(&self.active);
        let mut ends = Vec::new();
        {
            let mut reported = lock(&self.reported);
            let cancels = lock(&self.cancels);
            for j in active.values().filter(|j| j.state == "running") {
                // A job loaded at start counts from then.
                let t = *reported.entry(j.id).or_insert_with(std::time::Instant::now);
                if cancels.get(&j.id).is_some_and(|c| c.elapsed() >= grace) {
                    ends.push((
                        j.id,
                        "cancelled",
                        format!(
                            "{}; the agent did not stop it within {} s",
                            j.message,
                            grace.as_secs()
                        ),
                        false,
                    ));
                } else if t.elapsed() >= stall {
                    ends.push((
                        j.id,
                        "failed",
                        format!(
                            "no progress from the agent on {} for {} s",
                            j.host.as_deref().unwrap_or("?"),
                            stall.as_secs()
                        ),
                        true,
                    ));
                }
            }
        }
        for (id, to, m, retry) in ends {
            self.end_locked(&mut active, id, to, &m, None, "appliance", retry)?;
        }
        Ok(())
    }

    /// Fails running jobs whose host went offline, and queued ones whose
    /// host has been offline longer than their policy's RPO (or an hour).
    pub(super) fn fail_vanished(&self) -> ApiResult<()> {
        let now = self.now();
        let mut active = lock(&self.active);
        let mut ends = Vec::new();
        for j in active.values() {
            let Some(h) = j.host.as_deref() else { continue };
            if self.online(h, now) {
                continue;
            }
            if j.state == "running" {
                ends.push((j.id, format!("host {h} went offline"), true));
                continue;
            }
            let since = lock(&self.seen).get(h).copied().unwrap_or(j.created_unix);
            let limit = j
                .application
                .and_then(|a| self.app_rec(a).ok())
                .and_then(|a| a.policy)
                .and_then(|p| self.policy_rec(&p).ok().flatten())
                .map_or(OFFLINE_QUEUED_SECS, |p| p.rpo_seconds);
            if now.saturating_sub(since.max(j.created_unix)) > limit {
                ends.push((j.id, format!("host {h} is offline"), false));
            }
        }
        for (id, m, retry) in ends {
            self.end_locked(&mut active, id, "failed", &m, None, "appliance", retry)?;
        }
        Ok(())
    }

    pub fn job_log(&self, id: u64) -> ApiResult<JobLog> {
        self.jobs
            .get(id)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
        let stored: Vec<(u64, LogLine)> = self.state.lines(id).map_err(st)?;
        let mut lines = Vec::with_capacity(stored.len() + 1);
        let mut expect = 0;
        for (n, l) in stored {
            if n > expect {
                lines.push(LogLine {
                    time_unix: l.time_unix,
                    line: format!("[{} lines dropped: a job log keeps its first {LOG_HEAD} and last {LOG_TAIL} lines]", n - expect),
                });
            }
            expect = n + 1;
            lines.push(l);
        }
        Ok(JobLog { lines })
    }

    pub fn list_jobs(&self, q: JobQuery) -> ApiResult<Vec<Job>> {
        self.jobs
            .list_where(200, |j| {
                q.application.is_none_or(|a| j.application == Some(a))
                    && q.host
                        .as_deref()
                        .is_none_or(|h| j.host.as_deref() == Some(h))
                    && q.kind.as_deref().is_none_or(|k| j.kind == k)
                    && q.state.as_deref().is_none_or(|s| j.state == s)
            })
            .map_err(st)
    }

    /// Running agent jobs per host and queued ones, for metrics.
    pub fn queue_counts(&self) -> (usize, usize) {
        let a = lock(&self.active);
        let running = a.values().filter(|j| j.state == "running").count();
        (running, a.len() - running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_minute() {
        assert_eq!(backoff(0), 60);
        assert_eq!(backoff(1), 60);
        assert_eq!(backoff(2), 120);
        assert_eq!(backoff(3), 240);
        assert_eq!(backoff(u32::MAX), 60 << 20);
        assert_eq!(clip("é".repeat(3000)).len(), LINE_MAX);
    }
}

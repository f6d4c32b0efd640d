//! Recovery drills (`docs/control-plane.md`, "Drills"): a drill is an
//! agent job of kind `drill` that clones a point (`drill-APP-JOB`),
//! starts the database on it in isolation, checks it and tears it down;
//! its outcome becomes a report (table `drills`, keyed by the job's id),
//! an event (`drill.passed`, `drill.failed` with `alert.raised`) and the
//! metrics. The scheduler queues the drills of the policies that ask for
//! them; the clones of drills that no longer run are deleted (after a
//! crash of the agent or of the appliance too).

use std::collections::HashMap;

use cdm_api::auth::{Caller, Role};
use cdm_api::control::ProtectionPolicy;
use cdm_api::drills::*;
use cdm_api::types::Job;
use cdm_api::{ApiError, ApiResult};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{lock, AppRec, Control, HostRec};
use crate::appliance::{engine, st};
use crate::state::{Sync, DRILLS, DRILL_DUE, HOSTS, JOBS};

/// Kinds of applications whose drills an agent runs.
const AGENT_KINDS: [&str; 2] = ["postgresql", "mariadb"];
/// Kinds the appliance drills itself (a clone of the point read in place).
pub const LOCAL_KINDS: [&str; 3] = ["files", "block", "vm"];

/// What one drill does, decided when it is asked for.
#[derive(Clone, Debug)]
pub struct DrillPlan {
    pub volume: String,
    pub snapshot: u64,
    /// When the point was made (Unix seconds).
    pub created: u64,
    pub host: String,
    pub probes: Vec<DrillProbe>,
    pub timeout: u64,
    pub rto_target: Option<u64>,
    pub rpo_target: Option<u64>,
    pub started_unix: u64,
}

/// When an application's next scheduled drill is due.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
struct DrillDue {
    next_unix: u64,
    /// The interval it was computed with: a changed policy starts over.
    interval: u64,
}

/// The user drills started by the scheduler and cleanups act as.
fn scheduler() -> Caller {
    Caller {
        user: "scheduler".into(),
        role: Role::Admin,
        grants: Vec::new(),
        token_id: String::new(),
        token_name: String::new(),
    }
}

/// The clone a drill makes.
pub fn clone_name(app: u64, job: u64) -> String {
    format!("{CLONE_PREFIX}{app}-{job}")
}

/// The job id of a drill clone's name (`drill-APP-JOB`).
fn clone_job(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(CLONE_PREFIX)?;
    let (app, job) = rest.split_once('-')?;
    app.parse::<u64>().ok()?;
    job.parse().ok()
}

/// Whether clone `name` is the one drill job `j` made and `j` no longer
/// runs: an agent's drill names it in its params, the appliance's own
/// (local, no host) is named after its application and id.
fn drill_clone_of(j: &Job, name: &str) -> bool {
    if j.kind != "drill" || matches!(j.state.as_str(), "queued" | "running") {
        return false;
    }
    match &j.host {
        Some(_) => j.params.as_ref().and_then(|p| p["name"].as_str()) == Some(name),
        None => j.application.is_some_and(|a| clone_name(a, j.id) == name),
    }
}

/// Checks the drill fields of a protection policy.
pub fn validate(p: &ProtectionPolicy) -> ApiResult<()> {
    let bad = |m: String| Err(ApiError::bad_request(m));
    if let Some(i) = p.drill_interval_seconds {
        if !(60..=super::apps::YEAR_SECS).contains(&i) {
            return bad(format!(
                "drill_interval_seconds must be 60 to {} (a year)",
                super::apps::YEAR_SECS
            ));
        }
    }
    match &p.drill_point {
        None => {}
        Some(DrillPoint::Named(n)) if n == "latest" => {}
        Some(DrillPoint::Named(n)) => {
            return bad(format!(
                "drill_point {n:?}: use \"latest\" or {{\"random_within_days\": N}}"
            ))
        }
        Some(DrillPoint::Random { random_within_days })
            if !(1..=3660).contains(random_within_days) =>
        {
            return bad("random_within_days must be 1 to 3660".into());
        }
        Some(DrillPoint::Random { .. }) => {}
    }
    for pr in &p.drill_probes {
        pr.check().map_err(ApiError::bad_request)?;
    }
    if let Some(t) = p.drill_timeout_seconds {
        check_timeout(t)?;
    }
    if let Some(h) = &p.drill_host {
        cdm_common::names::check(h)
            .map_err(|e| ApiError::bad_request(format!("drill_host {h:?}: it {e}")))?;
    }
    Ok(())
}

impl Control {
    /// Whether snapshot `id` is a point of `app`: a snapshot of its volume,
    /// or of a clone made (through any number of clones) from one.
    fn point_of(&self, app: &AppRec, id: u64) -> ApiResult<cdmfs::SnapshotInfo> {
        let s = self.pool.snapshot(id).map_err(engine)?;
        let mut vol = s.volume.clone();
        for _ in 0..16 {
            if app.owns_volume(&vol) {
                return Ok(s);
            }
            let Some(origin) = self.pool.volume(&vol).ok().and_then(|v| v.origin) else {
                break;
            };
            vol = self.pool.snapshot(origin).map_err(engine)?.volume;
        }
        Err(ApiError::not_found(format!(
            "snapshot {id} is no point of application {}",
            app.id
        )))
    }

    /// The point a drill takes: the one asked for, else as the policy says
    /// (a random one of the last N days), else the newest.
    fn drill_point(
        &self,
        app: &AppRec,
        want: Option<u64>,
        policy: Option<&ProtectionPolicy>,
        now: u64,
    ) -> ApiResult<(String, u64, u64)> {
        if let Some(id) = want {
            let s = self.point_of(app, id)?;
            return Ok((s.volume, s.id, s.created_ns / 1_000_000_000));
        }
        let points = self.points(app.id)?;
        let newest = points.first().ok_or_else(|| {
            ApiError::conflict(format!("application {} has no point yet", app.id))
        })?;
        let pick = match policy.and_then(|p| p.drill_point.as_ref()) {
            Some(DrillPoint::Random { random_within_days }) => {
                let since = now.saturating_sub(u64::from(*random_within_days) * 86_400);
                let recent: Vec<_> = points.iter().filter(|p| p.created_unix >= since).collect();
                if recent.is_empty() {
                    newest
                } else {
                    recent[rand::random::<usize>() % recent.len()]
                }
            }
            _ => newest,
        };
        Ok((pick.volume.clone(), pick.snapshot, pick.created_unix))
    }

    /// What a drill of application `id` does: its point, host, probes,
    /// time limit and targets (the request's, else the policy's).
    pub fn plan_drill(&self, id: u64, req: &DrillCreate) -> ApiResult<(AppRec, DrillPlan)> {
        let app = self.app_rec(id)?;
        let policy = match &app.policy {
            Some(p) => self.policy_rec(p)?,
            None => None,
        };
        let now = self.now();
        let (volume, snapshot, created) =
            self.drill_point(&app, req.snapshot, policy.as_ref(), now)?;
        let host = policy
            .as_ref()
            .and_then(|p| p.drill_host.clone())
            .unwrap_or_else(|| app.host.clone());
        let probes = req
            .probes
            .clone()
            .or_else(|| policy.as_ref().map(|p| p.drill_probes.clone()))
            .unwrap_or_default();
        probes_fit(&app.kind, &probes)?;
        let timeout = req
            .timeout_seconds
            .or_else(|| policy.as_ref().and_then(|p| p.drill_timeout_seconds))
            .unwrap_or(DEFAULT_TIMEOUT_SECS);
        let (rto_target, rpo_target) = policy
            .as_ref()
            .map(|p| (p.drill_rto_seconds, p.drill_rpo_seconds))
            .unwrap_or_default();
        Ok((
            app,
            DrillPlan {
                volume,
                snapshot,
                created,
                host,
                probes,
                timeout,
                rto_target,
                rpo_target,
                started_unix: now,
            },
        ))
    }

    /// Queues a drill of application `id` (a `drill` agent job).
    pub fn start_drill(&self, c: &Caller, id: u64, req: DrillCreate) -> ApiResult<Job> {
        let (app, plan) = self.plan_drill(id, &req)?;
        if !AGENT_KINDS.contains(&app.kind.as_str()) {
            return Err(ApiError::conflict(format!(
                "application {id} is of kind {}: an agent drills postgresql and mariadb applications",
                app.kind
            )));
        }
        let host = plan.host.clone();
        let h: Option<HostRec> = self.state.get(HOSTS, host.as_str()).map_err(st)?;
        if h.is_none_or(|h| h.retired) {
            return Err(ApiError::conflict(format!("host {host} is not enrolled")));
        }
        let scheduled = c.user == "scheduler";
        let app_id = app.id;
        let now = plan.started_unix;
        let mut active = lock(&self.active);
        self.queue_locked(
            &mut active,
            "drill",
            &app,
            &host,
            1,
            None,
            &c.user,
            Sync::Now,
            |job| {
                json!({"volume": plan.volume, "snapshot": plan.snapshot, "name": clone_name(app_id, job),
                   "probes": plan.probes, "timeout_seconds": plan.timeout,
                   "point_created_unix": plan.created,
                   "rpo_seconds": now.saturating_sub(plan.created), "rto_target": plan.rto_target,
                   "rpo_target": plan.rpo_target, "scheduled": scheduled, "started_unix": now})
            },
        )
    }

    /// Makes the report of drill job `j`, which just ended: stores it,
    /// announces it, and deletes the drill's clone if the agent left it.
    pub(super) fn drill_ended(&self, j: &Job) {
        let d = report(j);
        let name = clone_name(d.application, d.job);
        self.record_drill(&d);
        if self.pool.volume(&name).is_ok() {
            self.remove_clone_later(name);
        }
    }

    /// Stores a drill's report and announces it: `drill.passed`, or
    /// `drill.failed` and an `alert.raised` of kind `drill_failed`.
    pub fn record_drill(&self, d: &Drill) {
        if let Err(e) = self.state.put(DRILLS, d.id, d, Sync::Now) {
            tracing::error!(drill = d.id, error = %e, "cannot store a drill's report");
        }
        let data = json!({"id": d.id, "application": d.application, "job": d.job,
            "volume": d.volume, "snapshot": d.snapshot, "host": d.host, "passed": d.passed,
            "rto_seconds": d.rto_seconds, "rpo_seconds": d.rpo_seconds, "message": d.message});
        let subject = format!("application {}", d.application);
        if d.passed {
            self.events
                .emit("drill.passed", &subject, "scheduler", data);
        } else {
            self.events
                .emit("drill.failed", &subject, "scheduler", data.clone());
            let mut alert = data;
            alert["kind"] = json!("drill_failed");
            alert["reason"] = json!("drill_failed");
            alert["drill"] = json!(d.id);
            self.events
                .emit("alert.raised", &subject, "scheduler", alert);
        }
        tracing::info!(drill = d.id, application = d.application, passed = d.passed, message = %d.message, "drill ended");
    }

    /// Deletes a drill clone in a thread of its own (not under the queue's
    /// lock): the agent that made it is gone or failed to.
    fn remove_clone_later(&self, name: String) {
        let Some(f) = self.clone_remover.get().cloned() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("drill-cleanup".into())
            .spawn(move || match f(&name) {
                Ok(()) => tracing::info!(clone = %name, "drill clone deleted"),
                Err(e) => {
                    tracing::warn!(clone = %name, error = %e.message, "cannot delete a drill clone")
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a drill cleanup");
        }
    }

    /// Deletes the clones of drills that are not queued or running (a
    /// crash of the agent or of the appliance left them). Only clones
    /// named after a drill job of this appliance are touched.
    pub fn sweep_drill_clones(&self) -> ApiResult<()> {
        let vols = self.pool.list_volumes().map_err(engine)?;
        for v in vols.iter().filter(|v| v.origin.is_some()) {
            let Some(job) = clone_job(&v.name) else {
                continue;
            };
            if lock(&self.active).contains_key(&job) {
                continue;
            }
            let j: Option<Job> = self.state.get(JOBS, job).map_err(st)?;
            if j.is_some_and(|j| drill_clone_of(&j, &v.name)) {
                self.remove_clone_later(v.name.clone());
            }
        }
        self.report_interrupted_drills()
    }

    /// Reports the appliance's own drills that a stop of the daemon
    /// interrupted (their jobs were marked failed at the start, with no
    /// report): a failed drill, its alert, the metric up to date.
    fn report_interrupted_drills(&self) -> ApiResult<()> {
        let lost: Vec<Job> = self
            .state
            .scan(JOBS, 0, usize::MAX, false, |j: &Job| {
                j.kind == "drill" && j.host.is_none() && j.state == "failed"
            })
            .map_err(st)?;
        for j in lost.into_iter().filter(|j| j.application.is_some()) {
            let have: Option<Drill> = self.state.get(DRILLS, j.id).map_err(st)?;
            if have.is_none() {
                let mut d = report(&j);
                d.host = "appliance".into();
                self.record_drill(&d);
            }
        }
        Ok(())
    }

    /// Whether a drill of application `app` is queued or running: an
    /// agent's in the queue, the appliance's own (local jobs, not in the
    /// queue) by its record (looked up only when a drill is due).
    fn drill_running(&self, app: u64) -> ApiResult<bool> {
        let queued = lock(&self.active)
            .values()
            .any(|j| j.kind == "drill" && j.application == Some(app));
        if queued {
            return Ok(true);
        }
        let local: Vec<Job> = self
            .state
            .scan(JOBS, 0, 1, true, |j: &Job| {
                j.kind == "drill"
                    && j.host.is_none()
                    && j.application == Some(app)
                    && j.state == "running"
            })
            .map_err(st)?;
        Ok(!local.is_empty())
    }

    /// Queues the drills the policies say are due (the scheduler's tick).
    pub(super) fn run_drills(&self) -> ApiResult<()> {
        let policies = self.policy_map()?;
        let now = self.now();
        for a in self.apps()? {
            let interval = a
                .policy
                .as_ref()
                .and_then(|p| policies.get(p))
                .and_then(|p| p.drill_interval_seconds);
            let due: Option<DrillDue> = self.state.get(DRILL_DUE, a.id).map_err(st)?;
            let drilled = |k: &str| AGENT_KINDS.contains(&k) || LOCAL_KINDS.contains(&k);
            let Some(interval) = interval.filter(|_| drilled(a.kind.as_str())) else {
                if due.is_some() {
                    self.state.remove(DRILL_DUE, a.id).map_err(st)?;
                }
                continue;
            };
            let due = match due.filter(|d| d.interval == interval) {
                Some(d) => d,
                None => {
                    // The first drill one interval after the policy was
                    // assigned (or its drill schedule changed).
                    let since = a
                        .policy_since_unix
                        .unwrap_or(now)
                        .max(now.saturating_sub(interval));
                    let d = DrillDue {
                        next_unix: since + interval,
                        interval,
                    };
                    self.state.put(DRILL_DUE, a.id, &d, Sync::Now).map_err(st)?;
                    d
                }
            };
            if now < due.next_unix {
                continue;
            }
            if !self.drill_running(a.id)? {
                let started = match self.drill_starter.get() {
                    Some(f) => f(&scheduler(), a.id, DrillCreate::default()),
                    None => self.start_drill(&scheduler(), a.id, DrillCreate::default()),
                };
                match started {
                    Ok(j) => {
                        tracing::info!(job = j.id, application = a.id, "scheduled drill queued")
                    }
                    Err(e) => {
                        tracing::warn!(application = a.id, error = %e.message, "scheduled drill not queued")
                    }
                }
            }
            // Missed slots are skipped.
            let mut next = due.next_unix;
            while next <= now {
                next += interval;
            }
            let d = DrillDue {
                next_unix: next,
                interval,
            };
            self.state.put(DRILL_DUE, a.id, &d, Sync::Now).map_err(st)?;
        }
        Ok(())
    }

    /// Reports, newest first.
    pub fn drills(&self, application: Option<u64>) -> ApiResult<Vec<Drill>> {
        let mut v: Vec<Drill> = self
            .state
            .scan(DRILLS, 0, 10_000, true, |d: &Drill| {
                application.is_none_or(|a| d.application == a)
            })
            .map_err(st)?;
        v.reverse();
        Ok(v)
    }

    pub fn drill(&self, id: u64) -> ApiResult<Drill> {
        self.state
            .get(DRILLS, id)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("drill {id} not found")))
    }

    /// The last drill of each application: passed, RTO (for the metrics).
    pub fn last_drills(&self) -> ApiResult<HashMap<u64, (bool, Option<f64>)>> {
        let all: Vec<Drill> = self
            .state
            .scan(DRILLS, 0, usize::MAX, false, |_: &Drill| true)
            .map_err(st)?;
        Ok(all
            .into_iter()
            .map(|d| (d.application, (d.passed, d.rto_seconds)))
            .collect())
    }
}

/// Refuses probes the application's drill cannot run (a skipped probe
/// would pass silently): SQL for a database, `path` for the rest.
fn probes_fit(kind: &str, probes: &[DrillProbe]) -> ApiResult<()> {
    let sql = AGENT_KINDS.contains(&kind);
    match probes.iter().find(|p| p.sql.is_some() != sql) {
        Some(p) => Err(ApiError::bad_request(format!(
            "application of kind {kind} is drilled with {} probes, not {}",
            if sql { "\"sql\"" } else { "\"path\"" },
            serde_json::to_string(p).unwrap_or_default()
        ))),
        None => Ok(()),
    }
}

fn num(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

/// The targets' checks, when the policy has targets.
pub fn add_targets(
    checks: &mut Vec<DrillCheck>,
    rto: Option<f64>,
    rpo: Option<u64>,
    rto_target: Option<u64>,
    rpo_target: Option<u64>,
) {
    if let (Some(t), Some(rto)) = (rto_target, rto) {
        checks.push(DrillCheck {
            name: "rto_target".into(),
            passed: rto <= t as f64,
            output: format!("RTO {rto:.3} s, target {t} s"),
            seconds: 0.0,
        });
    }
    if let (Some(t), Some(rpo)) = (rpo_target, rpo) {
        checks.push(DrillCheck {
            name: "rpo_target".into(),
            passed: rpo <= t,
            output: format!("RPO {rpo} s, target {t} s"),
            seconds: 0.0,
        });
    }
}

/// The report's one-line message from its checks.
pub fn verdict(checks: &[DrillCheck]) -> String {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    if checks.is_empty() {
        "no check ran".into()
    } else if failed.is_empty() {
        "every check passed".into()
    } else {
        format!("failed: {}", failed.join(", "))
    }
}

/// The report of an ended drill job: the agent's checks (its result), the
/// targets compared, and why it failed.
pub fn report(j: &Job) -> Drill {
    let p = j.params.clone().unwrap_or(Value::Null);
    let r = j.result.clone().unwrap_or(Value::Null);
    let mut checks: Vec<DrillCheck> = r
        .get("checks")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let rto = r.get("rto_seconds").and_then(Value::as_f64);
    let rpo = num(&p, "rpo_seconds");
    let (rto_target, rpo_target) = (num(&p, "rto_target"), num(&p, "rpo_target"));
    add_targets(&mut checks, rto, rpo, rto_target, rpo_target);
    let agent_passed = r.get("passed").and_then(Value::as_bool).unwrap_or(false);
    let ran = j.state == "succeeded";
    let passed = ran && agent_passed && checks.iter().all(|c| c.passed);
    let message = if !ran {
        format!("the drill job {}: {}", j.state, j.message)
    } else if let Some(e) = r.get("error").and_then(Value::as_str) {
        e.to_string()
    } else {
        verdict(&checks)
    };
    Drill {
        id: j.id,
        application: j.application.unwrap_or(0),
        volume: p["volume"].as_str().unwrap_or("").to_string(),
        snapshot: num(&p, "snapshot").unwrap_or(0),
        job: j.id,
        host: j.host.clone().unwrap_or_default(),
        started_unix: j.started_unix.unwrap_or(j.created_unix),
        finished_unix: j.finished_unix,
        passed,
        rto_seconds: rto,
        rpo_seconds: rpo,
        rto_target,
        rpo_target,
        checks,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, result: Value) -> Job {
        Job {
            id: 7,
            kind: "drill".into(),
            state: state.into(),
            message: if state == "succeeded" {
                "done"
            } else {
                "host db1 went offline"
            }
            .into(),
            application: Some(3),
            host: Some("db1".into()),
            params: Some(json!({"volume": "v", "snapshot": 2, "rpo_seconds": 50,
                "rto_target": 5, "rpo_target": 40})),
            result: Some(result),
            ..Job::default()
        }
    }

    #[test]
    fn probes_must_fit_the_kind() {
        let sql = DrillProbe {
            sql: Some("select 1".into()),
            expect: Some("1".into()),
            ..DrillProbe::default()
        };
        let file = DrillProbe {
            path: Some("/etc/hosts".into()),
            ..DrillProbe::default()
        };
        assert!(probes_fit("postgresql", std::slice::from_ref(&sql)).is_ok());
        assert!(probes_fit("files", std::slice::from_ref(&file)).is_ok());
        assert!(probes_fit("postgresql", &[sql.clone(), file.clone()]).is_err());
        assert!(probes_fit("mariadb", std::slice::from_ref(&sql)).is_ok());
        assert!(probes_fit("mariadb", std::slice::from_ref(&file)).is_err());
        assert!(probes_fit("vm", &[sql]).is_err());
    }

    #[test]
    fn reports_compare_targets_and_say_why() {
        let ok = json!({"passed": true, "rto_seconds": 1.5,
            "checks": [{"name": "pg_amcheck", "passed": true, "output": "", "seconds": 0.4}]});
        let d = report(&job("succeeded", ok));
        assert_eq!(d.checks.len(), 3);
        assert!(d.checks.iter().any(|c| c.name == "rto_target" && c.passed));
        assert!(d.checks.iter().any(|c| c.name == "rpo_target" && !c.passed));
        assert!(!d.passed);
        assert_eq!(d.message, "failed: rpo_target");
        let d = report(&job("failed", Value::Null));
        assert!(!d.passed);
        assert!(d.message.contains("went offline"), "{}", d.message);
        assert_eq!((d.application, d.snapshot, d.rpo_seconds), (3, 2, Some(50)));
        assert_eq!(clone_job(&clone_name(3, 17)), Some(17));
        // A drill the appliance ran itself (no host, no clone name in its
        // params) owns drill-APP-JOB once it no longer runs.
        let mut local = job("failed", Value::Null);
        local.host = None;
        assert!(drill_clone_of(&local, &clone_name(3, 7)));
        assert!(!drill_clone_of(&local, &clone_name(4, 7)));
        local.state = "running".into();
        assert!(!drill_clone_of(&local, &clone_name(3, 7)));
        let mut agent = job("failed", Value::Null);
        agent.params = Some(json!({"name": clone_name(3, 7)}));
        assert!(drill_clone_of(&agent, &clone_name(3, 7)));
        assert_eq!(clone_job("drill-x-1"), None);
        assert_eq!(clone_job("prod"), None);
    }
}

//! The scheduler's part of the control plane: policy backups when due and
//! inside the policy's windows, and each application's RPO state with its
//! events (`application.late`, `.failing`, `.recovered`) on every change.

use cdm_api::control::*;
use cdm_api::cron::Cron;
use cdm_api::ApiResult;
use serde_json::json;

use std::collections::HashMap;

use super::{lock, Control};
use crate::appliance::st;
use crate::state::{Sync, APP_STATE};

/// An application's RPO state at `now`: `late` when its newest point is
/// older than the policy's RPO (or there is none and the policy was
/// assigned longer ago), else `failing` when its last finished backup
/// failed, else `ok`; `unprotected` without a policy.
pub fn rpo_status(
    policy: Option<&ProtectionPolicy>,
    newest: Option<u64>,
    since: Option<u64>,
    last_job: Option<JobBrief>,
    now: u64,
) -> RpoStatus {
    let age = newest.map(|t| now.saturating_sub(t));
    let state = match policy {
        None => "unprotected",
        Some(p) => {
            let late = match age {
                Some(a) => a > p.rpo_seconds,
                None => since.is_some_and(|s| now.saturating_sub(s) > p.rpo_seconds),
            };
            if late {
                "late"
            } else if last_job.as_ref().is_some_and(|j| j.state == "failed") {
                "failing"
            } else {
                "ok"
            }
        }
    };
    RpoStatus {
        state: state.into(),
        last_point: newest.map(rfc3339),
        last_point_unix: newest,
        age_seconds: age,
        rpo_seconds: policy.map(|p| p.rpo_seconds),
        last_job,
    }
}

/// When a policy's first backup is due, counted from its assignment: one
/// interval later, or at the next match of a cron expression, like the
/// volumes' snapshot schedules (a backup now is `POST .../backups`).
pub fn first_due(p: &ProtectionPolicy, since: u64) -> Option<u64> {
    match (&p.cron, p.interval_seconds) {
        (Some(c), _) => Cron::parse(c).ok()?.next_after(since),
        (None, Some(i)) => Some(since + i),
        (None, None) => None,
    }
}

/// The due time after the slot `due`, taken at `now`: the next interval
/// step after `now` (missed ones are skipped), or the next cron match.
pub fn next_due(p: &ProtectionPolicy, due: u64, now: u64) -> Option<u64> {
    match (&p.cron, p.interval_seconds) {
        (Some(c), _) => Cron::parse(c).ok()?.next_after(now),
        (None, Some(i)) if i > 0 => Some(due + i * (now.saturating_sub(due) / i + 1)),
        _ => None,
    }
}

impl Control {
    /// Queues the policy backups that are due and inside their windows.
    pub(super) fn run_policies(&self) -> ApiResult<()> {
        let now = self.now();
        let policies = self.policy_map()?;
        let apps = self.apps()?;
        if apps.iter().all(|a| a.policy.is_none()) {
            return Ok(());
        }
        let mut active = lock(&self.active);
        let _rpo = lock(&self.rpo);
        let mut states = self.app_states()?;
        for a in apps {
            let Some(p) = a.policy.as_ref().and_then(|p| policies.get(p)) else {
                continue;
            };
            let mut s = states.remove(&a.id).unwrap_or_default();
            s.app = a.id;
            let before = s.clone();
            let Some(due) = s
                .next_due_unix
                .or_else(|| first_due(p, a.policy_since_unix.unwrap_or(now)))
            else {
                continue;
            };
            s.next_due_unix = Some(due);
            if now >= due && in_windows(&p.windows, now) {
                if Self::backup_busy(&active, a.id) {
                    // One backup at a time: this slot is skipped.
                    tracing::info!(
                        application = a.id,
                        "policy backup due while one runs: slot skipped"
                    );
                } else if let Err(e) =
                    self.queue_backup(&mut active, &a, 1, None, true, "scheduler")
                {
                    tracing::warn!(application = a.id, error = %e.message, "policy backup not queued");
                }
                s.next_due_unix = next_due(p, due, now);
            }
            if s != before {
                self.state.put(APP_STATE, a.id, &s, Sync::Now).map_err(st)?;
            }
        }
        Ok(())
    }

    /// Evaluates the RPO of every application (or only `only`) and emits
    /// an event for each change of state.
    pub(super) fn evaluate_rpo(&self, only: Option<u64>) -> ApiResult<()> {
        let _one = lock(&self.rpo);
        let now = self.now();
        let apps = match only {
            Some(id) => match self.app_rec(id) {
                Ok(a) => vec![a],
                Err(_) => return Ok(()),
            },
            None => self.apps()?,
        };
        // No walk of the pool's catalog for nothing (each tick).
        if apps.is_empty() {
            return Ok(());
        }
        let newest = self.newest_points()?;
        let policies = self.policy_map()?;
        let mut states = match only {
            Some(id) => HashMap::from([(id, self.app_state(id)?)]),
            None => self.app_states()?,
        };
        for a in apps {
            let app = self.public_with(a, now, &newest, &policies);
            let mut s = states.remove(&app.id).unwrap_or_default();
            s.app = app.id;
            let new = app.rpo.state.clone();
            if s.rpo_state.as_deref() == Some(new.as_str()) {
                continue;
            }
            let old = s.rpo_state.replace(new.clone());
            self.state
                .put(APP_STATE, app.id, &s, Sync::Now)
                .map_err(st)?;
            let kind = match (old.as_deref(), new.as_str()) {
                (_, "late") => "application.late",
                (_, "failing") => "application.failing",
                (Some("late" | "failing"), "ok") => "application.recovered",
                _ => continue,
            };
            tracing::warn!(application = app.id, host = %app.host, state = %new, "RPO state changed");
            self.events.emit(
                kind,
                &app.id.to_string(),
                "scheduler",
                json!({"id": app.id, "host": app.host, "name": app.name, "state": new,
                       "last_point": app.rpo.last_point, "rpo_seconds": app.rpo.rpo_seconds,
                       "last_job": app.rpo.last_job}),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(interval: Option<u64>, cron: Option<&str>) -> ProtectionPolicy {
        let mut p: ProtectionPolicy =
            serde_json::from_value(json!({"name": "p", "rpo_seconds": 100})).unwrap();
        p.interval_seconds = interval;
        p.cron = cron.map(String::from);
        p
    }

    #[test]
    fn rpo_states() {
        let p = pol(Some(60), None);
        let failed = JobBrief {
            id: 1,
            state: "failed".into(),
            message: "x".into(),
        };
        let ok = JobBrief {
            state: "succeeded".into(),
            ..failed.clone()
        };
        assert_eq!(
            rpo_status(None, Some(1), None, None, 1000).state,
            "unprotected"
        );
        assert_eq!(
            rpo_status(Some(&p), Some(950), Some(0), None, 1000).state,
            "ok"
        );
        assert_eq!(
            rpo_status(Some(&p), Some(899), Some(0), None, 1000).state,
            "late"
        );
        assert_eq!(
            rpo_status(Some(&p), None, Some(950), None, 1000).state,
            "ok"
        );
        assert_eq!(
            rpo_status(Some(&p), None, Some(899), None, 1000).state,
            "late"
        );
        assert_eq!(
            rpo_status(Some(&p), Some(950), Some(0), Some(failed.clone()), 1000).state,
            "failing"
        );
        // Late wins over failing: the age is what breaks the promise.
        assert_eq!(
            rpo_status(Some(&p), Some(1), Some(0), Some(failed), 1000).state,
            "late"
        );
        let s = rpo_status(Some(&p), Some(950), Some(0), Some(ok), 1000);
        assert_eq!((s.state.as_str(), s.age_seconds), ("ok", Some(50)));
    }

    #[test]
    fn schedules() {
        let p = pol(Some(3600), None);
        assert_eq!(first_due(&p, 1000), Some(4600));
        assert_eq!(next_due(&p, 1000, 1000), Some(4600));
        // Missed slots are skipped, the phase kept.
        assert_eq!(next_due(&p, 1000, 9000), Some(11_800));
        let c = pol(None, Some("0 * * * *"));
        assert_eq!(first_due(&c, 10), Some(3600));
        assert_eq!(next_due(&c, 3600, 3600), Some(7200));
    }
}

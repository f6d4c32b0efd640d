//! When links run and how late they are: interval links when their
//! interval has passed, "after every point" links when a new point of one
//! of their volumes appears (made here by the API, a schedule or an agent,
//! or received by replication: cascades), failed runs again after a
//! growing pause; and each link's lag against its RPO (`replication.late`
//! with `alert.raised`, then `replication.recovered`). Ticked by a thread
//! of its own on the daemon's clock (the fake one in tests).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cdm_common::lock::lock;
use serde_json::json;

use super::links::LinkRec;
use super::service::Replication;

/// First pause after a failed run; doubled per failure, at most
/// [`RETRY_MAX`].
const RETRY_FIRST: u64 = 30;
const RETRY_MAX: u64 = 3600;

/// When a link that failed `failures` times in a row may run again.
pub fn retry_at(last_run: u64, failures: u32) -> u64 {
    if failures == 0 {
        return last_run;
    }
    let pause = RETRY_FIRST
        .saturating_mul(1u64 << (failures - 1).min(16))
        .min(RETRY_MAX);
    last_run.saturating_add(pause)
}

/// Whether an interval link is due at `now`: at once when new, then every
/// `interval` after its last run.
pub fn interval_due(l: &LinkRec, interval: u64, now: u64) -> bool {
    match l.last_run_unix {
        None => true,
        Some(t) => now >= t.saturating_add(interval),
    }
}

impl Replication {
    /// Ticks every `tick` until `stop`.
    pub fn start(self: &Arc<Self>, tick: Duration, stop: Arc<AtomicBool>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("replication".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    let t = std::panic::AssertUnwindSafe(|| me.tick());
                    if std::panic::catch_unwind(t).is_err() {
                        tracing::error!("the replication tick panicked; the next one runs");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the replication scheduler");
        }
    }

    /// Starts the runs that are due and checks every link's lag.
    pub fn tick(&self) {
        let links = match self.link_recs() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e.message, "cannot read the replication links");
                return;
            }
        };
        let now = self.clock.now();
        for l in &links {
            if l.enabled && self.due(l, now) {
                match self.run_link(l.id, "scheduler") {
                    Ok(j) => tracing::info!(link = l.id, job = j.id, "replication run started"),
                    // Running already: the next tick looks again.
                    Err(e) if e.code == "busy" => {}
                    Err(e) => {
                        tracing::warn!(link = l.id, error = %e.message, "replication run not started")
                    }
                }
            }
            self.check_lag(l, now);
        }
    }

    /// A point of `volume` was received (the receiver's `on_point`): its
    /// "after every point" links run now rather than at the next tick.
    pub fn point_received(&self, volume: &str) {
        let Ok(links) = self.link_recs() else {
            return;
        };
        let now = self.clock.now();
        for l in links.iter().filter(|l| l.enabled && l.interval().is_none()) {
            let ours = l.volume.as_deref() == Some(volume)
                || (l.policy.is_some()
                    && self
                        .link_volumes(l)
                        .is_ok_and(|v| v.iter().any(|x| x == volume)));
            if ours && self.due(l, now) {
                let _ = self.run_link(l.id, "replication");
            }
        }
    }

    /// Whether link `l` should run at `now`.
    fn due(&self, l: &LinkRec, now: u64) -> bool {
        if lock(&self.runs).contains_key(&l.id) {
            return false;
        }
        let last = l.last_run_unix.unwrap_or(0);
        if l.failures > 0 && now < retry_at(last, l.failures) {
            return false;
        }
        if let Some(i) = l.interval() {
            return interval_due(l, i, now);
        }
        // After every point: a run per new newest point of a volume (and
        // once at start, to catch up); a failed run is tried again.
        let vols = match self.link_volumes(l) {
            Ok(v) => v,
            Err(_) => return false,
        };
        let mut seen = lock(&self.seen);
        let mut due = l.failures > 0;
        for v in vols {
            let newest = self
                .pool
                .list_snapshots(Some(&v))
                .ok()
                .and_then(|s| s.iter().map(|s| s.id).max());
            let Some(newest) = newest else { continue };
            let key = (l.id, v);
            if seen.get(&key) != Some(&newest) {
                seen.insert(key, newest);
                due = true;
            }
        }
        due
    }

    /// `replication.late` (and `alert.raised` kind `replication_late`)
    /// when the lag passes the RPO, `replication.recovered` when it is
    /// back under. Before its first transfer a link's age counts.
    fn check_lag(&self, l: &LinkRec, now: u64) {
        // A paused link keeps its state: pausing is no recovery.
        if !l.enabled {
            return;
        }
        let lag = l
            .lag(now, &self.lag_volumes(l))
            .unwrap_or_else(|| now.saturating_sub(l.created_unix));
        let late = lag > l.rpo_seconds;
        if late == l.late {
            return;
        }
        // Said once per change, and only once the change is on record.
        if let Err(e) = self.update_link(l.id, |r| r.late = late) {
            tracing::warn!(link = l.id, error = %e.message, "replication lag state not saved");
            return;
        }
        let subject = format!("link {}", l.id);
        let data = json!({"link": l.id, "peer": l.peer, "volume": l.volume, "policy": l.policy,
            "lag_seconds": lag, "rpo_seconds": l.rpo_seconds});
        if late {
            tracing::warn!(link = l.id, lag, rpo = l.rpo_seconds, "replication late");
            self.events
                .emit("replication.late", &subject, "replication", data.clone());
            let mut alert = data;
            alert["kind"] = "replication_late".into();
            alert["reason"] = "replication_late".into();
            alert["message"] = format!(
                "link {} to {} is {lag} s behind (RPO {} s)",
                l.id, l.peer, l.rpo_seconds
            )
            .into();
            self.events
                .emit("alert.raised", &subject, "replication", alert);
        } else {
            self.events
                .emit("replication.recovered", &subject, "replication", data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The late state is kept with the link: a restart of the appliance
    /// does not raise a still-late link's alert again, and recovery is
    /// said once.
    #[test]
    fn a_late_link_is_said_late_once_across_restarts() {
        let d = tempfile::tempdir().unwrap();
        let id = {
            let r = crate::replication::runs::tests::service(d.path());
            let l = LinkRec {
                id: 1,
                volume: Some("v".into()),
                peer: "b".into(),
                rpo_seconds: 60,
                enabled: true,
                created_unix: 1000,
                ..Default::default()
            };
            r.put_link(&l).unwrap();
            r.check_lag(&r.link_rec(1).unwrap(), 2000);
            r.check_lag(&r.link_rec(1).unwrap(), 2001);
            assert!(r.link_rec(1).unwrap().late);
            let late = r
                .events
                .list(0, 100, false, Some("replication.late"))
                .unwrap();
            assert_eq!(late.len(), 1, "{late:?}");
            l.id
        };
        // A restart: a new service on the same state database.
        let r = crate::replication::runs::tests::service(d.path());
        r.check_lag(&r.link_rec(id).unwrap(), 2100);
        let late = r
            .events
            .list(0, 100, false, Some("replication.late"))
            .unwrap();
        assert_eq!(late.len(), 1, "raised again after a restart: {late:?}");
        let alerts = r.events.list(0, 100, false, Some("alert.raised")).unwrap();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        // Back under the RPO: recovered, once.
        r.update_link(id, |l| {
            l.target_newest.insert("v".into(), 2150);
        })
        .unwrap();
        r.check_lag(&r.link_rec(id).unwrap(), 2160);
        r.check_lag(&r.link_rec(id).unwrap(), 2170);
        let rec = r
            .events
            .list(0, 100, false, Some("replication.recovered"))
            .unwrap();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert!(!r.link_rec(id).unwrap().late);
    }

    #[test]
    fn failed_runs_wait_longer_each_time() {
        assert_eq!(retry_at(100, 0), 100);
        assert_eq!(retry_at(100, 1), 130);
        assert_eq!(retry_at(100, 2), 160);
        assert_eq!(retry_at(100, 3), 220);
        assert_eq!(retry_at(100, 40), 100 + RETRY_MAX);
    }

    #[test]
    fn interval_links_run_at_once_then_every_interval() {
        let mut l = LinkRec::default();
        assert!(interval_due(&l, 60, 1000));
        l.last_run_unix = Some(1000);
        assert!(!interval_due(&l, 60, 1059));
        assert!(interval_due(&l, 60, 1060));
    }
}

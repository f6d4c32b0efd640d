//! Snapshot schedules, retention (chapter 3.4 of the white paper) and the
//! pool quota. A thread ticks once a second: it takes the snapshots that are
//! due, then expires what the policies no longer keep. Each volume always
//! keeps its newest `min_keep` (≥ 1) snapshots and every snapshot with clones.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdm_api::types::{PoolPolicy, Retention, SnapshotPolicy};
use cdmfs::Pool;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clock::{stamp, Clock};
use crate::events::Events;
use crate::replication::holds::Holds;
use crate::state::{State, Sync, META, POLICIES};
use cdm_api::cron::Cron;
use cdm_api::{InputError, InputKind};
use cdm_common::lock::lock;

/// A volume's policy as stored, with the schedule's next due time.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SnapshotPolicyRec {
    pub policy: SnapshotPolicy,
    pub next_run_unix: Option<u64>,
}

/// The next time a schedule is due after `now`.
pub fn next_run(p: &SnapshotPolicy, now: u64) -> Result<Option<u64>, InputError> {
    let Some(s) = &p.schedule else {
        return Ok(None);
    };
    let bad = |m: &str| InputError::new(InputKind::Schedule, m);
    match (s.interval_secs, &s.cron) {
        (Some(_), Some(_)) => Err(bad(
            "give a schedule interval or a cron expression, not both",
        )),
        (Some(i), None) if i < 60 => Err(bad("schedule interval must be at least 60 seconds")),
        (Some(i), None) => Ok(Some(now + i)),
        (None, Some(c)) => {
            let c = Cron::parse(c)?;
            c.next_after(now)
                .map(Some)
                .ok_or_else(|| InputError::new(InputKind::Cron, "cron expression never matches"))
        }
        (None, None) => Err(bad("schedule needs interval_secs or cron")),
    }
}

/// A snapshot as retention sees it.
#[derive(Clone, Copy, Debug)]
pub struct Snap {
    pub id: u64,
    pub created_unix: u64,
    pub has_clones: bool,
}

/// Ids of `snaps` (one volume's, any order) that `r` does not keep at `now`.
pub fn expired(snaps: &[Snap], r: &Retention, now: u64) -> Vec<u64> {
    let mut s: Vec<Snap> = snaps.to_vec();
    s.sort_by_key(|x| (x.created_unix, x.id));
    let n = s.len();
    let min_keep = r.min_keep.max(1) as usize;
    if r.keep_last.is_none() && r.keep_days.is_none() {
        return Vec::new();
    }
    s.iter()
        .enumerate()
        .filter(|(i, x)| {
            let rank = n - 1 - i; // 0 = newest
            let kept = rank < min_keep
                || x.has_clones
                || r.keep_last.is_some_and(|k| rank < k as usize)
                || r.keep_days
                    .is_some_and(|d| now.saturating_sub(x.created_unix) < d as u64 * 86_400);
            !kept
        })
        .map(|(_, x)| x.id)
        .collect()
}

pub struct Scheduler {
    pool: Arc<Pool>,
    state: Arc<State>,
    events: Arc<Events>,
    clock: Arc<Clock>,
    /// To end the connections of the snapshot exports a sweep expires.
    nbd: Arc<nbd_server::Server>,
    /// One sweep at a time (the thread and `retention` jobs).
    sweep: Mutex<()>,
    over_quota: AtomicBool,
    /// The pool's state at the last tick (alerts on changes).
    pool_state: Mutex<cdmfs::PoolState>,
    /// The control plane, ticked with the schedules (set once at start).
    control: std::sync::OnceLock<Arc<crate::control::Control>>,
    /// Replication (set once at start): its links hold their bases.
    replication: std::sync::OnceLock<Arc<crate::replication::Replication>>,
    /// Held points (snapshot, link) retention said it kept, so it says
    /// so once, not at every tick.
    kept: Mutex<HashSet<(u64, u64)>>,
}

impl Scheduler {
    pub fn new(
        pool: Arc<Pool>,
        state: Arc<State>,
        events: Arc<Events>,
        clock: Arc<Clock>,
        nbd: Arc<nbd_server::Server>,
    ) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            pool,
            state,
            events,
            clock,
            nbd,
            sweep: Mutex::new(()),
            over_quota: AtomicBool::new(false),
            pool_state: Mutex::new(cdmfs::PoolState::Ok),
            control: std::sync::OnceLock::new(),
            replication: std::sync::OnceLock::new(),
            kept: Mutex::new(HashSet::new()),
        })
    }

    /// Hooks the control plane's tick (policy backups, hosts, RPO) in.
    pub fn set_control(&self, c: Arc<crate::control::Control>) {
        let _ = self.control.set(c);
    }

    /// Hooks replication in: retention keeps the points its links hold.
    pub fn set_replication(&self, r: Arc<crate::replication::Replication>) {
        let _ = self.replication.set(r);
    }

    /// The points replication links hold now; None if they cannot be
    /// read (then nothing expires: a lost base costs a full resend).
    fn holds(&self) -> Option<Holds> {
        let Some(r) = self.replication.get() else {
            return Some(Holds::default());
        };
        match r.holds() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!(error = %e.message, "cannot read the replication holds; nothing expires now");
                None
            }
        }
    }

    /// Says once (log and event `snapshot.kept`) that retention kept
    /// snapshot `id` of `vol` because links hold it; forgets what is no
    /// longer held so a new hold is said again.
    fn say_kept(&self, holds: &Holds, vol: &str, id: u64, actor: &str) {
        let mut kept = lock(&self.kept);
        kept.retain(|(s, _)| holds.is_held(*s));
        let links: Vec<u64> = holds.of(id).iter().map(|h| h.link).collect();
        if links.iter().all(|l| kept.contains(&(id, *l))) {
            return;
        }
        kept.extend(links.iter().map(|l| (id, *l)));
        let message = format!(
            "kept point {id}: it is the replication base of {}",
            holds.describe(id)
        );
        tracing::info!(volume = vol, snapshot = id, "{message}");
        self.events.emit(
            "snapshot.kept",
            &format!("{vol}@{id}"),
            actor,
            json!({"volume": vol, "id": id, "reason": "replication_base",
                   "links": links, "message": message}),
        );
    }

    pub fn start(self: &Arc<Self>, tick: Duration, stop: Arc<AtomicBool>) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // A bug in one tick must not stop every later snapshot,
                    // retention pass and RPO check.
                    let t = std::panic::AssertUnwindSafe(|| me.tick());
                    if std::panic::catch_unwind(t).is_err() {
                        tracing::error!("the scheduler's tick panicked; the next one runs");
                    }
                }
                // Agents' long polls end now, not when their wait runs out.
                if let Some(c) = me.control.get() {
                    c.shutdown();
                }
            });
    }

    /// Takes due snapshots, then applies retention and the quota.
    pub fn tick(&self) {
        if let Some(path) = crate::ballast::tick() {
            self.events.emit(
                "alert.raised",
                "appliance",
                "appliance",
                json!({"reason": "state_reserve_released", "message": format!("the data directory's filesystem is full: {} was released so the audit log and events can still be written; free space there", path.display())}),
            );
        }
        // Agent jobs and RPOs do not write the pool here: a stalled pool
        // does not stop them.
        if let Some(c) = self.control.get() {
            c.tick();
        }
        // Snapshots and expiries are changes a stalled pool refuses: they
        // wait (a due schedule runs once when the pool commits again).
        if self.watch_pool() {
            return;
        }
        if let Err(e) = self.run_schedules() {
            tracing::error!(error = %e, "scheduled snapshots failed");
        }
        if let Err(e) = self.apply_retention("scheduler") {
            tracing::error!(error = %e, "retention failed");
        }
    }

    /// Raises `alert.raised` when the pool's state changes for the worse
    /// (full, no space or I/O errors under commits) and `alert.cleared`
    /// when it is back to ok. Returns whether the pool refuses changes.
    fn watch_pool(&self) -> bool {
        use cdmfs::PoolState as P;
        let h = match self.pool.health() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the pool's health");
                return true;
            }
        };
        let before = std::mem::replace(&mut *lock(&self.pool_state), h.state);
        if before != h.state {
            if h.state == P::Ok {
                tracing::warn!(was = before.as_str(), "pool back to ok");
                self.events.emit(
                    "alert.cleared",
                    "pool",
                    "appliance",
                    json!({"reason": format!("pool_{}", before.as_str()), "message": "the pool is back to normal", "commit_retries": h.commit_retries}),
                );
            } else {
                tracing::error!(state = h.state.as_str(), message = ?h.message, "pool state changed");
                self.events.emit(
                    "alert.raised",
                    "pool",
                    "appliance",
                    json!({"reason": format!("pool_{}", h.state.as_str()), "message": h.message, "since_unix": h.since_unix}),
                );
            }
        }
        matches!(h.state, P::NoSpace | P::IoError)
    }

    fn run_schedules(&self) -> crate::error::Result<()> {
        let now = self.clock.now();
        let mut due = Vec::new();
        let recs: Vec<(String, SnapshotPolicyRec)> =
            self.state.all::<(String, SnapshotPolicyRec)>(POLICIES)?;
        for (name, rec) in recs {
            if rec.next_run_unix.is_some_and(|t| t <= now) {
                due.push((name, rec));
            }
        }
        for (name, mut rec) in due {
            let label = format!("auto-{}", stamp(now));
            match self.pool.create_snapshot_at(
                &name,
                &label,
                json!({"scheduled": true}),
                self.clock.now_ns(),
            ) {
                Ok(s) => {
                    if let Err(e) = self.pool.flush() {
                        self.events.emit(
                            "alert.raised",
                            &name,
                            "scheduler",
                            json!({"message": format!("scheduled snapshot not committed: {e}")}),
                        );
                        continue;
                    }
                    self.events.emit(
                        "snapshot.created",
                        &format!("{name}@{}", s.id),
                        "scheduler",
                        json!({"volume": name, "id": s.id, "label": label, "scheduled": true}),
                    );
                }
                Err(e) => {
                    self.events.emit(
                        "alert.raised",
                        &name,
                        "scheduler",
                        json!({"message": format!("scheduled snapshot failed: {e}")}),
                    );
                }
            }
            rec.next_run_unix = next_run(&rec.policy, now).unwrap_or(None);
            self.state
                .put(POLICIES, &name, &(name.clone(), rec), Sync::Now)?;
        }
        Ok(())
    }

    /// The retention of application volumes from their protection policies
    /// (it wins over a volume policy's).
    fn app_retention(&self) -> HashMap<String, Retention> {
        match self.control.get().map(|c| c.retention_by_volume()) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::error!(error = %e.message, "cannot read the applications' retention");
                HashMap::new()
            }
            None => HashMap::new(),
        }
    }

    /// Expires snapshots the volume policies and the pool quota no longer
    /// keep; returns the expired snapshot exports.
    pub fn apply_retention(&self, actor: &str) -> crate::error::Result<Vec<String>> {
        let _one = cdm_common::lock::lock(&self.sweep);
        let now = self.clock.now();
        let (vols, snaps) = self.pool.catalog()?;
        let policies: HashMap<String, Retention> = self
            .state
            .all::<(String, SnapshotPolicyRec)>(POLICIES)?
            .into_iter()
            .map(|(n, r)| (n, r.policy.retention))
            .chain(self.app_retention())
            .collect();
        let cloned: HashSet<u64> = vols.iter().filter_map(|v| v.origin).collect();
        let vname: HashMap<u64, String> = vols.iter().map(|v| (v.id, v.name.clone())).collect();
        let mut by_vol: HashMap<u64, Vec<Snap>> = HashMap::new();
        for s in &snaps {
            by_vol.entry(s.volume_id).or_default().push(Snap {
                id: s.id,
                created_unix: s.created_ns / 1_000_000_000,
                has_clones: cloned.contains(&s.id),
            });
        }
        let mut gone = Vec::new();
        let expire = |id: u64, vol: &str, reason: &str, gone: &mut Vec<String>| match self
            .pool
            .delete_snapshot(id)
        {
            Ok(()) => {
                let export = format!("{vol}@{id}");
                // Its clients would otherwise learn only at their next
                // request; an idle one would hold its connection forever.
                self.nbd.disconnect_export(&export);
                self.events.emit(
                    "snapshot.expired",
                    &export,
                    actor,
                    json!({"volume": vol, "id": id, "reason": reason}),
                );
                gone.push(export);
            }
            Err(e) => tracing::warn!(snapshot = id, error = %e, "cannot expire snapshot"),
        };
        // Replication bases are kept: read once, and only for a pass that
        // would delete something.
        let holds: std::cell::OnceCell<Option<Holds>> = std::cell::OnceCell::new();
        let held = |id: u64, vol: &str| -> bool {
            match holds.get_or_init(|| self.holds()) {
                None => true,
                Some(h) if h.is_held(id) => {
                    self.say_kept(h, vol, id, actor);
                    true
                }
                Some(_) => false,
            }
        };
        for (vid, list) in &by_vol {
            let Some(name) = vname.get(vid) else { continue };
            let Some(p) = policies.get(name) else {
                continue;
            };
            for id in expired(list, p, now) {
                if !held(id, name) {
                    expire(id, name, "retention", &mut gone);
                }
            }
        }
        // Pool quota: oldest snapshots first, each volume keeping its newest min_keep.
        let quota: Option<u64> = self
            .state
            .get::<_, PoolPolicy>(META, "pool_policy")?
            .and_then(|p| p.quota_bytes);
        if let Some(q) = quota {
            // Space already freed but not reusable yet (deferred frees) does
            // not count: an earlier sweep paid for it.
            let sp = self.pool.space()?;
            let mut used = sp.used_bytes - sp.freeing_bytes;
            if used > q {
                let gone_ids: HashSet<&str> = gone.iter().map(|s| s.as_str()).collect();
                let mut cands: Vec<(u64, u64, u64)> = Vec::new(); // (created, id, volume)
                for (vid, list) in &by_vol {
                    let min_keep = vname
                        .get(vid)
                        .and_then(|n| policies.get(n))
                        .map(|p| p.min_keep.max(1))
                        .unwrap_or(1) as usize;
                    let mut l: Vec<&Snap> = list
                        .iter()
                        .filter(|s| {
                            let e = format!(
                                "{}@{}",
                                vname.get(vid).map(|s| s.as_str()).unwrap_or(""),
                                s.id
                            );
                            !gone_ids.contains(e.as_str())
                        })
                        .collect();
                    l.sort_by_key(|s| (s.created_unix, s.id));
                    let keep_from = l.len().saturating_sub(min_keep);
                    for s in &l[..keep_from] {
                        if !s.has_clones {
                            cands.push((s.created_unix, s.id, *vid));
                        }
                    }
                }
                cands.sort();
                for (_, id, vid) in cands {
                    if used <= q {
                        break;
                    }
                    let freed = self.pool.snapshot(id).map(|s| s.unique_bytes).unwrap_or(0);
                    let name = vname.get(&vid).cloned().unwrap_or_default();
                    if held(id, &name) {
                        continue;
                    }
                    expire(id, &name, "quota", &mut gone);
                    used = used.saturating_sub(freed);
                }
                let over = used > q;
                if over && !self.over_quota.swap(true, Ordering::SeqCst) {
                    self.events.emit(
                        "alert.raised",
                        "pool",
                        actor,
                        json!({"message": "pool above its quota and nothing more may expire", "used_bytes": used, "quota_bytes": q}),
                    );
                } else if !over {
                    self.over_quota.store(false, Ordering::SeqCst);
                }
            } else {
                self.over_quota.store(false, Ordering::SeqCst);
            }
        }
        if !gone.is_empty() {
            self.pool.flush()?;
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(ages_days: &[u64], now: u64) -> Vec<Snap> {
        ages_days
            .iter()
            .enumerate()
            .map(|(i, a)| Snap {
                id: i as u64 + 1,
                created_unix: now - a * 86_400 - 1,
                has_clones: false,
            })
            .collect()
    }

    #[test]
    fn keep_last_and_days_are_a_union() {
        let now = 1_000_000_000;
        let s = snaps(&[10, 8, 6, 4, 2, 0], now); // ids 1..6, oldest first
        let r = Retention {
            keep_last: Some(2),
            keep_days: None,
            min_keep: 1,
        };
        assert_eq!(expired(&s, &r, now), vec![1, 2, 3, 4]);
        let r = Retention {
            keep_last: None,
            keep_days: Some(5),
            min_keep: 1,
        };
        assert_eq!(expired(&s, &r, now), vec![1, 2, 3]);
        let r = Retention {
            keep_last: Some(1),
            keep_days: Some(3),
            min_keep: 1,
        };
        assert_eq!(expired(&s, &r, now), vec![1, 2, 3, 4]);
        // Nothing set: nothing expires.
        assert!(expired(&s, &Retention::default(), now).is_empty());
    }

    #[test]
    fn min_keep_and_clones_protect() {
        let now = 1_000_000_000;
        let mut s = snaps(&[30, 20, 10], now);
        let r = Retention {
            keep_last: None,
            keep_days: Some(1),
            min_keep: 0,
        };
        // min_keep 0 still keeps one.
        assert_eq!(expired(&s, &r, now), vec![1, 2]);
        let r2 = Retention {
            min_keep: 2,
            ..r.clone()
        };
        assert_eq!(expired(&s, &r2, now), vec![1]);
        s[0].has_clones = true;
        assert_eq!(expired(&s, &r, now), vec![2]);
    }

    #[test]
    fn schedules() {
        let p = |i: Option<u64>, c: Option<&str>| SnapshotPolicy {
            schedule: Some(cdm_api::types::Schedule {
                interval_secs: i,
                cron: c.map(String::from),
            }),
            retention: Retention::default(),
            ..Default::default()
        };
        assert_eq!(next_run(&p(Some(3600), None), 100).unwrap(), Some(3700));
        assert!(next_run(&p(Some(10), None), 100).is_err());
        assert!(next_run(&p(Some(3600), Some("* * * * *")), 100).is_err());
        assert!(next_run(&p(None, None), 100).is_err());
        assert_eq!(
            next_run(&p(None, Some("*/5 * * * *")), 0).unwrap(),
            Some(300)
        );
        assert_eq!(next_run(&SnapshotPolicy::default(), 0).unwrap(), None);
    }
}

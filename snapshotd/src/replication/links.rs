//! Replication links (on the source): their records, the routes that
//! create, list, pause, resume and delete them, and their transfer history.

use std::collections::BTreeMap;

use cdm_api::auth::Caller;
use cdm_api::control::parse_hhmm;
use cdm_api::replication::*;
use cdm_api::{ApiError, ApiResult};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::peers;
use super::service::Replication;
use crate::appliance::st;
use crate::state::Sync;

/// Links by id.
pub const LINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("repl_links");
/// Transfers of every link, by a sequence of their own.
pub const TRANSFERS: TableDefinition<u64, &[u8]> = TableDefinition::new("repl_transfers");

/// RPO of a link run after every point, unless given.
const DEFAULT_RPO: u64 = 3600;
/// Transfers a listing returns.
const HISTORY: usize = 200;

/// A link as stored: its settings and what its runs learnt.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct LinkRec {
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
    /// Send encrypted volumes as stored ciphertext (`LinkCreate::raw`).
    #[serde(default)]
    pub raw: bool,
    pub created_unix: u64,
    /// Creation time (unix s) of the newest point each volume has on the
    /// target, as the last successful transfer left it.
    #[serde(default)]
    pub target_newest: BTreeMap<String, u64>,
    #[serde(default)]
    pub last_transfer: Option<Transfer>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Failed runs in a row (a scheduled retry waits longer after each).
    #[serde(default)]
    pub failures: u32,
    /// When the last run ended (unix s).
    #[serde(default)]
    pub last_run_unix: Option<u64>,
    /// The lag is over the RPO (`replication.late` was said): kept with
    /// the link so a restart does not raise a still-late link's alert again.
    #[serde(default)]
    pub late: bool,
}

/// A stored transfer and its link.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TransferRec {
    pub link: u64,
    pub transfer: Transfer,
}

impl LinkRec {
    /// The interval of an interval link.
    pub fn interval(&self) -> Option<u64> {
        match self.schedule {
            LinkSchedule::Interval { interval_seconds } => Some(interval_seconds),
            LinkSchedule::Named(_) => None,
        }
    }

    /// Seconds since the newest point on the target was made (the oldest
    /// such of `volumes`, the ones the link replicates now: a volume that
    /// left its policy no longer counts), null before the first transfer.
    pub fn lag(&self, now: u64, volumes: &[String]) -> Option<u64> {
        self.target_newest
            .iter()
            .filter(|(v, _)| volumes.contains(v))
            .map(|(_, t)| *t)
            .min()
            .map(|t| now.saturating_sub(t))
    }
}

/// One bandwidth window: minutes after midnight (UTC) and MiB/s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
    pub mibps: u64,
}

/// `HH:MM-HH:MM=MIBPS`, the protection policies' syntax.
pub fn parse_window(s: &str) -> Option<Window> {
    let (span, rate) = s.split_once('=')?;
    let (a, b) = span.split_once('-')?;
    Some(Window {
        start: parse_hhmm(a.trim())?,
        end: parse_hhmm(b.trim())?,
        mibps: rate.trim().parse().ok()?,
    })
}

/// The rate in force at `now` (unix s) in bytes per second: the first
/// window that holds the time of day, else `outside`; None is unlimited.
pub fn rate_at(windows: &[String], outside: Option<u64>, now: u64) -> Option<u64> {
    let minute = ((now % 86_400) / 60) as u32;
    let mibps = windows
        .iter()
        .filter_map(|w| parse_window(w))
        .find(|w| {
            if w.start <= w.end {
                (w.start..w.end).contains(&minute)
            } else {
                // Past midnight: 22:00-06:00.
                minute >= w.start || minute < w.end
            }
        })
        .map(|w| w.mibps)
        .or(outside)?;
    Some(mibps.saturating_mul(1 << 20))
}

fn check(req: &LinkCreate) -> ApiResult<()> {
    let bad = |m: String| Err(ApiError::bad_request(m));
    match (&req.volume, &req.policy) {
        (Some(_), None) | (None, Some(_)) => {}
        _ => return bad("a link needs either \"volume\" or \"policy\"".into()),
    }
    match &req.schedule {
        None => {}
        Some(LinkSchedule::Named(n)) if n == AFTER_EVERY_POINT => {}
        Some(LinkSchedule::Named(n)) => {
            return bad(format!(
                "unknown schedule {n:?}: use \"{AFTER_EVERY_POINT}\" or {{\"interval_seconds\": N}}"
            ))
        }
        Some(LinkSchedule::Interval { interval_seconds })
            if *interval_seconds == 0 || *interval_seconds > 366 * 86_400 =>
        {
            return bad("interval_seconds must be 1 to a year".into());
        }
        Some(LinkSchedule::Interval { .. }) => {}
    }
    for w in &req.bandwidth_windows {
        if parse_window(w).is_none() {
            return bad(format!("bad bandwidth window {w:?}: use HH:MM-HH:MM=MIBPS"));
        }
    }
    if req.rpo_seconds == Some(0) {
        return bad("rpo_seconds must be at least 1".into());
    }
    if req.keep_last == Some(0) {
        return bad("keep_last must be at least 1".into());
    }
    Ok(())
}

impl Replication {
    pub(crate) fn link_recs(&self) -> ApiResult<Vec<LinkRec>> {
        self.state
            .scan(LINKS, 0, usize::MAX, false, |_: &LinkRec| true)
            .map_err(st)
    }

    pub(crate) fn link_rec(&self, id: u64) -> ApiResult<LinkRec> {
        self.state
            .get(LINKS, id)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("link {id} not found")))
    }

    pub(crate) fn put_link(&self, l: &LinkRec) -> ApiResult<()> {
        self.state.put(LINKS, l.id, l, Sync::Now).map_err(st)
    }

    /// Changes a link's record in place (a deleted link stays deleted).
    pub(crate) fn update_link(&self, id: u64, f: impl FnOnce(&mut LinkRec)) -> ApiResult<()> {
        let _one = cdm_common::lock::lock(&self.runs);
        let Some(mut l) = self.state.get::<_, LinkRec>(LINKS, id).map_err(st)? else {
            return Ok(());
        };
        f(&mut l);
        self.put_link(&l)
    }

    /// The API's view of a link now.
    pub(crate) fn public(&self, l: &LinkRec) -> Link {
        let running = cdm_common::lock::lock(&self.runs).contains_key(&l.id);
        let state = if running {
            "running"
        } else if !l.enabled {
            "paused"
        } else if l.last_error.is_some() {
            "failing"
        } else {
            "idle"
        };
        Link {
            id: l.id,
            volume: l.volume.clone(),
            policy: l.policy.clone(),
            peer: l.peer.clone(),
            schedule: l.schedule.clone(),
            keep_last: l.keep_last,
            keep_days: l.keep_days,
            bandwidth_mibps: l.bandwidth_mibps,
            bandwidth_windows: l.bandwidth_windows.clone(),
            rpo_seconds: l.rpo_seconds,
            enabled: l.enabled,
            raw: l.raw,
            state: state.into(),
            lag_seconds: l.lag(self.clock.now(), &self.lag_volumes(l)),
            last_transfer: l.last_transfer.clone(),
            last_error: l.last_error.clone(),
        }
    }

    /// `POST /v1/replication/links`.
    pub fn create_link(&self, c: &Caller, req: LinkCreate) -> ApiResult<Link> {
        check(&req)?;
        if peers::get(&self.state, &req.peer).map_err(st)?.is_none() {
            return Err(ApiError::not_found(format!(
                "peer {} not found: pair with it first",
                req.peer
            )));
        }
        if let Some(v) = &req.volume {
            let info = self.pool.volume(v).map_err(crate::appliance::engine)?;
            if req.raw == Some(true) {
                super::send::check_raw(&info).map_err(|e| ApiError::bad_request(e.message))?;
            }
        }
        if let (Some(p), Some(ctl)) = (&req.policy, self.control.get()) {
            ctl.policy(p)?;
        }
        self.refuse_duplicate(&req)?;
        let schedule = req.schedule.clone().unwrap_or_default();
        let rpo = req.rpo_seconds.unwrap_or(match &schedule {
            LinkSchedule::Interval { interval_seconds } => interval_seconds.saturating_mul(2),
            LinkSchedule::Named(_) => DEFAULT_RPO,
        });
        let now = self.clock.now();
        let rec = self
            .state
            .append(LINKS, Sync::Now, |id| LinkRec {
                id,
                volume: req.volume.clone(),
                policy: req.policy.clone(),
                peer: req.peer.clone(),
                schedule,
                keep_last: req.keep_last,
                keep_days: req.keep_days,
                bandwidth_mibps: req.bandwidth_mibps,
                bandwidth_windows: req.bandwidth_windows.clone(),
                rpo_seconds: rpo,
                enabled: req.enabled.unwrap_or(true),
                raw: req.raw.unwrap_or(false),
                created_unix: now,
                ..LinkRec::default()
            })
            .map_err(st)?;
        self.events.emit(
            "replication.link_created",
            &format!("link {}", rec.id),
            &c.user,
            json!({"id": rec.id, "volume": rec.volume, "policy": rec.policy, "peer": rec.peer,
                   "raw": rec.raw}),
        );
        Ok(self.public(&rec))
    }

    /// 409 for a second link of a volume to the same peer (a volume link
    /// and a policy link that covers it, or two alike): both would run on
    /// every point and drop each other's sessions.
    fn refuse_duplicate(&self, req: &LinkCreate) -> ApiResult<()> {
        let new = LinkRec {
            volume: req.volume.clone(),
            policy: req.policy.clone(),
            peer: req.peer.clone(),
            ..LinkRec::default()
        };
        let mine = self.link_volumes(&new)?;
        for l in self.link_recs()? {
            if l.peer != req.peer {
                continue;
            }
            let same_policy = l.policy.is_some() && l.policy == req.policy;
            let theirs = self.link_volumes(&l)?;
            if let Some(v) = mine.iter().find(|v| theirs.contains(v)) {
                return Err(ApiError::conflict(format!(
                    "link {} already replicates volume {v} to {}: one link per volume and peer",
                    l.id, l.peer
                )));
            }
            if same_policy {
                return Err(ApiError::conflict(format!(
                    "link {} already replicates this policy to {}",
                    l.id, l.peer
                )));
            }
        }
        Ok(())
    }

    pub fn links(&self) -> ApiResult<Vec<Link>> {
        Ok(self.link_recs()?.iter().map(|l| self.public(l)).collect())
    }

    pub fn link(&self, id: u64) -> ApiResult<Link> {
        Ok(self.public(&self.link_rec(id)?))
    }

    /// `POST .../pause` and `.../resume`. A pause stops scheduled runs (a
    /// run going on finishes).
    pub fn set_link_enabled(&self, c: &Caller, id: u64, enabled: bool) -> ApiResult<Link> {
        self.link_rec(id)?;
        self.update_link(id, |l| l.enabled = enabled)?;
        let kind = if enabled { "resumed" } else { "paused" };
        self.events.emit(
            &format!("replication.link_{kind}"),
            &format!("link {id}"),
            &c.user,
            json!({"id": id}),
        );
        self.link(id)
    }

    /// `DELETE /v1/replication/links/{id}`: a run going on is cancelled.
    pub fn delete_link(&self, c: &Caller, id: u64) -> ApiResult<()> {
        {
            let runs = cdm_common::lock::lock(&self.runs);
            if let Some(r) = runs.get(&id) {
                r.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if !self.state.remove(LINKS, id).map_err(st)? {
                return Err(ApiError::not_found(format!("link {id} not found")));
            }
        }
        // Its history goes with it: a later link may get its id (ids follow
        // the last link), and must not inherit its transfers or its holds.
        self.state
            .remove_seq_where(TRANSFERS, |t: &TransferRec| t.link == id)
            .map_err(st)?;
        cdm_common::lock::lock(&self.counters).remove(&id);
        cdm_common::lock::lock(&self.seen).retain(|(link, _), _| *link != id);
        self.events.emit(
            "replication.link_deleted",
            &format!("link {id}"),
            &c.user,
            json!({"id": id}),
        );
        Ok(())
    }

    /// Stores a transfer of link `link` (and returns it with its id).
    pub(crate) fn record_transfer(&self, link: u64, mut t: Transfer) -> ApiResult<Transfer> {
        let rec = self
            .state
            .append(TRANSFERS, Sync::Now, |id| {
                t.id = id;
                TransferRec {
                    link,
                    transfer: t.clone(),
                }
            })
            .map_err(st)?;
        Ok(rec.transfer)
    }

    /// `GET /v1/replication/links/{id}/transfers`, newest first.
    pub fn transfers(&self, id: u64) -> ApiResult<Vec<Transfer>> {
        self.link_rec(id)?;
        let mut v: Vec<TransferRec> = self
            .state
            .scan(TRANSFERS, 0, HISTORY, true, |t: &TransferRec| t.link == id)
            .map_err(st)?;
        v.reverse();
        Ok(v.into_iter().map(|t| t.transfer).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_pick_the_rate_in_force() {
        assert_eq!(
            parse_window("08:00-18:00=10"),
            Some(Window {
                start: 480,
                end: 1080,
                mibps: 10
            })
        );
        assert_eq!(parse_window("08:00-18:00"), None);
        assert_eq!(parse_window("8:00-18:00=1"), None);
        assert_eq!(parse_window("08:00-18:00=x"), None);
        let w = vec!["08:00-18:00=10".to_string(), "22:00-06:00=0".to_string()];
        let at = |h: u64, m: u64| 86_400 * 3 + h * 3600 + m * 60;
        assert_eq!(rate_at(&w, Some(50), at(9, 0)), Some(10 << 20));
        assert_eq!(rate_at(&w, Some(50), at(18, 0)), Some(50 << 20));
        assert_eq!(rate_at(&w, Some(50), at(23, 30)), Some(0));
        assert_eq!(rate_at(&w, Some(50), at(5, 59)), Some(0));
        assert_eq!(rate_at(&w, None, at(7, 0)), None);
        assert_eq!(rate_at(&[], None, at(7, 0)), None);
    }

    #[test]
    fn a_link_needs_one_source_and_sane_settings() {
        let ok = LinkCreate {
            volume: Some("v".into()),
            peer: "b".into(),
            ..Default::default()
        };
        assert!(check(&ok).is_ok());
        let both = LinkCreate {
            policy: Some("p".into()),
            ..ok.clone()
        };
        assert_eq!(check(&both).unwrap_err().status, 400);
        let none = LinkCreate {
            volume: None,
            ..ok.clone()
        };
        assert_eq!(check(&none).unwrap_err().status, 400);
        let sched = LinkCreate {
            schedule: Some(LinkSchedule::Named("hourly".into())),
            ..ok.clone()
        };
        assert_eq!(check(&sched).unwrap_err().status, 400);
        let zero = LinkCreate {
            schedule: Some(LinkSchedule::Interval {
                interval_seconds: 0,
            }),
            ..ok.clone()
        };
        assert_eq!(check(&zero).unwrap_err().status, 400);
        let win = LinkCreate {
            bandwidth_windows: vec!["08:00-18:00".into()],
            ..ok.clone()
        };
        assert_eq!(check(&win).unwrap_err().status, 400);
    }

    #[test]
    fn lag_is_that_of_the_oldest_newest_point() {
        let mut l = LinkRec::default();
        let both = ["a".to_string(), "b".to_string()];
        assert_eq!(l.lag(1000, &both), None);
        l.target_newest.insert("a".into(), 900);
        l.target_newest.insert("b".into(), 700);
        assert_eq!(l.lag(1000, &both), Some(300));
        // A volume the link no longer replicates does not count (review
        // finding 6a): its old entry would make the lag grow for ever.
        assert_eq!(l.lag(1000, &both[..1]), Some(100));
        assert_eq!(l.lag(1000, &[]), None);
    }
}

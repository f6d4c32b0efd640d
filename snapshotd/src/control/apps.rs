//! Applications (discovered by agents or registered by hand), protection
//! policies and their assignment, and the catalog of points (the snapshots
//! of an application's volume).

use std::collections::HashMap;

use cdm_api::auth::Caller;
use cdm_api::control::*;
use cdm_api::cron::Cron;
use cdm_api::{ApiError, ApiResult};
use serde_json::{json, Value};

use super::{lock, AppRec, Control, HostRec};
use crate::appliance::{engine, st};
use crate::state::{Sync, APPS, APP_STATE, HOSTS, PROTECTION};

/// `{host}-{kind}-{name}` with every character outside `[A-Za-z0-9._-]`
/// replaced by `_`, and a suffix `-2`, `-3`… while `taken` says so.
pub fn volume_name(host: &str, kind: &str, name: &str, taken: impl Fn(&str) -> bool) -> String {
    let base: String = format!("{host}-{kind}-{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    let mut v = base.clone();
    let mut n = 2;
    while taken(&v) {
        v = format!("{base}-{n}");
        n += 1;
    }
    v
}

fn check_app_name(name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "application name must be 1 to 256 bytes without control characters",
        ));
    }
    Ok(())
}

fn check_kind(kind: &str) -> ApiResult<()> {
    if APP_KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "unknown application kind {kind:?}: use one of {APP_KINDS:?}"
        )))
    }
}

/// The longest interval and RPO of a policy: a year (no time sum overflows).
pub const YEAR_SECS: u64 = 366 * 86_400;

/// Checks a protection policy before it is stored.
pub fn validate_policy(p: &ProtectionPolicy) -> ApiResult<()> {
    let bad = |m: String| Err(ApiError::bad_request(m));
    match (p.interval_seconds, &p.cron) {
        (Some(_), Some(_)) => return bad("give interval_seconds or cron, not both".into()),
        (None, None) => return bad("a policy needs interval_seconds or cron".into()),
        (Some(i), None) if !(60..=YEAR_SECS).contains(&i) => {
            return bad(format!(
                "interval_seconds must be 60 to {YEAR_SECS} (a year)"
            ))
        }
        (None, Some(c)) => {
            let c = Cron::parse(c).map_err(ApiError::from)?;
            if c.next_after(0).is_none() {
                return bad("the cron expression never matches".into());
            }
        }
        _ => {}
    }
    for w in &p.windows {
        if w.contains(0).is_none() {
            return bad(format!(
                "bad window {}-{}: use HH:MM (UTC) for start and end",
                w.start, w.end
            ));
        }
    }
    if p.rpo_seconds == 0 || p.rpo_seconds > YEAR_SECS {
        return bad(format!("rpo_seconds must be 1 to {YEAR_SECS} (a year)"));
    }
    for b in &p.bandwidth_windows {
        let ok = b.split_once('=').is_some_and(|(span, rate)| {
            rate.parse::<u64>().is_ok()
                && span
                    .split_once('-')
                    .is_some_and(|(s, e)| parse_hhmm(s).is_some() && parse_hhmm(e).is_some())
        });
        if !ok {
            return bad(format!("bad bandwidth window {b:?}: use HH:MM-HH:MM=MIBPS"));
        }
    }
    if let Some(b) = p.volume.block_size {
        if !b.is_power_of_two() || !(4096..=1 << 20).contains(&b) {
            return bad("volume.block_size must be a power of two from 4096 to 1048576".into());
        }
    }
    if p.volume.compression.is_some_and(|c| c > 29) {
        return bad("volume.compression must be 0 to 29".into());
    }
    if let Some(e) = &p.volume.encryption {
        if !["none", "aes-256-xts", "aes-128-xts", "sm4-xts"].contains(&e.as_str()) {
            return bad(format!(
                "unknown volume.encryption {e:?}: use none, aes-256-xts, aes-128-xts or sm4-xts"
            ));
        }
    }
    if p.retries > 10 {
        return bad("retries must be at most 10".into());
    }
    if p.replication.as_ref().is_some_and(|r| !r.is_object()) {
        return bad("replication must be an object".into());
    }
    super::drills::validate(p)
}

/// What a running point-in-time restore lets its host reach (see
/// `Appliance::pitr_granted`).
#[derive(Clone, Debug, PartialEq)]
pub struct PitrGrant {
    /// The log volume (true) or the stage volume.
    pub log: bool,
    /// The job's clone name.
    pub name: Option<String>,
}

impl Control {
    /// Whether `vol` is the volume of one of `host`'s applications.
    pub fn host_owns_volume(&self, host: &str, vol: &str) -> ApiResult<bool> {
        Ok(self.volume_owner(vol)?.as_deref() == Some(host))
    }

    /// The host of the application whose volume is `vol`.
    pub fn volume_owner(&self, vol: &str) -> ApiResult<Option<String>> {
        let apps = self.apps()?;
        // An application's own volume wins over a vm application's disks.
        if let Some(a) = apps.iter().find(|a| a.volume == vol) {
            return Ok(Some(a.host.clone()));
        }
        Ok(apps
            .into_iter()
            .find(|a| a.owns_volume(vol) || a.owns_log_volume(vol))
            .map(|a| a.host))
    }

    /// The points of `vol` that `host` may read and clone now: those of
    /// the restores it runs (snapshot, the clone's name if the job names one).
    pub fn restore_grants(&self, host: &str, vol: &str) -> Vec<(u64, Option<String>)> {
        lock(&self.active)
            .values()
            .filter(|j| {
                (j.kind == "restore" || j.kind == "drill")
                    && j.state == "running"
                    && j.host.as_deref() == Some(host)
            })
            .filter_map(|j| {
                let p = j.params.as_ref()?;
                (p["volume"].as_str()? == vol).then(|| {
                    (
                        p["snapshot"].as_u64().unwrap_or(u64::MAX),
                        p["name"].as_str().map(String::from),
                    )
                })
            })
            .filter(|(s, _)| *s != u64::MAX)
            .collect()
    }

    /// A running point-in-time restore on `host` that reads `vol`: the
    /// application's stage volume (`log` false) or its log volume (`log`
    /// true), with the job's clone name.
    pub fn pitr_grant(&self, host: &str, vol: &str) -> Option<PitrGrant> {
        lock(&self.active)
            .values()
            .filter(|j| {
                j.kind == "restore" && j.state == "running" && j.host.as_deref() == Some(host)
            })
            .find_map(|j| {
                let p = j.params.as_ref()?;
                let pitr = ["target_time", "target_lsn", "target_name", "target_gtid"]
                    .iter()
                    .any(|k| p.get(*k).is_some_and(|v| v.is_string()));
                let stage = p["volume"].as_str()?;
                if !pitr {
                    return None;
                }
                let log = if vol == stage {
                    false
                } else if vol.strip_prefix(stage) == Some("-log") {
                    true
                } else {
                    return None;
                };
                Some(PitrGrant {
                    log,
                    name: p["name"].as_str().map(String::from),
                })
            })
    }

    /// The newest point of every volume: volume name → created (Unix s).
    pub(super) fn newest_points(&self) -> ApiResult<HashMap<String, u64>> {
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let name: HashMap<u64, &str> = vols.iter().map(|v| (v.id, v.name.as_str())).collect();
        let mut out: HashMap<String, u64> = HashMap::new();
        for s in &snaps {
            if let Some(n) = name.get(&s.volume_id) {
                let t = s.created_ns / 1_000_000_000;
                let e = out.entry(n.to_string()).or_insert(t);
                *e = (*e).max(t);
            }
        }
        Ok(out)
    }

    pub(super) fn public_with(
        &self,
        a: AppRec,
        now: u64,
        newest: &HashMap<String, u64>,
        policies: &HashMap<String, ProtectionPolicy>,
    ) -> Application {
        let last_job = lock(&self.last_backup).get(&a.id).cloned();
        let policy = a.policy.as_ref().and_then(|p| policies.get(p));
        let log_archive = self.log_archive(&a, policy, now);
        let rpo = super::rpo_status(
            policy,
            a.newest_in(newest),
            a.policy_since_unix,
            last_job,
            now,
        );
        Application {
            id: a.id,
            host: a.host,
            kind: a.kind,
            name: a.name,
            config: a.config,
            volume: a.volume,
            policy: a.policy,
            discovered: a.discovered,
            size_bytes: a.size_bytes,
            created_unix: a.created_unix,
            rpo,
            log_archive,
        }
    }

    pub(super) fn policy_map(&self) -> ApiResult<HashMap<String, ProtectionPolicy>> {
        let v: Vec<ProtectionPolicy> = self.state.all(PROTECTION).map_err(st)?;
        Ok(v.into_iter().map(|p| (p.name.clone(), p)).collect())
    }

    /// The newest point of application `a`: of its volume alone (no walk
    /// of the catalog), or of every volume of a vm application.
    pub(super) fn newest_of(&self, a: &AppRec) -> ApiResult<HashMap<String, u64>> {
        if a.kind == "vm" {
            return self.newest_points();
        }
        self.newest_point(&a.volume)
    }

    /// The newest point of volume `vol` alone (no walk of the catalog).
    pub(super) fn newest_point(&self, vol: &str) -> ApiResult<HashMap<String, u64>> {
        let snaps = match self.pool.list_snapshots(Some(vol)) {
            Ok(s) => s,
            Err(cdmfs::Error::NotFound(_)) => Vec::new(),
            Err(e) => return Err(engine(e)),
        };
        Ok(snaps
            .iter()
            .map(|s| s.created_ns / 1_000_000_000)
            .max()
            .map(|t| HashMap::from([(vol.to_string(), t)]))
            .unwrap_or_default())
    }

    pub(super) fn public_app(&self, a: AppRec, now: u64) -> ApiResult<Application> {
        let newest = self.newest_of(&a)?;
        Ok(self.public_with(a, now, &newest, &self.policy_map()?))
    }

    pub fn applications(&self, host: Option<String>) -> ApiResult<Vec<Application>> {
        let now = self.now();
        let newest = self.newest_points()?;
        let policies = self.policy_map()?;
        Ok(self
            .apps()?
            .into_iter()
            .filter(|a| host.as_deref().is_none_or(|h| a.host == h))
            .map(|a| self.public_with(a, now, &newest, &policies))
            .collect())
    }

    pub fn application(&self, id: u64) -> ApiResult<Application> {
        self.public_app(self.app_rec(id)?, self.now())
    }

    /// Stores a new application (its id from the sequence).
    #[allow(clippy::too_many_arguments)]
    fn add_app(
        &self,
        host: &str,
        kind: &str,
        name: &str,
        config: Value,
        volume: Option<String>,
        policy: Option<String>,
        discovered: bool,
        size_bytes: Option<u64>,
    ) -> ApiResult<AppRec> {
        let apps = self.apps()?;
        if apps
            .iter()
            .any(|a| a.host == host && a.kind == kind && a.name == name)
        {
            return Err(ApiError::conflict(format!(
                "host {host} already has the {kind} application {name:?}"
            )));
        }
        // A pool volume of that name (made by anyone) is taken too: this
        // application's backups must not land in it.
        let pool: std::collections::HashSet<String> = self
            .pool
            .list_volumes_brief()
            .map_err(engine)?
            .into_iter()
            .map(|v| v.name)
            .collect();
        // A database's log volume (`VOLUME-log`) is its application's too:
        // no other application may take it as its volume, nor have its
        // own log volume land on another's volume.
        let of_app = |v: &str| {
            apps.iter()
                .any(|a| a.owns_volume(v) || a.owns_log_volume(v))
        };
        let db = matches!(kind, "postgresql" | "mariadb");
        let log_clash = |v: &str| db && of_app(&format!("{v}-log"));
        let taken = |v: &str| of_app(v) || log_clash(v) || pool.contains(v);
        let volume = match volume {
            // Named by an admin: an existing volume (an earlier
            // application's points) may be taken on.
            Some(v) if of_app(&v) || log_clash(&v) => {
                return Err(ApiError::conflict(format!(
                    "volume {v} (or its log volume {v}-log) belongs to another application"
                )))
            }
            Some(v) => v,
            None => volume_name(host, kind, name, taken),
        };
        let now = self.now();
        let since = policy.as_ref().map(|_| now);
        let rec = self
            .state
            .append(APPS, Sync::Now, |id| AppRec {
                id,
                host: host.to_string(),
                kind: kind.to_string(),
                name: name.to_string(),
                config,
                volume,
                policy,
                discovered,
                size_bytes,
                created_unix: now,
                policy_since_unix: since,
            })
            .map_err(st)?;
        Ok(rec)
    }

    pub fn create_application(&self, c: &Caller, req: ApplicationCreate) -> ApiResult<Application> {
        check_kind(&req.kind)?;
        check_app_name(&req.name)?;
        let config = match req.config {
            Value::Null => json!({}),
            v @ Value::Object(_) => v,
            _ => return Err(ApiError::bad_request("config must be a JSON object")),
        };
        // One writer of applications at a time (no two with one volume),
        // and the checks under it: no policy deleted, no host retired
        // between the check and the store.
        let _one = lock(&self.active);
        let h: Option<HostRec> = self.state.get(HOSTS, req.host.as_str()).map_err(st)?;
        if h.is_none_or(|h| h.retired) {
            return Err(ApiError::not_found(format!(
                "host {} is not enrolled",
                req.host
            )));
        }
        if let Some(p) = &req.policy {
            self.policy_rec(p)?
                .ok_or_else(|| ApiError::not_found(format!("protection policy {p} not found")))?;
        }
        let a = self.add_app(
            &req.host, &req.kind, &req.name, config, req.volume, req.policy, false, None,
        )?;
        self.events.emit(
            "application.created",
            &a.id.to_string(),
            &c.user,
            json!({"id": a.id, "host": a.host, "kind": a.kind, "name": a.name, "volume": a.volume}),
        );
        drop(_one);
        self.public_app(a, self.now())
    }

    /// Adds or updates the applications an agent discovered; ones that
    /// disappeared are kept (their points matter).
    pub(super) fn discover(&self, host: &str, found: &[DiscoveredApp]) -> ApiResult<()> {
        let _one = lock(&self.active);
        let apps = self.apps()?;
        for d in found {
            if check_kind(&d.kind).is_err() || check_app_name(&d.name).is_err() {
                tracing::warn!(host, kind = %d.kind, name = %d.name, "discovered application ignored");
                continue;
            }
            let config = if d.config.is_object() {
                d.config.clone()
            } else {
                json!({})
            };
            match apps
                .iter()
                .find(|a| a.host == host && a.kind == d.kind && a.name == d.name)
            {
                Some(a) if a.config == config && a.size_bytes == d.size_bytes => {}
                Some(a) => {
                    let mut a = a.clone();
                    a.config = config;
                    a.size_bytes = d.size_bytes;
                    self.state.put(APPS, a.id, &a, Sync::Lazy).map_err(st)?;
                }
                None => {
                    let a = self.add_app(
                        host,
                        &d.kind,
                        &d.name,
                        config,
                        None,
                        None,
                        true,
                        d.size_bytes,
                    )?;
                    self.events.emit(
                        "application.discovered",
                        &a.id.to_string(),
                        &super::host_user(host),
                        json!({"id": a.id, "host": host, "kind": a.kind, "name": a.name, "volume": a.volume}),
                    );
                }
            }
        }
        Ok(())
    }

    pub fn delete_application(&self, c: &Caller, id: u64) -> ApiResult<()> {
        let _one = lock(&self.active);
        if !self.state.remove(APPS, id).map_err(st)? {
            return Err(ApiError::not_found(format!("application {id} not found")));
        }
        let _rpo = lock(&self.rpo);
        self.state.remove(APP_STATE, id).map_err(st)?;
        self.events.emit(
            "application.deleted",
            &id.to_string(),
            &c.user,
            json!({"id": id}),
        );
        Ok(())
    }

    pub fn assign_policy(&self, c: &Caller, id: u64, req: PolicyAssign) -> ApiResult<Application> {
        // Checked under the lock `delete_policy` holds: no application
        // ends up with a policy deleted meanwhile.
        let _one = lock(&self.active);
        if let Some(p) = &req.policy {
            self.policy_rec(p)?
                .ok_or_else(|| ApiError::not_found(format!("protection policy {p} not found")))?;
        }
        let mut a = self.app_rec(id)?;
        if a.policy != req.policy {
            a.policy = req.policy.clone();
            a.policy_since_unix = req.policy.as_ref().map(|_| self.now());
            self.state.put(APPS, id, &a, Sync::Now).map_err(st)?;
            // The new policy's schedule starts now.
            let _rpo = lock(&self.rpo);
            let mut s = self.app_state(id)?;
            s.next_due_unix = None;
            self.state.put(APP_STATE, id, &s, Sync::Now).map_err(st)?;
        }
        self.events.emit(
            "application.policy_assigned",
            &id.to_string(),
            &c.user,
            json!({"id": id, "policy": req.policy}),
        );
        drop(_one);
        self.public_app(a, self.now())
    }

    pub fn points(&self, id: u64) -> ApiResult<Vec<Point>> {
        let a = self.app_rec(id)?;
        let snaps = if a.kind == "vm" {
            // Each VM disk of the category is a volume of its own.
            let mut v = self.pool.list_snapshots(None).map_err(engine)?;
            v.retain(|s| a.owns_volume(&s.volume));
            v
        } else {
            match self.pool.list_snapshots(Some(&a.volume)) {
                Ok(s) => s,
                // No backup made the volume yet.
                Err(cdmfs::Error::NotFound(_)) => Vec::new(),
                Err(e) => return Err(engine(e)),
            }
        };
        let mut v: Vec<Point> = snaps
            .into_iter()
            .map(|s| {
                let t = s.created_ns / 1_000_000_000;
                Point {
                    volume: s.volume,
                    snapshot: s.id,
                    created: rfc3339(t),
                    created_unix: t,
                    label: s.label,
                    metadata: s.metadata,
                }
            })
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse((p.created_unix, p.snapshot)));
        Ok(v)
    }

    pub fn create_policy(&self, c: &Caller, p: ProtectionPolicy) -> ApiResult<ProtectionPolicy> {
        validate_policy(&p)?;
        if !self.state.put_new(PROTECTION, &p.name, &p).map_err(st)? {
            return Err(ApiError::conflict(format!(
                "protection policy {} exists",
                p.name
            )));
        }
        self.events.emit(
            "protection_policy.created",
            &p.name,
            &c.user,
            serde_json::to_value(&p).unwrap_or(Value::Null),
        );
        Ok(p)
    }

    pub fn policies(&self) -> ApiResult<Vec<ProtectionPolicy>> {
        self.state.all(PROTECTION).map_err(st)
    }

    pub fn policy(&self, name: &str) -> ApiResult<ProtectionPolicy> {
        self.policy_rec(name)?
            .ok_or_else(|| ApiError::not_found(format!("protection policy {name} not found")))
    }

    /// Replaces a policy: every application that has it follows.
    pub fn update_policy(
        &self,
        c: &Caller,
        name: &str,
        p: ProtectionPolicy,
    ) -> ApiResult<ProtectionPolicy> {
        if p.name != name {
            return Err(ApiError::bad_request(format!(
                "the body names policy {:?}, the path {name:?}",
                p.name
            )));
        }
        validate_policy(&p)?;
        let _one = lock(&self.active);
        let old = self.policy(name)?;
        self.state
            .put(PROTECTION, name, &p, Sync::Now)
            .map_err(st)?;
        // A new schedule starts from now for every application of the policy.
        if old.interval_seconds != p.interval_seconds || old.cron != p.cron {
            for a in self
                .apps()?
                .iter()
                .filter(|a| a.policy.as_deref() == Some(name))
            {
                let _rpo = lock(&self.rpo);
                let mut s = self.app_state(a.id)?;
                s.next_due_unix = None;
                self.state.put(APP_STATE, a.id, &s, Sync::Now).map_err(st)?;
            }
        }
        self.events.emit(
            "protection_policy.updated",
            name,
            &c.user,
            serde_json::to_value(&p).unwrap_or(Value::Null),
        );
        Ok(p)
    }

    pub fn delete_policy(&self, c: &Caller, name: &str) -> ApiResult<()> {
        let _one = lock(&self.active);
        self.policy(name)?;
        let users: Vec<u64> = self
            .apps()?
            .iter()
            .filter(|a| a.policy.as_deref() == Some(name))
            .map(|a| a.id)
            .collect();
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "protection policy {name} is assigned to applications {users:?}"
            )));
        }
        self.state.remove(PROTECTION, name).map_err(st)?;
        self.events
            .emit("protection_policy.deleted", name, &c.user, json!({}));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_are_safe_and_unique() {
        assert_eq!(
            volume_name("db1", "postgresql", "16/main", |_| false),
            "db1-postgresql-16_main"
        );
        let taken = ["h-files-a b", "h-files-a_b", "h-files-a_b-2"];
        assert_eq!(
            volume_name("h", "files", "a b", |v| taken.contains(&v)),
            "h-files-a_b-3"
        );
        assert!(
            cdm_common::names::check(&volume_name("h", "vm", &"x".repeat(300), |_| false)).is_ok()
        );
    }

    fn app(kind: &str, volume: &str) -> AppRec {
        AppRec {
            id: 1,
            host: "h".into(),
            kind: kind.into(),
            name: "n".into(),
            config: json!({}),
            volume: volume.into(),
            policy: None,
            discovered: false,
            size_bytes: None,
            created_unix: 0,
            policy_since_unix: None,
        }
    }

    #[test]
    fn a_vm_application_owns_its_vms_disks_and_nothing_else() {
        let vm = app("vm", "h-vm-web");
        for v in ["h-vm-web", "h-vm-web-web1-disk0", "h-vm-web-a-b-disk12"] {
            assert!(vm.owns_volume(v), "{v}");
        }
        for v in [
            "h-vm-web2-disk0",
            "h-vm-web-disk0",
            "h-vm-web-web1-disk",
            "h-vm-web-web1-diskx",
            "h-vm-web-web1",
            "other",
        ] {
            assert!(!vm.owns_volume(v), "{v}");
        }
        let db = app("postgresql", "h-postgresql-main");
        assert!(db.owns_volume("h-postgresql-main"));
        assert!(!db.owns_volume("h-postgresql-main-x-disk0"));
        assert!(db.owns_log_volume("h-postgresql-main-log"));
        assert!(!db.owns_volume("h-postgresql-main-log"));
        assert!(!vm.owns_log_volume("h-vm-web-log"));
        let newest = HashMap::from([
            ("h-vm-web-a-disk0".to_string(), 5),
            ("h-vm-web-b-disk0".to_string(), 9),
            ("h-vm-webx-c-disk0".to_string(), 20),
        ]);
        assert_eq!(vm.newest_in(&newest), Some(9));
        assert_eq!(db.newest_in(&newest), None);
    }

    fn pol() -> ProtectionPolicy {
        serde_json::from_value(json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 7200}))
            .unwrap()
    }

    #[test]
    fn policies_are_checked() {
        assert!(validate_policy(&pol()).is_ok());
        assert_eq!(pol().retries, 2);
        let mut p = pol();
        p.cron = Some("0 * * * *".into());
        assert!(validate_policy(&p).is_err());
        p.interval_seconds = None;
        assert!(validate_policy(&p).is_ok());
        p.cron = Some("61 * * * *".into());
        assert!(validate_policy(&p).is_err());
        let mut p = pol();
        p.interval_seconds = Some(59);
        assert!(validate_policy(&p).is_err());
        p.interval_seconds = Some(u64::MAX);
        assert!(validate_policy(&p).is_err());
        p.interval_seconds = Some(YEAR_SECS);
        assert!(validate_policy(&p).is_ok());
        p.rpo_seconds = u64::MAX;
        assert!(validate_policy(&p).is_err());
        let mut p = pol();
        p.windows = vec![Window {
            start: "22:00".into(),
            end: "25:00".into(),
        }];
        assert!(validate_policy(&p).is_err());
        let mut p = pol();
        p.bandwidth_windows = vec!["08:00-18:00=50".into()];
        assert!(validate_policy(&p).is_ok());
        p.bandwidth_windows = vec!["08:00-18:00".into()];
        assert!(validate_policy(&p).is_err());
        let mut p = pol();
        p.volume.block_size = Some(3000);
        assert!(validate_policy(&p).is_err());
    }
}

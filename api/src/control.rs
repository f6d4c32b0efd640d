//! The control plane's resources (`docs/control-plane.md`): enrolment
//! tokens, hosts, applications, protection policies, recovery points,
//! restores, job filters and logs, and the agent protocol's messages.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Seconds between an agent's heartbeats; a host is online while it was
/// seen within three of them.
pub const HEARTBEAT_SECS: u64 = 10;
/// Application kinds.
pub const APP_KINDS: [&str; 5] = ["postgresql", "mariadb", "files", "block", "vm"];

/// `POST /v1/hosts/enrolments`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentCreate {
    /// The name the host will have (else the agent's `name`, else its host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Default 3600, at most 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A one-use enrolment token.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct EnrolmentToken {
    pub token: String,
    /// RFC 3339.
    pub expires_at: String,
    pub expires_unix: u64,
    /// SHA-256 of the appliance's CA certificate, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_sha256: Option<String>,
}

/// An enrolled host.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Host {
    pub name: String,
    /// `online`, `offline` or `retired`.
    pub state: String,
    /// RFC 3339, null before the first heartbeat.
    pub last_seen: Option<String>,
    pub last_seen_unix: Option<u64>,
    pub hostname: String,
    pub version: String,
    pub os: String,
    pub capabilities: Vec<String>,
    /// Job ids the agent reported running in its last heartbeat.
    pub running_jobs: Vec<u64>,
    pub enrolled_unix: u64,
}

/// `POST /v1/agent/enrol` (the token is the authentication).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct AgentEnrol {
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub hostname: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub os: String,
}

/// The answer to an enrolment: the host's own credential.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct AgentEnrolled {
    pub host: String,
    /// A bearer token of role `host`.
    pub credential: String,
    pub heartbeat_seconds: u64,
}

/// An application the agent found on its host.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct DiscoveredApp {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub config: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// `POST /v1/agent/heartbeat`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
pub struct Heartbeat {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Ids of the jobs the agent runs now.
    #[serde(default)]
    pub running: Vec<u64>,
    /// True on the agent's first heartbeat after it started.
    #[serde(default)]
    pub first: bool,
    #[serde(default)]
    pub applications: Vec<DiscoveredApp>,
    /// The state of each log archiver the agent runs (one per
    /// [`ArchiveTask`] it was given); one still starting is left out.
    #[serde(default)]
    pub archives: Vec<ArchiveReport>,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct HeartbeatReply {
    pub heartbeat_seconds: u64,
    /// The log archivers the host should run: its database applications
    /// whose policy has `archive_logs` (older agents ignore it).
    #[serde(default)]
    pub archives: Vec<ArchiveTask>,
}

/// A log archiver an agent keeps running (`cdm-agent logs KIND`).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct ArchiveTask {
    /// The application's id.
    pub application: u64,
    /// `postgresql` or `mariadb`.
    pub kind: String,
    /// The application's stage volume: the archive is `VOLUME-log`.
    pub volume: String,
    /// The application's config (how to reach the server).
    #[serde(default)]
    pub config: Value,
}

/// How one of the agent's log archivers fares.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct ArchiveReport {
    pub application: u64,
    /// `streaming` (its coverage advances) or `failing`.
    pub state: String,
    /// Unix seconds (the server's clock) up to which the archive is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covered_unix: Option<u64>,
    /// Why it is failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An application's continuous log archiving, as the appliance last heard
/// of it.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct LogArchiveStatus {
    /// `streaming`, `failing`, `stale` (the host's heartbeats stopped) or
    /// `starting` (no report yet).
    pub state: String,
    /// RFC 3339: up to when the archive is complete.
    pub covered: Option<String>,
    pub covered_unix: Option<u64>,
    /// Seconds between `covered_unix` and now.
    pub lag_seconds: Option<u64>,
    pub error: Option<String>,
}

/// The last backup job of an application.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct JobBrief {
    pub id: u64,
    pub state: String,
    pub message: String,
}

/// An application's recovery point objective, as of now.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct RpoStatus {
    /// `ok`, `late`, `failing` or `unprotected`.
    pub state: String,
    /// RFC 3339 of the newest point.
    pub last_point: Option<String>,
    pub last_point_unix: Option<u64>,
    pub age_seconds: Option<u64>,
    pub rpo_seconds: Option<u64>,
    pub last_job: Option<JobBrief>,
}

/// A protected object: a database cluster, a file tree, a block device, VMs.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Application {
    pub id: u64,
    pub host: String,
    /// `postgresql`, `mariadb`, `files`, `block` or `vm`.
    pub kind: String,
    pub name: String,
    pub config: Value,
    /// The stage volume its points are snapshots of.
    pub volume: String,
    pub policy: Option<String>,
    pub discovered: bool,
    pub size_bytes: Option<u64>,
    pub created_unix: u64,
    pub rpo: RpoStatus,
    /// Its continuous log archiving; null when its policy does not
    /// archive logs.
    #[serde(default)]
    pub log_archive: Option<LogArchiveStatus>,
}

/// `POST /v1/applications`: an application registered by hand.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ApplicationCreate {
    pub host: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub config: Value,
    /// Default `{host}-{kind}-{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// `PUT /v1/applications/{id}/policy`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct PolicyAssign {
    pub policy: Option<String>,
}

/// A time of day (UTC) when backups may start: `start` ≤ t < `end`
/// (`HH:MM`); a window whose end is before its start spans midnight.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start: String,
    pub end: String,
}

/// Settings of the stage volumes of a policy's applications.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<bool>,
    /// zstd level, 0 = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<u8>,
    /// `none`, `aes-256-xts`, `aes-128-xts` or `sm4-xts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

/// A protection policy (SLA template), assigned to applications.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProtectionPolicy {
    pub name: String,
    /// Backup every this many seconds (≥ 60); or `cron`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<u64>,
    /// Five-field cron expression (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// When backups may start; empty = any time.
    #[serde(default)]
    pub windows: Vec<Window>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_keep: Option<u32>,
    /// Largest age of the newest good point before the application is late.
    pub rpo_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mibps: Option<u64>,
    /// `HH:MM-HH:MM=MIBPS`.
    #[serde(default)]
    pub bandwidth_windows: Vec<String>,
    #[serde(default)]
    pub volume: VolumeSettings,
    /// Retries of a failed scheduled backup (default 2).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Reserved for replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Value>,
    /// A recovery drill every this many seconds (`docs/control-plane.md`, "Drills").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_interval_seconds: Option<u64>,
    /// Which point a scheduled drill takes: `"latest"` (default) or
    /// `{"random_within_days": N}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_point: Option<crate::drills::DrillPoint>,
    /// The drill's own checks (SQL with an expected answer, or files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drill_probes: Vec<crate::drills::DrillProbe>,
    /// Targets the drill's measured RTO and RPO are compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_rto_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_rpo_seconds: Option<u64>,
    /// A drill's time limit (default 600 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_timeout_seconds: Option<u64>,
    /// Where database drills run (default: the application's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_host: Option<String>,
    /// Archive the logs of its `postgresql` and `mariadb` applications
    /// continuously (their agents run `cdm-agent logs`): restores to any
    /// time, RPO of seconds. Ignored for other kinds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub archive_logs: bool,
}

fn default_retries() -> u32 {
    2
}

/// A recovery point: a snapshot of an application's volume.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Point {
    pub volume: String,
    pub snapshot: u64,
    /// RFC 3339.
    pub created: String,
    pub created_unix: u64,
    pub label: String,
    pub metadata: Value,
}

/// `POST /v1/applications/{id}/restores`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RestoreCreate {
    /// `instant`, `clone` or `regular`.
    pub kind: String,
    /// Default: the newest point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<u64>,
    /// Default: the application's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// For `regular`: the directory to restore into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A point in time (RFC 3339 with a zone) instead of `snapshot`: the
    /// nearest earlier point, archived logs replayed up to it (`instant`
    /// or `clone`; needs log archiving).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_time: Option<String>,
    /// PostgreSQL: an LSN (`X/Y`) to replay up to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_lsn: Option<String>,
    /// PostgreSQL: a restore point's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_name: Option<String>,
    /// MariaDB: a GTID (`domain-server-seq`) to replay up to, included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_gtid: Option<String>,
}

impl RestoreCreate {
    /// The point-in-time target as `(job parameter, value)`, checked
    /// against the application's kind; `None` for a restore of a point.
    pub fn pitr_target(&self, app_kind: &str) -> Result<Option<(&'static str, String)>, String> {
        let set: Vec<(&'static str, &String)> = [
            ("target_time", &self.target_time),
            ("target_lsn", &self.target_lsn),
            ("target_name", &self.target_name),
            ("target_gtid", &self.target_gtid),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect();
        let (key, value) = match set.as_slice() {
            [] => return Ok(None),
            [one] => *one,
            _ => {
                return Err("give one of target_time, target_lsn, target_name, target_gtid".into())
            }
        };
        if self.snapshot.is_some() {
            return Err(format!("give \"snapshot\" or \"{key}\", not both"));
        }
        if self.kind == "regular" {
            return Err("a point-in-time restore is instant or clone".into());
        }
        let pg = app_kind == "postgresql";
        let ok_kind = match key {
            "target_time" => pg || app_kind == "mariadb",
            "target_gtid" => app_kind == "mariadb",
            _ => pg,
        };
        if !ok_kind {
            return Err(format!(
                "{key} does not apply to an application of kind {app_kind}"
            ));
        }
        let v = match key {
            "target_time" => match crate::instant::parse_rfc3339(value) {
                Some(us) => crate::instant::rfc3339_us(us),
                None => {
                    return Err(format!(
                        "target_time {value:?} is not an RFC 3339 time with a zone"
                    ))
                }
            },
            "target_lsn" => {
                let ok = value.split_once('/').is_some_and(|(a, b)| {
                    !a.is_empty()
                        && !b.is_empty()
                        && a.len() <= 8
                        && b.len() <= 8
                        && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_hexdigit())
                });
                if !ok {
                    return Err(format!("target_lsn {value:?} is not an LSN (X/Y)"));
                }
                value.clone()
            }
            "target_name" => {
                if value.is_empty() || value.len() > 63 || value.contains(['\'', '\\', '\n']) {
                    return Err(format!("target_name {value:?} is not a restore point name"));
                }
                value.clone()
            }
            _ => {
                let p: Vec<&str> = value.split('-').collect();
                if p.len() != 3
                    || p.iter()
                        .any(|x| x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()))
                {
                    return Err(format!(
                        "target_gtid {value:?} is not a GTID (domain-server-seq)"
                    ));
                }
                value.clone()
            }
        };
        Ok(Some((key, v)))
    }
}

/// Filters of `GET /v1/jobs`.
#[derive(Serialize, Deserialize, ToSchema, utoipa::IntoParams, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// `GET /v1/applications?host=H`.
#[derive(Serialize, Deserialize, utoipa::IntoParams, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct AppQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// One line of a job's log.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct LogLine {
    pub time_unix: u64,
    pub line: String,
}

/// `GET /v1/jobs/{id}/log`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
pub struct JobLog {
    pub lines: Vec<LogLine>,
}

/// A job handed to an agent.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct AgentJob {
    pub id: u64,
    /// `backup` or `restore`.
    pub kind: String,
    pub attempt: u32,
    pub application: Application,
    pub params: Value,
    pub volume_settings: VolumeSettings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mibps: Option<u64>,
    #[serde(default)]
    pub bandwidth_windows: Vec<String>,
}

/// `GET /v1/agent/jobs?wait=SECONDS&slots=N`.
#[derive(Serialize, Deserialize, utoipa::IntoParams, Clone, Debug, Default)]
pub struct AgentPull {
    /// At most 30.
    #[serde(default)]
    pub wait: Option<u64>,
    /// The agent's free job slots: at most this many jobs are handed out
    /// (absent: as many as the appliance's limits allow).
    #[serde(default)]
    pub slots: Option<usize>,
}

/// `POST /v1/agent/jobs/{id}/progress`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
pub struct AgentProgress {
    #[serde(default)]
    pub done: u64,
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub log: Vec<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct ProgressReply {
    /// The job was cancelled: stop it and finish it as `cancelled`.
    pub cancel: bool,
}

/// `POST /v1/agent/jobs/{id}/finish`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct AgentFinish {
    /// `succeeded`, `failed` or `cancelled`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub log: Vec<String>,
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds.
pub fn rfc3339(unix: u64) -> String {
    let s = crate::cron::utc(unix);
    format!("{}Z", s.replacen(' ', "T", 1))
}

/// Minutes after midnight of `HH:MM`.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl Window {
    /// Whether minute-of-day `m` is inside (`None` if the window is malformed).
    pub fn contains(&self, m: u32) -> Option<bool> {
        let (s, e) = (parse_hhmm(&self.start)?, parse_hhmm(&self.end)?);
        Some(if s <= e {
            (s..e).contains(&m)
        } else {
            m >= s || m < e
        })
    }
}

/// Whether backups may start at `unix` under `windows` (empty: always).
pub fn in_windows(windows: &[Window], unix: u64) -> bool {
    let m = ((unix % 86_400) / 60) as u32;
    windows.is_empty() || windows.iter().any(|w| w.contains(m) == Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_times() {
        assert_eq!(rfc3339(1_795_484_096), "2026-11-24T01:34:56Z");
        assert_eq!(parse_hhmm("23:59"), Some(23 * 60 + 59));
        assert_eq!(parse_hhmm("24:00"), None);
        assert_eq!(parse_hhmm("1:00"), None);
        let night = Window {
            start: "22:00".into(),
            end: "02:00".into(),
        };
        let day = Window {
            start: "09:00".into(),
            end: "17:00".into(),
        };
        assert_eq!(night.contains(23 * 60), Some(true));
        assert_eq!(night.contains(60), Some(true));
        assert_eq!(night.contains(2 * 60), Some(false));
        assert_eq!(day.contains(9 * 60), Some(true));
        assert_eq!(day.contains(17 * 60), Some(false));
        assert!(in_windows(&[], 0));
        assert!(in_windows(std::slice::from_ref(&night), 0));
        assert!(!in_windows(&[day], 0));
    }
}

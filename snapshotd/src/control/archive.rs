//! Continuous log archiving driven by policies: each heartbeat is answered
//! with the archivers its host should run (its `postgresql` and `mariadb`
//! applications whose policy has `archive_logs`), and the agent's reports
//! of them are kept (in memory: the next heartbeat brings them again) and
//! shown as `Application.log_archive`, with `log_archive.failing` and
//! `log_archive.recovered` raised on each change.

use std::collections::HashMap;

use cdm_api::control::*;
use cdm_api::ApiResult;
use serde_json::json;

use super::{host_user, lock, AppRec, Control};

/// The longest error text kept from an agent's report.
const ERROR_MAX: usize = 2000;

/// What the appliance keeps of one application's archiver.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct ArchiveSeen {
    /// The agent's last report; `None` while the archiver starts.
    pub report: Option<ArchiveReport>,
    /// `log_archive.failing` was raised and its recovery is owed.
    pub alerted: bool,
}

/// Whether the logs of `a` are archived under `policy`.
pub(super) fn archives(a: &AppRec, policy: Option<&ProtectionPolicy>) -> bool {
    matches!(a.kind.as_str(), "postgresql" | "mariadb") && policy.is_some_and(|p| p.archive_logs)
}

/// The event a report's arrival raises, and the new `alerted`: a failure
/// is said once, and its recovery once after it.
pub(super) fn transition(seen: &ArchiveSeen, state: &str) -> (Option<&'static str>, bool) {
    match state {
        "failing" if !seen.alerted => (Some("log_archive.failing"), true),
        "streaming" if seen.alerted => (Some("log_archive.recovered"), false),
        _ => (None, seen.alerted),
    }
}

/// The public status from what was kept; `online`: the host's heartbeats
/// still come (else the report is stale).
pub(super) fn status(seen: Option<&ArchiveSeen>, online: bool, now: u64) -> LogArchiveStatus {
    let report = seen.and_then(|s| s.report.as_ref());
    let state = match (online, report) {
        (false, _) => "stale".to_string(),
        (true, Some(r)) => r.state.clone(),
        (true, None) => "starting".to_string(),
    };
    let covered_unix = report.and_then(|r| r.covered_unix);
    LogArchiveStatus {
        state,
        covered: covered_unix.map(rfc3339),
        covered_unix,
        lag_seconds: covered_unix.map(|c| now.saturating_sub(c)),
        error: report.and_then(|r| r.error.clone()),
    }
}

/// A report as kept: only the states the contract knows, errors bounded.
fn clean(r: &ArchiveReport) -> Option<ArchiveReport> {
    if !matches!(r.state.as_str(), "streaming" | "failing") {
        return None;
    }
    let error = r.error.as_ref().map(|e| {
        let mut e = e.clone();
        if e.len() > ERROR_MAX {
            let mut cut = ERROR_MAX;
            while !e.is_char_boundary(cut) {
                cut -= 1;
            }
            e.truncate(cut);
            e.push('…');
        }
        e
    });
    Some(ArchiveReport {
        error: error.filter(|_| r.state == "failing"),
        ..r.clone()
    })
}

impl Control {
    /// The archivers `host` should run.
    pub(super) fn archive_tasks(&self, host: &str) -> ApiResult<Vec<ArchiveTask>> {
        let policies = self.policy_map()?;
        Ok(self
            .apps()?
            .into_iter()
            .filter(|a| a.host == host)
            .filter(|a| archives(a, a.policy.as_ref().and_then(|p| policies.get(p))))
            .map(|a| ArchiveTask {
                application: a.id,
                kind: a.kind,
                volume: a.volume,
                config: a.config,
            })
            .collect())
    }

    /// Keeps the reports of a heartbeat of `host` for its `tasks` (an
    /// application missing from them is starting; one no longer a task is
    /// forgotten) and raises the events of changes.
    pub(super) fn archive_reports(
        &self,
        host: &str,
        tasks: &[ArchiveTask],
        reports: &[ArchiveReport],
    ) -> ApiResult<()> {
        let now = self.now();
        let by_app: HashMap<u64, &ArchiveReport> =
            reports.iter().map(|r| (r.application, r)).collect();
        let mut events = Vec::new();
        {
            let mut kept = lock(&self.archives);
            let apps = self.apps()?;
            // This host's applications that are no longer tasks.
            kept.retain(|id, _| {
                tasks.iter().any(|t| t.application == *id)
                    || !apps.iter().any(|a| a.id == *id && a.host == host)
            });
            for t in tasks {
                let seen = kept.entry(t.application).or_default();
                let report = by_app.get(&t.application).and_then(|r| clean(r));
                if let Some(r) = &report {
                    let (event, alerted) = transition(seen, &r.state);
                    seen.alerted = alerted;
                    if let Some(kind) = event {
                        events.push((kind, t.application, r.clone()));
                    }
                }
                seen.report = report;
            }
        }
        for (kind, id, r) in events {
            let name = self.app_rec(id).map(|a| a.name).unwrap_or_default();
            tracing::warn!(application = id, host, state = %r.state, error = ?r.error, "log archive state changed");
            self.events.emit(
                kind,
                &id.to_string(),
                &host_user(host),
                json!({"id": id, "host": host, "name": name, "state": r.state,
                       "covered": r.covered_unix.map(rfc3339), "covered_unix": r.covered_unix,
                       "lag_seconds": r.covered_unix.map(|c| now.saturating_sub(c)),
                       "error": r.error}),
            );
        }
        Ok(())
    }

    /// `Application.log_archive` of `a`.
    pub(super) fn log_archive(
        &self,
        a: &AppRec,
        policy: Option<&ProtectionPolicy>,
        now: u64,
    ) -> Option<LogArchiveStatus> {
        if !archives(a, policy) {
            return None;
        }
        let kept = lock(&self.archives);
        Some(status(kept.get(&a.id), self.online(&a.host, now), now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn rec(kind: &str) -> AppRec {
        AppRec {
            id: 7,
            host: "db1".into(),
            kind: kind.into(),
            name: "main".into(),
            config: Value::Null,
            volume: "db1-pg".into(),
            policy: Some("p".into()),
            discovered: true,
            size_bytes: None,
            created_unix: 0,
            policy_since_unix: None,
        }
    }

    fn report(state: &str, covered: Option<u64>, error: Option<&str>) -> ArchiveReport {
        ArchiveReport {
            application: 7,
            state: state.into(),
            covered_unix: covered,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn only_databases_of_archiving_policies_archive() {
        let mut p: ProtectionPolicy = serde_json::from_value(
            json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 7200}),
        )
        .unwrap();
        assert!(!p.archive_logs, "off unless asked");
        assert!(!archives(&rec("postgresql"), Some(&p)));
        p.archive_logs = true;
        assert!(archives(&rec("postgresql"), Some(&p)));
        assert!(archives(&rec("mariadb"), Some(&p)));
        assert!(!archives(&rec("files"), Some(&p)));
        assert!(!archives(&rec("postgresql"), None));
        // Older appliances' policies read as not archiving, and the field
        // is left out when off (older appliances refuse unknown fields).
        let v = serde_json::to_value(ProtectionPolicy {
            archive_logs: false,
            ..p.clone()
        })
        .unwrap();
        assert!(v.get("archive_logs").is_none(), "{v}");
        assert_eq!(serde_json::to_value(&p).unwrap()["archive_logs"], true);
    }

    #[test]
    fn failures_are_said_once_and_recoveries_follow_them() {
        let mut s = ArchiveSeen::default();
        assert_eq!(transition(&s, "streaming"), (None, false));
        assert_eq!(
            transition(&s, "failing"),
            (Some("log_archive.failing"), true)
        );
        s.alerted = true;
        assert_eq!(transition(&s, "failing"), (None, true));
        assert_eq!(
            transition(&s, "streaming"),
            (Some("log_archive.recovered"), false)
        );
    }

    #[test]
    fn the_status_says_starting_streaming_failing_or_stale() {
        assert_eq!(status(None, true, 100).state, "starting");
        assert_eq!(status(None, false, 100).state, "stale");
        let seen = ArchiveSeen {
            report: Some(report("streaming", Some(90), None)),
            alerted: false,
        };
        let s = status(Some(&seen), true, 100);
        assert_eq!(s.state, "streaming");
        assert_eq!(s.covered_unix, Some(90));
        assert_eq!(s.lag_seconds, Some(10));
        assert_eq!(s.covered.as_deref(), Some("1970-01-01T00:01:30Z"));
        let s = status(Some(&seen), false, 100);
        assert_eq!(s.state, "stale");
        assert_eq!(s.covered_unix, Some(90), "what was covered stays known");
        let failing = ArchiveSeen {
            report: Some(report("failing", Some(90), Some("server down"))),
            alerted: true,
        };
        let s = status(Some(&failing), true, 100);
        assert_eq!(
            (s.state.as_str(), s.error.as_deref()),
            ("failing", Some("server down"))
        );
    }

    #[test]
    fn reports_are_checked_and_bounded() {
        assert_eq!(clean(&report("dancing", None, None)), None);
        let long = "é".repeat(ERROR_MAX);
        let r = clean(&report("failing", None, Some(&long))).unwrap();
        assert!(r.error.as_ref().unwrap().len() <= ERROR_MAX + '…'.len_utf8());
        // A streaming archiver has no error to show.
        let r = clean(&report("streaming", Some(5), Some("old"))).unwrap();
        assert_eq!(r.error, None);
    }
}

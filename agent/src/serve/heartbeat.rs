//! Who this host is (version, OS, hostname, capabilities) and the
//! heartbeat that says it, with the jobs the service runs, what discovery
//! found and how its log archivers fare.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::discover::{self, Discovered};
use super::{Backoff, ServeError, Service, Stop};

/// What the agent can protect.
pub const CAPABILITIES: [&str; 5] = ["postgresql", "mariadb", "files", "block", "vm"];

/// Discovery walks data directories for their size: not on every beat.
const DISCOVERY_EVERY: Duration = Duration::from_secs(60);

/// `PRETTY_NAME` of an os-release file (else `NAME VERSION_ID`, else
/// the kernel's name and release).
pub fn os_name(os_release: &Path) -> String {
    let text = std::fs::read_to_string(os_release).unwrap_or_default();
    let get = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').trim_matches('\'').to_string())
        })
    };
    if let Some(p) = get("PRETTY_NAME").filter(|p| !p.is_empty()) {
        return p;
    }
    if let Some(n) = get("NAME") {
        return format!("{n} {}", get("VERSION_ID").unwrap_or_default())
            .trim()
            .to_string();
    }
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "{} {}",
        read("/proc/sys/kernel/ostype"),
        read("/proc/sys/kernel/osrelease")
    )
    .trim()
    .to_string()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The heartbeats' state: discovery results and whether one beat was
/// acknowledged since the service started.
pub struct Beats {
    first: bool,
    discovered: Vec<Discovered>,
    discovered_at: Option<Instant>,
    /// What the appliance acknowledged last: sent again only when changed.
    sent: Option<Vec<Discovered>>,
}

impl Beats {
    pub fn new() -> Beats {
        Beats {
            first: true,
            discovered: Vec::new(),
            discovered_at: None,
            sent: None,
        }
    }

    /// The body of the next heartbeat.
    pub fn body(&mut self, svc: &Service) -> Value {
        if let Some(roots) = &svc.discover {
            if self
                .discovered_at
                .is_none_or(|t| t.elapsed() >= DISCOVERY_EVERY)
            {
                self.discovered = discover::all(roots);
                self.discovered_at = Some(Instant::now());
            }
        }
        let apps = if self.sent.as_ref() == Some(&self.discovered) {
            Vec::new()
        } else {
            self.discovered.clone()
        };
        json!({
            "version": version(),
            "os": svc.os,
            "hostname": hostname(),
            "capabilities": CAPABILITIES,
            "running": svc.running_ids(),
            "first": self.first,
            "applications": apps,
            "archives": svc.archivers.reports(),
        })
    }

    /// One heartbeat; `Ok` with the interval the appliance asks for. The
    /// log archivers follow its answer.
    pub fn beat(&mut self, svc: &Arc<Service>) -> Result<u64, ServeError> {
        let body = self.body(svc);
        let answer = svc.link.heartbeat(&body)?;
        if self.first {
            tracing::info!(host = %svc.host, "first heartbeat acknowledged");
        }
        self.first = false;
        self.sent = Some(self.discovered.clone());
        svc.archivers.reconcile(svc, &answer.archives);
        Ok(answer.interval)
    }
}

impl Default for Beats {
    fn default() -> Self {
        Beats::new()
    }
}

/// Beats until the service stops; keeps going through outages (retrying
/// sooner than the interval, with backoff) and stops the service when the
/// credential is refused.
pub fn run(svc: Arc<Service>, mut beats: Beats, mut interval: u64) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(interval.max(1)));
    let mut wait = Duration::from_secs(interval);
    while !svc.stop.wait(wait) {
        match beats.beat(&svc) {
            Ok(secs) => {
                if backoff.failures() > 0 {
                    tracing::info!("the appliance answers heartbeats again");
                }
                backoff.reset();
                interval = secs;
                wait = Duration::from_secs(interval);
            }
            Err(ServeError::Retired(m)) => {
                svc.stop.trigger(Stop::Retired(m));
                return;
            }
            Err(e) => {
                wait = backoff.pause();
                if backoff.failures() == 1 || backoff.failures().is_multiple_of(10) {
                    tracing::warn!(error = %e, failures = backoff.failures(), "heartbeat failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("os-release");
        std::fs::write(&p, "NAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").unwrap();
        assert_eq!(os_name(&p), "Debian GNU/Linux 12 (bookworm)");
        std::fs::write(&p, "NAME=Alpine\nVERSION_ID=3.19\n").unwrap();
        assert_eq!(os_name(&p), "Alpine 3.19");
        assert!(!os_name(&d.path().join("missing")).is_empty());
    }
}

//! Boot assessment: after a boot, wait until the appliance answers its
//! health URL (`200` with JSON `status == "ok"`: snapshotd up, pool open,
//! API answering), then bless the booted entry: `cdm-a+N-M.conf` becomes
//! `cdm-a.conf`, so systemd-boot stops counting it down. If the appliance
//! does not get healthy in time, nothing is renamed; the unit's
//! FailureAction reboots, each boot costs a try, and at zero tries the
//! other slot boots.

use std::time::{Duration, Instant};

use crate::slots::{EntryName, EntryState, Esp, Slot, SlotError};
use crate::status::{self, Paths};

/// A single request waits at most this long, so a hung server cannot use
/// up the whole timeout in one try.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{url} did not report healthy within {secs} s (last answer: {last})")]
    Timeout {
        url: String,
        secs: u64,
        last: String,
    },
    #[error("{why} (last answer: {last})")]
    Failed { why: String, last: String },
    #[error(transparent)]
    Slot(#[from] SlotError),
}

/// What `cdm-update health` found.
#[derive(Debug)]
pub enum Verdict {
    /// Healthy; the booted entry renamed from, to (None: it needed no blessing).
    Healthy(Option<(String, String)>),
    /// Unhealthy on a slot being tried: the caller fails so the unit's
    /// FailureAction reboots, costing the slot a try.
    RollBack(HealthError),
    /// Unhealthy on a slot already good (or booted by hand): another
    /// boot of the same slot would not help, and the other slot may be
    /// older than the pool; the admin must look (the banner warns).
    Unhealthy(HealthError),
}

/// One request: Ok if healthy, else what was wrong.
fn probe(url: &str, timeout: Duration) -> Result<(), String> {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    let resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => format!("HTTP {code}"),
        other => other.to_string(),
    })?;
    let v: serde_json::Value = resp.into_json().map_err(|e| format!("not JSON: {e}"))?;
    match v.get("status").and_then(|s| s.as_str()) {
        Some("ok") => Ok(()),
        other => Err(format!("status {other:?}")),
    }
}

/// Polls `url` until it is healthy or `timeout` passes, or `gave_up`
/// says the service behind it has failed for good (no point waiting out
/// the timeout: a slot being tried then reboots minutes sooner).
pub fn wait_healthy(
    url: &str,
    timeout: Duration,
    gave_up: &dyn Fn() -> Option<String>,
) -> Result<(), HealthError> {
    let deadline = Instant::now() + timeout;
    let mut last = "no answer yet".to_string();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HealthError::Timeout {
                url: url.into(),
                secs: timeout.as_secs(),
                last,
            });
        }
        match probe(url, left.min(REQUEST_TIMEOUT)) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::debug!("{url}: {e}");
                last = e;
            }
        }
        if let Some(why) = gave_up() {
            return Err(HealthError::Failed { why, last });
        }
        std::thread::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// A `gave_up` check for [`wait_healthy`]: the systemd unit `unit` is in
/// the failed state (it exhausted its restarts). None where systemctl
/// cannot tell (no systemd: a test, a container).
pub fn unit_failed(unit: &str) -> Option<String> {
    let out = std::process::Command::new("systemctl")
        .args(["is-failed", "--quiet", unit])
        .status()
        .ok()?;
    out.success().then(|| format!("{unit} has failed"))
}

/// Blesses the booted slot's entry; returns the (old, new) names if one was
/// renamed. An entry already blessed, or none at all (booted by hand), is
/// left as it is.
pub fn bless(p: &Paths) -> Result<Option<(String, String)>, SlotError> {
    let esp = p.esp();
    // Not booted from a slot (a recovery or hand-made boot): nothing to
    // bless, and failing would make the unit reboot a healthy system.
    let booted = match p.booted() {
        Ok(s) => s,
        Err(SlotError::NotBooted) => {
            tracing::warn!(
                "healthy, but no cdm.slot= on the kernel command line: nothing to bless"
            );
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let _lock = esp.lock()?;
    let Some(e) = esp.slot_entry(&esp.entries()?, booted) else {
        tracing::warn!("no boot entry for the booted slot {}", booted.name());
        return Ok(None);
    };
    if e.name.state() == EntryState::Good {
        raise_index(&esp, booted)?;
        return Ok(None);
    }
    let good = EntryName {
        slot: booted,
        tries_left: None,
        tries_done: None,
    }
    .file_name();
    let dir = esp.entries_dir();
    std::fs::rename(dir.join(&e.file), dir.join(&good)).map_err(crate::slots::io_at(&dir))?;
    cdm_common::fs::sync_dir(&dir)?;
    tracing::info!("blessed {} -> {good}", e.file);
    raise_index(&esp, booted)?;
    Ok(Some((e.file, good)))
}

/// A blessed slot's rollback index becomes the appliance's floor: from
/// now on older bundles are downgrades. Also on an entry already good,
/// so a raise cut short (power loss) is made at the next healthy boot.
fn raise_index(esp: &Esp, booted: Slot) -> Result<(), SlotError> {
    match esp.installed(booted) {
        Some(m) => {
            let now = esp.raise_rollback_index(m.rollback_index)?;
            tracing::info!("rollback index {now} (slot {})", booted.name());
        }
        None => tracing::warn!(
            "slot {} has no readable manifest: rollback index left as it is",
            booted.name()
        ),
    }
    Ok(())
}

/// `cdm-update health`: wait, bless, write the status (also on failure).
pub fn run(
    p: &Paths,
    url: &str,
    timeout: Duration,
    gave_up: &dyn Fn() -> Option<String>,
) -> Result<Verdict, HealthError> {
    let v = match wait_healthy(url, timeout, gave_up) {
        Ok(()) => match bless(p) {
            Ok(r) => Verdict::Healthy(r),
            // A slot still being tried (the rename itself failed) must
            // not stay: the error fails the unit and the reboot costs it
            // a try. Asked after the error: a rename that went through
            // made the slot good, and then rebooting cannot help.
            Err(e) if being_tried(p) => return Err(e.into()),
            // On a good slot (or when the entries cannot even be listed)
            // a reboot would not mend the ESP, it would loop: report it.
            Err(e) => Verdict::Unhealthy(e.into()),
        },
        Err(e) if being_tried(p) => Verdict::RollBack(e),
        Err(e) => Verdict::Unhealthy(e),
    };
    if let Err(e) = status::refresh(p, None) {
        tracing::warn!(
            "cannot write the status file {}: {e}",
            p.status_file.display()
        );
    }
    Ok(v)
}

/// Whether the booted slot's entry is still counting its tries, its last
/// try included (`EntryName::counting`).
fn being_tried(p: &Paths) -> bool {
    let esp = p.esp();
    let Ok(booted) = p.booted() else {
        return false;
    };
    esp.entries()
        .ok()
        .and_then(|all| esp.slot_entry(&all, booted))
        .is_some_and(|e| e.name.counting())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::site;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A one-thread HTTP server answering every request with `code` and
    /// `body`; returns its URL.
    fn server(code: u16, body: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/health", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        url
    }

    fn entries(p: &Paths) -> Vec<String> {
        p.esp()
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| e.file)
            .collect()
    }

    fn never() -> Option<String> {
        None
    }

    fn healthy(v: Verdict) -> Option<(String, String)> {
        match v {
            Verdict::Healthy(r) => r,
            other => panic!("not healthy: {other:?}"),
        }
    }

    fn rolls_back(v: Verdict) -> HealthError {
        match v {
            Verdict::RollBack(e) => e,
            other => panic!("no roll-back: {other:?}"),
        }
    }

    #[test]
    fn healthy_blesses_the_booted_counting_entry() {
        let (_d, p) = site("b");
        let dir = p.esp().entries_dir();
        std::fs::write(dir.join("cdm-a.conf"), "version 1\n").unwrap();
        std::fs::write(dir.join("cdm-b+2-1.conf"), "version 2\n").unwrap();
        let url = server(200, r#"{"status": "ok"}"#);
        let r = healthy(run(&p, &url, Duration::from_secs(10), &never).unwrap());
        assert_eq!(r, Some(("cdm-b+2-1.conf".into(), "cdm-b.conf".into())));
        assert_eq!(entries(&p), ["cdm-a.conf", "cdm-b.conf"]);
        assert_eq!(
            std::fs::read_to_string(dir.join("cdm-b.conf")).unwrap(),
            "version 2\n"
        );
        let s = status::collect(&p, None).unwrap();
        assert_eq!(s.slots[1].state, "good");
        assert!(p.status_file.exists());
        // Already good: nothing to do.
        assert_eq!(
            healthy(run(&p, &url, Duration::from_secs(10), &never).unwrap()),
            None
        );
        // Booted without cdm.slot=: healthy, nothing renamed.
        std::fs::rename(dir.join("cdm-b.conf"), dir.join("cdm-b+1-2.conf")).unwrap();
        std::fs::write(&p.cmdline, "root=/dev/sda2\n").unwrap();
        assert_eq!(
            healthy(run(&p, &url, Duration::from_secs(10), &never).unwrap()),
            None
        );
        assert_eq!(entries(&p), ["cdm-a.conf", "cdm-b+1-2.conf"]);
    }

    fn manifest(p: &Paths, slot: Slot, index: u64) {
        let dir = p.esp().slot_dir(slot);
        std::fs::create_dir_all(&dir).unwrap();
        let m = serde_json::json!({"format": 1, "compatible": "cdm-appliance", "arch": "x86_64",
            "version": "0.2.0", "key_id": "0011223344556677", "rollback_index": index, "files": []});
        std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    }

    #[test]
    fn bless_raises_the_rollback_index_never_lowers_it() {
        let (_d, p) = site("b");
        let dir = p.esp().entries_dir();
        std::fs::write(dir.join("cdm-b+2-1.conf"), "version 2\n").unwrap();
        manifest(&p, Slot::B, 42);
        let url = server(200, r#"{"status": "ok"}"#);
        healthy(run(&p, &url, Duration::from_secs(10), &never).unwrap());
        assert_eq!(p.esp().rollback_index().unwrap(), 42);
        // Already good, an older manifest by hand: the index stays.
        manifest(&p, Slot::B, 7);
        healthy(run(&p, &url, Duration::from_secs(10), &never).unwrap());
        assert_eq!(p.esp().rollback_index().unwrap(), 42);
        // A newer one on an entry already good (a raise cut short) is made.
        manifest(&p, Slot::B, 43);
        healthy(run(&p, &url, Duration::from_secs(10), &never).unwrap());
        assert_eq!(p.esp().rollback_index().unwrap(), 43);
    }

    #[test]
    fn an_esp_error_on_a_good_slot_is_unhealthy_not_a_reboot() {
        let (_d, p) = site("b");
        let esp = p.esp();
        std::fs::write(esp.entries_dir().join("cdm-b.conf"), "version 2\n").unwrap();
        manifest(&p, Slot::B, 42);
        std::fs::write(esp.rollback_index_file(), "garbled\n").unwrap();
        let url = server(200, r#"{"status": "ok"}"#);
        match run(&p, &url, Duration::from_secs(10), &never).unwrap() {
            Verdict::Unhealthy(e) => assert!(e.to_string().contains("not a rollback index"), "{e}"),
            other => panic!("{other:?}"),
        }
        // The entries cannot even be listed.
        std::fs::remove_file(esp.rollback_index_file()).unwrap();
        std::fs::remove_dir_all(esp.entries_dir()).unwrap();
        std::fs::write(esp.entries_dir(), "not a directory").unwrap();
        assert!(matches!(
            run(&p, &url, Duration::from_secs(10), &never).unwrap(),
            Verdict::Unhealthy(HealthError::Slot(_))
        ));
        // Being tried: the rename blesses it before the index fails, so
        // the slot is good by then and a reboot would only loop.
        std::fs::remove_file(esp.entries_dir()).unwrap();
        std::fs::create_dir(esp.entries_dir()).unwrap();
        std::fs::write(esp.entries_dir().join("cdm-b+2-1.conf"), "version 2\n").unwrap();
        std::fs::write(esp.rollback_index_file(), "garbled\n").unwrap();
        assert!(matches!(
            run(&p, &url, Duration::from_secs(10), &never).unwrap(),
            Verdict::Unhealthy(_)
        ));
        assert_eq!(entries(&p), ["cdm-b.conf"]);
    }

    #[test]
    fn unhealthy_times_out_and_renames_nothing() {
        let (_d, p) = site("b");
        let dir = p.esp().entries_dir();
        std::fs::write(dir.join("cdm-b+3.conf"), "version 2\n").unwrap();
        for (url, want) in [
            (server(500, r#"{"status": "ok"}"#), "HTTP 500"),
            (
                server(200, r#"{"status": "degraded"}"#),
                "status Some(\"degraded\")",
            ),
            (server(200, "not json"), "not JSON"),
        ] {
            let t = Instant::now();
            let e = rolls_back(run(&p, &url, Duration::from_secs(1), &never).unwrap()).to_string();
            assert!(
                e.contains("did not report healthy within 1 s") && e.contains(want),
                "{e}"
            );
            assert!(t.elapsed() < Duration::from_secs(4));
            assert_eq!(entries(&p), ["cdm-b+3.conf"]);
        }
        // Nothing listening at all.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/health");
        let e = rolls_back(run(&p, &url, Duration::from_secs(1), &never).unwrap());
        assert!(matches!(e, HealthError::Timeout { .. }));
        assert_eq!(entries(&p), ["cdm-b+3.conf"]);
        assert!(p.status_file.exists());
        // The service failed for good: no waiting out the timeout.
        let t = Instant::now();
        let failed = || Some("snapshotd.service has failed".to_string());
        let e = rolls_back(run(&p, &url, Duration::from_secs(60), &failed).unwrap());
        assert!(
            e.to_string().contains("snapshotd.service has failed"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(entries(&p), ["cdm-b+3.conf"]);
        // The last try (systemd-boot renamed +1-2 to +0-3 before booting
        // it) still rolls back.
        std::fs::rename(dir.join("cdm-b+3.conf"), dir.join("cdm-b+0-3.conf")).unwrap();
        rolls_back(run(&p, &url, Duration::from_secs(60), &failed).unwrap());
        std::fs::rename(dir.join("cdm-b+0-3.conf"), dir.join("cdm-b+3.conf")).unwrap();
        // On a slot already good, unhealthy is not a reason to roll back.
        std::fs::rename(dir.join("cdm-b+3.conf"), dir.join("cdm-b.conf")).unwrap();
        match run(&p, &url, Duration::from_secs(60), &failed).unwrap() {
            Verdict::Unhealthy(e) => assert!(e.to_string().contains("has failed"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(entries(&p), ["cdm-b.conf"]);
    }
}

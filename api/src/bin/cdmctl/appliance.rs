//! `cdmctl appliance`: the appliance image's A/B slots and its updates
//! (snapshotd `--appliance`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cdm_api::appliance::{ApplianceStatus, SlotState, UpdateProgress, UpdateState};
use cdm_api::client::{Client, ClientError};
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, table_of, Out};

#[derive(Subcommand)]
pub(crate) enum ApplianceCmd {
    /// The running version, the A/B slots and the last update.
    Status,
    /// Upload a signed update bundle (.cdmb). The appliance verifies it and
    /// its installer writes it into the slot not booted, then reboots.
    Update {
        file: PathBuf,
        /// Wait until the appliance runs the new version from a blessed
        /// slot (exit 0) or the update fails (exit 1); the connection may
        /// drop while it reboots.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 900, requires = "wait")]
        timeout: u64,
    },
}

pub(crate) fn run(cmd: ApplianceCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        ApplianceCmd::Status => out.show(&c.appliance()?, status_show),
        ApplianceCmd::Update {
            file,
            wait,
            timeout,
        } => {
            // What the status said before: a failure recorded earlier (of
            // this same version, even) is not this update's.
            let before = c.appliance().ok();
            let a = c.upload_update(&file)?;
            if !wait {
                out.show(&a, |a| {
                    format!(
                        "update {} is pending: the appliance installs it into its other slot \
                         and reboots (`cdmctl appliance status` shows the progress)\n",
                        a.version
                    )
                });
                return Ok(());
            }
            out.say(format!(
                "update {} uploaded and verified; waiting for the appliance to install it and \
                 boot it",
                a.version
            ));
            let s = wait_for_version(c, &a.version, before.as_ref(), timeout)?;
            out.show(&s, |s| {
                format!(
                    "the appliance runs {} from slot {}\n",
                    s.version,
                    opt(&s.booted_slot)
                )
            });
        }
    }
    Ok(())
}

/// What a status says of the update to `version`: done (`Some(Ok)`),
/// failed (`Some(Err)`) or not yet (`None`). `before` is the status when
/// the upload started.
pub(crate) fn outcome(
    s: &ApplianceStatus,
    version: &str,
    before: Option<&ApplianceStatus>,
) -> Option<Result<(), String>> {
    if let Some(b) = s.booted() {
        // Another boot than the one before the upload (a reinstall of the
        // running version must not count as done at once).
        let fresh = before
            .and_then(|o| o.booted())
            .is_none_or(|o| o.slot != b.slot || o.generation != b.generation);
        if b.version.as_deref() == Some(version) && b.state == SlotState::Good && fresh {
            return Some(Ok(()));
        }
    }
    let old_update = before.and_then(|b| b.update.as_ref());
    if let Some(u) = &s.update {
        let ours = u.version.as_deref().is_none_or(|v| v == version);
        if u.state == UpdateState::Failed && ours && Some(u) != old_update {
            return Some(Err(format!(
                "the update to {version} failed: {}",
                u.error.as_deref().unwrap_or("no reason recorded")
            )));
        }
    }
    for slot in &s.slots {
        let was_bad = before.is_some_and(|b| b.slots.iter().any(|o| o == slot));
        if slot.state == SlotState::Bad && slot.version.as_deref() == Some(version) && !was_bad {
            return Some(Err(format!(
                "slot {} with {version} did not boot healthy: the appliance went back to {}",
                slot.slot, s.version
            )));
        }
    }
    None
}

/// Polls `GET /v1/appliance` until [`outcome`] decides, through the
/// appliance's reboot (refused connections, 503 before the status file is
/// written again).
fn wait_for_version(
    c: &Client,
    version: &str,
    before: Option<&ApplianceStatus>,
    timeout: u64,
) -> Result<ApplianceStatus, CliError> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let short = c.longer_timeout(Duration::from_secs(10));
    loop {
        let last = match short.appliance() {
            Ok(s) => match outcome(&s, version, before) {
                Some(Ok(())) => return Ok(s),
                Some(Err(e)) => return Err(CliError::JobFailed(e)),
                None => progress(&s),
            },
            // Down, rebooting, or up before its status is written.
            Err(e @ ClientError::Transport(_)) => e.to_string(),
            Err(ClientError::Api {
                status: 502..=504,
                message,
                ..
            }) => message,
            Err(e) => return Err(e.into()),
        };
        if Instant::now() >= deadline {
            return Err(CliError::Other(format!(
                "the appliance does not run {version} after {timeout} s; last seen: {last}"
            )));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn progress(s: &ApplianceStatus) -> String {
    match &s.update {
        Some(u) => format!("update {}", update_line(u)),
        None => format!("running {}", s.version),
    }
}

fn update_line(u: &UpdateProgress) -> String {
    let state = serde_json::to_value(u.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    format!(
        "{} {state} at {}{}",
        opt(&u.version),
        u.at,
        u.error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    )
}

fn status_show(s: &ApplianceStatus) -> String {
    let mut t = format!(
        "version: {}\nbooted slot: {}\nupdate: {}\n\n",
        s.version,
        opt(&s.booted_slot),
        s.update
            .as_ref()
            .map(update_line)
            .unwrap_or_else(|| "-".into())
    );
    t.push_str(&table_of(
        &s.slots,
        &[
            "SLOT",
            "STATE",
            "TRIES LEFT",
            "VERSION",
            "GENERATION",
            "BOOTED",
        ],
        |x| {
            vec![
                x.slot.clone(),
                serde_json::to_value(x.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                opt(&x.tries_left),
                opt(&x.version),
                opt(&x.generation),
                if x.booted { "yes" } else { "" }.to_string(),
            ]
        },
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(v: serde_json::Value) -> ApplianceStatus {
        serde_json::from_value(v).unwrap()
    }

    fn slots(a: (&str, &str, bool), b: (&str, &str, bool)) -> serde_json::Value {
        json!([{"slot": "a", "state": a.0, "version": a.1, "booted": a.2},
               {"slot": "b", "state": b.0, "version": b.1, "booted": b.2}])
    }

    #[test]
    fn waiting_ends_on_the_blessed_new_version_or_a_failure_of_this_update() {
        let before = status(
            json!({"appliance": true, "version": "1", "booted_slot": "a",
            "slots": slots(("good", "1", true), ("bad", "2", false)),
            "update": {"state": "failed", "version": "2", "error": "old", "at": "t0"}}),
        );
        // Still the earlier failure and the earlier bad slot: not yet.
        assert_eq!(outcome(&before, "2", Some(&before)), None);
        // Installed, trying: not yet; booted from it but not blessed: not yet.
        let mut s = before.clone();
        s.slots = status(json!({"appliance": true, "version": "1",
            "slots": slots(("good", "1", true), ("trying", "2", false))}))
        .slots;
        s.update = Some(UpdateProgress {
            state: UpdateState::Installed,
            version: Some("2".into()),
            error: None,
            at: "t1".into(),
        });
        assert_eq!(outcome(&s, "2", Some(&before)), None);
        s.slots[0].booted = false;
        s.slots[1].booted = true;
        assert_eq!(outcome(&s, "2", Some(&before)), None);
        s.slots[1].state = SlotState::Good;
        assert_eq!(outcome(&s, "2", Some(&before)), Some(Ok(())));
        // A new failure of this update, or its slot found bad: failed.
        let mut f = before.clone();
        f.update.as_mut().unwrap().at = "t2".into();
        f.update.as_mut().unwrap().error = Some("hash mismatch".into());
        let e = outcome(&f, "2", Some(&before)).unwrap().unwrap_err();
        assert!(e.contains("hash mismatch"), "{e}");
        let mut b = s.clone();
        b.slots[1].state = SlotState::Bad;
        b.slots[1].generation = Some(5);
        b.slots[1].booted = false;
        b.slots[0].booted = true;
        assert!(outcome(&b, "2", Some(&before)).unwrap().is_err());
        // Another version's failure is not this update's.
        assert_eq!(outcome(&f, "3", Some(&before)), None);
        // A reinstall of the running version: done only once the other
        // slot boots it, not at once.
        let mut same = s.clone();
        same.update = None;
        same.slots[1].generation = Some(2);
        assert_eq!(outcome(&same, "2", Some(&same)), None);
        let mut next = same.clone();
        next.slots[0].booted = true;
        next.slots[0].version = Some("2".into());
        next.slots[0].generation = Some(3);
        next.slots[1].booted = false;
        assert_eq!(outcome(&next, "2", Some(&same)), Some(Ok(())));
    }
}

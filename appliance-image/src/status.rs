//! The status file (`/run/cdm-update/status.json`): the running version,
//! the booted slot, each slot's state from its boot entry, and the last
//! update's progress. snapshotd serves it as `GET /v1/appliance`; it is
//! rewritten atomically (mode 0644) so a reader never sees half of it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::slots::{booted_slot, EntryState, Esp, Slot, SlotError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: String,
    /// good | trying | bad | empty
    pub state: String,
    pub tries_left: Option<u32>,
    pub version: Option<String>,
    pub generation: Option<u64>,
    /// The installed manifest's rollback index (null: empty slot).
    pub rollback_index: Option<u64>,
    pub booted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// verifying | writing | installed | failed
    pub state: String,
    pub version: Option<String>,
    pub error: Option<String>,
    /// RFC 3339, UTC.
    pub at: String,
}

impl UpdateStatus {
    pub fn now(state: &str, version: Option<&str>, error: Option<String>) -> UpdateStatus {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        UpdateStatus {
            state: state.into(),
            version: version.map(str::to_string),
            error,
            at: cdm_api::control::rfc3339(unix),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub appliance: bool,
    pub version: String,
    pub booted_slot: Option<String>,
    pub slots: Vec<SlotStatus>,
    pub update: Option<UpdateStatus>,
}

/// Where the tool looks: the ESP, the kernel command line, the running
/// version and the status file. Every path is an option, so tests (and
/// a recovery shell) can point them elsewhere.
#[derive(Debug, Clone)]
pub struct Paths {
    pub esp: PathBuf,
    pub cmdline: PathBuf,
    pub version_file: PathBuf,
    pub status_file: PathBuf,
}

impl Paths {
    pub fn esp(&self) -> Esp {
        Esp::new(&self.esp)
    }

    pub fn read_cmdline(&self) -> Result<String, SlotError> {
        std::fs::read_to_string(&self.cmdline).map_err(crate::slots::io_at(&self.cmdline))
    }

    pub fn booted(&self) -> Result<Slot, SlotError> {
        booted_slot(&self.read_cmdline()?).ok_or(SlotError::NotBooted)
    }
}

/// The status as the ESP, the command line and the root image say now,
/// with `update` as given.
pub fn collect(p: &Paths, update: Option<UpdateStatus>) -> Result<Status, SlotError> {
    let esp = p.esp();
    let booted = booted_slot(&p.read_cmdline()?);
    let entries = esp.entries()?;
    let slots = Slot::ALL
        .iter()
        .map(|&s| {
            let e = esp.slot_entry(&entries, s);
            let m = e.as_ref().and(esp.installed(s));
            let state = match e.as_ref().map(|e| e.name.state()) {
                None => "empty",
                Some(EntryState::Good) => "good",
                Some(EntryState::Trying) => "trying",
                Some(EntryState::Bad) => "bad",
            };
            SlotStatus {
                slot: s.name().into(),
                state: state.into(),
                tries_left: e.as_ref().and_then(|e| e.name.tries_left),
                generation: e.as_ref().and_then(|e| e.generation),
                rollback_index: m.as_ref().map(|m| m.rollback_index),
                version: m.map(|m| m.version),
                booted: booted == Some(s),
            }
        })
        .collect();
    let version = std::fs::read_to_string(&p.version_file)
        .ok()
        .and_then(|v| v.lines().next().map(|l| l.trim().to_string()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    Ok(Status {
        appliance: esp.slots_json().exists(),
        version,
        booted_slot: booted.map(|s| s.name().into()),
        slots,
        update,
    })
}

/// The `update` object of the status file now on disk, if any.
pub fn last_update(file: &Path) -> Option<UpdateStatus> {
    let text = std::fs::read(file).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    serde_json::from_value(v.get("update")?.clone()).ok()
}

/// Writes the status file atomically, mode 0644, making its directory
/// (0755) if needed.
pub fn write(file: &Path, s: &Status) -> Result<(), SlotError> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(crate::slots::io_at(dir))?;
        }
    }
    let mut text = serde_json::to_vec_pretty(s).map_err(|e| SlotError::Config {
        path: file.to_path_buf(),
        msg: e.to_string(),
    })?;
    text.push(b'\n');
    cdm_common::fs::write_atomic(file, &text, 0o644)?;
    Ok(())
}

/// Collects and writes the status with `update` (None keeps the one on
/// disk).
pub fn refresh(p: &Paths, update: Option<UpdateStatus>) -> Result<Status, SlotError> {
    let update = update.or_else(|| last_update(&p.status_file));
    let s = collect(p, update)?;
    write(&p.status_file, &s)?;
    Ok(s)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ESP with slots.json and a booted slot, in a temp dir.
    pub fn site(booted: &str) -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths {
            esp: d.path().join("esp"),
            cmdline: d.path().join("cmdline"),
            version_file: d.path().join("version"),
            status_file: d.path().join("run/cdm-update/status.json"),
        };
        std::fs::create_dir_all(p.esp.join("cdm")).unwrap();
        std::fs::create_dir_all(p.esp.join("loader/entries")).unwrap();
        std::fs::write(&p.cmdline, format!("root=x cdm.slot={booted} quiet\n")).unwrap();
        std::fs::write(&p.version_file, "0.1.0\n").unwrap();
        (d, p)
    }

    #[test]
    fn status_json_shape() {
        let (_d, p) = site("a");
        let esp = p.esp();
        std::fs::write(esp.entries_dir().join("cdm-a.conf"), "version 4\n").unwrap();
        std::fs::write(esp.entries_dir().join("cdm-b+2-1.conf"), "version 5\n").unwrap();
        std::fs::create_dir_all(esp.slot_dir(Slot::B)).unwrap();
        std::fs::write(
            esp.slot_dir(Slot::B).join("manifest.json"),
            r#"{"format":1,"compatible":"cdm-appliance","arch":"x86_64","version":"0.2.0","key_id":"00","rollback_index":17,"files":[]}"#,
        )
        .unwrap();
        std::fs::write(esp.slots_json(), "{}").unwrap();
        let up = UpdateStatus::now("installed", Some("0.2.0"), None);
        let s = refresh(&p, Some(up.clone())).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p.status_file).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "appliance": true, "version": "0.1.0", "booted_slot": "a",
                "slots": [
                    {"slot": "a", "state": "good", "tries_left": null, "version": null, "generation": 4, "rollback_index": null, "booted": true},
                    {"slot": "b", "state": "trying", "tries_left": 2, "version": "0.2.0", "generation": 5, "rollback_index": 17, "booted": false}
                ],
                "update": {"state": "installed", "version": "0.2.0", "error": null, "at": up.at}
            })
        );
        assert_eq!(s.update, Some(up.clone()));
        assert_eq!(up.at.len(), 20);
        assert!(up.at.ends_with('Z') && up.at.as_bytes()[10] == b'T');
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p.status_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);

        // Bad, then empty; the update object survives a refresh without one.
        std::fs::rename(
            esp.entries_dir().join("cdm-b+2-1.conf"),
            esp.entries_dir().join("cdm-b+0-3.conf"),
        )
        .unwrap();
        let s = refresh(&p, None).unwrap();
        assert_eq!(
            (s.slots[1].state.as_str(), s.slots[1].tries_left),
            ("bad", Some(0))
        );
        assert_eq!(s.update, Some(up));
        std::fs::remove_file(esp.entries_dir().join("cdm-b+0-3.conf")).unwrap();
        let s = refresh(&p, None).unwrap();
        assert_eq!(s.slots[1].state, "empty");
        assert_eq!(s.slots[1].version, None);
        assert_eq!(s.slots[1].generation, None);
        assert_eq!(s.slots[1].rollback_index, None);
    }
}

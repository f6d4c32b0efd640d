//! The A/B slots as the ESP describes them: `cdm/slots.json` (the slot
//! devices, written at image build), the Boot Loader Specification entries
//! `loader/entries/cdm-<slot>[+LEFT[-DONE]].conf` (systemd-boot's boot
//! counting lives in the file name), each slot's kernel, initrd and
//! installed manifest under `cdm/<slot>/`, and the booted slot from the
//! kernel command line (`cdm.slot=a|b`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bundle::Manifest;

/// Tries a new entry gets: systemd-boot counts them down on each attempt.
pub const TRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    File(#[from] cdm_common::fs::FileError),
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("cannot tell the booted slot: no cdm.slot=a|b on the kernel command line")]
    NotBooted,
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> SlotError + '_ {
    move |err| SlotError::Io {
        path: path.to_path_buf(),
        err,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

/// The booted slot named by `cdm.slot=` on a kernel command line.
pub fn booted_slot(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("cdm.slot="))
        .next_back()
        .and_then(Slot::parse)
}

/// What boot counting says about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// No counter: blessed after a healthy boot.
    Good,
    /// Tries left: being tried.
    Trying,
    /// No tries left: systemd-boot sorts it last, the other slot boots.
    Bad,
}

/// A parsed entry file name `cdm-<slot>[+LEFT[-DONE]].conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryName {
    pub slot: Slot,
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
}

impl EntryName {
    pub fn parse(file: &str) -> Option<EntryName> {
        let rest = file.strip_prefix("cdm-")?.strip_suffix(".conf")?;
        let (slot, counter) = match rest.split_once('+') {
            Some((s, c)) => (s, Some(c)),
            None => (rest, None),
        };
        let slot = Slot::parse(slot)?;
        let num = |s: &str| -> Option<u32> {
            // Digits only: u32's parser would also take a leading '+'.
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let (tries_left, tries_done) = match counter {
            None => (None, None),
            Some(c) => match c.split_once('-') {
                Some((l, d)) => (Some(num(l)?), Some(num(d)?)),
                None => (Some(num(c)?), None),
            },
        };
        Some(EntryName {
            slot,
            tries_left,
            tries_done,
        })
    }

    pub fn file_name(&self) -> String {
        let s = self.slot.name();
        match (self.tries_left, self.tries_done) {
            (None, _) => format!("cdm-{s}.conf"),
            (Some(l), None) => format!("cdm-{s}+{l}.conf"),
            (Some(l), Some(d)) => format!("cdm-{s}+{l}-{d}.conf"),
        }
    }

    /// Whether boot counting still runs on this entry: not yet blessed.
    /// On the booted entry that includes `Bad`: systemd-boot renamed
    /// `+1-2` to `+0-3` before booting it, so it is on its last try, and a
    /// failed health check must still reboot (the next boot takes the
    /// other slot). The one home of that rule.
    pub fn counting(&self) -> bool {
        self.tries_left.is_some()
    }

    pub fn state(&self) -> EntryState {
        match self.tries_left {
            None => EntryState::Good,
            Some(0) => EntryState::Bad,
            Some(_) => EntryState::Trying,
        }
    }
}

/// One entry found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: EntryName,
    pub file: String,
    /// The entry's `version` line (a decimal generation), if it has one.
    pub generation: Option<u64>,
}

/// The text of a new entry.
pub fn entry_text(
    version: &str,
    slot: Slot,
    generation: u64,
    partuuid: &str,
    cmdline: &str,
) -> String {
    let s = slot.name();
    let opts = format!("root=PARTUUID={partuuid} rootfstype=squashfs ro cdm.slot={s} {cmdline}");
    format!(
        "title cdm appliance {version} (slot {s})\nsort-key cdm\nversion {generation}\n\
         linux /cdm/{s}/vmlinuz\ninitrd /cdm/{s}/initrd.img\noptions {}\n",
        opts.trim_end()
    )
}

fn parse_generation(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("version"))
        .filter(|v| v.starts_with([' ', '\t']))
        .find_map(|v| v.trim().parse().ok())
}

#[derive(Debug, Clone, Deserialize)]
pub struct SlotDevice {
    pub partuuid: String,
    pub device: PathBuf,
}

/// `ESP/cdm/slots.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct SlotsConfig {
    pub slots: BTreeMap<String, SlotDevice>,
    #[serde(default)]
    pub cmdline: String,
}

impl SlotsConfig {
    pub fn device(&self, slot: Slot) -> Option<&SlotDevice> {
        self.slots.get(slot.name())
    }
}

/// The ESP's lock, held until dropped (closing the fd releases it).
#[derive(Debug)]
pub struct EspLock(#[allow(dead_code)] std::fs::File);

/// The ESP and the files cdm keeps on it.
#[derive(Debug, Clone)]
pub struct Esp {
    pub root: PathBuf,
}

impl Esp {
    pub fn new(root: impl Into<PathBuf>) -> Esp {
        Esp { root: root.into() }
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.root.join("loader/entries")
    }

    pub fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.root.join("cdm").join(slot.name())
    }

    pub fn slots_json(&self) -> PathBuf {
        self.root.join("cdm/slots.json")
    }

    /// Reads `slots.json`; both slots must be described, with a partuuid
    /// that cannot break the entry's options line.
    pub fn config(&self) -> Result<SlotsConfig, SlotError> {
        let p = self.slots_json();
        let text = std::fs::read(&p).map_err(io_at(&p))?;
        let bad = |msg: String| SlotError::Config {
            path: p.clone(),
            msg,
        };
        let c: SlotsConfig = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        for s in Slot::ALL {
            let d = c
                .device(s)
                .ok_or_else(|| bad(format!("slot {} is not described", s.name())))?;
            let ok = !d.partuuid.is_empty()
                && d.partuuid
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b'-');
            if !ok {
                return Err(bad(format!(
                    "slot {}: partuuid {:?} is not a UUID",
                    s.name(),
                    d.partuuid
                )));
            }
        }
        let (a, b) = (c.device(Slot::A), c.device(Slot::B));
        if let (Some(a), Some(b)) = (a, b) {
            if a.partuuid.eq_ignore_ascii_case(&b.partuuid) || a.device == b.device {
                return Err(bad("slots a and b name the same partition".into()));
            }
        }
        if c.cmdline.contains('\n') {
            return Err(bad("cmdline holds a line break".into()));
        }
        Ok(c)
    }

    /// Every `cdm-*` entry, sorted by file name. A missing entries
    /// directory is no entries.
    pub fn entries(&self) -> Result<Vec<Entry>, SlotError> {
        let dir = self.entries_dir();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_at(&dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(io_at(&dir))?;
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = EntryName::parse(&file) else {
                continue;
            };
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.push(Entry {
                name,
                file,
                generation: parse_generation(&text),
            });
        }
        out.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(out)
    }

    /// The entry that speaks for `slot`: the highest generation among its
    /// entries (there is one unless someone copied files by hand).
    pub fn slot_entry(&self, entries: &[Entry], slot: Slot) -> Option<Entry> {
        entries
            .iter()
            .filter(|e| e.name.slot == slot)
            .max_by_key(|e| e.generation)
            .cloned()
    }

    /// 1 + the highest generation of any cdm entry (1 on an empty ESP).
    pub fn next_generation(&self) -> Result<u64, SlotError> {
        let max = self.entries()?.iter().filter_map(|e| e.generation).max();
        Ok(max.map_or(1, |g| g.saturating_add(1)))
    }

    /// Takes the ESP's one lock, `ESP/cdm/.lock` (made if missing),
    /// `flock(LOCK_EX)`, waiting for it: an install and a bless never
    /// interleave their renames and index writes. Released on drop.
    pub fn lock(&self) -> Result<EspLock, SlotError> {
        use std::os::unix::io::AsRawFd;
        let p = self.root.join("cdm/.lock");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(io_at(&p))?;
        loop {
            // SAFETY: flock(2) on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(EspLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_at(&p)(e));
            }
        }
    }

    /// `ESP/cdm/rollback_index`: the highest rollback index of a blessed
    /// slot (decimal). Installs below it are downgrades.
    pub fn rollback_index_file(&self) -> PathBuf {
        self.root.join("cdm/rollback_index")
    }

    /// The stored rollback index; absent is 0 (nothing blessed since the
    /// image was built). Unreadable or garbled is an error, never 0: that
    /// would reopen downgrades.
    pub fn rollback_index(&self) -> Result<u64, SlotError> {
        let p = self.rollback_index_file();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_at(&p)(e)),
        };
        text.trim().parse().map_err(|_| SlotError::Config {
            path: p.clone(),
            msg: format!("{:?} is not a rollback index", text.trim()),
        })
    }

    /// Raises the stored rollback index to `n` (atomic write, file and
    /// directory synced); a lower or equal `n` changes nothing. Returns the
    /// index now stored.
    pub fn raise_rollback_index(&self, n: u64) -> Result<u64, SlotError> {
        let now = self.rollback_index()?;
        if n <= now {
            return Ok(now);
        }
        cdm_common::fs::write_atomic(
            &self.rollback_index_file(),
            format!("{n}\n").as_bytes(),
            0o644,
        )?;
        Ok(n)
    }

    /// The manifest installed into `slot`, if any and readable.
    pub fn installed(&self, slot: Slot) -> Option<Manifest> {
        let p = self.slot_dir(slot).join("manifest.json");
        let text = std::fs::read(p).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        let e = EntryName::parse("cdm-a.conf").unwrap();
        assert_eq!(
            (e.slot, e.tries_left, e.tries_done, e.state()),
            (Slot::A, None, None, EntryState::Good)
        );
        let e = EntryName::parse("cdm-a+3.conf").unwrap();
        assert_eq!(
            (e.tries_left, e.tries_done, e.state()),
            (Some(3), None, EntryState::Trying)
        );
        let e = EntryName::parse("cdm-a+2-1.conf").unwrap();
        assert_eq!(
            (e.tries_left, e.tries_done, e.state()),
            (Some(2), Some(1), EntryState::Trying)
        );
        let e = EntryName::parse("cdm-b+0-3.conf").unwrap();
        assert_eq!(
            (e.slot, e.tries_left, e.tries_done, e.state()),
            (Slot::B, Some(0), Some(3), EntryState::Bad)
        );
        for f in [
            "cdm-a.conf",
            "cdm-a+3.conf",
            "cdm-a+2-1.conf",
            "cdm-b+0-3.conf",
        ] {
            assert_eq!(EntryName::parse(f).unwrap().file_name(), f);
        }
        // Counting: every entry with a counter, the last try's `+0` too.
        for (f, counting) in [
            ("cdm-a.conf", false),
            ("cdm-a+3.conf", true),
            ("cdm-a+1-2.conf", true),
            ("cdm-b+0-3.conf", true),
        ] {
            assert_eq!(EntryName::parse(f).unwrap().counting(), counting, "{f}");
        }
        for junk in [
            "cdm-c.conf",
            "cdm-a",
            "cdm-a.conf.tmp",
            "cdm-a+.conf",
            "cdm-a+x.conf",
            "cdm-a+1-.conf",
            "cdm-a+-1.conf",
            "cdm-a++1.conf",
            "cdm-a+1-2-3.conf",
            "cdm-ab.conf",
            "xcdm-a.conf",
            "cdm-a+99999999999.conf",
            "debian.conf",
            "cdm-.conf",
            "cdm-a+1+2.conf",
        ] {
            assert_eq!(EntryName::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn booted_slot_from_cmdline() {
        assert_eq!(booted_slot("ro cdm.slot=b quiet\n"), Some(Slot::B));
        assert_eq!(booted_slot("cdm.slot=a"), Some(Slot::A));
        assert_eq!(booted_slot("xcdm.slot=a root=x"), None);
        assert_eq!(booted_slot("cdm.slot=c"), None);
        assert_eq!(booted_slot(""), None);
    }

    #[test]
    fn entry_text_and_generation() {
        let t = entry_text(
            "0.2.0",
            Slot::B,
            7,
            "1234-ab",
            "console=ttyS0,115200 panic=10",
        );
        assert_eq!(
            t,
            "title cdm appliance 0.2.0 (slot b)\nsort-key cdm\nversion 7\nlinux /cdm/b/vmlinuz\n\
             initrd /cdm/b/initrd.img\noptions root=PARTUUID=1234-ab rootfstype=squashfs ro cdm.slot=b \
             console=ttyS0,115200 panic=10\n"
        );
        assert_eq!(parse_generation(&t), Some(7));
        assert_eq!(parse_generation("versionx 3\n"), None);
        assert!(entry_text("v", Slot::A, 1, "u", "").ends_with("cdm.slot=a\n"));
    }

    #[test]
    fn config_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let esp = Esp::new(d.path());
        std::fs::create_dir_all(d.path().join("cdm")).unwrap();
        let w = |s: &str| std::fs::write(esp.slots_json(), s).unwrap();
        w(r#"{"slots": {"a": {"partuuid": "ab-12", "device": "/dev/x"}}, "cmdline": ""}"#);
        assert!(esp
            .config()
            .unwrap_err()
            .to_string()
            .contains("slot b is not described"));
        w(
            r#"{"slots": {"a": {"partuuid": "ab-12", "device": "/dev/x"}, "b": {"partuuid": "x y", "device": "/dev/y"}}}"#,
        );
        assert!(esp
            .config()
            .unwrap_err()
            .to_string()
            .contains("is not a UUID"));
        w(
            r#"{"slots": {"a": {"partuuid": "ab-12", "device": "/dev/x"}, "b": {"partuuid": "AB-12", "device": "/dev/y"}}}"#,
        );
        let e = esp.config().unwrap_err().to_string();
        assert!(e.contains("the same partition"), "{e}");
        w("{");
        assert!(esp.config().is_err());
        assert_eq!(esp.next_generation().unwrap(), 1);
    }

    #[test]
    fn rollback_index_only_grows() {
        let d = tempfile::tempdir().unwrap();
        let esp = Esp::new(d.path());
        std::fs::create_dir_all(d.path().join("cdm")).unwrap();
        assert_eq!(esp.rollback_index().unwrap(), 0, "absent is 0");
        assert_eq!(esp.raise_rollback_index(7).unwrap(), 7);
        assert_eq!(esp.raise_rollback_index(3).unwrap(), 7, "never lowered");
        assert_eq!(esp.rollback_index().unwrap(), 7);
        assert_eq!(
            std::fs::read_to_string(esp.rollback_index_file()).unwrap(),
            "7\n"
        );
        std::fs::write(esp.rollback_index_file(), "x\n").unwrap();
        let e = esp.rollback_index().unwrap_err().to_string();
        assert!(e.contains("is not a rollback index"), "{e}");
    }
}

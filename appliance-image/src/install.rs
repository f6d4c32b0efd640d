//! Installs a verified bundle into the slot that is not booted.
//!
//! Order of writes, and why a kill at any point is safe:
//!
//! 1. Verify the whole bundle (nothing is written before it passes) and
//!    check the slot device is large enough.
//! 2. Remove the target slot's entries, then its `manifest.json`; sync the
//!    directories. From here on no `.conf` names the target slot, so a
//!    half-written slot can never be booted; the booted slot's entry is
//!    never opened, renamed or removed.
//! 3. Write the rootfs to the slot device, fdatasync, drop its cached pages
//!    and read it back: the hash must match the manifest.
//! 4. Kernel and initrd: each to a temporary name on the ESP, fsync,
//!    rename, then fsync the slot directory.
//! 5. `manifest.json` (atomic write).
//! 6. Last, the entry `cdm-<slot>+3.conf`: written under a name that does
//!    not end in `.conf` (systemd-boot ignores it), synced, renamed, the
//!    directory synced. Only now can the slot be booted, and it is complete.
//!
//! The bundle is read through the one open fd that was verified; every
//! payload is hashed again while it is copied, so a bundle changed after
//! verification (the spool directory belongs to the cdm user) is caught
//! before the entry exists.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::bundle::{self, BundleError, Verified};
use crate::keys::PublicKey;
use crate::slots::{entry_text, EntryName, EntryState, Esp, Slot, SlotError, TRIES};
use crate::status::{self, Paths, UpdateStatus};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The bundle itself was refused.
    #[error("{0}")]
    Refused(BundleError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("rootfs is {need} bytes, larger than slot {slot}'s device {} ({have} bytes)", device.display())]
    SlotTooSmall {
        slot: &'static str,
        device: PathBuf,
        need: u64,
        have: u64,
    },
    #[error("{0} changed after verification (hash differs while copying)")]
    Changed(String),
    #[error("slot {0}'s device reads back different bytes than were written")]
    ReadBack(&'static str),
    #[error("copying {what}: {err}")]
    Copy { what: String, err: BundleError },
    #[error("the ESP has {have} bytes free (counting the target slot's old kernel and initrd): the kernel and initrd need {need}")]
    EspFull { need: u64, have: u64 },
    #[error("the booted slot {0} is still being tried: wait for its health check")]
    BootedNotGood(&'static str),
    #[error("bundle rollback index {bundle} is older than the appliance's {stored} (a downgrade): install it with --allow-downgrade from a root shell")]
    Downgrade { bundle: u64, stored: u64 },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |err| InstallError::Io {
        path: path.to_path_buf(),
        err,
    }
}

impl From<cdm_common::fs::FileError> for InstallError {
    fn from(e: cdm_common::fs::FileError) -> Self {
        InstallError::Slot(SlotError::File(e))
    }
}

/// What was installed where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub slot: Slot,
    pub version: String,
    pub generation: u64,
    pub entry: PathBuf,
}

/// Records progress in the status file. A status that cannot be written
/// must not stop an install (the slot matters more than the report), so it
/// is logged.
pub fn record(p: &Paths, state: &str, version: Option<&str>, error: Option<String>) {
    if let Err(e) = status::refresh(p, Some(UpdateStatus::now(state, version, error))) {
        tracing::warn!(
            "cannot write the status file {}: {e}",
            p.status_file.display()
        );
    }
}

/// Choices of the caller of [`install`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Install a bundle whose rollback index is below the stored one (a
    /// root shell only: the upload path never sets it).
    pub allow_downgrade: bool,
}

/// Verifies `bundle` (open at `path`) and installs it into the slot that is
/// not booted. Progress and the result go to the status file.
pub fn install(
    bundle: &File,
    path: &Path,
    trusted: &[PublicKey],
    p: &Paths,
    opts: Options,
) -> Result<Installed, InstallError> {
    record(p, "verifying", None, None);
    // Known once the bundle is verified: a failure after that names it.
    let mut version = None;
    let r = bundle::verify(bundle, path, trusted)
        .map_err(|e| match e {
            BundleError::Io { path, err } => InstallError::Io { path, err },
            other => InstallError::Refused(other),
        })
        .and_then(|v| {
            version = Some(v.manifest().version.clone());
            install_verified(bundle, path, &v, p, opts)
        });
    match r {
        Ok(i) => {
            record(p, "installed", Some(&i.version), None);
            tracing::info!(
                "installed {} into slot {} (generation {})",
                i.version,
                i.slot.name(),
                i.generation
            );
            Ok(i)
        }
        Err(e) => {
            record(p, "failed", version.as_deref(), Some(e.to_string()));
            Err(e)
        }
    }
}

fn install_verified(
    bundle: &File,
    path: &Path,
    v: &Verified,
    p: &Paths,
    opts: Options,
) -> Result<Installed, InstallError> {
    let esp = p.esp();
    // Held to the end: a bless (health) waits, and so does a second install.
    let _lock = esp.lock()?;
    let booted = p.booted()?;
    let slot = booted.other();
    let cfg = esp.config()?;
    // While the booted slot is being tried (or has no entry), the other
    // slot holds the only good fallback: overwriting it could leave
    // nothing that boots.
    let booted_good = esp
        .slot_entry(&esp.entries()?, booted)
        .is_some_and(|e| e.name.state() == EntryState::Good);
    if !booted_good {
        return Err(InstallError::BootedNotGood(booted.name()));
    }
    let stored = esp.rollback_index()?;
    let index = v.manifest().rollback_index;
    // Equal is allowed: a reinstall, or several bundles of one commit.
    if index < stored && !opts.allow_downgrade {
        return Err(InstallError::Downgrade {
            bundle: index,
            stored,
        });
    }
    let dev = cfg.device(slot).ok_or_else(|| SlotError::Config {
        path: esp.slots_json(),
        msg: format!("slot {} is not described", slot.name()),
    })?;
    let m = v.manifest();
    let (rootfs, _) = payload(v, "rootfs")?;
    let mut device = open_device(&dev.device)?;
    let have = device.seek(SeekFrom::End(0)).map_err(io_at(&dev.device))?;
    if rootfs.size > have {
        return Err(InstallError::SlotTooSmall {
            slot: slot.name(),
            device: dev.device.clone(),
            need: rootfs.size,
            have,
        });
    }
    esp_room(&esp, slot, v)?;
    // Taken before the target's entries go, so generations only grow even
    // when the target held the newest (a failed update).
    let generation = esp.next_generation()?;
    record(p, "writing", Some(&m.version), None);
    let w = Writing {
        esp: &esp,
        slot,
        generation,
        device: &device,
        dev: &dev.device,
        partuuid: &dev.partuuid,
        cmdline: &cfg.cmdline,
    };
    let r = write_slot(bundle, path, v, &w);
    if r.is_err() {
        // Whatever step failed, its temporaries go (the ESP is small).
        remove_tmps(&esp, slot);
    }
    r
}

/// Where [`write_slot`] writes.
struct Writing<'a> {
    esp: &'a Esp,
    slot: Slot,
    generation: u64,
    device: &'a File,
    dev: &'a Path,
    partuuid: &'a str,
    cmdline: &'a str,
}

/// Steps 2 to 6 (see the module's comment).
fn write_slot(
    bundle: &File,
    path: &Path,
    v: &Verified,
    w: &Writing,
) -> Result<Installed, InstallError> {
    let (esp, slot, m) = (w.esp, w.slot, v.manifest());
    let (rootfs, rootfs_off) = payload(v, "rootfs")?;
    // Step 2: the target slot stops being bootable before it is touched;
    // its old kernel and initrd go too, making room on the ESP.
    remove_slot_entries(esp, slot)?;
    let slot_dir = esp.slot_dir(slot);
    std::fs::create_dir_all(&slot_dir).map_err(io_at(&slot_dir))?;
    for f in ["manifest.json", "vmlinuz", "initrd.img"] {
        remove_if_exists(&slot_dir.join(f))?;
    }
    cdm_common::fs::sync_dir(&slot_dir)?;

    // Step 3.
    write_rootfs(bundle, path, rootfs_off, rootfs, w.device, w.dev, slot)?;

    // Step 4.
    for (name, file) in [("kernel", "vmlinuz"), ("initrd", "initrd.img")] {
        let (e, off) = payload(v, name)?;
        copy_to_esp(bundle, path, off, e, &slot_dir.join(file))?;
    }
    cdm_common::fs::sync_dir(&slot_dir)?;

    // Step 5: the signed manifest bytes as they were verified.
    cdm_common::fs::write_atomic(
        &slot_dir.join("manifest.json"),
        &v.header.manifest_bytes,
        0o644,
    )?;

    // Step 6: the entry, last. write_atomic writes `NAME.tmp` (not a
    // `.conf`), syncs it, renames it and syncs the directory.
    let name = new_entry(slot);
    let entry = esp.entries_dir().join(name.file_name());
    std::fs::create_dir_all(esp.entries_dir()).map_err(io_at(&esp.entries_dir()))?;
    let text = entry_text(&m.version, slot, w.generation, w.partuuid, w.cmdline);
    cdm_common::fs::write_atomic(&entry, text.as_bytes(), 0o644)?;
    Ok(Installed {
        slot,
        version: m.version.clone(),
        generation: w.generation,
        entry,
    })
}

/// Room the ESP must keep beyond the kernel and initrd: the manifest, the
/// entry and FAT's cluster rounding.
const ESP_SLACK: u64 = 1 << 20;

/// Refuses, before anything is written, an install whose kernel and
/// initrd do not fit on the ESP (counting the target slot's old ones,
/// which step 2 removes): a full FAT mid-copy would leave the target
/// slot without a kernel.
fn esp_room(esp: &Esp, slot: Slot, v: &Verified) -> Result<(), InstallError> {
    let size = |name: &str| payload(v, name).map(|(e, _)| e.size);
    let need = size("kernel")?
        .saturating_add(size("initrd")?)
        .saturating_add(ESP_SLACK);
    let free = cdm_common::fs::free_bytes(&esp.root).map_err(io_at(&esp.root))?;
    let dir = esp.slot_dir(slot);
    let old: u64 = ["vmlinuz", "initrd.img"]
        .iter()
        .filter_map(|f| std::fs::symlink_metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let have = free.saturating_add(old);
    if have < need {
        return Err(InstallError::EspFull { need, have });
    }
    Ok(())
}

/// Removes the target slot's temporaries (`*.tmp` in its ESP directory,
/// its temporary entry) after a failed install. Best effort: logged.
fn remove_tmps(esp: &Esp, slot: Slot) {
    let dir = esp.slot_dir(slot);
    let mut tmps: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tmp"))
        .collect();
    tmps.push(
        esp.entries_dir()
            .join(format!("{}.tmp", new_entry(slot).file_name())),
    );
    for t in tmps {
        if let Err(e) = remove_if_exists(&t) {
            tracing::warn!("cannot remove {e}");
        }
    }
}

/// The name a new install's entry gets.
fn new_entry(slot: Slot) -> EntryName {
    EntryName {
        slot,
        tries_left: Some(TRIES),
        tries_done: None,
    }
}

/// Opens a slot device for writing. A block device is opened with
/// O_EXCL, which Linux refuses (EBUSY) while it is mounted or otherwise
/// claimed: a slots.json that names the running root cannot be written
/// over. Tests use plain files.
fn open_device(path: &Path) -> Result<File, InstallError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_block = std::fs::metadata(path)
        .map_err(io_at(path))?
        .file_type()
        .is_block_device();
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if is_block {
        o.custom_flags(libc::O_EXCL);
    }
    o.open(path).map_err(io_at(path))
}

fn payload<'a>(v: &'a Verified, name: &str) -> Result<(&'a bundle::FileEntry, u64), InstallError> {
    // parse_header guarantees all three names; this only keeps a broken
    // invariant from becoming a panic.
    v.payload(name).ok_or_else(|| {
        InstallError::Refused(BundleError::Files(format!("file {name:?} is missing")))
    })
}

fn remove_if_exists(p: &Path) -> Result<(), InstallError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(p)(e)),
    }
}

/// Removes every entry of `slot` (whatever its counter) and syncs the
/// entries directory.
fn remove_slot_entries(esp: &Esp, slot: Slot) -> Result<(), InstallError> {
    let dir = esp.entries_dir();
    if !dir.exists() {
        return Ok(());
    }
    for e in esp.entries()? {
        if e.name.slot == slot {
            remove_if_exists(&dir.join(&e.file))?;
        }
    }
    // A temporary entry left by a killed install (never read by
    // systemd-boot, but it should not pile up).
    let tmp = dir.join(format!("{}.tmp", new_entry(slot).file_name()));
    remove_if_exists(&tmp)?;
    cdm_common::fs::sync_dir(&dir)?;
    Ok(())
}

fn write_rootfs(
    bundle: &File,
    path: &Path,
    off: u64,
    e: &bundle::FileEntry,
    device: &File,
    dev_path: &Path,
    slot: Slot,
) -> Result<(), InstallError> {
    let mut at = 0u64;
    let sum = bundle::stream_range(bundle, path, off, e.size, "payload rootfs", |b| {
        device.write_all_at(b, at)?;
        at += b.len() as u64;
        Ok(())
    })
    .map_err(|err| InstallError::Copy {
        what: format!("rootfs to {}", dev_path.display()),
        err,
    })?;
    if hex::encode(sum) != e.sha256.to_ascii_lowercase() {
        return Err(InstallError::Changed("rootfs".into()));
    }
    device.sync_data().map_err(io_at(dev_path))?;
    // Drop the cached pages so the read-back comes from the device, not
    // from what we just wrote into memory. Advisory: failure only weakens
    // the check.
    // SAFETY: fadvise on an fd we own, with a valid range.
    unsafe {
        libc::posix_fadvise(
            device.as_raw_fd(),
            0,
            e.size as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
    let back = bundle::stream_range(device, dev_path, 0, e.size, "slot device", |_| Ok(()))
        .map_err(|err| InstallError::Copy {
            what: format!("reading back {}", dev_path.display()),
            err,
        })?;
    if hex::encode(back) != e.sha256.to_ascii_lowercase() {
        return Err(InstallError::ReadBack(slot.name()));
    }
    Ok(())
}

/// Copies one payload to `dest` on the ESP through `dest.tmp`: written,
/// hashed, fsynced, renamed. The caller syncs the directory.
fn copy_to_esp(
    bundle: &File,
    path: &Path,
    off: u64,
    e: &bundle::FileEntry,
    dest: &Path,
) -> Result<(), InstallError> {
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    remove_if_exists(&tmp)?;
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    let mut at = 0u64;
    let sum = bundle::stream_range(
        bundle,
        path,
        off,
        e.size,
        &format!("payload {}", e.name),
        |b| {
            out.write_all_at(b, at)?;
            at += b.len() as u64;
            Ok(())
        },
    )
    .map_err(|err| InstallError::Copy {
        what: format!("{} to {}", e.name, tmp.display()),
        err,
    })?;
    if hex::encode(sum) != e.sha256.to_ascii_lowercase() {
        let _ = std::fs::remove_file(&tmp);
        return Err(InstallError::Changed(e.name.clone()));
    }
    out.sync_all().map_err(io_at(&tmp))?;
    drop(out);
    std::fs::rename(&tmp, dest).map_err(io_at(dest))?;
    Ok(())
}

#[cfg(test)]
#[path = "install_tests.rs"]
mod tests;

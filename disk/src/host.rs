//! The host's block-device plumbing shared by the appliance's instant
//! mounts and the agent's stage disks: loop devices over a (FUSE) file,
//! filesystem detection, mount and unmount. Each step runs the util-linux
//! tool and turns its failure into a message that names the tool and what
//! it printed.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a step on the host failed; displays as the message an operator
/// reads (the tool and what it printed).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The tool could not be started.
    #[error("{cmd}: {source}")]
    Spawn { cmd: String, source: io::Error },
    /// The tool ran and failed: what it printed.
    #[error("{program} failed: {output}")]
    Failed { program: String, output: String },
    /// A directory could not be made.
    #[error("{}: {source}", path.display())]
    Path { path: PathBuf, source: io::Error },
    /// A filesystem is in use and stays mounted; `umount`'s own words are
    /// part of the message (not a separate source, so they are said once).
    #[error("{} is busy ({cause}): close what uses it and detach again", path.display())]
    Busy {
        path: PathBuf,
        cause: Box<HostError>,
    },
}

pub type Result<T, E = HostError> = std::result::Result<T, E>;

/// Runs `cmd`; its trimmed stdout, or "PROGRAM failed: STDERR".
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|source| HostError::Spawn {
        cmd: format!("{cmd:?}"),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = if err.trim().is_empty() {
            String::from_utf8_lossy(&out.stdout)
        } else {
            err
        };
        Err(HostError::Failed {
            program: cmd.get_program().to_string_lossy().into_owned(),
            output: err.trim().to_string(),
        })
    }
}

/// Makes the mount point `path` (and its parents).
pub fn make_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| HostError::Path {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(&*p)))
        .unwrap_or(false)
}

/// Attaches `file` to a free loop device (read-only if asked, limited to
/// the byte range `(offset, len)` if given); the device path.
pub fn loop_attach(file: &Path, read_only: bool, range: Option<(u64, u64)>) -> Result<String> {
    let mut los = Command::new("losetup");
    los.args(["--find", "--show"]);
    if read_only {
        los.arg("--read-only");
    }
    if let Some((start, len)) = range {
        los.args([
            "--offset",
            &start.to_string(),
            "--sizelimit",
            &len.to_string(),
        ]);
    }
    los.arg(file);
    run(&mut los)
}

/// Switches loop device `dev` to direct I/O (`LO_FLAGS_DIRECT_IO`), so the
/// pages read through it are cached once (by the filesystem on top), not
/// a second time for its backing file. Whether the kernel took it: it
/// refuses when the backing file cannot do direct I/O or its block size
/// does not fit; the device then works as before (buffered), and the
/// refusal is logged.
pub fn loop_direct_io(dev: &str) -> bool {
    let r = run(Command::new("losetup").args(["--direct-io=on", dev]));
    let on = loop_dio_state(dev) == Some(true);
    if !on {
        let why = match r {
            Err(e) => e.to_string(),
            Ok(_) => "the kernel left it off".into(),
        };
        tracing::warn!(device = dev, reason = %why, "loop device without direct I/O: its pages are cached twice");
    }
    on
}

/// Whether loop device `dev` does direct I/O (`/sys/block/loopN/loop/dio`).
pub fn loop_dio_state(dev: &str) -> Option<bool> {
    let name = Path::new(dev).file_name()?.to_string_lossy().into_owned();
    let t = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).ok()?;
    Some(t.trim() == "1")
}

/// Detaches loop device `dev` if it is still backed by a file under
/// `prefix` (a device may have been reused by someone else since).
pub fn loop_detach_if_ours(dev: &str, prefix: &Path) {
    if dev.is_empty() || !Path::new(dev).exists() {
        return;
    }
    let back =
        run(Command::new("losetup").args(["-n", "-O", "BACK-FILE", dev])).unwrap_or_default();
    if back.starts_with(&*prefix.to_string_lossy()) {
        let _ = run(Command::new("losetup").args(["-d", dev]));
    }
}

/// The filesystem type on `dev` (`blkid -p`), `None` when there is none.
pub fn fs_type(dev: &str) -> Option<String> {
    run(Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE", dev]))
        .ok()
        .filter(|t| !t.is_empty())
}

/// Mount options for `fstype`: a read-only mount never replays a journal
/// (the device may be a read-only snapshot), XFS copies mount beside their
/// origin (`nouuid`).
///
/// Always `nosuid,nodev`: a volume's filesystem holds what another host
/// wrote (a backup, an archive, a guest's disk); a setuid binary or a
/// device node planted in it must mean nothing on this host.
pub fn mount_options(fstype: &str, writable: bool) -> &'static str {
    match (fstype, writable) {
        ("ext4" | "ext3" | "ext2", false) => "ro,noload,nosuid,nodev",
        ("xfs", false) => "ro,norecovery,nouuid,nosuid,nodev",
        ("xfs", true) => "nouuid,nosuid,nodev",
        (_, false) => "ro,nosuid,nodev",
        (_, true) => "rw,nosuid,nodev",
    }
}

/// Mounts `dev` (a filesystem of `fstype`) at `path`, creating the
/// directory.
pub fn mount(dev: &str, fstype: &str, writable: bool, path: &Path) -> Result<()> {
    make_dir(path)?;
    run(Command::new("mount")
        .args(["-t", fstype, "-o", mount_options(fstype, writable), dev])
        .arg(path))
    .map(|_| ())
}

/// Unmounts `path` if mounted; lazily when a normal unmount fails (after a
/// crash the filesystem can sit on a loop device whose file is gone).
pub fn unmount(path: &Path) -> Result<()> {
    if is_mounted(path) && run(Command::new("umount").arg(path)).is_err() {
        run(Command::new("umount").arg("-l").arg(path))?;
    }
    Ok(())
}

/// Unmounts `path` if mounted, never lazily: a busy filesystem is an
/// error and stays mounted (a lazy unmount would keep its device, and
/// everything under it, alive out of sight).
pub fn unmount_strict(path: &Path) -> Result<()> {
    if is_mounted(path) {
        run(Command::new("umount").arg(path)).map_err(|e| HostError::Busy {
            path: path.to_path_buf(),
            cause: Box::new(e),
        })?;
    }
    Ok(())
}

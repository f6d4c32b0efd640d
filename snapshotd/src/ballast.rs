//! Space kept aside for the appliance's own records on the data
//! directory's filesystem.
//!
//! `state.redb` and the pending journals (`audit-pending.jsonl`,
//! `events-pending.jsonl`) live on the same filesystem as a sparse pool or
//! whatever else fills it. When it fills, the records that tell an admin
//! what happened (the audit log, the alerts) would be the first loss. A
//! ballast file (`DATA/state-reserve`, up to 32 MiB, preallocated) is
//! removed at the first ENOSPC of the state database or a journal, which
//! gives them room for the rest of the episode; it is made again when the
//! filesystem has room (checked at each scheduler tick).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

const MAX: u64 = 32 << 20;

struct Ballast {
    path: PathBuf,
    released: AtomicBool,
    /// A release not yet told as an alert.
    untold: AtomicBool,
}

static BALLAST: OnceLock<Ballast> = OnceLock::new();

/// Sets up the ballast in `data` (once per process) and makes the file.
pub fn install(data: &Path) {
    let b = BALLAST.get_or_init(|| Ballast {
        path: data.join("state-reserve"),
        released: AtomicBool::new(false),
        untold: AtomicBool::new(false),
    });
    make(b);
}

/// Whether an error text is the filesystem's ENOSPC.
pub fn is_no_space(text: &str) -> bool {
    text.contains("No space left on device") || text.contains("os error 28")
}

/// The filesystem is full: free the ballast (once) so the state database
/// and the journals can go on. Returns whether space was freed.
pub fn release() -> bool {
    let Some(b) = BALLAST.get() else {
        return false;
    };
    if b.released.swap(true, Ordering::SeqCst) {
        return false;
    }
    match std::fs::remove_file(&b.path) {
        Ok(()) => {
            tracing::error!(path = %b.path.display(), "the data directory's filesystem is full: released the state reserve so the audit log and events can still be written; free space");
            b.untold.store(true, Ordering::SeqCst);
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "the data directory's filesystem is full and the state reserve could not be released");
            false
        }
    }
}

/// At each scheduler tick: a release not yet told (returned once, for an
/// alert), and the ballast made again once there is room.
pub fn tick() -> Option<&'static Path> {
    let b = BALLAST.get()?;
    if b.released.load(Ordering::SeqCst) && make(b) {
        b.released.store(false, Ordering::SeqCst);
        tracing::warn!(path = %b.path.display(), "state reserve made again");
    }
    b.untold
        .swap(false, Ordering::SeqCst)
        .then_some(b.path.as_path())
}

/// Makes the file (if missing): up to 32 MiB, at most 1/16 of the free
/// space, and only while at least 4× that stays free. True if it exists.
fn make(b: &Ballast) -> bool {
    if b.path.exists() {
        return true;
    }
    let Some(dir) = b.path.parent() else {
        return false;
    };
    let Some(free) = free_bytes(dir) else {
        return false;
    };
    let size = (free / 16).min(MAX) / 4096 * 4096;
    if size < (1 << 20) || free < 4 * size {
        return false;
    }
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&b.path)
        .and_then(|f| {
            use std::os::fd::AsRawFd;
            // SAFETY: fallocate on our own descriptor, mode 0 (allocate).
            let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as i64) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f.sync_all()
        });
    if let Err(e) = r {
        let _ = std::fs::remove_file(&b.path);
        tracing::warn!(error = %e, "cannot make the state reserve");
        return false;
    }
    true
}

/// Free bytes of the filesystem holding `dir` (`f_bavail`).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    cdm_common::fs::free_bytes(dir).ok()
}

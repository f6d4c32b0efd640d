//! Taking the spool file (`--spool`): the bundle snapshotd left in
//! `DATA/updates`, a directory the unprivileged cdm user owns. Everything
//! under that name is untrusted: it may be a symlink, a FIFO, a directory,
//! or be swapped while we look. So the parent directory is opened once
//! (`O_DIRECTORY|O_NOFOLLOW`) and the name is opened and removed relative
//! to that fd (`openat`, `unlinkat`): no later path walk can be redirected.
//! The name is removed whatever it was (an empty directory too), so the
//! path unit (`PathExists=`) does not start the installer again on it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: io::Error },
    #[error("{} is not a regular file ({kind}): removed", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} names no file", path.display())]
    NoName { path: PathBuf },
}

fn cstr(path: &Path, s: &std::ffi::OsStr) -> Result<CString, SpoolError> {
    CString::new(s.as_bytes()).map_err(|e| SpoolError::Io {
        path: path.to_path_buf(),
        err: io::Error::new(io::ErrorKind::InvalidInput, e),
    })
}

fn last_err(path: &Path) -> SpoolError {
    SpoolError::Io {
        path: path.to_path_buf(),
        err: io::Error::last_os_error(),
    }
}

/// Opens the spool file at `path` read-only without following a symlink
/// or blocking on a FIFO, checks it is a regular file, and removes the
/// name (success or not). The returned fd is what every read goes through.
pub fn take(path: &Path) -> Result<File, SpoolError> {
    let name = path.file_name().ok_or_else(|| SpoolError::NoName {
        path: path.to_path_buf(),
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let cparent = cstr(path, parent.as_os_str())?;
    let cname = cstr(path, name)?;
    // SAFETY: open(2) of a NUL-terminated path; the fd is owned below.
    let dfd = unsafe {
        libc::open(
            cparent.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if dfd < 0 {
        return Err(last_err(parent));
    }
    // SAFETY: dfd is a fresh fd nobody else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(dfd) };
    // SAFETY: openat(2) relative to our dir fd; the fd is owned below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            cname.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    let opened = if fd < 0 {
        Err(last_err(path))
    } else {
        // SAFETY: fd is a fresh fd nobody else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    };
    let kind = match &opened {
        Ok(f) => {
            let md = f.metadata().map_err(|err| SpoolError::Io {
                path: path.to_path_buf(),
                err,
            });
            match md {
                Ok(m) if m.is_file() => None,
                Ok(m) if m.is_dir() => Some("a directory"),
                Ok(_) => Some("a device, FIFO or socket"),
                Err(e) => {
                    remove(&dir, &cname, false, path);
                    return Err(e);
                }
            }
        }
        Err(_) => None,
    };
    // Consumed at open (see cdm-update install --spool): removed now,
    // whatever it turned out to be. A symlink (ELOOP above) is removed
    // itself, never its target.
    remove(&dir, &cname, kind == Some("a directory"), path);
    match (opened, kind) {
        (Ok(_), Some(kind)) => Err(SpoolError::NotRegular {
            path: path.to_path_buf(),
            kind,
        }),
        (r, _) => r,
    }
}

/// unlinkat(2) on the dir fd; a failure is logged (the install's own
/// result matters more), except that a missing name is no failure.
fn remove(dir: &OwnedFd, name: &CString, is_dir: bool, path: &Path) {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: unlinkat(2) relative to our dir fd with a NUL-terminated name.
    let r = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("cannot remove the spool file {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_regular_file_is_opened_and_its_name_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pending.cdmb");
        std::fs::write(&p, b"bundle").unwrap();
        let mut f = take(&p).unwrap();
        assert!(std::fs::symlink_metadata(&p).is_err(), "name removed");
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "bundle", "read through the fd after the unlink");
    }

    #[test]
    fn odd_names_are_refused_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pending.cdmb");
        // A symlink: refused (ELOOP), the link removed, its target kept.
        let target = d.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let e = take(&p).unwrap_err().to_string();
        assert!(e.contains("symbolic links"), "{e}");
        assert!(std::fs::symlink_metadata(&p).is_err());
        assert!(target.exists());
        // An empty directory: refused and removed (else the path unit loops).
        std::fs::create_dir(&p).unwrap();
        let e = take(&p).unwrap_err().to_string();
        assert!(
            e.ends_with("is not a regular file (a directory): removed"),
            "{e}"
        );
        assert!(std::fs::symlink_metadata(&p).is_err());
        // A FIFO: opened without blocking, refused, removed.
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo(3) of a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = take(&p).unwrap_err().to_string();
        assert!(e.contains("a device, FIFO or socket"), "{e}");
        assert!(std::fs::symlink_metadata(&p).is_err());
        // A parent that is a symlink to a directory: refused.
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("pending.cdmb"), b"x").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(take(&link.join("pending.cdmb")).is_err());
        assert!(
            real.join("pending.cdmb").exists(),
            "nothing removed through it"
        );
        // Nothing there.
        assert!(take(&d.path().join("none")).is_err());
    }
}

//! Files that must never be seen half written: keys, certificates,
//! credentials.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where an error happened: the path it concerns and the I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError {
        path: path.to_path_buf(),
        source,
    }
}

/// Free bytes for unprivileged writers on the filesystem holding `path`
/// (statvfs `f_bavail * f_frsize`).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain data (all-zero is valid); the call only
    // fills it from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Writes `data` to `path` through a temporary file created with `mode`
/// (a key is never readable by others, not even for a moment), synced and
/// renamed, then syncs the directory: a crash leaves the old file or the
/// new one, never half of one. A temporary left by an earlier crash is
/// replaced.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), FileError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(at(&tmp))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(at(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(at(path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

/// Reads the 32-byte secret key at `path`, made with `make` and written
/// with mode 0600 ([`write_atomic`]) on first use; the bool says it was
/// made now. A key of another size, or one others may read (group or
/// world bits set), is refused: a secret that leaked is no secret.
pub fn private_key(
    path: &Path,
    make: impl FnOnce() -> [u8; 32],
) -> Result<([u8; 32], bool), FileError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::read(path) {
        Ok(b) => {
            let key: [u8; 32] = b.as_slice().try_into().map_err(|_| {
                at(path)(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("holds {} bytes, not a 32-byte key", b.len()),
                ))
            })?;
            let mode = std::fs::metadata(path)
                .map_err(at(path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(at(path)(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "mode {:o} lets others read the key; chmod 600 it",
                        mode & 0o777
                    ),
                )));
            }
            Ok((key, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = make();
            write_atomic(path, &key, 0o600)?;
            Ok((key, true))
        }
        Err(e) => Err(at(path)(e)),
    }
}

/// Syncs a directory, so the names created, renamed or removed in it are
/// on disk (a file's own fsync does not cover its directory entry).
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_with_the_mode_and_replaces_a_stale_temporary() {
        let d = std::env::temp_dir().join(format!("cdm-common-fs-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("key");
        std::fs::write(d.join("key.tmp"), b"stale").unwrap();
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!d.join("key.tmp").exists());
        let e = write_atomic(&d.join("no/such/dir/key"), b"x", 0o600).unwrap_err();
        assert!(e.to_string().contains("no/such/dir"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! Block devices under a pool: the trait and a file or block device.
//! The in-memory and crash-simulating devices of tests are in `testdev`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What the pool needs from storage. `sync` must make every completed
/// `write_at` durable (fdatasync semantics).
pub trait BlockDev: Send + Sync {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    fn sync(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Hints that these byte ranges will be read soon (a read of scattered
    /// extents lets the device fetch them in parallel). Optional.
    fn will_need(&self, _ranges: &[(u64, u64)]) {}
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// A pool file or block device.
pub struct FileDev {
    file: File,
    /// Bytes written since writeback was last started.
    unsynced: std::sync::atomic::AtomicU64,
}

/// Start writeback of dirty pages after this many bytes of writes, so a
/// commit's fdatasync finds less left to write (as RocksDB's
/// `bytes_per_sync`).
const WRITEBACK_BYTES: u64 = 8 << 20;

impl FileDev {
    /// Opens an existing file or block device read-write.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        lock_exclusive(&file, path)?;
        Ok(FileDev::from_file(file))
    }

    /// Creates (or truncates) a regular file of `size` bytes, sparse.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        lock_exclusive(&file, path)?;
        file.set_len(size)?;
        Ok(FileDev::from_file(file))
    }

    pub fn from_file(file: File) -> Self {
        FileDev {
            file,
            unsynced: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl BlockDev for FileDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.file.write_all_at(buf, off)?;
        let n = self.unsynced.fetch_add(buf.len() as u64, Relaxed) + buf.len() as u64;
        if n >= WRITEBACK_BYTES && self.unsynced.swap(0, Relaxed) >= WRITEBACK_BYTES {
            use std::os::fd::AsRawFd;
            // SAFETY: advisory call on our own descriptor. It only starts
            // writeback (no durability is claimed); failure is harmless.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.unsynced.store(0, std::sync::atomic::Ordering::Relaxed);
        self.file.sync_data()
    }
    fn will_need(&self, ranges: &[(u64, u64)]) {
        use std::os::fd::AsRawFd;
        for &(off, len) in ranges {
            // SAFETY: advisory call on our own descriptor; failure is harmless.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    off as i64,
                    len as i64,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
        }
    }
    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block device: seek to the end.
        use std::io::Seek;
        let mut f = &self.file;
        f.seek(io::SeekFrom::End(0))
    }
}

fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    if cdm_common::lock::try_lock_exclusive(file)? {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "{} is in use by another process (snapshotd or cdm-nbd?)",
            path.display()
        ),
    ))
}

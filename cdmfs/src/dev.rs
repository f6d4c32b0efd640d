//! Block devices under a pool: the trait and a file or block device.
//! The in-memory and crash-simulating devices of tests are in `testdev`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};

use cdm_common::lock::{lock, wait};

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
    /// Makes the device at least `new_len` bytes long, for
    /// [`Pool::grow`](crate::Pool::grow). On failure the device keeps its
    /// length. Devices that cannot grow answer `Unsupported`.
    fn grow(&self, new_len: u64) -> io::Result<()> {
        if self.len()? >= new_len {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this device cannot grow",
        ))
    }
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// A pool file or block device.
pub struct FileDev {
    file: File,
    /// Bytes written since writeback was last started.
    unsynced: AtomicU64,
    /// The thread that starts writeback (None if it could not be spawned:
    /// then `sync` alone writes back).
    writeback: Option<Writeback>,
    /// Whether growing preallocates the new range (a pool made with
    /// [`FileDev::create_preallocated`], or found fully allocated at open).
    prealloc: bool,
    /// One grow at a time: a failed grow cuts the file back to the length
    /// it found, which must not undo a concurrent one.
    grow_lock: Mutex<()>,
}

/// Start writeback of dirty pages after this many bytes of writes, so a
/// commit's fdatasync finds less left to write (as RocksDB's
/// `bytes_per_sync`).
const WRITEBACK_BYTES: u64 = 8 << 20;

/// A thread of its own starts the writeback. `sync_file_range` submits the
/// dirty pages in the caller's context (on ext4 that includes the delayed
/// block allocation, under the inode's locks): called from `write_at`, it
/// made one write in every 8 MiB (an NBD request) wait for the submission
/// of everything dirty, while the other writers queued on the inode lock.
struct Writeback {
    shared: Arc<WritebackState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WritebackState {
    /// (a writeback is wanted, the device is being dropped)
    flags: Mutex<(bool, bool)>,
    cv: Condvar,
    /// Writebacks started, for tests and diagnostics.
    started: AtomicU64,
}

impl Writeback {
    fn spawn(file: &File) -> Option<Writeback> {
        let file = file.try_clone().ok()?;
        let shared = Arc::new(WritebackState::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cdmfs-writeback".into())
            .spawn(move || writeback_loop(&file, &s))
            .ok()?;
        Some(Writeback {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks the thread for a writeback; never waits for I/O.
    fn kick(&self) {
        lock(&self.shared.flags).0 = true;
        self.shared.cv.notify_one();
    }
}

fn writeback_loop(file: &File, s: &WritebackState) {
    loop {
        {
            let mut f = lock(&s.flags);
            while !f.0 && !f.1 {
                f = wait(&s.cv, f);
            }
            if f.1 {
                return;
            }
            f.0 = false;
        }
        // SAFETY: advisory call on our own descriptor. It only starts
        // writeback (no durability is claimed); failure is harmless.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        s.started.fetch_add(1, Relaxed);
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        lock(&self.shared.flags).1 = true;
        self.shared.cv.notify_one();
        // Joined, so that its duplicate descriptor, which holds the pool's
        // flock too, is closed when the device is: a reopen in the same
        // process must not find the pool still locked.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

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

    /// Creates a regular file of `size` bytes whose blocks the host
    /// filesystem allocates now (`fallocate(2)` mode 0), so that a host
    /// filesystem that fills up later cannot fail a write or a commit of
    /// the pool with ENOSPC. Refuses (`StorageFull`, naming the size and
    /// the free space) when the filesystem has not that much room, and
    /// (`Unsupported`) where it cannot preallocate: the caller may then
    /// fall back to [`FileDev::create`]. A refused file is removed.
    pub fn create_preallocated(path: &Path, size: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let made = lock_exclusive(&file, path)
            .and_then(|()| preallocate(&file, 0, size))
            .and_then(|()| file.sync_all());
        if let Err(e) = made {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
        }
        let mut dev = FileDev::from_file(file);
        dev.prealloc = true;
        Ok(dev)
    }

    pub fn from_file(file: File) -> Self {
        let writeback = Writeback::spawn(&file);
        // A file whose every byte has a block was preallocated (or written
        // through): its growth is preallocated too.
        let prealloc = file
            .metadata()
            .is_ok_and(|m| m.file_type().is_file() && fully_allocated(&m));
        FileDev {
            file,
            unsynced: AtomicU64::new(0),
            writeback,
            prealloc,
            grow_lock: Mutex::new(()),
        }
    }

    /// Whether growing this device preallocates the new range.
    pub fn preallocated(&self) -> bool {
        self.prealloc
    }

    /// Extends a regular file to `new_len` bytes (nothing if it is that
    /// long already), with `prealloc` allocating the new range on the host
    /// filesystem (`fallocate`), else sparse. The new length is synced
    /// before this returns, so a superblock that names it never outlives
    /// it. On failure the file keeps its old length. A block device cannot
    /// be grown here: `Unsupported` unless it is already that long.
    pub fn grow_file(&self, new_len: u64, prealloc: bool) -> io::Result<()> {
        let _one = lock(&self.grow_lock);
        let meta = self.file.metadata()?;
        if !meta.file_type().is_file() {
            let len = self.len()?;
            if len >= new_len {
                return Ok(());
            }
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the pool is on a block device of {} bytes and cdmfs cannot grow a block \
                     device to {new_len}: grow the device first (e.g. lvextend)",
                    len
                ),
            ));
        }
        let old = meta.len();
        if new_len <= old {
            return Ok(());
        }
        let r = if prealloc {
            preallocate(&self.file, old, new_len - old)
        } else {
            self.file.set_len(new_len)
        }
        .and_then(|()| self.file.sync_all());
        if let Err(e) = r {
            // Gives back whatever a partial fallocate took.
            if let Err(cut) = self.file.set_len(old) {
                tracing::warn!(error = %cut, "cannot cut a failed pool growth back");
            }
            return Err(e);
        }
        Ok(())
    }

    /// How many writebacks the background thread has started (0 without
    /// the thread).
    pub fn writebacks_started(&self) -> u64 {
        self.writeback
            .as_ref()
            .map_or(0, |w| w.shared.started.load(Relaxed))
    }
}

impl BlockDev for FileDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)?;
        let n = self.unsynced.fetch_add(buf.len() as u64, Relaxed) + buf.len() as u64;
        if n >= WRITEBACK_BYTES && self.unsynced.swap(0, Relaxed) >= WRITEBACK_BYTES {
            if let Some(w) = &self.writeback {
                w.kick();
            }
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.unsynced.store(0, Relaxed);
        self.file.sync_data()
    }
    fn will_need(&self, ranges: &[(u64, u64)]) {
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
    fn grow(&self, new_len: u64) -> io::Result<()> {
        self.grow_file(new_len, self.prealloc)
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

/// Whether every byte of a regular file has a block on the host
/// filesystem (blocks are 512-byte units in `st_blocks`).
pub fn fully_allocated(meta: &std::fs::Metadata) -> bool {
    meta.blocks().saturating_mul(512) >= meta.len()
}

/// Bytes the host filesystem under `file` can still give an unprivileged
/// writer.
fn host_free(file: &File) -> io::Result<u64> {
    // SAFETY: statvfs is plain data (all-zero is valid); fstatvfs fills it
    // for our own open descriptor.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Allocates `len` bytes of `file` from `off` (mode 0: the file grows to
/// cover them). Errors say what was asked and what the host has.
fn preallocate(file: &File, off: u64, len: u64) -> io::Result<()> {
    use cdm_common::size::human;
    let no_room = |free: u64| {
        io::Error::new(
            io::ErrorKind::StorageFull,
            format!(
                "cannot preallocate {} ({len} bytes) for the pool: the host filesystem has {} \
                 ({free} bytes) free",
                human(len),
                human(free)
            ),
        )
    };
    // Checked first: a fallocate bound to fail may work a long time
    // before it does.
    let free = host_free(file)?;
    if free < len {
        return Err(no_room(free));
    }
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pool size {} is out of range", off.saturating_add(len)),
        ));
    };
    loop {
        // SAFETY: fallocate on our own descriptor; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, o, l) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOSPC) => return Err(no_room(host_free(file).unwrap_or(0))),
            Some(libc::EOPNOTSUPP) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "the host filesystem cannot preallocate (fallocate: {e}); a sparse \
                         pool is possible but a full host filesystem then stops its commits"
                    ),
                ))
            }
            _ => return Err(e),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeback_starts_off_the_writers_path_and_ends_with_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let dev = FileDev::create(&path, 64 << 20).unwrap();
        assert_eq!(dev.writebacks_started(), 0);
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..(WRITEBACK_BYTES >> 20) + 1 {
            dev.write_at(&chunk, i << 20).unwrap();
        }
        // The writes asked for one; the thread starts it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while dev.writebacks_started() == 0 {
            assert!(std::time::Instant::now() < deadline, "no writeback started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Dropping the device ends the thread and its descriptor with it:
        // the pool can be opened again at once (the flock is released).
        drop(dev);
        let again = FileDev::open(&path).unwrap();
        let mut b = vec![0u8; 1 << 20];
        again.read_at(&mut b, 0).unwrap();
        assert_eq!(b, chunk);
    }
}

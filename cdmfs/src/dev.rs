//! Block devices under a pool: the trait and a file or block device.
//! The in-memory and crash-simulating devices of tests are in `testdev`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
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
    use std::os::fd::AsRawFd;
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

    pub fn from_file(file: File) -> Self {
        let writeback = Writeback::spawn(&file);
        FileDev {
            file,
            unsynced: AtomicU64::new(0),
            writeback,
        }
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

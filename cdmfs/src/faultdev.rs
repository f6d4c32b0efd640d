//! A device that fails on demand, for tests of a running appliance.
//!
//! While a file of a fault's name exists in the fault directory, the
//! matching operation of the wrapped device fails (snapshotd's
//! `--fault-dir` wraps the pool with it). Tests create and remove the files
//! at the moments they choose: mid-write, mid-commit, during a snapshot or
//! a delete. Checking costs one `stat` per operation, so only a daemon
//! started with a fault directory pays it.
//!
//! | file | effect |
//! |---|---|
//! | `pool-enospc` | writes and syncs fail with ENOSPC (a full filesystem under a sparse pool) |
//! | `pool-short-write` | a write stores its first half, then fails with ENOSPC |
//! | `pool-eio-write` | writes fail with EIO |
//! | `pool-eio-read` | reads fail with EIO |
//! | `pool-eio-sync` | syncs fail with EIO |
//! | `pool-slow-sync` | syncs first sleep the milliseconds the file holds (default 1000) |

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::dev::BlockDev;

/// The names of the fault files, for callers that make them.
pub const FAULTS: [&str; 6] = [
    "pool-enospc",
    "pool-short-write",
    "pool-eio-write",
    "pool-eio-read",
    "pool-eio-sync",
    "pool-slow-sync",
];

/// A [`BlockDev`] whose operations fail while fault files exist.
pub struct FaultDev {
    dev: Arc<dyn BlockDev>,
    dir: PathBuf,
}

impl FaultDev {
    pub fn new(dev: Arc<dyn BlockDev>, dir: &Path) -> FaultDev {
        FaultDev {
            dev,
            dir: dir.to_path_buf(),
        }
    }

    fn on(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }

    /// The plain OS error, as a real device gives it (callers look at the
    /// errno); the log says it was injected.
    fn fail(errno: i32, what: &str) -> io::Error {
        tracing::debug!(what, errno, "injected fault");
        io::Error::from_raw_os_error(errno)
    }
}

impl BlockDev for FaultDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.on("pool-eio-read") {
            return Err(FaultDev::fail(libc::EIO, "read"));
        }
        self.dev.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.on("pool-enospc") {
            return Err(FaultDev::fail(libc::ENOSPC, "write"));
        }
        if self.on("pool-eio-write") {
            return Err(FaultDev::fail(libc::EIO, "write"));
        }
        if self.on("pool-short-write") {
            let half = buf.len() / 2 / 512 * 512;
            self.dev.write_at(&buf[..half], off)?;
            return Err(FaultDev::fail(libc::ENOSPC, "short write"));
        }
        self.dev.write_at(buf, off)
    }

    fn sync(&self) -> io::Result<()> {
        if let Ok(ms) = std::fs::read_to_string(self.dir.join("pool-slow-sync")) {
            let ms = ms.trim().parse::<u64>().unwrap_or(1000).min(600_000);
            std::thread::sleep(Duration::from_millis(ms));
        }
        if self.on("pool-enospc") {
            return Err(FaultDev::fail(libc::ENOSPC, "sync"));
        }
        if self.on("pool-eio-sync") {
            return Err(FaultDev::fail(libc::EIO, "sync"));
        }
        self.dev.sync()
    }

    fn len(&self) -> io::Result<u64> {
        self.dev.len()
    }

    fn grow(&self, new_len: u64) -> io::Result<()> {
        if self.on("pool-enospc") {
            return Err(FaultDev::fail(libc::ENOSPC, "grow"));
        }
        self.dev.grow(new_len)
    }

    fn will_need(&self, ranges: &[(u64, u64)]) {
        self.dev.will_need(ranges)
    }
}

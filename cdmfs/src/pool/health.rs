//! What the pool can do now, and the device errors behind it.
//!
//! A commit whose writes or syncs fail (a full host filesystem under a
//! sparse pool, an I/O error) does not fail the pool for good: its
//! prepared blocks and superblock are kept (`Inner::stalled`) and written
//! again by the next commit, which merges its own changes in. Until one
//! succeeds the pool is *stalled*: reads and read-only exports go on from
//! memory and the last durable commit, while writes and catalog changes
//! are refused (they could not be made durable), with `NoSpace` when the
//! device said ENOSPC. Any flush or commit retries; the first that gets
//! through clears the state. A pool that is merely *full* (its own
//! allocator, not the host) still commits, deletes and snapshots: data
//! allocations leave [`reserve_blocks`] for metadata.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::UNIT;

use super::{now_ns, Inner, Pool};

/// What the pool can do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolState {
    /// Everything works.
    Ok,
    /// Data allocations are refused (free space is down to the metadata
    /// reserve); commits, deletes and snapshots still work.
    Full,
    /// Commits fail because the device is out of space (a sparse pool on a
    /// full filesystem): reads only until space returns.
    NoSpace,
    /// Commits fail with I/O errors: reads only until the device recovers.
    IoError,
}

impl PoolState {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Ok => "ok",
            PoolState::Full => "full",
            PoolState::NoSpace => "no_space",
            PoolState::IoError => "io_error",
        }
    }
}

/// I/O errors the device returned since the pool was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoErrors {
    pub read: u64,
    pub write: u64,
    pub sync: u64,
    /// The newest, with its time (Unix seconds).
    pub last: Option<(u64, String)>,
}

/// [`Pool::health`].
#[derive(Clone, Debug)]
pub struct PoolHealth {
    pub state: PoolState,
    /// Why, when not `Ok`.
    pub message: Option<String>,
    /// Since when (Unix seconds), when not `Ok`.
    pub since_unix: Option<u64>,
    /// Commits tried again while stalled, since open.
    pub commit_retries: u64,
    /// Space kept for metadata: data writes stop this far from full.
    pub reserve_bytes: u64,
    pub io_errors: IoErrors,
}

/// Why the pool is stalled.
pub(crate) struct Stall {
    pub no_space: bool,
    pub message: String,
    pub since_unix: u64,
}

impl Stall {
    /// The error a refused mutation gets.
    pub fn error(&self) -> Error {
        if self.no_space {
            return Error::NoSpace;
        }
        Error::Io(io::Error::other(format!(
            "the pool cannot commit after an I/O error ({}); it retries and serves reads meanwhile",
            self.message
        )))
    }
}

/// Whether an engine error means the device is out of space.
pub(crate) fn is_no_space(e: &Error) -> bool {
    match e {
        Error::NoSpace => true,
        Error::Io(io) => {
            matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                || matches!(
                    io.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                )
        }
        _ => false,
    }
}

/// Blocks that data allocations leave free for metadata, intent-log slots
/// aside: 2% of the pool, at least 1 MiB and at most 256 MiB. A commit
/// needs new blocks for every tree it touches; a delete needs them before
/// it frees anything.
pub(crate) fn reserve_blocks(total: u64) -> u64 {
    (total / 50).clamp(256, 65536).min(total / 4)
}

/// The device under an open pool, counting the errors it returns.
pub(crate) struct Watched {
    dev: Arc<dyn BlockDev>,
    counts: Arc<ErrorCounts>,
}

#[derive(Default)]
pub(crate) struct ErrorCounts {
    read: AtomicU64,
    write: AtomicU64,
    sync: AtomicU64,
    last: Mutex<Option<(u64, String)>>,
}

impl ErrorCounts {
    fn note(&self, which: &AtomicU64, op: &str, off: Option<u64>, e: &io::Error) {
        which.fetch_add(1, Relaxed);
        let what = match off {
            Some(o) => format!("{op} at byte {o}: {e}"),
            None => format!("{op}: {e}"),
        };
        if let Ok(mut l) = self.last.lock() {
            *l = Some((now_ns() / 1_000_000_000, what));
        }
    }

    pub fn snapshot(&self) -> IoErrors {
        IoErrors {
            read: self.read.load(Relaxed),
            write: self.write.load(Relaxed),
            sync: self.sync.load(Relaxed),
            last: self.last.lock().ok().and_then(|l| l.clone()),
        }
    }
}

impl Watched {
    pub fn wrap(dev: Arc<dyn BlockDev>) -> (Arc<dyn BlockDev>, Arc<ErrorCounts>) {
        let counts = Arc::new(ErrorCounts::default());
        let w = Watched {
            dev,
            counts: counts.clone(),
        };
        (Arc::new(w), counts)
    }
}

impl BlockDev for Watched {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.dev
            .read_at(buf, off)
            .inspect_err(|e| self.counts.note(&self.counts.read, "read", Some(off), e))
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.dev
            .write_at(buf, off)
            .inspect_err(|e| self.counts.note(&self.counts.write, "write", Some(off), e))
    }
    fn sync(&self) -> io::Result<()> {
        self.dev
            .sync()
            .inspect_err(|e| self.counts.note(&self.counts.sync, "sync", None, e))
    }
    fn len(&self) -> io::Result<u64> {
        self.dev.len()
    }
    fn grow(&self, new_len: u64) -> io::Result<()> {
        self.dev.grow(new_len)
    }
    fn will_need(&self, ranges: &[(u64, u64)]) {
        self.dev.will_need(ranges)
    }
}

impl Inner {
    /// A sync failed: the pool fails (every call answers `Failed`) until
    /// [`Pool::flush`] or [`Pool::commit`] reloads it from the device.
    pub(crate) fn sync_failed(&mut self, e: &Error) {
        tracing::error!(error = %e, "a sync of the pool failed; what was written since the last good sync may be lost: the pool reloads its last durable state from the device");
        self.failed = true;
        self.stalled = None;
        self.stall = Some(Stall {
            no_space: is_no_space(e),
            message: format!(
                "a sync failed ({e}); reloading the last durable state from the device"
            ),
            since_unix: now_ns() / 1_000_000_000,
        });
    }

    /// Refuses a mutation while the pool is stalled.
    pub(crate) fn check_writable(&self) -> Result<()> {
        match &self.stall {
            Some(s) => Err(s.error()),
            None => Ok(()),
        }
    }

    /// Free blocks data may take: all but the reserve.
    pub(crate) fn data_free(&self) -> u64 {
        let a = &self.store.alloc;
        (a.total() - a.used()).saturating_sub(self.reserve)
    }
}

impl Pool {
    /// What the pool can do now (cheap: no I/O).
    pub fn health(&self) -> Result<PoolHealth> {
        // Not `lock()`: a failed pool has a health too.
        let g = self.inner.lock().map_err(|_| Error::Failed)?;
        let io_errors = self.errors.snapshot();
        let (state, message, since_unix) = match &g.stall {
            Some(s) => (
                if s.no_space {
                    PoolState::NoSpace
                } else {
                    PoolState::IoError
                },
                Some(s.message.clone()),
                Some(s.since_unix),
            ),
            None if g.full_since.is_some() => (
                PoolState::Full,
                Some("data allocations reached the metadata reserve".into()),
                g.full_since,
            ),
            None => (PoolState::Ok, None, None),
        };
        Ok(PoolHealth {
            state,
            message,
            since_unix,
            commit_retries: g.commit_retries,
            reserve_bytes: g.reserve * UNIT,
            io_errors,
        })
    }

    /// A mutation's lock: refused while the pool is stalled.
    pub(crate) fn lock_writable(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        let g = self.lock()?;
        g.check_writable()?;
        Ok(g)
    }
}

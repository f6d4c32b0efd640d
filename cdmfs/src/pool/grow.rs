//! Growing an open pool: the device first, then the allocator and the
//! superblock's `total_blocks`, which the next commit writes.
//!
//! Crash safety: the device is extended (and its new length synced) before
//! any block past the old end can be allocated, and the new size is durable
//! only with the commit that writes it. A crash in between reopens the pool
//! at its old size on a longer device, which [`Pool::open`] accepts (only a
//! device *shorter* than the superblock says is `Truncated`). No intent-log
//! record can name a block past the old end: the growth is structural, so
//! the flush after it commits instead of logging.

use crate::error::{Error, Result};
use crate::format::UNIT;

use super::records::KEY_POOL;
use super::{Pool, SpaceInfo};

/// Largest pool [`Pool::grow`] accepts: the allocation bitmap takes one
/// bit per 4 KiB block (32 MiB of memory per TiB).
pub const MAX_POOL_BYTES: u64 = 1 << 50;

impl Pool {
    /// Grows the pool to `new_bytes` (a multiple of 4 KiB, not below the
    /// current size). The device is extended first (a [`crate::FileDev`]
    /// preallocates the new range if the pool was preallocated); if it
    /// cannot be, the pool is unchanged and the device's error is returned
    /// (`Error::Io` of kind `StorageFull` when the host filesystem lacks
    /// the room, `Unsupported` for a block device that is too small). The
    /// new space is usable at once and durable with the next flush.
    pub fn grow(&self, new_bytes: u64) -> Result<SpaceInfo> {
        if !new_bytes.is_multiple_of(UNIT) {
            return Err(Error::Invalid(format!(
                "pool size {new_bytes} is not a multiple of {UNIT} bytes"
            )));
        }
        if new_bytes > MAX_POOL_BYTES {
            return Err(Error::Invalid(format!(
                "pool size {new_bytes} is above the largest pool ({MAX_POOL_BYTES} bytes)"
            )));
        }
        let old = self.lock()?.store.alloc.total() * UNIT;
        check_not_shrink(old, new_bytes)?;
        if new_bytes == old {
            return self.space();
        }
        // Without the pool lock: a preallocation may take a while, and I/O
        // goes on meanwhile (the device serializes growths itself).
        self.dev().grow(new_bytes).map_err(|e| {
            tracing::warn!(error = %e, size = new_bytes, "cannot extend the pool's device");
            Error::Io(e)
        })?;
        let mut g = self.lock()?;
        // A commit between its phases carries the old superblock and
        // publishes it as the current one: wait for it, so the size set
        // below is what the next commit writes.
        while g.committing {
            g = self.commit_done.wait(g).map_err(|_| Error::Failed)?;
        }
        if g.failed {
            return Err(Error::Failed);
        }
        g.check_writable()?;
        let total = new_bytes / UNIT;
        let current = g.store.alloc.total();
        // A concurrent growth may have gone further meanwhile.
        check_not_shrink(current * UNIT, new_bytes)?;
        if total > current {
            match g.store.alloc.grow(total) {
                Ok(true) => {}
                Ok(false) => return Err(Error::Invalid("a pool cannot shrink".into())),
                Err(e) => {
                    return Err(Error::Invalid(format!(
                        "no memory for the allocation bitmap of a {new_bytes}-byte pool: {e}"
                    )))
                }
            }
            g.sb.total_blocks = total;
            g.reserve = super::health::reserve_blocks(total);
            // The pool record is rewritten so the commit is not empty (the
            // size is in the superblock, which an empty commit skips).
            g.catalog_dirty.insert(KEY_POOL, true);
            g.log.structural = true;
            g.ops += 1;
            tracing::info!(
                from = current * UNIT,
                to = new_bytes,
                "pool grown; the next commit makes it durable"
            );
        }
        drop(g);
        self.space()
    }
}

fn check_not_shrink(current: u64, asked: u64) -> Result<()> {
    if asked < current {
        return Err(Error::Invalid(format!(
            "a pool cannot shrink: it is {current} bytes, {asked} asked"
        )));
    }
    Ok(())
}

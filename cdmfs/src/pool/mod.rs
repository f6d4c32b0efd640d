//! The pool: superblock ring, catalog of volumes and snapshots, byte-granular
//! I/O on volumes, snapshots and clones, and group commit.
//!
//! One file per job: `options` and `info` are the public types,
//! `records` the catalog records, `superblock` the ring, `load`
//! opening, `catalog` volumes and snapshots, `read`, `write` and
//! `reduce` the data path (`piece` the sub-block pieces), `intent` the
//! intent log that makes a flush one record and one sync, `commit` the three-phase commit,
//! `audit` the views fsck and the space report use; `diff` what changed
//! between two snapshots and `known` writes of blocks the pool holds by
//! fingerprint (both for replication); `seal` sealed volumes (raw
//! encrypted replication).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::Keys;
use crate::store::Store;

mod audit;
mod catalog;
mod commit;
mod defrag;
mod diff;
mod frag;
mod grow;
mod health;
mod info;
mod intent;
mod known;
mod load;
mod options;
mod piece;
mod read;
mod records;
mod reduce;
mod relocate;
mod seal;
mod superblock;
mod tier;
mod write;

pub(crate) use audit::TreeRoot;
pub use defrag::DefragProgress;
pub use diff::DiffStats;
pub use frag::Fragmentation;
pub use grow::MAX_POOL_BYTES;
pub use health::{IoErrors, PoolHealth, PoolState};
pub use info::{Brief, PhysicalMap, Run, SnapshotInfo, SpaceInfo, Target, VolumeInfo};
pub use options::{FormatOptions, OpenOptions};
pub use records::{validate_name, MAX_RECORD};
pub use tier::{TierCommit, TierEntry, TierObject, TierPlaced, TierRead};

use records::{PoolRec, SnapshotRec, VolumeRec};
use write::RangeLocks;

pub(crate) struct Inner {
    pub store: Store,
    sb: Superblock,
    volumes: BTreeMap<u64, VolumeRec>,
    names: HashMap<String, u64>,
    snapshots: BTreeMap<u64, SnapshotRec>,
    catalog_root: Ptr,
    /// Catalog keys to rewrite (true) or delete (false) at the next commit.
    catalog_dirty: BTreeMap<u64, bool>,
    /// Where each catalog record's blob lives, and its size in blocks.
    blobs: HashMap<u64, (Ptr, u64)>,
    free_queue: VecDeque<Vec<(u64, u64)>>,
    /// Count of mutations so far; flush makes all of them durable.
    ops: u64,
    /// Reloads from the device since open (see `Pool::reload_if_failed`):
    /// an id or node address seen before a reload may name something else
    /// after it.
    reloads: u64,
    next_id: u64,
    failed: bool,
    /// A commit whose writes failed, written again by the next one (see
    /// `health.rs`), and why.
    stalled: Option<commit::Prepared>,
    stall: Option<health::Stall>,
    commit_retries: u64,
    /// Blocks data allocations leave for metadata.
    reserve: u64,
    /// Since when (Unix seconds) data allocations are refused for space.
    full_since: Option<u64>,
    dirty_limit: usize,
    /// Readers outside the pool lock (a live scrub, a diff) that need every
    /// block a committed root reached to stay unreused: frees wait while
    /// this is > 0 (`commit::Pin`).
    pub(crate) pins: usize,
    /// A commit is writing and syncing without the pool lock (see
    /// [`Pool::flush`]); no other commit may start until it publishes.
    committing: bool,
    /// Commits done since open and the time they took.
    commits: u64,
    commit_ns: u64,
    pool_rec: PoolRec,
    /// The intent log of the current generation.
    log: intent::LogState,
    /// Seal keys loaded and this pool's own (kept across reloads).
    seals: seal::SealKeys,
}

/// An open pool. All methods take `&self`; the pool is shared between
/// threads (NBD connections, the API, the scheduler).
pub struct Pool {
    inner: Mutex<Inner>,
    dev: Arc<dyn BlockDev>,
    /// Serializes commits; holds the number of mutations known durable.
    durable: Mutex<u64>,
    ranges: RangeLocks,
    /// Signalled when a flush commit in flight publishes.
    commit_done: Condvar,
    /// Keys of an unlocked pool.
    keys: Option<Arc<Keys>>,
    /// Errors the device returned since open.
    errors: Arc<health::ErrorCounts>,
    /// Sequential readers, for read-ahead in logical order.
    ahead: read::ReadAhead,
    /// How to load the pool again after a failed sync (see `reload`).
    reopen: OpenOptions,
    last_reload: Mutex<Option<std::time::Instant>>,
    /// Reader of the object-store tier (`tier.rs`), when one is set.
    tier: std::sync::RwLock<Option<Arc<dyn tier::TierRead>>>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Pool {
    /// Whether the pool has an encryption key set up, and whether it is unlocked.
    pub fn key_state(&self) -> Result<(bool, bool)> {
        Ok((self.lock()?.pool_rec.crypto.is_some(), self.keys.is_some()))
    }

    /// Whether `seal` is under this pool's own key (whether or not
    /// unlocked): its key check value is this pool's key record's. The one
    /// home of that rule (fail-back unsealing, refusing to unload our own
    /// key).
    pub fn seal_is_own(&self, seal: &crate::SealRec) -> Result<bool> {
        Ok(self
            .lock()?
            .pool_rec
            .crypto
            .as_ref()
            .is_some_and(|c| c.check == seal.crypto.check))
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        let g = self.inner.lock().map_err(|_| Error::Failed)?;
        if g.failed {
            return Err(Error::Failed);
        }
        Ok(g)
    }

    pub fn space(&self) -> Result<SpaceInfo> {
        let g = self.lock()?;
        let total = g.store.alloc.total() * UNIT;
        let used = g.store.alloc.used() * UNIT;
        let freeing: u64 = g.deferred_frees().iter().map(|(_, n)| n).sum::<u64>() * UNIT;
        Ok(SpaceInfo {
            total_bytes: total,
            used_bytes: used,
            free_bytes: total - used,
            generation: g.sb.generation,
            freeing_bytes: freeing.min(used),
            freeing_commits: g.freeing_commits(),
        })
    }

    pub fn uuid(&self) -> Result<[u8; 16]> {
        Ok(self.lock()?.sb.uuid)
    }

    /// Cache occupancy, for tests of the memory bound.
    #[cfg(feature = "test-utils")]
    pub fn cached_nodes(&self) -> Result<usize> {
        Ok(self.lock()?.store.cache_len())
    }

    pub(crate) fn dev(&self) -> &Arc<dyn BlockDev> {
        &self.dev
    }
}

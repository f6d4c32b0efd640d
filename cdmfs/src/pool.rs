//! The pool: superblock ring, catalog of volumes and snapshots, byte-granular
//! I/O on volumes, snapshots and clones, and group commit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::alloc::Allocator;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::{self, CryptoRec, KeySource, Keys, Policy};
use crate::store::{internal, Store};

/// Options for [`Pool::format`].
#[derive(Clone, Debug, Default)]
pub struct FormatOptions {
    /// Cap on entries per B+tree node (0 = as many as fit in 4 KiB). Small
    /// values build deep trees; tests use them.
    pub max_fanout: u32,
}

/// Options for [`Pool::open`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Clean nodes kept in memory (4 KiB each).
    pub cache_nodes: usize,
    /// Dirty nodes that trigger a commit on their own.
    pub dirty_limit: usize,
    /// Key for encrypted volumes. A pool that has a key set up checks it
    /// (a wrong key fails the open); a pool without one adopts it. Without
    /// a key, encrypted volumes cannot be read or written (scrub and fsck
    /// still work: checksums cover the stored bytes).
    pub key: Option<KeySource>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_nodes: 16384,
            dirty_limit: 8192,
            key: None,
        }
    }
}

/// How many commits a freed block waits before reuse: the newest superblock
/// and the one before it never reach a reused block.
const FREE_DELAY: usize = 2;
/// Largest catalog record (snapshot metadata included).
pub const MAX_RECORD: usize = 256 * 1024;
const KEY_VOLUME: u64 = 1 << 56;
const KEY_SNAPSHOT: u64 = 2 << 56;
/// Pool-wide settings (the encryption key record).
const KEY_POOL: u64 = 3 << 56;

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
struct PoolRec {
    #[serde(default)]
    crypto: Option<CryptoRec>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct VolumeRec {
    id: u64,
    name: String,
    size: u64,
    block_size: u32,
    created_ns: u64,
    origin: Option<u64>,
    root: u64,
    root_csum: u32,
    allocated_blocks: u64,
    #[serde(default, skip_serializing_if = "Policy::is_plain")]
    policy: Policy,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct SnapshotRec {
    id: u64,
    volume_id: u64,
    label: String,
    created_ns: u64,
    metadata: serde_json::Value,
    root: u64,
    root_csum: u32,
    size: u64,
    block_size: u32,
    allocated_blocks: u64,
    #[serde(default, skip_serializing_if = "Policy::is_plain")]
    policy: Policy,
}

/// A volume (stage disk or clone) as listed.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_ns: u64,
    /// Snapshot this volume was cloned from.
    pub origin: Option<u64>,
    /// Bytes of data the volume maps.
    pub allocated_bytes: u64,
    /// Bytes only this volume references (freed if it is deleted).
    pub unique_bytes: u64,
    pub snapshots: usize,
    pub policy: Policy,
}

/// A snapshot as listed.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    pub id: u64,
    pub volume: String,
    pub volume_id: u64,
    pub label: String,
    pub created_ns: u64,
    pub metadata: serde_json::Value,
    pub size: u64,
    pub block_size: u32,
    pub allocated_bytes: u64,
    pub unique_bytes: u64,
    pub policy: Policy,
}

/// A catalog entry without space accounting: cheap to list often.
#[derive(Clone, Debug, Serialize)]
pub struct Brief {
    pub id: u64,
    pub name: String,
    /// For snapshots, the id of their volume; for volumes, their own id.
    pub volume_id: u64,
    pub created_ns: u64,
    /// Clones: the snapshot they were made from.
    pub origin: Option<u64>,
    /// Logical size in bytes.
    pub size: u64,
}

/// Pool-wide space figures.
#[derive(Clone, Debug, Serialize)]
pub struct SpaceInfo {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub generation: u64,
    /// Part of `used_bytes` already freed, waiting for the commits after
    /// which it may be reused (deferred frees).
    pub freeing_bytes: u64,
}

/// Physical layout of one target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhysicalMap {
    /// Pool byte offsets of its tree nodes.
    pub nodes: Vec<u64>,
    /// (logical byte offset, pool byte offset, stored length) per extent.
    pub extents: Vec<(u64, u64, u32)>,
}

/// What an I/O addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Volume(u64),
    Snapshot(u64),
}

/// A mapped or unmapped run, for block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub allocated: bool,
}

/// A commit between its phases: new blocks, the superblock that reaches
/// them, and the blocks it freed.
struct Prepared {
    out: Vec<(u64, Vec<u8>)>,
    sb: Superblock,
    freed: Vec<(u64, u64)>,
}

/// Phase 2 of a commit, needing no lock: new blocks, a barrier, then the
/// superblock, then a barrier.
fn write_prepared(dev: &dyn BlockDev, p: &Prepared) -> Result<()> {
    crate::store::write_blocks(dev, &p.out)?;
    dev.sync()?;
    let mut slot = vec![0u8; UNIT as usize];
    slot[..SB_BYTES].copy_from_slice(&p.sb.encode());
    dev.write_at(&slot, (p.sb.generation % SB_SLOTS) * UNIT)?;
    dev.sync()?;
    Ok(())
}

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
    next_id: u64,
    failed: bool,
    dirty_limit: usize,
    /// Readers outside the pool lock (a live scrub) that need every block a
    /// committed root reached to stay unreused: frees wait while this is > 0.
    pub(crate) pins: usize,
    /// A commit is writing and syncing without the pool lock (see
    /// [`Pool::flush`]); no other commit may start until it publishes.
    committing: bool,
    /// Commits done since open and the time they took.
    commits: u64,
    commit_ns: u64,
    pool_rec: PoolRec,
}

/// Locks on block ranges of a volume, held by writers for read-modify-write.
struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    cv: Condvar,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    entry: (u64, u64, u64),
}

impl RangeLocks {
    fn lock(&self, vol: u64, lo: u64, hi: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.iter().any(|&(v, a, b)| v == vol && a < hi && lo < b) {
            held = self.cv.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.push((vol, lo, hi));
        RangeGuard {
            locks: self,
            entry: (vol, lo, hi),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|e| *e == self.entry) {
            held.swap_remove(i);
        }
        self.locks.cv.notify_all();
    }
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
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Checks a volume name: 1–128 characters of `A-Za-z0-9._-`, not starting
/// with `.` or `-` (so names are safe as export names, paths and URLs).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bad name {name:?}: use 1-128 characters of A-Z a-z 0-9 . _ -, not starting with . or -"
        )))
    }
}

fn check_block_size(bs: u32) -> Result<()> {
    if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "block size {bs} must be a power of two from 4 KiB to 1 MiB"
        )))
    }
}

fn read_sb_ring(dev: &dyn BlockDev) -> Result<Superblock> {
    let mut best: Option<Superblock> = None;
    let (mut magic_bad, mut torn, mut empty) = (0, 0, 0);
    let mut newer = None;
    for slot in 0..SB_SLOTS {
        let mut b = vec![0u8; SB_BYTES];
        dev.read_at(&mut b, slot * UNIT)?;
        match Superblock::decode(&b) {
            Ok(Some(sb)) => {
                if best.as_ref().is_none_or(|x| sb.generation > x.generation) {
                    best = Some(sb);
                }
            }
            Ok(None) => empty += 1,
            Err(SbError::Magic) => magic_bad += 1,
            Err(SbError::Torn) => torn += 1,
            Err(SbError::Version(v)) => newer = Some(v),
        }
    }
    if let Some(v) = newer {
        if best.is_none() || v > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: v,
                supported: FORMAT_VERSION,
            });
        }
    }
    match best {
        Some(sb) => {
            if torn > 0 {
                tracing::warn!(
                    torn,
                    generation = sb.generation,
                    "damaged superblock slot(s); using the newest valid one"
                );
            }
            Ok(sb)
        }
        None if torn == 0 && (magic_bad > 0 || empty == SB_SLOTS as usize) => Err(Error::BadMagic),
        None => Err(Error::Corrupt(format!(
            "no valid superblock: {torn} damaged, {magic_bad} with a foreign magic, {empty} empty"
        ))),
    }
}

impl Pool {
    /// Formats `dev` as an empty pool (its whole length).
    pub fn format(dev: &dyn BlockDev, opts: &FormatOptions) -> Result<()> {
        let len = dev.len()?;
        let total = len / UNIT;
        if total < RESERVED_BLOCKS + 64 {
            return Err(Error::Invalid(format!(
                "device of {len} bytes is too small for a pool (minimum {} bytes)",
                (RESERVED_BLOCKS + 64) * UNIT
            )));
        }
        let zero = vec![0u8; UNIT as usize];
        for slot in 0..SB_SLOTS {
            dev.write_at(&zero, slot * UNIT)?;
        }
        let mut uuid = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut uuid[..]);
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid,
            generation: 1,
            total_blocks: total,
            max_fanout: opts.max_fanout,
            catalog: Ptr::NULL,
            refcounts: Ptr::NULL,
            next_id: 1,
            commit_time_ns: now_ns(),
            dedup: Ptr::NULL,
            dedup_rev: Ptr::NULL,
        };
        dev.sync()?;
        dev.write_at(&sb.encode(), UNIT)?;
        dev.sync()?;
        Ok(())
    }

    /// Opens a pool: picks the newest valid superblock, loads the catalog and
    /// rebuilds the allocation bitmap from the refcount and catalog trees.
    pub fn open(dev: Arc<dyn BlockDev>, opts: &OpenOptions) -> Result<Pool> {
        let sb = read_sb_ring(&*dev)?;
        let actual = dev.len()?;
        let expected = sb.total_blocks * UNIT;
        if actual < expected {
            return Err(Error::Truncated { expected, actual });
        }
        let alloc = Allocator::new(sb.total_blocks, RESERVED_BLOCKS);
        let mut store = Store::new(dev.clone(), alloc, sb.max_fanout, opts.cache_nodes);
        store.rc_root = sb.refcounts;
        store.dd_root = sb.dedup;
        store.ddr_root = sb.dedup_rev;
        store.generation = sb.generation + 1;
        let mut inner = Inner {
            store,
            sb: sb.clone(),
            volumes: BTreeMap::new(),
            names: HashMap::new(),
            snapshots: BTreeMap::new(),
            catalog_root: sb.catalog,
            catalog_dirty: BTreeMap::new(),
            blobs: HashMap::new(),
            free_queue: VecDeque::new(),
            pins: 0,
            committing: false,
            commits: 0,
            commit_ns: 0,
            ops: 0,
            next_id: sb.next_id,
            failed: false,
            dirty_limit: opts.dirty_limit.max(64),
            pool_rec: PoolRec::default(),
        };
        inner.load()?;
        let keys = match (&opts.key, &inner.pool_rec.crypto) {
            (None, _) => None,
            (Some(src), Some(rec)) => Some(Arc::new(Keys::unlock(rec, src)?)),
            (Some(src), None) => {
                let (rec, keys) = Keys::create(src)?;
                inner.pool_rec.crypto = Some(rec);
                inner.catalog_dirty.insert(KEY_POOL, true);
                inner.ops += 1;
                Some(Arc::new(keys))
            }
        };
        Ok(Pool {
            inner: Mutex::new(inner),
            dev,
            durable: Mutex::new(0),
            ranges: RangeLocks {
                held: Mutex::new(Vec::new()),
                cv: Condvar::new(),
            },
            commit_done: Condvar::new(),
            keys,
        })
    }

    /// Opens the pool in a file or block device with default options and,
    /// if given, the key in `key_file` — what the offline tools do.
    pub fn open_file(path: &std::path::Path, key_file: Option<&std::path::Path>) -> Result<Pool> {
        let dev = crate::dev::FileDev::open(path).map_err(|io| {
            Error::Io(std::io::Error::new(
                io.kind(),
                format!("{}: {io}", path.display()),
            ))
        })?;
        let opts = OpenOptions {
            key: key_file.map(KeySource::from_key_file).transpose()?,
            ..OpenOptions::default()
        };
        Pool::open(Arc::new(dev), &opts)
    }

    /// Whether the pool has an encryption key set up, and whether it is unlocked.
    pub fn key_state(&self) -> Result<(bool, bool)> {
        Ok((self.lock()?.pool_rec.crypto.is_some(), self.keys.is_some()))
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        let g = self.inner.lock().map_err(|_| Error::Failed)?;
        if g.failed {
            return Err(Error::Failed);
        }
        Ok(g)
    }

    /// Commits and closes the pool.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    /// Makes every mutation that completed before this call durable. Concurrent
    /// callers share one commit (group commit).
    pub fn flush(&self) -> Result<()> {
        let target = self.lock()?.ops;
        let mut durable = self.durable.lock().map_err(|_| Error::Failed)?;
        if *durable >= target {
            return Ok(());
        }
        // Phase 1 under the lock; phase 2 (writes and syncs) without it, so
        // I/O and snapshot creation go on meanwhile; phase 3 publishes.
        let t0 = std::time::Instant::now();
        let (seq, prepared) = {
            let mut g = self.lock()?;
            if g.committing {
                return Err(internal("two flush commits at once"));
            }
            let seq = g.ops;
            let p = g.prepare_commit();
            let p = g.check_commit(p)?;
            g.committing = p.is_some();
            (seq, p)
        };
        if let Some(p) = prepared {
            let r = write_prepared(&*self.dev, &p);
            let mut g = self.inner.lock().map_err(|_| Error::Failed)?;
            g.committing = false;
            self.commit_done.notify_all();
            g.check_commit(r)?;
            g.finish_commit(p, t0);
        }
        *durable = seq;
        Ok(())
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
        })
    }

    pub fn uuid(&self) -> Result<[u8; 16]> {
        Ok(self.lock()?.sb.uuid)
    }

    // ---- volumes ----------------------------------------------------------

    pub fn create_volume(&self, name: &str, size: u64, block_size: u32) -> Result<VolumeInfo> {
        self.create_volume_with(name, size, block_size, Policy::default())
    }

    /// Creates a volume with a data-reduction and encryption policy.
    pub fn create_volume_with(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
        policy: Policy,
    ) -> Result<VolumeInfo> {
        validate_name(name)?;
        check_block_size(block_size)?;
        policy.check()?;
        if policy.encryption.is_some() && self.keys.is_none() {
            return Err(Error::KeyRequired);
        }
        if size == 0 || size > (1 << 60) {
            return Err(Error::Invalid(format!(
                "volume size {size} must be between 1 byte and 1 EiB"
            )));
        }
        let mut g = self.lock()?;
        if g.names.contains_key(name) {
            return Err(Error::Exists(format!("volume {name}")));
        }
        let id = g.take_id();
        let rec = VolumeRec {
            id,
            name: name.to_string(),
            size,
            block_size,
            created_ns: now_ns(),
            origin: None,
            root: 0,
            root_csum: 0,
            allocated_blocks: 0,
            policy,
        };
        g.add_volume(rec);
        g.volume_info(id)
    }

    pub fn volume_id(&self, name: &str) -> Result<u64> {
        self.lock()?.vol_id(name)
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        let mut g = self.lock()?;
        let id = g.vol_id(name)?;
        g.volume_info(id)
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        self.list_volumes_with(true)
    }

    /// Volumes without `unique_bytes` (left 0), which costs a walk of each
    /// volume's uniquely owned subtree under the pool lock.
    pub fn list_volumes_brief(&self) -> Result<Vec<VolumeInfo>> {
        self.list_volumes_with(false)
    }

    fn list_volumes_with(&self, unique: bool) -> Result<Vec<VolumeInfo>> {
        let mut g = self.lock()?;
        let mut named: Vec<(String, u64)> =
            g.names.iter().map(|(n, id)| (n.clone(), *id)).collect();
        named.sort();
        named
            .into_iter()
            .map(|(_, id)| g.volume_info_with(id, unique))
            .collect()
    }

    /// Grows a volume; the new space reads as zeros.
    pub fn grow_volume(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        let mut g = self.lock()?;
        let (id, v) = g.vol_mut(name)?;
        if new_size < v.size {
            return Err(Error::Invalid(format!(
                "cannot shrink volume {name} from {} to {new_size} bytes",
                v.size
            )));
        }
        if new_size > (1 << 60) {
            return Err(Error::Invalid("volume size above 1 EiB".into()));
        }
        v.size = new_size;
        g.touch_volume(id);
        g.volume_info(id)
    }

    /// Deletes a volume. With snapshots it is refused unless `force`, which
    /// deletes them too. Clones made from its snapshots are independent.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<()> {
        let mut g = self.lock()?;
        let id = g.vol_id(name)?;
        let snaps: Vec<u64> = g
            .snapshots
            .values()
            .filter(|s| s.volume_id == id)
            .map(|s| s.id)
            .collect();
        if !snaps.is_empty() && !force {
            return Err(Error::Busy(format!(
                "volume {name} has {} snapshot(s); delete them or force",
                snaps.len()
            )));
        }
        for s in snaps {
            g.drop_snapshot(s)?;
        }
        let rec = g
            .volumes
            .remove(&id)
            .ok_or_else(|| internal("volume vanished"))?;
        g.names.remove(&rec.name);
        if rec.root != 0 {
            g.store.dec_node(Ptr {
                addr: rec.root,
                csum: rec.root_csum,
            })?;
        }
        g.catalog_dirty.insert(KEY_VOLUME | id, false);
        g.ops += 1;
        Ok(())
    }

    // ---- snapshots and clones ----------------------------------------------

    /// Takes an O(1) snapshot of a volume's current contents: the snapshot
    /// shares the volume's root. Durable at the next [`Pool::flush`].
    pub fn create_snapshot(
        &self,
        volume: &str,
        label: &str,
        metadata: serde_json::Value,
    ) -> Result<SnapshotInfo> {
        self.create_snapshot_at(volume, label, metadata, now_ns())
    }

    /// [`Pool::create_snapshot`] with a given creation time (nanoseconds
    /// since the Unix epoch), for callers that keep their own clock.
    pub fn create_snapshot_at(
        &self,
        volume: &str,
        label: &str,
        metadata: serde_json::Value,
        created_ns: u64,
    ) -> Result<SnapshotInfo> {
        let meta_len = serde_json::to_vec(&metadata)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if meta_len + label.len() > MAX_RECORD - 1024 {
            return Err(Error::Invalid(format!(
                "snapshot label and metadata exceed {} bytes",
                MAX_RECORD - 1024
            )));
        }
        let mut g = self.lock()?;
        let vid = g.vol_id(volume)?;
        let v = g
            .volumes
            .get(&vid)
            .ok_or_else(|| internal("volume vanished"))?
            .clone();
        if v.root != 0 {
            g.store.inc(v.root)?;
        }
        let id = g.take_id();
        let rec = SnapshotRec {
            id,
            volume_id: vid,
            label: label.to_string(),
            created_ns,
            metadata,
            root: v.root,
            root_csum: v.root_csum,
            size: v.size,
            block_size: v.block_size,
            allocated_blocks: v.allocated_blocks,
            policy: v.policy,
        };
        g.snapshots.insert(id, rec);
        g.catalog_dirty.insert(KEY_SNAPSHOT | id, true);
        g.ops += 1;
        g.snapshot_info(id)
    }

    pub fn snapshot(&self, id: u64) -> Result<SnapshotInfo> {
        let mut g = self.lock()?;
        if !g.snapshots.contains_key(&id) {
            return Err(Error::NotFound(format!("snapshot {id}")));
        }
        g.snapshot_info(id)
    }

    /// Snapshots of one volume (or all), oldest first.
    pub fn list_snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let mut g = self.lock()?;
        let vid = volume.map(|n| g.vol_id(n)).transpose()?;
        let ids: Vec<u64> = g
            .snapshots
            .values()
            .filter(|s| vid.is_none_or(|v| s.volume_id == v))
            .map(|s| s.id)
            .collect();
        ids.into_iter().map(|id| g.snapshot_info(id)).collect()
    }

    /// Deletes a snapshot, freeing what nothing else references.
    pub fn delete_snapshot(&self, id: u64) -> Result<()> {
        let mut g = self.lock()?;
        g.drop_snapshot(id)?;
        g.ops += 1;
        Ok(())
    }

    /// Makes a writable volume whose contents start as the snapshot's.
    pub fn clone_snapshot(&self, snapshot: u64, name: &str) -> Result<VolumeInfo> {
        validate_name(name)?;
        let mut g = self.lock()?;
        if g.names.contains_key(name) {
            return Err(Error::Exists(format!("volume {name}")));
        }
        let s = g
            .snapshots
            .get(&snapshot)
            .ok_or_else(|| Error::NotFound(format!("snapshot {snapshot}")))?
            .clone();
        if s.root != 0 {
            g.store.inc(s.root)?;
        }
        let id = g.take_id();
        let rec = VolumeRec {
            id,
            name: name.to_string(),
            size: s.size,
            block_size: s.block_size,
            created_ns: now_ns(),
            origin: Some(snapshot),
            root: s.root,
            root_csum: s.root_csum,
            allocated_blocks: s.allocated_blocks,
            policy: s.policy,
        };
        g.add_volume(rec);
        g.volume_info(id)
    }

    /// Detaches a clone from the snapshot it was made from: it becomes an
    /// ordinary volume (it already shares blocks by reference count, so
    /// nothing is copied).
    pub fn promote_clone(&self, name: &str) -> Result<VolumeInfo> {
        let mut g = self.lock()?;
        let (id, v) = g.vol_mut(name)?;
        if v.origin.is_none() {
            return Err(Error::Invalid(format!("volume {name} is not a clone")));
        }
        v.origin = None;
        g.touch_volume(id);
        g.volume_info(id)
    }

    /// Volumes and snapshots (oldest first) without space accounting, which
    /// [`Pool::list_volumes`] computes by walking trees.
    pub fn catalog(&self) -> Result<(Vec<Brief>, Vec<Brief>)> {
        let g = self.lock()?;
        let vols = g
            .volumes
            .values()
            .map(|v| Brief {
                id: v.id,
                name: v.name.clone(),
                volume_id: v.id,
                created_ns: v.created_ns,
                origin: v.origin,
                size: v.size,
            })
            .collect();
        let snaps = g
            .snapshots
            .values()
            .map(|s| Brief {
                id: s.id,
                name: s.label.clone(),
                volume_id: s.volume_id,
                created_ns: s.created_ns,
                origin: None,
                size: s.size,
            })
            .collect();
        Ok((vols, snaps))
    }

    /// Mutations since open: equal values mean nothing changed in between.
    pub fn changes(&self) -> Result<u64> {
        Ok(self.lock()?.ops)
    }

    /// Commits done since open and their total time in nanoseconds.
    pub fn commit_stats(&self) -> Result<(u64, u64)> {
        let g = self.lock()?;
        Ok((g.commits, g.commit_ns))
    }

    /// Resolves an export name: `VOLUME` or `VOLUME@SNAPSHOT_ID`.
    pub fn resolve(&self, export: &str) -> Result<Target> {
        let g = self.lock()?;
        match export.split_once('@') {
            None => Ok(Target::Volume(g.vol_id(export)?)),
            Some((vol, snap)) => {
                let vid = g.vol_id(vol)?;
                let sid: u64 = snap
                    .parse()
                    .map_err(|_| Error::NotFound(format!("snapshot {snap:?}")))?;
                match g.snapshots.get(&sid) {
                    Some(s) if s.volume_id == vid => Ok(Target::Snapshot(sid)),
                    _ => Err(Error::NotFound(format!("snapshot {sid} of volume {vol}"))),
                }
            }
        }
    }

    /// Size and block size of a target.
    pub fn geometry(&self, t: Target) -> Result<(u64, u32)> {
        let g = self.lock()?;
        let (_, size, bs) = g.target(t)?;
        Ok((size, bs))
    }

    // ---- I/O ----------------------------------------------------------------

    /// Reads `buf.len()` bytes at `offset`. Holes read as zeros; every extent
    /// is verified against its checksum.
    pub fn read(&self, t: Target, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (size, bs) = self.geometry(t)?;
        check_range(offset, buf.len() as u64, size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = bs as u64;
        let b0 = offset / bs;
        let b1 = (offset + buf.len() as u64 - 1) / bs + 1;
        let mut last_err = None;
        for _attempt in 0..2 {
            let map = self.mappings_unlocked_io(t, b0, b1)?;
            match self.read_mapped(t, &map, bs, offset, buf) {
                Ok(()) => return Ok(()),
                // The extent may have been freed and reused by a concurrent
                // write and commit: look the mapping up again once.
                Err(e @ Error::DataChecksum { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(Error::Failed))
    }

    fn read_mapped(
        &self,
        t: Target,
        map: &[(u64, Extent)],
        bs: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        // Holes read as zeros; mapped blocks are overwritten below, so only
        // the gaps between them are cleared (not the whole buffer twice).
        let mut pos = offset;
        for (k, _) in map {
            let (ls, le) = (k * bs, k * bs + bs);
            if ls > pos {
                buf[(pos - offset) as usize..(ls.min(end) - offset) as usize].fill(0);
            }
            pos = pos.max(le.min(end));
        }
        if pos < end {
            buf[(pos - offset) as usize..].fill(0);
        }
        // Extents scattered by copy-on-write: let the device fetch them all
        // at once rather than one synchronous read after another.
        if map.len() > 1 {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for (_, e) in map {
                let (o, l) = (e.byte_offset(), e.stored_len as u64);
                match ranges.last_mut() {
                    Some(r) if r.0 + r.1 == o => r.1 += l,
                    _ => ranges.push((o, l)),
                }
            }
            if ranges.len() > 1 {
                self.dev.will_need(&ranges);
            }
        }
        if map.iter().any(|(_, e)| !e.is_plain()) {
            self.read_pipeline(t, map, bs, offset, buf)?;
        }
        let mut i = 0;
        while i < map.len() {
            if !map[i].1.is_plain() {
                i += 1;
                continue;
            }
            // A run of logically and physically contiguous plain extents.
            let mut j = i;
            while j + 1 < map.len()
                && map[j + 1].1.is_plain()
                && map[j + 1].0 == map[j].0 + 1
                && map[j + 1].1.addr == map[j].1.addr + map[j].1.blocks() as u64
                && map[j].1.stored_len as u64 == bs
                && map[j + 1].1.stored_len as u64 == bs
                && (j + 1 - i) < 256
            {
                j += 1;
            }
            let lstart = map[i].0 * bs;
            let phys = map[i].1.addr * UNIT;
            let run_bytes = if i == j {
                map[i].1.stored_len as u64
            } else {
                (j - i + 1) as u64 * bs
            };
            let direct =
                lstart >= offset && lstart + run_bytes <= end && (i != j || run_bytes == bs);
            if direct {
                let dst =
                    &mut buf[(lstart - offset) as usize..(lstart - offset + run_bytes) as usize];
                self.dev.read_at(dst, phys)?;
                for (k, chunk) in dst.chunks(bs as usize).enumerate() {
                    verify(t, &map[i + k], chunk, bs)?;
                }
            } else {
                let mut tmp = vec![0u8; run_bytes as usize];
                self.dev.read_at(&mut tmp, phys)?;
                for (n, e) in map[i..=j].iter().enumerate() {
                    let o = n * bs as usize;
                    let stored = &tmp[o..o + e.1.stored_len as usize];
                    verify(t, e, stored, bs)?;
                    let ls = e.0 * bs;
                    let (a, b) = (ls.max(offset), (ls + bs).min(end));
                    let n = (b - a) as usize;
                    let src_off = (a - ls) as usize;
                    let avail = stored.len().saturating_sub(src_off).min(n);
                    buf[(a - offset) as usize..(a - offset) as usize + avail]
                        .copy_from_slice(&stored[src_off..src_off + avail]);
                }
            }
            i = j + 1;
        }
        Ok(())
    }

    /// Reads the compressed, encrypted or packed extents of `map` into
    /// `buf`: chunks close together in the pool (a pack) are read at once,
    /// each verified against its checksum, then decrypted and decompressed.
    fn read_pipeline(
        &self,
        t: Target,
        map: &[(u64, Extent)],
        bs: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut todo: Vec<usize> = (0..map.len()).filter(|&i| !map[i].1.is_plain()).collect();
        todo.sort_unstable_by_key(|&i| map[i].1.byte_offset());
        let mut last: Option<(u64, Vec<u8>)> = None;
        let mut a = 0;
        while a < todo.len() {
            let start = map[todo[a]].1.byte_offset();
            let mut stop = start + map[todo[a]].1.stored_len as u64;
            let mut b = a + 1;
            while b < todo.len() {
                let e = &map[todo[b]].1;
                let (o, l) = (e.byte_offset(), e.stored_len as u64);
                if o > stop + 65536 || (o + l).max(stop) - start > 2 * MAX_PACK {
                    break;
                }
                stop = stop.max(o + l);
                b += 1;
            }
            let mut span = vec![0u8; (stop - start) as usize];
            self.dev.read_at(&mut span, start)?;
            for &i in &todo[a..b] {
                let (k, e) = map[i];
                let o = (e.byte_offset() - start) as usize;
                // Chunks of one frame are neighbours here: decode it once.
                if last.as_ref().is_none_or(|(off, _)| *off != e.byte_offset()) {
                    let mut stored = span[o..o + e.stored_len as usize].to_vec();
                    verify(t, &map[i], &stored, bs)?;
                    let plain =
                        pipeline::decode_frame(self.keys.as_deref(), &e, &mut stored, bs as usize)?;
                    last = Some((e.byte_offset(), plain));
                }
                let frame = last.as_ref().map(|(_, p)| p.as_slice()).unwrap_or(&[]);
                let plain = pipeline::chunk_of(&e, frame, bs as usize)?;
                let ls = k * bs;
                let (x, y) = (ls.max(offset), (ls + bs).min(end));
                buf[(x - offset) as usize..(y - offset) as usize]
                    .copy_from_slice(&plain[(x - ls) as usize..(y - ls) as usize]);
            }
            a = b;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of a volume. Partial blocks are read,
    /// patched and written to a new place (never overwritten in place).
    pub fn write(&self, vol: u64, offset: u64, data: &[u8]) -> Result<()> {
        let Some((_g, bs)) = self.begin_write(vol, offset, data.len() as u64)? else {
            return Ok(());
        };
        self.write_locked(vol, offset, Some(data), data.len() as u64, bs, false)
    }

    /// Checks a write of `len` bytes at `offset` of a volume and locks the
    /// blocks it touches; None for an empty range.
    fn begin_write(
        &self,
        vol: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<(RangeGuard<'_>, u32)>> {
        let (size, bs) = self.geometry(Target::Volume(vol))?;
        if self.policy_of(vol)?.encryption.is_some() && self.keys.is_none() {
            return Err(Error::KeyRequired);
        }
        check_range(offset, len, size)?;
        if len == 0 {
            return Ok(None);
        }
        let bs64 = bs as u64;
        let g = self
            .ranges
            .lock(vol, offset / bs64, (offset + len - 1) / bs64 + 1);
        // Write throttle: new writes wait while a commit writes and syncs,
        // so the data a commit must sync stays bounded and a snapshot (or a
        // FLUSH) waiting behind it is not delayed by writers outpacing the
        // device. Reads, snapshots and the API are not held.
        let mut inner = self.lock()?;
        while inner.committing {
            inner = self.commit_done.wait(inner).map_err(|_| Error::Failed)?;
            if inner.failed {
                return Err(Error::Failed);
            }
        }
        drop(inner);
        Ok(Some((g, bs)))
    }

    fn policy_of(&self, vol: u64) -> Result<Policy> {
        self.lock()?
            .volumes
            .get(&vol)
            .map(|v| v.policy)
            .ok_or_else(|| Error::NotFound(format!("volume {vol}")))
    }

    /// Runs `f` under the pool lock with device reads forbidden: a node
    /// missing from the cache is read and verified outside the lock, then
    /// `f` runs again. `f` must have no side effects before it can miss.
    fn locked_no_io<T>(&self, mut f: impl FnMut(&mut Inner) -> Result<T>) -> Result<T> {
        for _ in 0..16 {
            let (kind, p) = {
                let mut g = self.lock()?;
                g.store.no_io = true;
                let r = f(&mut g);
                g.store.no_io = false;
                match r {
                    Err(Error::NodeMiss) => g
                        .store
                        .missing
                        .take()
                        .ok_or_else(|| internal("node miss without a node"))?,
                    other => return other,
                }
            };
            let mut buf = vec![0u8; NODE_SIZE];
            let node = self
                .dev
                .read_at(&mut buf, p.addr * UNIT)
                .map_err(Error::from)
                .and_then(|_| Node::decode(&buf, p.addr, p.csum));
            match node {
                Ok(n) if n.kind == kind => self.lock()?.store.cache_insert(p, Arc::new(n)),
                // Possibly freed and reused under us; the retry (or the
                // locked fallback below) tells a race from damage.
                _ => continue,
            }
        }
        f(&mut *self.lock()?)
    }

    /// Makes a range read as zeros, freeing whole blocks (trim and
    /// write-zeroes are the same operation here: holes read as zeros).
    pub fn write_zeroes(&self, vol: u64, offset: u64, len: u64) -> Result<()> {
        let Some((_g, bs)) = self.begin_write(vol, offset, len)? else {
            return Ok(());
        };
        let bs64 = bs as u64;
        let end = offset + len;
        let full0 = offset.div_ceil(bs64);
        let full1 = end / bs64;
        if full0 >= full1 {
            return self.write_locked(vol, offset, None, len, bs, false);
        }
        if offset < full0 * bs64 {
            self.write_locked(vol, offset, None, full0 * bs64 - offset, bs, false)?;
        }
        if end > full1 * bs64 {
            self.write_locked(vol, full1 * bs64, None, end - full1 * bs64, bs, false)?;
        }
        let need_commit = {
            let mut g = self.lock()?;
            let map = g.mappings(Target::Volume(vol), full0, full1)?;
            let v = g
                .volumes
                .get(&vol)
                .ok_or_else(|| Error::NotFound(format!("volume {vol}")))?;
            let mut root = Ptr {
                addr: v.root,
                csum: v.root_csum,
            };
            for (k, _) in &map {
                if let Some(old) = g.store.remove(TreeKind::Volume, &mut root, *k)? {
                    g.store.dec_extent(&Extent::decode(&old))?;
                }
            }
            g.set_root(vol, root, -(map.len() as i64))?;
            g.ops += 1;
            g.needs_commit()
        };
        if need_commit {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes zeros as allocated data (NBD `NO_HOLE`): block status reports
    /// the range as data. Copy-on-write means this cannot reserve space for
    /// later overwrites; it only keeps the range from reading as a hole.
    pub fn write_zeroes_allocated(&self, vol: u64, offset: u64, len: u64) -> Result<()> {
        let Some((_g, bs)) = self.begin_write(vol, offset, len)? else {
            return Ok(());
        };
        let bs64 = bs as u64;
        let end = offset + len;
        let chunk = (4u64 << 20).max(bs64);
        let zeros = vec![0u8; chunk as usize];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(chunk - pos % bs64);
            self.write_locked(vol, pos, Some(&zeros[..n as usize]), n, bs, true)?;
            pos += n;
        }
        Ok(())
    }

    /// Trim: same as [`Pool::write_zeroes`] (deallocates whole blocks).
    pub fn trim(&self, vol: u64, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(vol, offset, len)
    }

    /// The write path; the caller holds the range lock. `data` None writes
    /// zeros. All-zero blocks become holes unless `keep_zeros`.
    fn write_locked(
        &self,
        vol: u64,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        bs: u32,
        keep_zeros: bool,
    ) -> Result<()> {
        let bs64 = bs as u64;
        let end = offset + len;
        let (b0, b1) = (offset / bs64, (end - 1) / bs64 + 1);
        // Compose the new contents of each block touched.
        let mut blocks: Vec<(u64, Option<Vec<u8>>)> = Vec::with_capacity((b1 - b0) as usize);
        let partial: Vec<u64> = [b0, b1 - 1]
            .into_iter()
            .filter(|&b| offset > b * bs64 || end < (b + 1) * bs64)
            .collect();
        let mut old: HashMap<u64, Vec<u8>> = HashMap::new();
        for &b in &partial {
            if let std::collections::hash_map::Entry::Vacant(e) = old.entry(b) {
                let mut cur = vec![0u8; bs as usize];
                let map = self.mappings_unlocked_io(Target::Volume(vol), b, b + 1)?;
                self.read_mapped(Target::Volume(vol), &map, bs64, b * bs64, &mut cur)?;
                e.insert(cur);
            }
        }
        for b in b0..b1 {
            let (ls, le) = (b * bs64, (b + 1) * bs64);
            let (a, z) = (ls.max(offset), le.min(end));
            let content = match old.remove(&b) {
                Some(mut cur) => {
                    let dst = &mut cur[(a - ls) as usize..(z - ls) as usize];
                    match data {
                        Some(d) => {
                            dst.copy_from_slice(&d[(a - offset) as usize..(z - offset) as usize])
                        }
                        None => dst.fill(0),
                    }
                    cur
                }
                None => match data {
                    Some(d) => d[(a - offset) as usize..(z - offset) as usize].to_vec(),
                    None => Vec::new(),
                },
            };
            let hole = if keep_zeros {
                content.len() != bs as usize
            } else {
                content.iter().all(|&x| x == 0)
            };
            blocks.push((b, if hole { None } else { Some(content) }));
        }
        let policy = self.policy_of(vol)?;
        if !policy.is_plain() {
            return self.write_pipeline(vol, bs, policy, blocks);
        }
        // Allocate, preferably one contiguous run so the data lands sequentially.
        let units = bs64 / UNIT;
        let n = blocks.iter().filter(|(_, c)| c.is_some()).count() as u64;
        let addrs = self.allocate(n, units)?;
        let mut exts: Vec<(u64, Option<Extent>)> = Vec::with_capacity(blocks.len());
        let mut objects = Vec::with_capacity(n as usize);
        let mut ai = 0;
        let mut io: Vec<(u64, Vec<u8>)> = Vec::new();
        for (b, c) in blocks {
            match c {
                Some(c) => {
                    let e = Extent {
                        addr: addrs[ai],
                        stored_len: bs,
                        csum: crc(&c),
                        flags: 0,
                        aux: 0,
                    };
                    ai += 1;
                    io.push((e.addr, c));
                    objects.push((e.addr, e.blocks(), 1));
                    exts.push((b, Some(e)));
                }
                None => exts.push((b, None)),
            }
        }
        let wr = write_runs(&*self.dev, io);
        self.map_blocks(vol, exts, objects, Vec::new(), Vec::new(), wr)
    }

    /// The last step of every write: registers the objects just written
    /// (`(block, blocks, references)`), indexes new chunks for dedup, maps
    /// the blocks (`None`: a hole) and drops what they replaced. `taken`
    /// are dedup hits already referenced; on failure (`io` or a volume
    /// deleted meanwhile) they are released and new objects freed.
    fn map_blocks(
        &self,
        vol: u64,
        exts: Vec<(u64, Option<Extent>)>,
        objects: Vec<(u64, u32, u32)>,
        index: Vec<([u8; 32], Extent, u64)>,
        taken: Vec<Extent>,
        io: Result<()>,
    ) -> Result<()> {
        let need_commit = {
            let mut g = self.lock()?;
            let root = match (&io, g.volumes.get(&vol)) {
                (Ok(()), Some(v)) => Some(Ptr {
                    addr: v.root,
                    csum: v.root_csum,
                }),
                _ => None,
            };
            let Some(mut root) = root else {
                for (a, n, _) in &objects {
                    g.store.alloc.free(*a, *n as u64);
                }
                for e in &taken {
                    g.store.dec_extent(e)?;
                }
                io?;
                return Err(Error::NotFound(format!("volume {vol}")));
            };
            for (a, n, r) in objects {
                g.store.add_object(a, n, r);
            }
            for (fp, e, slot) in &index {
                g.store.dd_insert(fp, *e, *slot)?;
            }
            let mut delta = 0i64;
            for (b, e) in &exts {
                let prev = match e {
                    Some(e) => g
                        .store
                        .insert(TreeKind::Volume, &mut root, *b, &e.encode())?,
                    None => g.store.remove(TreeKind::Volume, &mut root, *b)?,
                };
                match (&prev, e) {
                    (None, Some(_)) => delta += 1,
                    (Some(_), None) => delta -= 1,
                    _ => {}
                }
                if let Some(p) = prev {
                    g.store.dec_extent(&Extent::decode(&p))?;
                }
            }
            g.set_root(vol, root, delta)?;
            g.ops += 1;
            g.needs_commit()
        };
        if need_commit {
            self.flush()?;
        }
        Ok(())
    }

    /// The write path of a volume with a policy: fingerprint, look up the
    /// dedup index (hits are referenced at once, so they cannot be freed
    /// before they are mapped), compress new chunks and pack the
    /// compressed ones, encrypt with a tweak from where they land, write.
    fn write_pipeline(
        &self,
        vol: u64,
        bs: u32,
        policy: Policy,
        mut blocks: Vec<(u64, Option<Vec<u8>>)>,
    ) -> Result<()> {
        let keys = match policy.encryption {
            Some(_) => Some(self.keys.clone().ok_or(Error::KeyRequired)?),
            None => None,
        };
        let cipher = policy.encryption;
        let fps: Vec<Option<[u8; 32]>> = blocks
            .iter()
            .map(|(_, c)| match c {
                Some(d) if policy.dedup => Some(pipeline::fingerprint(keys.as_deref(), cipher, d)),
                _ => None,
            })
            .collect();
        let hits: Vec<Option<Extent>> = if policy.dedup {
            self.locked_no_io(|g| {
                let mut found = Vec::with_capacity(fps.len());
                for fp in &fps {
                    found.push(match fp {
                        Some(f) => g.store.dd_lookup(f)?,
                        None => None,
                    });
                }
                let mut per: BTreeMap<u64, u32> = BTreeMap::new();
                for e in found.iter().flatten() {
                    *per.entry(e.addr).or_default() += 1;
                }
                // Every read first (any may miss the cache), then the updates.
                let mut vals = Vec::with_capacity(per.len());
                for (&a, &n) in &per {
                    let v = g
                        .store
                        .rc_get(a)?
                        .ok_or_else(|| internal("dedup hit has no refcount"))?;
                    vals.push((a, v, n));
                }
                for (a, mut v, n) in vals {
                    v.refs = v
                        .refs
                        .checked_add(n)
                        .ok_or_else(|| internal("refcount overflow"))?;
                    g.store.rc_put(a, Some(v));
                }
                Ok(found)
            })?
        } else {
            vec![None; blocks.len()]
        };
        let taken: Vec<Extent> = hits.iter().flatten().copied().collect();
        let r = self.store_new_chunks(bs, policy, keys.as_deref(), &mut blocks, &fps, &hits);
        let (exts, objects, index, io) = match r {
            Ok(x) => x,
            Err(e) => {
                let mut g = self.lock()?;
                for t in &taken {
                    g.store.dec_extent(t)?;
                }
                return Err(e);
            }
        };
        self.map_blocks(vol, exts, objects, index, taken, io)
    }

    /// Compresses, packs, encrypts and writes the chunks of `blocks` that
    /// are neither holes nor dedup hits. Consecutive new chunks are
    /// compressed together as one zstd frame of up to [`FRAME_BYTES`]
    /// (each chunk's extent names the frame and its index in it); frames
    /// that save at least 1/8 go into packs, the others are stored plain.
    /// Returns the mapping of every block, the new objects, the index
    /// entries to add and the result of the device write (objects are
    /// allocated even if it failed).
    #[allow(clippy::type_complexity)]
    fn store_new_chunks(
        &self,
        bs: u32,
        policy: Policy,
        keys: Option<&Keys>,
        blocks: &mut [(u64, Option<Vec<u8>>)],
        fps: &[Option<[u8; 32]>],
        hits: &[Option<Extent>],
    ) -> Result<(
        Vec<(u64, Option<Extent>)>,
        Vec<(u64, u32, u32)>,
        Vec<([u8; 32], Extent, u64)>,
        Result<()>,
    )> {
        struct New {
            fp: Option<[u8; 32]>,
            bytes: Vec<u8>,
            refs: u32,
            ext: Option<Extent>,
        }
        let mut news: Vec<New> = Vec::new();
        let mut first: HashMap<[u8; 32], usize> = HashMap::new();
        let mut which: Vec<Option<usize>> = vec![None; blocks.len()];
        for (i, (_, c)) in blocks.iter_mut().enumerate() {
            if hits[i].is_some() {
                continue;
            }
            let Some(data) = c.take() else { continue };
            if let Some(&j) = fps[i].as_ref().and_then(|f| first.get(f)) {
                news[j].refs += 1;
                which[i] = Some(j);
                continue;
            }
            if let Some(f) = fps[i] {
                first.insert(f, news.len());
            }
            which[i] = Some(news.len());
            news.push(New {
                fp: fps[i],
                bytes: data,
                refs: 1,
                ext: None,
            });
        }
        let mut base = 0u16;
        if policy.dedup {
            base |= flags::DEDUP;
        }
        if let Some(c) = policy.encryption {
            base |= flags::ENCRYPTED | (c.id() << flags::CIPHER_SHIFT);
        }
        // Frames: runs of new chunks compressed as one.
        let per_frame = (FRAME_BYTES / bs as usize).clamp(1, MAX_FRAME_CHUNKS);
        let mut plain: Vec<usize> = Vec::new();
        // (chunks, compressed bytes)
        let mut frames: Vec<(Vec<usize>, Vec<u8>)> = Vec::new();
        if policy.compression == 0 {
            plain.extend(0..news.len());
        } else {
            let mut j = 0;
            while j < news.len() {
                let group: Vec<usize> = (j..news.len().min(j + per_frame)).collect();
                j += group.len();
                let packed = if group.len() == 1 {
                    pipeline::compress(policy.compression, &news[group[0]].bytes)
                } else {
                    let mut cat = Vec::with_capacity(group.len() * bs as usize);
                    for &k in &group {
                        cat.extend_from_slice(&news[k].bytes);
                    }
                    pipeline::compress(policy.compression, &cat)
                };
                match packed {
                    Some(mut z) => {
                        if policy.encryption.is_some() && z.len() < 16 {
                            z.resize(16, 0);
                        }
                        frames.push((group, z));
                    }
                    None => plain.extend(group),
                }
            }
        }
        // Packs of frames, up to 1 MiB and MAX_PACK_CHUNKS chunks each.
        let mut packs: Vec<Vec<(usize, u64)>> = Vec::new();
        let (mut end, mut count) = (MAX_PACK, 0usize);
        for (f, (group, z)) in frames.iter().enumerate() {
            let len = z.len() as u64;
            if end + len > MAX_PACK || count + group.len() > MAX_PACK_CHUNKS {
                packs.push(Vec::new());
                (end, count) = (0, 0);
            }
            if let Some(p) = packs.last_mut() {
                p.push((f, end));
            }
            end = (end + len).div_ceil(16) * 16;
            count += group.len();
        }
        let units = bs as u64 / UNIT;
        let plain_addrs = self.allocate(plain.len() as u64, units)?;
        let mut objects: Vec<(u64, u32, u32)> = Vec::new();
        let mut io: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut index = Vec::new();
        let seal = |e: &mut Extent, bytes: &mut [u8]| {
            if let (Some(k), Some(c)) = (keys, policy.encryption) {
                pipeline::encrypt(k, c, pipeline::tweak(e), bytes);
            }
            e.csum = crc(bytes);
        };
        for (&j, &addr) in plain.iter().zip(&plain_addrs) {
            let n = &mut news[j];
            let mut e = Extent {
                addr,
                stored_len: bs,
                csum: 0,
                flags: base,
                aux: 0,
            };
            seal(&mut e, &mut n.bytes);
            objects.push((addr, units as u32, n.refs));
            if let Some(f) = n.fp {
                index.push((f, e, 0));
            }
            n.ext = Some(e);
            io.push((addr, std::mem::take(&mut n.bytes)));
        }
        for pack in packs {
            let size = pack
                .iter()
                .map(|&(f, o)| o + frames[f].1.len() as u64)
                .max()
                .unwrap_or(0);
            let blocks_n = size.div_ceil(UNIT);
            let addr = match self.allocate(1, blocks_n) {
                Ok(a) => a[0],
                Err(e) => {
                    let mut g = self.lock()?;
                    for (a, n, _) in &objects {
                        g.store.alloc.free(*a, *n as u64);
                    }
                    return Err(e);
                }
            };
            let mut buf = vec![0u8; (blocks_n * UNIT) as usize];
            let (mut refs, mut slot) = (0u32, 0u64);
            for &(f, off) in &pack {
                let (group, z) = &mut frames[f];
                let mut e = Extent {
                    addr,
                    stored_len: z.len() as u32,
                    csum: 0,
                    flags: base | flags::COMPRESSED | flags::PACKED,
                    aux: (off / 16) as u16,
                };
                seal(&mut e, z);
                buf[off as usize..off as usize + z.len()].copy_from_slice(z);
                let framed = group.len() > 1;
                for (k, &j) in group.iter().enumerate() {
                    let n = &mut news[j];
                    let mut ce = e;
                    if framed {
                        ce.flags |= flags::FRAMED | ((k as u16) << flags::FRAME_SHIFT);
                    }
                    refs += n.refs;
                    if let Some(fp) = n.fp {
                        index.push((fp, ce, slot));
                    }
                    slot += 1;
                    n.ext = Some(ce);
                }
            }
            objects.push((addr, blocks_n as u32, refs));
            io.push((addr, buf));
        }
        let exts = blocks
            .iter()
            .enumerate()
            .map(|(i, (b, _))| (*b, hits[i].or_else(|| which[i].and_then(|j| news[j].ext))))
            .collect();
        let r = write_runs(&*self.dev, io);
        Ok((exts, objects, index, r))
    }

    /// Allocates `n` extents of `units` blocks each.
    fn allocate(&self, n: u64, units: u64) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        for attempt in 0..3 {
            {
                let mut g = self.lock()?;
                if let Some(a) = g.store.alloc.alloc(n * units) {
                    return Ok((0..n).map(|i| a + i * units).collect());
                }
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    match g.store.alloc.alloc(units) {
                        Some(a) => out.push(a),
                        None => break,
                    }
                }
                if out.len() as u64 == n {
                    return Ok(out);
                }
                for a in out {
                    g.store.alloc.free(a, units);
                }
                if attempt == 2 {
                    break;
                }
                // Freed space becomes reusable only after commits: make them.
                g.ops += 1;
            }
            self.flush()?;
        }
        Err(Error::NoSpace)
    }

    /// Looks up the extents of blocks `b0..b1` without doing device I/O
    /// while holding the pool lock: a node missing from the cache is read
    /// and verified (against its parent's checksum) outside the lock, then
    /// the lookup runs again. Committed nodes are immutable, so a node read
    /// this way is either exactly the one expected or fails its checksum
    /// (freed and reused meanwhile), in which case the lookup retries.
    fn mappings_unlocked_io(&self, t: Target, b0: u64, b1: u64) -> Result<Vec<(u64, Extent)>> {
        self.locked_no_io(|g| g.mappings(t, b0, b1))
    }

    /// Allocated and unallocated runs of `[offset, offset+len)`.
    pub fn block_status(&self, t: Target, offset: u64, len: u64) -> Result<Vec<Run>> {
        let mut g = self.lock()?;
        let (_, size, bs) = g.target(t)?;
        check_range(offset, len, size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = bs as u64;
        let end = offset + len;
        let (b0, b1) = (offset / bs, (end - 1) / bs + 1);
        let map = g.mappings(t, b0, b1)?;
        let mut runs: Vec<Run> = Vec::new();
        let mut push = |o: u64, e: u64, allocated: bool| {
            let (o, e) = (o.max(offset), e.min(end));
            if o >= e {
                return;
            }
            match runs.last_mut() {
                Some(r) if r.allocated == allocated && r.offset + r.len == o => r.len += e - o,
                _ => runs.push(Run {
                    offset: o,
                    len: e - o,
                    allocated,
                }),
            }
        };
        let mut pos = b0;
        for (k, _) in &map {
            if *k > pos {
                push(pos * bs, k * bs, false);
            }
            push(k * bs, (k + 1) * bs, true);
            pos = k + 1;
        }
        if pos < b1 {
            push(pos * bs, b1 * bs, false);
        }
        Ok(runs)
    }

    /// Where a target's tree nodes and data extents live (pool byte
    /// offsets), for `cdmfs dump --map`, debugging and damage tests.
    pub fn physical_map(&self, t: Target) -> Result<PhysicalMap> {
        let mut g = self.lock()?;
        let (root, _, bs) = g.target(t)?;
        let mut map = PhysicalMap::default();
        g.walk_nodes(TreeKind::Volume, root, &mut |addr, n| {
            map.nodes.push(addr * UNIT);
            if n.is_leaf() {
                for i in 0..n.len() {
                    let e = Extent::decode(n.val(i));
                    map.extents
                        .push((n.keys[i] * bs as u64, e.byte_offset(), e.stored_len));
                }
            }
            Ok(())
        })?;
        map.extents.sort_unstable();
        Ok(map)
    }

    /// Cache occupancy, for tests of the memory bound.
    pub fn cached_nodes(&self) -> Result<usize> {
        Ok(self.lock()?.store.cache_len())
    }

    pub(crate) fn dev(&self) -> &Arc<dyn BlockDev> {
        &self.dev
    }
}

/// Rejects a catalog record no version of this program writes.
fn check_record(key: u64, size: u64, block_size: u32, root: u64) -> Result<()> {
    if check_block_size(block_size).is_err()
        || size == 0
        || size > (1 << 60)
        || (root != 0 && !(RESERVED_BLOCKS..MAX_BLOCK_ADDR).contains(&root))
    {
        return Err(Error::Corrupt(format!(
            "catalog record {key:#x} has impossible values"
        )));
    }
    Ok(())
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(e) if e <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

fn verify(t: Target, e: &(u64, Extent), stored: &[u8], bs: u64) -> Result<()> {
    if crc(stored) != e.1.csum {
        return Err(Error::DataChecksum {
            target: match t {
                Target::Volume(v) => format!("volume {v}"),
                Target::Snapshot(s) => format!("snapshot {s}"),
            },
            offset: e.0 * bs,
            block: e.1.addr,
        });
    }
    Ok(())
}

/// Writes data extents, coalescing physically contiguous ones.
fn write_runs(dev: &dyn BlockDev, mut io: Vec<(u64, Vec<u8>)>) -> Result<()> {
    io.sort_unstable_by_key(|(a, _)| *a);
    let mut i = 0;
    while i < io.len() {
        let mut j = i;
        let mut next = io[i].0 + (io[i].1.len() as u64).div_ceil(UNIT);
        while j + 1 < io.len()
            && io[j + 1].0 == next
            && (io[j].1.len() as u64).is_multiple_of(UNIT)
            && j - i < 255
        {
            j += 1;
            next += (io[j].1.len() as u64).div_ceil(UNIT);
        }
        if i == j {
            dev.write_at(&io[i].1, io[i].0 * UNIT)?;
        } else {
            let total: usize = io[i..=j].iter().map(|(_, b)| b.len()).sum();
            let mut buf = Vec::with_capacity(total);
            for (_, b) in &io[i..=j] {
                buf.extend_from_slice(b);
            }
            dev.write_at(&buf, io[i].0 * UNIT)?;
        }
        i = j + 1;
    }
    Ok(())
}

impl Inner {
    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn vol_id(&self, name: &str) -> Result<u64> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("volume {name}")))
    }

    fn add_volume(&mut self, rec: VolumeRec) {
        self.names.insert(rec.name.clone(), rec.id);
        self.catalog_dirty.insert(KEY_VOLUME | rec.id, true);
        self.volumes.insert(rec.id, rec);
        self.ops += 1;
    }

    /// A volume's id and record by name, for changes.
    fn vol_mut(&mut self, name: &str) -> Result<(u64, &mut VolumeRec)> {
        let id = self.vol_id(name)?;
        let v = self
            .volumes
            .get_mut(&id)
            .ok_or_else(|| internal("volume vanished"))?;
        Ok((id, v))
    }

    fn touch_volume(&mut self, id: u64) {
        self.catalog_dirty.insert(KEY_VOLUME | id, true);
        self.ops += 1;
    }

    fn set_root(&mut self, vol: u64, root: Ptr, delta: i64) -> Result<()> {
        let v = self
            .volumes
            .get_mut(&vol)
            .ok_or_else(|| Error::NotFound(format!("volume {vol}")))?;
        v.root = root.addr;
        v.root_csum = root.csum;
        v.allocated_blocks = v.allocated_blocks.saturating_add_signed(delta);
        self.catalog_dirty.insert(KEY_VOLUME | vol, true);
        Ok(())
    }

    fn needs_commit(&self) -> bool {
        let free = self.store.alloc.total() - self.store.alloc.used();
        let pending: u64 = self.store.pending_free.iter().map(|(_, n)| n).sum();
        self.store.dirty.len() > self.dirty_limit || pending > (free / 4).max(4096)
    }

    /// (root, size, block size) of a target.
    fn target(&self, t: Target) -> Result<(Ptr, u64, u32)> {
        match t {
            Target::Volume(id) => self
                .volumes
                .get(&id)
                .map(|v| {
                    (
                        Ptr {
                            addr: v.root,
                            csum: v.root_csum,
                        },
                        v.size,
                        v.block_size,
                    )
                })
                .ok_or_else(|| Error::NotFound(format!("volume {id}"))),
            Target::Snapshot(id) => self
                .snapshots
                .get(&id)
                .map(|s| {
                    (
                        Ptr {
                            addr: s.root,
                            csum: s.root_csum,
                        },
                        s.size,
                        s.block_size,
                    )
                })
                .ok_or_else(|| Error::NotFound(format!("snapshot {id}"))),
        }
    }

    /// Extents mapped for logical blocks `b0..b1`.
    fn mappings(&mut self, t: Target, b0: u64, b1: u64) -> Result<Vec<(u64, Extent)>> {
        let (root, _, _) = self.target(t)?;
        let mut out = Vec::new();
        self.store
            .range(TreeKind::Volume, root, b0, b1, &mut |k, v| {
                out.push((k, Extent::decode(v)));
                Ok(())
            })?;
        Ok(out)
    }

    fn drop_snapshot(&mut self, id: u64) -> Result<()> {
        let s = self
            .snapshots
            .remove(&id)
            .ok_or_else(|| Error::NotFound(format!("snapshot {id}")))?;
        if s.root != 0 {
            self.store.dec_node(Ptr {
                addr: s.root,
                csum: s.root_csum,
            })?;
        }
        self.catalog_dirty.insert(KEY_SNAPSHOT | id, false);
        Ok(())
    }

    /// Bytes reachable only through `root`: below a node or extent with more
    /// than one reference, everything is shared.
    fn unique_bytes(&mut self, root: Ptr) -> Result<u64> {
        if root.is_null() {
            return Ok(0);
        }
        let mut total = 0u64;
        let mut stack = vec![root];
        // Chunks of one frame share their stored bytes: count them once.
        let mut frames = std::collections::HashSet::new();
        while let Some(p) = stack.pop() {
            if self.store.rc_get(p.addr)?.is_some_and(|v| v.refs > 1) {
                continue;
            }
            let n = self.store.load(TreeKind::Volume, p)?;
            for i in 0..n.len() {
                if n.is_leaf() {
                    let e = Extent::decode(n.val(i));
                    if self.store.rc_get(e.addr)?.is_some_and(|v| v.refs == 1)
                        && (e.flags & flags::FRAMED == 0 || frames.insert(e.byte_offset()))
                    {
                        total += e.phys_bytes();
                    }
                } else {
                    stack.push(n.child(i));
                }
            }
        }
        Ok(total)
    }

    fn volume_info(&mut self, id: u64) -> Result<VolumeInfo> {
        self.volume_info_with(id, true)
    }

    fn volume_info_with(&mut self, id: u64, with_unique: bool) -> Result<VolumeInfo> {
        let v = self
            .volumes
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("volume {id}")))?
            .clone();
        let unique = if with_unique {
            self.unique_bytes(Ptr {
                addr: v.root,
                csum: v.root_csum,
            })?
        } else {
            0
        };
        Ok(VolumeInfo {
            id,
            name: v.name,
            size: v.size,
            block_size: v.block_size,
            created_ns: v.created_ns,
            origin: v.origin,
            allocated_bytes: v.allocated_blocks * v.block_size as u64,
            unique_bytes: unique,
            snapshots: self
                .snapshots
                .values()
                .filter(|s| s.volume_id == id)
                .count(),
            policy: v.policy,
        })
    }

    fn snapshot_info(&mut self, id: u64) -> Result<SnapshotInfo> {
        let s = self
            .snapshots
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("snapshot {id}")))?
            .clone();
        let unique = self.unique_bytes(Ptr {
            addr: s.root,
            csum: s.root_csum,
        })?;
        let volume = self
            .volumes
            .get(&s.volume_id)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        Ok(SnapshotInfo {
            id,
            volume,
            volume_id: s.volume_id,
            label: s.label,
            created_ns: s.created_ns,
            metadata: s.metadata,
            size: s.size,
            block_size: s.block_size,
            allocated_bytes: s.allocated_blocks * s.block_size as u64,
            unique_bytes: unique,
            policy: s.policy,
        })
    }

    // ---- open --------------------------------------------------------------

    fn load(&mut self) -> Result<()> {
        // Refcount tree: its nodes and every object it lists are in use.
        let rc_root = self.store.rc_root;
        let mut objects: Vec<(u64, u64)> = Vec::new();
        self.walk_nodes(TreeKind::Refcount, rc_root, &mut |addr, n| {
            objects.push((addr, 1));
            if n.is_leaf() {
                for i in 0..n.len() {
                    let v = RcVal::decode(n.val(i));
                    if v.refs == 0 || v.blocks == 0 {
                        return Err(Error::Corrupt(format!(
                            "refcount entry for pool block {} is empty",
                            n.keys[i]
                        )));
                    }
                    objects.push((n.keys[i], v.blocks as u64));
                }
            }
            Ok(())
        })?;
        // Catalog tree: its nodes and record blobs.
        let mut records: Vec<(u64, Ptr)> = Vec::new();
        let cat = self.catalog_root;
        self.walk_nodes(TreeKind::Catalog, cat, &mut |addr, n| {
            objects.push((addr, 1));
            if n.is_leaf() {
                for i in 0..n.len() {
                    records.push((n.keys[i], dec_ptr(n.val(i))));
                }
            }
            Ok(())
        })?;
        for (key, p) in records {
            let (bytes, blocks) = self.read_blob(p)?;
            objects.push((p.addr, blocks));
            self.blobs.insert(key, (p, blocks));
            let bad =
                |e: serde_json::Error| Error::Corrupt(format!("catalog record {key:#x}: {e}"));
            match key & !((1 << 56) - 1) {
                KEY_VOLUME => {
                    let v: VolumeRec = serde_json::from_slice(&bytes).map_err(bad)?;
                    check_record(key, v.size, v.block_size, v.root)?;
                    self.names.insert(v.name.clone(), v.id);
                    self.volumes.insert(v.id, v);
                }
                KEY_SNAPSHOT => {
                    let s: SnapshotRec = serde_json::from_slice(&bytes).map_err(bad)?;
                    check_record(key, s.size, s.block_size, s.root)?;
                    self.snapshots.insert(s.id, s);
                }
                KEY_POOL if key == KEY_POOL => {
                    self.pool_rec = serde_json::from_slice(&bytes).map_err(bad)?;
                }
                _ => return Err(Error::Corrupt(format!("unknown catalog key {key:#x}"))),
            }
        }
        // Dedup index and its reverse map: nodes only.
        for (kind, root) in [
            (TreeKind::Dedup, self.store.dd_root),
            (TreeKind::DedupRev, self.store.ddr_root),
        ] {
            self.walk_nodes(kind, root, &mut |addr, _| {
                objects.push((addr, 1));
                Ok(())
            })?;
        }
        for (addr, n) in objects {
            if !self.store.alloc.mark(addr, n) {
                return Err(Error::Corrupt(format!(
                    "pool blocks {addr}..{} are claimed twice or lie outside the pool",
                    addr + n
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn walk_nodes(
        &mut self,
        kind: TreeKind,
        root: Ptr,
        f: &mut dyn FnMut(u64, &Node) -> Result<()>,
    ) -> Result<()> {
        if root.is_null() {
            return Ok(());
        }
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            let n = self.store.load(kind, p)?;
            f(p.addr, &n)?;
            if !n.is_leaf() {
                for i in 0..n.len() {
                    stack.push(n.child(i));
                }
            }
        }
        Ok(())
    }

    fn read_blob(&mut self, p: Ptr) -> Result<(Vec<u8>, u64)> {
        if p.addr < RESERVED_BLOCKS || p.addr >= self.store.alloc.total() {
            return Err(Error::Corrupt(format!(
                "catalog blob pointer {} outside the pool",
                p.addr
            )));
        }
        let mut first = vec![0u8; UNIT as usize];
        self.store.dev.read_at(&mut first, p.addr * UNIT)?;
        let len = rd_u32(&first, 0) as usize;
        if len > MAX_RECORD {
            return Err(Error::MetadataChecksum {
                what: "catalog record",
                block: p.addr,
            });
        }
        let blocks = (4 + len as u64).div_ceil(UNIT);
        let mut all = first;
        if blocks > 1 {
            all.resize((blocks * UNIT) as usize, 0);
            self.store
                .dev
                .read_at(&mut all[UNIT as usize..], (p.addr + 1) * UNIT)?;
        }
        if crc(&all[..4 + len]) != p.csum {
            return Err(Error::MetadataChecksum {
                what: "catalog record",
                block: p.addr,
            });
        }
        Ok((all[4..4 + len].to_vec(), blocks))
    }

    // ---- commit ------------------------------------------------------------

    /// A whole commit under the pool lock (callers that hold it). Must not
    /// run while a [`Pool::flush`] commit is in flight.
    pub(crate) fn commit(&mut self) -> Result<()> {
        if self.committing {
            return Err(internal("commit while another commit is in flight"));
        }
        let t0 = std::time::Instant::now();
        let r = self.prepare_commit().and_then(|p| match p {
            Some(p) => {
                write_prepared(&*self.store.dev, &p)?;
                self.finish_commit(p, t0);
                Ok(())
            }
            None => Ok(()),
        });
        self.check_commit(r)
    }

    fn check_commit<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            tracing::error!(error = %e, "commit failed; the pool must be reopened");
            self.failed = true;
        }
        r
    }

    /// Phase 1 of a commit, under the lock: serializes every dirty tree,
    /// the catalog and the refcounts into new blocks and builds the next
    /// superblock. The in-memory trees move on to the new (clean) nodes at
    /// once; the nodes stay loadable from `in_flight` until published.
    fn prepare_commit(&mut self) -> Result<Option<Prepared>> {
        if self.catalog_dirty.is_empty()
            && self.store.rc_delta.is_empty()
            && self.store.dirty.is_empty()
            && self.store.dd_pending.is_empty()
            && self.store.ddr_pending.is_empty()
            && self.store.dd_freed.is_empty()
            && self.store.pending_free.is_empty()
            && self.free_queue.iter().all(|f| f.is_empty())
        {
            return Ok(None);
        }
        let mut written = HashMap::new();
        let mut out = Vec::new();
        // 1. Volume and snapshot trees, children before parents.
        let store = &mut self.store;
        let roots = self
            .volumes
            .values_mut()
            .map(|v| (v.root, &mut v.root_csum))
            .chain(
                self.snapshots
                    .values_mut()
                    .map(|s| (s.root, &mut s.root_csum)),
            );
        for (root, csum) in roots {
            if store.dirty.contains_key(&root) || written.contains_key(&root) {
                *csum = store
                    .write_tree(
                        Ptr {
                            addr: root,
                            csum: *csum,
                        },
                        &mut written,
                        &mut out,
                    )?
                    .csum;
            }
        }
        // 2. Catalog records.
        let dirty: Vec<(u64, bool)> = std::mem::take(&mut self.catalog_dirty)
            .into_iter()
            .collect();
        let mut cat = self.catalog_root;
        for (key, present) in dirty {
            if let Some((old, blocks)) = self.blobs.remove(&key) {
                self.store.free_blocks_later(old.addr, blocks);
            }
            let bytes = if !present {
                None
            } else if key == KEY_POOL {
                Some(serde_json::to_vec(&self.pool_rec))
            } else if key & KEY_SNAPSHOT == KEY_SNAPSHOT {
                self.snapshots
                    .get(&(key & ((1 << 56) - 1)))
                    .map(serde_json::to_vec)
            } else {
                self.volumes
                    .get(&(key & ((1 << 56) - 1)))
                    .map(serde_json::to_vec)
            };
            match bytes {
                Some(b) => {
                    let b = b.map_err(|e| internal(&e.to_string()))?;
                    let mut blob = Vec::with_capacity(4 + b.len());
                    blob.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    blob.extend_from_slice(&b);
                    let csum = crc(&blob);
                    let blocks = (blob.len() as u64).div_ceil(UNIT);
                    blob.resize((blocks * UNIT) as usize, 0);
                    let addr = self.store.alloc_blocks(blocks)?;
                    out.push((addr, blob));
                    let p = Ptr { addr, csum };
                    self.blobs.insert(key, (p, blocks));
                    self.store
                        .insert(TreeKind::Catalog, &mut cat, key, &enc_ptr(p))?;
                }
                None => {
                    self.store.remove(TreeKind::Catalog, &mut cat, key)?;
                }
            }
        }
        let cat = self.store.write_tree(cat, &mut written, &mut out)?;
        // 3. Dedup index: entries of freed objects dropped, new ones added.
        self.store.apply_dedup()?;
        let dd = self
            .store
            .write_tree(self.store.dd_root, &mut written, &mut out)?;
        let ddr = self
            .store
            .write_tree(self.store.ddr_root, &mut written, &mut out)?;
        // 4. Refcounts, applied in one sorted batch.
        self.store.apply_rc_delta()?;
        let rc = self
            .store
            .write_tree(self.store.rc_root, &mut written, &mut out)?;
        if !self.store.dirty.is_empty() {
            return Err(internal(&format!(
                "{} dirty node(s) unreachable at commit",
                self.store.dirty.len()
            )));
        }
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid: self.sb.uuid,
            generation: self.sb.generation + 1,
            total_blocks: self.sb.total_blocks,
            max_fanout: self.sb.max_fanout,
            catalog: cat,
            refcounts: rc,
            next_id: self.next_id,
            commit_time_ns: now_ns(),
            dedup: dd,
            dedup_rev: ddr,
        };
        self.catalog_root = cat;
        self.store.dd_root = dd;
        self.store.ddr_root = ddr;
        self.store.rc_root = rc;
        out.sort_unstable_by_key(|(a, _)| *a);
        Ok(Some(Prepared {
            out,
            sb,
            freed: std::mem::take(&mut self.store.pending_free),
        }))
    }

    /// Phase 3, under the lock: the commit is durable; publish it and let
    /// blocks freed `FREE_DELAY` commits ago be reused.
    fn finish_commit(&mut self, p: Prepared, t0: std::time::Instant) {
        self.store.generation = p.sb.generation + 1;
        self.sb = p.sb;
        self.store.in_flight.clear();
        self.free_queue.push_back(p.freed);
        while self.free_queue.len() > FREE_DELAY && self.pins == 0 {
            if let Some(list) = self.free_queue.pop_front() {
                for (a, n) in list {
                    self.store.alloc.free(a, n);
                }
            }
        }
        self.commits += 1;
        self.commit_ns += t0.elapsed().as_nanos() as u64;
    }

    pub(crate) fn roots(&self) -> Vec<(String, Ptr, u32)> {
        let mut r: Vec<(String, Ptr, u32)> = self
            .volumes
            .values()
            .map(|v| {
                (
                    format!("volume {}", v.name),
                    Ptr {
                        addr: v.root,
                        csum: v.root_csum,
                    },
                    v.block_size,
                )
            })
            .collect();
        for s in self.snapshots.values() {
            let vname = self
                .volumes
                .get(&s.volume_id)
                .map(|v| v.name.as_str())
                .unwrap_or("?");
            r.push((
                format!("snapshot {vname}@{}", s.id),
                Ptr {
                    addr: s.root,
                    csum: s.root_csum,
                },
                s.block_size,
            ));
        }
        r
    }

    pub(crate) fn catalog_root(&self) -> Ptr {
        self.catalog_root
    }
    pub(crate) fn blob_list(&self) -> Vec<(u64, u64)> {
        self.blobs.values().map(|(p, b)| (p.addr, *b)).collect()
    }
    pub(crate) fn deferred_frees(&self) -> Vec<(u64, u64)> {
        let mut v = self.store.pending_free.clone();
        for l in &self.free_queue {
            v.extend_from_slice(l);
        }
        v
    }
    pub(crate) fn allocated_blocks_of(&self, root_name: &str) -> Option<u64> {
        if let Some(name) = root_name.strip_prefix("volume ") {
            return self
                .names
                .get(name)
                .and_then(|id| self.volumes.get(id))
                .map(|v| v.allocated_blocks);
        }
        let id: u64 = root_name.rsplit_once('@')?.1.parse().ok()?;
        self.snapshots.get(&id).map(|s| s.allocated_blocks)
    }
    /// Blocks of data objects (extents and packs): every refcounted object
    /// that is not a volume-tree node.
    pub(crate) fn data_object_blocks(&mut self) -> Result<u64> {
        // Volume-tree nodes, shared subtrees walked once.
        let mut nodes = std::collections::HashSet::new();
        let mut stack: Vec<Ptr> = self
            .roots()
            .into_iter()
            .map(|r| r.1)
            .filter(|p| !p.is_null())
            .collect();
        while let Some(p) = stack.pop() {
            if !nodes.insert(p.addr) {
                continue;
            }
            let n = self.store.load(TreeKind::Volume, p)?;
            if !n.is_leaf() {
                stack.extend((0..n.len()).map(|i| n.child(i)));
            }
        }
        let mut total = 0u64;
        let rc = self.store.rc_root;
        let mut objs: HashMap<u64, u64> = HashMap::new();
        self.walk_nodes(TreeKind::Refcount, rc, &mut |_, n| {
            if n.is_leaf() {
                for i in 0..n.len() {
                    objs.insert(n.keys[i], RcVal::decode(n.val(i)).blocks as u64);
                }
            }
            Ok(())
        })?;
        for (a, v) in &self.store.rc_delta {
            match v {
                Some(v) => objs.insert(*a, v.blocks as u64),
                None => objs.remove(a),
            };
        }
        for (a, b) in objs {
            if !nodes.contains(&a) {
                total += b;
            }
        }
        Ok(total)
    }

    pub(crate) fn committing(&self) -> bool {
        self.committing
    }

    pub(crate) fn has_uncommitted(&self) -> bool {
        !self.catalog_dirty.is_empty()
            || !self.store.dirty.is_empty()
            || !self.store.rc_delta.is_empty()
            || !self.store.dd_pending.is_empty()
            || !self.store.ddr_pending.is_empty()
    }
}

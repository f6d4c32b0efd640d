//! Opening a pool: the superblock, the catalog and the allocation bitmap
//! rebuilt from every tree.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use crate::alloc::Allocator;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::{KeySource, Keys};
use crate::store::Store;

use super::records::*;
use super::superblock::read_sb_ring;
use super::write::RangeLocks;
use super::{Inner, OpenOptions, Pool};

impl Pool {
    /// Opens a pool: picks the newest valid superblock, loads the catalog and
    /// rebuilds the allocation bitmap from the refcount and catalog trees.
    pub fn open(dev: Arc<dyn BlockDev>, opts: &OpenOptions) -> Result<Pool> {
        let (dev, errors) = super::health::Watched::wrap(dev);
        let mut inner = Inner::open(dev.clone(), opts)?;
        let keys = match (&opts.key, &inner.pool_rec.crypto) {
            (None, _) => None,
            (Some(src), Some(rec)) => Some(Arc::new(Keys::unlock(rec, src)?)),
            (Some(src), None) => {
                let (rec, keys) = Keys::create(src)?;
                inner.pool_rec.crypto = Some(rec);
                inner.catalog_dirty.insert(KEY_POOL, true);
                inner.log.structural = true;
                inner.ops += 1;
                Some(Arc::new(keys))
            }
        };
        if let (Some(k), Some(rec)) = (&keys, &inner.pool_rec.crypto) {
            inner.seals.own = Some((rec.check.clone(), Arc::new(k.seal_keys())));
        }
        Ok(Pool {
            inner: Mutex::new(inner),
            dev,
            durable: Mutex::new(0),
            ranges: RangeLocks::new(),
            commit_done: Condvar::new(),
            keys,
            errors,
            reopen: OpenOptions {
                key: None,
                ..opts.clone()
            },
            last_reload: Mutex::new(None),
            ahead: Default::default(),
            tier: Default::default(),
        })
    }
}

impl Inner {
    /// The in-memory pool of what the device holds: the newest valid
    /// superblock, the catalog, the allocation bitmap rebuilt from every
    /// tree, and the intent log replayed (then committed).
    pub(super) fn open(dev: Arc<dyn BlockDev>, opts: &OpenOptions) -> Result<Inner> {
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
        store.tier_root = sb.tier;
        store.next_tier_id = sb.next_tier_id;
        store.next_pack = sb.next_pack;
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
            reloads: 0,
            next_id: sb.next_id,
            failed: false,
            stalled: None,
            stall: None,
            commit_retries: 0,
            reserve: super::health::reserve_blocks(sb.total_blocks),
            full_since: None,
            dirty_limit: opts.dirty_limit.max(64),
            pool_rec: PoolRec::default(),
            log: Default::default(),
            seals: Default::default(),
        };
        inner.load()?;
        // Writes acknowledged by a flush after the last commit are in the
        // intent log: redo them, then commit so the chain can restart.
        let replayed = inner.replay_log()?;
        inner.log.last_commit = Some(std::time::Instant::now());
        if replayed > 0 {
            tracing::info!(records = replayed, "intent log replayed");
            if let Err(e) = inner.commit() {
                if inner.stall.is_none() {
                    return Err(e);
                }
                // The device refuses writes (a full filesystem): open
                // anyway and serve reads; the commit is retried.
                tracing::warn!(error = %e, "cannot commit the replayed intent log yet; the pool serves reads until it can");
            }
        }
        Ok(inner)
    }
}

impl Pool {
    /// After a failed sync (see `commit::Phase2`) the pool's memory may
    /// name data the device lost. This drops that memory and loads the pool
    /// again from the device, as a crash and restart would, without the
    /// restart: everything acknowledged is there. Writers that began before
    /// the failure end first (every call fails meanwhile). Tried at most
    /// once a second (by flushes and commits, so by the periodic commit);
    /// a device that still fails leaves the pool failed.
    pub(super) fn reload_if_failed(&self) -> Result<()> {
        use std::time::{Duration, Instant};
        if !self.inner.lock().map_err(|_| Error::Failed)?.failed {
            return Ok(());
        }
        {
            let mut last = self.last_reload.lock().map_err(|_| Error::Failed)?;
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err(Error::Failed);
            }
            *last = Some(Instant::now());
        }
        let mut durable = self.durable.lock().map_err(|_| Error::Failed)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ranges.is_idle() {
            if Instant::now() > deadline {
                return Err(Error::Busy(
                    "writes begun before the failed sync are still running".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let fresh = Inner::open(self.dev.clone(), &self.reopen)?;
        let mut g = self.inner.lock().map_err(|_| Error::Failed)?;
        if !g.failed {
            return Ok(());
        }
        let (ops, reloads) = (g.ops, g.reloads);
        let seals = std::mem::take(&mut g.seals);
        *g = fresh;
        g.seals = seals;
        g.ops = ops;
        g.reloads = reloads + 1;
        *durable = ops;
        tracing::warn!(
            generation = g.sb.generation,
            "pool reloaded from the device after a failed sync"
        );
        Ok(())
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
}

impl Inner {
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
                    // A tiered object's count: no pool blocks (its
                    // recalled copy, if any, is claimed from the tier map).
                    if !is_tier_addr(n.keys[i]) {
                        objects.push((n.keys[i], v.blocks as u64));
                    }
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
        // Tier map: its nodes and the recalled copies it names.
        let tier = self.store.tier_root;
        self.walk_nodes(TreeKind::Tier, tier, &mut |addr, n| {
            objects.push((addr, 1));
            if n.is_leaf() {
                for i in 0..n.len() {
                    let t = TierEnt::decode(n.val(i));
                    if t.local != 0 {
                        objects.push((t.local, t.blocks()));
                    }
                }
            }
            Ok(())
        })?;
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

    /// Reads and verifies a catalog record blob: its JSON bytes and the
    /// blocks it occupies.
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
}

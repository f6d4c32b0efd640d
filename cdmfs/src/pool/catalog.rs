//! Volumes, snapshots and clones: the catalog kept in memory and changed
//! under the pool lock, written at the next commit.

use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::DataPolicy;
use crate::store::internal;

use super::records::*;
use super::{now_ns, Brief, Inner, Pool, SnapshotInfo, Target, VolumeInfo};

/// A target's tree root and geometry.
pub(super) struct TargetTree {
    pub(super) root: Ptr,
    /// Logical size in bytes.
    pub(super) size: u64,
    pub(super) block_size: u32,
    /// The target's blocks are sealed (`seal.rs`).
    pub(super) sealed: bool,
}

impl Pool {
    pub fn create_volume(&self, name: &str, size: u64, block_size: u32) -> Result<VolumeInfo> {
        self.create_volume_with(name, size, block_size, DataPolicy::default())
    }

    /// Creates a volume with a data-reduction and encryption policy.
    pub fn create_volume_with(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
        policy: DataPolicy,
    ) -> Result<VolumeInfo> {
        self.create_volume_rec(name, size, block_size, policy, None)
    }

    /// [`Pool::create_volume_with`], sealed with `seal` or not.
    pub(super) fn create_volume_rec(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
        policy: DataPolicy,
        seal: Option<crate::pipeline::SealRec>,
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
        let mut g = self.lock_writable()?;
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
            seal,
            seal_salt: Some(rand::random()),
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
        let mut g = self.lock_writable()?;
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
        if v.seal.is_some() {
            super::seal::check_sealed_grow(name, v.size, new_size, v.block_size)?;
        }
        v.size = new_size;
        g.touch_volume(id);
        g.volume_info(id)
    }

    /// Sets the size of a volume whose live tree is empty (all holes, as
    /// after `revert_volume(name, None)`): nothing is mapped, so it may
    /// shrink as well as grow. Its snapshots keep their own sizes. A full
    /// replication resend of a smaller source needs this.
    pub fn resize_empty_volume(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        let mut g = self.lock_writable()?;
        let (id, v) = g.vol_mut(name)?;
        if v.root != 0 {
            return Err(Error::Invalid(format!(
                "volume {name} holds data: only an empty volume may shrink"
            )));
        }
        if new_size == 0 || new_size > (1 << 60) {
            return Err(Error::Invalid("volume size out of range".into()));
        }
        if v.seal.is_some() {
            super::seal::check_sealed_size(name, new_size)?;
        }
        v.size = new_size;
        g.touch_volume(id);
        g.volume_info(id)
    }

    /// Deletes a volume. With snapshots it is refused unless `force`, which
    /// deletes them too. Clones made from its snapshots are independent.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<()> {
        let mut g = self.lock_writable()?;
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
        g.log.structural = true;
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
        let mut g = self.lock_writable()?;
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
            seal: v.seal.clone(),
            seal_salt: Some(v.salt()),
            tiered: false,
        };
        g.snapshots.insert(id, rec);
        g.catalog_dirty.insert(KEY_SNAPSHOT | id, true);
        g.ops += 1;
        g.log.structural = true;
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
        let mut g = self.lock_writable()?;
        g.drop_snapshot(id)?;
        g.ops += 1;
        g.log.structural = true;
        Ok(())
    }

    /// Makes a writable volume whose contents start as the snapshot's.
    pub fn clone_snapshot(&self, snapshot: u64, name: &str) -> Result<VolumeInfo> {
        validate_name(name)?;
        let mut g = self.lock_writable()?;
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
            seal: s.seal.clone(),
            // A new lineage: it seals with a nonce of its own.
            seal_salt: Some(rand::random()),
        };
        g.add_volume(rec);
        g.volume_info(id)
    }

    /// Detaches a clone from the snapshot it was made from: it becomes an
    /// ordinary volume (it already shares blocks by reference count, so
    /// nothing is copied).
    pub fn promote_clone(&self, name: &str) -> Result<VolumeInfo> {
        let mut g = self.lock_writable()?;
        let (id, v) = g.vol_mut(name)?;
        if v.origin.is_none() {
            return Err(Error::Invalid(format!("volume {name} is not a clone")));
        }
        v.origin = None;
        g.touch_volume(id);
        g.volume_info(id)
    }

    /// Resets a volume's live contents to a snapshot's (one of its own, or
    /// the snapshot it was cloned from), or to all holes with None: the
    /// volume's tree becomes the snapshot's and its size, block size and
    /// mapped blocks follow. O(1): the snapshot's root gains a reference
    /// and the old root loses one (as a clone and a delete do), nothing is
    /// copied. Durable at the next flush, which commits (a catalog change).
    ///
    /// It holds the range lock of the whole volume, so a write in flight
    /// (a read-modify-write or a piece reads the tree it then changes)
    /// ends before the revert and none starts until it is done.
    pub fn revert_volume(&self, name: &str, snapshot: Option<u64>) -> Result<VolumeInfo> {
        let id = self.volume_id(name)?;
        let _range = self.ranges.lock(id, 0, u64::MAX);
        self.revert_locked(name, id, snapshot)
    }

    /// [`Pool::revert_volume`] of volume `id` (named `name`); the caller
    /// holds the range lock of the whole volume.
    pub(super) fn revert_locked(
        &self,
        name: &str,
        id: u64,
        snapshot: Option<u64>,
    ) -> Result<VolumeInfo> {
        let mut g = self.lock_writable()?;
        // The name may have been deleted (or deleted and made again) while
        // we waited for the range lock.
        if g.vol_id(name)? != id {
            return Err(Error::NotFound(format!("volume {name}")));
        }
        let v = g
            .volumes
            .get(&id)
            .ok_or_else(|| internal("volume vanished"))?
            .clone();
        let (root, size, block_size, allocated, seal) = match snapshot {
            None => (Ptr::NULL, v.size, v.block_size, 0, v.seal.clone()),
            Some(sid) => {
                let s = g
                    .snapshots
                    .get(&sid)
                    .ok_or_else(|| Error::NotFound(format!("snapshot {sid}")))?;
                if s.volume_id != id && v.origin != Some(sid) {
                    return Err(Error::Invalid(format!(
                        "snapshot {sid} is neither of volume {name} nor its origin"
                    )));
                }
                let root = Ptr {
                    addr: s.root,
                    csum: s.root_csum,
                };
                // A volume's snapshots and its origin share its seal; the
                // record follows the tree all the same.
                (
                    root,
                    s.size,
                    s.block_size,
                    s.allocated_blocks,
                    s.seal.clone(),
                )
            }
        };
        // Reference the new root before dropping the old: they may be the
        // same node (a revert to a snapshot of unchanged contents).
        if !root.is_null() {
            g.store.inc(root.addr)?;
        }
        // The record names the new tree before the old one is dropped, so a
        // drop that fails partway (a child unreadable) leaves the volume on
        // a live tree, never on freed nodes. Memory is half-updated all the
        // same (part of the old tree freed, the rest still counted): the
        // pool fails and reloads its last durable state, as after a commit
        // that fails while preparing.
        let r = (|| {
            let (_, rec) = g.vol_mut(name)?;
            rec.root = root.addr;
            rec.root_csum = root.csum;
            rec.size = size;
            rec.block_size = block_size;
            rec.allocated_blocks = allocated;
            rec.seal = seal;
            g.touch_volume(id);
            if v.root != 0 {
                g.store.dec_node(Ptr {
                    addr: v.root,
                    csum: v.root_csum,
                })?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            tracing::error!(error = %e, volume = name, "a revert failed halfway; the pool reloads its last durable state");
            g.failed = true;
            return Err(e);
        }
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
                tiered: false,
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
                tiered: s.tiered,
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

    /// Intent-log records written since open, and records replayed at open.
    /// Readable after a failure (a crash test asks what a cut flush was).
    pub fn log_stats(&self) -> (u64, u64) {
        match self.inner.lock() {
            Ok(g) => (g.log.records, g.log.replayed),
            Err(p) => (p.get_ref().log.records, p.get_ref().log.replayed),
        }
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
        let tt = g.target(t)?;
        Ok((tt.size, tt.block_size))
    }
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
        self.log.structural = true;
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
        self.log.structural = true;
    }

    pub(super) fn set_root(&mut self, vol: u64, root: Ptr, delta: i64) -> Result<()> {
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

    /// The tree and geometry of a target.
    pub(super) fn target(&self, t: Target) -> Result<TargetTree> {
        match t {
            Target::Volume(id) => self
                .volumes
                .get(&id)
                .map(|v| TargetTree {
                    root: Ptr {
                        addr: v.root,
                        csum: v.root_csum,
                    },
                    size: v.size,
                    block_size: v.block_size,
                    sealed: v.seal.is_some(),
                })
                .ok_or_else(|| Error::NotFound(format!("volume {id}"))),
            Target::Snapshot(id) => self
                .snapshots
                .get(&id)
                .map(|s| TargetTree {
                    root: Ptr {
                        addr: s.root,
                        csum: s.root_csum,
                    },
                    size: s.size,
                    block_size: s.block_size,
                    sealed: s.seal.is_some(),
                })
                .ok_or_else(|| Error::NotFound(format!("snapshot {id}"))),
        }
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
                    // Tiered bytes take no local space.
                    if !e.is_tiered()
                        && self.store.rc_get(e.addr)?.is_some_and(|v| v.refs == 1)
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
            seal_key_loaded: v.seal.as_ref().is_some_and(|s| self.seals.has(s)),
            seal: v.seal,
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
            seal_key_loaded: s.seal.as_ref().is_some_and(|x| self.seals.has(x)),
            seal: s.seal,
            tiered: s.tiered,
        })
    }
}

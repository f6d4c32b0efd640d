//! The object-store tier, engine side (docs/design.md, "Object-storage
//! tier"): which objects of old points may move, the tier map that says
//! where each moved object lives, and the commit that makes the pool's
//! trees point at it. Uploading, caching and deleting objects is the
//! `cdm-tier` crate's job; the engine only reads through [`TierRead`].
//!
//! An object moves when every reference to it comes from trees of the
//! points being tiered: a node or extent also reachable from a volume or
//! from a point that stays is kept. Its extents are rewritten to name
//! `TIER_BASE + id` (copy-on-write of the nodes that only those points
//! reach, with their reference counts carried over), its refcount entry
//! moves to that key, and its blocks are freed by the same commit. A
//! crash before that commit leaves the pool as it was (the uploaded pack
//! is an orphan for GC); after it, the local blocks are reused only
//! `FREE_DELAY` commits later, as any freed blocks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::records::KEY_SNAPSHOT;
use super::{Inner, Pool, Target};
use crate::error::{Error, Result};
use crate::format::*;
use crate::store::internal;

/// Reads of the object store, supplied by the daemon (`Pool::set_tier`).
pub trait TierRead: Send + Sync {
    /// `len` bytes at `offset` of pack `pack` (exactly, or an error).
    fn read(&self, pack: u64, offset: u64, len: u32) -> std::io::Result<Vec<u8>>;
    /// The same bypassing any local cache: what scrub verifies.
    fn read_direct(&self, pack: u64, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.read(pack, offset, len)
    }
}

/// An object that may move to the tier: its pool blocks and the chunks
/// (offset in the object, stored length, crc) the trees name in it.
#[derive(Clone, Debug)]
pub struct TierObject {
    pub addr: u64,
    pub blocks: u32,
    chunks: BTreeMap<u64, (u32, u32)>,
    dedup: bool,
}

impl TierObject {
    pub fn bytes(&self) -> u64 {
        self.blocks as u64 * UNIT
    }
}

/// Where an uploaded object went: its pool block, the pack and offset in
/// it, and the crc32c of its bytes there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierPlaced {
    pub addr: u64,
    pub pack: u64,
    pub offset: u64,
    pub crc: u32,
}

/// What a tiering commit did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierCommit {
    /// Objects now in the tier.
    pub objects: u64,
    /// Their bytes (freed locally once the commit's frees are reusable).
    pub bytes: u64,
    /// Objects of the batch that no longer qualified (a clone or a dedup
    /// hit made them shared, or their points were deleted): their bytes
    /// in the pack are garbage for repack and GC.
    pub skipped: u64,
    /// Points whose trees now name tiered objects.
    pub snapshots: Vec<u64>,
}

/// One tiered object as the map holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierEntry {
    pub id: u64,
    pub pack: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    /// Whether a recalled copy is on local storage.
    pub local: bool,
}

impl TierEntry {
    fn of(id: u64, t: &TierEnt) -> TierEntry {
        TierEntry {
            id,
            pack: t.pack,
            offset: t.offset,
            len: t.len,
            crc: t.crc,
            local: t.local != 0,
        }
    }
}

/// Which objects the points reach alone, found by walking every tree.
struct Scan {
    /// Eligible-only nodes and the parent pointers seen to each.
    nodes: HashMap<u64, u32>,
    objects: HashMap<u64, TierObject>,
    /// References seen to each object from eligible-only leaves.
    refs: HashMap<u64, u32>,
}

impl Inner {
    /// Walks all trees: first everything that stays (volumes, points not
    /// in `eligible`), then the eligible points below what stays.
    fn tier_scan(&mut self, eligible: &BTreeSet<u64>) -> Result<Scan> {
        let mut keep_nodes: HashSet<u64> = HashSet::new();
        let mut kept: HashSet<u64> = HashSet::new();
        let mut roots: Vec<Ptr> = self
            .volumes
            .values()
            .map(|v| Ptr {
                addr: v.root,
                csum: v.root_csum,
            })
            .collect();
        roots.extend(
            self.snapshots
                .values()
                .filter(|s| !eligible.contains(&s.id))
                .map(|s| Ptr {
                    addr: s.root,
                    csum: s.root_csum,
                }),
        );
        let mut stack: Vec<Ptr> = roots.into_iter().filter(|p| !p.is_null()).collect();
        while let Some(p) = stack.pop() {
            if !keep_nodes.insert(p.addr) {
                continue;
            }
            let n = self.store.load(TreeKind::Volume, p)?;
            for i in 0..n.len() {
                if n.is_leaf() {
                    kept.insert(Extent::decode(n.val(i)).addr);
                } else {
                    stack.push(n.child(i));
                }
            }
        }
        let mut scan = Scan {
            nodes: HashMap::new(),
            objects: HashMap::new(),
            refs: HashMap::new(),
        };
        let mut stack: Vec<Ptr> = self
            .snapshots
            .values()
            .filter(|s| eligible.contains(&s.id) && s.root != 0)
            .map(|s| Ptr {
                addr: s.root,
                csum: s.root_csum,
            })
            .collect();
        while let Some(p) = stack.pop() {
            if keep_nodes.contains(&p.addr) {
                continue;
            }
            let seen = scan.nodes.entry(p.addr).or_insert(0);
            *seen += 1;
            if *seen > 1 {
                continue;
            }
            let n = self.store.load(TreeKind::Volume, p)?;
            for i in 0..n.len() {
                if !n.is_leaf() {
                    stack.push(n.child(i));
                    continue;
                }
                let e = Extent::decode(n.val(i));
                if e.is_tiered() || kept.contains(&e.addr) {
                    continue;
                }
                *scan.refs.entry(e.addr).or_insert(0) += 1;
                let o = scan.objects.entry(e.addr).or_insert_with(|| TierObject {
                    addr: e.addr,
                    blocks: 0,
                    chunks: BTreeMap::new(),
                    dedup: false,
                });
                o.chunks
                    .insert(e.offset_in_object(), (e.stored_len, e.csum));
                o.dedup |= e.flags & flags::DEDUP != 0;
            }
        }
        // Only what nothing else references: counts must match what the
        // walk saw (anything else holds a reference the trees do not show).
        for (&addr, &seen) in &scan.nodes {
            let rc = self.store.rc_get(addr)?.map(|v| v.refs).unwrap_or(0);
            if rc != seen {
                return Err(Error::Corrupt(format!(
                    "tree node at pool block {addr} has {rc} references, the trees show {seen} (run fsck)"
                )));
            }
        }
        let mut gone = Vec::new();
        for (addr, o) in scan.objects.iter_mut() {
            match self.store.rc_get(*addr)? {
                Some(v) if v.refs == scan.refs[addr] => o.blocks = v.blocks,
                _ => gone.push(*addr),
            }
        }
        for a in gone {
            scan.objects.remove(&a);
        }
        Ok(scan)
    }

    /// Copies node `p` (and what it reaches) with tiered addresses from
    /// `moved`, if it reaches any; returns the copy's address. Every
    /// parent of such a node is itself eligible-only, so the copy takes
    /// over the original's reference count and the original is freed.
    fn tier_rewrite(
        &mut self,
        p: Ptr,
        moved: &HashMap<u64, u64>,
        nodes: &HashMap<u64, u32>,
        memo: &mut HashMap<u64, Option<u64>>,
    ) -> Result<Option<u64>> {
        if !nodes.contains_key(&p.addr) {
            return Ok(None);
        }
        if let Some(r) = memo.get(&p.addr) {
            return Ok(*r);
        }
        let n = self.store.load(TreeKind::Volume, p)?;
        let mut copy = (*n).clone();
        let mut changed = false;
        for i in 0..n.len() {
            if n.is_leaf() {
                let mut e = Extent::decode(n.val(i));
                if let Some(&to) = moved.get(&e.addr) {
                    e.addr = to;
                    copy.set_val(i, &e.encode());
                    changed = true;
                }
            } else if let Some(c) = self.tier_rewrite(n.child(i), moved, nodes, memo)? {
                copy.set_child(i, Ptr { addr: c, csum: 0 });
                changed = true;
            }
        }
        let r = if changed {
            Some(self.store.replace_node(p, copy)?)
        } else {
            None
        };
        memo.insert(p.addr, r);
        Ok(r)
    }
}

impl Pool {
    /// Attaches (or detaches) the reader of the object store that tiered
    /// extents are read through.
    pub fn set_tier(&self, reader: Option<Arc<dyn TierRead>>) {
        if let Ok(mut t) = self.tier.write() {
            *t = reader;
        }
    }

    pub(super) fn tier_reader(&self) -> Result<Arc<dyn TierRead>> {
        self.tier
            .read()
            .ok()
            .and_then(|t| t.clone())
            .ok_or_else(|| Error::Tier("no object store is configured to read tiered data".into()))
    }

    /// Objects that the points `snapshots` reference alone, largest
    /// first: what tiering them would move.
    pub fn tier_plan(&self, snapshots: &[u64]) -> Result<Vec<TierObject>> {
        let mut g = self.lock()?;
        let eligible: BTreeSet<u64> = snapshots.iter().copied().collect();
        for id in &eligible {
            if !g.snapshots.contains_key(id) {
                return Err(Error::NotFound(format!("snapshot {id}")));
            }
        }
        let scan = g.tier_scan(&eligible)?;
        let mut v: Vec<TierObject> = scan.objects.into_values().collect();
        v.sort_unstable_by_key(|o| o.addr);
        Ok(v)
    }

    /// The stored bytes of `o` (its whole object), each chunk the trees
    /// name in it verified against its checksum.
    pub fn tier_read_object(&self, o: &TierObject) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; o.bytes() as usize];
        self.dev.read_at(&mut buf, o.addr * UNIT)?;
        for (&off, &(len, csum)) in &o.chunks {
            let end = off as usize + len as usize;
            if end > buf.len() || crc(&buf[off as usize..end]) != csum {
                return Err(Error::DataChecksum {
                    target: "an object to tier".into(),
                    offset: off,
                    block: o.addr,
                });
            }
        }
        Ok(buf)
    }

    /// A new pack number, protected from GC until committed or released.
    pub fn tier_reserve_pack(&self) -> Result<u64> {
        let mut g = self.lock_writable()?;
        let id = g.store.next_pack;
        if id >= MAX_PACKS {
            return Err(Error::NoSpace);
        }
        g.store.next_pack += 1;
        g.store.tier_reserved.insert(id);
        Ok(id)
    }

    /// Gives up a reserved pack that will not be committed.
    pub fn tier_release_pack(&self, pack: u64) {
        if let Ok(mut g) = self.lock() {
            g.store.tier_reserved.remove(&pack);
        }
    }

    /// Makes the points `snapshots` name the objects of `placed` where the
    /// caller uploaded and verified them; frees their local blocks;
    /// commits (one walk of the trees and one commit for the whole batch,
    /// so callers batch several packs). Objects that no longer qualify are
    /// skipped. The packs named stop being reserved.
    pub fn tier_commit(&self, snapshots: &[u64], placed: &[TierPlaced]) -> Result<TierCommit> {
        let mut g = self.lock_writable()?;
        let eligible: BTreeSet<u64> = snapshots
            .iter()
            .copied()
            .filter(|id| g.snapshots.contains_key(id))
            .collect();
        let scan = g.tier_scan(&eligible)?;
        // From the first moved refcount on, a failure would leave the trees
        // naming freed blocks: the pool then reloads its last durable state
        // (as a revert that fails halfway does).
        let r = (|g: &mut Inner| -> Result<TierCommit> {
            let mut moved: HashMap<u64, u64> = HashMap::new();
            let mut out = TierCommit::default();
            for &TierPlaced {
                addr,
                pack,
                offset,
                crc: csum,
            } in placed
            {
                let Some(o) = scan.objects.get(&addr) else {
                    out.skipped += 1;
                    continue;
                };
                if g.store.next_tier_id >= MAX_TIER_ID {
                    return Err(Error::NoSpace);
                }
                let id = g.store.next_tier_id;
                g.store.next_tier_id += 1;
                let rv = g
                    .store
                    .rc_get(addr)?
                    .ok_or_else(|| internal("tiered object lost its refcount"))?;
                g.store.rc_put(addr, None);
                g.store.rc_put(TIER_BASE + id, Some(rv));
                g.store.free_blocks_later(addr, rv.blocks as u64);
                if o.dedup {
                    g.store.dd_freed.push(addr);
                }
                g.store.tier_pending.insert(
                    id,
                    Some(TierEnt {
                        pack,
                        offset,
                        len: o.blocks * UNIT as u32,
                        orig: addr,
                        local: 0,
                        crc: csum,
                    }),
                );
                moved.insert(addr, TIER_BASE + id);
                out.objects += 1;
                out.bytes += o.bytes();
            }
            let mut memo = HashMap::new();
            for id in eligible {
                let Some(s) = g.snapshots.get(&id) else {
                    continue;
                };
                let root = Ptr {
                    addr: s.root,
                    csum: s.root_csum,
                };
                if root.is_null() || moved.is_empty() {
                    continue;
                }
                if let Some(new) = g.tier_rewrite(root, &moved, &scan.nodes, &mut memo)? {
                    let s = g
                        .snapshots
                        .get_mut(&id)
                        .ok_or_else(|| internal("snapshot vanished"))?;
                    s.root = new;
                    s.root_csum = 0;
                    s.tiered = true;
                    g.catalog_dirty.insert(KEY_SNAPSHOT | id, true);
                    out.snapshots.push(id);
                }
            }
            Ok(out)
        })(&mut g);
        for p in placed {
            g.store.tier_reserved.remove(&p.pack);
        }
        let out = match r {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(error = %e, "a tiering commit failed halfway; the pool reloads its last durable state");
                g.failed = true;
                return Err(e);
            }
        };
        g.ops += 1;
        g.log.structural = true;
        g.commit()?;
        Ok(out)
    }

    /// Every entry of the tier map, in id order.
    pub fn tier_entries(&self) -> Result<Vec<TierEntry>> {
        let mut g = self.lock()?;
        let mut v = Vec::new();
        let root = g.store.tier_root;
        g.store
            .range(TreeKind::Tier, root, 0, u64::MAX, &mut |k, b| {
                v.push(TierEntry::of(k, &TierEnt::decode(b)));
                Ok(())
            })?;
        // Changes not yet committed (a commit is never left pending by
        // the tier calls, but frees by other writers may be).
        for (k, t) in g.store.tier_pending.clone() {
            v.retain(|e| e.id != k);
            if let Some(t) = t {
                v.push(TierEntry::of(k, &t));
            }
        }
        v.sort_unstable_by_key(|e| e.id);
        Ok(v)
    }

    /// Packs the pool references (map entries and reserved packs): what
    /// GC must keep.
    /// A removal not yet committed still counts: until its commit, a crash
    /// or a reload brings the entry back, and its pack must still be there.
    pub fn tier_packs(&self) -> Result<BTreeSet<u64>> {
        let mut g = self.lock()?;
        let mut packs = BTreeSet::new();
        let root = g.store.tier_root;
        g.store
            .range(TreeKind::Tier, root, 0, u64::MAX, &mut |_, b| {
                packs.insert(TierEnt::decode(b).pack);
                Ok(())
            })?;
        packs.extend(g.store.tier_pending.values().flatten().map(|t| t.pack));
        packs.extend(g.store.tier_reserved.iter().copied());
        Ok(packs)
    }

    /// The tier map entries a point (or volume) reaches that have no
    /// local copy: what recalling it fetches.
    pub fn tier_entries_of(&self, t: Target) -> Result<Vec<TierEntry>> {
        let mut g = self.lock()?;
        let root = g.target(t)?.root;
        let mut ids = BTreeSet::new();
        let mut seen = HashSet::new();
        let mut stack = if root.is_null() { vec![] } else { vec![root] };
        while let Some(p) = stack.pop() {
            if !seen.insert(p.addr) {
                continue;
            }
            let n = g.store.load(TreeKind::Volume, p)?;
            for i in 0..n.len() {
                if n.is_leaf() {
                    let e = Extent::decode(n.val(i));
                    if e.is_tiered() {
                        ids.insert(e.addr - TIER_BASE);
                    }
                } else {
                    stack.push(n.child(i));
                }
            }
        }
        let mut v = Vec::new();
        for id in ids {
            let t = g.store.tier_get(id)?.ok_or_else(|| {
                Error::Corrupt(format!("tiered object {id} has no tier map entry"))
            })?;
            v.push(TierEntry::of(id, &t));
        }
        Ok(v)
    }

    /// Stores recalled copies of tiered objects (`(id, bytes)`, each
    /// checked against the crc the map holds) on local storage, and marks
    /// the points in `points` local once none of their objects is only in
    /// the tier. Commits.
    pub fn tier_recall(&self, objects: &[(u64, Vec<u8>)], points: &[u64]) -> Result<()> {
        let mut todo = Vec::new();
        {
            let mut g = self.lock_writable()?;
            for (id, bytes) in objects {
                let t = g
                    .store
                    .tier_get(*id)?
                    .ok_or_else(|| Error::NotFound(format!("tiered object {id}")))?;
                if t.local != 0 {
                    continue;
                }
                if bytes.len() != t.len as usize || crc(bytes) != t.crc {
                    return Err(Error::Tier(format!(
                        "object {id} of pack {:016x} does not match its checksum",
                        t.pack
                    )));
                }
                todo.push((*id, t, bytes));
            }
        }
        // Blocks taken but not yet named by the map are free again at the
        // next open if we crash: nothing references them.
        let mut placed: Vec<(u64, TierEnt, u64)> = Vec::new();
        let written = (|| -> Result<()> {
            for (id, t, bytes) in &todo {
                let at = self.allocate(1, t.blocks())?[0];
                placed.push((*id, *t, at));
                self.dev.write_at(bytes, at * UNIT)?;
            }
            self.dev.sync()?;
            Ok(())
        })();
        let mut g = self.lock_writable()?;
        if let Err(e) = written {
            for (_, t, at) in &placed {
                g.store.alloc.free(*at, t.blocks());
            }
            return Err(e);
        }
        for (id, was, at) in placed {
            // The entry as it is now: its point may have been deleted (the
            // entry gone) or another recall placed a copy while the lock
            // was released; then these blocks are not needed (never named,
            // so free at once).
            match g.store.tier_get(id)? {
                Some(mut t) if t.local == 0 => {
                    t.local = at;
                    g.store.tier_pending.insert(id, Some(t));
                }
                _ => g.store.alloc.free(at, was.blocks()),
            }
        }
        for &p in points {
            if g.snapshots.contains_key(&p) {
                drop(g);
                let left = self
                    .tier_entries_of(Target::Snapshot(p))?
                    .iter()
                    .any(|e| !e.local);
                g = self.lock_writable()?;
                if let Some(s) = g.snapshots.get_mut(&p) {
                    if s.tiered == left {
                        continue;
                    }
                    s.tiered = left;
                    g.catalog_dirty.insert(KEY_SNAPSHOT | p, true);
                }
            }
        }
        g.ops += 1;
        g.log.structural = true;
        g.commit()
    }

    /// Points entries `ids` at new places (`(id, pack, offset)`) after a
    /// repack copied them there; entries gone meanwhile are skipped.
    /// Commits. Returns how many moved.
    pub fn tier_repoint(&self, pack: u64, moved: &[(u64, u64)]) -> Result<u64> {
        let mut g = self.lock_writable()?;
        let mut n = 0;
        for &(id, offset) in moved {
            if let Some(mut t) = g.store.tier_get(id)? {
                t.pack = pack;
                t.offset = offset;
                g.store.tier_pending.insert(id, Some(t));
                n += 1;
            }
        }
        g.store.tier_reserved.remove(&pack);
        g.ops += 1;
        g.log.structural = true;
        g.commit()?;
        Ok(n)
    }

    /// Scrub of one tiered chunk, read from the store itself (not the
    /// cache): None if it verifies, else what is wrong, naming the object.
    pub(crate) fn scrub_tiered(&self, e: &Extent) -> Option<String> {
        let id = e.addr - TIER_BASE;
        let t = match self.lock().and_then(|mut g| g.store.tier_get(id)) {
            Ok(Some(t)) => t,
            Ok(None) => return Some(format!("tiered object {id} has no tier map entry")),
            Err(err) => return Some(err.to_string()),
        };
        let at = t.offset + e.offset_in_object();
        match self.tier_stored(&t, e, true) {
            Ok(b) if crc(&b) == e.csum => None,
            Ok(_) => Some(format!(
                "tiered data checksum mismatch (object {id}, pack {:016x} at byte {at}{})",
                t.pack,
                if t.local != 0 { ", recalled copy" } else { "" }
            )),
            Err(err) => Some(err.to_string()),
        }
    }

    /// What a read of tiered extent `e` gets: its stored bytes through the
    /// cache, or from the store itself when the cached ones fail the
    /// extent's checksum (a cache may hold damaged bytes). The caller
    /// verifies the result.
    pub(super) fn tier_read(&self, t: &TierEnt, e: &Extent) -> Result<Vec<u8>> {
        let b = self.tier_stored(t, e, false)?;
        if crc(&b) == e.csum || t.local != 0 {
            return Ok(b);
        }
        self.tier_stored(t, e, true)
    }

    /// The stored bytes of extent `e` (tiered) from its map entry `t`:
    /// the recalled copy if there is one, else the object store.
    pub(super) fn tier_stored(&self, t: &TierEnt, e: &Extent, direct: bool) -> Result<Vec<u8>> {
        let off = e.offset_in_object();
        if t.local != 0 {
            let mut b = vec![0u8; e.stored_len as usize];
            self.dev.read_at(&mut b, t.local * UNIT + off)?;
            return Ok(b);
        }
        let r = self.tier_reader()?;
        let res = if direct {
            r.read_direct(t.pack, t.offset + off, e.stored_len)
        } else {
            r.read(t.pack, t.offset + off, e.stored_len)
        };
        res.map_err(|err| {
            Error::Tier(format!(
                "reading pack {:016x} at {}: {err}",
                t.pack,
                t.offset + off
            ))
        })
    }
}

/// Map entries by tier id, for one read.
pub(super) type TierView = HashMap<u64, TierEnt>;

/// The map entries the tiered extents of `exts` name, looked up under the
/// pool lock (may miss the node cache: see `Pool::locked_no_io`).
pub(super) fn tier_view<'a>(
    g: &mut Inner,
    exts: impl Iterator<Item = &'a Extent>,
) -> Result<HashMap<u64, TierEnt>> {
    let mut v = HashMap::new();
    for e in exts.filter(|e| e.is_tiered()) {
        let id = e.addr - TIER_BASE;
        if v.contains_key(&id) {
            continue;
        }
        let t = g
            .store
            .tier_get(id)?
            .ok_or_else(|| Error::Corrupt(format!("tiered object {id} has no tier map entry")))?;
        v.insert(id, t);
    }
    Ok(v)
}

/// The extent as its bytes were sealed: the tweak of an encrypted chunk
/// comes from the pool block it was first written at.
pub(super) fn as_written(e: &Extent, t: &TierEnt) -> Extent {
    Extent { addr: t.orig, ..*e }
}

//! Moving objects to new pool blocks under every tree that names them
//! ("remap every owner"): what lets defragmentation move extents a volume
//! shares with its snapshots and clones, keeping the sharing and costing
//! no space.
//!
//! The pool keeps reference counts, not back references, so the owners of
//! an object are found by walking trees. The walk is bounded to a logical
//! key range: snapshots and clones are copies of a volume's tree, so they
//! name a shared extent at the same logical block, and walking every root
//! over the range finds every such reference. A reference from anywhere
//! else (a dedup hit at another block or in another volume, a sub-block
//! piece) is not seen: the object's count is then higher than the
//! references found, and the object stays where it is.
//!
//! A node on a path to a moved extent is copied with the extent's new
//! address, and the copy takes over the node's reference count and frees
//! the original (`Store::replace_node`). That is exact because every
//! parent pointing at such a node also reaches the moved extent, so lies
//! in the walked range and is itself copied to point at the copy. It is
//! checked before anything changes: each node to copy must have exactly
//! as many references as pointers the walk saw (root records included).
//!
//! Point records change their root (`root_csum` 0 until the commit that
//! must follow writes the copies), so a reader that pinned a point's old
//! root (a diff) sees it changed; readers that hold a pin (scrub) keep
//! reading the old nodes, which are not reused while pinned.

use std::collections::{HashMap, HashSet};

use super::records::KEY_SNAPSHOT;
use super::{Inner, Target};
use crate::error::Result;
use crate::format::*;
use crate::store::internal;

/// Where a moved object goes: its new first block and the checksum of its
/// bytes there (different only when they were encrypted again for the
/// new place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NewPlace {
    pub addr: u64,
    pub csum: u32,
    /// Whether its chunk may be in the dedup index (whose entry must go).
    pub dedup: bool,
}

/// What a walk of every tree over a key range saw.
#[derive(Default)]
pub(super) struct Owners {
    /// Pointers seen to each node reached (from parents and root records).
    seen: HashMap<u64, u32>,
    /// References seen to each object asked about.
    pub refs: HashMap<u64, u32>,
}

/// Whose root a tree is.
#[derive(Clone, Copy)]
enum RootOf {
    Volume(u64),
    Snapshot(u64),
}

impl Inner {
    fn every_root(&self) -> Vec<(RootOf, Ptr)> {
        let vols = self.volumes.iter().map(|(&id, v)| {
            let p = Ptr {
                addr: v.root,
                csum: v.root_csum,
            };
            (RootOf::Volume(id), p)
        });
        let snaps = self.snapshots.iter().map(|(&id, s)| {
            let p = Ptr {
                addr: s.root,
                csum: s.root_csum,
            };
            (RootOf::Snapshot(id), p)
        });
        vols.chain(snaps).filter(|(_, p)| !p.is_null()).collect()
    }

    /// Walks every volume and point tree over blocks `b0..b1`, counting
    /// the pointers to each node reached and the references to `objects`.
    pub(super) fn owners(&mut self, b0: u64, b1: u64, objects: &HashSet<u64>) -> Result<Owners> {
        let mut o = Owners::default();
        let mut stack: Vec<Ptr> = self.every_root().into_iter().map(|(_, p)| p).collect();
        while let Some(p) = stack.pop() {
            let seen = o.seen.entry(p.addr).or_insert(0);
            *seen += 1;
            if *seen > 1 {
                continue;
            }
            let n = self.store.load(TreeKind::Volume, p)?;
            if n.is_leaf() {
                let start = n.keys.partition_point(|&k| k < b0);
                for i in start..n.len() {
                    if n.keys[i] >= b1 {
                        break;
                    }
                    let e = Extent::decode(n.val(i));
                    if objects.contains(&e.addr) {
                        *o.refs.entry(e.addr).or_insert(0) += 1;
                    }
                }
                continue;
            }
            let start = if n.is_empty() { 0 } else { n.child_index(b0) };
            for i in start..n.len() {
                if n.keys[i] >= b1 {
                    break;
                }
                stack.push(n.child(i));
            }
        }
        Ok(o)
    }

    /// Whether node `p` reaches an extent of `moved` in `b0..b1` (so would
    /// be copied); adds such nodes to `copied`.
    fn reaches_moved(
        &mut self,
        p: Ptr,
        range: (u64, u64),
        moved: &HashMap<u64, NewPlace>,
        memo: &mut HashMap<u64, bool>,
    ) -> Result<bool> {
        if let Some(&r) = memo.get(&p.addr) {
            return Ok(r);
        }
        let (b0, b1) = range;
        let n = self.store.load(TreeKind::Volume, p)?;
        let mut hit = false;
        if n.is_leaf() {
            let start = n.keys.partition_point(|&k| k < b0);
            hit = (start..n.len())
                .take_while(|&i| n.keys[i] < b1)
                .any(|i| moved.contains_key(&Extent::decode(n.val(i)).addr));
        } else {
            let start = if n.is_empty() { 0 } else { n.child_index(b0) };
            for i in start..n.len() {
                if n.keys[i] >= b1 {
                    break;
                }
                hit |= self.reaches_moved(n.child(i), range, moved, memo)?;
            }
        }
        memo.insert(p.addr, hit);
        Ok(hit)
    }

    /// Copies node `p` with the new places of `moved` if it reaches any;
    /// the copy's address.
    fn relocate_node(
        &mut self,
        p: Ptr,
        range: (u64, u64),
        moved: &HashMap<u64, NewPlace>,
        memo: &mut HashMap<u64, Option<u64>>,
    ) -> Result<Option<u64>> {
        if let Some(&r) = memo.get(&p.addr) {
            return Ok(r);
        }
        let (b0, b1) = range;
        let n = self.store.load(TreeKind::Volume, p)?;
        let mut copy = (*n).clone();
        let mut changed = false;
        if n.is_leaf() {
            let start = n.keys.partition_point(|&k| k < b0);
            for i in start..n.len() {
                if n.keys[i] >= b1 {
                    break;
                }
                let mut e = Extent::decode(n.val(i));
                if let Some(to) = moved.get(&e.addr) {
                    e.addr = to.addr;
                    e.csum = to.csum;
                    // A moved chunk leaves the dedup index (its entry goes
                    // with the old object's), as a defragmented one did.
                    e.flags &= !flags::DEDUP;
                    copy.set_val(i, &e.encode());
                    changed = true;
                }
            }
        } else {
            let start = if n.is_empty() { 0 } else { n.child_index(b0) };
            for i in start..n.len() {
                if n.keys[i] >= b1 {
                    break;
                }
                if let Some(c) = self.relocate_node(n.child(i), range, moved, memo)? {
                    copy.set_child(i, Ptr { addr: c, csum: 0 });
                    changed = true;
                }
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

    /// Moves each object of `moved` (already copied to its new place,
    /// whose blocks are allocated) under every tree naming it in blocks
    /// `b0..b1`. Objects with a reference the walk does not see stay;
    /// they are returned, and their new blocks are the caller's to free.
    /// Nothing changes when a node to copy has references the walk does
    /// not explain (then every object is returned). The caller commits.
    pub(super) fn relocate(
        &mut self,
        b0: u64,
        b1: u64,
        mut moved: HashMap<u64, NewPlace>,
    ) -> Result<Vec<u64>> {
        let objects: HashSet<u64> = moved.keys().copied().collect();
        let owners = self.owners(b0, b1, &objects)?;
        let mut stay = Vec::new();
        for (&addr, to) in &moved {
            let rc = self.store.rc_get(addr)?;
            let seen = owners.refs.get(&addr).copied().unwrap_or(0);
            if rc.is_none_or(|v| v.refs != seen) || to.addr == addr {
                stay.push(addr);
            }
        }
        for a in &stay {
            moved.remove(a);
        }
        if moved.is_empty() {
            return Ok(stay);
        }
        let roots = self.every_root();
        let mut reach = HashMap::new();
        for &(_, p) in &roots {
            self.reaches_moved(p, (b0, b1), &moved, &mut reach)?;
        }
        for (&addr, &hit) in &reach {
            let rc = self.store.rc_get(addr)?.map(|v| v.refs);
            if hit && rc != owners.seen.get(&addr).copied() {
                tracing::warn!(
                    node = addr,
                    refs = ?rc,
                    seen = owners.seen.get(&addr),
                    "relocate: a tree node has references the walk does not explain; nothing moves"
                );
                stay.extend(moved.keys());
                return Ok(stay);
            }
        }
        // From here on a failure leaves trees half rewritten: the pool must
        // reload its last durable state (as a failed tiering commit does).
        let r = (|g: &mut Inner| -> Result<()> {
            for (&addr, to) in &moved {
                let rv = g
                    .store
                    .rc_get(addr)?
                    .ok_or_else(|| internal("moved object lost its refcount"))?;
                g.store.rc_put(addr, None);
                g.store.add_object(to.addr, rv.blocks, rv.refs);
                g.store.free_blocks_later(addr, rv.blocks as u64);
                if to.dedup {
                    // Its dedup index entries go at commit.
                    g.store.dd_freed.push(addr);
                }
            }
            let mut memo = HashMap::new();
            for (of, p) in roots {
                let Some(new) = g.relocate_node(p, (b0, b1), &moved, &mut memo)? else {
                    continue;
                };
                let new = Ptr { addr: new, csum: 0 };
                match of {
                    RootOf::Volume(id) => g.set_root(id, new, 0)?,
                    RootOf::Snapshot(id) => {
                        let s = g
                            .snapshots
                            .get_mut(&id)
                            .ok_or_else(|| internal("snapshot vanished"))?;
                        s.root = new.addr;
                        s.root_csum = 0;
                        g.catalog_dirty.insert(KEY_SNAPSHOT | id, true);
                    }
                }
            }
            g.ops += 1;
            g.log.structural = true;
            Ok(())
        })(self);
        if let Err(e) = r {
            tracing::error!(error = %e, "a relocation failed halfway; the pool reloads its last durable state");
            self.failed = true;
            return Err(e);
        }
        Ok(stay)
    }

    /// The volume's mapped whole blocks of `b0..b1`, in order.
    pub(super) fn mapped(&mut self, vol: u64, b0: u64, b1: u64) -> Result<Vec<(u64, Extent)>> {
        let root = self.target(Target::Volume(vol))?.root;
        let mut out = Vec::new();
        self.store
            .range(TreeKind::Volume, root, b0, b1, &mut |k, v| {
                if k < b1 {
                    out.push((k, Extent::decode(v)));
                }
                Ok(())
            })?;
        Ok(out)
    }
}

//! `fsck` (structure, reference counts, space accounting, leaks) and
//! `scrub` (read and verify every node and data extent).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::*;
use crate::pool::{Inner, Pool, TreeRoot};

/// What fsck found.
#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    pub errors: Vec<String>,
    pub volumes: usize,
    pub snapshots: usize,
    pub volume_nodes: u64,
    pub refcount_nodes: u64,
    pub catalog_nodes: u64,
    pub catalog_blocks: u64,
    pub extents: u64,
    pub data_bytes: u64,
    pub used_blocks: u64,
    pub deferred_free_blocks: u64,
    /// Blocks of the intent log's slots (freed by the next commit).
    pub log_blocks: u64,
    pub leaked_blocks: u64,
    pub dedup_nodes: u64,
    pub dedup_entries: u64,
    /// Tier map: nodes, entries (objects in the object store) and the
    /// blocks of recalled copies.
    pub tier_nodes: u64,
    pub tier_entries: u64,
    pub tier_local_blocks: u64,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
    /// Metadata bytes (every tree node and catalog record).
    pub fn metadata_bytes(&self) -> u64 {
        (self.volume_nodes
            + self.refcount_nodes
            + self.catalog_nodes
            + self.catalog_blocks
            + self.dedup_nodes
            + self.tier_nodes)
            * UNIT
    }
}

/// One bad spot found by scrub.
#[derive(Debug, Clone, Serialize)]
pub struct ScrubError {
    /// `volume NAME` or `snapshot VOLUME@ID`.
    pub target: String,
    /// Byte offset in the target (for a node: the first offset it maps).
    pub offset: u64,
    pub pool_block: u64,
    pub what: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ScrubReport {
    pub nodes_checked: u64,
    pub extents_checked: u64,
    pub bytes_checked: u64,
    pub errors: Vec<ScrubError>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Obj {
    Node,
    Extent(u32),
    /// A pack of compressed chunks, at least this many blocks long (its
    /// length is what the refcount tree records).
    Pack(u32),
    /// An object in the tier (key `TIER_BASE + id`): no pool blocks.
    Tier,
}

impl Pool {
    /// Checks the whole pool: every tree's structure and checksums, that the
    /// stored reference counts equal the references actually present, and
    /// that every allocated block is accounted for (no leaks, no overlaps).
    pub fn fsck(&self) -> Result<FsckReport> {
        let mut guard = self.lock()?;
        let g = &mut *guard;
        let mut rep = FsckReport::default();
        let roots = g.roots();
        rep.volumes = roots
            .iter()
            .filter(|r| r.name.starts_with("volume "))
            .count();
        rep.snapshots = roots.len() - rep.volumes;
        // Expected references, from walking every root.
        let mut walk = VolumeWalk {
            refs: HashMap::new(),
            counted: HashSet::new(),
            total: g.store.alloc.total(),
        };
        for root in &roots {
            walk.tree(g, &mut rep, root);
        }
        let mut refs = walk.refs;
        check_mapped_counters(g, &mut rep, &roots);
        check_pieces(g, &mut rep, &roots);
        let rc = stored_refcounts(g, &mut rep);
        compare_refcounts(&mut rep, &mut refs, &rc.stored);
        check_space(g, &mut rep, &refs, &rc.nodes);
        rep.used_blocks = g.store.alloc.used();
        Ok(rep)
    }
}

/// Walks volume trees, each shared subtree once, counting the references
/// every node and extent should have.
struct VolumeWalk {
    /// Expected references, and the kind of object at each block.
    refs: HashMap<u64, (u32, Obj)>,
    /// Stored bytes already counted (dedup and frames share them).
    counted: HashSet<u64>,
    total: u64,
}

impl VolumeWalk {
    fn tree(&mut self, g: &mut Inner, rep: &mut FsckReport, root: &TreeRoot) {
        let (name, bs) = (&root.name, root.block_size);
        let root = root.ptr;
        if root.is_null() {
            return;
        }
        let first = {
            let e = self.refs.entry(root.addr).or_insert((0, Obj::Node));
            e.0 += 1;
            e.0 == 1
        };
        if !first {
            return;
        }
        // (ptr, lo, hi, level above)
        let mut stack = vec![(root, 0u64, u64::MAX, u8::MAX)];
        while let Some((p, lo, hi, parent_level)) = stack.pop() {
            let n = match g.store.load(TreeKind::Volume, p) {
                Ok(n) => n,
                Err(e) => {
                    rep.errors.push(format!("{name}: {e}"));
                    continue;
                }
            };
            rep.volume_nodes += 1;
            if parent_level != u8::MAX && n.level + 1 != parent_level {
                rep.errors.push(format!(
                    "{name}: node at block {} has level {} under level {}",
                    p.addr, n.level, parent_level
                ));
            }
            if n.is_empty() {
                rep.errors
                    .push(format!("{name}: empty node at block {}", p.addr));
            }
            if n.keys.first().is_some_and(|&k| k < lo) || n.keys.last().is_some_and(|&k| k >= hi) {
                rep.errors.push(format!(
                    "{name}: node at block {} has keys outside its parent's range",
                    p.addr
                ));
            }
            for i in 0..n.len() {
                if n.is_leaf() {
                    self.extent(rep, name, bs, n.keys[i], Extent::decode(n.val(i)));
                    continue;
                }
                let c = n.child(i);
                let chi = if i + 1 < n.len() { n.keys[i + 1] } else { hi };
                let r = self.refs.entry(c.addr).or_insert((0, Obj::Node));
                r.0 += 1;
                if r.1 != Obj::Node {
                    rep.errors.push(format!(
                        "{name}: pool block {} is used as two different objects",
                        c.addr
                    ));
                }
                if r.0 == 1 {
                    stack.push((c, n.keys[i].max(lo), chi, n.level));
                }
            }
        }
    }

    /// One leaf entry: block `key` of a tree with blocks of `bs` bytes.
    fn extent(&mut self, rep: &mut FsckReport, name: &str, bs: u32, key: u64, e: Extent) {
        rep.extents += 1;
        if e.is_tiered() {
            let r = self.refs.entry(e.addr).or_insert((0, Obj::Tier));
            r.0 += 1;
            if self.counted.insert(e.byte_offset()) {
                rep.data_bytes += e.stored_len as u64;
            }
            return;
        }
        let (at, chunk) = volume_key_span(key, bs);
        let chunk = chunk as u32;
        let piece = PieceKey::decode(key);
        let max_len = if e.flags & flags::FRAMED != 0 {
            FRAME_BYTES as u32
        } else {
            chunk
        };
        if e.stored_len == 0
            || e.stored_len > max_len
            || e.addr < RESERVED_BLOCKS
            || e.addr + e.min_object_blocks() as u64 > self.total
            || (!e.packed() && e.stored_len != chunk)
            // A piece may be framed: a dedup hit on a chunk of the same
            // size that another volume (with that block size) framed.
            || piece.is_some_and(|p| p.end() as u64 > bs as u64 / UNIT || chunk >= bs)
        {
            rep.errors.push(format!(
                "{name}: bad extent at offset {} (block {}, {} bytes)",
                at, e.addr, e.stored_len
            ));
            return;
        }
        let obj = if e.packed() {
            Obj::Pack(e.min_object_blocks())
        } else {
            Obj::Extent(e.blocks())
        };
        let r = self.refs.entry(e.addr).or_insert((0, obj));
        r.0 += 1;
        match (r.1, obj) {
            (Obj::Pack(a), Obj::Pack(b)) => r.1 = Obj::Pack(a.max(b)),
            (a, b) if a == b => {}
            _ => rep.errors.push(format!(
                "{name}: pool block {} is used as two different objects",
                e.addr
            )),
        }
        // Stored bytes once, however many blocks share them (dedup, frames).
        if self.counted.insert(e.byte_offset()) {
            rep.data_bytes += e.stored_len as u64;
        }
    }
}

/// Every piece lies over a whole-block extent, inside its block, without
/// overlapping another piece of the block (rules in `pool/piece.rs`).
fn check_pieces(g: &mut Inner, rep: &mut FsckReport, roots: &[TreeRoot]) {
    for TreeRoot {
        name,
        ptr,
        block_size,
    } in roots
    {
        let pieces = match g.pieces_all(*ptr) {
            Ok(p) => p,
            Err(e) => {
                rep.errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut prev: Option<PieceKey> = None;
        for p in pieces {
            let over = prev.is_some_and(|q| q.block == p.block && q.end() > p.start);
            let base = g.store.get(TreeKind::Volume, *ptr, p.block);
            if over || !matches!(base, Ok(Some(_))) {
                rep.errors.push(format!(
                    "{name}: piece at offset {} {}",
                    p.offset(*block_size),
                    if over {
                        "overlaps another piece"
                    } else {
                        "lies over no block extent"
                    }
                ));
            }
            prev = Some(p);
        }
    }
}

/// Per-volume allocated block counters against the trees.
fn check_mapped_counters(g: &mut Inner, rep: &mut FsckReport, roots: &[TreeRoot]) {
    let mut entries_under: HashMap<u64, u64> = HashMap::new();
    for TreeRoot { name, ptr, .. } in roots {
        let counted = count_entries(g, *ptr, &mut entries_under);
        match counted {
            Ok(c) => {
                if let Some(stored) = g.allocated_blocks_of(name) {
                    if stored != c {
                        rep.errors.push(format!(
                            "{name}: records {stored} allocated blocks, tree maps {c}"
                        ));
                    }
                }
            }
            Err(e) => rep.errors.push(format!("{name}: {e}")),
        }
    }
}

/// The reference counts as stored (uncommitted changes included) and the
/// refcount tree's nodes.
struct StoredRefcounts {
    stored: HashMap<u64, RcVal>,
    nodes: Vec<u64>,
}

fn stored_refcounts(g: &mut Inner, rep: &mut FsckReport) -> StoredRefcounts {
    let mut stored: HashMap<u64, RcVal> = HashMap::new();
    let rc_root = g.store.rc_root;
    let mut rc_nodes = Vec::new();
    let walk = g.walk_nodes(TreeKind::Refcount, rc_root, &mut |addr, n| {
        rc_nodes.push(addr);
        if n.is_leaf() {
            for i in 0..n.len() {
                stored.insert(n.keys[i], RcVal::decode(n.val(i)));
            }
        }
        Ok(())
    });
    if let Err(e) = walk {
        rep.errors.push(format!("refcount tree: {e}"));
    }
    // Uncommitted changes override the tree.
    for (a, v) in g.store.rc_delta.clone() {
        match v {
            Some(v) => stored.insert(a, v),
            None => stored.remove(&a),
        };
    }
    rep.refcount_nodes = rc_nodes.len() as u64;
    StoredRefcounts {
        stored,
        nodes: rc_nodes,
    }
}

/// Stored reference counts against the expected ones; a pack's length is
/// taken from its refcount entry when that is plausible.
fn compare_refcounts(
    rep: &mut FsckReport,
    refs: &mut HashMap<u64, (u32, Obj)>,
    stored: &HashMap<u64, RcVal>,
) {
    for (addr, (n, obj)) in refs.iter_mut() {
        let blocks = match obj {
            Obj::Node => 1,
            Obj::Extent(b) => *b,
            Obj::Tier => stored.get(addr).map_or(0, |v| v.blocks),
            Obj::Pack(need) => match stored.get(addr) {
                Some(v) if v.blocks >= *need && v.blocks as u64 <= MAX_PACK / UNIT => {
                    *obj = Obj::Pack(v.blocks);
                    v.blocks
                }
                _ => *need,
            },
        };
        match stored.get(addr) {
            None => rep.errors.push(format!(
                "pool block {addr} is referenced {n} time(s) but has no refcount"
            )),
            Some(v) if v.refs != *n || v.blocks != blocks => rep.errors.push(format!(
                "pool block {addr}: refcount {} x {} blocks stored, {n} x {blocks} found",
                v.refs, v.blocks
            )),
            _ => {}
        }
    }
    for (addr, v) in stored {
        if !refs.contains_key(addr) {
            rep.errors.push(format!(
                "pool block {addr} ({} blocks) has refcount {} but nothing references it (leak)",
                v.blocks, v.refs
            ));
            rep.leaked_blocks += v.blocks as u64;
        }
    }
}

/// Which blocks objects claim; a block claimed twice or past the end is
/// an error.
struct Claims {
    claimed: Vec<bool>,
}

impl Claims {
    fn claim(&mut self, rep: &mut FsckReport, a: u64, n: u64, what: &str) {
        for b in a..a + n {
            match self.claimed.get_mut(b as usize) {
                Some(c) if !*c => *c = true,
                Some(_) => {
                    rep.errors
                        .push(format!("pool block {b} is claimed twice ({what})"));
                    return;
                }
                None => {
                    rep.errors
                        .push(format!("pool block {b} lies past the end ({what})"));
                    return;
                }
            }
        }
    }
}

/// Space accounting: every used block is owned by exactly one object
/// (reserved area, volume data, tree nodes, catalog records, deferred
/// frees), and every owned block is marked used.
fn check_space(
    g: &mut Inner,
    rep: &mut FsckReport,
    refs: &HashMap<u64, (u32, Obj)>,
    rc_nodes: &[u64],
) {
    let mut claims = Claims {
        claimed: vec![false; g.store.alloc.total() as usize],
    };
    claims.claim(rep, 0, RESERVED_BLOCKS, "reserved");
    for (addr, (_, obj)) in refs {
        let n = match obj {
            Obj::Node => 1,
            Obj::Extent(b) | Obj::Pack(b) => *b as u64,
            Obj::Tier => continue,
        };
        claims.claim(rep, *addr, n, "volume data");
    }
    for a in rc_nodes {
        claims.claim(rep, *a, 1, "refcount node");
    }
    let cat_root = g.catalog_root();
    let mut cat_nodes = Vec::new();
    if let Err(e) = g.walk_nodes(TreeKind::Catalog, cat_root, &mut |a, _| {
        cat_nodes.push(a);
        Ok(())
    }) {
        rep.errors.push(format!("catalog tree: {e}"));
    }
    rep.catalog_nodes = cat_nodes.len() as u64;
    check_dedup(g, rep, refs, &mut cat_nodes);
    for a in cat_nodes {
        claims.claim(rep, a, 1, "catalog node");
    }
    for (a, n) in g.blob_list() {
        rep.catalog_blocks += n;
        claims.claim(rep, a, n, "catalog record");
    }
    for (a, n) in check_tier(g, rep, refs) {
        claims.claim(rep, a, n, "tier map");
    }
    for (a, n) in g.deferred_frees() {
        rep.deferred_free_blocks += n;
        claims.claim(rep, a, n, "freed, awaiting commit");
    }
    for (a, n) in g.log_slots() {
        rep.log_blocks += n;
        claims.claim(rep, a, n, "intent log slot");
    }
    let uncommitted = g.has_uncommitted();
    for (b, c) in claims.claimed.iter().enumerate() {
        let used = g.store.alloc.is_set(b as u64);
        if *c && !used {
            rep.errors
                .push(format!("pool block {b} is in use but marked free"));
        } else if !*c && used && !uncommitted {
            rep.errors.push(format!(
                "pool block {b} is marked used but nothing owns it (leak)"
            ));
            rep.leaked_blocks += 1;
        }
    }
}

/// Tier map: every tiered object the trees name has an entry whose size
/// is its refcount's, and every entry is named. Returns the blocks it
/// owns (its nodes and the recalled copies).
fn check_tier(
    g: &mut Inner,
    rep: &mut FsckReport,
    refs: &HashMap<u64, (u32, Obj)>,
) -> Vec<(u64, u64)> {
    let mut owned = Vec::new();
    let mut entries: HashMap<u64, TierEnt> = HashMap::new();
    let root = g.store.tier_root;
    let walk = g.walk_nodes(TreeKind::Tier, root, &mut |a, n| {
        owned.push((a, 1));
        rep.tier_nodes += 1;
        if n.is_leaf() {
            for i in 0..n.len() {
                entries.insert(n.keys[i], TierEnt::decode(n.val(i)));
            }
        }
        Ok(())
    });
    if let Err(e) = walk {
        rep.errors.push(format!("tier map: {e}"));
    }
    for (id, t) in g.store.tier_pending.clone() {
        match t {
            Some(t) => entries.insert(id, t),
            None => entries.remove(&id),
        };
    }
    for (id, t) in &entries {
        rep.tier_entries += 1;
        if t.local != 0 {
            owned.push((t.local, t.blocks()));
            rep.tier_local_blocks += t.blocks();
        }
        if !refs.contains_key(&(TIER_BASE + id)) {
            rep.errors.push(format!(
                "tier map entry {id} (pack {:016x}) is named by no tree (leak)",
                t.pack
            ));
        }
        if t.pack >= g.store.next_pack || *id >= g.store.next_tier_id {
            rep.errors.push(format!(
                "tier map entry {id} names pack {:016x} or an id not yet handed out",
                t.pack
            ));
        }
    }
    for (addr, (_, obj)) in refs {
        if *obj == Obj::Tier && !entries.contains_key(&(addr - TIER_BASE)) {
            rep.errors.push(format!(
                "tiered object {} is referenced but has no tier map entry",
                addr - TIER_BASE
            ));
        }
    }
    owned
}

/// Dedup index: its nodes (accounted with the catalog's, added to
/// `nodes`), and every entry names a live chunk.
fn check_dedup(
    g: &mut Inner,
    rep: &mut FsckReport,
    refs: &HashMap<u64, (u32, Obj)>,
    nodes: &mut Vec<u64>,
) {
    let (dd_root, ddr_root) = (g.store.dd_root, g.store.ddr_root);
    let mut dd_entries: Vec<(u64, DedupVal)> = Vec::new();
    for (kind, root) in [(TreeKind::Dedup, dd_root), (TreeKind::DedupRev, ddr_root)] {
        let walk = g.walk_nodes(kind, root, &mut |a, n| {
            nodes.push(a);
            rep.dedup_nodes += 1;
            if kind == TreeKind::Dedup && n.is_leaf() {
                for i in 0..n.len() {
                    dd_entries.push((n.keys[i], DedupVal::decode(n.val(i))));
                }
            }
            Ok(())
        });
        if let Err(e) = walk {
            rep.errors.push(format!("{}: {e}", kind.name()));
        }
    }
    let freed: HashSet<u64> = g.store.dd_freed.iter().copied().collect();
    for (k, v) in dd_entries {
        if g.store.dd_pending.contains_key(&k) || freed.contains(&v.ext.addr) {
            continue;
        }
        rep.dedup_entries += 1;
        if !refs.contains_key(&v.ext.addr) {
            rep.errors.push(format!(
                "dedup index entry {k:#018x} names pool block {}, which nothing references",
                v.ext.addr
            ));
        }
    }
}

impl Pool {
    /// Reads every node and data extent from the device and verifies its
    /// checksum; names the volume or snapshot and offset of each bad spot.
    pub fn scrub(&self) -> Result<ScrubReport> {
        self.scrub_with(&|_, _| {})
    }

    /// [`Pool::scrub`] on a live pool, calling `progress(bytes_done,
    /// bytes_total)` as it goes. It commits, then reads the committed trees
    /// without holding the pool lock (I/O goes on meanwhile); blocks freed
    /// while it runs are not reused until it ends, so nothing it reads can be
    /// overwritten under it.
    pub fn scrub_with(&self, progress: &dyn Fn(u64, u64)) -> Result<ScrubReport> {
        let (roots, total, _pin) = {
            let mut g = self.lock()?;
            // Wait out a flush commit in flight, then commit under the lock
            // so every root is on the device.
            while g.committing() {
                drop(g);
                std::thread::sleep(std::time::Duration::from_millis(1));
                g = self.lock()?;
            }
            g.commit()?;
            let pin = self.pin_locked(&mut g);
            let roots = g.roots();
            let total: u64 = roots
                .iter()
                .map(|r| g.allocated_blocks_of(&r.name).unwrap_or(0) * r.block_size as u64)
                .sum();
            (roots, total, pin)
        };
        let mut rep = ScrubReport::default();
        let mut seen_nodes: HashMap<u64, bool> = HashMap::new();
        // Each stored chunk once: None if it verified, else what is wrong.
        let mut seen_ext: HashMap<u64, Option<String>> = HashMap::new();
        let dev = self.dev().clone();
        let mut done = 0u64;
        progress(0, total);
        for TreeRoot {
            name,
            ptr: root,
            block_size: bs,
        } in roots
        {
            if root.is_null() {
                continue;
            }
            let mut stack = vec![(root, 0u64)];
            while let Some((p, first_key)) = stack.pop() {
                let mut buf = vec![0u8; NODE_SIZE];
                let node = dev
                    .read_at(&mut buf, p.addr.saturating_mul(UNIT))
                    .map_err(Error::from)
                    .and_then(|_| Node::decode(&buf, p.addr, p.csum))
                    .and_then(|n| {
                        if n.kind == TreeKind::Volume {
                            Ok(n)
                        } else {
                            Err(Error::Corrupt(format!(
                                "pool block {} holds a {} inside a volume tree",
                                p.addr,
                                n.kind.name()
                            )))
                        }
                    });
                let first_visit = !seen_nodes.contains_key(&p.addr);
                let n = match node {
                    Ok(n) => n,
                    Err(e) => {
                        if first_visit {
                            rep.nodes_checked += 1;
                            seen_nodes.insert(p.addr, false);
                        }
                        rep.errors.push(ScrubError {
                            target: name.clone(),
                            offset: first_key.saturating_mul(bs as u64),
                            pool_block: p.addr,
                            what: e.to_string(),
                        });
                        continue;
                    }
                };
                if first_visit {
                    rep.nodes_checked += 1;
                    seen_nodes.insert(p.addr, true);
                }
                for i in 0..n.len() {
                    if !n.is_leaf() {
                        stack.push((n.child(i), n.keys[i]));
                        continue;
                    }
                    let e = Extent::decode(n.val(i));
                    let (at, _) = volume_key_span(n.keys[i], bs);
                    if PieceKey::decode(n.keys[i]).is_none() {
                        done += bs as u64;
                    }
                    let bad = match seen_ext.get(&e.byte_offset()) {
                        Some(bad) => bad.clone(),
                        None => {
                            let bad = if e.is_tiered() {
                                self.scrub_tiered(&e)
                            } else {
                                let mut buf = vec![0u8; e.stored_len as usize];
                                let ok = dev.read_at(&mut buf, e.byte_offset()).is_ok()
                                    && crc(&buf) == e.csum;
                                (!ok).then(|| "data checksum mismatch".to_string())
                            };
                            rep.extents_checked += 1;
                            rep.bytes_checked += e.stored_len as u64;
                            seen_ext.insert(e.byte_offset(), bad.clone());
                            bad
                        }
                    };
                    if let Some(what) = bad {
                        rep.errors.push(ScrubError {
                            target: name.clone(),
                            offset: at,
                            pool_block: if e.is_tiered() { 0 } else { e.addr },
                            what,
                        });
                    }
                }
                progress(done.min(total), total);
            }
        }
        progress(total, total);
        Ok(rep)
    }
}

fn count_entries(g: &mut Inner, root: Ptr, memo: &mut HashMap<u64, u64>) -> Result<u64> {
    if root.is_null() {
        return Ok(0);
    }
    if let Some(c) = memo.get(&root.addr) {
        return Ok(*c);
    }
    let n = g.store.load(TreeKind::Volume, root)?;
    let c = if n.is_leaf() {
        // Pieces lie over mapped blocks: only whole-block keys count.
        n.keys
            .iter()
            .filter(|&&k| PieceKey::decode(k).is_none())
            .count() as u64
    } else {
        let mut c = 0;
        for i in 0..n.len() {
            c += count_entries(g, n.child(i), memo)?;
        }
        c
    };
    memo.insert(root.addr, c);
    Ok(c)
}

//! The node store: dirty (uncommitted) nodes, a bounded cache of clean nodes,
//! the allocator, refcounts, and the copy-on-write B+tree operations.
//!
//! Volume trees are shared: every node and data extent they reach has an
//! entry in the refcount tree, and shadowing follows Rodeh's lazy scheme —
//! copying a node referenced more than once increments its children
//! (`inc_children`) and decrements the original; copying an exclusively
//! owned node hands its children to the copy and frees the original.
//! Refcount updates are buffered in `rc_delta` and applied to the refcount
//! tree, sorted, at commit (deferred reference counting).
//! The catalog and refcount trees are private: shadowing frees the original.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use crate::alloc::Allocator;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::*;

/// What an insert below a node produced: a new right sibling (its first key
/// and address) if the node split, and the value the key had before.
type InsertOutcome = (Option<(u64, u64)>, Option<Vec<u8>>);

pub(crate) fn internal(msg: &str) -> Error {
    Error::Corrupt(format!("internal invariant broken: {msg}"))
}

pub(crate) struct Store {
    pub dev: Arc<dyn BlockDev>,
    pub max_fanout: u32,
    /// Generation of the transaction being built.
    pub generation: u64,
    /// Nodes serialized by a commit whose blocks may not be on the device
    /// yet (the pool lock is released while a commit writes and syncs):
    /// loads find them here, never on the device.
    pub in_flight: HashMap<u64, Arc<Node>>,
    pub dirty: HashMap<u64, Arc<Node>>,
    cache: LruCache<u64, (Arc<Node>, u32)>,
    pub alloc: Allocator,
    pub rc_root: Ptr,
    pub rc_delta: HashMap<u64, Option<RcVal>>,
    /// Blocks freed in this transaction; reusable only once later commits
    /// no longer let any valid superblock reach them.
    pub pending_free: Vec<(u64, u64)>,
    /// Blocks in `pending_free` (asked after every write: kept, not summed).
    pub pending_free_blocks: u64,
    pub stats: StoreStats,
    /// While set, `load` never reads the device: a miss fails with
    /// [`Error::NodeMiss`] and records the node in `missing`, so callers can
    /// read it without holding the pool lock.
    pub no_io: bool,
    pub missing: Option<(TreeKind, Ptr)>,
    /// Dedup index (fingerprint key -> chunk) and its reverse map (object
    /// block and slot -> fingerprint key), with changes buffered until
    /// commit like refcounts.
    pub dd_root: Ptr,
    pub ddr_root: Ptr,
    pub dd_pending: HashMap<u64, Option<DedupVal>>,
    pub ddr_pending: BTreeMap<u64, Option<u64>>,
    /// Objects holding deduplicated chunks freed in this transaction: their
    /// index entries go at commit (the blocks are not reused before).
    pub dd_freed: Vec<u64>,
    /// The tier map (tier id -> where the object lives; `pool/tier.rs`),
    /// with changes buffered until commit, and its counters.
    pub tier_root: Ptr,
    pub tier_pending: BTreeMap<u64, Option<TierEnt>>,
    pub next_tier_id: u64,
    pub next_pack: u64,
    /// Packs being filled by a tiering or repack run: GC keeps them.
    pub tier_reserved: std::collections::HashSet<u64>,
}

#[derive(Default, Clone, Debug)]
pub struct StoreStats {
    pub node_reads: u64,
    pub cache_hits: u64,
}

impl Store {
    pub fn new(
        dev: Arc<dyn BlockDev>,
        alloc: Allocator,
        max_fanout: u32,
        cache_nodes: usize,
    ) -> Store {
        Store {
            dev,
            max_fanout,
            generation: 1,
            in_flight: HashMap::new(),
            dirty: HashMap::new(),
            cache: LruCache::new(
                NonZeroUsize::new(cache_nodes.max(16)).unwrap_or(NonZeroUsize::MIN),
            ),
            alloc,
            rc_root: Ptr::NULL,
            rc_delta: HashMap::new(),
            pending_free: Vec::new(),
            pending_free_blocks: 0,
            stats: StoreStats::default(),
            no_io: false,
            missing: None,
            dd_root: Ptr::NULL,
            ddr_root: Ptr::NULL,
            dd_pending: HashMap::new(),
            ddr_pending: BTreeMap::new(),
            dd_freed: Vec::new(),
            tier_root: Ptr::NULL,
            tier_pending: BTreeMap::new(),
            next_tier_id: 0,
            next_pack: 0,
            tier_reserved: Default::default(),
        }
    }

    /// Adds a node read and verified outside the lock (see `no_io`).
    pub fn cache_insert(&mut self, p: Ptr, n: Arc<Node>) {
        if !self.dirty.contains_key(&p.addr) {
            self.cache.put(p.addr, (n, p.csum));
        }
    }

    #[cfg(feature = "test-utils")]
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Loads a node: dirty, cached, or read and verified against `p.csum`.
    pub fn load(&mut self, kind: TreeKind, p: Ptr) -> Result<Arc<Node>> {
        if let Some(n) = self.dirty.get(&p.addr) {
            return Ok(n.clone());
        }
        if let Some(n) = self.in_flight.get(&p.addr) {
            if n.kind == kind {
                return Ok(n.clone());
            }
        }
        if let Some((n, c)) = self.cache.get(&p.addr) {
            if *c == p.csum && n.kind == kind {
                self.stats.cache_hits += 1;
                return Ok(n.clone());
            }
        }
        if self.no_io {
            self.missing = Some((kind, p));
            return Err(Error::NodeMiss);
        }
        if p.addr < RESERVED_BLOCKS || p.addr >= self.alloc.total() {
            return Err(Error::Corrupt(format!(
                "{} pointer to pool block {} is outside the pool",
                kind.name(),
                p.addr
            )));
        }
        let mut buf = vec![0u8; NODE_SIZE];
        self.dev.read_at(&mut buf, p.addr * UNIT)?;
        self.stats.node_reads += 1;
        let n = Node::decode(&buf, p.addr, p.csum)?;
        if n.kind != kind {
            return Err(Error::Corrupt(format!(
                "pool block {} holds a {} where a {} was expected",
                p.addr,
                n.kind.name(),
                kind.name()
            )));
        }
        let n = Arc::new(n);
        self.cache.put(p.addr, (n.clone(), p.csum));
        Ok(n)
    }

    fn dirty_node(&self, addr: u64) -> Result<&Node> {
        self.dirty
            .get(&addr)
            .map(|n| &**n)
            .ok_or_else(|| internal("expected a dirty node"))
    }

    fn node_mut(&mut self, addr: u64) -> Result<&mut Node> {
        self.dirty
            .get_mut(&addr)
            .map(Arc::make_mut)
            .ok_or_else(|| internal("expected a dirty node"))
    }

    pub fn alloc_blocks(&mut self, n: u64) -> Result<u64> {
        self.alloc.alloc(n).ok_or(Error::NoSpace)
    }

    /// Allocates a block for a new node and makes it dirty (refcount 1 when shared).
    fn new_node(&mut self, n: Node) -> Result<u64> {
        let addr = self.alloc_blocks(1)?;
        if n.kind.shared() {
            self.rc_put(addr, Some(RcVal { blocks: 1, refs: 1 }));
        }
        self.dirty.insert(addr, Arc::new(n));
        Ok(addr)
    }

    /// Puts `n` in place of the committed volume-tree node `old`, which
    /// every parent drops for it: the copy takes over its reference count
    /// and children; the original is freed.
    pub fn replace_node(&mut self, old: Ptr, n: Node) -> Result<u64> {
        let rc = self.rc_must(old.addr)?;
        let addr = self.new_node(n)?;
        self.rc_put(addr, Some(rc));
        self.rc_put(old.addr, None);
        self.free_node(old.addr);
        Ok(addr)
    }

    /// Frees a node block: at once if it was never written, else after commit.
    fn free_node(&mut self, addr: u64) {
        if self.dirty.remove(&addr).is_some() {
            self.alloc.free(addr, 1);
        } else {
            self.cache.pop(&addr);
            self.pending_free.push((addr, 1));
            self.pending_free_blocks += 1;
        }
    }

    pub fn free_blocks_later(&mut self, addr: u64, n: u64) {
        self.pending_free.push((addr, n));
        self.pending_free_blocks += n;
    }

    /// The blocks freed in this transaction, for the commit that frees
    /// them.
    pub fn take_pending_free(&mut self) -> Vec<(u64, u64)> {
        self.pending_free_blocks = 0;
        std::mem::take(&mut self.pending_free)
    }

    // ---- reference counts -------------------------------------------------

    pub fn rc_get(&mut self, addr: u64) -> Result<Option<RcVal>> {
        if let Some(v) = self.rc_delta.get(&addr) {
            return Ok(*v);
        }
        let root = self.rc_root;
        Ok(self
            .get(TreeKind::Refcount, root, addr)?
            .map(|b| RcVal::decode(&b)))
    }

    pub fn rc_put(&mut self, addr: u64, v: Option<RcVal>) {
        self.rc_delta.insert(addr, v);
    }

    fn rc_must(&mut self, addr: u64) -> Result<RcVal> {
        self.rc_get(addr)?.ok_or_else(|| {
            Error::Corrupt(format!(
                "pool block {addr} is referenced but has no refcount"
            ))
        })
    }

    pub fn inc(&mut self, addr: u64) -> Result<()> {
        let mut v = self.rc_must(addr)?;
        v.refs = v
            .refs
            .checked_add(1)
            .ok_or_else(|| internal("refcount overflow"))?;
        self.rc_put(addr, Some(v));
        Ok(())
    }

    /// Drops one reference to a data extent; frees it when none remain.
    pub fn dec_extent(&mut self, e: &Extent) -> Result<()> {
        let mut v = self.rc_must(e.addr)?;
        if v.refs > 1 {
            v.refs -= 1;
            self.rc_put(e.addr, Some(v));
        } else {
            self.rc_put(e.addr, None);
            if e.is_tiered() {
                // The map entry goes at commit (its pack's bytes become
                // garbage for repack and GC), a recalled copy with it.
                let id = e.addr - TIER_BASE;
                if let Some(t) = self.tier_get(id)? {
                    if t.local != 0 {
                        self.free_blocks_later(t.local, t.blocks());
                    }
                }
                self.tier_pending.insert(id, None);
                return Ok(());
            }
            self.free_blocks_later(e.addr, v.blocks as u64);
            if e.flags & flags::DEDUP != 0 {
                self.dd_freed.push(e.addr);
            }
        }
        Ok(())
    }

    // ---- tier map ----------------------------------------------------------

    /// Where tiered object `id` lives (pending changes first).
    pub fn tier_get(&mut self, id: u64) -> Result<Option<TierEnt>> {
        if let Some(v) = self.tier_pending.get(&id) {
            return Ok(*v);
        }
        let root = self.tier_root;
        Ok(self
            .get(TreeKind::Tier, root, id)?
            .map(|b| TierEnt::decode(&b)))
    }

    /// At commit: applies the buffered tier-map changes in key order.
    pub fn apply_tier(&mut self) -> Result<()> {
        let mut root = self.tier_root;
        for (k, v) in std::mem::take(&mut self.tier_pending) {
            match v {
                Some(t) => {
                    self.insert(TreeKind::Tier, &mut root, k, &t.encode())?;
                }
                None => {
                    self.remove(TreeKind::Tier, &mut root, k)?;
                }
            }
        }
        self.tier_root = root;
        Ok(())
    }

    /// Registers a freshly written object (a data extent or a pack) with
    /// `refs` references.
    pub fn add_object(&mut self, addr: u64, blocks: u32, refs: u32) {
        self.rc_put(addr, Some(RcVal { blocks, refs }));
    }

    // ---- dedup index -------------------------------------------------------

    fn dd_get(&mut self, key: u64) -> Result<Option<DedupVal>> {
        if let Some(v) = self.dd_pending.get(&key) {
            return Ok(*v);
        }
        let root = self.dd_root;
        Ok(self
            .get(TreeKind::Dedup, root, key)?
            .map(|b| DedupVal::decode(&b)))
    }

    /// The stored chunk with this fingerprint, if the index has one whose
    /// object is still alive.
    pub fn dd_lookup(&mut self, fp: &[u8; 32]) -> Result<Option<Extent>> {
        let (key, rest) = DedupVal::split(fp);
        match self.dd_get(key)? {
            Some(v) if v.rest == rest && self.rc_get(v.ext.addr)?.is_some() => Ok(Some(v.ext)),
            _ => Ok(None),
        }
    }

    /// Indexes a newly stored chunk (`slot` numbers it inside its object).
    /// A live entry with the same key is kept: two writers storing the same
    /// new chunk at once, or (rarely) two fingerprints sharing 64 bits.
    pub fn dd_insert(&mut self, fp: &[u8; 32], ext: Extent, slot: u64) -> Result<()> {
        let (key, rest) = DedupVal::split(fp);
        if let Some(old) = self.dd_get(key)? {
            if self.rc_get(old.ext.addr)?.is_some() {
                return Ok(());
            }
        }
        self.dd_pending.insert(key, Some(DedupVal { rest, ext }));
        self.ddr_pending.insert((ext.addr << 12) | slot, Some(key));
        Ok(())
    }

    /// At commit: drops index entries of freed objects, then applies the
    /// buffered index changes in key order.
    pub fn apply_dedup(&mut self) -> Result<()> {
        for addr in std::mem::take(&mut self.dd_freed) {
            let (lo, hi) = (addr << 12, (addr + 1) << 12);
            let mut revs: BTreeMap<u64, u64> = BTreeMap::new();
            let root = self.ddr_root;
            self.range(TreeKind::DedupRev, root, lo, hi, &mut |k, v| {
                revs.insert(k, rd_u64(v, 0));
                Ok(())
            })?;
            for (k, v) in self.ddr_pending.range(lo..hi) {
                match v {
                    Some(f) => revs.insert(*k, *f),
                    None => revs.remove(k),
                };
            }
            for (rk, fk) in revs {
                self.ddr_pending.insert(rk, None);
                if self.dd_get(fk)?.is_some_and(|v| v.ext.addr == addr) {
                    self.dd_pending.insert(fk, None);
                }
            }
        }
        let mut dd: Vec<(u64, Option<DedupVal>)> = self.dd_pending.drain().collect();
        dd.sort_unstable_by_key(|(k, _)| *k);
        let mut root = self.dd_root;
        for (k, v) in dd {
            match v {
                Some(v) => {
                    self.insert(TreeKind::Dedup, &mut root, k, &v.encode())?;
                }
                None => {
                    self.remove(TreeKind::Dedup, &mut root, k)?;
                }
            }
        }
        self.dd_root = root;
        let mut root = self.ddr_root;
        for (k, v) in std::mem::take(&mut self.ddr_pending) {
            match v {
                Some(f) => {
                    self.insert(TreeKind::DedupRev, &mut root, k, &f.to_le_bytes())?;
                }
                None => {
                    self.remove(TreeKind::DedupRev, &mut root, k)?;
                }
            }
        }
        self.ddr_root = root;
        Ok(())
    }

    /// Drops one reference to a volume-tree node. Nodes whose count reaches
    /// zero are freed and their children dropped in turn: the cost is
    /// proportional to what is freed.
    pub fn dec_node(&mut self, p: Ptr) -> Result<()> {
        let mut stack = vec![p];
        while let Some(p) = stack.pop() {
            let mut v = self.rc_must(p.addr)?;
            if v.refs > 1 {
                v.refs -= 1;
                self.rc_put(p.addr, Some(v));
                continue;
            }
            let n = self.load(TreeKind::Volume, p)?;
            self.rc_put(p.addr, None);
            self.free_node(p.addr);
            for i in 0..n.len() {
                if n.is_leaf() {
                    self.dec_extent(&Extent::decode(n.val(i)))?;
                } else {
                    stack.push(n.child(i));
                }
            }
        }
        Ok(())
    }

    // ---- copy-on-write ----------------------------------------------------

    /// Returns the address of a node we may modify in place that holds what `p` holds.
    fn cow(&mut self, kind: TreeKind, p: Ptr) -> Result<u64> {
        if self.owned(kind, p.addr)? {
            return Ok(p.addr);
        }
        let old = self.load(kind, p)?;
        let copy = (*old).clone();
        if kind.shared() {
            let v = self.rc_must(p.addr)?;
            if v.refs == 1 {
                self.rc_put(p.addr, None);
                self.free_node(p.addr);
            } else {
                self.rc_put(
                    p.addr,
                    Some(RcVal {
                        refs: v.refs - 1,
                        ..v
                    }),
                );
                for i in 0..copy.len() {
                    if copy.is_leaf() {
                        self.inc(Extent::decode(copy.val(i)).addr)?;
                    } else {
                        self.inc(copy.child(i).addr)?;
                    }
                }
            }
        } else {
            self.free_node(p.addr);
        }
        self.new_node(copy)
    }

    // ---- B+tree operations ------------------------------------------------

    pub fn get(&mut self, kind: TreeKind, root: Ptr, key: u64) -> Result<Option<Vec<u8>>> {
        if root.is_null() {
            return Ok(None);
        }
        let mut p = root;
        loop {
            let n = self.load(kind, p)?;
            if n.is_leaf() {
                return Ok(n.keys.binary_search(&key).ok().map(|i| n.val(i).to_vec()));
            }
            if n.is_empty() {
                return Err(Error::Corrupt(format!(
                    "empty internal node at pool block {}",
                    p.addr
                )));
            }
            p = n.child(n.child_index(key));
        }
    }

    /// Calls `f` for every entry with `lo <= key < hi`, in key order.
    pub fn range(
        &mut self,
        kind: TreeKind,
        root: Ptr,
        lo: u64,
        hi: u64,
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        if root.is_null() || lo >= hi {
            return Ok(());
        }
        let n = self.load(kind, root)?;
        if n.is_leaf() {
            let start = n.keys.partition_point(|&k| k < lo);
            for i in start..n.len() {
                if n.keys[i] >= hi {
                    break;
                }
                f(n.keys[i], n.val(i))?;
            }
            return Ok(());
        }
        let start = if n.is_empty() { 0 } else { n.child_index(lo) };
        for i in start..n.len() {
            if n.keys[i] >= hi {
                break;
            }
            self.range(kind, n.child(i), lo, hi, f)?;
        }
        Ok(())
    }

    /// Inserts or replaces `key`; returns the previous value.
    pub fn insert(
        &mut self,
        kind: TreeKind,
        root: &mut Ptr,
        key: u64,
        val: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        if root.is_null() {
            let addr = self.new_node(Node::new(kind, 0))?;
            *root = Ptr { addr, csum: 0 };
        }
        let r = self.cow(kind, *root)?;
        *root = Ptr { addr: r, csum: 0 };
        let (split, old) = self.insert_rec(kind, r, key, val)?;
        if let Some((skey, saddr)) = split {
            let left = self.dirty_node(r)?;
            let mut n = Node::new(kind, left.level + 1);
            let first = left.keys.first().copied().unwrap_or(0);
            n.insert_at(0, first, &enc_ptr(Ptr { addr: r, csum: 0 }));
            n.insert_at(
                1,
                skey,
                &enc_ptr(Ptr {
                    addr: saddr,
                    csum: 0,
                }),
            );
            *root = Ptr {
                addr: self.new_node(n)?,
                csum: 0,
            };
        }
        Ok(old)
    }

    fn insert_rec(
        &mut self,
        kind: TreeKind,
        addr: u64,
        key: u64,
        val: &[u8],
    ) -> Result<InsertOutcome> {
        let old;
        let last_inserted;
        if self.dirty_node(addr)?.is_leaf() {
            let n = self.node_mut(addr)?;
            match n.keys.binary_search(&key) {
                Ok(i) => {
                    old = Some(n.val(i).to_vec());
                    n.set_val(i, val);
                    return Ok((None, old));
                }
                Err(i) => {
                    n.insert_at(i, key, val);
                    old = None;
                }
            }
            last_inserted = key;
        } else {
            let (i, child) = {
                let n = self.dirty_node(addr)?;
                if n.is_empty() {
                    return Err(internal("empty internal node"));
                }
                let i = n.child_index(key);
                (i, n.child(i))
            };
            let c = self.cow(kind, child)?;
            {
                let n = self.node_mut(addr)?;
                n.set_child(i, Ptr { addr: c, csum: 0 });
                if key < n.keys[i] {
                    n.keys[i] = key;
                }
            }
            let (split, o) = self.insert_rec(kind, c, key, val)?;
            old = o;
            match split {
                Some((sk, sa)) => {
                    self.node_mut(addr)?
                        .insert_at(i + 1, sk, &enc_ptr(Ptr { addr: sa, csum: 0 }));
                    last_inserted = sk;
                }
                None => return Ok((None, old)),
            }
        }
        let max_fanout = self.max_fanout;
        let n = self.node_mut(addr)?;
        let len = n.len();
        if len <= Node::capacity(kind, n.level, max_fanout) {
            return Ok((None, old));
        }
        // Appends (sequential writes) leave the left node full; others halve.
        let at = if n.keys[len - 1] == last_inserted {
            len - 1
        } else {
            len / 2
        };
        let right = n.split_off(at);
        let skey = right.keys[0];
        let ra = self.new_node(right)?;
        Ok((Some((skey, ra)), old))
    }

    /// Removes `key`; returns its value. Empty nodes are removed and a root
    /// with a single child collapses; nodes are not otherwise rebalanced.
    pub fn remove(&mut self, kind: TreeKind, root: &mut Ptr, key: u64) -> Result<Option<Vec<u8>>> {
        if root.is_null() || self.get(kind, *root, key)?.is_none() {
            return Ok(None);
        }
        let r = self.cow(kind, *root)?;
        *root = Ptr { addr: r, csum: 0 };
        let old = self.remove_rec(kind, r, key)?;
        loop {
            let n = self.dirty_node(root.addr)?;
            if n.is_empty() {
                let a = root.addr;
                self.drop_owned(kind, a);
                *root = Ptr::NULL;
                break;
            }
            if n.is_leaf() || n.len() > 1 {
                break;
            }
            let child = n.child(0);
            let a = root.addr;
            self.drop_owned(kind, a);
            *root = child;
            // Keep collapsing only through nodes we own: a shared child (a
            // snapshot reaches it too) must stay as it is.
            if !self.owned(kind, child.addr)? {
                break;
            }
        }
        Ok(old)
    }

    /// Whether we may modify or drop the node at `addr` without copying it.
    fn owned(&mut self, kind: TreeKind, addr: u64) -> Result<bool> {
        Ok(self.dirty.contains_key(&addr) && (!kind.shared() || self.rc_must(addr)?.refs == 1))
    }

    /// Frees a dirty node we own exclusively, without touching its children.
    fn drop_owned(&mut self, kind: TreeKind, addr: u64) {
        if kind.shared() {
            self.rc_put(addr, None);
        }
        self.free_node(addr);
    }

    fn remove_rec(&mut self, kind: TreeKind, addr: u64, key: u64) -> Result<Option<Vec<u8>>> {
        if self.dirty_node(addr)?.is_leaf() {
            let n = self.node_mut(addr)?;
            return Ok(match n.keys.binary_search(&key) {
                Ok(i) => {
                    let v = n.val(i).to_vec();
                    n.remove_at(i);
                    Some(v)
                }
                Err(_) => None,
            });
        }
        let (i, child) = {
            let n = self.dirty_node(addr)?;
            let i = n.child_index(key);
            (i, n.child(i))
        };
        let c = self.cow(kind, child)?;
        self.node_mut(addr)?.set_child(i, Ptr { addr: c, csum: 0 });
        let old = self.remove_rec(kind, c, key)?;
        if self.dirty_node(c)?.is_empty() {
            self.drop_owned(kind, c);
            self.node_mut(addr)?.remove_at(i);
        }
        Ok(old)
    }

    // ---- commit -----------------------------------------------------------

    /// Serializes every dirty node under `p`, children first (their
    /// checksums go into the parent). Returns `p` with its checksum.
    pub fn write_tree(
        &mut self,
        p: Ptr,
        written: &mut HashMap<u64, u32>,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<Ptr> {
        if p.is_null() {
            return Ok(p);
        }
        if let Some(c) = written.get(&p.addr) {
            return Ok(Ptr {
                addr: p.addr,
                csum: *c,
            });
        }
        let Some(node) = self.dirty.remove(&p.addr) else {
            return Ok(p);
        };
        let mut node = Arc::try_unwrap(node).unwrap_or_else(|a| (*a).clone());
        if !node.is_leaf() {
            for i in 0..node.len() {
                let c = self.write_tree(node.child(i), written, out)?;
                node.set_child(i, c);
            }
        }
        let (bytes, csum) = node.encode(p.addr, self.generation);
        written.insert(p.addr, csum);
        out.push((p.addr, bytes));
        let node = Arc::new(node);
        self.in_flight.insert(p.addr, node.clone());
        self.cache.put(p.addr, (node, csum));
        Ok(Ptr { addr: p.addr, csum })
    }

    /// Applies the buffered refcount changes to the refcount tree, in order.
    pub fn apply_rc_delta(&mut self) -> Result<()> {
        let mut delta: Vec<(u64, Option<RcVal>)> = self.rc_delta.drain().collect();
        delta.sort_unstable_by_key(|(a, _)| *a);
        let mut root = self.rc_root;
        for (addr, v) in delta {
            match v {
                Some(v) => {
                    self.insert(TreeKind::Refcount, &mut root, addr, &v.encode())?;
                }
                None => {
                    self.remove(TreeKind::Refcount, &mut root, addr)?;
                }
            }
        }
        self.rc_root = root;
        Ok(())
    }
}

/// Writes serialized blocks (sorted by address), coalescing neighbours
/// into larger writes.
pub fn write_blocks(dev: &dyn BlockDev, out: &[(u64, Vec<u8>)]) -> Result<()> {
    let mut i = 0;
    while i < out.len() {
        let start = out[i].0;
        let mut j = i;
        let mut next = start + (out[i].1.len() as u64).div_ceil(UNIT);
        while j + 1 < out.len() && out[j + 1].0 == next && next - start < 256 {
            j += 1;
            next += (out[j].1.len() as u64).div_ceil(UNIT);
        }
        if i == j {
            dev.write_at(&out[i].1, start * UNIT)?;
        } else {
            let mut buf = Vec::with_capacity(((next - start) * UNIT) as usize);
            for (_, b) in &out[i..=j] {
                buf.extend_from_slice(b);
                buf.resize(buf.len().div_ceil(UNIT as usize) * UNIT as usize, 0);
            }
            dev.write_at(&buf, start * UNIT)?;
        }
        i = j + 1;
    }
    Ok(())
}

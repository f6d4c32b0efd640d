//! What changed between two snapshots: [`Pool::diff`], for incremental
//! replication (`docs/replication.md`, "Engine support").
//!
//! The two trees are walked together. A node is immutable while any tree
//! reaches it (copy-on-write copies a shared node before changing it, and
//! an exclusively owned node is reachable from one root only), so a
//! subtree whose pointer is the same on both sides holds the same entries
//! and is skipped without being read. The walk reads only the nodes on the
//! paths to what changed: its cost follows the change, not the volume.
//!
//! The trees need not have the same shape (a node may have split at
//! another key on one side, or one tree may be a level taller): each step
//! compares two subtrees over a key range; the taller side is expanded
//! into its children, equal levels are both expanded and their children
//! paired where their key ranges overlap, and two leaves are compared
//! entry by entry over the range. Every key on either side lies in exactly
//! one leaf pair's range, so no change is left out.
//!
//! Keys are whole blocks and sub-block pieces (`PieceKey`, which sort after
//! every block key); a key whose value differs on the two sides, or that
//! one side lacks, makes its block changed, whichever kind it is.
//!
//! The walk holds the pool lock for a bounded number of steps at a time
//! and reads a missing node outside it (as `locked_no_io` does). It pins
//! the pool (`commit::Pin`: no freed block is reused while it runs), so
//! the trees it started from stay readable even when a relocation
//! (defragmentation, tiering) gives a point a new tree with the same
//! entries; at each hold it checks that both snapshots still exist, so a
//! snapshot deleted meanwhile ends the diff with an error.

use crate::error::{Error, Result};
use crate::format::*;

use super::{Inner, Pool};

/// Steps (pairs of subtrees compared) under one hold of the pool lock.
const STEPS_PER_HOLD: usize = 4096;

/// What a diff cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Tree nodes read (from the cache or the device), both sides counted.
    pub nodes_visited: u64,
    /// Changed blocks found.
    pub blocks: u64,
}

/// One side of a step: a subtree and the level its node must have.
#[derive(Clone, Copy, Debug)]
struct Side {
    ptr: Ptr,
    level: u8,
}

/// Compare the entries of `a` and `b` whose keys are in `lo..hi` (u128 so
/// the last child's range can end past every u64 key).
#[derive(Clone, Copy, Debug)]
struct Step {
    a: Option<Side>,
    b: Option<Side>,
    lo: u128,
    hi: u128,
}

/// The walk's state between holds of the pool lock.
struct Walk {
    todo: Vec<Step>,
    /// Changed blocks, as runs of blocks (first, end). The walk visits key
    /// ranges in ascending order, so block keys extend the last run and a
    /// full send is one run, not a key per block; piece keys (which sort
    /// after every block key) add runs out of order, merged at the end.
    runs: Vec<(u64, u64)>,
    /// The block size, to turn a key into its block.
    bs: u32,
    nodes: u64,
}

/// A snapshot's tree and geometry as the diff first saw it.
#[derive(Clone, Copy)]
struct Root {
    id: u64,
    /// The pool's reload count then: after a reload (a failed sync) an
    /// unflushed snapshot's id and root address may name another's.
    reloads: u64,
    root: Ptr,
    size: u64,
    block_size: u32,
}

impl Pool {
    /// The byte ranges (offset, length; whole blocks, merged, sorted,
    /// clipped to `new`'s size) where snapshot `new` may differ from
    /// snapshot `base`; with no base, everything `new` has mapped. A range
    /// may hold bytes that did not change (a block rewritten with the same
    /// bytes); no changed byte is left out. `base` may be a snapshot of
    /// another volume (a clone's origin) of the same block size;
    /// [`Error::Invalid`] if the block sizes differ, [`Error::NotFound`] if
    /// either snapshot is missing or is deleted while the diff runs. A
    /// snapshot not yet committed (just taken) is committed first.
    pub fn diff(&self, base: Option<u64>, new: u64) -> Result<Vec<(u64, u64)>> {
        Ok(self.diff_with_stats(base, new)?.0)
    }

    /// [`Pool::diff`] and what it cost (nodes read), for tests and the
    /// benchmark.
    pub fn diff_with_stats(
        &self,
        base: Option<u64>,
        new: u64,
    ) -> Result<(Vec<(u64, u64)>, DiffStats)> {
        let (b, n, _pin) = self.committed_roots(base, new)?;
        if let Some(b) = b {
            if b.block_size != n.block_size {
                return Err(Error::Invalid(format!(
                    "snapshot {} has {}-byte blocks and snapshot {} {}-byte blocks: \
                     no diff between them",
                    b.id, b.block_size, n.id, n.block_size
                )));
            }
        }
        let mut walk = Walk {
            todo: Vec::new(),
            runs: Vec::new(),
            bs: n.block_size,
            nodes: 0,
        };
        let side = |r: &Root| (!r.root.is_null()).then_some(r.root);
        let (pa, pb) = (b.as_ref().and_then(side), side(&n));
        if pa.is_some() || pb.is_some() {
            // The roots' levels are learnt when they are read.
            walk.todo.push(Step {
                a: pa.map(|ptr| Side {
                    ptr,
                    level: u8::MAX,
                }),
                b: pb.map(|ptr| Side {
                    ptr,
                    level: u8::MAX,
                }),
                lo: 0,
                hi: u64::MAX as u128 + 1,
            });
        }
        let roots: Vec<Root> = b.iter().copied().chain(std::iter::once(n)).collect();
        // The first step after a miss may read under the lock: the node
        // just read is usually in the cache, but one evicted again (a
        // small cache under load) or unreadable must not stall the walk.
        let mut after_miss = false;
        while !walk.todo.is_empty() {
            let miss = {
                let mut g = self.lock()?;
                // A point whose tree a relocation (defragmentation,
                // tiering) replaced meanwhile is fine: the pin keeps the
                // old tree, which holds the same entries, readable.
                for r in &roots {
                    if g.reloads != r.reloads || !g.snapshots.contains_key(&r.id) {
                        return Err(Error::NotFound(format!(
                            "snapshot {} (deleted, or lost to a reload after a failed sync, \
                             while a diff read it)",
                            r.id
                        )));
                    }
                }
                g.store.no_io = !std::mem::take(&mut after_miss);
                let mut r = Ok(());
                for _ in 0..STEPS_PER_HOLD {
                    if walk.todo.is_empty() {
                        break;
                    }
                    r = g.diff_step(&mut walk);
                    if r.is_err() {
                        break;
                    }
                    g.store.no_io = true;
                }
                g.store.no_io = false;
                match r {
                    Ok(()) => None,
                    Err(Error::NodeMiss) => g.store.missing.take(),
                    Err(e) => return Err(e),
                }
            };
            if let Some((kind, p)) = miss {
                // Read and verify outside the lock. A failure may be a node
                // freed and reused (the next hold finds its snapshot gone)
                // or damage (the next hold reads it under the lock and
                // reports it).
                let mut buf = vec![0u8; NODE_SIZE];
                let node = self
                    .dev()
                    .read_at(&mut buf, p.addr * UNIT)
                    .map_err(Error::from)
                    .and_then(|_| Node::decode(&buf, p.addr, p.csum));
                if let Ok(node) = node {
                    if node.kind == kind {
                        self.lock()?
                            .store
                            .cache_insert(p, std::sync::Arc::new(node));
                    }
                }
                after_miss = true;
            }
        }
        let runs = merge_runs(walk.runs);
        let stats = DiffStats {
            nodes_visited: walk.nodes,
            blocks: runs.iter().map(|&(a, b)| b - a).sum(),
        };
        Ok((run_ranges(&runs, n.block_size as u64, n.size), stats))
    }
}

impl Pool {
    /// Both snapshots' roots, committed. Nodes not yet committed carry no
    /// checksum in their parents, and a commit between two holds of the
    /// walk would move them: a snapshot taken since the last commit (the
    /// usual sender: snapshot, then diff at once) is committed first, so
    /// the walk always goes a slice at a time and reads outside the pool
    /// lock. Committed trees reach only committed nodes and never change.
    /// With them, a pin that keeps their nodes readable to the end.
    fn committed_roots(
        &self,
        base: Option<u64>,
        new: u64,
    ) -> Result<(Option<Root>, Root, super::commit::Pin<'_>)> {
        for _ in 0..4 {
            {
                let mut g = self.lock()?;
                let n = snapshot_root(&g, new)?;
                let b = base.map(|id| snapshot_root(&g, id)).transpose()?;
                let dirty = [b.map(|r| r.root), Some(n.root)]
                    .iter()
                    .flatten()
                    .any(|p| !p.is_null() && g.store.dirty.contains_key(&p.addr));
                if !dirty {
                    let pin = self.pin_locked(&mut g);
                    return Ok((b, n, pin));
                }
            }
            // A commit (on a stalled pool, the retry of the stalled one).
            self.commit()?;
        }
        Err(Error::Busy(
            "the snapshots to diff stayed uncommitted after repeated commits".into(),
        ))
    }
}

fn snapshot_root(g: &Inner, id: u64) -> Result<Root> {
    let s = g
        .snapshots
        .get(&id)
        .ok_or_else(|| Error::NotFound(format!("snapshot {id}")))?;
    Ok(Root {
        id,
        reloads: g.reloads,
        root: Ptr {
            addr: s.root,
            csum: s.root_csum,
        },
        size: s.size,
        block_size: s.block_size,
    })
}

impl Walk {
    /// Records a changed key's block.
    fn add(&mut self, key: u64) {
        let b = volume_key_span(key, self.bs).0 / self.bs as u64;
        match self.runs.last_mut() {
            Some(r) if r.0 <= b && b <= r.1 => r.1 = r.1.max(b + 1),
            _ => self.runs.push((b, b + 1)),
        }
    }
}

/// Sorts runs of blocks (first, end) and merges those that touch.
fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (a, b) in runs {
        match out.last_mut() {
            Some(r) if a <= r.1 => r.1 = r.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Sorted, merged runs of blocks as byte ranges, clipped to `size`.
fn run_ranges(runs: &[(u64, u64)], bs: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(runs.len());
    for &(a, b) in runs {
        let start = a.saturating_mul(bs);
        if start >= size {
            break;
        }
        let end = b.saturating_mul(bs).min(size);
        out.push((start, end - start));
    }
    out
}

/// A node's children with their key ranges clipped to `lo..hi` (children
/// wholly outside it left out). Child `i` holds the keys from its key to
/// the next child's; the first reaches down to `lo`, the last up to `hi`.
fn children(n: &Node, lo: u128, hi: u128) -> Vec<(Ptr, u128, u128)> {
    let len = n.len();
    let mut out = Vec::new();
    for i in 0..len {
        let clo = if i == 0 {
            lo
        } else {
            (n.keys[i] as u128).max(lo)
        };
        let chi = if i + 1 == len {
            hi
        } else {
            (n.keys[i + 1] as u128).min(hi)
        };
        if clo < chi {
            out.push((n.child(i), clo, chi));
        }
    }
    out
}

impl Inner {
    /// Takes one step of a diff walk: reads the step's nodes (a miss
    /// leaves the step in place for the retry after the read), then
    /// replaces it by its sub-steps or records the keys that differ.
    fn diff_step(&mut self, w: &mut Walk) -> Result<()> {
        let Some(&st) = w.todo.last() else {
            return Ok(());
        };
        if let (Some(a), Some(b)) = (st.a, st.b) {
            if a.ptr.addr == b.ptr.addr {
                w.todo.pop();
                return Ok(());
            }
        }
        let na = st.a.map(|s| self.diff_load(s)).transpose()?;
        let nb = st.b.map(|s| self.diff_load(s)).transpose()?;
        w.todo.pop();
        w.nodes += na.is_some() as u64 + nb.is_some() as u64;
        let level = |n: &Option<std::sync::Arc<Node>>| n.as_ref().map(|n| n.level);
        let (la, lb) = (level(&na), level(&nb));
        match (na, nb) {
            (None, None) => {}
            (Some(x), Some(y)) if x.is_leaf() && y.is_leaf() => {
                diff_leaves(&x, &y, st.lo, st.hi, &mut |k| w.add(k));
            }
            (Some(x), None) | (None, Some(x)) if x.is_leaf() => {
                for &k in x.keys.iter() {
                    if (st.lo..st.hi).contains(&(k as u128)) {
                        w.add(k);
                    }
                }
            }
            (a, b) => {
                // Expand the taller side (both when level with each other).
                let expand_a = la.is_some() && (lb.is_none() || la >= lb);
                let expand_b = lb.is_some() && (la.is_none() || lb >= la);
                let sides =
                    |n: Option<std::sync::Arc<Node>>, expand: bool, keep: Option<Side>| match (
                        n, expand,
                    ) {
                        (Some(n), true) => children(&n, st.lo, st.hi)
                            .into_iter()
                            .map(|(p, lo, hi)| {
                                let s = Side {
                                    ptr: p,
                                    level: n.level - 1,
                                };
                                (Some(s), lo, hi)
                            })
                            .collect::<Vec<_>>(),
                        _ => vec![(keep, st.lo, st.hi)],
                    };
                let xs = sides(a, expand_a, st.a);
                let ys = sides(b, expand_b, st.b);
                // Pushed in reverse, so the stack pops them in ascending
                // key order (and changed blocks extend the last run).
                let mut steps = Vec::new();
                pair_ranges(&xs, &ys, &mut steps);
                w.todo.extend(steps.into_iter().rev());
            }
        }
        Ok(())
    }

    /// Reads a node of a step, checking the level its parent promised (a
    /// corrupt tree must not send the walk round in circles).
    fn diff_load(&mut self, s: Side) -> Result<std::sync::Arc<Node>> {
        let n = self.store.load(TreeKind::Volume, s.ptr)?;
        if s.level != u8::MAX && n.level != s.level {
            return Err(Error::Corrupt(format!(
                "volume tree node at pool block {} has level {} under a parent of level {}",
                s.ptr.addr,
                n.level,
                s.level as u16 + 1
            )));
        }
        if !n.is_leaf() && n.is_empty() {
            return Err(Error::Corrupt(format!(
                "empty internal node at pool block {}",
                s.ptr.addr
            )));
        }
        Ok(n)
    }
}

type Part = (Option<Side>, u128, u128);

/// Pairs two lists of subtrees (each covering its range, ranges sorted and
/// disjoint) wherever their ranges overlap, as steps over the overlap.
fn pair_ranges(xs: &[Part], ys: &[Part], todo: &mut Vec<Step>) {
    let (mut i, mut j) = (0, 0);
    while i < xs.len() && j < ys.len() {
        let (a, alo, ahi) = xs[i];
        let (b, blo, bhi) = ys[j];
        let (lo, hi) = (alo.max(blo), ahi.min(bhi));
        if lo < hi {
            todo.push(Step { a, b, lo, hi });
        }
        if ahi <= bhi {
            i += 1;
        }
        if bhi <= ahi {
            j += 1;
        }
    }
    // A range only one side covers (possible only at the ends, where one
    // side's children stop short of the step's range).
    for &(a, lo, hi) in &xs[i..] {
        todo.push(Step { a, b: None, lo, hi });
    }
    for &(b, lo, hi) in &ys[j..] {
        todo.push(Step { a: None, b, lo, hi });
    }
}

/// Keys in `lo..hi` whose entries differ between two leaves.
fn diff_leaves(x: &Node, y: &Node, lo: u128, hi: u128, out: &mut dyn FnMut(u64)) {
    let within = |k: u64| (lo..hi).contains(&(k as u128));
    let (mut i, mut j) = (0, 0);
    while i < x.len() || j < y.len() {
        let kx = x.keys.get(i).copied();
        let ky = y.keys.get(j).copied();
        let k = match (kx, ky) {
            (Some(a), Some(b)) if a == b => {
                if x.val(i) != y.val(j) && within(a) {
                    out(a);
                }
                i += 1;
                j += 1;
                continue;
            }
            (Some(a), Some(b)) if a < b => {
                i += 1;
                a
            }
            (Some(a), None) => {
                i += 1;
                a
            }
            (_, Some(b)) => {
                j += 1;
                b
            }
            (None, None) => break,
        };
        if within(k) {
            out(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_merge_into_ranges_clipped_to_the_size() {
        let mut w = Walk {
            todo: Vec::new(),
            runs: Vec::new(),
            bs: 4096,
            nodes: 0,
        };
        // In order, then out of order (as piece keys come), repeated.
        for b in [0, 1, 2, 5, 7, 8, 1, 2, 6, 0] {
            w.add(b);
        }
        assert_eq!(w.runs.len(), 6);
        let runs = merge_runs(w.runs);
        assert_eq!(runs, vec![(0, 3), (5, 9)]);
        assert_eq!(
            run_ranges(&runs, 4096, 1 << 20),
            vec![(0, 12288), (20480, 16384)]
        );
        // The last block is partial; blocks past the end are dropped.
        assert_eq!(
            run_ranges(&[(2, 4), (9, 10)], 4096, 3 * 4096 + 100),
            vec![(8192, 4096 + 100)]
        );
        assert!(run_ranges(&[], 4096, 1 << 20).is_empty());
    }

    fn leaf(entries: &[(u64, u8)]) -> Node {
        let mut n = Node::new(TreeKind::Volume, 0);
        for (i, &(k, v)) in entries.iter().enumerate() {
            n.insert_at(i, k, &[v; Extent::SIZE]);
        }
        n
    }

    #[test]
    fn leaves_differ_by_missing_keys_and_values_within_the_range() {
        let x = leaf(&[(1, 1), (2, 2), (4, 4), (9, 9)]);
        let y = leaf(&[(2, 2), (3, 3), (4, 5), (10, 10)]);
        let mut out = Vec::new();
        diff_leaves(&x, &y, 0, 100, &mut |k| out.push(k));
        out.sort_unstable();
        assert_eq!(out, vec![1, 3, 4, 9, 10]);
        let mut out = Vec::new();
        diff_leaves(&x, &y, 3, 10, &mut |k| out.push(k));
        out.sort_unstable();
        assert_eq!(out, vec![3, 4, 9]);
    }

    #[test]
    fn ranges_of_different_splits_pair_where_they_overlap() {
        let s = |a: u64| {
            Some(Side {
                ptr: Ptr { addr: a, csum: 0 },
                level: 0,
            })
        };
        let xs = [(s(1), 0, 10), (s(2), 10, 30)];
        let ys = [(s(3), 0, 5), (s(4), 5, 20), (s(5), 20, 30)];
        let mut todo = Vec::new();
        pair_ranges(&xs, &ys, &mut todo);
        let got: Vec<(u64, u64, u128, u128)> = todo
            .iter()
            .map(|t| {
                (
                    t.a.map_or(0, |s| s.ptr.addr),
                    t.b.map_or(0, |s| s.ptr.addr),
                    t.lo,
                    t.hi,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![(1, 3, 0, 5), (1, 4, 5, 10), (2, 4, 10, 20), (2, 5, 20, 30)]
        );
    }

    /// The usual sender diffs a snapshot it has just taken (its root not
    /// yet committed). The diff must still read the nodes the cache lacks
    /// without the pool lock: the test stops it in the read of the base
    /// snapshot's (evicted) root and checks that the lock is free.
    #[test]
    fn a_diff_of_an_uncommitted_snapshot_reads_without_the_pool_lock() {
        use std::sync::Arc;

        use crate::testdev::GateDev;
        use crate::{FormatOptions, OpenOptions, Pool};

        let dev = Arc::new(GateDev::new(64 << 20));
        Pool::format(&*dev, &FormatOptions { max_fanout: 4 }).unwrap();
        let opts = OpenOptions {
            cache_nodes: 16,
            ..OpenOptions::default()
        };
        let p = Arc::new(Pool::open(dev.clone(), &opts).unwrap());
        let v = p.create_volume("v", 2 << 20, 4096).unwrap();
        p.write(v.id, 0, &vec![1; 2 << 20]).unwrap();
        let s1 = p
            .create_snapshot("v", "", serde_json::json!({}))
            .unwrap()
            .id;
        p.write(v.id, 0, &[2; 4096]).unwrap();
        p.commit().unwrap();
        // Evict the first snapshot's nodes from the small cache.
        let w = p.create_volume("w", 2 << 20, 4096).unwrap();
        p.write(w.id, 0, &vec![3; 2 << 20]).unwrap();
        p.commit().unwrap();
        p.write(v.id, 1 << 20, &[4; 4096]).unwrap();
        let s2 = p
            .create_snapshot("v", "", serde_json::json!({}))
            .unwrap()
            .id;
        let root1 = {
            let g = p.lock().unwrap();
            assert!(g.store.dirty.contains_key(&g.snapshots[&s2].root));
            g.snapshots[&s1].root
        };
        dev.arm_at(root1 * UNIT);
        let q = p.clone();
        let walker = std::thread::spawn(move || q.diff(Some(s1), s2));
        dev.wait_reached();
        let free = p.inner.try_lock().is_ok();
        dev.release();
        let d = walker.join().unwrap().unwrap();
        assert!(free, "the diff read a node while holding the pool lock");
        assert_eq!(d, vec![(0, 4096), (1 << 20, 4096)]);
    }
}

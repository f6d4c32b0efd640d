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
//! and reads missing nodes outside it (`locked_no_io`); at each hold it
//! checks that both snapshots still exist with the roots it started from,
//! so a snapshot deleted meanwhile (whose nodes may be freed and reused)
//! ends the diff with an error instead of a wrong answer.

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
    /// Changed keys (block and piece keys), in no particular order.
    keys: Vec<u64>,
    nodes: u64,
}

/// A snapshot's tree and geometry as the diff first saw it.
#[derive(Clone, Copy)]
struct Root {
    id: u64,
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
    /// either snapshot is missing or is deleted while the diff runs.
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
        let mut g = self.lock()?;
        let n = snapshot_root(&g, new)?;
        let b = base.map(|id| snapshot_root(&g, id)).transpose()?;
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
            keys: Vec::new(),
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
        // Nodes not yet committed carry no checksum in their parents, and a
        // commit between two holds would make such a saved pointer stale:
        // a snapshot taken since the last commit is walked in this one
        // hold (only its own new paths are uncommitted, so the cost still
        // follows the change). Committed trees reach only committed nodes
        // and never change, so they are walked a slice at a time.
        if [pa, pb]
            .iter()
            .flatten()
            .any(|p| g.store.dirty.contains_key(&p.addr))
        {
            while !walk.todo.is_empty() {
                g.diff_step(&mut walk)?;
            }
        }
        drop(g);
        while !walk.todo.is_empty() {
            self.locked_no_io(|g| {
                for r in b.iter().chain(std::iter::once(&n)) {
                    if g.snapshots.get(&r.id).map(|s| s.root) != Some(r.root.addr) {
                        return Err(Error::NotFound(format!(
                            "snapshot {} (deleted while a diff read it)",
                            r.id
                        )));
                    }
                }
                for _ in 0..STEPS_PER_HOLD {
                    if walk.todo.is_empty() {
                        break;
                    }
                    g.diff_step(&mut walk)?;
                }
                Ok(())
            })?;
        }
        let bs = n.block_size as u64;
        let mut blocks: Vec<u64> = walk
            .keys
            .iter()
            .map(|&k| volume_key_span(k, n.block_size).0 / bs)
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        let stats = DiffStats {
            nodes_visited: walk.nodes,
            blocks: blocks.len() as u64,
        };
        Ok((block_ranges(&blocks, bs, n.size), stats))
    }
}

fn snapshot_root(g: &Inner, id: u64) -> Result<Root> {
    let s = g
        .snapshots
        .get(&id)
        .ok_or_else(|| Error::NotFound(format!("snapshot {id}")))?;
    Ok(Root {
        id,
        root: Ptr {
            addr: s.root,
            csum: s.root_csum,
        },
        size: s.size,
        block_size: s.block_size,
    })
}

/// Merges sorted, distinct blocks into byte ranges, clipped to `size`.
fn block_ranges(blocks: &[u64], bs: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        let start = b.saturating_mul(bs);
        if start >= size {
            break;
        }
        let end = (start + bs).min(size);
        match out.last_mut() {
            Some((o, l)) if *o + *l == start => *l = end - *o,
            _ => out.push((start, end - start)),
        }
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
                diff_leaves(&x, &y, st.lo, st.hi, &mut w.keys);
            }
            (Some(x), None) | (None, Some(x)) if x.is_leaf() => {
                w.keys.extend(
                    x.keys
                        .iter()
                        .filter(|&&k| (st.lo..st.hi).contains(&(k as u128))),
                );
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
                pair_ranges(&xs, &ys, &mut w.todo);
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
fn diff_leaves(x: &Node, y: &Node, lo: u128, hi: u128, out: &mut Vec<u64>) {
    let within = |k: u64| (lo..hi).contains(&(k as u128));
    let (mut i, mut j) = (0, 0);
    while i < x.len() || j < y.len() {
        let kx = x.keys.get(i).copied();
        let ky = y.keys.get(j).copied();
        let k = match (kx, ky) {
            (Some(a), Some(b)) if a == b => {
                if x.val(i) != y.val(j) && within(a) {
                    out.push(a);
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
            out.push(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_merge_into_ranges_clipped_to_the_size() {
        assert_eq!(
            block_ranges(&[0, 1, 2, 5, 7, 8], 4096, 1 << 20),
            vec![(0, 12288), (20480, 4096), (28672, 8192)]
        );
        // The last block is partial; blocks past the end are dropped.
        assert_eq!(
            block_ranges(&[2, 3, 9], 4096, 3 * 4096 + 100),
            vec![(8192, 4096 + 100)]
        );
        assert!(block_ranges(&[], 4096, 1 << 20).is_empty());
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
        diff_leaves(&x, &y, 0, 100, &mut out);
        out.sort_unstable();
        assert_eq!(out, vec![1, 3, 4, 9, 10]);
        let mut out = Vec::new();
        diff_leaves(&x, &y, 3, 10, &mut out);
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
}

//! Read-only views of the pool's internals for fsck, scrub and space
//! accounting.

use std::collections::HashMap;

use crate::error::Result;
use crate::format::*;

use super::Inner;

/// The root of one volume or snapshot tree.
pub(crate) struct TreeRoot {
    /// `volume NAME` or `snapshot VOLUME@ID`, as reports name it.
    pub(crate) name: String,
    pub(crate) ptr: Ptr,
    pub(crate) block_size: u32,
}

impl Inner {
    /// Every volume and snapshot tree, volumes first.
    pub(crate) fn roots(&self) -> Vec<TreeRoot> {
        let mut r: Vec<TreeRoot> = self
            .volumes
            .values()
            .map(|v| TreeRoot {
                name: format!("volume {}", v.name),
                ptr: Ptr {
                    addr: v.root,
                    csum: v.root_csum,
                },
                block_size: v.block_size,
            })
            .collect();
        for s in self.snapshots.values() {
            let vname = self
                .volumes
                .get(&s.volume_id)
                .map(|v| v.name.as_str())
                .unwrap_or("?");
            r.push(TreeRoot {
                name: format!("snapshot {vname}@{}", s.id),
                ptr: Ptr {
                    addr: s.root,
                    csum: s.root_csum,
                },
                block_size: s.block_size,
            });
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
        // A stalled commit's frees wait for it to publish.
        if let Some(p) = &self.stalled {
            v.extend_from_slice(p.freed());
        }
        v
    }
    /// The intent log's slots: in use until the next commit frees them.
    pub(crate) fn log_slots(&self) -> Vec<(u64, u64)> {
        self.log.slots.iter().map(|&(a, n)| (a, n as u64)).collect()
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
            .map(|r| r.ptr)
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
            // Tiered objects take no pool blocks (their recalled copies
            // are not counted as data either).
            if !nodes.contains(&a) && !is_tier_addr(a) {
                total += b;
            }
        }
        Ok(total)
    }
}

//! Space report: logical bytes, after deduplication, after compression —
//! per volume and for the whole pool.

use std::collections::HashSet;

use serde::Serialize;

use crate::error::Result;
use crate::format::*;
use crate::pool::{Inner, Pool, TreeRoot};

/// Bytes at each stage of the data pipeline.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Reduction {
    /// Mapped blocks × block size (holes and zeros are not counted).
    pub logical_bytes: u64,
    /// Distinct chunks × block size: what dedup leaves.
    pub after_dedup_bytes: u64,
    /// Bytes those distinct chunks occupy as stored (compressed chunks
    /// rounded to their 16-byte slot, others to whole 4 KiB blocks).
    pub after_compression_bytes: u64,
}

impl Reduction {
    /// logical / stored (1.0 for an empty target).
    pub fn ratio(&self) -> f64 {
        if self.after_compression_bytes == 0 {
            1.0
        } else {
            self.logical_bytes as f64 / self.after_compression_bytes as f64
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VolumeReduction {
    pub name: String,
    /// What this volume alone would need (its own duplicates removed).
    #[serde(flatten)]
    pub bytes: Reduction,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReductionReport {
    /// Logical: every volume and snapshot as if each were a full copy.
    /// After dedup / compression: the distinct chunks all of them share.
    pub pool: Reduction,
    pub volumes: Vec<VolumeReduction>,
    /// Pool bytes holding data (packs counted whole, with chunks no longer
    /// referenced but not yet reclaimed).
    pub data_allocated_bytes: u64,
}

impl Inner {
    /// Distinct chunks reachable from `roots` (shared nodes walked once):
    /// (after dedup, after compression).
    fn distinct_chunks(&mut self, roots: &[(Ptr, u32)]) -> Result<(u64, u64)> {
        let mut seen: HashSet<u64> = HashSet::new();
        // (where the chunk's bytes are, its index in a frame, logical
        // size, stored size); the chunks of one frame share its bytes.
        let mut chunks: Vec<(u64, u8, u32, u32)> = Vec::new();
        for &(root, bs) in roots {
            if root.is_null() || !seen.insert(root.addr) {
                continue;
            }
            let mut stack = vec![root];
            while let Some(p) = stack.pop() {
                let n = self.store.load(TreeKind::Volume, p)?;
                for i in 0..n.len() {
                    if n.is_leaf() {
                        let e = Extent::decode(n.val(i));
                        chunks.push((
                            e.byte_offset(),
                            e.frame_index() as u8,
                            volume_key_span(n.keys[i], bs).1 as u32,
                            e.phys_bytes() as u32,
                        ));
                    } else {
                        let c = n.child(i);
                        if seen.insert(c.addr) {
                            stack.push(c);
                        }
                    }
                }
            }
        }
        chunks.sort_unstable_by_key(|c| (c.0, c.1));
        chunks.dedup_by_key(|c| (c.0, c.1));
        let (mut dedup, mut stored, mut last) = (0u64, 0u64, None);
        for c in &chunks {
            dedup += c.2 as u64;
            if last != Some(c.0) {
                stored += c.3 as u64;
                last = Some(c.0);
            }
        }
        Ok((dedup, stored))
    }
}

impl Pool {
    /// Computes the space report by walking the trees (metadata only) under
    /// the pool lock; memory is 16 bytes per distinct chunk of the largest
    /// set walked. Callers that poll should cache it.
    pub fn reduction(&self) -> Result<ReductionReport> {
        let mut g = self.lock()?;
        let roots = g.roots();
        let mut rep = ReductionReport::default();
        let mut all = Vec::with_capacity(roots.len());
        for TreeRoot {
            name,
            ptr: root,
            block_size: bs,
        } in &roots
        {
            rep.pool.logical_bytes += g.allocated_blocks_of(name).unwrap_or(0) * *bs as u64;
            all.push((*root, *bs));
        }
        (rep.pool.after_dedup_bytes, rep.pool.after_compression_bytes) = g.distinct_chunks(&all)?;
        for TreeRoot {
            name,
            ptr: root,
            block_size: bs,
        } in &roots
        {
            let Some(vname) = name.strip_prefix("volume ") else {
                continue;
            };
            let (d, c) = g.distinct_chunks(&[(*root, *bs)])?;
            rep.volumes.push(VolumeReduction {
                name: vname.to_string(),
                bytes: Reduction {
                    logical_bytes: g.allocated_blocks_of(name).unwrap_or(0) * *bs as u64,
                    after_dedup_bytes: d,
                    after_compression_bytes: c,
                },
            });
        }
        rep.volumes.sort_by(|a, b| a.name.cmp(&b.name));
        rep.data_allocated_bytes = g.data_object_blocks()? * UNIT;
        Ok(rep)
    }
}

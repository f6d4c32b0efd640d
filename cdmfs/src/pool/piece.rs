//! Sub-block pieces: a write of part of a mapped volume block stores only
//! the 4 KiB units it covers, as a piece read over the block's whole-block
//! extent, instead of a read-modify-write of the whole block.
//!
//! Rules (one home for each):
//! - A piece exists only over a block that has a whole-block extent, so a
//!   volume's mapped-block count, block status and the space report are
//!   those of the whole-block extents alone; a partial write into a hole
//!   writes the whole block, as before.
//! - The pieces of a block never overlap. A write that overlaps a piece
//!   partly is widened to cover it (the piece is rewritten with it, never
//!   split), so every piece is always a whole chunk: no extent names part
//!   of its stored bytes.
//! - A block holds at most [`max_pieces`] pieces; a write that would make
//!   more (or cover the whole block) writes the whole block instead,
//!   folding its pieces in. That bounds metadata at about one entry per
//!   8 KiB even under random 4 KiB writes, and reads of a block at one
//!   extent plus a few pieces.
//! - Writing or removing a block's whole-block extent drops its pieces.

use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline;

use super::intent::Action;
use super::write::{write_runs, Written};
use super::{Inner, Pool, Target};

/// A piece and the extent holding its chunk.
#[derive(Clone, Copy, Debug)]
pub(super) struct Piece {
    pub key: PieceKey,
    pub ext: Extent,
}

/// Most pieces a block may hold: half its units (4 for 32 KiB blocks, 8 for
/// the default 64 KiB), at least 1 and at most 64.
pub(super) fn max_pieces(bs: u32) -> usize {
    ((bs as u64 / UNIT) as usize / 2).clamp(1, 64)
}

impl Inner {
    /// The pieces of blocks `b0..b1` of the tree at `root`, in order.
    pub(super) fn pieces_in(&mut self, root: Ptr, b0: u64, b1: u64) -> Result<Vec<Piece>> {
        let mut out = Vec::new();
        self.store.range(
            TreeKind::Volume,
            root,
            PieceKey::first(b0),
            PieceKey::first(b1),
            &mut |k, v| {
                let key = PieceKey::decode(k).ok_or_else(|| {
                    Error::Corrupt(format!("volume key {k:#x} in the piece range"))
                })?;
                out.push(Piece {
                    key,
                    ext: Extent::decode(v),
                });
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Every piece of the tree at `root`, for fsck.
    pub(crate) fn pieces_all(&mut self, root: Ptr) -> Result<Vec<PieceKey>> {
        let mut out = Vec::new();
        self.store
            .range(TreeKind::Volume, root, PIECE_BIT, u64::MAX, &mut |k, _| {
                out.push(PieceKey::decode(k).ok_or_else(|| {
                    Error::Corrupt(format!("volume key {k:#x} in the piece range"))
                })?);
                Ok(())
            })?;
        Ok(out)
    }

    /// The pieces of blocks `b0..b1` of a target.
    pub(super) fn pieces(&mut self, t: Target, b0: u64, b1: u64) -> Result<Vec<Piece>> {
        let root = self.target(t)?.root;
        self.pieces_in(root, b0, b1)
    }

    /// Maps a piece over its block, replacing the pieces it covers (all of
    /// them wholly: the write widened itself over partial overlaps).
    pub(super) fn map_piece(&mut self, root: &mut Ptr, key: PieceKey, e: Extent) -> Result<()> {
        for p in self.pieces_in(*root, key.block, key.block + 1)? {
            if p.key.start < key.end() && key.start < p.key.end() {
                if p.key.start < key.start || p.key.end() > key.end() {
                    return Err(crate::store::internal(
                        "a piece overlaps a new piece partly",
                    ));
                }
                self.store.remove(TreeKind::Volume, root, p.key.encode())?;
                self.store.dec_extent(&p.ext)?;
            }
        }
        if let Some(old) = self
            .store
            .insert(TreeKind::Volume, root, key.encode(), &e.encode())?
        {
            self.store.dec_extent(&Extent::decode(&old))?;
        }
        Ok(())
    }

    /// Removes the pieces of blocks `b0..b1` from the tree at `root` and
    /// drops their references (their block's whole-block extent was just
    /// replaced or removed).
    pub(super) fn drop_pieces(&mut self, root: &mut Ptr, b0: u64, b1: u64) -> Result<()> {
        if b0 >= b1 {
            return Ok(());
        }
        for p in self.pieces_in(*root, b0, b1)? {
            self.store.remove(TreeKind::Volume, root, p.key.encode())?;
            self.store.dec_extent(&p.ext)?;
        }
        Ok(())
    }
}

/// What a partial write of one block becomes.
struct Plan {
    /// The piece to write: the written units, widened over pieces it
    /// overlaps partly.
    key: PieceKey,
    /// Whether the written bytes leave some of the piece's bytes to read
    /// first (unaligned edges, or a widened piece).
    needs_old: bool,
}

/// Plans a piece for bytes `a..z` (volume offsets) of block `b`, given the
/// block's pieces; None when the block must be written whole instead.
fn plan(b: u64, bs: u32, a: u64, z: u64, pieces: &[Piece]) -> Option<Plan> {
    let upb = (bs as u64 / UNIT) as u32;
    let ls = b * bs as u64;
    let (u0, u1) = (((a - ls) / UNIT) as u32, (z - ls).div_ceil(UNIT) as u32);
    let (mut p0, mut p1) = (u0, u1);
    // Widen over the pieces the write overlaps. They are sorted and
    // disjoint, so one pass in order meets every piece a widening reaches.
    for p in pieces {
        let (s, e) = (p.key.start, p.key.end());
        if s < p1 && p0 < e {
            (p0, p1) = (p0.min(s), p1.max(e));
        }
    }
    let replaced = pieces
        .iter()
        .filter(|p| p.key.start < p1 && p0 < p.key.end())
        .count();
    if p1 - p0 >= upb || pieces.len() - replaced + 1 > max_pieces(bs) {
        return None;
    }
    let (lo, hi) = (ls + p0 as u64 * UNIT, ls + p1 as u64 * UNIT);
    Some(Plan {
        key: PieceKey {
            block: b,
            start: p0,
            units: p1 - p0,
        },
        needs_old: a != lo || z != hi,
    })
}

impl Pool {
    /// Writes bytes `a..z` of block `b` of a volume (`src` holds them) as a
    /// piece if the rules above allow; false when the caller must write the
    /// whole block. The caller holds the block's range lock.
    pub(super) fn write_piece(
        &self,
        vol: u64,
        bs: u32,
        a: u64,
        z: u64,
        src: &[u8],
    ) -> Result<bool> {
        let b = a / bs as u64;
        let t = Target::Volume(vol);
        let (base, pieces) = self.locked_no_io(|g| {
            let root = g.target(t)?.root;
            let base = g.mappings(t, b, b + 1)?;
            Ok((!base.is_empty(), g.pieces_in(root, b, b + 1)?))
        })?;
        let Some(plan) = (if base {
            plan(b, bs, a, z, &pieces)
        } else {
            None
        }) else {
            return Ok(false);
        };
        let lo = plan.key.offset(bs);
        let mut chunk = vec![0u8; plan.key.bytes() as usize];
        if plan.needs_old {
            self.read_in(t, bs, lo, &mut chunk)?;
        }
        chunk[(a - lo) as usize..(z - lo) as usize].copy_from_slice(src);
        let policy = self.policy_of(vol)?;
        let (written, taken) = if policy.is_plain() {
            let addr = self.allocate(1, plan.key.units as u64)?[0];
            let e = Extent {
                addr,
                stored_len: chunk.len() as u32,
                csum: crc(&chunk),
                flags: 0,
                aux: 0,
            };
            let w = Written {
                exts: vec![(0, Some(e))],
                objects: vec![(addr, e.blocks(), 1)],
                index: Vec::new(),
                io: write_runs(&*self.dev, vec![(addr, chunk)]),
            };
            (w, Vec::new())
        } else {
            let chunk_len = plan.key.bytes() as u32;
            self.store_chunks(chunk_len, policy, vec![(0, Some(chunk))])?
        };
        let Some((_, Some(e))) = written.exts.first().copied() else {
            return Err(crate::store::internal("a piece write stored no chunk"));
        };
        self.map_written(vol, written, taken, Action::Piece(plan.key, e))?;
        Ok(true)
    }

    /// Overlays the pieces of `pieces` on `buf`, which holds the bytes at
    /// volume offset `offset` as the whole-block extents have them.
    pub(super) fn read_pieces(
        &self,
        t: Target,
        pieces: &[Piece],
        tv: &super::tier::TierView,
        bs: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        for p in pieces {
            let lo = p.key.offset(bs);
            let hi = lo + p.key.bytes();
            let (x, y) = (lo.max(offset), hi.min(end));
            if x >= y {
                continue;
            }
            // A piece of a tiered point: through the tier, decoded with
            // the pool block it was written at.
            let (mut stored, ext) = match tv.get(&p.ext.addr.wrapping_sub(TIER_BASE)) {
                Some(ent) if p.ext.is_tiered() => {
                    let b = self.tier_read(ent, &p.ext)?;
                    (b, super::tier::as_written(&p.ext, ent))
                }
                _ => {
                    let mut b = vec![0u8; p.ext.stored_len as usize];
                    self.dev.read_at(&mut b, p.ext.byte_offset())?;
                    (b, p.ext)
                }
            };
            if crc(&stored) != p.ext.csum {
                return Err(Error::DataChecksum {
                    target: match t {
                        Target::Volume(v) => format!("volume {v}"),
                        Target::Snapshot(s) => format!("snapshot {s}"),
                    },
                    offset: lo,
                    block: p.ext.addr,
                });
            }
            let plain;
            let chunk: &[u8] = if p.ext.is_plain() {
                &stored
            } else {
                plain = pipeline::decode_frame(
                    self.keys.as_deref(),
                    &ext,
                    &mut stored,
                    p.key.bytes() as usize,
                )?;
                pipeline::chunk_of(&p.ext, &plain, p.key.bytes() as usize)?
            };
            if chunk.len() as u64 != p.key.bytes() {
                return Err(Error::Corrupt(format!(
                    "piece at volume offset {lo} holds {} bytes, not {}",
                    chunk.len(),
                    p.key.bytes()
                )));
            }
            buf[(x - offset) as usize..(y - offset) as usize]
                .copy_from_slice(&chunk[(x - lo) as usize..(y - lo) as usize]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(start: u32, units: u32) -> Piece {
        Piece {
            key: PieceKey {
                block: 3,
                start,
                units,
            },
            ext: Extent {
                addr: 300,
                stored_len: units * 4096,
                csum: 0,
                flags: 0,
                aux: 0,
            },
        }
    }

    const BS: u32 = 65536;
    const B3: u64 = 3 * BS as u64;

    #[test]
    fn aligned_pages_need_no_read_and_unaligned_edges_do() {
        let p = plan(3, BS, B3 + 8192, B3 + 16384, &[]).expect("a piece");
        assert_eq!((p.key.start, p.key.units, p.needs_old), (2, 2, false));
        let p = plan(3, BS, B3 + 8000, B3 + 9000, &[]).expect("a piece");
        assert_eq!((p.key.start, p.key.units, p.needs_old), (1, 2, true));
    }

    #[test]
    fn partly_overlapped_pieces_are_widened_over_never_split() {
        // Pieces at units 2..4 and 5..7; a write of units 3..6 covers both.
        let ps = [piece(2, 2), piece(5, 2)];
        let p = plan(3, BS, B3 + 3 * 4096, B3 + 6 * 4096, &ps).expect("a piece");
        assert_eq!((p.key.start, p.key.units, p.needs_old), (2, 5, true));
        // Contained pieces are simply replaced.
        let p = plan(3, BS, B3 + 4096, B3 + 8 * 4096, &ps).expect("a piece");
        assert_eq!((p.key.start, p.key.units, p.needs_old), (1, 7, false));
    }

    #[test]
    fn too_many_pieces_or_the_whole_block_fold_into_a_block_write() {
        let ps: Vec<Piece> = (0..8).map(|i| piece(i * 2, 1)).collect();
        assert_eq!(max_pieces(BS), 8);
        // A ninth piece is refused; replacing one of the eight is not.
        assert!(plan(3, BS, B3 + 4096, B3 + 8192, &ps).is_none());
        assert!(plan(3, BS, B3, B3 + 4096, &ps).is_some());
        // Widening to the whole block is a block write.
        assert!(plan(3, BS, B3, B3 + BS as u64, &[]).is_none());
        assert_eq!(max_pieces(8192), 1);
        assert_eq!(max_pieces(1 << 20), 64);
    }
}

//! Background defragmentation of a live volume, one bounded step at a time.
//!
//! Copy-on-write puts every rewrite somewhere new, so after months of
//! incrementals a volume's logically consecutive blocks are scattered and a
//! sequential read becomes many small device reads. A step rewrites the
//! fragmented blocks of one range, in logical order, into one newly
//! allocated contiguous run, and remaps them.
//!
//! Only extents the live volume owns alone move: every node on the path
//! from its root and the extent itself have one reference (not shared with
//! a snapshot, a clone or a dedup hit). A shared extent stays in place:
//! moving it for this volume alone would keep the old copy alive for its
//! other owners and duplicate its space, and remapping every owner would
//! rewrite snapshot records, which never change. So defragmenting costs no
//! space for what the volume owns alone (the old blocks are freed with the
//! commit that follows, like any overwrite's) and never breaks sharing.
//!
//! Also left in place: blocks with pieces (their sub-block extents would
//! stay scattered anyway, and rewriting the block whole folds them, which
//! the write path does when a block gains too many), packed chunks (a pack
//! is one object shared by the chunks in it), and extents whose stored
//! bytes fail their checksum (moving would hide the damage from scrub).
//! Encrypted extents are decrypted and encrypted again, because the XTS
//! tweak is where the bytes live; everything else is copied as stored.
//!
//! A step is an ordinary write: it holds the range lock writes take, goes
//! through the stall gate (`begin_write`), re-checks under the pool lock
//! that the blocks are still mapped as it read them and still unshared (a
//! write or snapshot racing the copy wins; the copy is freed), and maps the
//! new extents with an intent-log op (`Action::Blocks`), so a flush after
//! it is durable, replay redoes it, and a crash before a flush loses only
//! the step (the old extents are freed only by a later commit).

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::{self, Cipher};

use super::intent::{Action, LogOp};
use super::{Inner, Pool, Target};

/// Most blocks one step looks at, whatever the budget: bounds how long a
/// step holds its range lock and the memory of its copy.
const MAX_STEP_BLOCKS: u64 = 4096;
/// Most bytes one step copies in one buffer.
const MAX_STEP_BYTES: u64 = 64 << 20;

/// What one [`Pool::defragment_step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefragProgress {
    /// The block the next step starts at; `blocks` when the pass is over.
    pub next_block: u64,
    /// Blocks of the volume.
    pub blocks: u64,
    /// Whether the pass reached the end of the volume.
    pub done: bool,
    /// Stored bytes rewritten by this step.
    pub bytes_moved: u64,
    /// Extents rewritten by this step.
    pub extents_moved: u64,
    /// Mapped extents of the step's range.
    pub extents: u64,
    /// Runs (extents contiguous logically and physically) of the range
    /// before and after the step.
    pub runs_before: u64,
    pub runs_after: u64,
    /// Mapped blocks of the range left in place because another tree or
    /// a dedup hit shares them.
    pub shared_blocks: u64,
    /// Blocks left in place for other reasons: pieces, packed chunks,
    /// bytes failing their checksum, a racing write or snapshot, or no
    /// contiguous free space.
    pub skipped_blocks: u64,
}

/// A mapped block as a step sees it: block, extent, owned alone.
type Entry = (u64, Extent, bool);

/// Smallest segment split further when no contiguous space holds it
/// (1 MiB in 4 KiB units).
const MIN_SPLIT_UNITS: u64 = 256;

/// What became of a segment.
enum Moved {
    /// Remapped to these extents.
    Yes(Vec<(u64, Extent)>),
    /// No contiguous free space for it.
    NoSpace,
    /// Left in place: damaged bytes, or a write or snapshot raced it.
    Left,
}

impl Pool {
    /// Rewrites the fragmented, uniquely owned blocks of
    /// `from_block..from_block + budget_bytes / block size` of a live
    /// volume into contiguous new space (see the module comment). Loop on
    /// `next_block` until `done`; each step is independent, so a caller
    /// may sleep between steps (rate limit), stop and resume later.
    pub fn defragment_step(
        &self,
        vol: u64,
        from_block: u64,
        budget_bytes: u64,
    ) -> Result<DefragProgress> {
        let (size, bs) = self.geometry(Target::Volume(vol))?;
        let bs64 = bs as u64;
        let blocks = size.div_ceil(bs64);
        let b0 = from_block.min(blocks);
        let window = (budget_bytes.min(MAX_STEP_BYTES) / bs64).clamp(1, MAX_STEP_BLOCKS);
        let b1 = (b0 + window).min(blocks);
        let mut p = DefragProgress {
            next_block: b1,
            blocks,
            done: b1 >= blocks,
            ..DefragProgress::default()
        };
        if b0 >= b1 {
            return Ok(p);
        }
        // The write path's gate: key present, pool not stalled, no commit
        // writing; and the range lock, so no write of these blocks runs
        // until the step has remapped them.
        let len = (b1 * bs64).min(size) - b0 * bs64;
        let Some((_range, _)) = self.begin_write(vol, b0 * bs64, len)? else {
            return Ok(p);
        };
        let (entries, pieces) = {
            let mut g = self.lock_writable()?;
            let root = g.target(Target::Volume(vol))?.root;
            let entries = g.defrag_scan(root, b0, b1)?;
            let pieces: HashSet<u64> = g
                .pieces_in(root, b0, b1)?
                .iter()
                .map(|x| x.key.block)
                .collect();
            (entries, pieces)
        };
        p.extents = entries.len() as u64;
        p.runs_before = count_runs(entries.iter().map(|(b, e, _)| (*b, *e)));
        let mut after: Vec<(u64, Extent)> = entries.iter().map(|(b, e, _)| (*b, *e)).collect();
        // In logical order; a segment with no contiguous free space for it
        // is split in halves (down to 1 MiB), which still merges runs.
        let mut todo = self.segments(&entries, &pieces, &mut p);
        todo.reverse();
        while let Some(seg) = todo.pop() {
            let units: u64 = seg.iter().map(|(_, e, _)| e.blocks() as u64).sum();
            match self.move_segment(vol, bs, &seg, units)? {
                Moved::Yes(moved) => {
                    p.extents_moved += moved.len() as u64;
                    p.bytes_moved += units * UNIT;
                    for (b, e) in moved {
                        if let Ok(i) = after.binary_search_by_key(&b, |x| x.0) {
                            after[i].1 = e;
                        }
                    }
                }
                Moved::NoSpace if seg.len() >= 2 && units > MIN_SPLIT_UNITS => {
                    let (a, b) = seg.split_at(seg.len() / 2);
                    for half in [b, a] {
                        if count_runs(half.iter().map(|(b, e, _)| (*b, *e))) > 1 {
                            todo.push(half.to_vec());
                        }
                    }
                }
                Moved::NoSpace | Moved::Left => p.skipped_blocks += seg.len() as u64,
            }
        }
        p.runs_after = count_runs(after.into_iter());
        let need_commit = self.lock()?.needs_commit();
        if need_commit {
            self.commit_for_memory()?;
        }
        Ok(p)
    }

    /// Splits a range's entries into the segments worth moving: maximal
    /// logically consecutive sequences of movable blocks that are not
    /// already one physical run. Counts what stays.
    fn segments(
        &self,
        entries: &[Entry],
        pieces: &HashSet<u64>,
        p: &mut DefragProgress,
    ) -> Vec<Vec<Entry>> {
        let mut out = Vec::new();
        let mut cur: Vec<Entry> = Vec::new();
        let close = |cur: &mut Vec<Entry>, out: &mut Vec<Vec<Entry>>| {
            let seg = std::mem::take(cur);
            if count_runs(seg.iter().map(|(b, e, _)| (*b, *e))) > 1 {
                out.push(seg);
            }
        };
        for &(b, e, unique) in entries {
            if !unique {
                p.shared_blocks += 1;
                close(&mut cur, &mut out);
                continue;
            }
            let encrypted_locked = e.flags & flags::ENCRYPTED != 0 && self.keys.is_none();
            if e.packed() || pieces.contains(&b) || encrypted_locked {
                p.skipped_blocks += 1;
                close(&mut cur, &mut out);
                continue;
            }
            if cur.last().is_some_and(|l| l.0 + 1 != b) {
                close(&mut cur, &mut out);
            }
            cur.push((b, e, unique));
        }
        close(&mut cur, &mut out);
        out
    }

    /// Copies one segment to a new contiguous run and remaps it, unless
    /// there is no contiguous space, its bytes are damaged or a write or
    /// snapshot raced it.
    fn move_segment(&self, vol: u64, bs: u32, seg: &[Entry], units: u64) -> Result<Moved> {
        let addr = {
            let mut g = self.lock_writable()?;
            // Data leaves the reserve to metadata (see `health.rs`); and a
            // scattered new copy would defeat the purpose.
            let hint = match seg.first() {
                Some(&(b, _, _)) if b > 0 => g.defrag_hint(vol, b - 1)?,
                _ => None,
            };
            match (g.data_free() >= units)
                .then(|| g.take_run(hint, units))
                .flatten()
            {
                Some(a) => a,
                None => {
                    tracing::debug!(vol, units, "defragment: no contiguous free space");
                    return Ok(Moved::NoSpace);
                }
            }
        };
        let copied = match self.copy_segment(seg, addr, units) {
            Ok(Some(c)) => c,
            r => {
                self.lock()?.store.alloc.free(addr, units);
                return r.map(|_| Moved::Left);
            }
        };
        let mut g = self.lock()?;
        let unchanged = match g.check_writable() {
            Ok(()) => g.defrag_unchanged(vol, seg, bs)?,
            Err(e) => {
                g.store.alloc.free(addr, units);
                return Err(e);
            }
        };
        if !unchanged {
            g.store.alloc.free(addr, units);
            return Ok(Moved::Left);
        }
        g.apply_logged(LogOp {
            vol,
            objects: copied
                .iter()
                .map(|(_, e)| (e.addr, e.blocks(), 1))
                .collect(),
            taken: Vec::new(),
            action: Action::Blocks(copied.iter().map(|(b, e)| (*b, Some(*e))).collect()),
        })?;
        Ok(Moved::Yes(copied))
    }

    /// Reads a segment's stored bytes, verifies them, re-encrypts them for
    /// their new place and writes them at `addr`; the new extents, or None
    /// when some bytes fail their checksum.
    fn copy_segment(
        &self,
        seg: &[Entry],
        addr: u64,
        units: u64,
    ) -> Result<Option<Vec<(u64, Extent)>>> {
        let mut buf = vec![0u8; (units * UNIT) as usize];
        // Read physically contiguous runs in one request each.
        let (mut i, mut off) = (0usize, 0usize);
        while i < seg.len() {
            let mut j = i;
            let mut n = seg[i].1.blocks() as u64;
            while j + 1 < seg.len() && seg[j + 1].1.addr == seg[j].1.addr + seg[j].1.blocks() as u64
            {
                j += 1;
                n += seg[j].1.blocks() as u64;
            }
            let len = (n * UNIT) as usize;
            self.dev
                .read_at(&mut buf[off..off + len], seg[i].1.addr * UNIT)?;
            off += len;
            i = j + 1;
        }
        let mut out = Vec::with_capacity(seg.len());
        let (mut off, mut at) = (0usize, addr);
        for &(b, e, _) in seg {
            let len = e.blocks() as usize * UNIT as usize;
            let stored = &mut buf[off..off + e.stored_len as usize];
            if crc(stored) != e.csum {
                tracing::warn!(
                    block = b,
                    pool_block = e.addr,
                    "defragment: stored bytes fail their checksum; left in place for scrub"
                );
                return Ok(None);
            }
            // Moved chunks leave the dedup index (like replayed ones): the
            // old object's entry goes when it is freed, and a later
            // duplicate is stored again rather than confused.
            let mut ne = Extent {
                addr: at,
                flags: e.flags & !flags::DEDUP,
                ..e
            };
            if e.flags & flags::ENCRYPTED != 0 {
                let cipher = Cipher::from_id((e.flags & flags::CIPHER_MASK) >> flags::CIPHER_SHIFT)
                    .ok_or_else(|| {
                        Error::Corrupt(format!("extent at pool block {}: unknown cipher", e.addr))
                    })?;
                let keys = self.keys.as_deref().ok_or(Error::KeyRequired)?;
                pipeline::decrypt(keys, cipher, pipeline::tweak(&e), stored);
                pipeline::encrypt(keys, cipher, pipeline::tweak(&ne), stored);
                ne.csum = crc(stored);
            }
            out.push((b, ne));
            off += len;
            at += e.blocks() as u64;
        }
        self.dev.write_at(&buf, addr * UNIT)?;
        Ok(Some(out))
    }
}

impl Inner {
    /// The mapped whole blocks of `b0..b1` under `root`, each with whether
    /// the tree owns it alone: every node on its path and the extent have
    /// one reference (a snapshot or clone shares a node, a dedup hit the
    /// extent).
    fn defrag_scan(&mut self, root: Ptr, b0: u64, b1: u64) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        if !root.is_null() && b0 < b1 {
            self.defrag_scan_node(root, false, b0, b1, &mut out)?;
        }
        Ok(out)
    }

    fn defrag_scan_node(
        &mut self,
        p: Ptr,
        shared: bool,
        b0: u64,
        b1: u64,
        out: &mut Vec<Entry>,
    ) -> Result<()> {
        let shared = shared || self.store.rc_get(p.addr)?.is_none_or(|v| v.refs != 1);
        let n = self.store.load(TreeKind::Volume, p)?;
        if n.is_leaf() {
            let start = n.keys.partition_point(|&k| k < b0);
            for i in start..n.len() {
                if n.keys[i] >= b1 {
                    break;
                }
                let e = Extent::decode(n.val(i));
                // Tiered extents are not on the pool to move.
                let alone = !shared
                    && !e.is_tiered()
                    && self
                        .store
                        .rc_get(e.addr)?
                        .is_some_and(|v| v.refs == 1 && v.blocks == e.blocks());
                out.push((n.keys[i], e, alone));
            }
            return Ok(());
        }
        let start = if n.is_empty() { 0 } else { n.child_index(b0) };
        for i in start..n.len() {
            if n.keys[i] >= b1 {
                break;
            }
            self.defrag_scan_node(n.child(i), shared, b0, b1, out)?;
        }
        Ok(())
    }

    /// Where the extent of logical block `b` ends on the pool: the place
    /// that continues its run (a step lands right after the one before, so
    /// runs grow across steps instead of breaking at each).
    fn defrag_hint(&mut self, vol: u64, b: u64) -> Result<Option<u64>> {
        let root = self.target(Target::Volume(vol))?.root;
        Ok(self
            .store
            .get(TreeKind::Volume, root, b)?
            .map(|v| Extent::decode(&v))
            .filter(|e| !e.packed())
            .map(|e| e.addr + e.blocks() as u64))
    }

    /// Takes `n` contiguous blocks for a step: right after the previous
    /// step's run if that is free, else next-fit. Then moves the next-fit
    /// cursor past the `n` blocks after the run (taken and given back), so
    /// the commits and writes in between allocate beyond them and the next
    /// step finds its place free.
    fn take_run(&mut self, hint: Option<u64>, n: u64) -> Option<u64> {
        let a = self
            .alloc_at(hint, n)
            .or_else(|| self.store.alloc.alloc(n))?;
        if let Some(x) = self.store.alloc.alloc(n) {
            self.store.alloc.free(x, n);
        }
        Some(a)
    }

    /// Takes `n` blocks at `addr` if they are all free. Free in the bitmap
    /// means unreachable from the last two superblocks, as for `alloc`.
    fn alloc_at(&mut self, addr: Option<u64>, n: u64) -> Option<u64> {
        let a = addr?;
        let end = a.checked_add(n)?;
        if a < RESERVED_BLOCKS || end > self.store.alloc.total() {
            return None;
        }
        if (a..end).any(|x| self.store.alloc.is_set(x)) {
            return None;
        }
        self.store.alloc.mark(a, n).then_some(a)
    }

    /// Whether a segment's blocks are still mapped as a step read them,
    /// owned alone and without pieces: a write or snapshot that raced the
    /// copy wins.
    fn defrag_unchanged(&mut self, vol: u64, seg: &[Entry], bs: u32) -> Result<bool> {
        let (Some(first), Some(last)) = (seg.first(), seg.last()) else {
            return Ok(false);
        };
        let t = match self.target(Target::Volume(vol)) {
            Ok(t) => t,
            Err(Error::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        if t.block_size != bs {
            return Ok(false);
        }
        let now = self.defrag_scan(t.root, first.0, last.0 + 1)?;
        Ok(now.as_slice() == seg && self.pieces_in(t.root, first.0, last.0 + 1)?.is_empty())
    }
}

/// Runs among mapped blocks in logical order: a run continues while the
/// next block is the next logical block stored right after this one.
pub(crate) fn count_runs(it: impl Iterator<Item = (u64, Extent)>) -> u64 {
    let mut runs = 0;
    let mut prev: Option<(u64, Extent)> = None;
    for (b, e) in it {
        let joined = prev.is_some_and(|(pb, pe)| {
            pb + 1 == b && !pe.packed() && !e.packed() && pe.addr + pe.blocks() as u64 == e.addr
        });
        if !joined {
            runs += 1;
        }
        prev = Some((b, e));
    }
    runs
}

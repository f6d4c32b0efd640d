//! Background defragmentation of a live volume, one bounded step at a time.
//!
//! Copy-on-write puts every rewrite somewhere new, so after months of
//! incrementals a volume's logically consecutive blocks are scattered and a
//! sequential read becomes many small device reads. A step rewrites the
//! fragmented blocks of one range, in logical order, into newly allocated
//! contiguous runs, and remaps them.
//!
//! An extent moves for every owner at once (`relocate.rs`): the volume,
//! and every snapshot and clone sharing it at the same block, are made to
//! name the new place in one commit. So sharing is kept, a pass costs no
//! space (the old blocks are freed by that commit, reusable `FREE_DELAY`
//! commits later) and defragmenting the live volume also defragments the
//! points that share its blocks, which is what a stage disk with a year
//! of daily points needs: with every point kept, the newest shares almost
//! the whole volume, and a pass that moved only what the volume owns alone
//! would move nothing.
//!
//! Left in place: extents also named from elsewhere (a dedup hit at another
//! block or in another volume: the walk over the range does not see it, so
//! the object's count is higher than the references found), blocks with
//! pieces (their sub-block extents would stay scattered anyway, and
//! rewriting the block whole folds them, which the write path does when a
//! block gains too many), packed chunks (a pack is one object shared by the
//! chunks in it), tiered extents (not on the pool), and extents whose
//! stored bytes fail their checksum (moving would hide the damage from
//! scrub). Encrypted extents are decrypted and encrypted again, because the
//! XTS tweak is where the bytes live; everything else is copied as stored.
//!
//! A step holds the range lock writes take and goes through the stall gate
//! (`begin_write`), copies outside the pool lock, then under it re-checks
//! that the blocks are still mapped as it read them (a racing write wins;
//! its copy is freed), finds the owners again (a snapshot or clone made
//! meanwhile is among them) and relocates, and commits. A crash before
//! that commit loses only the step.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::{self, Cipher};

use super::relocate::NewPlace;
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
    /// Mapped blocks of the range left in place because something the
    /// step cannot remap also names them (a dedup hit at another block or
    /// in another volume, a piece).
    pub shared_blocks: u64,
    /// Blocks left in place for other reasons: pieces, packed chunks,
    /// bytes failing their checksum, a racing write or snapshot, or no
    /// contiguous free space.
    pub skipped_blocks: u64,
}

/// A mapped block as a step sees it: block, extent, may move.
type Entry = (u64, Extent, bool);

/// A segment copied to a new run: its entries and their new extents.
struct Copy {
    seg: Vec<Entry>,
    moved: Vec<(u64, Extent)>,
}

/// Steps' worth of free space a step that cannot continue the previous
/// run looks for, so that the steps after it can continue its run.
const RUN_AHEAD: u64 = 8;

/// Fewest blocks a part of a segment placed in a hole smaller than the
/// segment must hold (shorter runs would hardly read faster than the
/// scattered blocks they replace).
const MIN_PIECE_BLOCKS: usize = 4;

/// What became of a segment.
enum Moved {
    /// Copied to these extents.
    Yes(Vec<(u64, Extent)>),
    /// No contiguous free space for it.
    NoSpace,
    /// Left in place: damaged bytes.
    Left,
}

impl Pool {
    /// Rewrites the fragmented blocks of `from_block..from_block +
    /// budget_bytes / block size` of a live volume into contiguous new
    /// space, for every owner (see the module comment). Loop on
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
            let entries = g.defrag_scan(vol, b0, b1)?;
            let root = g.target(Target::Volume(vol))?.root;
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
        let copies = self.copy_segments(vol, &entries, &pieces, &mut p)?;
        for (b, e) in self.relocate_copies(vol, b0, b1, copies, &mut p)? {
            if let Ok(i) = after.binary_search_by_key(&b, |x| x.0) {
                after[i].1 = e;
            }
        }
        p.runs_after = count_runs(after.into_iter());
        Ok(p)
    }

    /// Copies the segments worth moving to new runs, in logical order; a
    /// segment no hole holds is split to fill the longest holes (runs of
    /// at least `MIN_PIECE_BLOCKS`), which still merges runs.
    fn copy_segments(
        &self,
        vol: u64,
        entries: &[Entry],
        pieces: &HashSet<u64>,
        p: &mut DefragProgress,
    ) -> Result<Vec<Copy>> {
        let mut todo: Vec<(Vec<Entry>, Option<u64>)> = self
            .segments(entries, pieces, p)
            .into_iter()
            .rev()
            .map(|seg| (seg, None))
            .collect();
        let mut out: Vec<Copy> = Vec::new();
        while let Some((seg, at)) = todo.pop() {
            let units: u64 = seg.iter().map(|(_, e, _)| e.blocks() as u64).sum();
            // Where the run goes: the hole found for it, else right after
            // the copy of the block before it (copied earlier in this
            // step), else after that block where it is now.
            let after_prev = out.last().and_then(|c| {
                let (b, e) = c.moved.last()?;
                (seg.first()?.0 == b + 1).then(|| e.addr + e.blocks() as u64)
            });
            match self.copy_to_new_run(vol, &seg, units, at.or(after_prev))? {
                Moved::Yes(moved) => out.push(Copy { seg, moved }),
                Moved::NoSpace => {
                    // No hole holds the segment: free space is fragmented
                    // (say, by the old versions the points keep). Its first
                    // blocks go to the longest hole, if that makes a run
                    // worth having; the rest is placed after them.
                    let per = units / seg.len() as u64;
                    let hole = self.lock()?.store.alloc.longest_free(units);
                    let fit = hole.map_or(0, |(_, len)| (len / per.max(1)) as usize);
                    match hole {
                        Some((at, _)) if fit >= MIN_PIECE_BLOCKS && fit < seg.len() => {
                            let (a, b) = seg.split_at(fit);
                            for (part, at) in [(b, None), (a, Some(at))] {
                                if count_runs(part.iter().map(|(b, e, _)| (*b, *e))) > 1 {
                                    todo.push((part.to_vec(), at));
                                } else {
                                    p.skipped_blocks += part.len() as u64;
                                }
                            }
                        }
                        _ => p.skipped_blocks += seg.len() as u64,
                    }
                }
                Moved::Left => p.skipped_blocks += seg.len() as u64,
            }
        }
        Ok(out)
    }

    /// Under the pool lock: drops copies whose blocks a write changed
    /// meanwhile, relocates the rest for every owner and commits. The new
    /// extents of what moved.
    fn relocate_copies(
        &self,
        vol: u64,
        b0: u64,
        b1: u64,
        copies: Vec<Copy>,
        p: &mut DefragProgress,
    ) -> Result<Vec<(u64, Extent)>> {
        if copies.is_empty() {
            return Ok(Vec::new());
        }
        let mut g = self.lock()?;
        // `Inner::commit` must not overlap a flush's commit in flight.
        while g.committing() {
            drop(g);
            std::thread::sleep(std::time::Duration::from_millis(1));
            g = self.lock()?;
        }
        let free_all = |g: &mut Inner, copies: &[Copy]| {
            for c in copies {
                for (_, e) in &c.moved {
                    g.store.alloc.free(e.addr, e.blocks() as u64);
                }
            }
        };
        if let Err(e) = g.check_writable() {
            free_all(&mut g, &copies);
            return Err(e);
        }
        let mut keep = Vec::new();
        let mut places = HashMap::new();
        for c in copies {
            if !g.defrag_unchanged(vol, &c.seg)? {
                p.skipped_blocks += c.seg.len() as u64;
                free_all(&mut g, std::slice::from_ref(&c));
                continue;
            }
            for ((_, old, _), (_, new)) in c.seg.iter().zip(&c.moved) {
                places.insert(
                    old.addr,
                    NewPlace {
                        addr: new.addr,
                        csum: new.csum,
                        dedup: old.flags & flags::DEDUP != 0,
                    },
                );
            }
            keep.push(c);
        }
        let stay: HashSet<u64> = g.relocate(b0, b1, places)?.into_iter().collect();
        let mut out = Vec::new();
        for c in &keep {
            for ((b, old, _), (_, new)) in c.seg.iter().zip(&c.moved) {
                if stay.contains(&old.addr) {
                    g.store.alloc.free(new.addr, new.blocks() as u64);
                    p.shared_blocks += 1;
                } else {
                    out.push((*b, *new));
                    p.extents_moved += 1;
                    p.bytes_moved += new.blocks() as u64 * UNIT;
                }
            }
        }
        if !out.is_empty() {
            g.commit()?;
        }
        Ok(out)
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
        for &(b, e, movable) in entries {
            if !movable {
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
            cur.push((b, e, movable));
        }
        close(&mut cur, &mut out);
        out
    }

    /// Copies one segment to a new contiguous run (allocated, not yet
    /// referenced), unless there is no contiguous space or its bytes are
    /// damaged.
    fn copy_to_new_run(
        &self,
        vol: u64,
        seg: &[Entry],
        units: u64,
        at: Option<u64>,
    ) -> Result<Moved> {
        let addr = {
            let mut g = self.lock_writable()?;
            // Data leaves the reserve to metadata (see `health.rs`); and a
            // scattered new copy would defeat the purpose.
            let hint = match (at, seg.first()) {
                (Some(a), _) => Some(a),
                (None, Some(&(b, _, _))) if b > 0 => g.defrag_hint(vol, b - 1)?,
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
        match self.copy_segment(seg, addr, units) {
            Ok(Some(c)) => Ok(Moved::Yes(c)),
            r => {
                self.lock()?.store.alloc.free(addr, units);
                r.map(|_| Moved::Left)
            }
        }
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
    /// The volume's mapped whole blocks of `b0..b1`, each with whether it
    /// may move for every owner: its object is one whole extent on the
    /// pool, named only by the trees' entries at this block (walked over
    /// the range: see `relocate.rs`) and once in the range.
    fn defrag_scan(&mut self, vol: u64, b0: u64, b1: u64) -> Result<Vec<Entry>> {
        let mapped = self.mapped(vol, b0, b1)?;
        let mut once: HashMap<u64, u32> = HashMap::new();
        for (_, e) in &mapped {
            *once.entry(e.addr).or_insert(0) += 1;
        }
        let mut candidates = HashSet::new();
        for (_, e) in &mapped {
            if e.is_tiered() || e.packed() || once[&e.addr] != 1 {
                continue;
            }
            if self
                .store
                .rc_get(e.addr)?
                .is_some_and(|v| v.blocks == e.blocks())
            {
                candidates.insert(e.addr);
            }
        }
        let owners = self.owners(b0, b1, &candidates)?;
        let mut out = Vec::with_capacity(mapped.len());
        for (b, e) in mapped {
            let movable = candidates.contains(&e.addr)
                && self
                    .store
                    .rc_get(e.addr)?
                    .is_some_and(|v| Some(&v.refs) == owners.refs.get(&e.addr));
            out.push((b, e, movable));
        }
        Ok(out)
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
    /// step's run if that is free. Else next-fit, preferring a place with
    /// room for the next steps after it (`RUN_AHEAD` runs, taken and the
    /// tail given back), so the pass's runs chain instead of starting
    /// over in whatever hole comes next. Then moves the next-fit cursor
    /// past the `n` blocks after the run (taken and given back), so the
    /// commits and writes in between allocate beyond them and the next
    /// step finds its place free.
    fn take_run(&mut self, hint: Option<u64>, n: u64) -> Option<u64> {
        let a = match self.alloc_at(hint, n) {
            Some(a) => a,
            None => match self.store.alloc.alloc(n.saturating_mul(RUN_AHEAD)) {
                Some(a) => {
                    self.store.alloc.free(a + n, n * (RUN_AHEAD - 1));
                    a
                }
                None => self.store.alloc.alloc(n)?,
            },
        };
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
    /// without pieces: a write that raced the copy wins. (Who shares them
    /// is found again by the relocation itself.)
    fn defrag_unchanged(&mut self, vol: u64, seg: &[Entry]) -> Result<bool> {
        let (Some(first), Some(last)) = (seg.first(), seg.last()) else {
            return Ok(false);
        };
        let root = match self.target(Target::Volume(vol)) {
            Ok(t) => t.root,
            Err(Error::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let now = self.mapped(vol, first.0, last.0 + 1)?;
        Ok(now.len() == seg.len()
            && now.iter().zip(seg).all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            && self.pieces_in(root, first.0, last.0 + 1)?.is_empty())
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

//! The write side of the data path for plain volumes: range locks, the
//! write throttle, read-modify-write of partial blocks, zeroing and trim,
//! allocation, and mapping written blocks into a volume's tree.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::DataPolicy;

use super::intent::{Action, LogOp};
use super::read::check_range;
use super::{Inner, Pool, Target};

/// Blocks just written, to be mapped into a volume by [`Pool::map_blocks`].
pub(super) struct Written {
    /// Every block's new extent (`None`: a hole).
    pub(super) exts: Vec<(u64, Option<Extent>)>,
    /// New objects: (pool block, blocks, references).
    pub(super) objects: Vec<(u64, u32, u32)>,
    /// Dedup index entries to add: (fingerprint, extent, slot in its pack).
    pub(super) index: Vec<([u8; 32], Extent, u64)>,
    /// Result of the device write; the objects are allocated either way.
    pub(super) io: Result<()>,
}

/// Locks on block ranges of a volume, held by writers for read-modify-write.
pub(super) struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    cv: Condvar,
    /// Callers waiting for a range (tests wait for a writer to get here).
    waiting: AtomicUsize,
}

pub(super) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    entry: (u64, u64, u64),
}

impl RangeLocks {
    pub(super) fn new() -> RangeLocks {
        RangeLocks {
            held: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    pub(super) fn lock(&self, vol: u64, lo: u64, hi: u64) -> RangeGuard<'_> {
        let mut held = cdm_common::lock::lock(&self.held);
        let conflict =
            |h: &Vec<(u64, u64, u64)>| h.iter().any(|&(v, a, b)| v == vol && a < hi && lo < b);
        if conflict(&held) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            while conflict(&held) {
                held = cdm_common::lock::wait(&self.cv, held);
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        held.push((vol, lo, hi));
        RangeGuard {
            locks: self,
            entry: (vol, lo, hi),
        }
    }
}

impl RangeLocks {
    /// No writer holds a range (see `Pool::reload_if_failed`).
    pub(super) fn is_idle(&self) -> bool {
        cdm_common::lock::lock(&self.held).is_empty()
    }

    /// Callers waiting for a range now.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = cdm_common::lock::lock(&self.locks.held);
        if let Some(i) = held.iter().position(|e| *e == self.entry) {
            held.swap_remove(i);
        }
        self.locks.cv.notify_all();
    }
}

impl Pool {
    /// Writes `data` at `offset` of a volume. Partial blocks are read,
    /// patched and written to a new place (never overwritten in place).
    /// A sealed volume's blocks are sealed with its seal keys
    /// (`Error::KeyRequired` when they are not loaded).
    pub fn write(&self, vol: u64, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let Some((_g, bs, sealed)) = self.begin_write_sealed(vol, offset, len)? else {
            return Ok(());
        };
        if sealed {
            return self.write_sealing(vol, offset, Some(data), len, bs, false);
        }
        self.write_locked(vol, offset, Some(data), len, bs, false)
    }

    /// [`Pool::begin_write`] for callers that do not care whether the
    /// volume is sealed (they work on stored bytes).
    pub(super) fn begin_write(
        &self,
        vol: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<(RangeGuard<'_>, u32)>> {
        Ok(self
            .begin_write_sealed(vol, offset, len)?
            .map(|(g, bs, _)| (g, bs)))
    }

    /// Checks a write of `len` bytes at `offset` of a volume and locks the
    /// blocks it touches; None for an empty range. The size and block size
    /// are checked again once the range is locked: a revert (which can
    /// shrink a volume or change its block size) holds the whole volume's
    /// range, so one that ran while this waited would otherwise let the
    /// write map a block past the new end. The block size returned is the
    /// one that holds while the guard does, and with it whether the volume
    /// is sealed.
    pub(super) fn begin_write_sealed(
        &self,
        vol: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<(RangeGuard<'_>, u32, bool)>> {
        loop {
            let (size, bs) = self.geometry(Target::Volume(vol))?;
            if self.policy_of(vol)?.encryption.is_some() && self.keys.is_none() {
                return Err(Error::KeyRequired);
            }
            check_range(offset, len, size)?;
            if len == 0 {
                return Ok(None);
            }
            let bs64 = bs as u64;
            let g = self
                .ranges
                .lock(vol, offset / bs64, (offset + len - 1) / bs64 + 1);
            // Write throttle: new writes wait while a commit writes and syncs,
            // so the data a commit must sync stays bounded and a snapshot (or a
            // FLUSH) waiting behind it is not delayed by writers outpacing the
            // device. Reads, snapshots and the API are not held.
            let mut inner = self.lock_writable()?;
            while inner.committing {
                inner = self.commit_done.wait(inner).map_err(|_| Error::Failed)?;
                if inner.failed {
                    return Err(Error::Failed);
                }
                inner.check_writable()?;
            }
            let now = inner.target(Target::Volume(vol))?;
            let (size_now, bs_now) = (now.size, now.block_size);
            drop(inner);
            check_range(offset, len, size_now)?;
            if bs_now == bs {
                return Ok(Some((g, bs, now.sealed)));
            }
            // A revert changed the block size: the locked blocks are not
            // the ones the range covers now; lock again.
        }
    }

    pub(super) fn policy_of(&self, vol: u64) -> Result<DataPolicy> {
        self.lock()?
            .volumes
            .get(&vol)
            .map(|v| v.policy)
            .ok_or_else(|| Error::NotFound(format!("volume {vol}")))
    }

    /// Makes a range read as zeros, freeing whole blocks (trim and
    /// write-zeroes are the same operation here: holes read as zeros).
    /// On a sealed volume whole blocks need no keys (zeros seal to
    /// zeros); parts of blocks are rewritten through the seal keys.
    pub fn write_zeroes(&self, vol: u64, offset: u64, len: u64) -> Result<()> {
        let Some((_g, bs, sealed)) = self.begin_write_sealed(vol, offset, len)? else {
            return Ok(());
        };
        let zero = |o: u64, n: u64| {
            if sealed {
                self.write_sealing(vol, o, None, n, bs, false)
            } else {
                self.write_locked(vol, o, None, n, bs, false)
            }
        };
        let bs64 = bs as u64;
        let end = offset + len;
        let full0 = offset.div_ceil(bs64);
        let full1 = end / bs64;
        if full0 >= full1 {
            return zero(offset, len);
        }
        if offset < full0 * bs64 {
            zero(offset, full0 * bs64 - offset)?;
        }
        if end > full1 * bs64 {
            zero(full1 * bs64, end - full1 * bs64)?;
        }
        let need_commit = {
            let mut g = self.lock()?;
            g.apply_logged(LogOp {
                vol,
                objects: Vec::new(),
                taken: Vec::new(),
                action: Action::Unmap(full0, full1),
            })?;
            g.needs_commit()
        };
        if need_commit {
            self.commit_for_memory()?;
        }
        Ok(())
    }

    /// Writes zeros as allocated data (NBD `NO_HOLE`): block status reports
    /// the range as data. Copy-on-write means this cannot reserve space for
    /// later overwrites; it only keeps the range from reading as a hole.
    pub fn write_zeroes_allocated(&self, vol: u64, offset: u64, len: u64) -> Result<()> {
        let Some((_g, bs, sealed)) = self.begin_write_sealed(vol, offset, len)? else {
            return Ok(());
        };
        let bs64 = bs as u64;
        let end = offset + len;
        let chunk = (4u64 << 20).max(bs64);
        let zeros = vec![0u8; chunk as usize];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(chunk - pos % bs64);
            if sealed {
                self.write_sealing(vol, pos, None, n, bs, true)?;
            } else {
                self.write_locked(vol, pos, Some(&zeros[..n as usize]), n, bs, true)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Trim: same as [`Pool::write_zeroes`] (deallocates whole blocks).
    pub fn trim(&self, vol: u64, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(vol, offset, len)
    }

    /// The write path; the caller holds the range lock. `data` None writes
    /// zeros. All-zero blocks become holes unless `keep_zeros`.
    pub(super) fn write_locked(
        &self,
        vol: u64,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        bs: u32,
        keep_zeros: bool,
    ) -> Result<()> {
        let bs64 = bs as u64;
        // Partial blocks at either end become pieces where the rules in
        // `piece.rs` allow; what is left is written as whole blocks.
        let (lo, hi) = match (data, keep_zeros) {
            (Some(d), false) if bs64 > UNIT => self.write_edge_pieces(vol, bs, offset, d)?,
            _ => (offset, offset + len),
        };
        if lo >= hi {
            return Ok(());
        }
        let data = data.map(|d| &d[(lo - offset) as usize..(hi - offset) as usize]);
        let (offset, len) = (lo, hi - lo);
        let end = offset + len;
        let (b0, b1) = (offset / bs64, (end - 1) / bs64 + 1);
        // Compose the new contents of each block touched.
        let mut blocks: Vec<(u64, Option<Vec<u8>>)> = Vec::with_capacity((b1 - b0) as usize);
        let partial: Vec<u64> = [b0, b1 - 1]
            .into_iter()
            .filter(|&b| offset > b * bs64 || end < (b + 1) * bs64)
            .collect();
        let mut old: HashMap<u64, Vec<u8>> = HashMap::new();
        for &b in &partial {
            if let std::collections::hash_map::Entry::Vacant(e) = old.entry(b) {
                let mut cur = vec![0u8; bs as usize];
                self.read_in(Target::Volume(vol), bs, b * bs64, &mut cur)?;
                e.insert(cur);
            }
        }
        for b in b0..b1 {
            let (ls, le) = (b * bs64, (b + 1) * bs64);
            let (a, z) = (ls.max(offset), le.min(end));
            let content = match old.remove(&b) {
                Some(mut cur) => {
                    let dst = &mut cur[(a - ls) as usize..(z - ls) as usize];
                    match data {
                        Some(d) => {
                            dst.copy_from_slice(&d[(a - offset) as usize..(z - offset) as usize])
                        }
                        None => dst.fill(0),
                    }
                    cur
                }
                None => match data {
                    Some(d) => d[(a - offset) as usize..(z - offset) as usize].to_vec(),
                    None => Vec::new(),
                },
            };
            let hole = if keep_zeros {
                content.len() != bs as usize
            } else {
                content.iter().all(|&x| x == 0)
            };
            blocks.push((b, if hole { None } else { Some(content) }));
        }
        let policy = self.policy_of(vol)?;
        if !policy.is_plain() {
            return self.write_pipeline(vol, bs, policy, blocks);
        }
        // Allocate, preferably one contiguous run so the data lands sequentially.
        let units = bs64 / UNIT;
        let n = blocks.iter().filter(|(_, c)| c.is_some()).count() as u64;
        // Near the logical neighbours' extents where there is room.
        let first = blocks
            .iter()
            .find(|(_, c)| c.is_some())
            .map(|(b, _)| (vol, *b));
        let addrs = self.allocate_near(n, units, first)?;
        let mut exts: Vec<(u64, Option<Extent>)> = Vec::with_capacity(blocks.len());
        let mut objects = Vec::with_capacity(n as usize);
        let mut ai = 0;
        let mut io: Vec<(u64, Vec<u8>)> = Vec::new();
        for (b, c) in blocks {
            match c {
                Some(c) => {
                    let e = Extent {
                        addr: addrs[ai],
                        stored_len: bs,
                        csum: crc(&c),
                        flags: 0,
                        aux: 0,
                    };
                    ai += 1;
                    io.push((e.addr, c));
                    objects.push((e.addr, e.blocks(), 1));
                    exts.push((b, Some(e)));
                }
                None => exts.push((b, None)),
            }
        }
        let written = Written {
            exts,
            objects,
            index: Vec::new(),
            io: write_runs(&*self.dev, io),
        };
        self.map_blocks(vol, written, Vec::new())
    }

    /// Writes the partial blocks at the ends of a write of `d` at `offset`
    /// as pieces where possible; returns the range left to write whole.
    fn write_edge_pieces(&self, vol: u64, bs: u32, offset: u64, d: &[u8]) -> Result<(u64, u64)> {
        let bs64 = bs as u64;
        let end = offset + d.len() as u64;
        let (mut lo, mut hi) = (offset, end);
        let first = offset / bs64;
        if !offset.is_multiple_of(bs64) || end < (first + 1) * bs64 {
            let z = end.min((first + 1) * bs64);
            if self.write_piece(vol, bs, offset, z, &d[..(z - offset) as usize])? {
                lo = z;
            }
        }
        let last = (end - 1) / bs64;
        if lo < hi && !end.is_multiple_of(bs64) && last > first {
            let a = last * bs64;
            if self.write_piece(vol, bs, a, end, &d[(a - offset) as usize..])? {
                hi = a;
            }
        }
        Ok((lo, hi))
    }

    /// The last step of a whole-block write: maps the blocks (dropping
    /// their pieces) and drops what they replaced.
    pub(super) fn map_blocks(&self, vol: u64, mut w: Written, taken: Vec<Extent>) -> Result<()> {
        let exts = std::mem::take(&mut w.exts);
        self.map_written(vol, w, taken, Action::Blocks(exts))
    }

    /// The last step of every write: registers the objects just written,
    /// indexes new chunks for dedup, and applies `action` to the volume's
    /// tree (see [`Inner::apply_op`]). `taken` are dedup hits already
    /// referenced; on failure (the device write or a volume deleted
    /// meanwhile) they are released and new objects freed.
    pub(super) fn map_written(
        &self,
        vol: u64,
        w: Written,
        taken: Vec<Extent>,
        action: Action,
    ) -> Result<()> {
        let Written {
            objects, index, io, ..
        } = w;
        let need_commit = {
            let mut g = self.lock()?;
            if io.is_err() || !g.volumes.contains_key(&vol) {
                for (a, n, _) in &objects {
                    g.store.alloc.free(*a, *n as u64);
                }
                g.release_taken(taken)?;
                io?;
                return Err(Error::NotFound(format!("volume {vol}")));
            }
            for (fp, e, slot) in &index {
                g.store.dd_insert(fp, *e, *slot)?;
            }
            // The hits' references were logged when taken (`Action::Take`).
            drop(taken);
            g.apply_logged(LogOp {
                vol,
                objects,
                taken: Vec::new(),
                action,
            })?;
            g.needs_commit()
        };
        if need_commit {
            self.commit_for_memory()?;
        }
        Ok(())
    }

    /// Allocates `n` extents of `units` blocks each.
    pub(super) fn allocate(&self, n: u64, units: u64) -> Result<Vec<u64>> {
        self.allocate_near(n, units, None)
    }

    /// [`Pool::allocate`] for blocks `k..` of volume `vol` when `near` is
    /// `Some((vol, k))`: placed by `Inner::place` (in `frag.rs`).
    pub(super) fn allocate_near(
        &self,
        n: u64,
        units: u64,
        near: Option<(u64, u64)>,
    ) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        for attempt in 0..3 {
            {
                let mut g = self.lock()?;
                // Data leaves the reserve to metadata (see `health.rs`).
                let room = g.data_free() >= n * units;
                let placed = if room { g.place(near, n, units) } else { None };
                if let Some(a) = placed {
                    return Ok((0..n).map(|i| a + i * units).collect());
                }
                let mut out = Vec::with_capacity(n as usize);
                while room && (out.len() as u64) < n {
                    match g.store.alloc.alloc(units) {
                        Some(a) => out.push(a),
                        None => break,
                    }
                }
                if out.len() as u64 == n {
                    return Ok(out);
                }
                for a in out {
                    g.store.alloc.free(a, units);
                }
                if attempt == 2 {
                    if g.full_since.is_none() {
                        tracing::warn!("pool full: data writes refused until space is freed");
                        g.full_since = Some(super::now_ns() / 1_000_000_000);
                    }
                    break;
                }
                // Freed space becomes reusable only after commits: make them.
                g.ops += 1;
            }
            self.commit()?;
        }
        Err(Error::NoSpace)
    }
}

impl Inner {
    /// Drops dedup references a failed write took, and logs that.
    pub(super) fn release_taken(&mut self, taken: Vec<Extent>) -> Result<()> {
        if taken.is_empty() {
            return Ok(());
        }
        self.apply_logged(LogOp {
            vol: 0,
            objects: Vec::new(),
            taken: Vec::new(),
            action: Action::Release(taken),
        })
    }

    /// Applies a write's op and keeps it for the intent log.
    pub(super) fn apply_logged(&mut self, op: LogOp) -> Result<()> {
        self.apply_op(&op)?;
        self.log_push(op);
        self.ops += 1;
        Ok(())
    }

    /// Applies one write's effect to its volume's tree: registers its new
    /// objects and maps its blocks or piece, dropping what they replace.
    /// The write path and intent-log replay both run it, so a replayed
    /// record does exactly what the write did.
    pub(super) fn apply_op(&mut self, op: &LogOp) -> Result<()> {
        match &op.action {
            // Replay takes `op.taken` itself (the write path took them
            // before logging); nothing else to do.
            Action::Take => return Ok(()),
            Action::Release(exts) => {
                for e in exts {
                    self.store.dec_extent(e)?;
                }
                return Ok(());
            }
            _ => {}
        }
        let v = self
            .volumes
            .get(&op.vol)
            .ok_or_else(|| Error::NotFound(format!("volume {}", op.vol)))?;
        let mut root = Ptr {
            addr: v.root,
            csum: v.root_csum,
        };
        for &(a, n, r) in &op.objects {
            self.store.add_object(a, n, r);
        }
        let delta = match &op.action {
            Action::Blocks(exts) => self.map_block_exts(&mut root, exts)?,
            Action::Piece(key, e) => {
                self.map_piece(&mut root, *key, *e)?;
                0
            }
            Action::Take | Action::Release(_) => 0,
            Action::Unmap(b0, b1) => {
                let mut keys = Vec::new();
                self.store
                    .range(TreeKind::Volume, root, *b0, *b1, &mut |k, _| {
                        keys.push(k);
                        Ok(())
                    })?;
                for k in &keys {
                    if let Some(old) = self.store.remove(TreeKind::Volume, &mut root, *k)? {
                        self.store.dec_extent(&Extent::decode(&old))?;
                    }
                }
                self.drop_pieces(&mut root, *b0, *b1)?;
                -(keys.len() as i64)
            }
        };
        self.set_root(op.vol, root, delta)
    }

    /// Maps whole blocks (None: a hole), dropping what they replace and
    /// their pieces; returns the change in mapped blocks.
    fn map_block_exts(&mut self, root: &mut Ptr, exts: &[(u64, Option<Extent>)]) -> Result<i64> {
        let mut delta = 0i64;
        for (b, e) in exts {
            let prev = match e {
                Some(e) => self.store.insert(TreeKind::Volume, root, *b, &e.encode())?,
                None => self.store.remove(TreeKind::Volume, root, *b)?,
            };
            match (&prev, e) {
                (None, Some(_)) => delta += 1,
                (Some(_), None) => delta -= 1,
                _ => {}
            }
            if let Some(p) = prev {
                self.store.dec_extent(&Extent::decode(&p))?;
            }
        }
        if let (Some(lo), Some(hi)) = (exts.first(), exts.last()) {
            self.drop_pieces(root, lo.0, hi.0 + 1)?;
        }
        Ok(delta)
    }

    pub(super) fn needs_commit(&self) -> bool {
        let free = self.store.alloc.total() - self.store.alloc.used();
        let pending = self.store.pending_free_blocks;
        self.store.dirty.len() > self.dirty_limit || pending > (free / 4).max(4096)
    }
}

/// Writes data extents, coalescing physically contiguous ones.
pub(super) fn write_runs(dev: &dyn BlockDev, mut io: Vec<(u64, Vec<u8>)>) -> Result<()> {
    io.sort_unstable_by_key(|(a, _)| *a);
    let mut i = 0;
    while i < io.len() {
        let mut j = i;
        let mut next = io[i].0 + (io[i].1.len() as u64).div_ceil(UNIT);
        while j + 1 < io.len()
            && io[j + 1].0 == next
            && (io[j].1.len() as u64).is_multiple_of(UNIT)
            && j - i < 255
        {
            j += 1;
            next += (io[j].1.len() as u64).div_ceil(UNIT);
        }
        if i == j {
            dev.write_at(&io[i].1, io[i].0 * UNIT)?;
        } else {
            let total: usize = io[i..=j].iter().map(|(_, b)| b.len()).sum();
            let mut buf = Vec::with_capacity(total);
            for (_, b) in &io[i..=j] {
                buf.extend_from_slice(b);
            }
            dev.write_at(&buf, io[i].0 * UNIT)?;
        }
        i = j + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::pipeline::DataPolicy;
    use crate::testdev::MemDev;
    use crate::{FormatOptions, OpenOptions};

    use super::*;

    /// A writer that checked the size of a grown volume and then waited for
    /// the range lock a revert held must not map a block past the size the
    /// revert left (allocated, invisible to reads and diffs, visible again
    /// after a grow). The test holds the whole volume's range as the revert
    /// does, waits until the writer blocks on it, and reverts under it.
    #[test]
    fn a_write_waiting_behind_a_shrinking_revert_is_refused() {
        let dev = Arc::new(MemDev::new(32 << 20));
        Pool::format(&*dev, &FormatOptions::default()).unwrap();
        let p = Arc::new(Pool::open(dev, &OpenOptions::default()).unwrap());
        let dedup = DataPolicy {
            dedup: true,
            ..DataPolicy::default()
        };
        let v = p.create_volume_with("v", 1 << 20, 65536, dedup).unwrap();
        p.write(v.id, 0, &[1; 65536]).unwrap();
        let s = p
            .create_snapshot("v", "", serde_json::json!({}))
            .unwrap()
            .id;
        p.grow_volume("v", 2 << 20).unwrap();
        let fp = *blake3::hash(&[1; 65536]).as_bytes();
        for known in [false, true] {
            let range = p.ranges.lock(v.id, 0, u64::MAX);
            let q = p.clone();
            let writer = std::thread::spawn(move || {
                if known {
                    q.write_known(v.id, 3 << 19, &fp).map(|_| ())
                } else {
                    q.write(v.id, 3 << 19, &[2; 65536])
                }
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while p.ranges.waiting() == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the writer never waited"
                );
                std::thread::yield_now();
            }
            p.revert_locked("v", v.id, Some(s)).unwrap();
            drop(range);
            let r = writer.join().unwrap();
            assert!(
                matches!(r, Err(Error::OutOfRange { .. })),
                "known={known}: a write past the reverted size gave {r:?}"
            );
            let info = p.volume("v").unwrap();
            assert_eq!(info.size, 1 << 20);
            assert_eq!(info.allocated_bytes, 65536, "known={known}");
            // Grown again, the new space reads as zeros.
            p.grow_volume("v", 2 << 20).unwrap();
            let mut got = vec![9u8; 65536];
            p.read(Target::Volume(v.id), 3 << 19, &mut got).unwrap();
            assert!(got.iter().all(|&b| b == 0), "known={known}");
        }
        p.commit().unwrap();
        assert!(p.fsck().unwrap().is_clean());
    }
}

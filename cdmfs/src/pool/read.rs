//! The read side of the data path: mapped reads (plain extents read in
//! runs, pipeline extents decoded per frame), block status and the
//! physical map, and lookups that do no device I/O under the pool lock.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline;
use crate::store::internal;

use super::tier::{self, TierView};
use super::{Inner, PhysicalMap, Pool, Run, Target};

impl Pool {
    /// Reads `buf.len()` bytes at `offset`. Holes read as zeros; every extent
    /// is verified against its checksum.
    ///
    /// A sealed target reads through its seal keys (`Error::KeyRequired`
    /// when they are not loaded).
    pub fn read(&self, t: Target, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (size, bs, sealed) = {
            let g = self.lock()?;
            let tt = g.target(t)?;
            (tt.size, tt.block_size, tt.sealed)
        };
        check_range(offset, buf.len() as u64, size)?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some((from, to)) = self.ahead.plan(t, offset, buf.len() as u64, size) {
            // Only a hint: damage ahead is for the read that reaches it.
            if let Err(e) = self.prefetch(t, bs as u64, from, to) {
                tracing::debug!(error = %e, "read-ahead skipped");
            }
        }
        if sealed {
            return self.read_unsealing(t, size, bs, offset, buf);
        }
        self.read_in(t, bs, offset, buf)
    }

    /// Asks the device to fetch the extents that map `from..to` of `t`, in
    /// as few ranges as they allow: read-ahead in the volume's logical
    /// order, which the device's own read-ahead (in physical order) cannot
    /// follow once rewrites have scattered the extents.
    fn prefetch(&self, t: Target, bs: u64, from: u64, to: u64) -> Result<()> {
        let (b0, b1) = (from / bs, to.div_ceil(bs));
        let map = self.locked_no_io(|g| g.mappings(t, b0, b1))?;
        let mut spans: Vec<(u64, u64)> = map
            .iter()
            .filter(|(_, e)| !e.is_tiered())
            .map(|(_, e)| (e.byte_offset(), e.stored_len as u64))
            .collect();
        // In device order, extents a short gap apart (a rewritten block's
        // old place, a tree node) fetched as one: one larger request
        // costs less than two.
        spans.sort_unstable();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (o, l) in spans {
            match ranges.last_mut() {
                Some(r) if o <= r.0 + r.1 + AHEAD_GAP => r.1 = r.1.max(o + l - r.0),
                _ => ranges.push((o, l)),
            }
        }
        // One range is a sequential stretch of the pool file, which the
        // host's own read-ahead follows: hints would only add work.
        if ranges.len() > 1 {
            self.dev.will_need(&ranges);
        }
        Ok(())
    }

    /// [`Pool::read`] without the range check (a read-modify-write reads
    /// whole blocks, the last of which may pass the end of the volume):
    /// whole-block extents, then the pieces over them.
    pub(super) fn read_in(&self, t: Target, bs: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs64 = bs as u64;
        let b0 = offset / bs64;
        let b1 = (offset + buf.len() as u64 - 1) / bs64 + 1;
        let mut last_err: Option<Error> = None;
        // A tiered read that failed: the map entries it used (a repack may
        // have moved them and GC deleted the old pack meanwhile).
        let mut failed_view: Option<TierView> = None;
        for _attempt in 0..2 {
            // Blocks of one unit never have pieces: no second lookup.
            let (map, pieces, tv) = self.locked_no_io(|g| {
                let pieces = if bs64 > UNIT {
                    g.pieces(t, b0, b1)?
                } else {
                    Vec::new()
                };
                let map = g.mappings(t, b0, b1)?;
                let exts = map
                    .iter()
                    .map(|(_, e)| e)
                    .chain(pieces.iter().map(|p| &p.ext));
                let tv = tier::tier_view(g, exts)?;
                Ok((map, pieces, tv))
            })?;
            if failed_view.as_ref().is_some_and(|old| *old == tv) {
                // Nothing moved: the store itself failed.
                return Err(last_err.unwrap_or(Error::Failed));
            }
            let r = self
                .read_mapped(t, &map, &tv, bs64, offset, buf)
                .and_then(|()| self.read_pieces(t, &pieces, &tv, bs, offset, buf));
            match r {
                Ok(()) => return Ok(()),
                // The extent may have been freed and reused by a concurrent
                // write and commit: look the mapping up again once.
                Err(e @ Error::DataChecksum { .. }) => last_err = Some(e),
                Err(Error::Tier(m)) if !tv.is_empty() => {
                    failed_view = Some(tv);
                    last_err = Some(Error::Tier(m));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(Error::Failed))
    }

    pub(super) fn read_mapped(
        &self,
        t: Target,
        map: &[(u64, Extent)],
        tv: &TierView,
        bs: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        // Holes read as zeros; mapped blocks are overwritten below, so only
        // the gaps between them are cleared (not the whole buffer twice).
        let mut pos = offset;
        for (k, _) in map {
            let (ls, le) = (k * bs, k * bs + bs);
            if ls > pos {
                buf[(pos - offset) as usize..(ls.min(end) - offset) as usize].fill(0);
            }
            pos = pos.max(le.min(end));
        }
        if pos < end {
            buf[(pos - offset) as usize..].fill(0);
        }
        // Extents in the object-store tier are read through it; the rest
        // from the device below.
        let local_map: Vec<(u64, Extent)>;
        let map = if map.iter().any(|(_, e)| e.is_tiered()) {
            let (tiered, local): (Vec<_>, Vec<_>) =
                map.iter().copied().partition(|(_, e)| e.is_tiered());
            self.read_tiered(t, &tiered, tv, bs, offset, buf)?;
            local_map = local;
            &local_map[..]
        } else {
            map
        };
        // Extents scattered by copy-on-write: let the device fetch them all
        // at once rather than one synchronous read after another.
        if map.len() > 1 {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for (_, e) in map {
                let (o, l) = (e.byte_offset(), e.stored_len as u64);
                match ranges.last_mut() {
                    Some(r) if r.0 + r.1 == o => r.1 += l,
                    _ => ranges.push((o, l)),
                }
            }
            if ranges.len() > 1 {
                self.dev.will_need(&ranges);
            }
        }
        if map.iter().any(|(_, e)| !e.is_plain()) {
            self.read_pipeline(t, map, bs, offset, buf)?;
        }
        let mut i = 0;
        while i < map.len() {
            if !map[i].1.is_plain() {
                i += 1;
                continue;
            }
            // A run of logically and physically contiguous plain extents.
            let mut j = i;
            while j + 1 < map.len()
                && map[j + 1].1.is_plain()
                && map[j + 1].0 == map[j].0 + 1
                && map[j + 1].1.addr == map[j].1.addr + map[j].1.blocks() as u64
                && map[j].1.stored_len as u64 == bs
                && map[j + 1].1.stored_len as u64 == bs
                && (j + 1 - i) < 256
            {
                j += 1;
            }
            let lstart = map[i].0 * bs;
            let phys = map[i].1.addr * UNIT;
            let run_bytes = if i == j {
                map[i].1.stored_len as u64
            } else {
                (j - i + 1) as u64 * bs
            };
            let direct =
                lstart >= offset && lstart + run_bytes <= end && (i != j || run_bytes == bs);
            if direct {
                let dst =
                    &mut buf[(lstart - offset) as usize..(lstart - offset + run_bytes) as usize];
                self.dev.read_at(dst, phys)?;
                for (k, chunk) in dst.chunks(bs as usize).enumerate() {
                    verify(t, &map[i + k], chunk, bs)?;
                }
            } else {
                let mut tmp = vec![0u8; run_bytes as usize];
                self.dev.read_at(&mut tmp, phys)?;
                for (n, e) in map[i..=j].iter().enumerate() {
                    let o = n * bs as usize;
                    let stored = &tmp[o..o + e.1.stored_len as usize];
                    verify(t, e, stored, bs)?;
                    let ls = e.0 * bs;
                    let (a, b) = (ls.max(offset), (ls + bs).min(end));
                    let n = (b - a) as usize;
                    let src_off = (a - ls) as usize;
                    let avail = stored.len().saturating_sub(src_off).min(n);
                    buf[(a - offset) as usize..(a - offset) as usize + avail]
                        .copy_from_slice(&stored[src_off..src_off + avail]);
                }
            }
            i = j + 1;
        }
        Ok(())
    }

    /// Reads the tiered extents of `map` into `buf` (each verified, then
    /// decrypted with the tweak of the pool block it was written at and
    /// decompressed; the chunks of one frame decoded once).
    fn read_tiered(
        &self,
        t: Target,
        map: &[(u64, Extent)],
        tv: &TierView,
        bs: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut last: Option<((u64, u16), Vec<u8>)> = None;
        for &(k, e) in map {
            let ent = tv
                .get(&(e.addr - TIER_BASE))
                .ok_or_else(|| internal("tiered extent without its map entry"))?;
            if last.as_ref().is_none_or(|(key, _)| *key != (e.addr, e.aux)) {
                let mut stored = self.tier_read(ent, &e)?;
                verify(t, &(k, e), &stored, bs)?;
                let plain = if e.is_plain() {
                    stored
                } else {
                    let w = tier::as_written(&e, ent);
                    pipeline::decode_frame(self.keys.as_deref(), &w, &mut stored, bs as usize)?
                };
                last = Some(((e.addr, e.aux), plain));
            }
            let frame = last.as_ref().map(|(_, p)| p.as_slice()).unwrap_or(&[]);
            let plain = pipeline::chunk_of(&e, frame, bs as usize)?;
            let ls = k * bs;
            let (x, y) = (ls.max(offset), (ls + bs).min(end));
            let src = (x - ls) as usize;
            let avail = plain.len().saturating_sub(src).min((y - x) as usize);
            let dst = (x - offset) as usize;
            buf[dst..dst + avail].copy_from_slice(&plain[src..src + avail]);
            buf[dst + avail..(y - offset) as usize].fill(0);
        }
        Ok(())
    }

    /// Reads the compressed, encrypted or packed extents of `map` into
    /// `buf`: chunks close together in the pool (a pack) are read at once,
    /// each verified against its checksum, then decrypted and decompressed.
    fn read_pipeline(
        &self,
        t: Target,
        map: &[(u64, Extent)],
        bs: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut todo: Vec<usize> = (0..map.len()).filter(|&i| !map[i].1.is_plain()).collect();
        todo.sort_unstable_by_key(|&i| map[i].1.byte_offset());
        let mut last: Option<(u64, Vec<u8>)> = None;
        let mut a = 0;
        while a < todo.len() {
            let start = map[todo[a]].1.byte_offset();
            let mut stop = start + map[todo[a]].1.stored_len as u64;
            let mut b = a + 1;
            while b < todo.len() {
                let e = &map[todo[b]].1;
                let (o, l) = (e.byte_offset(), e.stored_len as u64);
                if o > stop + 65536 || (o + l).max(stop) - start > 2 * MAX_PACK {
                    break;
                }
                stop = stop.max(o + l);
                b += 1;
            }
            let mut span = vec![0u8; (stop - start) as usize];
            self.dev.read_at(&mut span, start)?;
            for &i in &todo[a..b] {
                let (k, e) = map[i];
                let o = (e.byte_offset() - start) as usize;
                // Chunks of one frame are neighbours here: decode it once.
                if last.as_ref().is_none_or(|(off, _)| *off != e.byte_offset()) {
                    let mut stored = span[o..o + e.stored_len as usize].to_vec();
                    verify(t, &map[i], &stored, bs)?;
                    let plain =
                        pipeline::decode_frame(self.keys.as_deref(), &e, &mut stored, bs as usize)?;
                    last = Some((e.byte_offset(), plain));
                }
                let frame = last.as_ref().map(|(_, p)| p.as_slice()).unwrap_or(&[]);
                let plain = pipeline::chunk_of(&e, frame, bs as usize)?;
                let ls = k * bs;
                let (x, y) = (ls.max(offset), (ls + bs).min(end));
                buf[(x - offset) as usize..(y - offset) as usize]
                    .copy_from_slice(&plain[(x - ls) as usize..(y - ls) as usize]);
            }
            a = b;
        }
        Ok(())
    }

    /// Runs `f` under the pool lock with device reads forbidden: a node
    /// missing from the cache is read and verified outside the lock, then
    /// `f` runs again. `f` must have no side effects before it can miss.
    pub(super) fn locked_no_io<T>(&self, mut f: impl FnMut(&mut Inner) -> Result<T>) -> Result<T> {
        for _ in 0..16 {
            let (kind, p) = {
                let mut g = self.lock()?;
                g.store.no_io = true;
                let r = f(&mut g);
                g.store.no_io = false;
                match r {
                    Err(Error::NodeMiss) => g
                        .store
                        .missing
                        .take()
                        .ok_or_else(|| internal("node miss without a node"))?,
                    other => return other,
                }
            };
            let mut buf = vec![0u8; NODE_SIZE];
            let node = self
                .dev
                .read_at(&mut buf, p.addr * UNIT)
                .map_err(Error::from)
                .and_then(|_| Node::decode(&buf, p.addr, p.csum));
            match node {
                Ok(n) if n.kind == kind => self.lock()?.store.cache_insert(p, Arc::new(n)),
                // Possibly freed and reused under us; the retry (or the
                // locked fallback below) tells a race from damage.
                _ => continue,
            }
        }
        f(&mut *self.lock()?)
    }

    /// Allocated and unallocated runs of `[offset, offset+len)`.
    pub fn block_status(&self, t: Target, offset: u64, len: u64) -> Result<Vec<Run>> {
        let mut g = self.lock()?;
        let tt = g.target(t)?;
        let (size, bs) = (tt.size, tt.block_size);
        check_range(offset, len, size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = bs as u64;
        let end = offset + len;
        let (b0, b1) = (offset / bs, (end - 1) / bs + 1);
        let map = g.mappings(t, b0, b1)?;
        let mut runs: Vec<Run> = Vec::new();
        let mut push = |o: u64, e: u64, allocated: bool| {
            let (o, e) = (o.max(offset), e.min(end));
            if o >= e {
                return;
            }
            match runs.last_mut() {
                Some(r) if r.allocated == allocated && r.offset + r.len == o => r.len += e - o,
                _ => runs.push(Run {
                    offset: o,
                    len: e - o,
                    allocated,
                }),
            }
        };
        let mut pos = b0;
        for (k, _) in &map {
            if *k > pos {
                push(pos * bs, k * bs, false);
            }
            push(k * bs, (k + 1) * bs, true);
            pos = k + 1;
        }
        if pos < b1 {
            push(pos * bs, b1 * bs, false);
        }
        Ok(runs)
    }

    /// Where a target's tree nodes and data extents live (pool byte
    /// offsets), for `cdmfs dump --map`, debugging and damage tests.
    pub fn physical_map(&self, t: Target) -> Result<PhysicalMap> {
        let mut g = self.lock()?;
        let tt = g.target(t)?;
        let (root, bs) = (tt.root, tt.block_size);
        let mut map = PhysicalMap::default();
        g.walk_nodes(TreeKind::Volume, root, &mut |addr, n| {
            map.nodes.push(addr * UNIT);
            if n.is_leaf() {
                for i in 0..n.len() {
                    let e = Extent::decode(n.val(i));
                    if e.is_tiered() {
                        continue; // not on the pool
                    }
                    map.extents.push((
                        volume_key_span(n.keys[i], bs).0,
                        e.byte_offset(),
                        e.stored_len,
                    ));
                }
            }
            Ok(())
        })?;
        map.extents.sort_unstable();
        Ok(map)
    }
}

impl Inner {
    /// Extents mapped for logical blocks `b0..b1`.
    pub(super) fn mappings(&mut self, t: Target, b0: u64, b1: u64) -> Result<Vec<(u64, Extent)>> {
        let root = self.target(t)?.root;
        let mut out = Vec::new();
        self.store
            .range(TreeKind::Volume, root, b0, b1, &mut |k, v| {
                out.push((k, Extent::decode(v)));
                Ok(())
            })?;
        Ok(out)
    }
}

pub(super) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(e) if e <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

fn verify(t: Target, e: &(u64, Extent), stored: &[u8], bs: u64) -> Result<()> {
    if crc(stored) != e.1.csum {
        return Err(Error::DataChecksum {
            target: match t {
                Target::Volume(v) => format!("volume {v}"),
                Target::Snapshot(s) => format!("snapshot {s}"),
            },
            offset: e.0 * bs,
            block: e.1.addr,
        });
    }
    Ok(())
}

/// Read-ahead windows grow to this (per stream): enough requests in flight
/// to keep a device busy while the reader verifies and copies.
const MAX_AHEAD: u64 = 8 << 20;
/// Read-ahead fetches extents this close together on the device in one
/// request, gap included.
const AHEAD_GAP: u64 = 128 << 10;
/// Sequential streams remembered (the least recently read is forgotten).
const STREAMS: usize = 16;
/// A read that starts this close to where a stream stopped continues it
/// (NBD clients may have a few requests in flight, served out of order).
const SLACK: u64 = 1 << 20;

/// One sequential reader of a target.
#[derive(Clone, Copy, Debug)]
struct Stream {
    t: Target,
    /// Where the stream's last read ended.
    next: u64,
    /// Logical offset up to which read-ahead has been asked for.
    ahead: u64,
    window: u64,
}

/// The sequential streams being read, to read ahead in logical order (as
/// the kernel's read-ahead does for a file): a stream's second read starts
/// a window of twice its reads, doubled on every read up to [`MAX_AHEAD`],
/// topped up when less than half of it is left ahead of the reader.
#[derive(Default)]
pub(super) struct ReadAhead(Mutex<Vec<Stream>>);

impl ReadAhead {
    /// Records a read of `len` bytes at `offset`; returns the logical
    /// range to prefetch, if any.
    pub(super) fn plan(&self, t: Target, offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        // A poisoned lock only loses read-ahead state: start afresh.
        let mut s = self.0.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            g.clear();
            g
        });
        let end = offset + len;
        let near = |x: &Stream| x.t == t && offset <= x.next + SLACK && offset + SLACK >= x.next;
        let Some(i) = s.iter().position(near) else {
            s.insert(
                0,
                Stream {
                    t,
                    next: end,
                    ahead: end,
                    window: 0,
                },
            );
            s.truncate(STREAMS);
            return None;
        };
        let mut st = s.remove(i);
        st.next = st.next.max(end);
        st.ahead = st.ahead.max(end);
        st.window = (st.window * 2).max(2 * len).min(MAX_AHEAD);
        let want = (st.next + st.window).min(size);
        let r = (want > st.ahead && st.ahead - st.next < st.window / 2).then_some((st.ahead, want));
        if let Some((_, to)) = r {
            st.ahead = to;
        }
        s.insert(0, st);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_grow_with_sequential_reads_and_random_reads_get_none() {
        let ra = ReadAhead::default();
        let t = Target::Volume(1);
        let m = 1u64 << 20;
        let size = 64 * m;
        assert_eq!(ra.plan(t, 0, m, size), None);
        assert_eq!(ra.plan(t, m, m, size), Some((2 * m, 4 * m)));
        assert_eq!(ra.plan(t, 2 * m, m, size), Some((4 * m, 7 * m)));
        assert_eq!(ra.plan(t, 3 * m, m, size), Some((7 * m, 12 * m)));
        // More than half a window is left ahead: nothing to ask yet.
        assert_eq!(ra.plan(t, 4 * m, m, size), None);
        // Another target, and a jump, are streams of their own.
        assert_eq!(ra.plan(Target::Snapshot(1), 5 * m, m, size), None);
        assert_eq!(ra.plan(t, 40 * m, m, size), None);
        // Never past the end of the target.
        assert_eq!(ra.plan(t, 41 * m, m, 43 * m), Some((42 * m, 43 * m)));
        assert_eq!(ra.plan(t, 42 * m, m, 43 * m), None);
    }
}

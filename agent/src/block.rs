//! Block backup: a block device, an image file or an NBD export copied
//! into a stage volume over NBD, reading only what is allocated
//! (`base:allocation`, or SEEK_DATA/SEEK_HOLE for files).
//!
//! Incremental runs use, in this order: the source's dirty bitmap
//! (`qemu:dirty-bitmap:NAME`, read only the dirty extents) when it is
//! offered; else the fingerprints of the last run (one BLAKE3 hash per
//! block, kept in the agent's state directory with the id of the snapshot
//! they describe), writing only blocks whose hash changed. Fingerprints are
//! trusted only if no run was cut since (`.inprogress` marker), their
//! checksum holds, and the stage volume's newest snapshot is the one they
//! name; otherwise the run compares with the stage volume's own bytes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use nbd_proto::client::{Client, ClientOptions};
use serde::Serialize;

use crate::error::{Context as _, ErrorKind, Result};
use crate::statefile::{self, hash, DecodeError, Hash, Untrusted};
use crate::throttle::Throttle;

const MAGIC: &[u8; 8] = b"CDMBF002";
const RUN: usize = 1 << 20;

pub enum Source {
    File { f: File, size: u64, sparse: bool },
    Nbd { c: Client, bitmap: Option<String> },
}

impl Source {
    /// `nbd://…`, `nbd+unix://…` or a path (image file or block device).
    pub fn open(spec: &str, bitmap: Option<&str>) -> Result<Source> {
        if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
            let ctx = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
            let opts = ClientOptions {
                contexts: ctx.iter().cloned().collect(),
                timeout: Some(std::time::Duration::from_secs(60)),
                ..Default::default()
            };
            let c = Client::connect(spec, None, &opts)
                .context_with(ErrorKind::Host, || format!("NBD source {spec}"))?;
            let bitmap = ctx.filter(|n| c.has_context(n));
            return Ok(Source::Nbd { c, bitmap });
        }
        let f = File::open(spec).context_with(ErrorKind::Io, || spec)?;
        let m = f.metadata()?;
        let (size, sparse) = if m.file_type().is_block_device() {
            (device_size(&f)?, false)
        } else if m.is_file() {
            (m.len(), true)
        } else {
            crate::fail!(Invalid, "{spec}: not a block device, a file or an NBD URI");
        };
        Ok(Source::File { f, size, sparse })
    }

    pub fn size(&self) -> u64 {
        match self {
            Source::File { size, .. } => *size,
            Source::Nbd { c, .. } => c.size,
        }
    }

    pub fn bitmap(&self) -> Option<&str> {
        match self {
            Source::Nbd { bitmap, .. } => bitmap.as_deref(),
            _ => None,
        }
    }

    /// (offset, length, allocated) runs covering `[0, size)`.
    pub fn allocation(&mut self) -> Result<Vec<(u64, u64, bool)>> {
        let size = self.size();
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |o: u64, l: u64, a: bool| {
            if l == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.2 == a && last.0 + last.1 == o => last.1 += l,
                _ => out.push((o, l, a)),
            }
        };
        match self {
            Source::File { sparse: false, .. } => push(0, size, true),
            Source::File { f, .. } => {
                let fd = f.as_raw_fd();
                let mut off = 0u64;
                while off < size {
                    // SAFETY: lseek on an open descriptor.
                    let data = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
                    if data < 0 {
                        push(off, size - off, false);
                        break;
                    }
                    let data = data as u64;
                    push(off, data - off, false);
                    // SAFETY: as above.
                    let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
                    let hole = if hole < 0 {
                        size
                    } else {
                        (hole as u64).min(size)
                    };
                    push(data, hole - data, true);
                    off = hole;
                }
            }
            Source::Nbd { c, .. } => walk_status(
                size,
                "block status",
                |o, l| c.block_status(o, l),
                |o, l, flags| push(o, l, flags & 1 == 0),
            )?,
        }
        Ok(out)
    }

    /// (offset, length) runs the dirty bitmap marks.
    pub fn dirty(&mut self) -> Result<Vec<(u64, u64)>> {
        let Source::Nbd { c, bitmap: Some(b) } = self else {
            crate::fail!(Host, "no dirty bitmap");
        };
        let size = c.size;
        let mut out: Vec<(u64, u64)> = Vec::new();
        walk_status(
            size,
            "dirty bitmap",
            |o, l| c.block_status_of(b, o, l),
            |off, len, flags| {
                if flags & 1 != 0 {
                    match out.last_mut() {
                        Some(l) if l.0 + l.1 == off => l.1 += len,
                        _ => out.push((off, len)),
                    }
                }
            },
        )?;
        Ok(out)
    }

    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::File { f, .. } => f
                .read_exact_at(buf, off)
                .context_with(ErrorKind::Host, || format!("source read at {off}")),
            Source::Nbd { c, .. } => c
                .read(off, buf)
                .context_with(ErrorKind::Host, || format!("NBD source read at {off}")),
        }
    }
}

/// The size of the block device open as `f` (BLKGETSIZE64).
pub fn device_size(f: &File) -> std::io::Result<u64> {
    let mut sz: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    if unsafe { libc::ioctl(f.as_raw_fd(), 0x80081272, &mut sz) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sz)
}

/// Walks an NBD metadata context over `[0, size)`: `status(offset, len)`
/// answers runs of (length, flags), `each(offset, length, flags)` sees
/// them in order. Empty answers and zero-length runs are errors (a server
/// could make this loop forever).
fn walk_status(
    size: u64,
    what: &str,
    mut status: impl FnMut(u64, u64) -> Result<Vec<(u64, u32)>, nbd_proto::client::ClientError>,
    mut each: impl FnMut(u64, u64, u32),
) -> Result<()> {
    let mut off = 0u64;
    while off < size {
        let st = status(off, size - off)
            .context_with(ErrorKind::Host, || format!("NBD source {what}"))?;
        if st.is_empty() {
            crate::fail!(Host, "NBD source sent an empty {what}");
        }
        for (len, flags) in st {
            if len == 0 {
                crate::fail!(Host, "NBD source sent a zero-length {what} extent");
            }
            let len = len.min(size - off);
            each(off, len, flags);
            off += len;
            if off >= size {
                break;
            }
        }
    }
    Ok(())
}

/// The fingerprints of the last block backup of a volume.
#[derive(Clone, Debug, PartialEq)]
pub struct Fingerprints {
    pub block_size: u32,
    pub snapshot: u64,
    pub size: u64,
    /// The dirty bitmap the source offered when these were made: a later
    /// run may read only its dirty extents if it is still the same one
    /// (it then holds every write since).
    pub bitmap: Option<String>,
    pub hashes: Vec<Hash>,
}

impl Fingerprints {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = statefile::Writer::new(MAGIC, 32 + self.hashes.len() * 16);
        w.u32(self.block_size);
        w.u64(self.snapshot);
        w.u64(self.size);
        let bm = self.bitmap.as_deref().unwrap_or("").as_bytes();
        w.u32(bm.len() as u32);
        w.bytes(bm);
        w.u64(self.hashes.len() as u64);
        w.hashes(&self.hashes);
        w.finish()
    }

    /// Parses outside bytes (a state file anyone could have touched).
    pub fn decode(b: &[u8]) -> Result<Fingerprints, DecodeError> {
        let mut r = statefile::Reader::open(b, MAGIC, 4 + 8 + 8 + 4 + 8, "block fingerprint file")?;
        let block_size = r.u32()?;
        let (snapshot, size) = (r.u64()?, r.u64()?);
        let bl = r.u32()? as usize;
        let bm = r.take(bl)?;
        let bitmap = if bl == 0 {
            None
        } else {
            Some(
                String::from_utf8(bm.to_vec())
                    .map_err(|_| DecodeError::Invalid("bitmap name is not UTF-8"))?,
            )
        };
        let n = r.u64()?;
        if n.checked_mul(16) != Some(r.remaining() as u64) {
            return Err(DecodeError::Invalid("hash count does not match"));
        }
        let hashes = r.hashes(n)?;
        r.finish()?;
        Ok(Fingerprints {
            block_size,
            snapshot,
            size,
            bitmap,
            hashes,
        })
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BlockStats {
    /// `full`, `dirty-bitmap`, `fingerprints` or `compare`.
    pub mode: String,
    pub fingerprints: String,
    pub size: u64,
    pub block_size: u32,
    pub allocated_bytes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub blocks: u64,
    pub changed_blocks: u64,
    pub throttled_seconds: f64,
}

pub struct Paths {
    pub fp: PathBuf,
    pub marker: PathBuf,
}

impl Paths {
    pub fn new(state: &Path, volume: &str) -> Paths {
        let d = state.join("block");
        Paths {
            fp: d.join(format!("{volume}.fp")),
            marker: d.join(format!("{volume}.inprogress")),
        }
    }
}

/// The last fingerprints if they can be trusted for a stage whose newest
/// snapshot is `latest`; else why not.
pub fn load(
    p: &Paths,
    block_size: u32,
    size: u64,
    latest: Option<u64>,
) -> Result<Fingerprints, Untrusted> {
    let b = statefile::read_unless_cut(&p.marker, &p.fp)?;
    let f = Fingerprints::decode(&b)?;
    if f.block_size != block_size || f.size != size {
        return Err(Untrusted::OtherGeometry);
    }
    if Some(f.snapshot) != latest {
        return Err(Untrusted::OtherSnapshot {
            have: f.snapshot,
            latest,
        });
    }
    Ok(f)
}

pub struct Copy<'a> {
    pub src: &'a mut Source,
    pub stage: &'a mut Client,
    pub block_size: u32,
    pub throttle: &'a mut Throttle,
    pub progress: Option<&'a indicatif::ProgressBar>,
    /// The stage holds only zeros (a new volume).
    pub stage_blank: bool,
}

/// The source's shape in blocks, and the zero hashes to compare against.
struct Geometry {
    size: u64,
    bs: u64,
    nblocks: usize,
    full_zero: Hash,
}

impl Geometry {
    fn new(size: u64, block_size: u32) -> Geometry {
        let bs = block_size as u64;
        Geometry {
            size,
            bs,
            nblocks: size.div_ceil(bs) as usize,
            full_zero: hash(&vec![0u8; bs as usize]),
        }
    }
    /// Length of block `i` (the last one may be short).
    fn blen(&self, i: usize) -> usize {
        ((self.size - i as u64 * self.bs).min(self.bs)) as usize
    }
    /// Hash of block `i` when it holds only zeros.
    fn zero_hash(&self, i: usize) -> Hash {
        if self.blen(i) == self.bs as usize {
            self.full_zero
        } else {
            hash(&vec![0u8; self.blen(i)])
        }
    }
    /// Marks the blocks the byte range `o..o+l` touches.
    fn mark(&self, look: &mut [bool], o: u64, l: u64) {
        let (a, b) = (
            (o / self.bs) as usize,
            ((o + l).div_ceil(self.bs) as usize).min(self.nblocks),
        );
        for x in look.iter_mut().take(b).skip(a) {
            *x = true;
        }
    }
    /// Whether any byte of block `i` is allocated in the source.
    fn allocated(&self, i: usize, alloc: &[(u64, u64, bool)]) -> bool {
        let (s, e) = (
            i as u64 * self.bs,
            (i as u64 * self.bs + self.bs).min(self.size),
        );
        alloc.iter().any(|&(o, l, a)| a && o < e && o + l > s)
    }
}

/// A run of looked-at blocks `i..j` starting at byte `off`, `len` bytes.
struct Run {
    i: usize,
    j: usize,
    off: u64,
    len: usize,
}

impl Copy<'_> {
    /// Copies; the new hashes (the caller saves them once the snapshot is
    /// taken) and what was done.
    pub fn run(
        &mut self,
        old: Option<Fingerprints>,
        why: String,
    ) -> Result<(Vec<Hash>, BlockStats)> {
        let size = self.src.size();
        if self.stage.size < size {
            crate::fail!(Host, "the stage volume ({} bytes) is smaller than the source ({size} bytes): grow it first", self.stage.size);
        }
        let g = Geometry::new(size, self.block_size);
        let bs = g.bs;
        let alloc = self.src.allocation()?;
        let mut st = BlockStats {
            size,
            block_size: self.block_size,
            allocated_bytes: alloc.iter().filter(|a| a.2).map(|a| a.1).sum(),
            fingerprints: old
                .as_ref()
                .map(|_| "trusted".to_string())
                .unwrap_or(format!("not used: {why}")),
            ..Default::default()
        };
        let mut hashes: Vec<Hash> = match &old {
            Some(o) => o.hashes.clone(),
            None => (0..g.nblocks).map(|i| g.zero_hash(i)).collect(),
        };
        let compare = old.is_none() && !self.stage_blank;
        let look = self.plan(&g, old.as_ref(), compare, &alloc, &mut st)?;
        if let Some(p) = self.progress {
            p.set_length(look.iter().filter(|x| **x).count() as u64 * bs);
        }
        let mut buf = vec![0u8; RUN.max(bs as usize)];
        let mut sbuf = vec![0u8; RUN.max(bs as usize)];
        let per = (RUN as u64 / bs).max(1) as usize;
        let mut i = 0usize;
        while i < g.nblocks {
            if !look[i] {
                i += 1;
                continue;
            }
            // A run of looked-at blocks, at most RUN bytes.
            let mut j = i;
            while j < g.nblocks && look[j] && j - i < per {
                j += 1;
            }
            let off = i as u64 * bs;
            let run = Run {
                i,
                j,
                off,
                len: ((j as u64 * bs).min(size) - off) as usize,
            };
            self.read_run(&g, &run, &alloc, &mut buf, &mut st)?;
            if compare {
                self.stage
                    .read(off, &mut sbuf[..run.len])
                    .context_with(ErrorKind::Host, || format!("stage read at {off}"))?;
            }
            let stage_copy = compare.then_some(&sbuf[..]);
            self.write_changed(&g, &run, &buf, stage_copy, &mut hashes, &mut st)?;
            if let Some(p) = self.progress {
                p.inc(run.len as u64);
            }
            i = j;
        }
        self.stage
            .flush()
            .context_with(ErrorKind::Host, || "stage flush")?;
        st.throttled_seconds = self.throttle.waited.as_secs_f64();
        Ok((hashes, st))
    }

    /// Chooses the mode (recorded in `st`) and the blocks to look at.
    fn plan(
        &mut self,
        g: &Geometry,
        old: Option<&Fingerprints>,
        compare: bool,
        alloc: &[(u64, u64, bool)],
        st: &mut BlockStats,
    ) -> Result<Vec<bool>> {
        let mut look = vec![false; g.nblocks];
        let same_bitmap = match (old, self.src.bitmap()) {
            (Some(o), Some(b)) => o.bitmap.as_deref() == Some(b),
            _ => false,
        };
        match (old, same_bitmap) {
            (Some(_), true) => {
                st.mode = "dirty-bitmap".into();
                for (o, l) in self.src.dirty()? {
                    g.mark(&mut look, o, l);
                }
            }
            (Some(_), false) => {
                st.mode = "fingerprints".into();
                look.iter_mut().for_each(|x| *x = true);
            }
            (None, _) if compare => {
                st.mode = "compare".into();
                look.iter_mut().for_each(|x| *x = true);
            }
            (None, _) => {
                st.mode = "full".into();
                for &(o, l, a) in alloc {
                    if a {
                        g.mark(&mut look, o, l);
                    }
                }
            }
        }
        Ok(look)
    }

    /// Reads the allocated parts of `run` into `buf`; holes are zeros.
    fn read_run(
        &mut self,
        g: &Geometry,
        run: &Run,
        alloc: &[(u64, u64, bool)],
        buf: &mut [u8],
        st: &mut BlockStats,
    ) -> Result<()> {
        let (i, j, off, bs) = (run.i, run.j, run.off, g.bs);
        buf[..run.len].fill(0);
        let mut k = i;
        while k < j {
            if g.allocated(k, alloc) {
                let mut m = k;
                while m < j && g.allocated(m, alloc) {
                    m += 1;
                }
                let (a, b) = (
                    (k - i) * bs as usize,
                    (((m as u64 * bs).min(g.size)) - off) as usize,
                );
                self.src.read(off + a as u64, &mut buf[a..b])?;
                st.bytes_read += (b - a) as u64;
                k = m;
            } else {
                k += 1;
            }
        }
        Ok(())
    }

    /// Hashes the blocks of `run` and writes the changed ones (against the
    /// stage's copy when comparing, else against the old hashes), joined
    /// into runs of data or of zeros.
    #[allow(clippy::needless_range_loop)] // `b` indexes `hashes` and places bytes in `buf`
    fn write_changed(
        &mut self,
        g: &Geometry,
        run: &Run,
        buf: &[u8],
        stage_copy: Option<&[u8]>,
        hashes: &mut [Hash],
        st: &mut BlockStats,
    ) -> Result<()> {
        let (i, off, bs) = (run.i, run.off, g.bs as usize);
        let mut w: Option<(usize, usize, bool)> = None;
        for b in i..run.j {
            let (a, e) = ((b - i) * bs, ((b - i) * bs + g.blen(b)));
            let blk = &buf[a..e];
            let h = hash(blk);
            let zero = h == g.zero_hash(b);
            let changed = match stage_copy {
                Some(s) => s[a..e] != *blk,
                None => hashes[b] != h,
            };
            hashes[b] = h;
            st.blocks += 1;
            if changed {
                st.changed_blocks += 1;
            }
            let cur = if changed { Some(zero) } else { None };
            match (&mut w, cur) {
                (Some((_, we, wz)), Some(z)) if *wz == z && *we == a => *we = e,
                (_, c) => {
                    if let Some((ws, we, wz)) = w.take() {
                        self.put(off, buf, ws, we, wz, st)?;
                    }
                    w = c.map(|z| (a, e, z));
                }
            }
        }
        if let Some((ws, we, wz)) = w.take() {
            self.put(off, buf, ws, we, wz, st)?;
        }
        Ok(())
    }

    fn put(
        &mut self,
        off: u64,
        buf: &[u8],
        a: usize,
        e: usize,
        zero: bool,
        st: &mut BlockStats,
    ) -> Result<()> {
        let at = off + a as u64;
        if zero {
            self.stage
                .write_zeroes(at, (e - a) as u64, 0)
                .context_with(ErrorKind::Host, || format!("stage write at {at}"))?;
            st.bytes_zeroed += (e - a) as u64;
        } else {
            self.throttle.consume((e - a) as u64);
            self.stage
                .write(at, &buf[a..e], false)
                .context_with(ErrorKind::Host, || format!("stage write at {at}"))?;
            st.bytes_written += (e - a) as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_and_reject_damage() {
        let f = Fingerprints {
            block_size: 65536,
            snapshot: 7,
            size: 3 << 16,
            bitmap: Some("b0".into()),
            hashes: vec![[1; 16], [2; 16], [3; 16]],
        };
        let b = f.encode();
        assert_eq!(Fingerprints::decode(&b).unwrap(), f);
        for cut in 0..b.len() {
            assert!(Fingerprints::decode(&b[..cut]).is_err());
        }
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(Fingerprints::decode(&bad).is_err());
    }
}

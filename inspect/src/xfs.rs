//! A read-only XFS reader for inspection (the RHEL and CentOS default):
//! the superblock (v4 and v5), inodes (v2 and v3 cores), shortform, block
//! and leaf directories, extent-list and B+tree-format files and
//! directories, symlinks (inline and remote). Every number comes from the
//! image and is checked before use; loops are bounded.

use crate::Shared;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum XfsError {
    #[error("XFS: {0}")]
    Bad(String),
}

fn bad<T>(m: impl Into<String>) -> Result<T, XfsError> {
    Err(XfsError::Bad(m.into()))
}

fn be16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

pub struct Xfs {
    d: Shared,
    start: u64,
    len: u64,
    block: u64,
    agblocks: u64,
    agblklog: u32,
    inopblog: u32,
    inode_size: u64,
    dir_block: u64,
    v5: bool,
    ftype: bool,
    pub(crate) root: u64,
    /// Bytes this reader may still read: crafted directories and extent
    /// lists cannot make a lookup read without end.
    budget: std::cell::Cell<u64>,
}

/// What one filesystem view may read in all (inspection needs well under
/// a megabyte; hives are the largest files it reads).
const READ_BUDGET: u64 = 1 << 30;

pub(crate) struct Inode {
    pub(crate) mode: u16,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    format: u8,
    pub(crate) size: u64,
    nextents: u32,
    /// The data fork's bytes.
    fork: Vec<u8>,
}

pub(crate) const S_IFMT: u16 = 0o170000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFLNK: u16 = 0o120000;
pub(crate) const S_IFREG: u16 = 0o100000;
/// Directory data lives below 32 GiB of the directory's address space.
const LEAF_OFFSET: u64 = 32 << 30;
const MAX_EXTENTS: u32 = 1 << 16;

impl Xfs {
    pub fn open(d: Shared, start: u64, len: u64) -> Result<Xfs, XfsError> {
        let mut sb = vec![0u8; 512];
        if len < 4096 || d.read_at(start, &mut sb).is_err() {
            return bad("cannot read the superblock");
        }
        if &sb[..4] != b"XFSB" {
            return bad("bad superblock magic");
        }
        let g = |o| be32(&sb, o).unwrap_or(0);
        let block = g(4) as u64;
        let agblocks = g(0x54) as u64;
        let version = be16(&sb, 0x64).unwrap_or(0) & 0xf;
        let inode_size = be16(&sb, 0x68).unwrap_or(0) as u64;
        let (blocklog, inopblog, agblklog, dirblklog) = (
            sb[0x78] as u32,
            sb[0x7b] as u32,
            sb[0x7c] as u32,
            sb[0xc0] as u32,
        );
        if blocklog > 16
            || inopblog > 8
            || !(512..=65536).contains(&block)
            || 1u64 << blocklog != block
        {
            return bad(format!("block size {block}"));
        }
        if !(256..=2048).contains(&inode_size)
            || !inode_size.is_power_of_two()
            || block / inode_size != 1 << inopblog
        {
            return bad(format!("inode size {inode_size}"));
        }
        if agblocks == 0 || agblklog > 31 || agblocks > 1 << agblklog || dirblklog > 6 {
            return bad("allocation group geometry");
        }
        let v5 = version == 5;
        let ftype = if v5 {
            g(0xd8) & 1 != 0
        } else {
            g(0xc8) & 0x200 != 0
        };
        Ok(Xfs {
            d,
            start,
            len,
            block,
            agblocks,
            agblklog,
            inopblog,
            inode_size,
            dir_block: block << dirblklog,
            v5,
            ftype,
            root: be64(&sb, 0x38).unwrap_or(0),
            budget: std::cell::Cell::new(READ_BUDGET),
        })
    }

    pub(crate) fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), XfsError> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return bad(format!("read past the filesystem end at {off}"));
        }
        let left = self.budget.get();
        if buf.len() as u64 > left {
            return bad("read budget exhausted (a damaged or hostile filesystem)");
        }
        self.budget.set(left - buf.len() as u64);
        let at = self
            .start
            .checked_add(off)
            .ok_or_else(|| XfsError::Bad(format!("read at {off} out of range")))?;
        self.d.read_at(at, buf).map_err(XfsError::Bad)
    }

    /// Lets this reader read up to `bytes` in all (the file browser
    /// streams whole files; inspection keeps the default).
    pub(crate) fn set_budget(&self, bytes: u64) {
        self.budget.set(bytes);
    }

    /// Byte offset of filesystem block `fsb` (AG number in the high bits).
    fn fsb(&self, fsb: u64) -> Option<u64> {
        let ag = fsb >> self.agblklog;
        let agb = fsb & ((1 << self.agblklog) - 1);
        if agb >= self.agblocks {
            return None;
        }
        (ag.checked_mul(self.agblocks)?.checked_add(agb)?).checked_mul(self.block)
    }

    pub(crate) fn inode(&self, ino: u64) -> Result<Inode, XfsError> {
        let per = self.inopblog + self.agblklog;
        let ag = ino >> per;
        let agb = (ino >> self.inopblog) & ((1 << self.agblklog) - 1);
        let idx = ino & ((1 << self.inopblog) - 1);
        let off = ag
            .checked_mul(self.agblocks)
            .and_then(|x| x.checked_add(agb))
            .and_then(|x| x.checked_mul(self.block))
            .and_then(|x| x.checked_add(idx * self.inode_size))
            .ok_or_else(|| XfsError::Bad(format!("inode {ino} out of range")))?;
        let mut b = vec![0u8; self.inode_size as usize];
        self.read(off, &mut b)?;
        if &b[..2] != b"IN" {
            return bad(format!("inode {ino}: bad magic"));
        }
        let version = b[4];
        let fork_at = if version >= 3 { 176 } else { 100 };
        let forkoff = b[82] as usize * 8;
        let end = if forkoff > 0 {
            fork_at + forkoff
        } else {
            b.len()
        };
        let fork = b
            .get(fork_at..end.min(b.len()))
            .ok_or_else(|| XfsError::Bad(format!("inode {ino}: bad fork offset")))?
            .to_vec();
        // NREXT64 (v3 inodes, di_flags2 bit 4): the data fork's extent
        // count is the 64-bit di_big_nextents at 0x18.
        let nrext64 = version >= 3 && be64(&b, 0x78).unwrap_or(0) & (1 << 4) != 0;
        let nextents = if nrext64 {
            u32::try_from(be64(&b, 0x18).unwrap_or(0)).unwrap_or(u32::MAX)
        } else {
            be32(&b, 0x4c).unwrap_or(0)
        };
        Ok(Inode {
            mode: be16(&b, 2).unwrap_or(0),
            uid: be32(&b, 8).unwrap_or(0),
            gid: be32(&b, 12).unwrap_or(0),
            format: b[5],
            size: be64(&b, 0x38).unwrap_or(0),
            nextents,
            fork,
        })
    }

    /// (file offset, byte offset on disk — `None` for an unwritten extent,
    /// which reads as zeros — and length) of an extent-format inode, in
    /// bytes. XFS keeps them sorted and disjoint; anything else is damage.
    pub(crate) fn extents(&self, i: &Inode) -> Result<Vec<(u64, Option<u64>, u64)>, XfsError> {
        let recs = match i.format {
            2 => {
                if i.nextents > MAX_EXTENTS || i.nextents as usize * 16 > i.fork.len() {
                    return bad("extent count");
                }
                (0..i.nextents as usize)
                    .map(|k| {
                        (
                            be64(&i.fork, k * 16).unwrap_or(0),
                            be64(&i.fork, k * 16 + 8).unwrap_or(0),
                        )
                    })
                    .collect()
            }
            3 => self.btree_records(&i.fork)?,
            f => return bad(format!("data fork format {f} is not read here")),
        };
        let mut out: Vec<(u64, Option<u64>, u64)> = Vec::new();
        for (hi, lo) in recs {
            let startoff = (hi >> 9) & ((1 << 54) - 1);
            let startblock = ((hi & 0x1ff) << 43) | (lo >> 21);
            let count = lo & 0x1f_ffff;
            let disk = self
                .fsb(startblock)
                .ok_or_else(|| XfsError::Bad("extent outside the filesystem".into()))?;
            let off = startoff
                .checked_mul(self.block)
                .ok_or_else(|| XfsError::Bad("extent offset".into()))?;
            if let Some(&(po, _, pl)) = out.last() {
                // Saturating: an extent ending past 2^64 bytes is damage,
                // not an overflow.
                if off < po.saturating_add(pl) {
                    return bad("extents overlap or are out of order");
                }
            }
            let unwritten = hi >> 63 != 0;
            out.push((off, (!unwritten).then_some(disk), count * self.block));
        }
        Ok(out)
    }

    /// The extent records of a B+tree-format fork (large or fragmented
    /// files and directories): down the leftmost path from the root in
    /// the inode, then along the leaves by their right siblings. Levels,
    /// counts and the number of blocks visited are all checked.
    fn btree_records(&self, fork: &[u8]) -> Result<Vec<(u64, u64)>, XfsError> {
        let level = be16(fork, 0).unwrap_or(0);
        let n = be16(fork, 2).unwrap_or(0) as usize;
        let root_max = fork.len().saturating_sub(4) / 16;
        if level == 0 || level > 9 || n == 0 || n > root_max {
            return bad("B+tree root");
        }
        let (hdr, magic): (usize, &[u8]) = if self.v5 {
            (72, b"BMA3")
        } else {
            (24, b"BMAP")
        };
        let per_block = (self.block as usize - hdr) / 16;
        let mut b = vec![0u8; self.block as usize];
        let load = |ptr: u64, want: u16, b: &mut [u8]| -> Result<usize, XfsError> {
            let off = self
                .fsb(ptr)
                .ok_or_else(|| XfsError::Bad("B+tree block outside the filesystem".into()))?;
            self.read(off, b)?;
            let nr = be16(b, 6).unwrap_or(0) as usize;
            if &b[..4] != magic || be16(b, 4) != Some(want) || nr > per_block {
                return bad("B+tree block header");
            }
            Ok(nr)
        };
        let mut ptr = be64(fork, 4 + root_max * 8).unwrap_or(0);
        let mut nr = 0;
        for want in (0..level).rev() {
            nr = load(ptr, want, &mut b)?;
            if want > 0 {
                if nr == 0 {
                    return bad("empty B+tree node");
                }
                ptr = be64(&b, hdr + per_block * 8).unwrap_or(0);
            }
        }
        let mut out = Vec::new();
        // Leaves hold at least one record each in a sound tree; a sibling
        // loop of empty ones ends here.
        for _ in 0..=MAX_EXTENTS {
            for k in 0..nr {
                out.push((
                    be64(&b, hdr + k * 16).unwrap_or(0),
                    be64(&b, hdr + k * 16 + 8).unwrap_or(0),
                ));
            }
            if out.len() > MAX_EXTENTS as usize {
                return bad("extent count");
            }
            let right = be64(&b, 16).unwrap_or(u64::MAX);
            if right == u64::MAX {
                return Ok(out);
            }
            nr = load(right, 0, &mut b)?;
        }
        bad("B+tree leaves without end")
    }

    /// A file's bytes, at most `max`.
    fn data(&self, i: &Inode, max: u64) -> Result<Vec<u8>, XfsError> {
        if i.size > max {
            return bad("file too large");
        }
        let mut out = vec![0u8; i.size as usize];
        for (off, disk, len) in self.extents(i)? {
            if off >= i.size {
                continue;
            }
            let n = len.min(i.size - off) as usize;
            if let Some(disk) = disk {
                self.read(disk, &mut out[off as usize..off as usize + n])?;
            }
        }
        Ok(out)
    }

    pub(crate) fn symlink_target(&self, i: &Inode) -> Result<String, XfsError> {
        let b = match i.format {
            1 => i
                .fork
                .get(..i.size as usize)
                .ok_or_else(|| XfsError::Bad("inline symlink".into()))?
                .to_vec(),
            _ => {
                if i.size > 4096 {
                    return bad("symlink target too long");
                }
                let raw = self.data(
                    &Inode {
                        size: i.size + if self.v5 { 56 } else { 0 },
                        ..clone_inode(i)
                    },
                    4096 + 56,
                )?;
                let skip = if self.v5 { 56 } else { 0 };
                raw.get(skip..skip + i.size as usize)
                    .unwrap_or_default()
                    .to_vec()
            }
        };
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Directory entries: (name, inode).
    pub(crate) fn dir(&self, i: &Inode) -> Result<Vec<(String, u64)>, XfsError> {
        match i.format {
            1 => self.shortform(&i.fork),
            2 | 3 => {
                let mut out = Vec::new();
                let hdr = if self.v5 { 64 } else { 16 };
                let entry_extra = if self.ftype { 1 } else { 0 };
                // Data blocks only: below the leaf area and the directory's size.
                let limit = i.size.min(LEAF_OFFSET);
                for (off, disk, len) in self.extents(i)? {
                    let Some(disk) = disk else { continue };
                    if off >= limit {
                        continue;
                    }
                    let len = len.min(limit - off);
                    let mut at = 0;
                    while at < len {
                        if out.len() > 1_000_000 {
                            return bad("directory too large");
                        }
                        let mut b = vec![0u8; self.dir_block as usize];
                        self.read(disk.saturating_add(at), &mut b)?;
                        at += self.dir_block;
                        let magic = &b[..4];
                        let end = match magic {
                            b"XD2B" | b"XDB3" => {
                                let n = be32(&b, b.len() - 8).unwrap_or(0) as usize;
                                b.len().saturating_sub(8 + n.saturating_mul(8))
                            }
                            b"XD2D" | b"XDD3" => b.len(),
                            _ => continue,
                        };
                        let mut p = hdr;
                        while p + 16 <= end {
                            if be16(&b, p) == Some(0xffff) {
                                let l = be16(&b, p + 2).unwrap_or(0) as usize;
                                if l < 8 || !l.is_multiple_of(8) {
                                    break;
                                }
                                p += l;
                                continue;
                            }
                            let ino = be64(&b, p).unwrap_or(0);
                            let nl = b[p + 8] as usize;
                            let name = b.get(p + 9..p + 9 + nl).unwrap_or_default();
                            out.push((String::from_utf8_lossy(name).into_owned(), ino));
                            let size = (8 + 1 + nl + entry_extra + 2).div_ceil(8) * 8;
                            p += size;
                        }
                    }
                }
                Ok(out)
            }
            f => bad(format!("directory format {f} is not read here")),
        }
    }

    fn shortform(&self, f: &[u8]) -> Result<Vec<(String, u64)>, XfsError> {
        let count = *f
            .first()
            .ok_or_else(|| XfsError::Bad("empty shortform".into()))? as usize;
        let i8 = f.get(1).copied().unwrap_or(0) > 0;
        let isz = if i8 { 8 } else { 4 };
        let mut p = 2 + isz;
        let mut out = Vec::new();
        for _ in 0..count {
            let nl = *f
                .get(p)
                .ok_or_else(|| XfsError::Bad("shortform entry".into()))?
                as usize;
            let name = f
                .get(p + 3..p + 3 + nl)
                .ok_or_else(|| XfsError::Bad("shortform name".into()))?;
            let q = p + 3 + nl + usize::from(self.ftype);
            let ino = if i8 {
                be64(f, q)
            } else {
                be32(f, q).map(u64::from)
            }
            .ok_or_else(|| XfsError::Bad("shortform inode".into()))?;
            out.push((String::from_utf8_lossy(name).into_owned(), ino));
            p = q + isz;
        }
        Ok(out)
    }

    /// Resolves a path (following symlinks) to an inode.
    pub(crate) fn resolve(&self, path: &str) -> Option<Inode> {
        let mut parts: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        parts.reverse();
        let mut stack: Vec<u64> = vec![self.root];
        let mut hops = 0;
        while let Some(c) = parts.pop() {
            let cur = *stack.last()?;
            if c == "." {
                continue;
            }
            if c == ".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let dir = self.inode(cur).ok()?;
            if dir.mode & S_IFMT != S_IFDIR {
                return None;
            }
            let ino = self.dir(&dir).ok()?.into_iter().find(|(n, _)| *n == c)?.1;
            let node = self.inode(ino).ok()?;
            if node.mode & S_IFMT == S_IFLNK {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let t = self.symlink_target(&node).ok()?;
                if t.starts_with('/') {
                    stack.truncate(1);
                }
                for p in t.split('/').filter(|p| !p.is_empty()).rev() {
                    parts.push(p.to_string());
                }
                continue;
            }
            stack.push(ino);
        }
        self.inode(*stack.last()?).ok()
    }

    pub fn read_file(&self, path: &str, max: u64) -> Option<Vec<u8>> {
        let i = self.resolve(path)?;
        (i.mode & S_IFMT == S_IFREG)
            .then(|| self.data(&i, max).ok())
            .flatten()
    }

    pub fn exists(&self, path: &str) -> bool {
        self.resolve(path).is_some()
    }

    pub fn list(&self, path: &str) -> Vec<String> {
        self.resolve(path)
            .filter(|i| i.mode & S_IFMT == S_IFDIR)
            .and_then(|i| self.dir(&i).ok())
            .map(|v| {
                v.into_iter()
                    .map(|(n, _)| n)
                    .filter(|n| n != "." && n != "..")
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn clone_inode(i: &Inode) -> Inode {
    Inode {
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        format: i.format,
        size: i.size,
        nextents: i.nextents,
        fork: i.fork.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v4 XFS of 4 KiB blocks and 512-byte inodes: root directory
    /// (inode 16, shortform) holding `f` (inode 17, extent format) whose
    /// data fork is `extents` as (startoff, startblock, count).
    fn image(extents: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; 64 << 10];
        d[..4].copy_from_slice(b"XFSB");
        d[4..8].copy_from_slice(&4096u32.to_be_bytes());
        d[0x38..0x40].copy_from_slice(&16u64.to_be_bytes());
        d[0x54..0x58].copy_from_slice(&1024u32.to_be_bytes());
        d[0x64..0x66].copy_from_slice(&4u16.to_be_bytes());
        d[0x68..0x6a].copy_from_slice(&512u16.to_be_bytes());
        (d[0x78], d[0x7b], d[0x7c]) = (12, 3, 10);
        let inode = |d: &mut Vec<u8>, at: usize, mode: u16, format: u8, size: u64, n: u32| {
            d[at..at + 2].copy_from_slice(b"IN");
            d[at + 2..at + 4].copy_from_slice(&mode.to_be_bytes());
            (d[at + 4], d[at + 5]) = (2, format);
            d[at + 0x38..at + 0x40].copy_from_slice(&size.to_be_bytes());
            d[at + 0x4c..at + 0x50].copy_from_slice(&n.to_be_bytes());
        };
        let root = 2 * 4096;
        inode(&mut d, root, S_IFDIR | 0o755, 1, 10, 0);
        // Shortform: 1 entry, 4-byte inode numbers, parent 16; "f" -> 17.
        let sf = [1u8, 0, 0, 0, 0, 16, 1, 0, 0, b'f', 0, 0, 0, 17];
        d[root + 100..root + 100 + sf.len()].copy_from_slice(&sf);
        let file = root + 512;
        inode(&mut d, file, S_IFREG | 0o644, 2, 10, extents.len() as u32);
        for (k, &(off, block, count)) in extents.iter().enumerate() {
            let hi = (off << 9) | (block >> 43);
            let lo = (block << 21) | count;
            let at = file + 100 + k * 16;
            d[at..at + 8].copy_from_slice(&hi.to_be_bytes());
            d[at + 8..at + 16].copy_from_slice(&lo.to_be_bytes());
        }
        d[12 * 4096..12 * 4096 + 10].copy_from_slice(b"0123456789");
        d
    }

    fn open(d: Vec<u8>) -> Xfs {
        let len = d.len() as u64;
        Xfs::open(crate::Shared::new(Box::new(crate::MemDisk(d))), 0, len).unwrap()
    }

    #[test]
    fn reads_a_file_through_its_extents() {
        let x = open(image(&[(0, 12, 1)]));
        assert_eq!(x.list("/"), vec!["f".to_string()]);
        assert_eq!(x.read_file("/f", 100).as_deref(), Some(&b"0123456789"[..]));
    }

    /// Found by reading for panics once catch_unwind no longer hid them:
    /// an extent ending past 2^64 bytes overflowed the overlap check.
    #[test]
    fn an_extent_ending_past_u64_is_damage_not_a_panic() {
        let x = open(image(&[((1 << 52) - 1, 12, 2), ((1 << 52) - 1, 12, 1)]));
        assert_eq!(x.read_file("/f", 100), None);
        assert!(x.exists("/f"));
    }
}

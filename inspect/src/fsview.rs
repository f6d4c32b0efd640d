//! Read-only views of a guest's filesystem for inspection: ext2/3/4
//! through `ext4-view` (screened by `cdm_disk::browse::load`), NTFS
//! through the `ntfs` crate (case-insensitive names, as Windows has them),
//! XFS and btrfs through our own readers (`xfs.rs`, `btrfs.rs`).
//! All read the disk through [`Shared`]. A panic inside a third-party
//! library on a crafted image becomes "not found", never a crash; our own
//! XFS and btrfs readers run unguarded, so a panic there is a bug the fuzzer sees.

use std::io::{Read, Seek, SeekFrom};

use ext4_view::{Ext4, Ext4Read};
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::{Ntfs, NtfsFile, NtfsReadSeek};

use crate::Shared;

/// The files inspection looks at.
pub trait FsView {
    /// A file's bytes if it exists, is a regular file and is at most `max`
    /// bytes long.
    fn read(&mut self, path: &str, max: u64) -> Option<Vec<u8>>;
    fn exists(&mut self, path: &str) -> bool;
    /// Names in a directory (empty if it is not one).
    fn list(&mut self, path: &str) -> Vec<String>;
}

/// A partition of the shared disk as a byte stream.
pub(crate) struct Part {
    pub(crate) d: Shared,
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) pos: u64,
}

impl Ext4Read for Part {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start
            .checked_add(dst.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(format!("read past the partition end at {start}").into());
        }
        self.d
            .read_at(self.start + start, dst)
            .map_err(|e| e.into())
    }
}

impl Read for Part {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.d
            .read_at(self.start + self.pos, &mut buf[..n])
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Part {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let p = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

/// Runs a call into a third-party reader (`ext4-view`, `ntfs`), turning a
/// panic into `None`. Under `cfg(fuzzing)` nothing is caught, so the
/// fuzzer reports the library's panics too rather than counting them as
/// handled.
#[cfg(not(fuzzing))]
fn guard<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}

#[cfg(fuzzing)]
fn guard<T>(f: impl FnOnce() -> T) -> Option<T> {
    Some(f())
}

struct Ext4View(Ext4);

pub fn ext4(d: Shared, start: u64, len: u64) -> Result<Box<dyn FsView>, String> {
    let p = Part {
        d,
        start,
        len,
        pos: 0,
    };
    let fs = cdm_disk::browse::load(Box::new(p), len).map_err(|e| e.to_string())?;
    Ok(Box::new(Ext4View(fs)))
}

impl FsView for Ext4View {
    fn read(&mut self, path: &str, max: u64) -> Option<Vec<u8>> {
        guard(|| {
            let m = self.0.metadata(path).ok()?;
            if m.is_dir() || m.len() > max {
                return None;
            }
            self.0.read(path).ok()
        })
        .flatten()
    }
    fn exists(&mut self, path: &str) -> bool {
        guard(|| self.0.exists(path).unwrap_or(false)).unwrap_or(false)
    }
    fn list(&mut self, path: &str) -> Vec<String> {
        guard(|| {
            self.0
                .read_dir(path)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
                        .filter(|n| n != "." && n != "..")
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default()
    }
}

struct NtfsView {
    ntfs: Ntfs,
    fs: Part,
}

pub fn ntfs(d: Shared, start: u64, len: u64) -> Result<Box<dyn FsView>, String> {
    let mut fs = Part {
        d,
        start,
        len,
        pos: 0,
    };
    let ntfs = guard(|| -> Result<Ntfs, String> {
        let mut n = Ntfs::new(&mut fs).map_err(|e| e.to_string())?;
        n.read_upcase_table(&mut fs).map_err(|e| e.to_string())?;
        Ok(n)
    })
    .unwrap_or_else(|| Err("NTFS reader failed on this volume".into()))?;
    Ok(Box::new(NtfsView { ntfs, fs }))
}

/// The file at a `/`-separated path, names compared as Windows does.
fn lookup<'n>(ntfs: &'n Ntfs, fs: &mut Part, path: &str) -> Option<NtfsFile<'n>> {
    let mut file = ntfs.root_directory(fs).ok()?;
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        let index = file.directory_index(fs).ok()?;
        let mut finder = index.finder();
        let entry = NtfsFileNameIndex::find(&mut finder, ntfs, fs, comp)?.ok()?;
        let next = entry.to_file(ntfs, fs).ok()?;
        file = next;
    }
    Some(file)
}

impl FsView for NtfsView {
    fn read(&mut self, path: &str, max: u64) -> Option<Vec<u8>> {
        let NtfsView { ntfs, fs } = self;
        guard(|| {
            let file = lookup(ntfs, fs, path)?;
            if file.is_directory() {
                return None;
            }
            let item = file.data(fs, "")?.ok()?;
            let attr = item.to_attribute().ok()?;
            let mut v = attr.value(fs).ok()?;
            if v.len() > max {
                return None;
            }
            let mut out = Vec::with_capacity(v.len() as usize);
            let mut buf = [0u8; 65536];
            loop {
                let n = v.read(fs, &mut buf).ok()?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                if out.len() as u64 > max {
                    return None;
                }
            }
            Some(out)
        })
        .flatten()
    }
    fn exists(&mut self, path: &str) -> bool {
        let NtfsView { ntfs, fs } = self;
        guard(|| lookup(ntfs, fs, path).is_some()).unwrap_or(false)
    }
    fn list(&mut self, path: &str) -> Vec<String> {
        let NtfsView { ntfs, fs } = self;
        guard(|| -> Option<Vec<String>> {
            let dir = lookup(ntfs, fs, path)?;
            let index = dir.directory_index(fs).ok()?;
            let mut it = index.entries();
            let mut names = Vec::new();
            while let Some(e) = it.next(fs) {
                let e = e.ok()?;
                if let Some(Ok(k)) = e.key() {
                    if k.namespace() == ntfs::structured_values::NtfsFileNamespace::Dos {
                        continue;
                    }
                    let n = k.name().to_string_lossy();
                    if !names.contains(&n) && !n.starts_with('$') {
                        names.push(n);
                    }
                }
                if names.len() > 100_000 {
                    break;
                }
            }
            Some(names)
        })
        .flatten()
        .unwrap_or_default()
    }
}

struct XfsView(crate::xfs::Xfs);

pub fn xfs(d: Shared, start: u64, len: u64) -> Result<Box<dyn FsView>, String> {
    let x = crate::xfs::Xfs::open(d, start, len).map_err(|e| e.to_string())?;
    Ok(Box::new(XfsView(x)))
}

// Our own code: no guard, it must not panic on any bytes.
impl FsView for XfsView {
    fn read(&mut self, path: &str, max: u64) -> Option<Vec<u8>> {
        self.0.read_file(path, max)
    }
    fn exists(&mut self, path: &str) -> bool {
        self.0.exists(path)
    }
    fn list(&mut self, path: &str) -> Vec<String> {
        self.0.list(path)
    }
}

struct BtrfsView(crate::btrfs::Btrfs);

pub fn btrfs(d: Shared, start: u64, len: u64) -> Result<Box<dyn FsView>, String> {
    let b = crate::btrfs::Btrfs::open(d, start, len).map_err(|e| e.to_string())?;
    Ok(Box::new(BtrfsView(b)))
}

// Our own code: no guard, it must not panic on any bytes.
impl FsView for BtrfsView {
    fn read(&mut self, path: &str, max: u64) -> Option<Vec<u8>> {
        self.0.read_file(path, max)
    }
    fn exists(&mut self, path: &str) -> bool {
        self.0.exists(path)
    }
    fn list(&mut self, path: &str) -> Vec<String> {
        self.0.list(path)
    }
}

//! File-level reading without the kernel: a filesystem (on a whole disk or
//! in a partition) read in process from any byte source. [`Browsable`] is
//! what a filesystem reader gives (stat, names, a file as a stream);
//! listing, stat, streaming a file and a tar of a directory are written
//! once over it. ext4 (through `ext4-view`, loading screened against
//! hostile images) is implemented here; XFS and NTFS in `cdm-inspect`
//! (which depends on this crate).

use std::io::{Read, Write};

use ext4_view::Ext4Error;
pub use ext4_view::{Ext4, Ext4Read};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The image holds no filesystem we can read, or a damaged one.
    #[error("{0}")]
    Unreadable(String),
}

/// One directory entry or stat result.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub name: String,
    pub path: String,
    /// `file`, `dir`, `symlink`, `block`, `char`, `fifo`, `socket`.
    pub kind: String,
    pub size: u64,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Symlinks: where they point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A filesystem as the file-level restore reads it. Paths are absolute and
/// already checked (no `..`, no NUL) by the functions of this module.
pub trait Browsable {
    /// The filesystem's name (`ext4`, `xfs`, `ntfs`).
    fn fs_type(&self) -> &'static str;
    /// One path, symlinks not followed; `name` is what the entry shows.
    fn entry(&self, path: &str, name: String) -> Result<Entry, BrowseError>;
    /// The names in a directory, without `.` and `..`, in any order.
    fn names(&self, path: &str) -> Result<Vec<String>, BrowseError>;
    /// A regular file (symlinks followed): its length and its bytes as a
    /// stream (large files are never loaded whole).
    fn open(&self, path: &str) -> Result<(u64, Box<dyn Read + '_>), BrowseError>;
}

/// A byte range `[base, base + len)` of a disk (one partition, or the
/// whole disk) as `ext4-view` reads it: `read(offset, dst)` fills `dst`
/// from the disk; a read past `len` is an error, never a read of the next
/// partition.
pub struct Slice<F> {
    read: F,
    base: u64,
    len: u64,
}

impl<F> Slice<F> {
    pub fn new(read: F, base: u64, len: u64) -> Self {
        Slice { read, base, len }
    }
}

impl<F, E> Ext4Read for Slice<F>
where
    F: FnMut(u64, &mut [u8]) -> Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        start
            .checked_add(dst.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                format!(
                    "read at {start} past the end of the filesystem ({} bytes)",
                    self.len
                )
            })?;
        (self.read)(self.base + start, dst).map_err(Into::into)
    }
}

fn ext4_err(e: Ext4Error, path: &str) -> BrowseError {
    match e {
        Ext4Error::NotFound => BrowseError::NotFound(format!("path {path}")),
        Ext4Error::NotADirectory | Ext4Error::IsADirectory | Ext4Error::IsASpecialFile => {
            BrowseError::Invalid(format!("{path}: {e}"))
        }
        Ext4Error::NotAbsolute | Ext4Error::MalformedPath | Ext4Error::PathTooLong => {
            BrowseError::Invalid(format!("bad path {path:?}: {e}"))
        }
        other => BrowseError::Unreadable(format!("{path}: {other}")),
    }
}

/// Loads an ext4 filesystem from `reader` (`len` bytes). Checks the
/// superblock fields that made `ext4-view` 0.9.3 panic (a zero
/// `s_blocks_per_group`: division by zero; a short 64-bit group
/// descriptor: an out-of-bounds read — both found by our `disk_image` fuzz
/// target), and turns any other panic inside the library into an error, so
/// a hostile image can never take a request thread down.
pub fn load(mut reader: Box<dyn Ext4Read>, len: u64) -> Result<Ext4, BrowseError> {
    if len < 2048 {
        return Err(BrowseError::Unreadable(format!(
            "{len} bytes is too small for ext4"
        )));
    }
    let mut sb = [0u8; 1024];
    reader
        .read(1024, &mut sb)
        .map_err(|e| BrowseError::Unreadable(format!("cannot read the superblock: {e}")))?;
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xef53 {
        return Err(BrowseError::Unreadable(
            "no ext2/3/4 superblock (bad magic)".into(),
        ));
    }
    if u32_at(0x20) == 0 || u32_at(0x28) == 0 {
        return Err(BrowseError::Unreadable(
            "damaged ext4 superblock: zero blocks or inodes per group".into(),
        ));
    }
    // The library sizes its tables from the superblock: a filesystem must
    // fit its device, and groups must not be absurdly small (a crafted
    // count made 0.9.3 allocate gigabytes).
    let log_bs = u32_at(0x18);
    if log_bs > 6 {
        return Err(BrowseError::Unreadable(format!(
            "damaged ext4 superblock: block size 2^{} KiB",
            log_bs
        )));
    }
    let bs = 1024u64 << log_bs;
    let hi = if u32_at(0x60) & 0x80 != 0 {
        u32_at(0x150) as u64
    } else {
        0
    };
    let blocks = (hi << 32) | u32_at(0x04) as u64;
    let per_group = u32_at(0x20) as u64;
    if blocks.saturating_mul(bs) > len.saturating_add(bs) || !(256..=8 * bs).contains(&per_group) {
        return Err(BrowseError::Unreadable(format!(
            "damaged ext4 superblock: {blocks} blocks of {bs} bytes in groups of {per_group} on a {len}-byte device"
        )));
    }
    // 64-bit filesystems: descriptors of 64..=1024 bytes, a power of two
    // (a short one made 0.9.3 read past its buffer and panic).
    let desc = u16::from_le_bytes([sb[0xfe], sb[0xff]]);
    if u32_at(0x60) & 0x80 != 0 && !(64..=1024).contains(&desc)
        || !desc.is_power_of_two() && desc != 0
    {
        return Err(BrowseError::Unreadable(format!(
            "damaged ext4 superblock: group descriptor size {desc}"
        )));
    }
    guard(|| Ext4::load(reader))?.map_err(|e| BrowseError::Unreadable(format!("ext4: {e}")))
}

/// Runs one call into `ext4-view` (third-party code), turning a panic into
/// an error. Only library calls go through here: our own code must not
/// panic at all. Under `cfg(fuzzing)` nothing is caught, so the fuzzer
/// sees the library's panics instead of counting them as handled.
#[cfg(not(fuzzing))]
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, BrowseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
        BrowseError::Unreadable(
            "the ext4 reader failed on this image (a damaged filesystem)".into(),
        )
    })
}

#[cfg(fuzzing)]
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, BrowseError> {
    Ok(f())
}

/// A file of `ext4-view` read through [`guard`]: the tar writer pulls the
/// bytes, so each library read is guarded on its own.
struct Guarded(ext4_view::File);

impl Read for Guarded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        guard(|| self.0.read(buf)).map_err(std::io::Error::other)?
    }
}

fn check_path(path: &str) -> Result<(), BrowseError> {
    if !path.starts_with('/') || path.contains('\0') || path.split('/').any(|c| c == "..") {
        return Err(BrowseError::Invalid(format!(
            "path {path:?} must be absolute, without '..' or NUL"
        )));
    }
    Ok(())
}

fn kind_name(t: ext4_view::FileType) -> &'static str {
    if t.is_regular_file() {
        "file"
    } else if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_block_dev() {
        "block"
    } else if t.is_char_dev() {
        "char"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "socket"
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Browsable for Ext4 {
    fn fs_type(&self) -> &'static str {
        "ext4"
    }

    fn entry(&self, path: &str, name: String) -> Result<Entry, BrowseError> {
        let m = guard(|| self.symlink_metadata(path))?.map_err(|e| ext4_err(e, path))?;
        let target = if m.is_symlink() {
            Some(
                guard(|| self.read_link(path))?
                    .map_err(|e| ext4_err(e, path))?
                    .display()
                    .to_string(),
            )
        } else {
            None
        };
        Ok(Entry {
            name,
            path: path.to_string(),
            kind: kind_name(m.file_type()).into(),
            size: m.len(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            target,
        })
    }

    fn names(&self, path: &str) -> Result<Vec<String>, BrowseError> {
        let mut names: Vec<String> = Vec::new();
        let mut dir = guard(|| self.read_dir(path))?.map_err(|e| ext4_err(e, path))?;
        while let Some(e) = guard(|| dir.next())? {
            let e = e.map_err(|e| ext4_err(e, path))?;
            let n = e
                .file_name()
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|_| e.file_name().display().to_string());
            if n != "." && n != ".." {
                names.push(n);
            }
        }
        Ok(names)
    }

    fn open(&self, path: &str) -> Result<(u64, Box<dyn Read + '_>), BrowseError> {
        let f = guard(|| Ext4::open(self, path))?.map_err(|e| ext4_err(e, path))?;
        Ok((f.metadata().len(), Box::new(Guarded(f))))
    }
}

/// The last component of a path (`/` for the root).
pub fn base_name(path: &str) -> String {
    path.rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("/")
        .to_string()
}

/// Stat of one path (symlinks not followed).
pub fn stat(fs: &dyn Browsable, path: &str) -> Result<Entry, BrowseError> {
    check_path(path)?;
    fs.entry(path, base_name(path))
}

/// A directory's entries (without `.` and `..`), sorted by name; at most
/// `limit` after skipping `offset` (large directories page).
pub fn list(
    fs: &dyn Browsable,
    path: &str,
    offset: usize,
    limit: usize,
) -> Result<Vec<Entry>, BrowseError> {
    check_path(path)?;
    let mut names = fs.names(path)?;
    names.sort();
    names.dedup();
    names
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|n| {
            let p = join(path, &n);
            fs.entry(&p, n)
        })
        .collect()
}

/// Streams a regular file (symlinks followed) to `out` in 1 MiB pieces;
/// `size` is called with its length first.
pub fn copy_file(
    fs: &dyn Browsable,
    path: &str,
    size: &mut dyn FnMut(u64),
    out: &mut dyn Write,
) -> Result<u64, BrowseError> {
    check_path(path)?;
    let (len, mut f) = fs.open(path)?;
    size(len);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| BrowseError::Unreadable(format!("{path}: {e}")))?;
        if n == 0 {
            return Ok(total);
        }
        out.write_all(&buf[..n])
            .map_err(|e| BrowseError::Unreadable(format!("writing {path}: {e}")))?;
        total += n as u64;
    }
}

/// Writes a tar of the tree at `path` (files, directories, symlinks;
/// special files are skipped) to `out`.
pub fn tar_tree(fs: &dyn Browsable, path: &str, out: &mut dyn Write) -> Result<u64, BrowseError> {
    let top = stat(fs, path)?;
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    let io = |e: std::io::Error| BrowseError::Unreadable(format!("writing the tar: {e}"));
    let base = if top.kind == "dir" {
        path.trim_end_matches('/').to_string()
    } else {
        String::new()
    };
    let mut stack = vec![top];
    let mut count = 0u64;
    while let Some(e) = stack.pop() {
        let rel = e
            .path
            .strip_prefix(&base)
            .unwrap_or(&e.path)
            .trim_start_matches('/');
        let name = if rel.is_empty() {
            ".".to_string()
        } else {
            rel.to_string()
        };
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode as u32 & 0o7777);
        h.set_uid(e.uid as u64);
        h.set_gid(e.gid as u64);
        h.set_mtime(0);
        match e.kind.as_str() {
            "dir" => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{name}/"), std::io::empty())
                    .map_err(io)?;
                let mut kids = list(fs, &e.path, 0, usize::MAX)?;
                kids.reverse();
                stack.extend(kids);
            }
            "file" => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.size);
                let (len, f) = fs.open(&e.path)?;
                // The size in the header is the one the reader will give.
                h.set_size(len);
                b.append_data(&mut h, &name, f).map_err(io)?;
            }
            "symlink" => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &name, e.target.clone().unwrap_or_default())
                    .map_err(io)?;
            }
            _ => continue,
        }
        count += 1;
    }
    b.finish().map_err(io)?;
    Ok(count)
}

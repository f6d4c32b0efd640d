//! File-level restore without the kernel: a snapshot's ext4 filesystem
//! (on the whole disk or in a partition) read in process with `ext4-view`.
//! Listing, stat, streaming a file, streaming a tar of a directory.

use std::io::{Read, Write};
use std::sync::Arc;

use cdmfs::{Pool, Target};
use ext4_view::{Ext4, Ext4Error, Ext4Read};
use serde::Serialize;

use crate::partition::{read_table, Partition};

#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The image holds no filesystem we can read, or a damaged one.
    #[error("{0}")]
    Unreadable(String),
    #[error("{0}")]
    Engine(#[from] cdmfs::Error),
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

/// Reads a byte range of a target, within one partition.
struct Slice {
    pool: Arc<Pool>,
    target: Target,
    base: u64,
    len: u64,
}

impl Ext4Read for Slice {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start
            .checked_add(dst.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                format!(
                    "read at {start} past the end of the filesystem ({} bytes)",
                    self.len
                )
            })?;
        let _ = end;
        self.pool.read(self.target, self.base + start, dst)?;
        Ok(())
    }
}

/// Partitions of a target (empty: no table).
pub fn partitions(pool: &Arc<Pool>, target: Target) -> Result<Vec<Partition>, BrowseError> {
    let (size, _) = pool.geometry(target)?;
    let p = pool.clone();
    read_table(
        &mut |off, dst| p.read(target, off, dst).map_err(|e| e.to_string()),
        size,
    )
    .map_err(|e| BrowseError::Unreadable(e.to_string()))
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

/// Opens the ext4 filesystem of a target. `partition`: `None` finds it (the
/// whole disk if there is no partition table, else the first partition
/// holding ext2/3/4), `Some(0)` the whole disk, `Some(n)` partition n.
pub fn open(pool: &Arc<Pool>, target: Target, partition: Option<u32>) -> Result<Ext4, BrowseError> {
    let (size, _) = pool.geometry(target)?;
    let load = |base: u64, len: u64| {
        Ext4::load(Box::new(Slice {
            pool: pool.clone(),
            target,
            base,
            len,
        }))
    };
    let parts = match partition {
        Some(0) => Vec::new(),
        _ => partitions(pool, target)?,
    };
    match partition {
        Some(0) => load(0, size).map_err(|e| {
            BrowseError::Unreadable(format!(
                "no readable ext4 filesystem on the whole disk: {e}"
            ))
        }),
        Some(n) => {
            let p = parts
                .iter()
                .find(|p| p.number == n)
                .ok_or_else(|| BrowseError::NotFound(format!("partition {n}")))?;
            load(p.start, p.len).map_err(|e| {
                BrowseError::Unreadable(format!(
                    "no readable ext4 filesystem in partition {n}: {e}"
                ))
            })
        }
        None if parts.is_empty() => load(0, size).map_err(|e| {
            BrowseError::Unreadable(format!(
                "no partition table and no readable ext4 filesystem: {e}"
            ))
        }),
        None => {
            let mut why = Vec::new();
            for p in &parts {
                match load(p.start, p.len) {
                    Ok(fs) => return Ok(fs),
                    Err(e) => why.push(format!("partition {}: {e}", p.number)),
                }
            }
            Err(BrowseError::Unreadable(format!(
                "no partition holds a readable ext4 filesystem ({})",
                why.join("; ")
            )))
        }
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

fn entry(fs: &Ext4, path: &str, name: String) -> Result<Entry, BrowseError> {
    let m = fs.symlink_metadata(path).map_err(|e| ext4_err(e, path))?;
    let target = if m.is_symlink() {
        Some(
            fs.read_link(path)
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

/// Stat of one path (symlinks not followed).
pub fn stat(fs: &Ext4, path: &str) -> Result<Entry, BrowseError> {
    check_path(path)?;
    let name = path
        .rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("/")
        .to_string();
    entry(fs, path, name)
}

/// A directory's entries (without `.` and `..`), sorted by name; at most
/// `limit` after skipping `offset` (large directories page).
pub fn list(fs: &Ext4, path: &str, offset: usize, limit: usize) -> Result<Vec<Entry>, BrowseError> {
    check_path(path)?;
    let mut names: Vec<String> = Vec::new();
    for e in fs.read_dir(path).map_err(|e| ext4_err(e, path))? {
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
    names.sort();
    names
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|n| {
            let p = join(path, &n);
            entry(fs, &p, n)
        })
        .collect()
}

/// Streams a regular file (symlinks followed) to `out` in 1 MiB pieces;
/// `size` is called with its length first.
pub fn copy_file(
    fs: &Ext4,
    path: &str,
    size: &mut dyn FnMut(u64),
    out: &mut dyn Write,
) -> Result<u64, BrowseError> {
    check_path(path)?;
    let mut f = fs.open(path).map_err(|e| ext4_err(e, path))?;
    size(f.metadata().len());
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
pub fn tar_tree(fs: &Ext4, path: &str, out: &mut dyn Write) -> Result<u64, BrowseError> {
    check_path(path)?;
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
                let f = fs.open(e.path.as_str()).map_err(|x| ext4_err(x, &e.path))?;
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

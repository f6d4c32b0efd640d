//! File-level restore from the pool: a snapshot's ext4 filesystem (on the
//! whole disk or in a partition) found and opened through the engine; the
//! reading itself (listing, stat, streaming a file or a tar) is
//! `cdm_disk::browse`, wrapped here so that every call answers with the one
//! error type that also says what the engine refused.

use std::io::Write;
use std::sync::Arc;

use cdm_disk::browse::{self as disk, Ext4, Slice};
use cdm_disk::partition::{read_table, Partition};
use cdmfs::{Pool, Target};

pub use cdm_disk::browse::Entry;

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

impl From<disk::BrowseError> for BrowseError {
    fn from(e: disk::BrowseError) -> Self {
        match e {
            disk::BrowseError::NotFound(m) => BrowseError::NotFound(m),
            disk::BrowseError::Invalid(m) => BrowseError::Invalid(m),
            disk::BrowseError::Unreadable(m) => BrowseError::Unreadable(m),
        }
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

/// Opens the ext4 filesystem of a target. `partition`: `None` finds it (the
/// whole disk if there is no partition table, else the first partition
/// holding ext2/3/4), `Some(0)` the whole disk, `Some(n)` partition n.
pub fn open(pool: &Arc<Pool>, target: Target, partition: Option<u32>) -> Result<Ext4, BrowseError> {
    let (size, _) = pool.geometry(target)?;
    let load = |base: u64, len: u64| {
        let pool = pool.clone();
        let read = move |off: u64, dst: &mut [u8]| pool.read(target, off, dst);
        disk::load(Box::new(Slice::new(read, base, len)), len).map_err(BrowseError::from)
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

/// [`cdm_disk::browse::stat`].
pub fn stat(fs: &Ext4, path: &str) -> Result<Entry, BrowseError> {
    Ok(disk::stat(fs, path)?)
}

/// [`cdm_disk::browse::list`].
pub fn list(fs: &Ext4, path: &str, offset: usize, limit: usize) -> Result<Vec<Entry>, BrowseError> {
    Ok(disk::list(fs, path, offset, limit)?)
}

/// [`cdm_disk::browse::copy_file`].
pub fn copy_file(
    fs: &Ext4,
    path: &str,
    size: &mut dyn FnMut(u64),
    out: &mut dyn Write,
) -> Result<u64, BrowseError> {
    Ok(disk::copy_file(fs, path, size, out)?)
}

/// [`cdm_disk::browse::tar_tree`].
pub fn tar_tree(fs: &Ext4, path: &str, out: &mut dyn Write) -> Result<u64, BrowseError> {
    Ok(disk::tar_tree(fs, path, out)?)
}

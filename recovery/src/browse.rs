//! File-level restore from the pool: a snapshot's filesystem (ext4, XFS
//! or NTFS; on the whole disk or in a partition) found and opened through
//! the engine; the readers are `cdm_disk::browse` (ext4) and
//! `cdm_inspect::browse` (XFS, NTFS, and which one a partition holds);
//! listing, stat, streaming a file or a tar are `cdm_disk::browse`'s, over
//! any of them. [`BrowseError`] adds what the engine refused to its kinds.

use std::sync::Arc;

use cdm_disk::browse::{self as disk, Browsable};
use cdm_disk::partition::{read_table, Partition};
use cdmfs::{Pool, Target};

/// What the engine refused, or what the reading found (`cdm_disk`'s kinds:
/// not found, invalid, unreadable).
#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    #[error(transparent)]
    Disk(#[from] disk::BrowseError),
    #[error("{0}")]
    Engine(#[from] cdmfs::Error),
}

fn unreadable(m: String) -> BrowseError {
    BrowseError::Disk(disk::BrowseError::Unreadable(m))
}

/// Partitions of a target (empty: no table).
pub fn partitions(pool: &Pool, target: Target) -> Result<Vec<Partition>, BrowseError> {
    let (size, _) = pool.geometry(target)?;
    read_table(
        &mut |off, dst| pool.read(target, off, dst).map_err(|e| e.to_string()),
        size,
    )
    .map_err(|e| unreadable(e.to_string()))
}

/// A target of the pool as the readers of `cdm_inspect` read a disk.
struct PoolDisk {
    pool: Arc<Pool>,
    target: Target,
    size: u64,
}

impl cdm_inspect::Disk for PoolDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.pool
            .read(self.target, off, buf)
            .map_err(|e| e.to_string())
    }
}

/// Opens the filesystem of a target (ext2/3/4, XFS or NTFS). `partition`:
/// `None` finds it (the whole disk if there is no partition table, else
/// the first partition holding a filesystem we read), `Some(0)` the whole
/// disk, `Some(n)` partition n.
pub fn open(
    pool: &Arc<Pool>,
    target: Target,
    partition: Option<u32>,
) -> Result<Box<dyn Browsable>, BrowseError> {
    let (size, _) = pool.geometry(target)?;
    let disk = cdm_inspect::Shared::new(Box::new(PoolDisk {
        pool: pool.clone(),
        target,
        size,
    }));
    let load = |base: u64, len: u64| {
        cdm_inspect::browse::open(disk.clone(), base, len).map_err(BrowseError::from)
    };
    let parts = match partition {
        Some(0) => Vec::new(),
        _ => partitions(pool, target)?,
    };
    match partition {
        Some(0) => load(0, size)
            .map_err(|e| unreadable(format!("no readable filesystem on the whole disk: {e}"))),
        Some(n) => {
            let p = parts
                .iter()
                .find(|p| p.number == n)
                .ok_or_else(|| disk::BrowseError::NotFound(format!("partition {n}")))?;
            load(p.start, p.len)
                .map_err(|e| unreadable(format!("no readable filesystem in partition {n}: {e}")))
        }
        None if parts.is_empty() => load(0, size).map_err(|e| {
            unreadable(format!(
                "no partition table and no readable filesystem: {e}"
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
            Err(unreadable(format!(
                "no partition holds a readable filesystem ({})",
                why.join("; ")
            )))
        }
    }
}

//! The pool as files: `volumes/NAME/disk` (read-write) and
//! `snapshots/VOLUME/ID/disk` (read-only), for loop devices, instant
//! mounts and tools that want a file. A catalog over the pool served by
//! `cdm_disk::fuse` (worker threads, requests up to 1 MiB); fsync commits
//! the pool.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cdm_disk::fuse::{self as server, Attr, Catalog, DirEntry, DiskFile, Errno, Kind, StatFs};
use cdmfs::{Pool, Target};

pub use cdm_disk::fuse::{clear_stale, set_readahead, Mounted};

const ROOT: u64 = server::ROOT;
const VOLUMES: u64 = 2;
const SNAPSHOTS: u64 = 3;
const KIND_SHIFT: u64 = 56;
const VOL_DIR: u64 = 1;
const VOL_DISK: u64 = 2;
const SNAPVOL_DIR: u64 = 3;
const SNAP_DIR: u64 = 4;
const SNAP_DISK: u64 = 5;
/// Attributes may change (volumes grow, snapshots come and go): cache briefly.
const TTL: Duration = Duration::from_secs(1);
/// Readahead for the view's files. The kernel gives a FUSE mount 128 KiB,
/// which caps buffered sequential reads (dd, cp, a loop device) at about a
/// third of what NBD reaches; 4 MiB lets them match it
/// (docs/benchmarks.md).
const READAHEAD_KB: u32 = 4096;

fn ino(kind: u64, id: u64) -> u64 {
    (kind << KIND_SHIFT) | id
}
fn split(ino: u64) -> (u64, u64) {
    (ino >> KIND_SHIFT, ino & ((1 << KIND_SHIFT) - 1))
}
fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// Mounts the view of `pool` at `dir` (an absolute path; created if
/// missing, a stale view left there by a dead process detached first) with
/// `threads` I/O workers.
pub fn mount(pool: Arc<Pool>, dir: &Path, threads: usize) -> std::io::Result<Mounted> {
    let opts = server::Options {
        subtype: "cdm".into(),
        workers: threads,
        ttl: TTL,
        read_only: false,
        allow_other: true,
        direct_io: false,
        readahead_kb: Some(READAHEAD_KB),
        block_size: 4096,
    };
    server::mount(PoolView { pool }, dir, &opts)
}

/// The tree of the pool's volumes and snapshots.
struct PoolView {
    pool: Arc<Pool>,
}

fn dir_attr(ino: u64, ns: u64) -> Attr {
    Attr {
        ino,
        kind: Kind::Dir,
        size: 0,
        read_only: false,
        time: time(ns),
    }
}

fn file_attr(ino: u64, size: u64, ns: u64, writable: bool) -> Attr {
    Attr {
        ino,
        kind: Kind::File,
        size,
        read_only: !writable,
        time: time(ns),
    }
}

fn entry(ino: u64, name: String, kind: Kind) -> DirEntry {
    DirEntry { ino, name, kind }
}

impl Catalog for PoolView {
    fn attr(&self, ino: u64) -> Option<Attr> {
        let (vols, snaps) = self.pool.catalog().ok()?;
        let (kind, id) = split(ino);
        match (kind, ino) {
            (0, ROOT | VOLUMES | SNAPSHOTS) => Some(dir_attr(ino, 0)),
            (VOL_DIR, _) | (SNAPVOL_DIR, _) => vols
                .iter()
                .find(|v| v.id == id)
                .map(|v| dir_attr(ino, v.created_ns)),
            (VOL_DISK, _) => vols
                .iter()
                .find(|v| v.id == id)
                .map(|v| file_attr(ino, v.size, v.created_ns, true)),
            (SNAP_DIR, _) => snaps
                .iter()
                .find(|s| s.id == id)
                .map(|s| dir_attr(ino, s.created_ns)),
            (SNAP_DISK, _) => snaps
                .iter()
                .find(|s| s.id == id)
                .map(|s| file_attr(ino, s.size, s.created_ns, false)),
            _ => None,
        }
    }

    fn list(&self, ino: u64) -> Option<Vec<DirEntry>> {
        let (vols, snaps) = self.pool.catalog().ok()?;
        let (kind, id) = split(ino);
        Some(match (kind, ino) {
            (0, ROOT) => vec![
                entry(VOLUMES, "volumes".into(), Kind::Dir),
                entry(SNAPSHOTS, "snapshots".into(), Kind::Dir),
            ],
            (0, VOLUMES) => vols
                .iter()
                .map(|v| entry(ino_of(VOL_DIR, v.id), v.name.clone(), Kind::Dir))
                .collect(),
            (0, SNAPSHOTS) => vols
                .iter()
                .filter(|v| snaps.iter().any(|s| s.volume_id == v.id))
                .map(|v| entry(ino_of(SNAPVOL_DIR, v.id), v.name.clone(), Kind::Dir))
                .collect(),
            (VOL_DIR, _) => vec![entry(ino_of(VOL_DISK, id), "disk".into(), Kind::File)],
            (SNAPVOL_DIR, _) => snaps
                .iter()
                .filter(|s| s.volume_id == id)
                .map(|s| entry(ino_of(SNAP_DIR, s.id), s.id.to_string(), Kind::Dir))
                .collect(),
            (SNAP_DIR, _) => vec![entry(ino_of(SNAP_DISK, id), "disk".into(), Kind::File)],
            _ => return None,
        })
    }

    fn open(&self, ino: u64) -> Result<Arc<dyn DiskFile>, Errno> {
        let target = match split(ino) {
            (VOL_DISK, id) => Target::Volume(id),
            (SNAP_DISK, id) => Target::Snapshot(id),
            _ => return Err(libc::EISDIR),
        };
        Ok(Arc::new(PoolDisk {
            pool: self.pool.clone(),
            target,
        }))
    }

    fn statfs(&self) -> Result<StatFs, Errno> {
        let s = self.pool.space().map_err(|e| e.errno())?;
        let free = s.free_bytes / 4096;
        Ok(StatFs {
            blocks: s.total_bytes / 4096,
            bfree: free,
            bavail: free,
            files: 0,
            ffree: 0,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }
}

fn ino_of(kind: u64, id: u64) -> u64 {
    ino(kind, id)
}

/// A volume (read-write) or a snapshot (read-only) of the pool as a disk.
/// Sizes are asked of the pool on every read: a volume may grow while
/// open.
struct PoolDisk {
    pool: Arc<Pool>,
    target: Target,
}

impl DiskFile for PoolDisk {
    fn size(&self) -> u64 {
        self.pool.geometry(self.target).map(|g| g.0).unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        !matches!(self.target, Target::Volume(_))
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, Errno> {
        let (len, _) = self.pool.geometry(self.target).map_err(|e| e.errno())?;
        let n = (buf.len() as u64).min(len.saturating_sub(off)) as usize;
        self.pool
            .read(self.target, off, &mut buf[..n])
            .map_err(|e| e.errno())?;
        Ok(n)
    }

    fn write_at(&self, data: &[u8], off: u64) -> Result<(), Errno> {
        let Target::Volume(v) = self.target else {
            return Err(libc::EROFS);
        };
        self.pool.write(v, off, data).map_err(|e| e.errno())
    }

    /// fsync commits the whole pool.
    fn flush(&self) -> Result<(), Errno> {
        self.pool.flush().map_err(|e| e.errno())
    }
}

//! Exports backed by a cdmfs pool: a volume by its name, a snapshot as
//! `VOLUME@SNAPSHOT` (read-only). Every export shares the pool, so a flush
//! through any of them commits them all (CAN_MULTI_CONN).

use std::sync::Arc;

use cdmfs::{Pool, Target};
use nbd_proto::codec::{EINVAL, EIO, ENOMEM, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, MAX_PAYLOAD};

use super::{
    BlockSize, Export, ExportCatalog, ExportEntry, ExportError, ExportResult, Extent, ZeroFlags,
};

fn nbd_errno(e: &cdmfs::Error) -> u32 {
    match e.errno() {
        libc::EPERM => EPERM,
        // NBD has no EACCES: a sealed or encrypted export whose key is not
        // loaded answers the nearest value, never EIO (not a device fault).
        libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        _ => EIO,
    }
}

impl From<cdmfs::Error> for ExportError {
    fn from(e: cdmfs::Error) -> ExportError {
        match e {
            // An open export's volume or snapshot is only missing once it was deleted.
            cdmfs::Error::NotFound(_) => ExportError::Gone(format!("export deleted: {e}")),
            e => ExportError::failed(nbd_errno(&e), e.to_string()),
        }
    }
}

/// The volumes and snapshots of a pool.
pub struct PoolCatalog {
    pool: Arc<Pool>,
}

impl PoolCatalog {
    pub fn new(pool: Arc<Pool>) -> PoolCatalog {
        PoolCatalog { pool }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl ExportCatalog for PoolCatalog {
    fn open(&self, name: &str) -> ExportResult<Arc<dyn Export>> {
        Ok(Arc::new(PoolExport::open(self.pool.clone(), name)?))
    }

    fn list(&self) -> Vec<ExportEntry> {
        let mut out = Vec::new();
        if let Ok(vols) = self.pool.list_volumes() {
            for v in vols {
                out.push(ExportEntry {
                    name: v.name.clone(),
                    description: format!("volume, {} bytes", v.size),
                });
            }
        }
        if let Ok(snaps) = self.pool.list_snapshots(None) {
            for s in snaps {
                out.push(ExportEntry {
                    name: format!("{}@{}", s.volume, s.id),
                    description: format!("snapshot {:?} (read-only)", s.label),
                });
            }
        }
        out
    }

    fn flush_all(&self) -> ExportResult<()> {
        Ok(self.pool.flush()?)
    }
}

/// One volume or snapshot of a pool.
pub struct PoolExport {
    pool: Arc<Pool>,
    target: Target,
    size: u64,
    block: u32,
}

impl PoolExport {
    /// `VOLUME` or `VOLUME@SNAPSHOT`.
    pub fn open(pool: Arc<Pool>, name: &str) -> ExportResult<PoolExport> {
        // A name that does not exist is unknown here, not deleted.
        let plain = |e: cdmfs::Error| ExportError::failed(nbd_errno(&e), e.to_string());
        let target = pool.resolve(name).map_err(plain)?;
        let (size, block) = pool.geometry(target).map_err(plain)?;
        Ok(PoolExport {
            pool,
            target,
            size,
            block,
        })
    }

    /// The volume writes go to; a snapshot has none.
    fn volume(&self) -> ExportResult<u64> {
        match self.target {
            Target::Volume(v) => Ok(v),
            Target::Snapshot(_) => Err(ExportError::failed(EPERM, "a snapshot is read-only")),
        }
    }

    fn fua(&self, fua: bool) -> ExportResult<()> {
        if fua {
            self.pool.flush()?;
        }
        Ok(())
    }
}

impl Export for PoolExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        matches!(self.target, Target::Snapshot(_))
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_size(&self) -> BlockSize {
        BlockSize {
            minimum: 1,
            preferred: self.block.clamp(512, 64 << 10),
            maximum: MAX_PAYLOAD,
        }
    }

    fn description(&self) -> String {
        match self.target {
            Target::Volume(_) => "cdm volume".to_string(),
            Target::Snapshot(id) => format!("cdm snapshot {id} (read-only)"),
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        Ok(self.pool.read(self.target, offset, buf)?)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.pool.write(self.volume()?, offset, data)?;
        self.fua(fua)
    }

    fn flush(&self) -> ExportResult<()> {
        Ok(self.pool.flush()?)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.pool.trim(self.volume()?, offset, len)?;
        self.fua(fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        let vol = self.volume()?;
        if flags.may_trim {
            // Unmapping is the fast way: no data is written.
            self.pool.write_zeroes(vol, offset, len)?;
        } else {
            if flags.fast {
                return Err(ExportError::Unsupported(
                    "allocated zeroes are not fast".into(),
                ));
            }
            self.pool.write_zeroes_allocated(vol, offset, len)?;
        }
        self.fua(flags.fua)
    }

    fn block_status(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        let runs = self.pool.block_status(self.target, offset, len)?;
        Ok(runs
            .iter()
            .map(|r| {
                if r.allocated {
                    Extent::allocated(r.len)
                } else {
                    Extent::hole(r.len)
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod errno_tests {
    use super::*;

    #[test]
    fn a_missing_key_is_not_an_io_error() {
        for e in [
            cdmfs::Error::KeyRequired,
            cdmfs::Error::SealKeyRequired("s".into()),
        ] {
            assert_eq!(nbd_errno(&e), EPERM, "{e}");
        }
    }
}

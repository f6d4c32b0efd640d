//! The NBD exports of the appliance: the pool's volumes and snapshots, but
//! a replica volume's live export is read-only (only the receiver writes
//! it, through the pool); its points are exported as any others.

use std::sync::Arc;

use cdmfs::Pool;
use nbd_server::export::ExportResult;
use nbd_server::{
    BlockSize, Export, ExportCatalog, ExportEntry, ExportError, Extent, PoolCatalog, ZeroFlags,
};

use crate::state::State;

/// `EPERM` on the NBD wire.
const NBD_EPERM: u32 = 1;

/// [`PoolCatalog`] that opens replica volumes read-only.
pub struct ReplicaCatalog {
    inner: PoolCatalog,
    state: Arc<State>,
}

impl ReplicaCatalog {
    pub fn new(pool: Arc<Pool>, state: Arc<State>) -> ReplicaCatalog {
        ReplicaCatalog {
            inner: PoolCatalog::new(pool),
            state,
        }
    }
}

impl ExportCatalog for ReplicaCatalog {
    fn open(&self, name: &str) -> ExportResult<Arc<dyn Export>> {
        let e = self.inner.open(name)?;
        if name.contains('@') {
            return Ok(e);
        }
        match super::replicas::get(&self.state, name) {
            Ok(None) => Ok(e),
            Ok(Some(_)) => Ok(Arc::new(ReadOnly(e))),
            // Unknown is not writable: a replica must never take a write.
            Err(err) => Err(ExportError::failed(
                5, // EIO
                format!("cannot tell whether {name} is a replica: {err}"),
            )),
        }
    }

    fn list(&self) -> Vec<ExportEntry> {
        self.inner.list()
    }

    fn flush_all(&self) -> ExportResult<()> {
        self.inner.flush_all()
    }
}

/// An export whose writes are refused.
struct ReadOnly(Arc<dyn Export>);

fn refused() -> ExportError {
    ExportError::failed(NBD_EPERM, "a replica volume is read-only")
}

impl Export for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        self.0.can_multi_conn()
    }
    fn block_size(&self) -> BlockSize {
        self.0.block_size()
    }
    fn description(&self) -> String {
        format!("{} (replica, read-only)", self.0.description())
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> ExportResult<()> {
        Err(refused())
    }
    fn flush(&self) -> ExportResult<()> {
        self.0.flush()
    }
    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> ExportResult<()> {
        Err(refused())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> ExportResult<()> {
        Err(refused())
    }
    fn block_status(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        self.0.block_status(offset, len)
    }
    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.0.cache(offset, len)
    }
}

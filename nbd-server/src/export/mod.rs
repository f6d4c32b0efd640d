//! The one interface through which the server serves any export (as
//! nbdkit's `struct backend`): [`Export`] for the data of one export,
//! [`ExportCatalog`] to find exports by name. The handshake and transmission
//! code know nothing else of what is behind an export.

use std::sync::Arc;

use nbd_proto::codec::{ENOTSUP, ESHUTDOWN, MAX_PAYLOAD, STATE_HOLE, STATE_ZERO};

#[cfg(any(test, feature = "test-utils"))]
pub mod mem;
pub mod pool;

/// Why an export operation (or opening an export) failed. The message goes
/// to the client with the NBD errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The export cannot do this the way the client asked (a "fast" zero
    /// that would not be fast): an answer, not a failure worth a warning.
    #[error("{0}")]
    Unsupported(String),
    /// The operation failed; `errno` is an NBD error number
    /// (`nbd_proto::codec::EIO`, ...).
    #[error("{message}")]
    Failed { errno: u32, message: String },
    /// The export no longer exists (its volume or snapshot was deleted):
    /// the server answers `ESHUTDOWN` and ends the connection, since every
    /// later request would fail the same way.
    #[error("{0}")]
    Gone(String),
}

impl ExportError {
    pub fn failed(errno: u32, message: impl Into<String>) -> ExportError {
        ExportError::Failed {
            errno,
            message: message.into(),
        }
    }

    /// The NBD errno told to the client.
    pub fn errno(&self) -> u32 {
        match self {
            ExportError::Unsupported(_) => ENOTSUP,
            ExportError::Failed { errno, .. } => *errno,
            ExportError::Gone(_) => ESHUTDOWN,
        }
    }
}

pub type ExportResult<T> = Result<T, ExportError>;

/// Block sizes advertised with `NBD_INFO_BLOCK_SIZE`. The server caps
/// `maximum` at [`MAX_PAYLOAD`] and refuses larger reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        }
    }
}

/// How to write zeroes (`NBD_CMD_WRITE_ZEROES` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (no `NBD_CMD_FLAG_NO_HOLE`).
    pub may_trim: bool,
    /// Fail with [`ExportError::Unsupported`] rather than be slow
    /// (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
    /// Durable before the reply (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// A run of the `base:allocation` context: `len` bytes with the
/// `NBD_STATE_*` bits `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub state: u32,
}

impl Extent {
    pub fn allocated(len: u64) -> Extent {
        Extent { len, state: 0 }
    }
    /// Unallocated, reads as zeroes.
    pub fn hole(len: u64) -> Extent {
        Extent {
            len,
            state: STATE_HOLE | STATE_ZERO,
        }
    }
}

/// One open export. The server checks ranges, flags and read-only before it
/// calls these, so an implementation sees only requests within `size()` and
/// writes only when it is writable. Calls come from several worker threads
/// (and connections) at once.
pub trait Export: Send + Sync {
    /// Size in bytes, fixed for the session.
    fn size(&self) -> u64;
    /// Refuse writes (`NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;
    /// Whether a FLUSH on one connection makes the writes of every other
    /// connection to this export durable (`NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool;
    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }
    /// Text for `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()>;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> ExportResult<()>;
    /// Deallocates a range; it reads as zeroes afterwards.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()>;
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()>;
    /// Allocation from `offset`, covering at most `len` bytes (less is
    /// fine: clients ask again for the rest).
    fn block_status(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>>;
    /// A hint to prefetch (`NBD_CMD_CACHE`); nothing by default.
    fn cache(&self, _offset: u64, _len: u64) -> ExportResult<()> {
        Ok(())
    }
}

/// An export's name and description, for `NBD_OPT_LIST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub description: String,
}

/// Where exports come from: open one by name, list them.
pub trait ExportCatalog: Send + Sync {
    /// Opens `name` (never empty: the server maps the empty name to its
    /// default export first).
    fn open(&self, name: &str) -> ExportResult<Arc<dyn Export>>;
    fn list(&self) -> Vec<ExportEntry>;
    /// Makes the writes to every export durable: the periodic commit and
    /// the last one at shutdown, for clients that never flush.
    fn flush_all(&self) -> ExportResult<()> {
        Ok(())
    }
}

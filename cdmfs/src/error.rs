//! Engine errors. Every failure the engine can meet has a variant with enough
//! context to name what is wrong (which pool block, which volume and offset).

use std::io;

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the cdmfs engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("not a cdmfs pool (bad magic in every superblock slot)")]
    BadMagic,
    #[error("pool format version {found} is newer than this program supports ({supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("pool is truncated: superblock says {expected} bytes, device has {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("corrupt pool: {0}")]
    Corrupt(String),
    #[error("checksum mismatch in {what} at pool block {block}")]
    MetadataChecksum { what: &'static str, block: u64 },
    #[error("checksum mismatch reading {target} at offset {offset} (pool block {block})")]
    DataChecksum {
        target: String,
        offset: u64,
        block: u64,
    },
    #[error("no space left in pool")]
    NoSpace,
    #[error("I/O out of range: offset {offset} + length {len} exceeds size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("read-only: {0}")]
    ReadOnly(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("wrong key: {0}")]
    WrongKey(String),
    #[error("this data is encrypted and the pool was opened without its key (--key-file or --passphrase-file)")]
    KeyRequired,
    /// A sealed volume's blocks need the keys of the seal (named by its
    /// id), which come from another appliance's pool key.
    #[error("volume data is sealed with another appliance's key (seal {0}): load that key with `cdmctl volume load-key`")]
    SealKeyRequired(String),
    /// The object-store tier could not serve tiered data (unreachable,
    /// no reader attached, an object missing).
    #[error("object-store tier: {0}")]
    Tier(String),
    #[error("the pool failed after an I/O error (a failed sync reloads from the device at the next flush; anything else: reopen it)")]
    Failed,
    /// Internal: a lookup that must not do I/O under the pool lock needs a
    /// node that is not cached. Never returned to callers.
    #[doc(hidden)]
    #[error("metadata node not cached")]
    NodeMiss,
}

impl Error {
    /// The errno an I/O layer (NBD, FUSE) should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::NoSpace => libc::ENOSPC,
            Error::OutOfRange { .. } | Error::Invalid(_) => libc::EINVAL,
            Error::NotFound(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::ReadOnly(_) => libc::EPERM,
            Error::Busy(_) => libc::EBUSY,
            Error::KeyRequired | Error::SealKeyRequired(_) | Error::WrongKey(_) => libc::EACCES,
            _ => libc::EIO,
        }
    }
}

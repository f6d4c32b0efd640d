//! cdmfs — the cdm pool engine.
//!
//! A pool lives on one file or block device. It holds volumes (stage disks
//! and clones), each a copy-on-write B+tree mapping logical blocks to
//! checksummed data extents, and snapshots that share a volume's tree in
//! O(1). A ring of checksummed superblocks points at the newest commit.
//! See `docs/on-disk-format.md` for the format and its crash-consistency
//! argument.
//!
//! The public surface is what the re-exports below list (used by
//! snapshotd, nbd-server, recovery and the `cdmfs` tool). Everything else
//! is the engine's own. The `test-utils` feature adds what tests, benches
//! and fuzzers need: `MemDev`, `CrashDev`, the on-disk `format` module and
//! the data codec in `pipeline`.

mod alloc;
mod check;
pub mod chunker;
mod dev;
mod error;
mod faultdev;
#[cfg(feature = "test-utils")]
pub mod format;
#[cfg(not(feature = "test-utils"))]
mod format;
#[cfg(feature = "test-utils")]
pub mod pipeline;
#[cfg(not(feature = "test-utils"))]
mod pipeline;
mod pool;
mod space;
mod store;
#[cfg(any(test, feature = "test-utils"))]
mod testdev;

pub use check::{FsckReport, ScrubError, ScrubReport};
pub use chunker::FastCdc;
pub use dev::{fully_allocated, BlockDev, FileDev};
pub use error::{Error, Result};
pub use faultdev::{FaultDev, FAULTS};
pub use format::DEFAULT_BLOCK_SIZE;
pub use pipeline::{Cipher, CryptoRec, DataPolicy, KeySource, SealRec, MAX_LEVEL};
pub use pool::{
    validate_name, Brief, DefragProgress, DiffStats, FormatOptions, Fragmentation, IoErrors,
    OpenOptions, PhysicalMap, Pool, PoolHealth, PoolState, Run, SnapshotInfo, SpaceInfo, Target,
    TierCommit, TierEntry, TierObject, TierPlaced, TierRead, VolumeInfo, MAX_POOL_BYTES,
    MAX_RECORD,
};
pub use space::{Reduction, ReductionReport, VolumeReduction};
#[cfg(feature = "test-utils")]
pub use testdev::{CrashDev, Fate, GateDev, MemDev, Unsynced, SECTOR};

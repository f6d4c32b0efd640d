//! cdmfs — the cdm pool engine.
//!
//! A pool lives on one file or block device. It holds volumes (stage disks
//! and clones), each a copy-on-write B+tree mapping logical blocks to
//! checksummed data extents, and snapshots that share a volume's tree in
//! O(1). A ring of checksummed superblocks points at the newest commit.
//! See `docs/on-disk-format.md` for the format and its crash-consistency
//! argument.

pub mod alloc;
pub mod check;
pub mod chunker;
pub mod dev;
pub mod error;
pub mod format;
pub mod pipeline;
pub mod pool;
pub mod space;
mod store;

pub use dev::{BlockDev, CrashDev, FileDev, MemDev};
pub use error::{Error, Result};
pub use format::DEFAULT_BLOCK_SIZE;
pub use pipeline::{Cipher, KeySource, Policy};
pub use pool::{
    Brief, FormatOptions, OpenOptions, PhysicalMap, Pool, Run, SnapshotInfo, SpaceInfo, Target,
    VolumeInfo,
};
pub use space::{Reduction, ReductionReport};

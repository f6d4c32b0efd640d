//! What the pool reports: volumes, snapshots, space, layout, and the
//! addresses of I/O.

use serde::Serialize;

use crate::pipeline::{DataPolicy, SealRec};

/// A volume (stage disk or clone) as listed.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_ns: u64,
    /// Snapshot this volume was cloned from.
    pub origin: Option<u64>,
    /// Bytes of data the volume maps.
    pub allocated_bytes: u64,
    /// Bytes only this volume references (freed if it is deleted).
    pub unique_bytes: u64,
    pub snapshots: usize,
    pub policy: DataPolicy,
    /// A sealed volume's seal (its blocks are ciphertext under a key this
    /// pool may not hold).
    pub seal: Option<SealRec>,
    /// Whether the seal's keys are loaded (reads and writes need them).
    pub seal_key_loaded: bool,
}

/// A snapshot as listed.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    pub id: u64,
    pub volume: String,
    pub volume_id: u64,
    pub label: String,
    pub created_ns: u64,
    pub metadata: serde_json::Value,
    pub size: u64,
    pub block_size: u32,
    pub allocated_bytes: u64,
    pub unique_bytes: u64,
    pub policy: DataPolicy,
    pub seal: Option<SealRec>,
    pub seal_key_loaded: bool,
    /// Part of its data is in the object-store tier (not recalled).
    pub tiered: bool,
}

/// A catalog entry without space accounting: cheap to list often.
#[derive(Clone, Debug, Serialize)]
pub struct Brief {
    pub id: u64,
    pub name: String,
    /// For snapshots, the id of their volume; for volumes, their own id.
    pub volume_id: u64,
    pub created_ns: u64,
    /// Clones: the snapshot they were made from.
    pub origin: Option<u64>,
    /// Logical size in bytes.
    pub size: u64,
    /// Snapshots: part of the data is in the object-store tier.
    pub tiered: bool,
}

/// Pool-wide space figures.
#[derive(Clone, Debug, Serialize)]
pub struct SpaceInfo {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub generation: u64,
    /// Part of `used_bytes` already freed, waiting for the commits after
    /// which it may be reused (deferred frees).
    pub freeing_bytes: u64,
    /// Commits after which all of `freeing_bytes` is reusable (a flush
    /// commits while space waits, so: periodic flushes).
    pub freeing_commits: u64,
}

/// Physical layout of one target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhysicalMap {
    /// Pool byte offsets of its tree nodes.
    pub nodes: Vec<u64>,
    /// (logical byte offset, pool byte offset, stored length) per extent.
    pub extents: Vec<(u64, u64, u32)>,
}

/// What an I/O addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Volume(u64),
    Snapshot(u64),
}

/// A mapped or unmapped run, for block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub allocated: bool,
}

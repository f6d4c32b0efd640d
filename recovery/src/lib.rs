//! Recovery without copying data first: a FUSE view of a pool's volumes
//! and snapshots (for loop devices and instant mounts), partition tables,
//! and file-level restore that reads a snapshot's ext4 filesystem in
//! process. Knows the engine only through `cdmfs::Pool`.

pub mod browse;
pub mod fuse;
pub mod host;
pub mod partition;

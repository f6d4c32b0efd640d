//! Recovery without copying data first, the pool-specific part: a FUSE
//! view of a pool's volumes and snapshots (for loop devices and instant
//! mounts) and file-level restore that finds and opens a snapshot's ext4
//! filesystem. Knows the engine only through `cdmfs::Pool`; partition
//! tables, ext4 reading, the host's mount plumbing and the FUSE server
//! itself are `cdm_disk`.

pub mod browse;
pub mod fuse;

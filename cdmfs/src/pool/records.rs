//! Catalog records as stored (JSON blobs keyed by kind and id) and the
//! checks every record and name passes.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::{CryptoRec, DataPolicy, SealRec};

/// Largest catalog record (snapshot metadata included).
pub const MAX_RECORD: usize = 256 * 1024;
pub(super) const KEY_VOLUME: u64 = 1 << 56;
pub(super) const KEY_SNAPSHOT: u64 = 2 << 56;
/// Pool-wide settings (the encryption key record).
pub(super) const KEY_POOL: u64 = 3 << 56;

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub(super) struct PoolRec {
    #[serde(default)]
    pub(super) crypto: Option<CryptoRec>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub(super) struct VolumeRec {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) size: u64,
    pub(super) block_size: u32,
    pub(super) created_ns: u64,
    pub(super) origin: Option<u64>,
    pub(super) root: u64,
    pub(super) root_csum: u32,
    pub(super) allocated_blocks: u64,
    #[serde(default, skip_serializing_if = "DataPolicy::is_plain")]
    pub(super) policy: DataPolicy,
    /// Sealed volumes: how their stored blocks were sealed (`seal.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) seal: Option<SealRec>,
    /// Mixed into the nonce of the seal this volume's lineage is sent
    /// raw with (`seal.rs`): random at creation, so a volume id that is
    /// used again (after a crash before a commit) never seals with a
    /// nonce an earlier volume used. None in records of older pools: their
    /// `created_ns` stands in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) seal_salt: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub(super) struct SnapshotRec {
    pub(super) id: u64,
    pub(super) volume_id: u64,
    pub(super) label: String,
    pub(super) created_ns: u64,
    pub(super) metadata: serde_json::Value,
    pub(super) root: u64,
    pub(super) root_csum: u32,
    pub(super) size: u64,
    pub(super) block_size: u32,
    pub(super) allocated_blocks: u64,
    #[serde(default, skip_serializing_if = "DataPolicy::is_plain")]
    pub(super) policy: DataPolicy,
    /// Sealed volumes: how their stored blocks were sealed (`seal.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) seal: Option<SealRec>,
    /// Mixed into the nonce of the seal this volume's lineage is sent
    /// raw with (`seal.rs`): random at creation, so a volume id that is
    /// used again (after a crash before a commit) never seals with a
    /// nonce an earlier volume used. None in records of older pools: their
    /// `created_ns` stands in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) seal_salt: Option<u64>,
    /// Some of its data is in the object-store tier and not recalled
    /// (`tier.rs`; the record is rewritten with its tree then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) tiered: bool,
}

impl VolumeRec {
    /// The salt of this volume's seal nonce (see `seal_salt`).
    pub(super) fn salt(&self) -> u64 {
        self.seal_salt.unwrap_or(self.created_ns)
    }
}

impl SnapshotRec {
    /// The salt of the seal nonce of the volume this snapshot was taken
    /// of (see `VolumeRec::seal_salt`).
    pub(super) fn salt(&self) -> u64 {
        self.seal_salt.unwrap_or(self.created_ns)
    }
}

/// Checks a volume name: 1–128 characters of `A-Za-z0-9._-`, not starting
/// with `.` or `-` (so names are safe as export names, paths and URLs).
pub fn validate_name(name: &str) -> Result<()> {
    cdm_common::names::check(name).map_err(|why| {
        Error::Invalid(format!(
            "bad name {name:?}: it {why}; use {}",
            cdm_common::names::RULE
        ))
    })
}

pub(super) fn check_block_size(bs: u32) -> Result<()> {
    if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "block size {bs} must be a power of two from 4 KiB to 1 MiB"
        )))
    }
}

/// Rejects a catalog record no version of this program writes.
pub(super) fn check_record(key: u64, size: u64, block_size: u32, root: u64) -> Result<()> {
    if check_block_size(block_size).is_err()
        || size == 0
        || size > (1 << 60)
        || (root != 0 && !(RESERVED_BLOCKS..MAX_BLOCK_ADDR).contains(&root))
    {
        return Err(Error::Corrupt(format!(
            "catalog record {key:#x} has impossible values"
        )));
    }
    Ok(())
}

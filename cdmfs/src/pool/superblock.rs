//! The superblock ring: formatting a device and finding the newest valid
//! superblock at open. Writing the next one is phase 2 of a commit
//! ([`super::commit`]).

use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::*;

use super::{now_ns, FormatOptions, Pool};

pub(super) fn read_sb_ring(dev: &dyn BlockDev) -> Result<Superblock> {
    let mut best: Option<Superblock> = None;
    let (mut magic_bad, mut torn, mut empty) = (0, 0, 0);
    let mut newer = None;
    for slot in 0..SB_SLOTS {
        let mut b = vec![0u8; SB_BYTES];
        dev.read_at(&mut b, slot * UNIT)?;
        match Superblock::decode(&b) {
            Ok(Some(sb)) => {
                if best.as_ref().is_none_or(|x| sb.generation > x.generation) {
                    best = Some(sb);
                }
            }
            Ok(None) => empty += 1,
            Err(SbError::Magic) => magic_bad += 1,
            Err(SbError::Torn) => torn += 1,
            Err(SbError::Version(v)) => newer = Some(v),
        }
    }
    if let Some(v) = newer {
        if best.is_none() || v > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: v,
                supported: FORMAT_VERSION,
            });
        }
    }
    match best {
        Some(sb) => {
            if torn > 0 {
                tracing::warn!(
                    torn,
                    generation = sb.generation,
                    "damaged superblock slot(s); using the newest valid one"
                );
            }
            Ok(sb)
        }
        None if torn == 0 && (magic_bad > 0 || empty == SB_SLOTS as usize) => Err(Error::BadMagic),
        None => Err(Error::Corrupt(format!(
            "no valid superblock: {torn} damaged, {magic_bad} with a foreign magic, {empty} empty"
        ))),
    }
}

impl Pool {
    /// Formats `dev` as an empty pool (its whole length).
    pub fn format(dev: &dyn BlockDev, opts: &FormatOptions) -> Result<()> {
        let len = dev.len()?;
        let total = len / UNIT;
        if total < RESERVED_BLOCKS + 64 {
            return Err(Error::Invalid(format!(
                "device of {len} bytes is too small for a pool (minimum {} bytes)",
                (RESERVED_BLOCKS + 64) * UNIT
            )));
        }
        let zero = vec![0u8; UNIT as usize];
        for slot in 0..SB_SLOTS {
            dev.write_at(&zero, slot * UNIT)?;
        }
        let mut uuid = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut uuid[..]);
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid,
            generation: 1,
            total_blocks: total,
            max_fanout: opts.max_fanout,
            catalog: Ptr::NULL,
            refcounts: Ptr::NULL,
            next_id: 1,
            commit_time_ns: now_ns(),
            dedup: Ptr::NULL,
            dedup_rev: Ptr::NULL,
            log_head: 0,
            log_blocks: 0,
            tier: Ptr::NULL,
            next_tier_id: 0,
            next_pack: 0,
        };
        dev.sync()?;
        dev.write_at(&sb.encode(), UNIT)?;
        dev.sync()?;
        Ok(())
    }
}

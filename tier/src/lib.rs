//! The object-storage tier's store side: an S3 client ([`S3Store`]) over
//! the `rusty-s3` SigV4 signer and `ureq`, its counters ([`TierMetrics`]),
//! a bounded read cache of pack objects on local disk ([`PackCache`]), the
//! reader the engine plugs in ([`TierReader`]) and the garbage collector of
//! packs no point refers to ([`gc()`]).
//!
//! This crate knows nothing of the pool: it stores and reads opaque pack
//! objects by id. What goes into a pack, and checking the bytes read back
//! against the extents' checksums, is the engine's job (the store does not
//! verify the content of ranged reads; see docs/design.md).
//!
//! Keys given to [`S3Store`] are relative to the configured prefix: the
//! store puts everything under `{prefix}`, packs under `{prefix}packs/`.

pub mod cache;
pub mod config;
pub mod error;
pub mod gc;
pub mod job;
pub mod limit;
pub mod metrics;
pub mod reader;
pub mod store;
pub mod xml;

pub use cache::{CacheConfig, PackCache};
pub use config::S3Config;
pub use error::TierError;
pub use gc::{gc, GcReport};
pub use job::{
    engine_reader, gc_and_repack, recall_point, tier_points, Control, JobError, PackSizes,
    RecallReport, TierGcReport, TierReport,
};
pub use metrics::{Op, TierMetrics};
pub use reader::TierReader;
pub use store::{DeleteReport, S3Store};

/// Where packs live, relative to the configured prefix.
pub const PACKS_DIR: &str = "packs/";

/// The key of pack `id`, relative to the prefix: `packs/{id:016x}` (fixed
/// width, so listing order is id order).
pub fn pack_key(id: u64) -> String {
    format!("{PACKS_DIR}{id:016x}")
}

/// The pack id of a key made by [`pack_key`]; `None` for anything else
/// (another width, upper-case digits, a suffix), so GC never takes a key
/// it did not make for a pack.
pub fn parse_pack_key(key: &str) -> Option<u64> {
    let hex = key.strip_prefix(PACKS_DIR)?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_keys_round_trip_and_strangers_are_refused() {
        for id in [0, 1, 0xabc, u64::MAX] {
            assert_eq!(parse_pack_key(&pack_key(id)), Some(id));
        }
        assert_eq!(pack_key(255), "packs/00000000000000ff");
        for bad in [
            "packs/ff",
            "packs/00000000000000FF",
            "packs/00000000000000ff.tmp",
            "packs/0000000000000000ff",
            "other/00000000000000ff",
            "packs/",
            "packs/+000000000000000",
            "index/0000000000000001",
        ] {
            assert_eq!(parse_pack_key(bad), None, "{bad}");
        }
    }
}

//! The reader the engine plugs in: `cdmfs::TierRead` is implemented by
//! delegating to [`TierReader::read`] (the glue lives with the engine, so
//! this crate does not depend on it).

use std::sync::Arc;

use crate::{PackCache, S3Store};

pub struct TierReader {
    pub store: Arc<S3Store>,
    pub cache: PackCache,
}

impl TierReader {
    pub fn new(store: Arc<S3Store>, cache: PackCache) -> TierReader {
        TierReader { store, cache }
    }

    /// `len` bytes of pack `pack` at `offset`, exactly, through the cache.
    /// An unreachable store or a missing or short pack fails this read
    /// only (an `io::Error` naming the pack); nothing else is affected.
    pub fn read(&self, pack: u64, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.cache.read(&self.store, pack, offset, len as u64)
    }
}

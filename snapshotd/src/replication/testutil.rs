//! Pools for the replication tests: real pool files in a temporary
//! directory, so a test can close one and open it again like a restart.

use std::path::Path;
use std::sync::Arc;

use cdmfs::{FileDev, FormatOptions, OpenOptions, Pool};

/// Pool files are sparse; this bounds what a test may write.
pub const POOL_BYTES: u64 = 1 << 30;

/// Creates (first call) or opens the pool `dir/pool`.
pub fn pool(dir: &Path) -> Arc<Pool> {
    pool_keyed(dir, None)
}

/// The same, opened with an encryption key (a pool without one adopts it).
pub fn pool_keyed(dir: &Path, key: Option<cdmfs::KeySource>) -> Arc<Pool> {
    let path = dir.join("pool");
    let dev = if path.exists() {
        FileDev::open(&path).unwrap()
    } else {
        let d = FileDev::create(&path, POOL_BYTES).unwrap();
        Pool::format(&d, &FormatOptions::default()).unwrap();
        d
    };
    let opts = OpenOptions {
        key,
        ..OpenOptions::default()
    };
    Arc::new(Pool::open(Arc::new(dev), &opts).unwrap())
}

/// Creates the pool `dir/pool` of `bytes` (for a target that fills up);
/// [`pool`] opens it afterwards.
pub fn small_pool(dir: &Path, bytes: u64) {
    let d = FileDev::create(&dir.join("pool"), bytes).unwrap();
    Pool::format(&d, &FormatOptions::default()).unwrap();
}

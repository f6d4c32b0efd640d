//! Options of [`Pool::format`](super::Pool::format) and [`Pool::open`](super::Pool::open).

use crate::pipeline::KeySource;

/// Options for [`Pool::format`].
#[derive(Clone, Debug, Default)]
pub struct FormatOptions {
    /// Cap on entries per B+tree node (0 = as many as fit in 4 KiB). Small
    /// values build deep trees; tests use them.
    pub max_fanout: u32,
}

/// Options for [`Pool::open`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Clean nodes kept in memory (4 KiB each).
    pub cache_nodes: usize,
    /// Dirty nodes that trigger a commit on their own.
    pub dirty_limit: usize,
    /// Key for encrypted volumes. A pool that has a key set up checks it
    /// (a wrong key fails the open); a pool without one adopts it. Without
    /// a key, encrypted volumes cannot be read or written (scrub and fsck
    /// still work: checksums cover the stored bytes).
    pub key: Option<KeySource>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_nodes: 16384,
            dirty_limit: 8192,
            key: None,
        }
    }
}

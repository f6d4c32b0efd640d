//! `PackCache`: a bounded read cache of pack objects on local disk.
//!
//! A pack is cached in aligned chunks (1 MiB by default), one file per
//! chunk named `{pack:016x}-{chunk:08x}`. A read is served from cached
//! chunks; the missing ones are fetched with one ranged GET per run of
//! adjacent chunks. Each chunk's length and crc32c are kept in memory and
//! checked on every hit: a file that fails is dropped and fetched again.
//!
//! The budget is strict: space is reserved (evicting least recently used
//! chunks) before a file is written, so the directory never holds more
//! than the budget. A write that fails — a full disk among others — gives
//! the reservation back and is counted; the read is served from memory
//! all the same. Two readers of the same missing chunk do not both fetch
//! it: the second waits for the first (single flight).
//!
//! Chunk files of an earlier run are removed at start (no index survives
//! a restart; the first reads after it are cold). Only files named like
//! chunks (and their temporary files) are removed, nothing else in the
//! directory.
//!
//! Read-ahead: a read that starts where the last read of the same pack
//! ended is sequential; when fewer than half of the next `readahead`
//! chunks are cached or coming, it starts a background fetch of the
//! `readahead` chunks from the first missing one (one GET), at most one
//! per pack and [`READAHEAD_THREADS`] in all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use cdm_common::lock::{lock, wait};
use tracing::{debug, warn};

use crate::metrics::TierMetrics;
use crate::{pack_key, S3Store, TierError};

pub const DEFAULT_CHUNK: u64 = 1 << 20;
pub const DEFAULT_READAHEAD: u32 = 4;
/// Read-ahead fetches running at once, over all packs.
pub const READAHEAD_THREADS: usize = 4;
/// Sequential streams remembered (one per pack read lately).
const STREAMS_MAX: usize = 1024;

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bytes of chunk files the directory may hold.
    pub budget: u64,
    pub chunk_size: u64,
    /// Chunks fetched ahead of a sequential reader; 0 for none.
    pub readahead: u32,
}

impl CacheConfig {
    pub fn new(dir: impl Into<PathBuf>, budget: u64) -> CacheConfig {
        CacheConfig {
            dir: dir.into(),
            budget,
            chunk_size: DEFAULT_CHUNK,
            readahead: DEFAULT_READAHEAD,
        }
    }
}

/// A cached chunk's checksums cover blocks of this size, so a hit reads
/// and checks only the blocks a read needs, not the whole chunk.
const BLOCK: u64 = 64 << 10;

type ChunkId = (u64, u64);
/// Chunk numbers of one pack with their bytes.
type Chunks = Vec<(u64, Arc<Vec<u8>>)>;
/// Part of a chunk: where in the chunk it starts, and its bytes.
type Piece = (u64, Arc<Vec<u8>>);

#[derive(Clone)]
struct Entry {
    len: u64,
    /// crc32c of each [`BLOCK`] of the chunk.
    crcs: Arc<[u32]>,
    tick: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<ChunkId, Entry>,
    /// Least recently used first.
    lru: BTreeMap<u64, ChunkId>,
    tick: u64,
    /// Bytes of files present plus space reserved for files being written.
    bytes: u64,
    /// Chunks being fetched by some reader.
    inflight: HashSet<ChunkId>,
    /// Per pack: where its last read ended.
    streams: HashMap<u64, u64>,
    /// Packs with a read-ahead under way.
    ahead: HashSet<u64>,
    /// Pack lengths learnt from a short last chunk.
    ends: HashMap<u64, u64>,
}

impl State {
    fn touch(&mut self, id: ChunkId) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(&id) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, id);
        }
    }

    fn forget(&mut self, id: ChunkId) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.lru.remove(&e.tick);
        self.bytes -= e.len;
        Some(e)
    }
}

struct Inner {
    cfg: CacheConfig,
    metrics: Arc<TierMetrics>,
    state: Mutex<State>,
    /// Signalled when in-flight chunks are released.
    released: Condvar,
    readaheads: AtomicUsize,
}

/// The cache; cheap to clone (clones share everything).
#[derive(Clone)]
pub struct PackCache {
    inner: Arc<Inner>,
}

fn is_chunk_file(name: &str) -> bool {
    let base = name.split_once(".tmp").map_or(name, |(b, _)| b);
    let Some((p, c)) = base.split_once('-') else {
        return false;
    };
    p.len() == 16 && c.len() == 8 && p.bytes().chain(c.bytes()).all(|b| b.is_ascii_hexdigit())
}

impl PackCache {
    /// Opens the cache in `cfg.dir` (created if missing), removing chunk
    /// files an earlier run left.
    pub fn open(cfg: CacheConfig, metrics: Arc<TierMetrics>) -> io::Result<PackCache> {
        if cfg.chunk_size == 0 || cfg.budget < cfg.chunk_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cache budget {} must hold at least one chunk of {}",
                    cfg.budget, cfg.chunk_size
                ),
            ));
        }
        std::fs::create_dir_all(&cfg.dir)?;
        // Chunks of unencrypted volumes are plaintext: the owner only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cfg.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut removed = 0;
        for e in std::fs::read_dir(&cfg.dir)? {
            let e = e?;
            if e.file_name().to_str().is_some_and(is_chunk_file) {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            debug!(removed, dir = %cfg.dir.display(), "cache files of an earlier run removed");
        }
        metrics.cache_bytes.store(0, Ordering::Relaxed);
        Ok(PackCache {
            inner: Arc::new(Inner {
                cfg,
                metrics,
                state: Mutex::new(State::default()),
                released: Condvar::new(),
                readaheads: AtomicUsize::new(0),
            }),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.cfg
    }

    pub fn metrics(&self) -> &Arc<TierMetrics> {
        &self.inner.metrics
    }

    /// The file that holds chunk `chunk` of `pack` (whether cached or not).
    pub fn chunk_path(&self, pack: u64, chunk: u64) -> PathBuf {
        self.inner.chunk_path((pack, chunk))
    }

    /// Bytes of cached chunks now.
    /// Forgets the cached chunks holding `offset..offset + len` of `pack`
    /// (bytes that failed the engine's checksum: fetched again next time).
    pub fn invalidate(&self, pack: u64, offset: u64, len: u64) {
        let c = self.inner.cfg.chunk_size;
        let last = (offset + len.max(1) - 1) / c;
        let mut s = lock(&self.inner.state);
        for k in offset / c..=last {
            if s.forget((pack, k)).is_some() {
                let _ = std::fs::remove_file(self.inner.chunk_path((pack, k)));
            }
        }
        self.inner
            .metrics
            .cache_bytes
            .store(s.bytes, Ordering::Relaxed);
    }

    pub fn cached_bytes(&self) -> u64 {
        lock(&self.inner.state).bytes
    }

    /// `len` bytes of pack `pack` at `offset`, through the cache. The
    /// store's failure is this read's error; the cache's own failures are
    /// counted and never fail a read.
    pub fn read(
        &self,
        store: &Arc<S3Store>,
        pack: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let c = inner.cfg.chunk_size;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read range overflows"))?;
        let (first, last) = (offset / c, (end - 1) / c);
        let sequential = {
            let mut s = lock(&inner.state);
            if s.streams.len() >= STREAMS_MAX {
                s.streams.clear();
            }
            s.streams.insert(pack, end) == Some(offset)
        };
        let pieces = inner.gather(store, pack, offset, end)?;
        let mut out = Vec::with_capacity(len as usize);
        for (i, (start, data)) in pieces.iter().enumerate() {
            let base = (first + i as u64) * c + start;
            let from = offset.saturating_sub(base) as usize;
            let to = ((end - base) as usize).min(data.len());
            if from < to {
                out.extend_from_slice(&data[from..to]);
            }
        }
        if out.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "pack {pack:016x}: read of {len} bytes at {offset} got {} (the pack ends first)",
                    out.len()
                ),
            ));
        }
        if sequential && inner.cfg.readahead > 0 {
            self.read_ahead(store, pack, last + 1);
        }
        Ok(out)
    }

    /// Starts fetching chunks `from..from + readahead` of `pack` in the
    /// background, unless one is under way for it or too many are.
    fn read_ahead(&self, store: &Arc<S3Store>, pack: u64, next: u64) {
        let inner = &self.inner;
        let n = inner.cfg.readahead as u64;
        let mine = {
            let mut s = lock(&inner.state);
            let limit = s
                .ends
                .get(&pack)
                .map_or(u64::MAX, |end| end.div_ceil(inner.cfg.chunk_size));
            let absent =
                |k: u64| !s.entries.contains_key(&(pack, k)) && !s.inflight.contains(&(pack, k));
            let Some(from) = (next..(next + n).min(limit)).find(|&k| absent(k)) else {
                return;
            };
            // Keep a window of `n` chunks ahead, refilled a whole window
            // at a time once the reader is past its first half: one GET
            // of `n` chunks, not one GET per chunk read.
            if from - next > n / 2 || s.ahead.contains(&pack) {
                return;
            }
            if inner.readaheads.fetch_add(1, Ordering::AcqRel) >= READAHEAD_THREADS {
                inner.readaheads.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            s.ahead.insert(pack);
            // Claimed here, under the lock that found them missing, so a
            // reader arriving before the thread runs waits for them
            // instead of fetching them one by one.
            let to = (from + n).min(limit);
            let mine: Vec<u64> = (from..to)
                .filter(|&k| !s.entries.contains_key(&(pack, k)) && s.inflight.insert((pack, k)))
                .collect();
            mine
        };
        let (inner, store) = (self.inner.clone(), store.clone());
        let claimed: Vec<ChunkId> = mine.iter().map(|&k| (pack, k)).collect();
        let spawned = std::thread::Builder::new()
            .name("tier-readahead".into())
            .spawn(move || {
                for run in runs(&mine) {
                    match inner.fetch_run(&store, pack, run.0, run.1) {
                        Ok(got) => {
                            TierMetrics::add(&inner.metrics.readahead_chunks, got.len() as u64)
                        }
                        Err(e) => debug!(pack, "read-ahead failed: {e}"),
                    }
                }
                inner.release(&mine.iter().map(|&k| (pack, k)).collect::<Vec<_>>());
                lock(&inner.state).ahead.remove(&pack);
                inner.readaheads.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            warn!("cannot start a read-ahead thread: {e}");
            self.inner.release(&claimed);
            lock(&self.inner.state).ahead.remove(&pack);
            self.inner.readaheads.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Runs of consecutive chunk numbers in a sorted list: `(first, last)`.
fn runs(chunks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &k in chunks {
        match out.last_mut() {
            Some(r) if r.1 + 1 == k => r.1 = k,
            _ => out.push((k, k)),
        }
    }
    out
}

fn store_error(e: TierError) -> io::Error {
    e.into_io()
}

impl Inner {
    fn chunk_path(&self, (pack, chunk): ChunkId) -> PathBuf {
        self.cfg.dir.join(format!("{pack:016x}-{chunk:08x}"))
    }

    fn release(&self, ids: &[ChunkId]) {
        if ids.is_empty() {
            return;
        }
        let mut s = lock(&self.state);
        for id in ids {
            s.inflight.remove(id);
        }
        drop(s);
        self.released.notify_all();
    }

    /// The chunks that hold bytes `offset..end` of `pack`, in order: each
    /// as a piece that covers at least the part of the range in it (a
    /// fetched chunk whole, a hit the blocks needed; the pack's last
    /// chunk may be short).
    fn gather(
        &self,
        store: &Arc<S3Store>,
        pack: u64,
        offset: u64,
        end: u64,
    ) -> io::Result<Vec<Piece>> {
        let c = self.cfg.chunk_size;
        let (first, last) = (offset / c, (end - 1) / c);
        let n = (last - first + 1) as usize;
        let mut have: Vec<Option<Piece>> = vec![None; n];
        // The part of chunk k the read needs.
        let need = |k: u64| (offset.saturating_sub(k * c), (end - k * c).min(c));
        // A few rounds: a hit whose file vanished under eviction, or a
        // chunk another reader fetched but could not keep, goes round
        // again; after that the reader fetches for itself.
        // Chunks past a pack's known end are not asked for (a 416).
        let wanted = |k: u64, have: &[Option<Piece>]| {
            have[(k - first) as usize].is_none()
                && lock(&self.state)
                    .ends
                    .get(&pack)
                    .is_none_or(|&end| k * c < end)
        };
        for _round in 0..4 {
            let todo: Vec<u64> = (first..=last).filter(|&k| wanted(k, &have)).collect();
            if todo.is_empty() {
                break;
            }
            let (hits, mine, theirs) = self.classify(pack, &todo);
            for (k, e) in hits {
                if let Some(p) = self.load(pack, k, &e, need(k)) {
                    TierMetrics::add(&self.metrics.cache_hits, 1);
                    have[(k - first) as usize] = Some(p);
                }
            }
            let fetched = self.fetch_claimed(store, pack, &mine);
            for (k, d) in fetched.iter().flatten() {
                have[(k - first) as usize] = Some((0, d.clone()));
            }
            fetched?;
            for k in theirs {
                self.wait_released((pack, k));
            }
        }
        let todo: Vec<u64> = (first..=last).filter(|&k| wanted(k, &have)).collect();
        for (a, b) in runs(&todo) {
            TierMetrics::add(&self.metrics.cache_misses, b - a + 1);
            for (k, d) in self.fetch_run(store, pack, a, b).map_err(store_error)? {
                have[(k - first) as usize] = Some((0, d));
            }
        }
        // Chunks past the pack's end stay empty; the caller sees the read
        // come up short.
        Ok(have.into_iter().map(|d| d.unwrap_or_default()).collect())
    }

    /// Splits `todo` into cached chunks (with their entries, touched),
    /// chunks this reader claims, and chunks someone else is fetching.
    #[allow(clippy::type_complexity)]
    fn classify(&self, pack: u64, todo: &[u64]) -> (Vec<(u64, Entry)>, Vec<u64>, Vec<u64>) {
        let mut s = lock(&self.state);
        let (mut hits, mut mine, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        for &k in todo {
            let id = (pack, k);
            if let Some(e) = s.entries.get(&id).cloned() {
                s.touch(id);
                hits.push((k, e));
            } else if s.inflight.insert(id) {
                mine.push(k);
            } else {
                theirs.push(k);
            }
        }
        (hits, mine, theirs)
    }

    /// Fetches the claimed chunks (misses) and releases them, whatever
    /// happens.
    fn fetch_claimed(&self, store: &Arc<S3Store>, pack: u64, mine: &[u64]) -> io::Result<Chunks> {
        TierMetrics::add(&self.metrics.cache_misses, mine.len() as u64);
        let mut got = Vec::new();
        let mut result = Ok(());
        for (a, b) in runs(mine) {
            match self.fetch_run(store, pack, a, b) {
                Ok(v) => got.extend(v),
                Err(e) => {
                    result = Err(store_error(e));
                    break;
                }
            }
        }
        self.release(&mine.iter().map(|&k| (pack, k)).collect::<Vec<_>>());
        result.map(|_| got)
    }

    fn wait_released(&self, id: ChunkId) {
        let mut s = lock(&self.state);
        while s.inflight.contains(&id) {
            s = wait(&self.released, s);
        }
    }

    /// The blocks of a cached chunk that cover `from..to` (offsets in the
    /// chunk), if the file has the chunk's length and those blocks pass
    /// their checksums; a file that fails is dropped (counted), a
    /// vanished one just missed.
    fn load(&self, pack: u64, k: u64, e: &Entry, (from, to): (u64, u64)) -> Option<Piece> {
        use std::os::unix::fs::FileExt;
        let path = self.chunk_path((pack, k));
        let (lo, hi) = (from / BLOCK, to.min(e.len).div_ceil(BLOCK));
        let start = lo * BLOCK;
        let stop = (hi * BLOCK).min(e.len);
        let read = std::fs::File::open(&path).and_then(|f| {
            let size = f.metadata()?.len();
            let mut buf = vec![0u8; stop.saturating_sub(start) as usize];
            if size == e.len {
                f.read_exact_at(&mut buf, start)?;
            }
            Ok((size, buf))
        });
        let whole = |size: u64, buf: &[u8]| {
            size == e.len
                && buf
                    .chunks(BLOCK as usize)
                    .zip(e.crcs.get(lo as usize..).unwrap_or(&[]))
                    .all(|(b, &crc)| crc32c::crc32c(b) == crc)
        };
        match read {
            Ok((size, buf)) if whole(size, &buf) => Some((start, Arc::new(buf))),
            Ok((size, _)) => {
                warn!(
                    path = %path.display(),
                    size,
                    "cached chunk failed its checksum; fetching it again"
                );
                TierMetrics::add(&self.metrics.cache_corrupt, 1);
                self.drop_entry((pack, k), e.tick);
                None
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                warn!(path = %path.display(), "cache read failed: {err}");
                TierMetrics::add(&self.metrics.cache_errors, 1);
                self.drop_entry((pack, k), e.tick);
                None
            }
        }
    }

    /// Forgets `id` and removes its file, unless it was replaced since
    /// (another tick).
    fn drop_entry(&self, id: ChunkId, tick: u64) {
        let mut s = lock(&self.state);
        if s.entries.get(&id).is_some_and(|e| e.tick >= tick) {
            s.forget(id);
            let _ = std::fs::remove_file(self.chunk_path(id));
            self.metrics.cache_bytes.store(s.bytes, Ordering::Relaxed);
        }
    }

    /// One ranged GET for chunks `a..=b` of `pack`; each chunk is kept in
    /// the cache if it can be. Returns the chunks the pack has (fewer at
    /// its end).
    fn fetch_run(
        &self,
        store: &Arc<S3Store>,
        pack: u64,
        a: u64,
        b: u64,
    ) -> Result<Chunks, TierError> {
        let c = self.cfg.chunk_size;
        let want = (b - a + 1) * c;
        let data = match store.get_range_clipped(&pack_key(pack), a * c, want) {
            Ok(d) => d,
            // The range starts at or past the end (read-ahead over a pack
            // whose length is a multiple of the chunk): remember where it
            // ends, so no reader asks again.
            Err(TierError::Http { status: 416, .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        if (data.len() as u64) < want {
            let mut s = lock(&self.state);
            if s.ends.len() >= STREAMS_MAX {
                s.ends.clear();
            }
            s.ends.insert(pack, a * c + data.len() as u64);
        }
        let mut out = Vec::new();
        for (i, piece) in data.chunks(c as usize).enumerate() {
            let k = a + i as u64;
            self.keep((pack, k), piece);
            out.push((k, Arc::new(piece.to_vec())));
        }
        Ok(out)
    }

    /// Writes a chunk file within the budget: evicts least recently used
    /// chunks to make room, reserves it, writes (temporary file, rename),
    /// then records the entry. A failed write frees the reservation and
    /// is counted.
    fn keep(&self, id: ChunkId, data: &[u8]) {
        let len = data.len() as u64;
        let mut evicted = 0;
        {
            let mut s = lock(&self.state);
            if s.entries.contains_key(&id) {
                return;
            }
            while s.bytes + len > self.cfg.budget {
                let Some((&tick, &old)) = s.lru.iter().next() else {
                    break;
                };
                s.lru.remove(&tick);
                s.forget(old);
                // Removed before the lock is let go: the space is only
                // free for the next reservation once the file is gone.
                let _ = std::fs::remove_file(self.chunk_path(old));
                evicted += 1;
            }
            if s.bytes + len > self.cfg.budget {
                // Everything left is reserved by writes under way.
                TierMetrics::add(&self.metrics.cache_errors, 1);
                return;
            }
            s.bytes += len;
        }
        TierMetrics::add(&self.metrics.cache_evictions, evicted);
        let path = self.chunk_path(id);
        let written = write_file(&path, data);
        let mut s = lock(&self.state);
        match written {
            Ok(()) => {
                s.tick += 1;
                let tick = s.tick;
                s.entries.insert(
                    id,
                    Entry {
                        len,
                        crcs: data.chunks(BLOCK as usize).map(crc32c::crc32c).collect(),
                        tick,
                    },
                );
                s.lru.insert(tick, id);
            }
            Err(e) => {
                s.bytes -= len;
                TierMetrics::add(&self.metrics.cache_errors, 1);
                debug!(path = %path.display(), "cache write failed (served from memory): {e}");
            }
        }
        self.metrics.cache_bytes.store(s.bytes, Ordering::Relaxed);
    }
}

/// Writes `data` to `path` through a temporary file, so a reader never
/// sees a half-written chunk under the final name.
fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path
        .with_extension(format!("tmp{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    let r = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_coalesce_adjacent_chunks() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[3]), vec![(3, 3)]);
        assert_eq!(runs(&[1, 2, 3, 5, 6, 9]), vec![(1, 3), (5, 6), (9, 9)]);
    }

    #[test]
    fn only_chunk_files_are_taken_for_ours() {
        assert!(is_chunk_file("00000000000000ff-00000001"));
        assert!(is_chunk_file("00000000000000ff-00000001.tmpThreadId3"));
        assert!(!is_chunk_file("notes.txt"));
        assert!(!is_chunk_file("00000000000000ff-1"));
        assert!(!is_chunk_file("lost+found"));
    }

    #[test]
    fn open_removes_old_chunks_and_leaves_other_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("00000000000000ff-00000001"), b"x").unwrap();
        std::fs::write(d.path().join("keep.me"), b"y").unwrap();
        let c = PackCache::open(
            CacheConfig::new(d.path(), 4 << 20),
            Arc::new(TierMetrics::default()),
        )
        .unwrap();
        assert!(!d.path().join("00000000000000ff-00000001").exists());
        assert!(d.path().join("keep.me").exists());
        assert_eq!(c.cached_bytes(), 0);
        let small = CacheConfig::new(d.path(), 1000);
        assert!(PackCache::open(small, Arc::new(TierMetrics::default())).is_err());
    }
}

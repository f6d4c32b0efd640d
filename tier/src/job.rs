//! The tier's jobs, where the engine's plan and commit meet the store:
//! tiering points (pack, upload and verify, then commit), recalling a
//! point, repacking packs whose live share fell, and GC of packs nothing
//! references. The daemon runs one of these at a time per pool: a pack
//! uploaded but not yet committed is protected from a GC in the same
//! process by the pool's reservation, and from nothing else.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cdmfs::{Pool, Target, TierPlaced, TierRead};
use serde::Serialize;
use thiserror::Error;

use crate::{gc, pack_key, GcReport, S3Store, TierError, TierReader, PACKS_DIR};

#[derive(Debug, Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] TierError),
    #[error(transparent)]
    Pool(#[from] cdmfs::Error),
    #[error("cancelled")]
    Cancelled,
}

/// How a job reports and is stopped.
pub struct Control<'a> {
    pub cancel: &'a AtomicBool,
    /// `(done, total)` in bytes.
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
}

/// Sizes a tiering run works with.
#[derive(Clone, Copy, Debug)]
pub struct PackSizes {
    /// Target size of a pack object (16–64 MiB).
    pub pack_bytes: u64,
    /// Bytes uploaded between two commits: one walk of the trees and one
    /// pool commit per batch; a crash loses at most this much upload work
    /// (orphans for GC).
    pub commit_bytes: u64,
}

impl Default for PackSizes {
    fn default() -> Self {
        PackSizes {
            pack_bytes: 32 << 20,
            commit_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct TierReport {
    pub points: Vec<u64>,
    /// Objects moved and their bytes.
    pub objects: u64,
    pub bytes: u64,
    /// Pack objects uploaded.
    pub packs: u64,
    /// Uploaded objects that no longer qualified at commit (their bytes
    /// are garbage in their pack, for repack).
    pub skipped: u64,
    /// Objects left local because their stored bytes fail their checksum
    /// (scrub names where).
    pub damaged: Vec<String>,
}

/// One pack being filled.
struct Filling {
    pack: u64,
    bytes: Vec<u8>,
    placed: Vec<TierPlaced>,
}

/// Moves what the points `points` own alone into packs in `store`.
pub fn tier_points(
    pool: &Pool,
    store: &S3Store,
    points: &[u64],
    sizes: PackSizes,
    ctl: &Control,
) -> Result<TierReport, JobError> {
    // Credentials and bucket first: a refusal has its reason, and nothing
    // is read or reserved (a server may cut an upload it refuses, which
    // would only say "unreachable").
    store.check()?;
    let objects = pool.tier_plan(points)?;
    let total: u64 = objects.iter().map(|o| o.bytes()).sum();
    let mut rep = TierReport {
        points: points.to_vec(),
        ..TierReport::default()
    };
    let mut batch: Vec<TierPlaced> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut cur: Option<Filling> = None;
    let mut done = 0u64;
    (ctl.progress)(0, total);
    let result = (|| -> Result<(), JobError> {
        for o in &objects {
            if ctl.cancel.load(Ordering::Relaxed) {
                return Err(JobError::Cancelled);
            }
            done += o.bytes();
            let bytes = match pool.tier_read_object(o) {
                Ok(b) => b,
                Err(e @ cdmfs::Error::DataChecksum { .. }) => {
                    rep.damaged.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if cur.is_none() {
                cur = Some(Filling {
                    pack: pool.tier_reserve_pack()?,
                    bytes: Vec::with_capacity(sizes.pack_bytes as usize + (1 << 20)),
                    placed: Vec::new(),
                });
            }
            let f = cur.as_mut().ok_or(JobError::Cancelled)?;
            f.placed.push(TierPlaced {
                addr: o.addr,
                pack: f.pack,
                offset: f.bytes.len() as u64,
                crc: crc32c::crc32c(&bytes),
            });
            f.bytes.extend_from_slice(&bytes);
            if f.bytes.len() as u64 >= sizes.pack_bytes {
                if let Some(f) = cur.take() {
                    batch_bytes += upload(store, f, &mut batch, &mut rep)?;
                }
                if batch_bytes >= sizes.commit_bytes {
                    commit(pool, points, &mut batch, &mut rep)?;
                    batch_bytes = 0;
                }
            }
            (ctl.progress)(done, total);
        }
        if let Some(f) = cur.take() {
            upload(store, f, &mut batch, &mut rep)?;
        }
        commit(pool, points, &mut batch, &mut rep)
    })();
    if let Err(e) = result {
        // Uploaded or not, what was not committed is not referenced: the
        // packs become orphans for GC.
        for p in batch.iter().map(|p| p.pack).chain(cur.map(|f| f.pack)) {
            pool.tier_release_pack(p);
        }
        return Err(e);
    }
    (ctl.progress)(total, total);
    Ok(rep)
}

fn upload(
    store: &S3Store,
    f: Filling,
    batch: &mut Vec<TierPlaced>,
    rep: &mut TierReport,
) -> Result<u64, JobError> {
    let n = f.bytes.len() as u64;
    // Pushed first so a failed upload's reservation is released too.
    batch.extend_from_slice(&f.placed);
    store.put(&pack_key(f.pack), &f.bytes)?;
    rep.packs += 1;
    Ok(n)
}

fn commit(
    pool: &Pool,
    points: &[u64],
    batch: &mut Vec<TierPlaced>,
    rep: &mut TierReport,
) -> Result<(), JobError> {
    if batch.is_empty() {
        return Ok(());
    }
    let c = pool.tier_commit(points, batch)?;
    batch.clear();
    rep.objects += c.objects;
    rep.bytes += c.bytes;
    rep.skipped += c.skipped;
    Ok(())
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct RecallReport {
    pub point: u64,
    pub objects: u64,
    pub bytes: u64,
    /// Ranged GETs made (adjacent objects of a pack are fetched at once).
    pub requests: u64,
}

/// Largest ranged GET a recall makes, and what it stores per commit.
const RECALL_GET: u64 = 16 << 20;
const RECALL_BATCH: u64 = 64 << 20;

/// Copies every object of point `point` that is only in the tier back to
/// local storage; the point reads locally afterwards.
pub fn recall_point(
    pool: &Pool,
    store: &S3Store,
    point: u64,
    ctl: &Control,
) -> Result<RecallReport, JobError> {
    store.check()?;
    let mut ents: Vec<_> = pool
        .tier_entries_of(Target::Snapshot(point))?
        .into_iter()
        .filter(|e| !e.local)
        .collect();
    ents.sort_unstable_by_key(|e| (e.pack, e.offset));
    let total: u64 = ents.iter().map(|e| e.len as u64).sum();
    let mut rep = RecallReport {
        point,
        ..RecallReport::default()
    };
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut i = 0;
    while i < ents.len() {
        if ctl.cancel.load(Ordering::Relaxed) {
            return Err(JobError::Cancelled);
        }
        // A run of objects adjacent in one pack: one GET.
        let mut j = i + 1;
        let start = ents[i].offset;
        let mut end = start + ents[i].len as u64;
        while j < ents.len()
            && ents[j].pack == ents[i].pack
            && ents[j].offset == end
            && end - start < RECALL_GET
        {
            end += ents[j].len as u64;
            j += 1;
        }
        let data = store.get_range(&pack_key(ents[i].pack), start, end - start)?;
        rep.requests += 1;
        for e in &ents[i..j] {
            let o = (e.offset - start) as usize;
            batch.push((e.id, data[o..o + e.len as usize].to_vec()));
            batch_bytes += e.len as u64;
            rep.objects += 1;
            rep.bytes += e.len as u64;
        }
        i = j;
        if batch_bytes >= RECALL_BATCH {
            pool.tier_recall(&batch, &[])?;
            batch.clear();
            batch_bytes = 0;
        }
        (ctl.progress)(rep.bytes, total);
    }
    pool.tier_recall(&batch, &[point])?;
    (ctl.progress)(total, total);
    Ok(rep)
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct TierGcReport {
    /// Packs whose live share was below the threshold, rewritten.
    pub repacked_packs: u64,
    /// Objects copied into new packs, and their bytes.
    pub repacked_objects: u64,
    pub repacked_bytes: u64,
    /// Objects of a repacked pack that failed their checksum: left where
    /// they were (scrub names the points).
    pub damaged: Vec<String>,
    pub gc: GcReport,
}

/// Repacks packs whose live bytes are below `min_live` of their size,
/// then deletes every pack the pool does not reference.
pub fn gc_and_repack(
    pool: &Pool,
    store: &S3Store,
    min_live: f64,
    sizes: PackSizes,
    ctl: &Control,
) -> Result<TierGcReport, JobError> {
    store.check()?;
    let mut rep = TierGcReport::default();
    let mut live: BTreeMap<u64, (u64, Vec<cdmfs::TierEntry>)> = BTreeMap::new();
    for e in pool.tier_entries()? {
        let l = live.entry(e.pack).or_default();
        l.0 += e.len as u64;
        l.1.push(e);
    }
    let sizes_listed: BTreeMap<u64, u64> = store
        .list(PACKS_DIR)?
        .into_iter()
        .filter_map(|(k, n)| crate::parse_pack_key(&k).map(|id| (id, n)))
        .collect();
    let sparse: Vec<u64> = live
        .iter()
        .filter(|(p, (l, _))| {
            sizes_listed
                .get(p)
                .is_some_and(|&size| size > 0 && (*l as f64) < min_live * size as f64)
        })
        .map(|(p, _)| *p)
        .collect();
    let total: u64 = sparse.iter().map(|p| live[p].0).sum();
    let mut done = 0u64;
    let mut cur: Option<Repack> = None;
    for p in sparse {
        if ctl.cancel.load(Ordering::Relaxed) {
            if let Some((pack, _, _)) = cur {
                pool.tier_release_pack(pack);
            }
            return Err(JobError::Cancelled);
        }
        rep.repacked_packs += 1;
        for e in &live[&p].1 {
            let data = match store.get_range(&pack_key(e.pack), e.offset, e.len as u64) {
                Ok(d) => d,
                Err(err) => {
                    if let Some((pack, _, _)) = cur.take() {
                        pool.tier_release_pack(pack);
                    }
                    return Err(err.into());
                }
            };
            if crc32c::crc32c(&data) != e.crc {
                rep.damaged.push(format!(
                    "tiered object {} in pack {:016x} at {} fails its checksum",
                    e.id, e.pack, e.offset
                ));
                continue;
            }
            if cur.is_none() {
                cur = Some((pool.tier_reserve_pack()?, Vec::new(), Vec::new()));
            }
            if let Some((_, bytes, moved)) = cur.as_mut() {
                moved.push((e.id, bytes.len() as u64));
                bytes.extend_from_slice(&data);
                rep.repacked_objects += 1;
                rep.repacked_bytes += data.len() as u64;
            }
            done += e.len as u64;
            (ctl.progress)(done, total);
            if cur
                .as_ref()
                .is_some_and(|c| c.1.len() as u64 >= sizes.pack_bytes)
            {
                if let Some(c) = cur.take() {
                    flush_repack(pool, store, c)?;
                }
            }
        }
    }
    if let Some(c) = cur.take() {
        flush_repack(pool, store, c)?;
    }
    let referenced: HashSet<u64> = pool.tier_packs()?.into_iter().collect();
    rep.gc = gc(store, &referenced)?;
    Ok(rep)
}

/// A pack being filled by a repack: its number, bytes, and the `(tier id,
/// offset)` of each object in it.
type Repack = (u64, Vec<u8>, Vec<(u64, u64)>);

fn flush_repack(
    pool: &Pool,
    store: &S3Store,
    (pack, bytes, moved): Repack,
) -> Result<(), JobError> {
    if let Err(e) = store.put(&pack_key(pack), &bytes) {
        pool.tier_release_pack(pack);
        return Err(e.into());
    }
    pool.tier_repoint(pack, &moved)?;
    Ok(())
}

/// The engine reads tiered extents through the cache; scrub, and a read
/// whose cached bytes failed their checksum, read the store itself (and
/// the cache forgets what it held there).
impl TierRead for TierReader {
    fn read(&self, pack: u64, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        TierReader::read(self, pack, offset, len)
    }
    fn read_direct(&self, pack: u64, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.cache.invalidate(pack, offset, len as u64);
        self.store
            .get_range(&pack_key(pack), offset, len as u64)
            .map_err(TierError::into_io)
    }
}

/// A reader for the pool, sharing the store.
pub fn engine_reader(reader: Arc<TierReader>) -> Arc<dyn TierRead> {
    reader
}

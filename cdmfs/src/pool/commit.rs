//! The three-phase commit: prepare new blocks and the next superblock
//! under the pool lock, write and sync them without it, publish under it.

use std::collections::HashMap;

use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::*;
use crate::store::internal;

use super::records::*;
use super::{now_ns, Inner, Pool};

/// How many commits a freed block waits before reuse: the newest superblock
/// and the one before it never reach a reused block.
const FREE_DELAY: usize = 2;

/// A commit between its phases: new blocks, the superblock that reaches
/// them, and the blocks it freed.
pub(super) struct Prepared {
    out: Vec<(u64, Vec<u8>)>,
    sb: Superblock,
    freed: Vec<(u64, u64)>,
}

impl Prepared {
    /// Blocks this commit frees (reusable after it publishes).
    pub(super) fn freed(&self) -> &[(u64, u64)] {
        &self.freed
    }

    /// Folds a newer commit into this stalled one: both sets of blocks
    /// (the newer wins where an address repeats), the newer superblock,
    /// both sets of frees.
    fn absorb(mut self, newer: Option<Prepared>) -> Prepared {
        let Some(n) = newer else {
            return self;
        };
        let mut blocks: std::collections::BTreeMap<u64, Vec<u8>> = self.out.into_iter().collect();
        blocks.extend(n.out);
        self.out = blocks.into_iter().collect();
        self.freed.extend(n.freed);
        Prepared {
            out: self.out,
            sb: n.sb,
            freed: self.freed,
        }
    }
}

/// How phase 2 failed: a write the device refused (what it accepted
/// before stays trustworthy: the commit can be written again), or a sync
/// (after a writeback error Linux marks the pages clean and the next sync
/// succeeds: anything written since the last good sync may be lost, so the
/// memory that names it cannot be trusted).
pub(super) enum Phase2 {
    Write(Error),
    Sync(Error),
}

/// Phase 2 of a commit, needing no lock: new blocks, a barrier, then the
/// superblock, then a barrier.
fn write_prepared(dev: &dyn BlockDev, p: &Prepared) -> std::result::Result<(), Phase2> {
    let w = |e: Error| Phase2::Write(e);
    let s = |e: std::io::Error| Phase2::Sync(e.into());
    crate::store::write_blocks(dev, &p.out).map_err(w)?;
    dev.sync().map_err(s)?;
    let mut slot = vec![0u8; UNIT as usize];
    slot[..SB_BYTES].copy_from_slice(&p.sb.encode());
    dev.write_at(&slot, (p.sb.generation % SB_SLOTS) * UNIT)
        .map_err(|e| w(e.into()))?;
    dev.sync().map_err(s)?;
    Ok(())
}

impl Pool {
    /// Commits and closes the pool.
    pub fn close(self) -> Result<()> {
        self.commit()
    }

    /// Makes every mutation that completed before this call durable: with
    /// one intent-log record and one sync when only writes are pending
    /// (see `intent.rs`), else with a commit. Concurrent callers share one
    /// record or commit (group commit).
    pub fn flush(&self) -> Result<()> {
        self.reload_if_failed()?;
        let (target, stalled) = {
            let g = self.lock()?;
            (g.ops, g.stalled.is_some())
        };
        let mut durable = self.durable.lock().map_err(|_| Error::Failed)?;
        if stalled {
            return self.commit_holding(&mut durable);
        }
        if *durable >= target {
            // Durable already (logged); commit the trees behind the log if
            // the last commit is old, so a periodic flush bounds replay.
            if self.lock()?.commit_due() {
                return self.commit_holding(&mut durable);
            }
            return Ok(());
        }
        if let Some(seq) = self.log_flush()? {
            *durable = seq;
            return Ok(());
        }
        self.commit_holding(&mut durable)
    }

    /// Commits the trees now (a flush usually logs instead): frees become
    /// reusable, the intent log restarts.
    pub fn commit(&self) -> Result<()> {
        self.reload_if_failed()?;
        let mut durable = self.durable.lock().map_err(|_| Error::Failed)?;
        self.commit_holding(&mut durable)
    }

    /// A commit to bound memory (dirty nodes, deferred frees), not for
    /// durability: the write that asked for it is applied either way, so a
    /// commit that stalls is not its failure (the next flush reports it,
    /// and the next write is refused).
    pub(super) fn commit_for_memory(&self) -> Result<()> {
        match self.commit() {
            Err(e) if self.lock()?.stall.is_some() => {
                tracing::debug!(error = %e, "commit stalled");
                Ok(())
            }
            r => r,
        }
    }

    /// A commit; the caller holds `durable`, which it advances.
    fn commit_holding(&self, durable: &mut u64) -> Result<()> {
        // Phase 1 under the lock; phase 2 (writes and syncs) without it, so
        // I/O and snapshot creation go on meanwhile; phase 3 publishes.
        let t0 = std::time::Instant::now();
        let (seq, prepared) = {
            let mut g = self.lock()?;
            if g.committing {
                return Err(internal("two flush commits at once"));
            }
            let seq = g.ops;
            let p = g.prepare_commit();
            let p = g.check_commit(p)?;
            let p = g.with_stalled(p);
            g.committing = p.is_some();
            (seq, p)
        };
        if let Some(p) = prepared {
            let r = write_prepared(&*self.dev, &p);
            let mut g = self.inner.lock().map_err(|_| Error::Failed)?;
            g.committing = false;
            self.commit_done.notify_all();
            g.published(p, r, t0)?;
        }
        *durable = (*durable).max(seq);
        Ok(())
    }
}

impl Inner {
    /// A whole commit under the pool lock (callers that hold it). Must not
    /// run while a [`Pool::flush`] commit is in flight.
    pub(crate) fn commit(&mut self) -> Result<()> {
        if self.committing {
            return Err(internal("commit while another commit is in flight"));
        }
        let t0 = std::time::Instant::now();
        let p = self.prepare_commit();
        let p = self.check_commit(p)?;
        match self.with_stalled(p) {
            Some(p) => {
                let r = write_prepared(&*self.store.dev, &p);
                self.published(p, r, t0)
            }
            None => Ok(()),
        }
    }

    /// A failure while preparing leaves the in-memory trees half moved to
    /// new blocks: nothing can be trusted but the device, so the pool must
    /// be reopened.
    fn check_commit<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            tracing::error!(error = %e, "commit failed while preparing; the pool must be reopened");
            self.failed = true;
        }
        r
    }

    /// The commit to write: a stalled one, if any, with this one folded in.
    fn with_stalled(&mut self, p: Option<Prepared>) -> Option<Prepared> {
        match self.stalled.take() {
            Some(old) => {
                self.commit_retries += 1;
                Some(old.absorb(p))
            }
            None => p,
        }
    }

    /// Phase 3 after the writes: publishes a commit that reached the
    /// device, or keeps one that did not for the next commit to write
    /// again (the pool stalls, see `health.rs`).
    fn published(
        &mut self,
        p: Prepared,
        r: std::result::Result<(), Phase2>,
        t0: std::time::Instant,
    ) -> Result<()> {
        let r = match r {
            Err(Phase2::Sync(e)) => {
                // Data acknowledged by nothing yet may be gone from the
                // device: only a reload from it is trustworthy.
                self.sync_failed(&e);
                return Err(e);
            }
            Err(Phase2::Write(e)) => Err(e),
            Ok(()) => Ok(()),
        };
        match r {
            Ok(()) => {
                if let Some(s) = self.stall.take() {
                    tracing::warn!(since = s.since_unix, "the pool commits again");
                }
                self.finish_commit(p, t0);
                Ok(())
            }
            Err(e) => {
                // The superblock ring still names the last good commit,
                // and its intent-log chain: while stalled, flushes commit
                // (never log into the new chain no superblock names).
                let no_space = super::health::is_no_space(&e);
                if self.stall.is_none() {
                    tracing::error!(error = %e, "commit failed; writes are refused and the commit is retried");
                    self.stall = Some(super::health::Stall {
                        no_space,
                        message: e.to_string(),
                        since_unix: now_ns() / 1_000_000_000,
                    });
                } else if let Some(s) = &mut self.stall {
                    s.no_space = no_space;
                    s.message = e.to_string();
                }
                self.stalled = Some(p);
                // The cause itself: later refusals say the pool is stalled.
                Err(e)
            }
        }
    }

    /// Phase 1 of a commit, under the lock: serializes every dirty tree,
    /// the catalog and the refcounts into new blocks and builds the next
    /// superblock. The in-memory trees move on to the new (clean) nodes at
    /// once; the nodes stay loadable from `in_flight` until published.
    fn prepare_commit(&mut self) -> Result<Option<Prepared>> {
        if self.catalog_dirty.is_empty()
            && self.store.rc_delta.is_empty()
            && self.store.dirty.is_empty()
            && self.store.dd_pending.is_empty()
            && self.store.ddr_pending.is_empty()
            && self.store.dd_freed.is_empty()
            && self.store.tier_pending.is_empty()
            && self.store.next_tier_id == self.sb.next_tier_id
            && self.store.next_pack == self.sb.next_pack
            && self.store.pending_free.is_empty()
            && self.free_queue.iter().all(|f| f.is_empty())
        {
            return Ok(None);
        }
        let mut written = HashMap::new();
        let mut out = Vec::new();
        // 1. Volume and snapshot trees, children before parents.
        let store = &mut self.store;
        let roots = self
            .volumes
            .values_mut()
            .map(|v| (v.root, &mut v.root_csum))
            .chain(
                self.snapshots
                    .values_mut()
                    .map(|s| (s.root, &mut s.root_csum)),
            );
        for (root, csum) in roots {
            if store.dirty.contains_key(&root) || written.contains_key(&root) {
                *csum = store
                    .write_tree(
                        Ptr {
                            addr: root,
                            csum: *csum,
                        },
                        &mut written,
                        &mut out,
                    )?
                    .csum;
            }
        }
        // 2. Catalog records.
        let cat = self.write_catalog_records(&mut out)?;
        let cat = self.store.write_tree(cat, &mut written, &mut out)?;
        // 3. Dedup index: entries of freed objects dropped, new ones added.
        self.store.apply_dedup()?;
        let dd = self
            .store
            .write_tree(self.store.dd_root, &mut written, &mut out)?;
        let ddr = self
            .store
            .write_tree(self.store.ddr_root, &mut written, &mut out)?;
        // 4. The tier map.
        self.store.apply_tier()?;
        let tier = self
            .store
            .write_tree(self.store.tier_root, &mut written, &mut out)?;
        // 5. Refcounts, applied in one sorted batch.
        self.store.apply_rc_delta()?;
        let rc = self
            .store
            .write_tree(self.store.rc_root, &mut written, &mut out)?;
        if !self.store.dirty.is_empty() {
            return Err(internal(&format!(
                "{} dirty node(s) unreachable at commit",
                self.store.dirty.len()
            )));
        }
        // The intent log restarts with this generation: ops pending now
        // are in this commit, the old chain's slots are freed with it.
        let (log_head, log_blocks) = self.log_restart(self.sb.generation + 1);
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid: self.sb.uuid,
            generation: self.sb.generation + 1,
            total_blocks: self.sb.total_blocks,
            max_fanout: self.sb.max_fanout,
            catalog: cat,
            refcounts: rc,
            next_id: self.next_id,
            commit_time_ns: now_ns(),
            dedup: dd,
            dedup_rev: ddr,
            log_head,
            log_blocks,
            tier,
            next_tier_id: self.store.next_tier_id,
            next_pack: self.store.next_pack,
        };
        self.catalog_root = cat;
        self.store.dd_root = dd;
        self.store.ddr_root = ddr;
        self.store.rc_root = rc;
        self.store.tier_root = tier;
        out.sort_unstable_by_key(|(a, _)| *a);
        Ok(Some(Prepared {
            out,
            sb,
            freed: self.store.take_pending_free(),
        }))
    }

    /// Step 2 of [`Inner::prepare_commit`]: writes a new blob for every
    /// changed catalog record (the old one is freed later), drops deleted
    /// ones, and returns the catalog tree's root with those changes.
    fn write_catalog_records(&mut self, out: &mut Vec<(u64, Vec<u8>)>) -> Result<Ptr> {
        let dirty: Vec<(u64, bool)> = std::mem::take(&mut self.catalog_dirty)
            .into_iter()
            .collect();
        let mut cat = self.catalog_root;
        for (key, present) in dirty {
            if let Some((old, blocks)) = self.blobs.remove(&key) {
                self.store.free_blocks_later(old.addr, blocks);
            }
            let bytes = if !present {
                None
            } else if key == KEY_POOL {
                Some(serde_json::to_vec(&self.pool_rec))
            } else if key & KEY_SNAPSHOT == KEY_SNAPSHOT {
                self.snapshots
                    .get(&(key & ((1 << 56) - 1)))
                    .map(serde_json::to_vec)
            } else {
                self.volumes
                    .get(&(key & ((1 << 56) - 1)))
                    .map(serde_json::to_vec)
            };
            match bytes {
                Some(b) => {
                    let b = b.map_err(|e| internal(&e.to_string()))?;
                    let mut blob = Vec::with_capacity(4 + b.len());
                    blob.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    blob.extend_from_slice(&b);
                    let csum = crc(&blob);
                    let blocks = (blob.len() as u64).div_ceil(UNIT);
                    blob.resize((blocks * UNIT) as usize, 0);
                    let addr = self.store.alloc_blocks(blocks)?;
                    out.push((addr, blob));
                    let p = Ptr { addr, csum };
                    self.blobs.insert(key, (p, blocks));
                    self.store
                        .insert(TreeKind::Catalog, &mut cat, key, &enc_ptr(p))?;
                }
                None => {
                    self.store.remove(TreeKind::Catalog, &mut cat, key)?;
                }
            }
        }
        Ok(cat)
    }

    /// Phase 3, under the lock: the commit is durable; publish it and let
    /// blocks freed `FREE_DELAY` commits ago be reused.
    fn finish_commit(&mut self, p: Prepared, t0: std::time::Instant) {
        self.store.generation = p.sb.generation + 1;
        self.sb = p.sb;
        self.store.in_flight.clear();
        self.free_queue.push_back(p.freed);
        while self.free_queue.len() > FREE_DELAY && self.pins == 0 {
            if let Some(list) = self.free_queue.pop_front() {
                for (a, n) in list {
                    self.store.alloc.free(a, n);
                }
            }
        }
        self.commits += 1;
        if self.full_since.is_some() && self.data_free() > (self.reserve / 4).max(256) {
            self.full_since = None;
        }
        self.commit_ns += t0.elapsed().as_nanos() as u64;
        self.log.last_commit = Some(std::time::Instant::now());
    }

    /// Trees are dirty and the last commit is [`super::intent::COMMIT_EVERY`]
    /// old: a flush commits even if the log made everything durable.
    /// Space freed and waiting for commits makes a flush commit too, so
    /// on an idle pool a delete's space is reusable after the next
    /// [`FREE_DELAY`] periodic flushes.
    fn commit_due(&self) -> bool {
        if self.committing {
            return false;
        }
        let older = |d| self.log.last_commit.is_some_and(|t| t.elapsed() >= d);
        // (Not at every flush: a database's back-to-back fsyncs would
        // each pay a commit while its overwrites keep frees waiting.)
        (self.has_uncommitted() && older(super::intent::COMMIT_EVERY))
            || (self.pins == 0
                && self.freeing_commits() > 0
                && older(std::time::Duration::from_secs(1)))
    }

    /// Commits after which every freed block is reusable (0: none waits).
    pub(crate) fn freeing_commits(&self) -> u64 {
        let stalled_frees = self.stalled.as_ref().is_some_and(|p| !p.freed.is_empty());
        if !self.store.pending_free.is_empty() || stalled_frees {
            return FREE_DELAY as u64 + 1;
        }
        let len = self.free_queue.len();
        match self.free_queue.iter().rposition(|l| !l.is_empty()) {
            Some(i) => ((i + 1 + FREE_DELAY).saturating_sub(len)).max(1) as u64,
            None => 0,
        }
    }

    pub(crate) fn committing(&self) -> bool {
        self.committing
    }

    pub(crate) fn has_uncommitted(&self) -> bool {
        !self.catalog_dirty.is_empty()
            || !self.store.dirty.is_empty()
            || !self.store.rc_delta.is_empty()
            || !self.store.dd_pending.is_empty()
            || !self.store.ddr_pending.is_empty()
    }
}

/// While alive, no block that a committed root reached is reused (frees
/// wait, see `Inner::pins`): for readers of committed trees outside the
/// pool lock (a live scrub, a diff), whose trees a relocation or a
/// delete may replace meanwhile.
pub(crate) struct Pin<'a>(&'a Pool);

impl Pool {
    /// Pins with the pool lock held (`g` is this pool's).
    pub(crate) fn pin_locked(&self, g: &mut Inner) -> Pin<'_> {
        g.pins += 1;
        Pin(self)
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        if let Ok(mut g) = self.0.lock() {
            g.pins = g.pins.saturating_sub(1);
        }
    }
}

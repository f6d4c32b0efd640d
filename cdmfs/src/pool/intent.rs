//! The intent log: a FLUSH costs one log record and one sync, not a tree
//! commit (as ZFS's ZIL does for synchronous writes).
//!
//! Every write's effect on a volume's tree is kept as a [`LogOp`] (the
//! objects it wrote, the dedup hits it referenced, the blocks or piece it
//! mapped). A flush with nothing but such ops pending writes them as one
//! record into a slot allocated in advance and syncs, which also makes the
//! data they name durable. Tree commits happen behind it: when dirty nodes
//! or the log grow large, when a catalog change (a snapshot, a new volume)
//! must be durable, at close, and at most [`COMMIT_EVERY`] apart.
//!
//! On disk, each commit's superblock names the first slot of its chain;
//! each record names the slot of the next one. A record counts only if its
//! magic, pool uuid, chain generation (the superblock's) and sequence match
//! and its crc holds, and if every chunk it mapped reads back with the
//! checksum its extent holds. Since a record is acknowledged only after the
//! sync that follows it, only the last record can fail those checks, and
//! replay stops there: a torn or unsynced record is ignored, never half
//! applied. Replay redoes the ops on the trees of the superblock (the same
//! code the write path runs), and the open then commits; a cut during that
//! commit replays the same records again (idempotent).

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::format::*;

use super::{Inner, Pool};

/// Blocks of one log slot (64 KiB: a record of ~1,500 block mappings).
pub(super) const SLOT_BLOCKS: u32 = 16;
const HDR: usize = 64;
const MAGIC: &[u8; 8] = b"CDMLOG\0\0";
/// Records per chain before a flush commits instead (bounds replay time
/// and the space slots hold: 512 × 64 KiB).
const MAX_RECORDS: u64 = 512;
/// Longest a flush goes on logging before it commits the trees.
pub(super) const COMMIT_EVERY: Duration = Duration::from_secs(5);

/// What one write did to a volume's tree.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Action {
    /// Whole blocks mapped (or unmapped: None); their pieces dropped.
    Blocks(Vec<(u64, Option<Extent>)>),
    /// A piece mapped over its block.
    Piece(PieceKey, Extent),
    /// Whole blocks `b0..b1` unmapped (trim, write-zeroes).
    Unmap(u64, u64),
    /// References taken on dedup hits (`LogOp::taken`), logged when they
    /// are taken: a write on another block may drop one of the same
    /// objects before this write maps its hit, and replay must see the
    /// counts in the order they changed.
    Take,
    /// Dedup references released by a write that failed after taking them.
    Release(Vec<Extent>),
}

/// One mutation, as the write path applied it and replay redoes it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct LogOp {
    pub vol: u64,
    /// New objects: (pool block, blocks, references).
    pub objects: Vec<(u64, u32, u32)>,
    /// Dedup hits: one reference taken on each.
    pub taken: Vec<Extent>,
    pub action: Action,
}

/// The log of the current generation, in memory.
#[derive(Default)]
pub(super) struct LogState {
    /// Generation whose superblock names the chain (0: no chain, e.g. a
    /// pool whose superblock predates the log: the next flush commits).
    pub gen: u64,
    /// Sequence number of the next record.
    pub seq: u64,
    /// Where the next record goes.
    pub slot: (u64, u32),
    /// Every slot of the chain, freed by the next commit.
    pub slots: Vec<(u64, u32)>,
    /// Ops applied since the last record or commit.
    pub pending: Vec<LogOp>,
    pub pending_bytes: usize,
    /// A change that only a commit makes durable (catalog, pool record).
    pub structural: bool,
    /// A record of this chain failed to write: the chain ends there.
    pub broken: bool,
    pub last_commit: Option<Instant>,
    /// Records written since open, and replayed at open.
    pub records: u64,
    pub replayed: u64,
}

impl LogState {
    /// Whether the pending ops can be made durable by a record.
    pub fn can_log(&self) -> bool {
        self.gen != 0
            && !self.structural
            && !self.broken
            && self.seq <= MAX_RECORDS
            && HDR + self.pending_bytes <= SLOT_BLOCKS as usize * UNIT as usize
            && self.last_commit.is_none_or(|t| t.elapsed() < COMMIT_EVERY)
    }
}

fn put_ext(out: &mut Vec<u8>, e: &Extent) {
    out.extend_from_slice(&e.encode());
}

impl LogOp {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self.action {
            Action::Blocks(_) => 1u8,
            Action::Piece(..) => 2,
            Action::Unmap(..) => 3,
            Action::Take => 4,
            Action::Release(_) => 5,
        };
        out.push(kind);
        out.extend_from_slice(&self.vol.to_le_bytes());
        out.extend_from_slice(&(self.objects.len() as u32).to_le_bytes());
        for (a, n, r) in &self.objects {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(self.taken.len() as u32).to_le_bytes());
        for e in &self.taken {
            put_ext(out, e);
        }
        match &self.action {
            Action::Blocks(exts) => {
                out.extend_from_slice(&(exts.len() as u32).to_le_bytes());
                for (b, e) in exts {
                    out.extend_from_slice(&b.to_le_bytes());
                    match e {
                        Some(e) => {
                            out.push(1);
                            put_ext(out, e);
                        }
                        None => out.push(0),
                    }
                }
            }
            Action::Piece(k, e) => {
                out.extend_from_slice(&k.encode().to_le_bytes());
                put_ext(out, e);
            }
            Action::Unmap(b0, b1) => {
                out.extend_from_slice(&b0.to_le_bytes());
                out.extend_from_slice(&b1.to_le_bytes());
            }
            Action::Take => {}
            Action::Release(exts) => {
                out.extend_from_slice(&(exts.len() as u32).to_le_bytes());
                for e in exts {
                    put_ext(out, e);
                }
            }
        }
    }

    pub fn encoded_len(&self) -> usize {
        let tail = match &self.action {
            Action::Blocks(exts) => {
                4 + exts
                    .iter()
                    .map(|(_, e)| 9 + e.map_or(0, |_| 20))
                    .sum::<usize>()
            }
            Action::Piece(..) => 28,
            Action::Unmap(..) => 16,
            Action::Take => 0,
            Action::Release(exts) => 4 + exts.len() * Extent::SIZE,
        };
        1 + 8 + 4 + self.objects.len() * 16 + 4 + self.taken.len() * Extent::SIZE + tail
    }

    /// The extents this op maps that name objects it wrote (their data must
    /// read back for the record to count).
    fn new_extents(&self) -> Vec<Extent> {
        let new = |e: &Extent| self.objects.iter().any(|(a, _, _)| *a == e.addr);
        match &self.action {
            Action::Blocks(exts) => exts.iter().filter_map(|(_, e)| *e).filter(new).collect(),
            Action::Piece(_, e) if new(e) => vec![*e],
            _ => Vec::new(),
        }
    }
}

/// A cursor over a record's payload; every read is bounds-checked.
struct Rd<'a> {
    b: &'a [u8],
    o: usize,
}

impl Rd<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.o..self.o.checked_add(n)?)?;
        self.o += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| rd_u32(s, 0))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| rd_u64(s, 0))
    }
    fn ext(&mut self) -> Option<Extent> {
        let e = Extent::decode(self.take(Extent::SIZE)?);
        e.sane().then_some(e)
    }
    /// A count of items of at least `min` bytes each that can still fit.
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.checked_mul(min)? <= self.b.len() - self.o).then_some(n)
    }
}

/// Decodes a record's payload; None if it is not a well-formed list of ops.
pub(super) fn decode_ops(payload: &[u8]) -> Option<Vec<LogOp>> {
    let mut r = Rd { b: payload, o: 0 };
    let mut ops = Vec::new();
    while r.o < payload.len() {
        let kind = r.u8()?;
        let vol = r.u64()?;
        let mut objects = Vec::new();
        for _ in 0..r.count(16)? {
            let (a, n, refs) = (r.u64()?, r.u32()?, r.u32()?);
            if !(RESERVED_BLOCKS..MAX_BLOCK_ADDR).contains(&a) || n == 0 || refs == 0 {
                return None;
            }
            objects.push((a, n, refs));
        }
        let mut taken = Vec::new();
        for _ in 0..r.count(Extent::SIZE)? {
            taken.push(r.ext()?);
        }
        let action = match kind {
            1 => {
                let mut exts = Vec::new();
                for _ in 0..r.count(9)? {
                    let b = r.u64()?;
                    let e = match r.u8()? {
                        0 => None,
                        1 => Some(r.ext()?),
                        _ => return None,
                    };
                    if b >= MAX_BLOCK_ADDR {
                        return None;
                    }
                    exts.push((b, e));
                }
                Action::Blocks(exts)
            }
            2 => Action::Piece(PieceKey::decode(r.u64()?)?, r.ext()?),
            3 => {
                let (b0, b1) = (r.u64()?, r.u64()?);
                if b0 > b1 || b1 > MAX_BLOCK_ADDR {
                    return None;
                }
                Action::Unmap(b0, b1)
            }
            4 => Action::Take,
            5 => {
                let mut exts = Vec::new();
                for _ in 0..r.count(Extent::SIZE)? {
                    exts.push(r.ext()?);
                }
                Action::Release(exts)
            }
            _ => return None,
        };
        ops.push(LogOp {
            vol,
            objects,
            taken,
            action,
        });
    }
    Some(ops)
}

/// A record's header fields.
struct Header {
    uuid: [u8; 16],
    gen: u64,
    seq: u64,
    next: (u64, u32),
}

fn encode_record(h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; HDR + payload.len()];
    b[0..8].copy_from_slice(MAGIC);
    b[8..24].copy_from_slice(&h.uuid);
    wr_u64(&mut b, 24, h.gen);
    wr_u64(&mut b, 32, h.seq);
    wr_u32(&mut b, 40, payload.len() as u32);
    wr_u64(&mut b, 44, h.next.0);
    wr_u32(&mut b, 52, h.next.1);
    b[HDR..].copy_from_slice(payload);
    let c = crc32c::crc32c_append(crc(&b[..56]), &b[60..]);
    wr_u32(&mut b, 56, c);
    let blocks = (b.len() as u64).div_ceil(UNIT);
    b.resize((blocks * UNIT) as usize, 0);
    b
}

/// The record in a slot's bytes, if it is one of chain `gen` at `seq`.
fn decode_record<'a>(
    b: &'a [u8],
    uuid: &[u8; 16],
    gen: u64,
    seq: u64,
) -> Option<(Header, &'a [u8])> {
    if b.len() < HDR || &b[0..8] != MAGIC || &b[8..24] != uuid {
        return None;
    }
    let len = rd_u32(b, 40) as usize;
    let payload = b.get(HDR..HDR + len)?;
    if crc32c::crc32c_append(crc(&b[..56]), &b[60..HDR + len]) != rd_u32(b, 56) {
        return None;
    }
    let next = (rd_u64(b, 44), rd_u32(b, 52));
    let h = Header {
        uuid: *uuid,
        gen: rd_u64(b, 24),
        seq: rd_u64(b, 32),
        next,
    };
    let next_ok = next.0 >= RESERVED_BLOCKS && next.0 < MAX_BLOCK_ADDR && next.1 == SLOT_BLOCKS;
    (h.gen == gen && h.seq == seq && next_ok).then_some((h, payload))
}

impl Inner {
    /// Starts the chain of the commit being prepared: frees the old chain's
    /// slots with this commit's other frees and allocates the new head.
    /// Ops pending now are in the commit.
    pub(super) fn log_restart(&mut self, gen: u64) -> (u64, u32) {
        // A chain that holds no record keeps its head slot: an idle pool's
        // commits then free nothing, so space freed by a delete stops
        // "freeing" after two of them (and idle commits stop). Safe: a
        // record counts only in the generation it names.
        if self.log.gen != 0 && self.log.seq == 1 && !self.log.broken && self.log.slots.len() == 1 {
            let head = self.log.slots[0];
            self.log.pending.clear();
            self.log.pending_bytes = 0;
            self.log.structural = false;
            self.log.gen = gen;
            self.log.slot = head;
            return head;
        }
        for (a, n) in std::mem::take(&mut self.log.slots) {
            self.store.free_blocks_later(a, n as u64);
        }
        self.log.pending.clear();
        self.log.pending_bytes = 0;
        self.log.structural = false;
        self.log.broken = false;
        self.log.seq = 1;
        // No room for a slot (a full or fragmented pool): this generation
        // has no log and its flushes commit; the next commit tries again.
        // Slots come out of data's share: the reserve is for commits.
        let room = self.data_free() >= SLOT_BLOCKS as u64;
        let Some(addr) = room
            .then(|| self.store.alloc.alloc(SLOT_BLOCKS as u64))
            .flatten()
        else {
            self.log.gen = 0;
            self.log.slot = (0, 0);
            return (0, 0);
        };
        let head = (addr, SLOT_BLOCKS);
        self.log.gen = gen;
        self.log.slot = head;
        self.log.slots = vec![head];
        head
    }

    pub(super) fn log_push(&mut self, op: LogOp) {
        self.log.pending_bytes += op.encoded_len();
        self.log.pending.push(op);
    }

    /// Takes the pending ops as the next record: its bytes and where they
    /// go. Allocates the slot after it.
    fn take_record(&mut self) -> Option<(Vec<u8>, u64)> {
        // No room for the next slot: the caller commits instead.
        if self.data_free() < SLOT_BLOCKS as u64 {
            return None;
        }
        let next = (self.store.alloc.alloc(SLOT_BLOCKS as u64)?, SLOT_BLOCKS);
        let mut payload = Vec::with_capacity(self.log.pending_bytes);
        for op in std::mem::take(&mut self.log.pending) {
            op.encode(&mut payload);
        }
        self.log.pending_bytes = 0;
        let h = Header {
            uuid: self.sb.uuid,
            gen: self.log.gen,
            seq: self.log.seq,
            next,
        };
        let rec = encode_record(&h, &payload);
        let at = self.log.slot.0;
        self.log.slot = next;
        self.log.slots.push(next);
        self.log.seq += 1;
        self.log.records += 1;
        Some((rec, at))
    }

    /// Redoes the records of the chain the superblock names; returns how
    /// many counted. Every slot read is claimed (freed by the next commit).
    pub(super) fn replay_log(&mut self) -> Result<u64> {
        self.log.gen = self.sb.generation;
        self.log.seq = 1;
        if self.sb.log_head == 0 {
            // A superblock from before the log: the first flush commits.
            self.log.gen = 0;
            return Ok(0);
        }
        if self.sb.log_blocks != SLOT_BLOCKS {
            return Err(Error::Corrupt(format!(
                "superblock names an intent log slot of {} blocks",
                self.sb.log_blocks
            )));
        }
        // First read the whole chain and claim every slot and every object
        // it names: redoing an op allocates tree nodes, which must not land
        // on blocks a later record's data holds.
        let mut slot = (self.sb.log_head, self.sb.log_blocks);
        let mut records: Vec<((u64, u32), Vec<LogOp>)> = Vec::new();
        loop {
            self.claim(slot.0, slot.1, "intent log slot")?;
            self.log.slots.push(slot);
            self.log.slot = slot;
            let mut buf = vec![0u8; slot.1 as usize * UNIT as usize];
            self.store.dev.read_at(&mut buf, slot.0 * UNIT)?;
            let seq = self.log.seq + records.len() as u64;
            let Some((h, payload)) = decode_record(&buf, &self.sb.uuid, self.log.gen, seq) else {
                break;
            };
            let Some(ops) = decode_ops(payload) else {
                tracing::warn!(seq, "intent log record does not decode; replay stops");
                break;
            };
            records.push((slot, ops));
            slot = h.next;
        }
        // A record is written only after the sync of the one before it,
        // which covered that one's data: only the last can name data that
        // never reached the disk (and then it was never acknowledged).
        if let Some((at, last)) = records.last() {
            if !self.log_data_intact(last)? {
                tracing::info!(
                    seq = self.log.seq + records.len() as u64 - 1,
                    "the last intent log record names unwritten data; it is skipped"
                );
                // The next record goes where it was, with its number.
                self.log.slot = *at;
                records.pop();
            }
        }
        for (_, ops) in &records {
            for op in ops {
                for &(a, n, _) in &op.objects {
                    self.claim(a, n, "data the intent log names")?;
                }
            }
        }
        for (_, ops) in &records {
            for op in ops {
                for e in &op.taken {
                    self.store.inc(e.addr)?;
                }
                self.apply_op(op)?;
            }
        }
        let n = records.len() as u64;
        self.log.seq += n;
        self.log.replayed = n;
        Ok(n)
    }

    fn claim(&mut self, addr: u64, blocks: u32, what: &str) -> Result<()> {
        if blocks == 0 || !self.store.alloc.mark(addr, blocks as u64) {
            return Err(Error::Corrupt(format!(
                "{what} at pool block {addr} overlaps space in use"
            )));
        }
        Ok(())
    }

    /// Whether every chunk a record wrote reads back with its checksum.
    fn log_data_intact(&mut self, ops: &[LogOp]) -> Result<bool> {
        for op in ops {
            for e in op.new_extents() {
                let mut b = vec![0u8; e.stored_len as usize];
                if self.store.dev.read_at(&mut b, e.byte_offset()).is_err() || crc(&b) != e.csum {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

impl Pool {
    /// Makes pending writes durable with one log record and one sync, if
    /// nothing else needs a commit: returns the mutation count now durable,
    /// or None when the caller must commit instead. The caller holds
    /// `durable`, so records are written one at a time, in order.
    pub(super) fn log_flush(&self) -> Result<Option<u64>> {
        let (rec, at, seq) = {
            let mut g = self.lock()?;
            if !g.log.can_log() || g.stalled.is_some() {
                return Ok(None);
            }
            let seq = g.ops;
            if g.log.pending.is_empty() {
                return Ok(Some(seq));
            }
            let Some((rec, at)) = g.take_record() else {
                return Ok(None);
            };
            (rec, at, seq)
        };
        if let Err(e) = self.dev.write_at(&rec, at * UNIT) {
            // The record may be torn: replay would stop there, so no later
            // record of this chain may count. The ops stay in the trees;
            // the caller commits them instead.
            let mut g = self.inner.lock().map_err(|_| Error::Failed)?;
            tracing::warn!(error = %e, "intent log write failed; committing instead");
            g.log.broken = true;
            return Ok(None);
        }
        if let Err(e) = self.dev.sync() {
            // The data this record names may be lost with the failed
            // writeback (see `commit::Phase2`): reload from the device.
            let e = Error::from(e);
            self.inner
                .lock()
                .map_err(|_| Error::Failed)?
                .sync_failed(&e);
            return Err(e);
        }
        Ok(Some(seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(addr: u64) -> Extent {
        Extent {
            addr,
            stored_len: 4096,
            csum: 7,
            flags: 0,
            aux: 0,
        }
    }

    fn ops() -> Vec<LogOp> {
        vec![
            LogOp {
                vol: 3,
                objects: vec![(300, 1, 1), (301, 16, 2)],
                taken: vec![],
                action: Action::Blocks(vec![(5, Some(ext(300))), (6, None), (7, Some(ext(400)))]),
            },
            LogOp {
                vol: 4,
                objects: vec![(500, 2, 1)],
                taken: vec![],
                action: Action::Piece(
                    PieceKey {
                        block: 9,
                        start: 2,
                        units: 2,
                    },
                    ext(500),
                ),
            },
            LogOp {
                vol: 4,
                objects: vec![],
                taken: vec![],
                action: Action::Unmap(10, 20),
            },
            LogOp {
                vol: 0,
                objects: vec![],
                taken: vec![ext(600), ext(601)],
                action: Action::Take,
            },
            LogOp {
                vol: 0,
                objects: vec![],
                taken: vec![],
                action: Action::Release(vec![ext(600)]),
            },
        ]
    }

    #[test]
    fn ops_round_trip_and_their_length_is_known() {
        let mut b = Vec::new();
        for op in ops() {
            let before = b.len();
            op.encode(&mut b);
            assert_eq!(b.len() - before, op.encoded_len());
        }
        assert_eq!(decode_ops(&b), Some(ops()));
    }

    #[test]
    fn every_truncation_or_garbled_byte_is_refused_or_decodes_sanely() {
        let mut b = Vec::new();
        for op in ops() {
            op.encode(&mut b);
        }
        for n in 0..b.len() {
            // A cut inside an op never decodes as a shorter valid list
            // unless it falls exactly between ops.
            if let Some(d) = decode_ops(&b[..n]) {
                assert!(ops().starts_with(&d), "cut at {n}");
            }
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x80;
            let _ = decode_ops(&c); // no panic, whatever it says
        }
    }

    #[test]
    fn a_record_counts_only_in_its_chain_at_its_place_and_whole() {
        let uuid = [9u8; 16];
        let h = Header {
            uuid,
            gen: 12,
            seq: 3,
            next: (1000, SLOT_BLOCKS),
        };
        let rec = encode_record(&h, b"hello");
        assert!(decode_record(&rec, &uuid, 12, 3).is_some());
        assert!(decode_record(&rec, &uuid, 13, 3).is_none(), "another chain");
        assert!(decode_record(&rec, &uuid, 12, 4).is_none(), "another place");
        assert!(
            decode_record(&rec, &[8u8; 16], 12, 3).is_none(),
            "another pool"
        );
        for i in 0..HDR + 5 {
            let mut t = rec.clone();
            t[i] ^= 1;
            assert!(
                decode_record(&t, &uuid, 12, 3).is_none(),
                "byte {i} flipped"
            );
        }
    }
}

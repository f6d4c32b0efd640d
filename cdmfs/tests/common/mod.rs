//! A simple in-memory model of a pool, and a harness that applies the same
//! operations to the model and to a real pool and compares what they read.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use cdmfs::{BlockDev, DataPolicy, OpenOptions, Pool, Target};

#[derive(Clone, Debug)]
pub enum Op {
    Create {
        size_kib: u32,
        bs_shift: u8,
    },
    Write {
        v: usize,
        off: u32,
        len: u32,
        seed: u8,
    },
    Zero {
        v: usize,
        off: u32,
        len: u32,
    },
    Flush,
    Snapshot {
        v: usize,
    },
    Clone {
        s: usize,
    },
    DeleteSnapshot {
        s: usize,
    },
    DeleteVolume {
        v: usize,
    },
    Grow {
        v: usize,
        add_kib: u32,
    },
    /// One defragmentation step from block `from` moving at most
    /// `budget_kib` (contents unchanged; a step that moves anything
    /// commits, so it is a flush for the crash tests).
    Defrag {
        v: usize,
        from: u32,
        budget_kib: u32,
    },
    Reopen,
    /// Drop the pool without committing: state returns to the last flush.
    Crash,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub vols: BTreeMap<String, Vec<u8>>,
    pub snaps: BTreeMap<u64, (String, Vec<u8>)>,
    next_vol: u32,
}

pub struct Harness {
    pub dev: Arc<dyn BlockDev>,
    pub pool: Option<Pool>,
    pub model: Model,
    pub durable: Model,
    pub opts: OpenOptions,
    /// Policy of the volumes the harness creates.
    pub policy: DataPolicy,
    /// Write data that repeats (across offsets, volumes and seeds), some of
    /// it incompressible, so dedup and compression have work to do.
    pub repetitive: bool,
    /// Generation stamped into the next write's sectors; never rolls back,
    /// so data lost in a crash differs from every later write.
    pub gen: u64,
    /// Volume names by stamp tag, to decode what a bad read returned.
    pub names: BTreeMap<u64, String>,
}

/// Bytes of a sector's stamp: volume tag, byte offset, generation, check.
const STAMP: usize = 32;
/// Sector size of the stamps.
pub const SECTOR: u64 = 512;
/// Repeat unit of [`repetitive`]: a multiple of every block size the tests
/// use (so equal blocks line up for dedup) and larger than any read but the
/// whole-volume checks, so a block served from a neighbour never matches.
pub const DEDUP_REPEAT: u64 = 256 << 10;
/// Tags of [`repetitive`] data: this plus the content class (0..8).
const DEDUP_TAG: u64 = 0xdd00_0000_0000_0000;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The tag stamped into every sector a volume's writes carry (FNV-1a of its
/// name, top bit set so it is never zero nor a dedup tag).
pub fn vol_tag(name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    (h & !(0xff << 56)) | 0x80 << 56
}

fn check_of(tag: u64, off: u64, gen: u64) -> u64 {
    mix(tag ^ mix(off ^ mix(gen)))
}

/// `len` bytes of self-identifying data for byte offset `off`: every 512-byte
/// sector starts with (tag, the sector's byte offset, generation, check) and
/// its filler derives from those, so a sector read from another offset,
/// volume or generation never equals the one expected. `noise` chooses
/// incompressible filler over a constant byte.
pub fn stamped(tag: u64, gen: u64, off: u64, len: usize, noise: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let end = off + len as u64;
    let mut p = off;
    while p < end {
        let s = p / SECTOR * SECTOR;
        let sector = stamp_sector(tag, s, gen, noise);
        let a = (p - s) as usize;
        let b = ((end - s) as usize).min(SECTOR as usize);
        out.extend_from_slice(&sector[a..b]);
        p = s + b as u64;
    }
    out
}

fn stamp_sector(tag: u64, off: u64, gen: u64, noise: bool) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    let check = check_of(tag, off, gen);
    b[0..8].copy_from_slice(&tag.to_le_bytes());
    b[8..16].copy_from_slice(&off.to_le_bytes());
    b[16..24].copy_from_slice(&gen.to_le_bytes());
    b[24..32].copy_from_slice(&check.to_le_bytes());
    if noise {
        for (k, w) in b[STAMP..].chunks_mut(8).enumerate() {
            w.copy_from_slice(&mix(check.wrapping_add(k as u64)).to_le_bytes());
        }
    } else {
        b[STAMP..].fill(check as u8 | 1);
    }
    b
}

/// What a sector holds, decoded from its stamp, for failure messages.
pub fn describe_sector(b: &[u8], names: &BTreeMap<u64, String>) -> String {
    if b.iter().all(|&x| x == 0) {
        return "zeros".into();
    }
    if b.len() < STAMP {
        return format!("{} unstamped bytes", b.len());
    }
    let rd = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let (tag, off, gen, check) = (rd(0), rd(8), rd(16), rd(24));
    if check != check_of(tag, off, gen) {
        return "no valid stamp (a torn sector, or bytes of two writes)".into();
    }
    let who = if tag & !0xff == DEDUP_TAG {
        format!("dedup class {}", tag & 0xff)
    } else {
        names
            .get(&tag)
            .map(|n| format!("volume {n}"))
            .unwrap_or_else(|| format!("volume tag {tag:#x}"))
    };
    let whole = if stamp_sector(tag, off, gen, true)[..] == *b
        || stamp_sector(tag, off, gen, false)[..] == *b
    {
        ""
    } else {
        " (filler differs)"
    };
    format!("{who}, offset {off}, generation {gen}{whole}")
}

/// Data with repeats for dedup: sectors stamped with a content class (the
/// seed modulo 8) and their offset modulo [`DEDUP_REPEAT`], so equal blocks
/// recur across volumes, snapshots, seeds and every 256 KiB within a volume;
/// seeds divisible by 4 give noise, the others compress well.
pub fn repetitive(seed: u8, off: u32, len: usize) -> Vec<u8> {
    let tag = DEDUP_TAG | (seed % 8) as u64;
    let noise = seed.is_multiple_of(4);
    let mut out = Vec::with_capacity(len);
    let (mut p, end) = (off as u64, off as u64 + len as u64);
    while p < end {
        // Split at repeat boundaries so each piece has one base.
        let base = p / DEDUP_REPEAT * DEDUP_REPEAT;
        let n = (end.min(base + DEDUP_REPEAT) - p) as usize;
        out.extend_from_slice(&stamped(tag, 0, p - base, n, noise));
        p += n as u64;
    }
    out
}

/// Self-identifying data of one write (see [`stamped`]).
pub fn pattern(vol: &str, gen: u64, off: u32, len: usize) -> Vec<u8> {
    stamped(vol_tag(vol), gen, off as u64, len, true)
}

/// The first sector where `got` and `want` differ, decoded, or `None`.
pub fn first_difference(got: &[u8], want: &[u8], names: &BTreeMap<u64, String>) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} bytes read, {} expected", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let s = i / SECTOR as usize * SECTOR as usize;
    let e = (s + SECTOR as usize).min(got.len());
    Some(format!(
        "first difference at byte {i}: the sector at {s} holds {}; expected {}",
        describe_sector(&got[s..e], names),
        describe_sector(&want[s..e], names)
    ))
}

impl Harness {
    pub fn new(dev: Arc<dyn BlockDev>, opts: OpenOptions) -> Harness {
        let pool = Pool::open(dev.clone(), &opts).expect("open fresh pool");
        Harness {
            dev,
            pool: Some(pool),
            model: Model::default(),
            durable: Model::default(),
            opts,
            policy: DataPolicy::default(),
            repetitive: false,
            gen: 0,
            names: BTreeMap::new(),
        }
    }

    /// A harness over a pool recovered on `dev`, expecting `model`; carries
    /// the policy, data kind, generation and names of `self` over.
    pub fn recovered(&self, dev: Arc<dyn BlockDev>, pool: Pool, model: &Model) -> Harness {
        Harness {
            dev,
            pool: Some(pool),
            model: model.clone(),
            durable: model.clone(),
            opts: self.opts.clone(),
            policy: self.policy,
            repetitive: self.repetitive,
            gen: self.gen,
            names: self.names.clone(),
        }
    }

    pub fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("pool open")
    }

    fn vol_name(&self, v: usize) -> Option<String> {
        if self.model.vols.is_empty() {
            return None;
        }
        self.model
            .vols
            .keys()
            .nth(v % self.model.vols.len())
            .cloned()
    }
    fn snap_id(&self, s: usize) -> Option<u64> {
        if self.model.snaps.is_empty() {
            return None;
        }
        self.model
            .snaps
            .keys()
            .nth(s % self.model.snaps.len())
            .copied()
    }

    /// Applies `op`; returns the volume touched (for a focused check).
    pub fn apply(&mut self, op: &Op) -> cdmfs::Result<Option<String>> {
        match *op {
            Op::Create { size_kib, bs_shift } => {
                let name = format!("v{}", self.model.next_vol);
                self.model.next_vol += 1;
                let size = (size_kib.max(1) as u64) * 1024 - (size_kib as u64 % 3) * 512;
                // 4 KiB to 64 KiB: blocks with room for several pieces.
                let bs = 4096u32 << (bs_shift % 5);
                self.pool()
                    .create_volume_with(&name, size, bs, self.policy)?;
                self.model.vols.insert(name.clone(), vec![0; size as usize]);
                self.names.insert(vol_tag(&name), name.clone());
                Ok(Some(name))
            }
            Op::Write { v, off, len, seed } => {
                let Some(name) = self.vol_name(v) else {
                    return Ok(None);
                };
                let size = self.model.vols[&name].len() as u32;
                let off = off % size;
                let len = len.min(size - off);
                self.gen += 1;
                let data = if self.repetitive {
                    repetitive(seed, off, len as usize)
                } else {
                    pattern(&name, self.gen, off, len as usize)
                };
                let id = self.pool().volume_id(&name)?;
                self.pool().write(id, off as u64, &data)?;
                self.model.vols.get_mut(&name).unwrap()[off as usize..(off + len) as usize]
                    .copy_from_slice(&data);
                Ok(Some(name))
            }
            Op::Zero { v, off, len } => {
                let Some(name) = self.vol_name(v) else {
                    return Ok(None);
                };
                let size = self.model.vols[&name].len() as u32;
                let off = off % size;
                let len = len.min(size - off);
                let id = self.pool().volume_id(&name)?;
                self.pool().write_zeroes(id, off as u64, len as u64)?;
                self.model.vols.get_mut(&name).unwrap()[off as usize..(off + len) as usize].fill(0);
                Ok(Some(name))
            }
            Op::Flush => {
                self.pool().flush()?;
                self.durable = self.model.clone();
                Ok(None)
            }
            Op::Snapshot { v } => {
                let Some(name) = self.vol_name(v) else {
                    return Ok(None);
                };
                let s = self
                    .pool()
                    .create_snapshot(&name, "t", serde_json::json!({"n": 1}))?;
                let data = self.model.vols[&name].clone();
                self.model.snaps.insert(s.id, (name, data));
                Ok(None)
            }
            Op::Clone { s } => {
                let Some(id) = self.snap_id(s) else {
                    return Ok(None);
                };
                let name = format!("v{}", self.model.next_vol);
                self.model.next_vol += 1;
                self.pool().clone_snapshot(id, &name)?;
                let data = self.model.snaps[&id].1.clone();
                self.model.vols.insert(name.clone(), data);
                self.names.insert(vol_tag(&name), name.clone());
                Ok(Some(name))
            }
            Op::DeleteSnapshot { s } => {
                let Some(id) = self.snap_id(s) else {
                    return Ok(None);
                };
                self.pool().delete_snapshot(id)?;
                self.model.snaps.remove(&id);
                Ok(None)
            }
            Op::DeleteVolume { v } => {
                let Some(name) = self.vol_name(v) else {
                    return Ok(None);
                };
                self.pool().delete_volume(&name, true)?;
                self.model.vols.remove(&name);
                self.model.snaps.retain(|_, (vol, _)| *vol != name);
                Ok(None)
            }
            Op::Grow { v, add_kib } => {
                let Some(name) = self.vol_name(v) else {
                    return Ok(None);
                };
                let old = self.model.vols[&name].len();
                let new = old + add_kib as usize * 1024;
                self.pool().grow_volume(&name, new as u64)?;
                self.model.vols.get_mut(&name).unwrap().resize(new, 0);
                Ok(Some(name))
            }
            Op::Defrag {
                v,
                from,
                budget_kib,
            } => {
                let Some(name) = self.vol_name(v) else {
                    return Ok(None);
                };
                let id = self.pool().volume_id(&name)?;
                let p = self
                    .pool()
                    .defragment_step(id, from as u64, budget_kib as u64 * 1024)?;
                if p.extents_moved > 0 {
                    // A step that moved anything committed (a relocation
                    // is made durable by a commit): like a flush.
                    self.durable = self.model.clone();
                }
                Ok(Some(name))
            }
            Op::Reopen => {
                let p = self.pool.take().expect("pool open");
                p.close()?;
                self.durable = self.model.clone();
                self.pool = Some(Pool::open(self.dev.clone(), &self.opts)?);
                Ok(None)
            }
            Op::Crash => {
                drop(self.pool.take());
                self.model = self.durable.clone();
                self.pool = Some(Pool::open(self.dev.clone(), &self.opts)?);
                Ok(None)
            }
        }
    }

    /// Compares one volume with the model, reading in odd-sized pieces.
    pub fn check_volume(&self, name: &str) {
        let want = &self.model.vols[name];
        let id = self.pool().volume_id(name).expect("volume exists");
        let got = read_all(self.pool(), Target::Volume(id), want.len())
            .unwrap_or_else(|e| panic!("volume {name}: {e}"));
        if let Some(d) = first_difference(&got, want, &self.names) {
            panic!("volume {name} differs from the model: {d}");
        }
    }

    /// Compares everything with `m`.
    pub fn check_all(&self, m: &Model) {
        if let Err(e) = self.diff_all(m) {
            panic!("{e}");
        }
    }

    /// Compares everything with `m`; says what differs first.
    pub fn diff_all(&self, m: &Model) -> Result<(), String> {
        let pool = self.pool();
        let vols = pool.list_volumes().map_err(|e| format!("list: {e}"))?;
        let names: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
        let want: Vec<&str> = m.vols.keys().map(|s| s.as_str()).collect();
        if names != want {
            return Err(format!("volume set differs: {names:?}, expected {want:?}"));
        }
        for v in &vols {
            let want = &m.vols[&v.name];
            if v.size as usize != want.len() {
                return Err(format!("size of {}: {} not {}", v.name, v.size, want.len()));
            }
            let got = read_all(pool, Target::Volume(v.id), want.len())
                .map_err(|e| format!("volume {}: {e}", v.name))?;
            if let Some(d) = first_difference(&got, want, &self.names) {
                return Err(format!("volume {} differs: {d}", v.name));
            }
        }
        let snaps = pool
            .list_snapshots(None)
            .map_err(|e| format!("list snapshots: {e}"))?;
        let ids: Vec<u64> = snaps.iter().map(|s| s.id).collect();
        let want: Vec<u64> = m.snaps.keys().copied().collect();
        if ids != want {
            return Err(format!("snapshot set differs: {ids:?}, expected {want:?}"));
        }
        for s in &snaps {
            let (vol, data) = &m.snaps[&s.id];
            if &s.volume != vol || s.size as usize != data.len() {
                return Err(format!(
                    "snapshot {} is of {} ({} bytes)",
                    s.id, s.volume, s.size
                ));
            }
            let got = read_all(pool, Target::Snapshot(s.id), data.len())
                .map_err(|e| format!("snapshot {}: {e}", s.id))?;
            if let Some(d) = first_difference(&got, data, &self.names) {
                return Err(format!("snapshot {} differs: {d}", s.id));
            }
        }
        Ok(())
    }

    pub fn fsck_clean(&self) {
        let rep = self.pool().fsck().expect("fsck runs");
        assert!(rep.is_clean(), "fsck errors: {:#?}", rep.errors);
    }
}

/// Reads `size` bytes of `t` in odd-sized pieces.
pub fn read_all(pool: &Pool, t: Target, size: usize) -> cdmfs::Result<Vec<u8>> {
    let mut out = vec![0u8; size];
    let mut off = 0;
    let mut step = 4096 * 3 + 1000;
    while off < size {
        let n = step.min(size - off);
        pool.read(t, off as u64, &mut out[off..off + n])?;
        off += n;
        step = step * 7 % 90001 + 511;
    }
    Ok(out)
}

/// A random operation of a database's life on a stage disk: page and
/// larger writes, zeroing and flushes, nothing that needs a commit (so
/// flushes go to the intent log).
pub fn random_db_op(r: &mut impl rand::Rng) -> Op {
    match r.gen_range(0..100) {
        0..=29 => Op::Write {
            v: r.gen(),
            off: r.gen_range(0..100) * 4096,
            len: r.gen_range(1..=4) * 4096,
            seed: r.gen(),
        },
        30..=49 => Op::Write {
            v: r.gen(),
            off: r.gen(),
            len: r.gen_range(1..100_000),
            seed: r.gen(),
        },
        50..=57 => Op::Zero {
            v: r.gen(),
            off: r.gen(),
            len: r.gen_range(1..100_000),
        },
        _ => Op::Flush,
    }
}

/// A defragmentation step somewhere in a volume, small or whole.
pub fn random_defrag(r: &mut impl rand::Rng) -> Op {
    Op::Defrag {
        v: r.gen(),
        from: if r.gen_bool(0.5) {
            0
        } else {
            r.gen_range(0..64)
        },
        budget_kib: r.gen_range(4..1024),
    }
}

/// A random operation, weighted towards I/O.
pub fn random_op(r: &mut impl rand::Rng, with_reopen: bool) -> Op {
    match r.gen_range(0..100) {
        0..=5 => Op::Create {
            size_kib: r.gen_range(16..600),
            bs_shift: r.gen(),
        },
        6..=28 => Op::Write {
            v: r.gen(),
            off: r.gen(),
            len: r.gen_range(1..200_000),
            seed: r.gen(),
        },
        29..=30 => random_defrag(r),
        // Page writes in the first 640 KiB (see the model test's strategy).
        31..=45 => Op::Write {
            v: r.gen(),
            off: r.gen_range(0..160) * 4096,
            len: r.gen_range(1..=4) * 4096,
            seed: r.gen(),
        },
        46..=55 => Op::Zero {
            v: r.gen(),
            off: r.gen(),
            len: r.gen_range(1..300_000),
        },
        56..=67 => Op::Flush,
        68..=76 => Op::Snapshot { v: r.gen() },
        77..=81 => Op::Clone { s: r.gen() },
        82..=87 => Op::DeleteSnapshot { s: r.gen() },
        88..=90 => Op::DeleteVolume { v: r.gen() },
        91..=93 => Op::Grow {
            v: r.gen(),
            add_kib: r.gen_range(1..200),
        },
        94..=96 if with_reopen => Op::Reopen,
        97..=99 if with_reopen => Op::Crash,
        _ => Op::Flush,
    }
}

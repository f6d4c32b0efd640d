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
}

/// Data with repeats: a function of a few seeds and the position modulo 32 KiB
/// (so 4 KiB blocks repeat across offsets); seeds divisible by 4 give noise.
pub fn repetitive(seed: u8, off: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let p = off as u64 + i as u64;
            if seed.is_multiple_of(4) {
                let mut z = (((seed as u64 % 8) << 32) | ((p % 32768) / 8))
                    .wrapping_add(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z >> ((p % 8) * 8)) as u8
            } else {
                ((seed as u64 % 8) * 31 + (p / 512) % 16) as u8 | 1
            }
        })
        .collect()
}

pub fn pattern(seed: u8, off: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (seed as u32)
                .wrapping_mul(31)
                .wrapping_add((off + i as u32) / 512) as u8
                | 1
        })
        .collect()
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
                let bs = 4096u32 << (bs_shift % 3);
                self.pool()
                    .create_volume_with(&name, size, bs, self.policy)?;
                self.model.vols.insert(name.clone(), vec![0; size as usize]);
                Ok(Some(name))
            }
            Op::Write { v, off, len, seed } => {
                let Some(name) = self.vol_name(v) else {
                    return Ok(None);
                };
                let size = self.model.vols[&name].len() as u32;
                let off = off % size;
                let len = len.min(size - off);
                let data = if self.repetitive {
                    repetitive(seed, off, len as usize)
                } else {
                    pattern(seed, off, len as usize)
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
        let got = read_all(self.pool(), Target::Volume(id), want.len());
        assert!(got == *want, "volume {name} differs from the model");
    }

    /// Compares everything with `m`.
    pub fn check_all(&self, m: &Model) {
        let pool = self.pool();
        let vols = pool.list_volumes().expect("list");
        let names: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
        let want: Vec<&str> = m.vols.keys().map(|s| s.as_str()).collect();
        assert_eq!(names, want, "volume set differs");
        for v in &vols {
            assert_eq!(v.size as usize, m.vols[&v.name].len(), "size of {}", v.name);
            let got = read_all(pool, Target::Volume(v.id), v.size as usize);
            assert!(got == m.vols[&v.name], "volume {} differs", v.name);
        }
        let snaps = pool.list_snapshots(None).expect("list snapshots");
        let ids: Vec<u64> = snaps.iter().map(|s| s.id).collect();
        let want: Vec<u64> = m.snaps.keys().copied().collect();
        assert_eq!(ids, want, "snapshot set differs");
        for s in &snaps {
            let (vol, data) = &m.snaps[&s.id];
            assert_eq!(&s.volume, vol);
            let got = read_all(pool, Target::Snapshot(s.id), s.size as usize);
            assert!(got == *data, "snapshot {} differs", s.id);
        }
    }

    pub fn fsck_clean(&self) {
        let rep = self.pool().fsck().expect("fsck runs");
        assert!(rep.is_clean(), "fsck errors: {:#?}", rep.errors);
    }
}

pub fn read_all(pool: &Pool, t: Target, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    let mut off = 0;
    let mut step = 4096 * 3 + 1000;
    while off < size {
        let n = step.min(size - off);
        pool.read(t, off as u64, &mut out[off..off + n])
            .expect("read");
        off += n;
        step = step * 7 % 90001 + 511;
    }
    out
}

/// A random operation, weighted towards I/O.
pub fn random_op(r: &mut impl rand::Rng, with_reopen: bool) -> Op {
    match r.gen_range(0..100) {
        0..=5 => Op::Create {
            size_kib: r.gen_range(16..600),
            bs_shift: r.gen(),
        },
        6..=45 => Op::Write {
            v: r.gen(),
            off: r.gen(),
            len: r.gen_range(1..200_000),
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

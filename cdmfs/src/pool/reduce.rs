//! The write path of volumes with a data policy: dedup, compression into
//! frames and packs, encryption at rest.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::{self, Cipher, DataPolicy, Keys};
use crate::store::internal;

use super::write::{write_runs, Written};
use super::Pool;

impl Pool {
    /// The write path of a volume with a policy: fingerprint, look up the
    /// dedup index (hits are referenced at once, so they cannot be freed
    /// before they are mapped), compress new chunks and pack the
    /// compressed ones, encrypt with a tweak from where they land, write.
    pub(super) fn write_pipeline(
        &self,
        vol: u64,
        bs: u32,
        policy: DataPolicy,
        blocks: Vec<(u64, Option<Vec<u8>>)>,
    ) -> Result<()> {
        let (written, taken) = self.store_chunks(bs, policy, blocks)?;
        self.map_blocks(vol, written, taken)
    }

    /// Stores chunks of `bs` bytes each (whole blocks, or one piece) through
    /// the pipeline; returns what to map and the dedup hits referenced for
    /// it (released again if storing fails).
    pub(super) fn store_chunks(
        &self,
        bs: u32,
        policy: DataPolicy,
        mut blocks: Vec<(u64, Option<Vec<u8>>)>,
    ) -> Result<(Written, Vec<Extent>)> {
        let keys = match policy.encryption {
            Some(_) => Some(self.keys.clone().ok_or(Error::KeyRequired)?),
            None => None,
        };
        let cipher = policy.encryption;
        let fps: Vec<Option<[u8; 32]>> = blocks
            .iter()
            .map(|(_, c)| match c {
                Some(d) if policy.dedup => Some(pipeline::fingerprint(keys.as_deref(), cipher, d)),
                _ => None,
            })
            .collect();
        let hits: Vec<Option<Extent>> = if policy.dedup {
            self.take_dedup_hits(&fps)?
        } else {
            vec![None; blocks.len()]
        };
        let taken: Vec<Extent> = hits.iter().flatten().copied().collect();
        let r = self.store_new_chunks(bs, policy, keys.as_deref(), &mut blocks, &fps, &hits);
        let written = match r {
            Ok(w) => w,
            Err(e) => {
                self.lock()?.release_taken(taken)?;
                return Err(e);
            }
        };
        Ok((written, taken))
    }

    /// Looks up the dedup index for every fingerprint and takes a reference
    /// on each hit at once, so a hit cannot be freed before it is mapped.
    pub(super) fn take_dedup_hits(&self, fps: &[Option<[u8; 32]>]) -> Result<Vec<Option<Extent>>> {
        self.locked_no_io(|g| {
            let mut found = Vec::with_capacity(fps.len());
            for fp in fps {
                found.push(match fp {
                    Some(f) => g.store.dd_lookup(f)?,
                    None => None,
                });
            }
            let mut per: BTreeMap<u64, u32> = BTreeMap::new();
            for e in found.iter().flatten() {
                *per.entry(e.addr).or_default() += 1;
            }
            // Every read first (any may miss the cache), then the updates.
            let mut vals = Vec::with_capacity(per.len());
            for (&a, &n) in &per {
                let v = g
                    .store
                    .rc_get(a)?
                    .ok_or_else(|| internal("dedup hit has no refcount"))?;
                vals.push((a, v, n));
            }
            for (a, mut v, n) in vals {
                v.refs = v
                    .refs
                    .checked_add(n)
                    .ok_or_else(|| internal("refcount overflow"))?;
                g.store.rc_put(a, Some(v));
            }
            // Logged now, in the order the counts changed (see `Action::Take`).
            let taken: Vec<Extent> = found.iter().flatten().copied().collect();
            if !taken.is_empty() {
                g.log_push(super::intent::LogOp {
                    vol: 0,
                    objects: Vec::new(),
                    taken,
                    action: super::intent::Action::Take,
                });
            }
            Ok(found)
        })
    }

    /// Compresses, packs, encrypts and writes the chunks of `blocks` that
    /// are neither holes nor dedup hits. Consecutive new chunks are
    /// compressed together as one zstd frame of up to [`FRAME_BYTES`]
    /// (each chunk's extent names the frame and its index in it); frames
    /// that save at least 1/8 go into packs, the others are stored plain.
    /// Objects are allocated even if the device write failed (see
    /// [`Written::io`]).
    fn store_new_chunks(
        &self,
        bs: u32,
        policy: DataPolicy,
        keys: Option<&Keys>,
        blocks: &mut [(u64, Option<Vec<u8>>)],
        fps: &[Option<[u8; 32]>],
        hits: &[Option<Extent>],
    ) -> Result<Written> {
        let NewChunks { mut news, which } = new_chunks(blocks, fps, hits);
        let Framed { plain, mut frames } = frame_chunks(policy, bs, &news);
        let packs = plan_packs(&frames);
        let sealer = Sealer {
            keys,
            cipher: policy.encryption,
            base: base_flags(policy),
        };
        let units = bs as u64 / UNIT;
        let plain_addrs = self.allocate(plain.len() as u64, units)?;
        let mut out = Written {
            exts: Vec::new(),
            objects: Vec::new(),
            index: Vec::new(),
            io: Ok(()),
        };
        let mut io: Vec<(u64, Vec<u8>)> = Vec::new();
        for (&j, &addr) in plain.iter().zip(&plain_addrs) {
            let n = &mut news[j];
            let mut e = Extent {
                addr,
                stored_len: bs,
                csum: 0,
                flags: sealer.base,
                aux: 0,
            };
            sealer.seal(&mut e, &mut n.bytes);
            out.objects.push((addr, units as u32, n.refs));
            if let Some(f) = n.fp {
                out.index.push((f, e, 0));
            }
            n.ext = Some(e);
            io.push((addr, std::mem::take(&mut n.bytes)));
        }
        for pack in packs {
            let buf = self.store_pack(&pack, &mut frames, &mut news, &sealer, &mut out)?;
            io.push(buf);
        }
        out.exts = blocks
            .iter()
            .enumerate()
            .map(|(i, (b, _))| (*b, hits[i].or_else(|| which[i].and_then(|j| news[j].ext))))
            .collect();
        out.io = write_runs(&*self.dev, io);
        Ok(out)
    }

    /// Allocates one pack, seals its frames into it and gives every chunk
    /// of them its extent. Returns the pack's address and bytes to write;
    /// on allocation failure frees the objects of `out` allocated so far.
    fn store_pack(
        &self,
        pack: &[(usize, u64)],
        frames: &mut [(Vec<usize>, Vec<u8>)],
        news: &mut [New],
        sealer: &Sealer<'_>,
        out: &mut Written,
    ) -> Result<(u64, Vec<u8>)> {
        let size = pack
            .iter()
            .map(|&(f, o)| o + frames[f].1.len() as u64)
            .max()
            .unwrap_or(0);
        let blocks_n = size.div_ceil(UNIT);
        let addr = match self.allocate(1, blocks_n) {
            Ok(a) => a[0],
            Err(e) => {
                let mut g = self.lock()?;
                for (a, n, _) in &out.objects {
                    g.store.alloc.free(*a, *n as u64);
                }
                return Err(e);
            }
        };
        let mut buf = vec![0u8; (blocks_n * UNIT) as usize];
        let (mut refs, mut slot) = (0u32, 0u64);
        for &(f, off) in pack {
            let (group, z) = &mut frames[f];
            let mut e = Extent {
                addr,
                stored_len: z.len() as u32,
                csum: 0,
                flags: sealer.base | flags::COMPRESSED | flags::PACKED,
                aux: (off / 16) as u16,
            };
            sealer.seal(&mut e, z);
            buf[off as usize..off as usize + z.len()].copy_from_slice(z);
            let framed = group.len() > 1;
            for (k, &j) in group.iter().enumerate() {
                let n = &mut news[j];
                let mut ce = e;
                if framed {
                    ce.flags |= flags::FRAMED | ((k as u16) << flags::FRAME_SHIFT);
                }
                refs += n.refs;
                if let Some(fp) = n.fp {
                    out.index.push((fp, ce, slot));
                }
                slot += 1;
                n.ext = Some(ce);
            }
        }
        out.objects.push((addr, blocks_n as u32, refs));
        Ok((addr, buf))
    }
}

/// A chunk of one write to store: neither a hole nor a dedup hit, and the
/// first of its content in this write.
struct New {
    fp: Option<[u8; 32]>,
    bytes: Vec<u8>,
    /// Blocks of this write that map to it.
    refs: u32,
    ext: Option<Extent>,
}

/// The chunks of one write to store, and which of them each block maps to.
struct NewChunks {
    news: Vec<New>,
    which: Vec<Option<usize>>,
}

/// Takes the data of every block that is neither a hole nor a dedup hit;
/// blocks with the same fingerprint share one chunk.
fn new_chunks(
    blocks: &mut [(u64, Option<Vec<u8>>)],
    fps: &[Option<[u8; 32]>],
    hits: &[Option<Extent>],
) -> NewChunks {
    let mut news: Vec<New> = Vec::new();
    let mut first: HashMap<[u8; 32], usize> = HashMap::new();
    let mut which: Vec<Option<usize>> = vec![None; blocks.len()];
    for (i, (_, c)) in blocks.iter_mut().enumerate() {
        if hits[i].is_some() {
            continue;
        }
        let Some(data) = c.take() else { continue };
        if let Some(&j) = fps[i].as_ref().and_then(|f| first.get(f)) {
            news[j].refs += 1;
            which[i] = Some(j);
            continue;
        }
        if let Some(f) = fps[i] {
            first.insert(f, news.len());
        }
        which[i] = Some(news.len());
        news.push(New {
            fp: fps[i],
            bytes: data,
            refs: 1,
            ext: None,
        });
    }
    NewChunks { news, which }
}

/// New chunks split into those stored plain and compressed frames (the
/// chunks of each frame and its compressed bytes).
struct Framed {
    plain: Vec<usize>,
    frames: Vec<(Vec<usize>, Vec<u8>)>,
}

/// Compresses runs of new chunks as one frame each; a frame that does not
/// compress well enough leaves its chunks plain.
fn frame_chunks(policy: DataPolicy, bs: u32, news: &[New]) -> Framed {
    let per_frame = (FRAME_BYTES / bs as usize).clamp(1, MAX_FRAME_CHUNKS);
    let mut plain: Vec<usize> = Vec::new();
    let mut frames: Vec<(Vec<usize>, Vec<u8>)> = Vec::new();
    if policy.compression == 0 {
        plain.extend(0..news.len());
        return Framed { plain, frames };
    }
    let mut j = 0;
    while j < news.len() {
        let group: Vec<usize> = (j..news.len().min(j + per_frame)).collect();
        j += group.len();
        let packed = if group.len() == 1 {
            pipeline::compress(policy.compression, &news[group[0]].bytes)
        } else {
            let mut cat = Vec::with_capacity(group.len() * bs as usize);
            for &k in &group {
                cat.extend_from_slice(&news[k].bytes);
            }
            pipeline::compress(policy.compression, &cat)
        };
        match packed {
            Some(mut z) => {
                if policy.encryption.is_some() && z.len() < 16 {
                    z.resize(16, 0);
                }
                frames.push((group, z));
            }
            None => plain.extend(group),
        }
    }
    Framed { plain, frames }
}

/// Places frames into packs of up to [`MAX_PACK`] bytes and
/// [`MAX_PACK_CHUNKS`] chunks: per pack, (frame, byte offset in the pack),
/// offsets aligned to 16 bytes.
fn plan_packs(frames: &[(Vec<usize>, Vec<u8>)]) -> Vec<Vec<(usize, u64)>> {
    let mut packs: Vec<Vec<(usize, u64)>> = Vec::new();
    let (mut end, mut count) = (MAX_PACK, 0usize);
    for (f, (group, z)) in frames.iter().enumerate() {
        let len = z.len() as u64;
        if end + len > MAX_PACK || count + group.len() > MAX_PACK_CHUNKS {
            packs.push(Vec::new());
            (end, count) = (0, 0);
        }
        if let Some(p) = packs.last_mut() {
            p.push((f, end));
        }
        end = (end + len).div_ceil(16) * 16;
        count += group.len();
    }
    packs
}

/// Extent flags every chunk of a policy carries.
fn base_flags(policy: DataPolicy) -> u16 {
    let mut base = 0u16;
    if policy.dedup {
        base |= flags::DEDUP;
    }
    if let Some(c) = policy.encryption {
        base |= flags::ENCRYPTED | (c.id() << flags::CIPHER_SHIFT);
    }
    base
}

/// Encrypts stored bytes (with a tweak from where they land) and sets
/// their extent's checksum, which covers the bytes as stored.
struct Sealer<'a> {
    keys: Option<&'a Keys>,
    cipher: Option<Cipher>,
    base: u16,
}

impl Sealer<'_> {
    fn seal(&self, e: &mut Extent, bytes: &mut [u8]) {
        if let (Some(k), Some(c)) = (self.keys, self.cipher) {
            pipeline::encrypt(k, c, pipeline::tweak(e), bytes);
        }
        e.csum = crc(bytes);
    }
}

//! The write path of volumes with a data policy: dedup, compression into
//! frames and packs, encryption at rest.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::format::*;
use crate::pipeline::{self, DataPolicy, Keys};
use crate::store::internal;

use super::write::write_runs;
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
        mut blocks: Vec<(u64, Option<Vec<u8>>)>,
    ) -> Result<()> {
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
            self.locked_no_io(|g| {
                let mut found = Vec::with_capacity(fps.len());
                for fp in &fps {
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
                Ok(found)
            })?
        } else {
            vec![None; blocks.len()]
        };
        let taken: Vec<Extent> = hits.iter().flatten().copied().collect();
        let r = self.store_new_chunks(bs, policy, keys.as_deref(), &mut blocks, &fps, &hits);
        let (exts, objects, index, io) = match r {
            Ok(x) => x,
            Err(e) => {
                let mut g = self.lock()?;
                for t in &taken {
                    g.store.dec_extent(t)?;
                }
                return Err(e);
            }
        };
        self.map_blocks(vol, exts, objects, index, taken, io)
    }

    /// Compresses, packs, encrypts and writes the chunks of `blocks` that
    /// are neither holes nor dedup hits. Consecutive new chunks are
    /// compressed together as one zstd frame of up to [`FRAME_BYTES`]
    /// (each chunk's extent names the frame and its index in it); frames
    /// that save at least 1/8 go into packs, the others are stored plain.
    /// Returns the mapping of every block, the new objects, the index
    /// entries to add and the result of the device write (objects are
    /// allocated even if it failed).
    #[allow(clippy::type_complexity)]
    fn store_new_chunks(
        &self,
        bs: u32,
        policy: DataPolicy,
        keys: Option<&Keys>,
        blocks: &mut [(u64, Option<Vec<u8>>)],
        fps: &[Option<[u8; 32]>],
        hits: &[Option<Extent>],
    ) -> Result<(
        Vec<(u64, Option<Extent>)>,
        Vec<(u64, u32, u32)>,
        Vec<([u8; 32], Extent, u64)>,
        Result<()>,
    )> {
        struct New {
            fp: Option<[u8; 32]>,
            bytes: Vec<u8>,
            refs: u32,
            ext: Option<Extent>,
        }
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
        let mut base = 0u16;
        if policy.dedup {
            base |= flags::DEDUP;
        }
        if let Some(c) = policy.encryption {
            base |= flags::ENCRYPTED | (c.id() << flags::CIPHER_SHIFT);
        }
        // Frames: runs of new chunks compressed as one.
        let per_frame = (FRAME_BYTES / bs as usize).clamp(1, MAX_FRAME_CHUNKS);
        let mut plain: Vec<usize> = Vec::new();
        // (chunks, compressed bytes)
        let mut frames: Vec<(Vec<usize>, Vec<u8>)> = Vec::new();
        if policy.compression == 0 {
            plain.extend(0..news.len());
        } else {
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
        }
        // Packs of frames, up to 1 MiB and MAX_PACK_CHUNKS chunks each.
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
        let units = bs as u64 / UNIT;
        let plain_addrs = self.allocate(plain.len() as u64, units)?;
        let mut objects: Vec<(u64, u32, u32)> = Vec::new();
        let mut io: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut index = Vec::new();
        let seal = |e: &mut Extent, bytes: &mut [u8]| {
            if let (Some(k), Some(c)) = (keys, policy.encryption) {
                pipeline::encrypt(k, c, pipeline::tweak(e), bytes);
            }
            e.csum = crc(bytes);
        };
        for (&j, &addr) in plain.iter().zip(&plain_addrs) {
            let n = &mut news[j];
            let mut e = Extent {
                addr,
                stored_len: bs,
                csum: 0,
                flags: base,
                aux: 0,
            };
            seal(&mut e, &mut n.bytes);
            objects.push((addr, units as u32, n.refs));
            if let Some(f) = n.fp {
                index.push((f, e, 0));
            }
            n.ext = Some(e);
            io.push((addr, std::mem::take(&mut n.bytes)));
        }
        for pack in packs {
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
                    for (a, n, _) in &objects {
                        g.store.alloc.free(*a, *n as u64);
                    }
                    return Err(e);
                }
            };
            let mut buf = vec![0u8; (blocks_n * UNIT) as usize];
            let (mut refs, mut slot) = (0u32, 0u64);
            for &(f, off) in &pack {
                let (group, z) = &mut frames[f];
                let mut e = Extent {
                    addr,
                    stored_len: z.len() as u32,
                    csum: 0,
                    flags: base | flags::COMPRESSED | flags::PACKED,
                    aux: (off / 16) as u16,
                };
                seal(&mut e, z);
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
                        index.push((fp, ce, slot));
                    }
                    slot += 1;
                    n.ext = Some(ce);
                }
            }
            objects.push((addr, blocks_n as u32, refs));
            io.push((addr, buf));
        }
        let exts = blocks
            .iter()
            .enumerate()
            .map(|(i, (b, _))| (*b, hits[i].or_else(|| which[i].and_then(|j| news[j].ext))))
            .collect();
        let r = write_runs(&*self.dev, io);
        Ok((exts, objects, index, r))
    }
}

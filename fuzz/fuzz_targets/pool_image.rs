//! Opening and using a damaged pool image. A small valid pool (a volume with
//! data, snapshots, a clone with its own writes, deep trees from a small
//! fanout) is built once; each run flips bytes of it, opens it, and if it
//! opens, lists, reads every target, asks for block status and physical
//! maps, and runs fsck and scrub. Nothing may panic: damage must come back
//! as errors. The fixture's contents are known, so when the damage was not
//! resealed (below) and the pool opened at the fixture's generation, every
//! read that succeeds must return the fixture's bytes: no wrong data without
//! an error. (Resealed damage is consistent metadata pointing elsewhere — a
//! bug's output, not media damage — so only panics count there; an older
//! generation, reached when the newest superblock is damaged, holds other
//! contents by design.)
//!
//! Input layout:
//!   byte 0   mode
//!            bit 0: reseal metadata after the damage: recompute every tree
//!                   node's checksum and the pointers to it (parents,
//!                   catalog records, superblocks), and catalog blob
//!                   checksums, so the damage passes the checksum gates and
//!                   reaches the structural checks
//!            bit 1: also reseal data extents (their stored checksum)
//!            bit 2: after the read-only checks, mutate the pool (writes,
//!                   trim, zeroes, snapshot, clone, deletes, flush) and
//!                   fsck again
//!   then     5-byte records (u32 LE offset, u8 xor): the offset is taken
//!            modulo the bytes of the blocks the image uses (the superblock
//!            ring and every non-zero block), so damage lands on live
//!            structures rather than on free space.
#![no_main]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cdmfs::format::{
    crc, dec_ptr, enc_ptr, Extent, TreeKind, NODE_HDR, NODE_MAGIC, NODE_SIZE, PTR_SIZE, SB_BYTES,
    SB_MAGIC, SB_SLOTS, UNIT,
};
use cdmfs::MAX_RECORD;
use cdmfs::{BlockDev, FormatOptions, MemDev, OpenOptions, Pool, Target};
use libfuzzer_sys::fuzz_target;

const POOL_BYTES: usize = 4 << 20;
/// Bytes read per target at most (a damaged size can be huge): the start,
/// and a window at the end.
const READ_CAP: u64 = 1 << 20;
const CHUNK: usize = 64 << 10;

struct Fixture {
    image: Vec<u8>,
    /// Blocks worth damaging: the superblock ring and every non-zero block.
    used: Vec<u64>,
    /// The commit generation of the fixture.
    generation: u64,
    /// Every volume's and snapshot's bytes.
    known: HashMap<Target, Vec<u8>>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dev = Arc::new(MemDev::new(POOL_BYTES));
        // A small fanout gives multi-level trees in a small image.
        Pool::format(&*dev, &FormatOptions { max_fanout: 4 }).expect("format");
        let pool =
            Pool::open(dev.clone() as Arc<dyn BlockDev>, &OpenOptions::default()).expect("open");
        let v = pool.create_volume("v", 128 << 10, 4096).expect("create v");
        for i in 0..24u64 {
            let off = (i * 7 % 32) * 4096;
            pool.write(v.id, off, &vec![i as u8 + 1; 4096 + (i as usize % 3) * 100])
                .expect("write v");
        }
        let s1 = pool
            .create_snapshot("v", "first", serde_json::json!({"app": "fuzz", "n": 1}))
            .expect("snapshot 1");
        let c = pool.clone_snapshot(s1.id, "c").expect("clone");
        pool.write(c.id, 4096 * 3, &[0xcc; 8192]).expect("write c");
        pool.write(v.id, 4096 * 5, &[0xdd; 4096])
            .expect("write v again");
        pool.trim(v.id, 4096 * 14, 4096 * 2).expect("trim v");
        pool.write_zeroes(v.id, 4096 * 21, 4096).expect("zero v");
        pool.create_snapshot("c", "second", serde_json::Value::Null)
            .expect("snapshot 2");
        let w = pool.create_volume("w", 64 << 10, 16384).expect("create w");
        pool.write(w.id, 100, b"a volume with a larger block size")
            .expect("write w");
        pool.close().expect("close");

        let image = dev.image();
        let used = (0..(POOL_BYTES as u64 / UNIT))
            .filter(|&b| b < SB_SLOTS || block(&image, b).iter().any(|&x| x != 0))
            .collect();
        let (generation, known) = contents(&image);
        Fixture {
            image,
            used,
            generation,
            known,
        }
    })
}

/// The generation and the bytes of every target of a sound image.
fn contents(image: &[u8]) -> (u64, HashMap<Target, Vec<u8>>) {
    let dev = Arc::new(MemDev::from_image(image.to_vec()));
    let pool = Pool::open(dev as Arc<dyn BlockDev>, &OpenOptions::default()).expect("reopen");
    let mut targets: Vec<Target> = Vec::new();
    targets.extend(
        pool.list_volumes()
            .expect("volumes")
            .iter()
            .map(|v| Target::Volume(v.id)),
    );
    targets.extend(
        pool.list_snapshots(None)
            .expect("snapshots")
            .iter()
            .map(|s| Target::Snapshot(s.id)),
    );
    let mut known = HashMap::new();
    for t in targets {
        let (size, _) = pool.geometry(t).expect("geometry");
        let mut b = vec![0u8; size as usize];
        pool.read(t, 0, &mut b).expect("read fixture");
        known.insert(t, b);
    }
    (pool.space().expect("space").generation, known)
}

thread_local! {
    /// The previous run's device buffer, reused: allocating and faulting in
    /// a fresh buffer per run costs more than many runs' work.
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A copy of `image` in a recycled buffer.
fn fresh_image(image: &[u8]) -> Vec<u8> {
    let mut v = SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if v.len() == image.len() {
        v.copy_from_slice(image);
        v
    } else {
        image.to_vec()
    }
}

fn recycle(dev: &MemDev) {
    let v = dev.with_bytes(std::mem::take);
    SPARE.with(|s| *s.borrow_mut() = v);
}

fn block(img: &[u8], b: u64) -> &[u8] {
    &img[(b * UNIT) as usize..][..UNIT as usize]
}

fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn wr_u32(b: &mut [u8], o: usize, v: u32) -> bool {
    let old = rd_u32(b, o);
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    old != v
}

/// Byte range of a blob or extent inside the image, if it lies inside.
fn span(img: &[u8], addr: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let start = addr.checked_mul(UNIT)?;
    let end = start.checked_add(len)?;
    (end <= img.len() as u64).then_some(start as usize..end as usize)
}

/// Entries of a node block that claims `n` entries of `stride` bytes, clamped
/// to what fits: (value offset of entry i) for each i.
fn entries(b: &[u8], stride: usize) -> impl Iterator<Item = usize> {
    let n = rd_u16(b, 26) as usize;
    let fit = (NODE_SIZE - NODE_HDR) / (8 + stride);
    let n = n.min(fit);
    (0..n).map(move |i| NODE_HDR + n * 8 + i * stride)
}

/// Makes every checksum in the image agree with the (damaged) bytes it
/// covers, bottom-up, so structural damage is what the engine sees.
fn reseal(img: &mut [u8], used: &[u64], extents: bool) {
    let node_blocks: Vec<u64> = used
        .iter()
        .copied()
        .filter(|&b| b >= SB_SLOTS && rd_u32(block(img, b), 0) == NODE_MAGIC)
        .collect();
    let mut csums: HashMap<u64, u32> = HashMap::new();
    for _pass in 0..24 {
        let mut changed = false;
        // Node checksums as they stand.
        csums.clear();
        for &b in &node_blocks {
            let o = (b * UNIT) as usize;
            let c = crc(&img[o + 8..o + NODE_SIZE]);
            changed |= wr_u32(img, o + 4, c);
            csums.insert(b, c);
        }
        // Pointers held by nodes: children, catalog blobs, extents.
        for &b in &node_blocks {
            let o = (b * UNIT) as usize;
            let (kind, level) = (img[o + 24], img[o + 25]);
            let Some(kind) = TreeKind::from_u8(kind) else {
                continue;
            };
            if level > 0 {
                let offs: Vec<usize> = entries(&img[o..o + NODE_SIZE], PTR_SIZE).collect();
                for v in offs {
                    let p = dec_ptr(&img[o + v..o + v + PTR_SIZE]);
                    if let Some(&c) = csums.get(&p.addr) {
                        changed |= wr_u32(img, o + v + 8, c);
                    }
                }
            } else if kind == TreeKind::Catalog {
                let offs: Vec<usize> = entries(&img[o..o + NODE_SIZE], PTR_SIZE).collect();
                for v in offs {
                    let mut p = dec_ptr(&img[o + v..o + v + PTR_SIZE]);
                    let Some(first) = span(img, p.addr, 4) else {
                        continue;
                    };
                    let len = rd_u32(img, first.start) as u64;
                    if len > MAX_RECORD as u64 {
                        continue;
                    }
                    let Some(r) = span(img, p.addr, 4 + len) else {
                        continue;
                    };
                    changed |= fix_record(img, r.clone(), &csums);
                    let c = crc(&img[r]);
                    if p.csum != c {
                        p.csum = c;
                        img[o + v..o + v + PTR_SIZE].copy_from_slice(&enc_ptr(p));
                        changed = true;
                    }
                }
            } else if kind == TreeKind::Volume && extents {
                let offs: Vec<usize> = entries(&img[o..o + NODE_SIZE], Extent::SIZE).collect();
                for v in offs {
                    let e = Extent::decode(&img[o + v..o + v + Extent::SIZE]);
                    if let Some(r) = span(img, e.addr, e.stored_len as u64) {
                        let c = crc(&img[r]);
                        changed |= wr_u32(img, o + v + 12, c);
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    // Superblock slots: root pointers and their own checksum.
    for slot in 0..SB_SLOTS as usize {
        let o = slot * UNIT as usize;
        if &img[o..o + 8] != SB_MAGIC {
            continue;
        }
        for at in [64, 80] {
            if let Some(&c) = csums.get(&rd_u64(img, o + at)) {
                wr_u32(img, o + at + 8, c);
            }
        }
        let c = crc(&img[o..o + SB_BYTES - 4]);
        wr_u32(img, o + SB_BYTES - 4, c);
    }
}

/// Points a catalog record's `root_csum` at its (resealed) root node, if the
/// record still parses; rewrites it in place when it still fits.
fn fix_record(img: &mut [u8], r: std::ops::Range<usize>, csums: &HashMap<u64, u32>) -> bool {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&img[r.start + 4..r.end]) else {
        return false;
    };
    let Some(root) = v.get("root").and_then(|x| x.as_u64()) else {
        return false;
    };
    let Some(&c) = csums.get(&root) else {
        return false;
    };
    if v.get("root_csum").and_then(|x| x.as_u64()) == Some(c as u64) {
        return false;
    }
    v["root_csum"] = c.into();
    let Ok(bytes) = serde_json::to_vec(&v) else {
        return false;
    };
    let room = (r.end - r.start - 4).div_ceil(UNIT as usize) * UNIT as usize;
    if bytes.len() > room.max(UNIT as usize - 4) || r.start + 4 + bytes.len() > img.len() {
        return false;
    }
    wr_u32(img, r.start, bytes.len() as u32);
    img[r.start + 4..r.start + 4 + bytes.len()].copy_from_slice(&bytes);
    true
}

/// Reads (up to a cap) a target, asks for its block status and physical
/// map. With `known` bytes, a read that succeeds must return them.
fn exercise_target(pool: &Pool, t: Target, known: Option<&[u8]>) {
    let Ok((size, _bs)) = pool.geometry(t) else {
        return;
    };
    if let Some(k) = known {
        assert_eq!(size, k.len() as u64, "{t:?}: wrong size without an error");
    }
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size.min(READ_CAP) {
        let n = (size - off).min(CHUNK as u64) as usize;
        let ok = pool.read(t, off, &mut buf[..n]).is_ok();
        if let (true, Some(k)) = (ok, known) {
            let at = off as usize;
            assert!(
                buf[..n] == k[at..at + n],
                "{t:?}: wrong data without an error at {off}"
            );
        }
        off += n as u64;
    }
    if size > READ_CAP {
        let n = CHUNK.min(size as usize);
        let _ = pool.read(t, size - n as u64, &mut buf[..n]);
    }
    let _ = pool.read(t, size, &mut buf[..1]);
    let _ = pool.block_status(t, 0, size.min(8 << 30));
    let _ = pool.physical_map(t);
}

fn mutate(pool: &Pool) {
    let Ok(vols) = pool.list_volumes() else {
        return;
    };
    for v in &vols {
        let blk = vec![0xa5u8; 4096];
        let _ = pool.write(v.id, 0, &blk);
        if v.size > 8192 {
            let _ = pool.write(v.id, (v.size / 2) & !4095, &blk);
            let _ = pool.write(v.id, v.size - 100, &blk[..100]);
        }
        let _ = pool.trim(v.id, 4096, v.size.min(1 << 20).saturating_sub(4096));
        let _ = pool.write_zeroes(v.id, 0, v.size.min(8192));
        let _ = pool.write_zeroes_allocated(v.id, 0, v.size.min(4096));
        if let Ok(s) = pool.create_snapshot(&v.name, "fuzz", serde_json::Value::Null) {
            let _ = pool.clone_snapshot(s.id, &format!("{}-fz", v.name));
            let _ = pool.delete_snapshot(s.id);
        }
    }
    if let Ok(snaps) = pool.list_snapshots(None) {
        if let Some(s) = snaps.first() {
            let _ = pool.delete_snapshot(s.id);
        }
    }
    if let Some(v) = vols.last() {
        let _ = pool.delete_volume(&v.name, true);
    }
    let _ = pool.grow_volume("v", 1 << 20);
    let _ = pool.flush();
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mode = data.first().copied().unwrap_or(0);
    let mut img = fresh_image(&f.image);
    let span_bytes = f.used.len() as u64 * UNIT;
    for rec in data.get(1..).unwrap_or(&[]).chunks_exact(5) {
        let off = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as u64 % span_bytes;
        let b = f.used[(off / UNIT) as usize];
        img[(b * UNIT + off % UNIT) as usize] ^= rec[4];
    }
    if mode & 1 != 0 {
        reseal(&mut img, &f.used, mode & 2 != 0);
    }

    let dev = Arc::new(MemDev::from_image(img));
    if let Ok(pool) = Pool::open(dev.clone() as Arc<dyn BlockDev>, &OpenOptions::default()) {
        let sound = mode & 1 == 0 && pool.space().is_ok_and(|s| s.generation == f.generation);
        use_pool(&pool, mode, sound.then_some(&f.known));
    }
    recycle(&dev);
});

/// Uses the pool; `known` (when the damage leaves checksums to catch it)
/// holds what each target must read as.
fn use_pool(pool: &Pool, mode: u8, known: Option<&HashMap<Target, Vec<u8>>>) {
    let _ = pool.space();
    let _ = pool.uuid();
    // Checksummed catalog records cannot change without an error.
    let want = |t: Target| {
        known.map(|k| {
            k.get(&t)
                .unwrap_or_else(|| panic!("{t:?} appeared without an error"))
                .as_slice()
        })
    };
    if let Ok(vols) = pool.list_volumes() {
        for v in vols {
            let _ = pool.volume(&v.name);
            let _ = pool.resolve(&v.name);
            exercise_target(pool, Target::Volume(v.id), want(Target::Volume(v.id)));
        }
    }
    if let Ok(snaps) = pool.list_snapshots(None) {
        for s in snaps {
            let _ = pool.snapshot(s.id);
            let _ = pool.resolve(&format!("{}@{}", s.volume, s.id));
            exercise_target(pool, Target::Snapshot(s.id), want(Target::Snapshot(s.id)));
        }
    }
    let _ = pool.fsck();
    let _ = pool.scrub();
    if mode & 4 != 0 {
        mutate(pool);
        let _ = pool.fsck();
    }
    let _ = pool.flush();
}

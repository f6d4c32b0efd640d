//! Damaged pools: flipped bits in nodes, data extents and superblocks are
//! detected and named; nothing panics; a torn newest superblock falls back
//! to the previous commit.

use std::sync::Arc;

use cdmfs::format::{SB_SLOTS, UNIT};
use cdmfs::{BlockDev, Error, FormatOptions, MemDev, OpenOptions, Pool, Target};

fn build() -> (Arc<MemDev>, u64, u64) {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: 8 }).unwrap();
    let pool = Pool::open(dev.clone(), &OpenOptions::default()).unwrap();
    let v = pool.create_volume("vol", 8 << 20, 4096).unwrap();
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i / 4096) as u8 ^ 0x5a).collect();
    pool.write(v.id, 0, &data).unwrap();
    let s = pool
        .create_snapshot("vol", "base", serde_json::json!({"lsn": "0/1"}))
        .unwrap();
    pool.write(v.id, 0, &[0xee; 4096 * 3]).unwrap();
    pool.close().unwrap();
    (dev, v.id, s.id)
}

fn open(dev: &Arc<MemDev>) -> cdmfs::Result<Pool> {
    Pool::open(dev.clone() as Arc<dyn BlockDev>, &OpenOptions::default())
}

#[test]
fn flipped_bit_in_data_extent_is_named() {
    let (dev, vid, sid) = build();
    let pool = open(&dev).unwrap();
    let map = pool.physical_map(Target::Snapshot(sid)).unwrap();
    // Damage the extent holding snapshot offset 5*4096 (shared with the volume).
    let (loff, poff, _) = map.extents[5];
    assert_eq!(loff, 5 * 4096);
    drop(pool);
    dev.with_bytes(|b| b[poff as usize + 100] ^= 0x04);
    let pool = open(&dev).unwrap();
    let mut buf = vec![0u8; 4096];
    for t in [Target::Volume(vid), Target::Snapshot(sid)] {
        match pool.read(t, 5 * 4096, &mut buf) {
            Err(Error::DataChecksum { offset, block, .. }) => {
                assert_eq!(offset, 5 * 4096);
                assert_eq!(block * UNIT, poff);
            }
            other => panic!("expected a data checksum error, got {other:?}"),
        }
    }
    // Neighbours still read.
    pool.read(Target::Snapshot(sid), 6 * 4096, &mut buf)
        .unwrap();
    assert_eq!(buf[0], 6 ^ 0x5a);
    let rep = pool.scrub().unwrap();
    let bad: Vec<(String, u64)> = rep
        .errors
        .iter()
        .map(|e| (e.target.clone(), e.offset))
        .collect();
    assert!(
        bad.contains(&("volume vol".to_string(), 5 * 4096)),
        "{bad:?}"
    );
    assert!(
        bad.contains(&(format!("snapshot vol@{sid}"), 5 * 4096)),
        "{bad:?}"
    );
    assert_eq!(rep.errors.len(), 2);
}

#[test]
fn flipped_bit_in_node_is_named() {
    let (dev, vid, sid) = build();
    let pool = open(&dev).unwrap();
    let snap_nodes = pool.physical_map(Target::Snapshot(sid)).unwrap().nodes;
    let vol_nodes = pool.physical_map(Target::Volume(vid)).unwrap().nodes;
    // A node only the snapshot reaches (the volume rewrote blocks 0..3).
    let victim = *snap_nodes.iter().find(|n| !vol_nodes.contains(n)).unwrap();
    drop(pool);
    dev.with_bytes(|b| b[victim as usize + 200] ^= 0x80);
    let pool = open(&dev).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    match pool.read(Target::Snapshot(sid), 0, &mut buf) {
        Err(Error::MetadataChecksum { block, .. }) => assert_eq!(block * UNIT, victim),
        other => panic!("expected a metadata checksum error, got {other:?}"),
    }
    // The volume is unaffected.
    pool.read(Target::Volume(vid), 0, &mut buf).unwrap();
    let rep = pool.fsck().unwrap();
    assert!(!rep.is_clean());
    assert!(
        rep.errors
            .iter()
            .any(|e| e.contains(&format!("block {}", victim / UNIT))),
        "{:?}",
        rep.errors
    );
    let scrub = pool.scrub().unwrap();
    assert!(scrub
        .errors
        .iter()
        .any(|e| e.pool_block * UNIT == victim && e.target.starts_with("snapshot")));
}

#[test]
fn torn_newest_superblock_falls_back_to_previous_commit() {
    let (dev, vid, _) = build();
    let pool = open(&dev).unwrap();
    let gen = pool.space().unwrap().generation;
    pool.write(vid, 0, &[0x11; 4096]).unwrap();
    pool.close().unwrap();
    // Tear the newest superblock.
    let slot = (gen + 1) % SB_SLOTS;
    dev.with_bytes(|b| b[(slot * UNIT) as usize + 40] ^= 0xff);
    let pool = open(&dev).unwrap();
    assert_eq!(pool.space().unwrap().generation, gen);
    let mut buf = vec![0u8; 4096];
    pool.read(Target::Volume(vid), 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0xee; 4096]);
    assert!(pool.fsck().unwrap().is_clean());
}

#[test]
fn bad_magic_newer_version_truncation() {
    let (dev, _, _) = build();
    let img = dev.image();
    // Wrong magic everywhere: not a pool.
    let mut m = img.clone();
    for s in 0..SB_SLOTS as usize {
        m[s * UNIT as usize] = b'X';
    }
    assert!(matches!(
        open(&Arc::new(MemDev::from_image(m))),
        Err(Error::BadMagic)
    ));
    // Zeros: not a pool.
    assert!(matches!(
        open(&Arc::new(MemDev::new(8 << 20))),
        Err(Error::BadMagic)
    ));
    // A newer format version.
    let mut v = img.clone();
    for s in 0..SB_SLOTS as usize {
        let o = s * UNIT as usize;
        if v[o] == b'C' {
            v[o + 8] = 9;
            let c = crc32c::crc32c(&v[o..o + 508]);
            v[o + 508..o + 512].copy_from_slice(&c.to_le_bytes());
        }
    }
    assert!(matches!(
        open(&Arc::new(MemDev::from_image(v))),
        Err(Error::UnsupportedVersion { found: 9, .. })
    ));
    // Truncated file.
    let t = img[..img.len() / 2].to_vec();
    assert!(matches!(
        open(&Arc::new(MemDev::from_image(t))),
        Err(Error::Truncated { .. })
    ));
    // Every superblock torn.
    let mut all = img.clone();
    for s in 0..SB_SLOTS as usize {
        all[s * UNIT as usize + 33] ^= 1;
    }
    assert!(matches!(
        open(&Arc::new(MemDev::from_image(all))),
        Err(Error::Corrupt(_))
    ));
}

/// Random damage anywhere in the used part of the pool: every outcome is an
/// error or correct data, never a panic and never wrong bytes; damage to a
/// live node or data extent is reported by reads and by fsck or scrub; enough
/// of the damage lands on live blocks for this to mean something.
#[test]
fn random_damage_never_panics_or_lies() {
    let (dev, vid, sid) = build();
    let clean = dev.image();
    let want_snap: Vec<u8> = (0..8 << 20).map(|i: u32| (i / 4096) as u8 ^ 0x5a).collect();
    let mut want_vol = want_snap.clone();
    want_vol[..4096 * 3].fill(0xee);
    // Byte ranges of every live node and data extent.
    let (used_end, live, nodes) = {
        let pool = open(&dev).unwrap();
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut nodes = Vec::new();
        for t in [Target::Volume(vid), Target::Snapshot(sid)] {
            let m = pool.physical_map(t).unwrap();
            nodes.extend(m.nodes.iter().copied());
            live.extend(m.extents.iter().map(|e| (e.1, e.1 + e.2 as u64)));
        }
        live.extend(nodes.iter().map(|&n| (n, n + UNIT)));
        let end = live.iter().map(|r| r.1).max().unwrap();
        (end, live, nodes)
    };
    let is_live = |pos: u64| live.iter().any(|&(a, b)| a <= pos && pos < b);
    let (mut unopenable, mut live_hits, mut elsewhere) = (0, 0, 0);
    let mut x = 0x1234_5678_9abc_def1u64;
    for round in 0..150 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut img = clean.clone();
        let mut hit_live = false;
        for k in 0..4 {
            // Data fills most of the pool: every other round aims its first
            // flip at a tree node so metadata damage is covered too.
            let pos = if round % 2 == 1 && k == 0 {
                nodes[(x % nodes.len() as u64) as usize] + (x >> 20) % UNIT
            } else {
                x.rotate_left(k * 16) % used_end
            };
            hit_live |= is_live(pos);
            img[pos as usize] ^= 1 << (x % 8);
        }
        let dev = Arc::new(MemDev::from_image(img));
        let Ok(pool) = open(&dev) else {
            unopenable += 1;
            continue;
        };
        let mut buf = vec![0u8; 8 << 20];
        let vol_ok = pool.read(Target::Volume(vid), 0, &mut buf).is_ok();
        if vol_ok {
            assert!(
                buf == want_vol,
                "round {round}: volume read returned wrong data without an error"
            );
        }
        let snap_ok = pool.read(Target::Snapshot(sid), 0, &mut buf).is_ok();
        if snap_ok {
            assert!(
                buf == want_snap,
                "round {round}: snapshot read returned wrong data without an error"
            );
        }
        // An Err from fsck or scrub is a report of the damage too.
        let fsck_saw = pool.fsck().map_or(true, |r| !r.is_clean());
        let scrub_saw = pool.scrub().map_or(true, |r| !r.errors.is_empty());
        let _ = pool.list_volumes();
        if hit_live {
            live_hits += 1;
            assert!(
                !(vol_ok && snap_ok),
                "round {round}: damage to a live block read back without an error"
            );
            assert!(
                fsck_saw || scrub_saw,
                "round {round}: damage to a live block that neither fsck nor scrub reports"
            );
        } else {
            elsewhere += 1;
        }
    }
    eprintln!(
        "random damage: {live_hits} on live blocks, {elsewhere} elsewhere, {unopenable} unopenable"
    );
    assert!(
        live_hits >= 75,
        "too little damage on live blocks: {live_hits}"
    );
}

#[test]
fn out_of_range_and_bad_arguments() {
    let dev = Arc::new(MemDev::new(16 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(&dev).unwrap();
    let v = pool.create_volume("a", 1 << 20, 65536).unwrap();
    let mut buf = vec![0u8; 10];
    assert!(matches!(
        pool.read(Target::Volume(v.id), (1 << 20) - 5, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        pool.write(v.id, u64::MAX - 2, &buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        pool.write_zeroes(v.id, 1 << 20, 1),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        pool.create_volume("a", 1 << 20, 65536),
        Err(Error::Exists(_))
    ));
    assert!(matches!(
        pool.create_volume("b", 1 << 20, 3000),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        pool.create_volume("b", 1 << 20, 2 << 20),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        pool.create_volume("../x", 1 << 20, 4096),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        pool.create_volume("a@1", 1 << 20, 4096),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        pool.create_volume("z", 0, 4096),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(pool.grow_volume("a", 10), Err(Error::Invalid(_))));
    assert!(matches!(pool.delete_snapshot(999), Err(Error::NotFound(_))));
    assert!(matches!(pool.resolve("a@999"), Err(Error::NotFound(_))));
    assert!(matches!(pool.resolve("a@xyz"), Err(Error::NotFound(_))));
    pool.create_snapshot("a", "x", serde_json::Value::Null)
        .unwrap();
    assert!(matches!(
        pool.delete_volume("a", false),
        Err(Error::Busy(_))
    ));
    // The pool fills up: a clear error, and what was written stays.
    let big = pool.create_volume("big", 64 << 20, 65536).unwrap();
    let chunk = vec![0x42u8; 1 << 20];
    let mut wrote = 0u64;
    let err = loop {
        match pool.write(big.id, wrote, &chunk) {
            Ok(()) => wrote += 1 << 20,
            Err(e) => break e,
        }
        assert!(wrote < 64 << 20, "a 16 MiB pool took 64 MiB");
    };
    assert!(matches!(err, Error::NoSpace), "{err:?}");
    let mut b = vec![0u8; 1 << 20];
    pool.read(Target::Volume(big.id), 0, &mut b).unwrap();
    assert_eq!(b, chunk);
    // Freeing space makes room again.
    pool.delete_volume("big", false).unwrap();
    pool.flush().unwrap();
    let again = pool.create_volume("again", 4 << 20, 65536).unwrap();
    pool.write(again.id, 0, &chunk).unwrap();
    assert!(pool.fsck().unwrap().is_clean());
}

/// Scrub commits before it reads, so it checks what is on the device and
/// what it checked is durable: writes not yet flushed survive a crash right
/// after a scrub, and the scrub covered them.
#[test]
fn scrub_commits_what_it_checks() {
    let dev = Arc::new(MemDev::new(32 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(&dev).unwrap();
    let v = pool.create_volume("v", 4 << 20, 4096).unwrap();
    pool.flush().unwrap();
    let gen = pool.space().unwrap().generation;
    pool.write(v.id, 0, &[0x3c; 1 << 20]).unwrap();
    let rep = pool.scrub().unwrap();
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    assert_eq!(rep.bytes_checked, 1 << 20, "{rep:?}");
    assert!(
        pool.space().unwrap().generation > gen,
        "scrub did not commit"
    );
    // A crash: the pool is dropped without a flush.
    drop(pool);
    let pool = open(&dev).unwrap();
    let mut b = vec![0u8; 1 << 20];
    pool.read(Target::Volume(v.id), 0, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0x3c),
        "the scrubbed writes were lost"
    );
}

/// Every tree node records the commit generation that wrote it (what a
/// damage investigation dates blocks by), in every commit of a session, not
/// only the first after open.
#[test]
fn nodes_carry_the_generation_that_wrote_them() {
    let dev = Arc::new(MemDev::new(32 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: 4 }).unwrap();
    let pool = open(&dev).unwrap();
    let v = pool.create_volume("v", 4 << 20, 4096).unwrap();
    for round in 0..3u8 {
        pool.write(v.id, 0, &[round + 1; 64 << 10]).unwrap();
        pool.commit().unwrap();
        let gen = pool.space().unwrap().generation;
        let nodes = pool.physical_map(Target::Volume(v.id)).unwrap().nodes;
        assert!(!nodes.is_empty());
        // The root was rewritten by this commit.
        let root = nodes[0];
        let mut hdr = [0u8; 24];
        dev.read_at(&mut hdr, root).unwrap();
        let written = u64::from_le_bytes(hdr[16..24].try_into().unwrap());
        assert_eq!(written, gen, "round {round}: root node's generation");
    }
}

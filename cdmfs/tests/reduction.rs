//! Data reduction and encryption end to end on the engine: dedup across
//! volumes, snapshots and clones with exact space return, compression,
//! encryption (no plaintext in the pool file, key checked at open), the
//! space report.

use std::sync::Arc;

use cdmfs::{
    BlockDev, Cipher, DataPolicy, Error, FileDev, FormatOptions, KeySource, MemDev, OpenOptions,
    Pool, Target,
};
use rand::{Rng, SeedableRng};

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    r.fill(&mut v[..]);
    v
}

/// Text-like data: compressible, repeating every 64 KiB.
fn text(n: usize) -> Vec<u8> {
    let words = [
        "pool ",
        "volume ",
        "snapshot ",
        "clone ",
        "extent ",
        "dedup ",
        "zstd ",
        "xts ",
    ];
    let mut out = Vec::with_capacity(n);
    let mut i = 0usize;
    while out.len() < n {
        out.extend_from_slice(words[(i * 7 + i / 13) % words.len()].as_bytes());
        out.extend_from_slice(format!("{} ", i % 8191).as_bytes());
        i += 1;
    }
    out.truncate(n);
    out
}

fn key() -> Option<KeySource> {
    Some(KeySource::Key(vec![0x5a; 32]))
}

fn open(dev: &Arc<MemDev>, key: Option<KeySource>) -> cdmfs::Result<Pool> {
    Pool::open(
        dev.clone(),
        &OpenOptions {
            key,
            ..OpenOptions::default()
        },
    )
}

fn fresh(size: usize) -> Arc<MemDev> {
    let dev = Arc::new(MemDev::new(size));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    dev
}

fn used(p: &Pool) -> u64 {
    let s = p.space().unwrap();
    s.used_bytes - s.freeing_bytes
}

fn read_all(p: &Pool, t: Target, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    p.read(t, 0, &mut b).unwrap();
    b
}

#[test]
fn identical_data_in_two_volumes_is_stored_once_and_space_returns_exactly() {
    let dev = fresh(256 << 20);
    let pool = open(&dev, None).unwrap();
    let pol = DataPolicy {
        dedup: true,
        ..DataPolicy::default()
    };
    let data = noise(16 << 20, 1);
    let a = pool.create_volume_with("a", 32 << 20, 65536, pol).unwrap();
    let b = pool.create_volume_with("b", 32 << 20, 4096, pol).unwrap();
    let c = pool.create_volume_with("c", 32 << 20, 65536, pol).unwrap();
    pool.flush().unwrap();
    let base = used(&pool);
    pool.write(a.id, 0, &data).unwrap();
    pool.flush().unwrap();
    let one = used(&pool) - base;
    assert!(
        (16 << 20..(16 << 20) + (2 << 20)).contains(&one),
        "first copy took {one}"
    );
    // Same block size, any aligned offset: stored once.
    pool.write(c.id, 1 << 20, &data).unwrap();
    pool.flush().unwrap();
    let two = used(&pool) - base;
    assert!(two - one < 1 << 20, "second copy added {} bytes", two - one);
    // A different block size makes different chunks: stored again.
    pool.write(b.id, 0, &data).unwrap();
    pool.flush().unwrap();
    assert!(used(&pool) - base - two >= 16 << 20);
    // Snapshot, clone, overwrite the origin: all still read right.
    let s = pool
        .create_snapshot("a", "s", serde_json::json!({}))
        .unwrap();
    let cl = pool.clone_snapshot(s.id, "a-clone").unwrap();
    pool.write(a.id, 0, &noise(4 << 20, 2)).unwrap();
    pool.write(cl.id, 8 << 20, &data[..1 << 20]).unwrap();
    pool.flush().unwrap();
    assert_eq!(read_all(&pool, Target::Snapshot(s.id), 16 << 20), data);
    assert_eq!(
        read_all(&pool, Target::Volume(c.id), 32 << 20)[1 << 20..17 << 20],
        data[..]
    );
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:#?}", rep.errors);
    assert!(rep.dedup_entries > 0);
    // Reopen: the index is on disk and keeps deduplicating.
    drop(pool);
    let pool = open(&dev, None).unwrap();
    let before = used(&pool);
    let d = pool.create_volume_with("d", 32 << 20, 65536, pol).unwrap();
    pool.write(d.id, 0, &data).unwrap();
    pool.flush().unwrap();
    assert!(used(&pool) - before < 1 << 20);
    // Delete everything: every block comes back, the index empties.
    for v in ["a", "b", "c", "d", "a-clone"] {
        pool.delete_volume(v, true).unwrap();
    }
    for _ in 0..4 {
        pool.flush().unwrap();
    }
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:#?}", rep.errors);
    assert_eq!(rep.dedup_entries, 0);
    assert!(
        used(&pool) <= base,
        "{} bytes not returned",
        used(&pool) - base
    );
}

#[test]
fn compression_levels_and_packing() {
    let dev = fresh(256 << 20);
    let pool = open(&dev, None).unwrap();
    let data = text(8 << 20);
    let mut sizes = Vec::new();
    for (i, level) in [1u8, 8, 29].into_iter().enumerate() {
        let name = format!("z{level}");
        let v = pool
            .create_volume_with(
                &name,
                8 << 20,
                65536,
                DataPolicy {
                    compression: level,
                    ..DataPolicy::default()
                },
            )
            .unwrap();
        pool.flush().unwrap();
        let before = used(&pool);
        pool.write(v.id, 0, &data).unwrap();
        pool.flush().unwrap();
        let _ = before;
        assert_eq!(
            read_all(&pool, Target::Volume(v.id), 8 << 20),
            data,
            "level {level}"
        );
        let r = pool.reduction().unwrap();
        let vr = &r.volumes[i];
        assert_eq!(vr.bytes.logical_bytes, 8 << 20);
        sizes.push(vr.bytes.after_compression_bytes);
        let limit = if level == 1 {
            (8 << 20) * 4 / 5
        } else {
            (8 << 20) / 3
        };
        assert!(vr.bytes.after_compression_bytes < limit, "{vr:?}");
    }
    assert!(sizes[2] <= sizes[1] && sizes[1] <= sizes[0], "{sizes:?}");
    // 4 KiB blocks of text: compressed chunks are packed, so they save
    // space even though each is smaller than one allocation unit.
    let v = pool
        .create_volume_with(
            "small",
            8 << 20,
            4096,
            DataPolicy {
                compression: 8,
                dedup: true,
                ..DataPolicy::default()
            },
        )
        .unwrap();
    pool.flush().unwrap();
    let before = used(&pool);
    pool.write(v.id, 0, &data).unwrap();
    pool.flush().unwrap();
    assert!(
        used(&pool) - before < (8 << 20) / 2,
        "4 KiB chunks took {}",
        used(&pool) - before
    );
    assert_eq!(read_all(&pool, Target::Volume(v.id), 8 << 20), data);
    // Consecutive 4 KiB chunks are compressed together (32 per 128 KiB
    // frame): extents share their stored bytes.
    let map = pool.physical_map(Target::Volume(v.id)).unwrap();
    let mut offs: Vec<u64> = map.extents.iter().map(|e| e.1).collect();
    offs.dedup();
    assert_eq!(map.extents.len(), 2048);
    assert!(
        offs.len() <= 2048 / 16,
        "{} frames for 2048 chunks",
        offs.len()
    );
    // A frame compresses better than its chunks one by one would.
    let one_by_one: usize = data
        .chunks(4096)
        .map(|c| cdmfs::pipeline::compress(8, c).map_or(4096, |z| z.len()))
        .sum();
    let r = pool.reduction().unwrap();
    let small = r.volumes.iter().find(|v| v.name == "small").unwrap();
    assert!(
        small.bytes.after_compression_bytes * 5 < one_by_one as u64 * 4,
        "{:?} vs {one_by_one} one by one",
        small.bytes
    );
    // Partial overwrites inside compressed blocks.
    let patch = noise(10_000, 3);
    pool.write(v.id, 12_345, &patch).unwrap();
    let mut want = data.clone();
    want[12_345..22_345].copy_from_slice(&patch);
    assert_eq!(read_all(&pool, Target::Volume(v.id), 8 << 20), want);
    // Incompressible data is stored as is.
    let n = pool
        .create_volume_with(
            "noise",
            4 << 20,
            65536,
            DataPolicy {
                compression: 8,
                ..DataPolicy::default()
            },
        )
        .unwrap();
    pool.write(n.id, 0, &noise(4 << 20, 4)).unwrap();
    let map = pool.physical_map(Target::Volume(n.id)).unwrap();
    assert!(map.extents.iter().all(|e| e.2 == 65536));
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:#?}", rep.errors);
    let scrub = pool.scrub().unwrap();
    assert!(scrub.errors.is_empty(), "{:?}", scrub.errors);
}

#[test]
fn encrypted_pool_file_holds_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(128 << 20).unwrap();
    drop(f);
    let dev: Arc<dyn BlockDev> = Arc::new(FileDev::open(&path).unwrap());
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let opts = OpenOptions {
        key: key(),
        ..OpenOptions::default()
    };
    let pool = Pool::open(dev.clone(), &opts).unwrap();
    let marker = b"PLAINTEXT-MARKER-0123456789abcdef";
    let mut data = Vec::new();
    while data.len() < 4 << 20 {
        data.extend_from_slice(marker);
        data.extend_from_slice(format!(" row {} ", data.len()).as_bytes());
    }
    data.truncate(4 << 20);
    let mut nz = noise(1 << 20, 9);
    nz[1000..1000 + marker.len()].copy_from_slice(marker);
    for (i, c) in Cipher::ALL.into_iter().enumerate() {
        for (j, (dedup, level)) in [(false, 0u8), (true, 8)].into_iter().enumerate() {
            let name = format!("e{i}{j}");
            let v = pool
                .create_volume_with(
                    &name,
                    8 << 20,
                    65536,
                    DataPolicy {
                        dedup,
                        compression: level,
                        encryption: Some(c),
                    },
                )
                .unwrap();
            pool.write(v.id, 0, &data).unwrap();
            pool.write(v.id, 4 << 20, &nz).unwrap();
            let mut back = vec![0u8; 4 << 20];
            pool.read(Target::Volume(v.id), 0, &mut back).unwrap();
            assert_eq!(back, data);
        }
    }
    pool.flush().unwrap();
    drop(pool);
    let raw = std::fs::read(&path).unwrap();
    let hits = raw.windows(16).filter(|w| *w == &marker[..16]).count();
    assert_eq!(hits, 0, "plaintext found in the pool file");
    // Sanity: the same write to a plain volume does show up.
    let pool = Pool::open(dev.clone(), &opts).unwrap();
    let v = pool.create_volume("plain", 1 << 20, 65536).unwrap();
    pool.write(v.id, 0, &data[..1 << 20]).unwrap();
    pool.flush().unwrap();
    drop(pool);
    let raw = std::fs::read(&path).unwrap();
    assert!(raw.windows(16).any(|w| w == &marker[..16]));
}

#[test]
fn key_is_checked_at_open_and_required_for_encrypted_data() {
    let dev = fresh(64 << 20);
    let pool = open(&dev, key()).unwrap();
    let e = pool
        .create_volume_with(
            "secret",
            1 << 20,
            65536,
            DataPolicy {
                encryption: Some(Cipher::Sm4Xts),
                ..DataPolicy::default()
            },
        )
        .unwrap();
    let p = pool.create_volume("open", 1 << 20, 65536).unwrap();
    pool.write(e.id, 0, &[7u8; 70_000]).unwrap();
    pool.write(p.id, 0, &[8u8; 70_000]).unwrap();
    pool.flush().unwrap();
    drop(pool);
    let image = dev.image();
    // A wrong key: a clear error and not one byte written.
    match open(&dev, Some(KeySource::Key(vec![1; 32]))) {
        Err(Error::WrongKey(m)) => assert!(m.contains("does not match"), "{m}"),
        other => panic!("wrong key accepted: {:?}", other.err()),
    }
    assert!(matches!(
        open(&dev, Some(KeySource::Passphrase("x".into()))),
        Err(Error::WrongKey(_))
    ));
    assert!(dev.image() == image, "a failed open wrote to the pool");
    // No key: plain volumes work, encrypted ones say what is missing.
    let pool = open(&dev, None).unwrap();
    let mut b = vec![0u8; 4096];
    pool.read(Target::Volume(p.id), 0, &mut b).unwrap();
    assert_eq!(b, vec![8u8; 4096]);
    assert!(matches!(
        pool.read(Target::Volume(e.id), 0, &mut b),
        Err(Error::KeyRequired)
    ));
    assert!(matches!(pool.write(e.id, 0, &b), Err(Error::KeyRequired)));
    assert!(matches!(
        pool.create_volume_with(
            "x",
            1 << 20,
            65536,
            DataPolicy {
                encryption: Some(Cipher::Aes256Xts),
                ..DataPolicy::default()
            }
        ),
        Err(Error::KeyRequired)
    ));
    // fsck and scrub need no key: checksums cover the stored bytes.
    assert!(pool.fsck().unwrap().is_clean());
    assert!(pool.scrub().unwrap().errors.is_empty());
    drop(pool);
    let pool = open(&dev, key()).unwrap();
    pool.read(Target::Volume(e.id), 0, &mut b).unwrap();
    assert_eq!(b, vec![7u8; 4096]);
}

#[test]
fn space_report_counts_each_stage() {
    let dev = fresh(128 << 20);
    let pool = open(&dev, None).unwrap();
    let t = text(4 << 20);
    let pol = DataPolicy {
        dedup: true,
        compression: 8,
        ..DataPolicy::default()
    };
    let a = pool.create_volume_with("a", 8 << 20, 65536, pol).unwrap();
    let b = pool.create_volume_with("b", 8 << 20, 65536, pol).unwrap();
    pool.write(a.id, 0, &t).unwrap();
    pool.write(b.id, 0, &t).unwrap();
    pool.write(b.id, 4 << 20, &t).unwrap();
    let r = pool.reduction().unwrap();
    assert_eq!(r.pool.logical_bytes, 12 << 20);
    // Text repeats every few KiB but not on 64 KiB boundaries: 4 MiB distinct.
    assert!(r.pool.after_dedup_bytes <= 4 << 20, "{:?}", r.pool);
    assert!(
        r.pool.after_compression_bytes < r.pool.after_dedup_bytes / 3,
        "{:?}",
        r.pool
    );
    assert_eq!(r.volumes.len(), 2);
    assert_eq!(r.volumes[1].bytes.logical_bytes, 8 << 20);
    assert_eq!(
        r.volumes[1].bytes.after_dedup_bytes,
        r.pool.after_dedup_bytes
    );
    assert!(r.data_allocated_bytes >= r.pool.after_compression_bytes);
    assert!(r.pool.ratio() > 6.0, "{}", r.pool.ratio());
}

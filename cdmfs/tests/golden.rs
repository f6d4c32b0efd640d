//! A pool written by the version-1 format (before sub-block pieces) is kept
//! as `tests/data/pool-v1.img.zst`. Today's code must open it, read every
//! volume and snapshot exactly, pass fsck, and write to it (which upgrades
//! it in place: a version-1 pool is a version-2 pool without pieces).
//!
//! The contents are described once, in [`script`]: the builder below
//! applies it to a pool and the checks apply it to a plain byte model, so
//! the expectation never comes from the engine under test. Rebuild the
//! image (only when the format changes on purpose, with the old code):
//! `CDM_WRITE_GOLDEN=cdmfs/tests/data/pool-v1.img.zst cargo test -p cdmfs --test golden`.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use cdmfs::{
    BlockDev, Cipher, DataPolicy, FormatOptions, KeySource, MemDev, OpenOptions, Pool, Target,
};
use common::{stamped, vol_tag};

const POOL_BYTES: usize = 48 << 20;
const KEY: [u8; 32] = [0x42; 32];

/// One step of the golden pool's history.
enum Step {
    Volume(&'static str, u64, u32, DataPolicy),
    /// (volume, offset, length, generation, incompressible filler)
    Write(&'static str, u64, usize, u64, bool),
    Zero(&'static str, u64, u64),
    /// (volume, snapshot label)
    Snap(&'static str, &'static str),
    /// (snapshot label, new volume)
    Clone(&'static str, &'static str),
}

fn reduced() -> DataPolicy {
    DataPolicy {
        dedup: true,
        compression: 8,
        encryption: None,
    }
}

fn secret() -> DataPolicy {
    DataPolicy {
        dedup: true,
        compression: 8,
        encryption: Some(Cipher::Aes256Xts),
    }
}

fn script() -> Vec<Step> {
    use Step::*;
    vec![
        Volume("plain", 8 << 20, 65536, DataPolicy::default()),
        Write("plain", 0, 1 << 20, 1, false),
        Write("plain", 3 << 20, 256 << 10, 1, false),
        Snap("plain", "p1"),
        Write("plain", 4096, 8192, 2, true),
        Write("plain", (1 << 20) - 512, 1024, 2, true),
        Zero("plain", 65536, 131072),
        Snap("plain", "p2"),
        Clone("p1", "plainclone"),
        Write("plainclone", 200 << 10, 12 << 10, 3, true),
        Volume("small", 2 << 20, 4096, DataPolicy::default()),
        Write("small", 0, 2 << 20, 1, false),
        Write("small", 10000, 5000, 2, false),
        Volume("reduced", 4 << 20, 16384, reduced()),
        Write("reduced", 0, 2 << 20, 1, false),
        Write("reduced", 2 << 20, 128 << 10, 1, true),
        Snap("reduced", "r1"),
        Write("reduced", 8192, 16384, 2, false),
        Volume("secret", 2 << 20, 65536, secret()),
        Write("secret", 0, 1 << 20, 1, false),
        Snap("secret", "s1"),
        Write("secret", 4096, 4096, 2, true),
    ]
}

/// What every volume and snapshot must read as, from the script alone.
fn expected() -> BTreeMap<String, Vec<u8>> {
    let mut m: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for s in script() {
        match s {
            Step::Volume(n, size, _, _) => {
                m.insert(n.to_string(), vec![0; size as usize]);
            }
            Step::Write(n, off, len, gen, noise) => {
                let d = stamped(vol_tag(n), gen, off, len, noise);
                m.get_mut(n).expect("volume in script")[off as usize..off as usize + len]
                    .copy_from_slice(&d);
            }
            Step::Zero(n, off, len) => {
                m.get_mut(n).expect("volume in script")[off as usize..(off + len) as usize].fill(0);
            }
            Step::Snap(n, label) => {
                let v = m[n].clone();
                m.insert(format!("@{label}"), v);
            }
            Step::Clone(label, n) => {
                let v = m[&format!("@{label}")].clone();
                m.insert(n.to_string(), v);
            }
        }
    }
    m
}

fn open(dev: Arc<dyn BlockDev>) -> Pool {
    Pool::open(
        dev,
        &OpenOptions {
            key: Some(KeySource::Key(KEY.to_vec())),
            ..OpenOptions::default()
        },
    )
    .expect("open the golden pool")
}

fn build() -> Arc<MemDev> {
    let dev = Arc::new(MemDev::new(POOL_BYTES));
    Pool::format(&*dev, &FormatOptions::default()).expect("format");
    let pool = open(dev.clone());
    let mut ids: BTreeMap<String, u64> = BTreeMap::new();
    let mut snaps: BTreeMap<String, u64> = BTreeMap::new();
    for s in script() {
        match s {
            Step::Volume(n, size, bs, p) => {
                let v = pool.create_volume_with(n, size, bs, p).expect("volume");
                ids.insert(n.to_string(), v.id);
            }
            Step::Write(n, off, len, gen, noise) => {
                let d = stamped(vol_tag(n), gen, off, len, noise);
                pool.write(ids[n], off, &d).expect("write");
            }
            Step::Zero(n, off, len) => pool.write_zeroes(ids[n], off, len).expect("zero"),
            Step::Snap(n, label) => {
                let s = pool
                    .create_snapshot_at(n, label, serde_json::json!({"golden": label}), 1 << 60)
                    .expect("snapshot");
                pool.flush().expect("flush");
                snaps.insert(label.to_string(), s.id);
            }
            Step::Clone(label, n) => {
                let v = pool.clone_snapshot(snaps[label], n).expect("clone");
                ids.insert(n.to_string(), v.id);
            }
        }
    }
    pool.close().expect("close");
    dev
}

/// Every volume and snapshot of `pool` reads as [`expected`] says.
fn check_contents(pool: &Pool) {
    let want = expected();
    let mut seen = 0;
    for v in pool.list_volumes().expect("volumes") {
        let got = common::read_all(pool, Target::Volume(v.id), v.size as usize).expect("read");
        assert!(got == want[&v.name], "volume {} differs", v.name);
        seen += 1;
    }
    for s in pool.list_snapshots(None).expect("snapshots") {
        let key = format!("@{}", s.label);
        let got = common::read_all(pool, Target::Snapshot(s.id), s.size as usize).expect("read");
        assert!(got == want[&key], "snapshot {} differs", s.label);
        seen += 1;
    }
    assert_eq!(seen, want.len(), "every volume and snapshot is there");
}

#[test]
fn golden_builder_matches_its_description() {
    let dev = build();
    let pool = open(dev.clone());
    check_contents(&pool);
    assert!(pool.fsck().expect("fsck").errors.is_empty());
    drop(pool);
    if let Ok(path) = std::env::var("CDM_WRITE_GOLDEN") {
        let z = zstd::bulk::compress(&dev.image(), 19).expect("compress");
        std::fs::write(&path, z).expect("write the golden image");
    }
}

fn golden_image() -> Vec<u8> {
    let z = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/pool-v1.img.zst"
    ))
    .expect("read the golden image");
    zstd::bulk::decompress(&z, POOL_BYTES).expect("decompress the golden image")
}

/// The format version of the newest valid superblock of a pool image.
fn format_version(image: &[u8]) -> u32 {
    let mut best = (0u64, 0u32);
    for slot in 0..4 {
        let b = &image[slot * 4096..slot * 4096 + 512];
        let crc = u32::from_le_bytes(b[508..512].try_into().unwrap());
        if &b[..8] == b"CDMFSPL\0" && crc32c(&b[..508]) == crc {
            let gen = u64::from_le_bytes(b[32..40].try_into().unwrap());
            if gen >= best.0 {
                best = (gen, u32::from_le_bytes(b[8..12].try_into().unwrap()));
            }
        }
    }
    best.1
}

fn crc32c(b: &[u8]) -> u32 {
    cdmfs::format::crc(b)
}

#[test]
fn golden_v1_pool_opens_reads_and_takes_writes() {
    let image = golden_image();
    assert_eq!(format_version(&image), 1, "the golden pool is version 1");
    let dev = Arc::new(MemDev::from_image(image));
    let pool = open(dev.clone());
    check_contents(&pool);
    let rep = pool.fsck().expect("fsck");
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    // Small writes into every kind of volume, a snapshot, reopen: the old
    // contents and the new writes all read back, and fsck stays clean.
    let mut want = expected();
    let writes: [(&str, u64, usize); 6] = [
        ("plain", 8192, 4096),
        ("plain", 70000, 3000),
        ("plainclone", 204800, 16384),
        ("small", 4096, 4096),
        ("reduced", 40960, 8192),
        ("secret", 12288, 4096),
    ];
    for (n, off, len) in writes {
        let d = stamped(vol_tag(n), 9, off, len, true);
        let id = pool.volume_id(n).expect("volume");
        pool.write(id, off, &d).expect("write");
        want.get_mut(n).expect("volume")[off as usize..off as usize + len].copy_from_slice(&d);
    }
    // The small write into the 64 KiB-block volume became a piece: one
    // more extent than mapped blocks.
    let plain = pool.volume("plain").expect("volume");
    let map = pool
        .physical_map(Target::Volume(plain.id))
        .expect("physical map");
    assert!(map.extents.len() as u64 > plain.allocated_bytes / 65536);
    let snap = pool
        .create_snapshot("plain", "after", serde_json::Value::Null)
        .expect("snapshot");
    pool.close().expect("close");
    assert_eq!(format_version(&dev.image()), 2, "the first commit upgrades");
    let pool = open(dev);
    for v in pool.list_volumes().expect("volumes") {
        let got = common::read_all(&pool, Target::Volume(v.id), v.size as usize).expect("read");
        assert!(
            got == want[&v.name],
            "volume {} differs after writes",
            v.name
        );
    }
    let got = common::read_all(&pool, Target::Snapshot(snap.id), 8 << 20).expect("read");
    assert!(got == want["plain"], "the new snapshot differs");
    let rep = pool.fsck().expect("fsck");
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
}

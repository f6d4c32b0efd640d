//! The object-store tier, engine side: old points' uniquely owned objects
//! move into packs read through `TierRead`; every point, volume and clone
//! reads the same bytes before and after, across reopen; what stays shared
//! stays local; deleting, recalling, scrubbing and power cuts behave.
//!
//! The store here is a map of packs in memory: the engine's contract is
//! only "bytes at (pack, offset)". The real S3 path is tested end to end
//! in `tests/tests/tier_e2e.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cdmfs::{
    Cipher, CrashDev, DataPolicy, Error, FormatOptions, KeySource, MemDev, OpenOptions, Pool,
    Target, TierPlaced, TierRead,
};

const MIB: u64 = 1 << 20;
const BS: u64 = 65536;

#[derive(Default)]
struct Packs(Mutex<HashMap<u64, Vec<u8>>>);

impl TierRead for Packs {
    fn read(&self, pack: u64, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let m = self.0.lock().unwrap();
        let p = m
            .get(&pack)
            .ok_or_else(|| std::io::Error::other(format!("no pack {pack}")))?;
        let (a, b) = (offset as usize, offset as usize + len as usize);
        p.get(a..b)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| std::io::Error::other("short object"))
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A block's contents, distinct per (block, version); half of each block
/// repeats so compression has something to do.
fn block(b: u64, version: u64) -> Vec<u8> {
    let mut x = (b << 20 | version) * 2 + 1;
    let mut v: Vec<u8> = (0..BS / 16)
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect();
    v.resize(BS as usize, (b % 251) as u8);
    v
}

fn open(dev: Arc<dyn cdmfs::BlockDev>, key: Option<KeySource>) -> Pool {
    Pool::open(
        dev,
        &OpenOptions {
            key,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn read_all(pool: &Pool, t: Target, len: u64) -> cdmfs::Result<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    pool.read(t, 0, &mut out)?;
    Ok(out)
}

/// Plans `points`, reads each object and "uploads" them as one pack, as
/// the daemon does; returns the objects and where they went (not yet
/// committed).
fn upload(pool: &Pool, store: &Packs, points: &[u64]) -> (Vec<cdmfs::TierObject>, Vec<TierPlaced>) {
    let objects = pool.tier_plan(points).unwrap();
    let pack = pool.tier_reserve_pack().unwrap();
    let mut bytes = Vec::new();
    let mut placed = Vec::new();
    for o in &objects {
        let b = pool.tier_read_object(o).unwrap();
        placed.push(TierPlaced {
            addr: o.addr,
            pack,
            offset: bytes.len() as u64,
            crc: crc32c::crc32c(&b),
        });
        bytes.extend_from_slice(&b);
    }
    store.0.lock().unwrap().insert(pack, bytes);
    (objects, placed)
}

/// Tiers `points`: [`upload`], then commit. Returns the pack number.
fn tier(pool: &Pool, store: &Packs, points: &[u64]) -> (u64, cdmfs::TierCommit) {
    let (_, placed) = upload(pool, store, points);
    let pack = placed.first().map_or(u64::MAX, |p| p.pack);
    let done = pool.tier_commit(points, &placed).unwrap();
    (pack, done)
}

/// A volume written in three generations with a snapshot after each of
/// the first two: s1 owns blocks 0..16 (overwritten later) alone.
fn history(pool: &Pool, name: &str, policy: DataPolicy) -> (u64, u64, u64, Vec<Vec<u8>>) {
    let size = 4 * MIB;
    let v = pool
        .create_volume_with(name, size, BS as u32, policy)
        .unwrap()
        .id;
    let blocks = size / BS;
    let mut gens = Vec::new();
    let mut data: Vec<u8> = (0..blocks).flat_map(|b| block(b, 0)).collect();
    // Two writes: compressed chunks of one write share packs, and a pack
    // moves only when the points own every chunk in it that is named.
    let split = (16 * BS) as usize;
    pool.write(v, 0, &data[..split]).unwrap();
    pool.write(v, split as u64, &data[split..]).unwrap();
    let s1 = pool
        .create_snapshot(name, "s1", serde_json::json!({}))
        .unwrap()
        .id;
    gens.push(data.clone());
    for b in 0..16 {
        let d = block(b, 1);
        pool.write(v, b * BS, &d).unwrap();
        data[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&d);
    }
    // A small write too: a piece over a whole block.
    pool.write(v, 40 * BS + 8192, &[7u8; 8192]).unwrap();
    data[(40 * BS + 8192) as usize..(40 * BS + 16384) as usize].fill(7);
    let s2 = pool
        .create_snapshot(name, "s2", serde_json::json!({}))
        .unwrap()
        .id;
    gens.push(data.clone());
    for b in 16..24 {
        let d = block(b, 2);
        pool.write(v, b * BS, &d).unwrap();
        data[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&d);
    }
    gens.push(data);
    pool.flush().unwrap();
    (v, s1, s2, gens)
}

fn settled_used(pool: &Pool) -> u64 {
    for _ in 0..4 {
        pool.commit().unwrap();
    }
    pool.space().unwrap().used_bytes
}

fn check_reads(pool: &Pool, v: u64, s1: u64, s2: u64, gens: &[Vec<u8>]) {
    let len = gens[0].len() as u64;
    assert!(
        read_all(pool, Target::Snapshot(s1), len).unwrap() == gens[0],
        "s1"
    );
    assert!(
        read_all(pool, Target::Snapshot(s2), len).unwrap() == gens[1],
        "s2"
    );
    assert!(
        read_all(pool, Target::Volume(v), len).unwrap() == gens[2],
        "volume"
    );
}

fn roundtrip(policy: DataPolicy, key: Option<KeySource>) {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(dev.clone(), key.clone());
    let store = Arc::new(Packs::default());
    pool.set_tier(Some(store.clone()));
    let (v, s1, s2, gens) = history(&pool, "db", policy);
    let used0 = settled_used(&pool);

    let (pack, done) = tier(&pool, &store, &[s1]);
    assert!(done.objects > 0 && done.skipped == 0, "{done:?}");
    assert_eq!(done.snapshots, vec![s1]);
    assert!(pool.snapshot(s1).unwrap().tiered);
    assert!(!pool.snapshot(s2).unwrap().tiered);
    check_reads(&pool, v, s1, s2, &gens);
    // What moved is freed locally: at least the 16 blocks s1 owned alone
    // (compressed, they take less than 1 MiB).
    let used1 = settled_used(&pool);
    assert!(used1 < used0, "used {used0} before, {used1} after");
    let r = pool.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    assert_eq!(r.tier_entries, done.objects);
    assert_eq!(
        pool.tier_packs().unwrap().into_iter().collect::<Vec<_>>(),
        vec![pack]
    );
    // Tiering again finds nothing more that s1 owns alone.
    assert!(pool.tier_plan(&[s1]).unwrap().is_empty());
    drop(pool);

    // Reopened with the store attached: the same bytes.
    let pool = open(dev.clone(), key.clone());
    pool.set_tier(Some(store.clone()));
    check_reads(&pool, v, s1, s2, &gens);
    assert!(pool.fsck().unwrap().is_clean());

    // Without a store, only the tiered point fails, with the reason.
    pool.set_tier(None);
    match read_all(&pool, Target::Snapshot(s1), 4 * MIB) {
        Err(Error::Tier(m)) => assert!(m.contains("no object store"), "{m}"),
        other => panic!("expected a tier error, got {:?}", other.map(|_| ())),
    }
    assert!(read_all(&pool, Target::Snapshot(s2), 4 * MIB).unwrap() == gens[1]);
}

#[test]
fn tiered_points_read_the_same_plain() {
    roundtrip(DataPolicy::default(), None);
}

#[test]
fn tiered_points_read_the_same_reduced_and_encrypted() {
    let policy = DataPolicy {
        dedup: true,
        compression: 3,
        encryption: Some(Cipher::Aes256Xts),
    };
    roundtrip(policy, Some(KeySource::Key(vec![9; 32])));
}

#[test]
fn encrypted_packs_hold_no_plaintext() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(dev, Some(KeySource::Key(vec![3; 32])));
    let store = Arc::new(Packs::default());
    pool.set_tier(Some(store.clone()));
    let policy = DataPolicy {
        encryption: Some(Cipher::Aes256Xts),
        ..DataPolicy::default()
    };
    let (_, s1, _, gens) = history(&pool, "e", policy);
    tier(&pool, &store, &[s1]);
    let packs = store.0.lock().unwrap();
    let all: Vec<u8> = packs.values().flatten().copied().collect();
    assert!(all.len() as u64 >= 16 * BS);
    // Any 64-byte window of a tiered block's plaintext would show.
    for b in 0..16u64 {
        let needle = &gens[0][(b * BS) as usize..(b * BS) as usize + 64];
        assert!(!all.windows(64).any(|w| w == needle), "block {b} in clear");
    }
}

#[test]
fn clones_of_tiered_points_read_write_and_free() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(dev, None);
    let store = Arc::new(Packs::default());
    pool.set_tier(Some(store.clone()));
    let (_, s1, s2, gens) = history(&pool, "db", DataPolicy::default());
    tier(&pool, &store, &[s1]);
    // An instant recovery of the tiered point: a clone reading through
    // the tier and writing locally.
    let c = pool.clone_snapshot(s1, "c").unwrap().id;
    let mut want = gens[0].clone();
    pool.write(c, 3 * BS + 100, &[1u8; 5000]).unwrap();
    want[(3 * BS + 100) as usize..(3 * BS + 5100) as usize].fill(1);
    assert!(read_all(&pool, Target::Volume(c), 4 * MIB).unwrap() == want);
    // The clone now shares s1's tiered objects: a second tiering of s1
    // moves nothing and its objects stay.
    assert!(pool.tier_plan(&[s1]).unwrap().is_empty());
    pool.delete_snapshot(s1).unwrap();
    assert!(read_all(&pool, Target::Volume(c), 4 * MIB).unwrap() == want);
    assert!(pool.fsck().unwrap().is_clean());
    let left = pool.tier_entries().unwrap().len();
    assert!(left > 0);
    // The last reference gone, the map forgets the objects: GC may delete
    // the pack.
    pool.delete_volume("c", true).unwrap();
    pool.commit().unwrap();
    assert!(pool.tier_entries().unwrap().is_empty());
    assert!(pool.tier_packs().unwrap().is_empty());
    assert!(read_all(&pool, Target::Snapshot(s2), 4 * MIB).unwrap() == gens[1]);
    assert!(pool.fsck().unwrap().is_clean());
}

#[test]
fn shared_data_stays_local_and_later_points_count() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(dev, None);
    let store = Arc::new(Packs::default());
    let (_, s1, s2, _) = history(&pool, "db", DataPolicy::default());
    // s1 alone: the 16 blocks overwritten after it.
    let one = pool.tier_plan(&[s1]).unwrap();
    let bytes: u64 = one.iter().map(|o| o.bytes()).sum();
    assert_eq!(bytes, 16 * BS, "{one:?}");
    // s1 and s2: also the 8 blocks s2 holds that the volume overwrote
    // (s2's piece is still the volume's too).
    let both = pool.tier_plan(&[s1, s2]).unwrap();
    let bytes: u64 = both.iter().map(|o| o.bytes()).sum();
    assert_eq!(bytes, 24 * BS, "{both:?}");
    let (_, done) = tier(&pool, &store, &[s1, s2]);
    assert_eq!(done.bytes, 24 * BS);
    assert!(pool.fsck().unwrap().is_clean());
}

#[test]
fn a_clone_made_after_planning_keeps_its_objects_local() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(dev, None);
    let store = Arc::new(Packs::default());
    pool.set_tier(Some(store.clone()));
    let (_, s1, _, gens) = history(&pool, "db", DataPolicy::default());
    let (objects, placed) = upload(&pool, &store, &[s1]);
    // Between upload and commit, a clone of s1 appears.
    pool.clone_snapshot(s1, "late").unwrap();
    let done = pool.tier_commit(&[s1], &placed).unwrap();
    assert_eq!(done.objects, 0);
    assert_eq!(done.skipped, objects.len() as u64);
    assert!(pool.tier_entries().unwrap().is_empty());
    assert!(read_all(&pool, Target::Snapshot(s1), 4 * MIB).unwrap() == gens[0]);
    assert!(pool.fsck().unwrap().is_clean());
}

#[test]
fn recall_brings_a_point_back_and_scrub_names_damage() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(dev.clone(), None);
    let store = Arc::new(Packs::default());
    pool.set_tier(Some(store.clone()));
    let (v, s1, s2, gens) = history(&pool, "db", DataPolicy::default());
    let (pack, _) = tier(&pool, &store, &[s1]);
    assert!(pool.scrub().unwrap().errors.is_empty());

    // One flipped byte in the store: scrub names the point and offset.
    store.0.lock().unwrap().get_mut(&pack).unwrap()[5 * BS as usize + 17] ^= 0xff;
    let rep = pool.scrub().unwrap();
    assert_eq!(rep.errors.len(), 1, "{:?}", rep.errors);
    let e = &rep.errors[0];
    assert!(e.target.contains(&format!("@{s1}")), "{e:?}");
    assert!(e.what.contains("tiered data checksum mismatch"), "{e:?}");
    // A read of that block fails; the rest of the point reads.
    assert!(read_all(&pool, Target::Snapshot(s1), 4 * MIB).is_err());
    store.0.lock().unwrap().get_mut(&pack).unwrap()[5 * BS as usize + 17] ^= 0xff;

    // Recall: fetch each object, store it locally; then the point reads
    // with no store at all.
    let ents = pool.tier_entries_of(Target::Snapshot(s1)).unwrap();
    assert!(!ents.is_empty());
    let fetched: Vec<(u64, Vec<u8>)> = ents
        .iter()
        .map(|e| (e.id, store.read(e.pack, e.offset, e.len).unwrap()))
        .collect();
    pool.tier_recall(&fetched, &[s1]).unwrap();
    assert!(!pool.snapshot(s1).unwrap().tiered);
    pool.set_tier(None);
    check_reads(&pool, v, s1, s2, &gens);
    let r = pool.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    assert!(r.tier_local_blocks >= 16);
    drop(pool);
    let pool = open(dev, None);
    check_reads(&pool, v, s1, s2, &gens);
    assert!(pool.fsck().unwrap().is_clean());
    // A recalled object that fails its checksum is refused.
    let bad = vec![(ents[0].id, vec![0u8; ents[0].len as usize])];
    assert!(
        pool.tier_recall(&bad, &[]).is_ok(),
        "already local: skipped"
    );
}

#[test]
fn power_cuts_during_tiering_lose_nothing() {
    // Cut the power at every write of a tiering commit: the pool reopens
    // either as before (s1 local) or after (s1 tiered), reads the same
    // bytes, and fsck is clean.
    let base = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*base, &FormatOptions::default()).unwrap();
    let pool = open(base.clone(), None);
    let store = Arc::new(Packs::default());
    let (v, s1, s2, gens) = history(&pool, "db", DataPolicy::default());
    pool.close().unwrap();
    let image = base.image();
    let mut cut = 0;
    loop {
        let dev = Arc::new(CrashDev::from_image(image.clone()));
        let pool = open(dev.clone(), None);
        pool.set_tier(Some(store.clone()));
        let (_, placed) = upload(&pool, &store, &[s1]);
        dev.cut_after(cut);
        let finished = pool.tier_commit(&[s1], &placed).is_ok() && !dev.is_dead();
        drop(pool);
        if !dev.is_dead() {
            dev.cut_now();
        }
        let after = Arc::new(MemDev::from_image(dev.crash_image(cut ^ 0x5eed)));
        let pool = open(after, None);
        pool.set_tier(Some(store.clone()));
        check_reads(&pool, v, s1, s2, &gens);
        let r = pool.fsck().unwrap();
        assert!(r.is_clean(), "cut at event {cut}: {:?}", r.errors);
        if finished {
            assert!(pool.snapshot(s1).unwrap().tiered);
            break;
        }
        cut += 1;
        assert!(cut < 10_000);
    }
    assert!(cut > 0);
}

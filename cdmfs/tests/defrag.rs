//! Background defragmentation: extents become contiguous at no extra
//! space, for every owner at once (snapshots and clones keep sharing
//! them), what the step cannot remap stays where it is, contents never
//! change, and writes and snapshots racing the steps win.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cdmfs::{
    Cipher, DataPolicy, DefragProgress, Error, FaultDev, FormatOptions, KeySource, MemDev,
    OpenOptions, Pool, PoolState, Target,
};

const MIB: u64 = 1 << 20;
const BS: u64 = 65536;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A block's contents, distinct per (block, version).
fn block(b: u64, version: u64) -> Vec<u8> {
    let mut x = (b << 20 | version) * 2 + 1;
    (0..BS / 8)
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect()
}

/// A volume of `mib` MiB written sequentially, then `rounds` rounds of 1%
/// random block rewrites (each flushed); returns its contents.
fn fragmented(pool: &Pool, vol: u64, mib: u64, rounds: u64, seed: u64) -> Vec<u8> {
    let blocks = mib * MIB / BS;
    let mut data = Vec::with_capacity((mib * MIB) as usize);
    for b in 0..blocks {
        data.extend_from_slice(&block(b, 0));
    }
    pool.write(vol, 0, &data).unwrap();
    pool.flush().unwrap();
    let mut x = seed | 1;
    for r in 1..=rounds {
        for _ in 0..blocks.div_ceil(100) {
            let b = xorshift(&mut x) % blocks;
            let d = block(b, r);
            pool.write(vol, b * BS, &d).unwrap();
            data[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&d);
        }
        pool.flush().unwrap();
    }
    data
}

/// Steps through the whole volume with `budget` bytes per step.
fn full_pass(pool: &Pool, vol: u64, budget: u64) -> DefragProgress {
    let mut total = DefragProgress::default();
    let mut next = 0;
    loop {
        let p = pool.defragment_step(vol, next, budget).unwrap();
        assert!(p.next_block > next || p.done, "no progress: {p:?}");
        total.bytes_moved += p.bytes_moved;
        total.extents_moved += p.extents_moved;
        total.extents += p.extents;
        total.runs_before += p.runs_before;
        total.runs_after += p.runs_after;
        total.shared_blocks += p.shared_blocks;
        total.skipped_blocks += p.skipped_blocks;
        next = p.next_block;
        if p.done {
            total.next_block = next;
            total.done = true;
            return total;
        }
    }
}

/// Commits until every deferred free is reusable, and returns used bytes.
fn settled_used(pool: &Pool) -> u64 {
    for _ in 0..4 {
        pool.commit().unwrap();
    }
    pool.space().unwrap().used_bytes
}

fn read_vol(pool: &Pool, t: Target, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    pool.read(t, 0, &mut out).unwrap();
    out
}

fn open(dev: &Arc<MemDev>, key: Option<KeySource>) -> Pool {
    Pool::open(
        dev.clone(),
        &OpenOptions {
            key,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn new_pool(mib: usize) -> (Arc<MemDev>, Pool) {
    let dev = Arc::new(MemDev::new(mib << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = open(&dev, None);
    (dev, pool)
}

#[test]
fn unique_extents_become_contiguous_at_no_extra_space() {
    let (dev, pool) = new_pool(256);
    let v = pool.create_volume("v", 32 * MIB, BS as u32).unwrap().id;
    let t = Target::Volume(v);
    let data = fragmented(&pool, v, 32, 30, 7);
    let used0 = settled_used(&pool);
    let f0 = pool.fragmentation(t).unwrap();
    assert!(f0.runs > 100, "the workload fragments: {f0:?}");

    let p = full_pass(&pool, v, 4 * MIB);
    let f1 = pool.fragmentation(t).unwrap();
    assert!(p.bytes_moved > 0 && p.shared_blocks == 0, "{p:?}");
    // Each 4 MiB step lands right after the previous one (next-fit), so
    // the volume is a handful of runs at most.
    assert!(f1.runs <= 8, "runs {} -> {}: {p:?}", f0.runs, f1.runs);
    assert_eq!(f1.mapped_bytes, f0.mapped_bytes);
    assert_eq!(read_vol(&pool, t, 32 * MIB), data);

    // The old copies are freed like any overwrite's: once the commits
    // after the pass made them reusable, the pool uses what it used before
    // (give or take the tree nodes copy-on-write rewrote).
    let used1 = settled_used(&pool);
    assert!(
        used1.abs_diff(used0) <= 16 * 4096,
        "used {used0} before, {used1} after"
    );
    // A second pass finds nothing to do.
    let p2 = full_pass(&pool, v, 4 * MIB);
    assert_eq!(p2.bytes_moved, 0, "{p2:?}");
    assert!(pool.fsck().unwrap().is_clean());

    // Durable through the intent log and a reopen.
    pool.flush().unwrap();
    drop(pool);
    let pool = open(&dev, None);
    assert_eq!(read_vol(&pool, t, 32 * MIB), data);
    assert_eq!(pool.fragmentation(t).unwrap(), f1);
    assert!(pool.fsck().unwrap().is_clean());
}

/// Blocks (by logical offset) where two targets name the same stored bytes.
fn shared_with(pool: &Pool, a: Target, b: Target) -> usize {
    let ma = pool.physical_map(a).unwrap().extents;
    let mb: std::collections::HashSet<_> =
        pool.physical_map(b).unwrap().extents.into_iter().collect();
    ma.iter().filter(|e| mb.contains(e)).count()
}

/// A year of daily merges in miniature: every round's point is kept, so
/// the newest shares almost all of the volume. One pass moves the shared
/// extents for every owner at once: the volume (and the points with it)
/// become contiguous, every point and clone reads as before, sharing is
/// exactly as it was, and no space is spent.
#[test]
fn shared_extents_move_for_every_owner() {
    let (dev, pool) = new_pool(256);
    let v = pool.create_volume("v", 16 * MIB, BS as u32).unwrap().id;
    let t = Target::Volume(v);
    let mut live = fragmented(&pool, v, 16, 20, 11);
    let mut points = Vec::new();
    let mut first = None;
    let mut x = 5u64;
    for r in 1..=10u64 {
        for _ in 0..3 {
            let b = xorshift(&mut x) % (16 * MIB / BS);
            let d = block(b, 500 + r);
            pool.write(v, b * BS, &d).unwrap();
            live[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&d);
        }
        let s = pool
            .create_snapshot("v", &format!("s{r}"), serde_json::Value::Null)
            .unwrap()
            .id;
        points.push((Target::Snapshot(s), live.clone()));
        first.get_or_insert(s);
    }
    // A clone of the oldest point, changed a little: it shares the rest.
    let c = pool.clone_snapshot(first.unwrap(), "c").unwrap().id;
    let mut cdata = points[0].1.clone();
    let d = block(3, 9999);
    pool.write(c, 3 * BS, &d).unwrap();
    cdata[(3 * BS) as usize..(4 * BS) as usize].copy_from_slice(&d);
    points.push((Target::Volume(c), cdata));
    pool.flush().unwrap();

    let sharing0: Vec<usize> = points
        .iter()
        .map(|(p, _)| shared_with(&pool, t, *p))
        .collect();
    assert!(
        sharing0[9] >= 250,
        "the newest point shares the volume: {sharing0:?}"
    );
    let used0 = settled_used(&pool);
    let f0 = pool.fragmentation(t).unwrap();
    assert!(f0.runs > 50, "the workload fragments: {f0:?}");

    let p = full_pass(&pool, v, 2 * MIB);
    assert_eq!(p.shared_blocks, 0, "{p:?}");
    assert!(p.bytes_moved >= 8 * MIB, "{p:?}");
    let f1 = pool.fragmentation(t).unwrap();
    // Steps chain their runs: the volume is (almost) one run.
    assert!(f1.runs <= 2, "runs {} -> {}: {p:?}", f0.runs, f1.runs);
    assert_eq!(read_vol(&pool, t, 16 * MIB), live);
    for (pt, want) in &points {
        assert_eq!(&read_vol(&pool, *pt, 16 * MIB), want, "{pt:?}");
    }
    let sharing1: Vec<usize> = points
        .iter()
        .map(|(p, _)| shared_with(&pool, t, *p))
        .collect();
    assert_eq!(sharing1, sharing0, "sharing changed");
    // The old copies are freed with the commit: no space is spent (give or
    // take the tree nodes copy-on-write rewrote).
    let used1 = settled_used(&pool);
    assert!(
        used1.abs_diff(used0) <= 64 * 4096,
        "used {used0} before, {used1} after"
    );
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
    assert!(pool.scrub().unwrap().errors.is_empty());
    // A second pass finds nothing to do.
    assert_eq!(full_pass(&pool, v, 2 * MIB).bytes_moved, 0);

    drop(pool);
    let pool = open(&dev, None);
    assert_eq!(read_vol(&pool, t, 16 * MIB), live);
    for (pt, want) in &points {
        assert_eq!(&read_vol(&pool, *pt, 16 * MIB), want, "{pt:?}");
    }
    assert_eq!(pool.fragmentation(t).unwrap(), f1);
    assert!(pool.fsck().unwrap().is_clean());
}

/// Free space in holes of 8 blocks only (another volume fills the rest)
/// and every old version kept by a point: no hole holds a step's
/// segment, so the segments fill the longest holes, and the volume still
/// ends in runs of those holes' length instead of single blocks.
#[test]
fn fragmented_free_space_still_gives_runs_of_its_holes() {
    let (_dev, pool) = new_pool(96);
    let v = pool.create_volume("v", 8 * MIB, BS as u32).unwrap().id;
    let t = Target::Volume(v);
    let data = fragmented(&pool, v, 8, 30, 17);
    let s = pool
        .create_snapshot("v", "s", serde_json::Value::Null)
        .unwrap()
        .id;
    settled_used(&pool);
    // A filler volume takes the free space, then gives back 8 of every 9
    // blocks: holes of 512 KiB.
    let free = pool.space().unwrap().free_bytes;
    let fmib = free / MIB - 4;
    let f = pool.create_volume("f", fmib * MIB, BS as u32).unwrap().id;
    for m in 0..fmib {
        pool.write(f, m * MIB, &block(m, 77).repeat(16)).unwrap();
    }
    pool.flush().unwrap();
    for k in 0..fmib * 16 / 9 {
        pool.trim(f, 9 * k * BS, 8 * BS).unwrap();
    }
    settled_used(&pool);
    let f0 = pool.fragmentation(t).unwrap();
    assert!(f0.runs > 60, "the workload fragments: {f0:?}");

    let p = full_pass(&pool, v, 2 * MIB);
    let f1 = pool.fragmentation(t).unwrap();
    assert!(p.bytes_moved > 4 * MIB, "{p:?}");
    assert!(
        f1.runs * 4 <= f0.runs,
        "runs {} -> {}: {p:?}",
        f0.runs,
        f1.runs
    );
    assert_eq!(read_vol(&pool, t, 8 * MIB), data);
    assert_eq!(read_vol(&pool, Target::Snapshot(s), 8 * MIB), data);
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
}

/// An object also named from another block (a dedup hit the walk over the
/// step's range cannot see) stays where it is, and so does everything
/// that names it; the rest moves.
#[test]
fn a_dedup_hit_elsewhere_keeps_its_object_in_place() {
    let (_dev, pool) = new_pool(256);
    let policy = DataPolicy {
        dedup: true,
        ..DataPolicy::default()
    };
    let v = pool
        .create_volume_with("v", 8 * MIB, BS as u32, policy)
        .unwrap()
        .id;
    let t = Target::Volume(v);
    let mut live = fragmented(&pool, v, 8, 20, 13);
    // Block 120's bytes written again at block 5, in another step's range.
    let dup = live[(120 * BS) as usize..(121 * BS) as usize].to_vec();
    pool.write(v, 5 * BS, &dup).unwrap();
    live[(5 * BS) as usize..(6 * BS) as usize].copy_from_slice(&dup);
    pool.flush().unwrap();
    let map0 = pool.physical_map(t).unwrap().extents;
    let at = |m: &[(u64, u64, u32)], b: u64| m.iter().find(|e| e.0 == b * BS).copied();
    assert_eq!(
        at(&map0, 5).map(|e| e.1),
        at(&map0, 120).map(|e| e.1),
        "dedup hit"
    );

    let p = full_pass(&pool, v, MIB);
    assert!(p.bytes_moved > 0, "{p:?}");
    assert_eq!(p.shared_blocks, 2, "{p:?}");
    let map1 = pool.physical_map(t).unwrap().extents;
    assert_eq!(at(&map1, 5), at(&map0, 5));
    assert_eq!(at(&map1, 120), at(&map0, 120));
    assert_eq!(read_vol(&pool, t, 8 * MIB), live);
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
}

#[test]
fn encrypted_volumes_are_re_encrypted_for_their_new_place() {
    let dev = Arc::new(MemDev::new(128 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let key = || Some(KeySource::Key(vec![5; 32]));
    let pool = open(&dev, key());
    let policy = DataPolicy {
        encryption: Some(Cipher::Aes256Xts),
        ..DataPolicy::default()
    };
    let v = pool
        .create_volume_with("e", 8 * MIB, BS as u32, policy)
        .unwrap()
        .id;
    let t = Target::Volume(v);
    let data = fragmented(&pool, v, 8, 20, 3);
    pool.flush().unwrap();
    drop(pool);

    // Without the key, a step is refused like a write.
    let locked = open(&dev, None);
    assert!(matches!(
        locked.defragment_step(v, 0, MIB),
        Err(Error::KeyRequired)
    ));
    drop(locked);

    let pool = open(&dev, key());
    let before = pool.fragmentation(t).unwrap();
    let p = full_pass(&pool, v, MIB);
    assert!(p.bytes_moved > 0, "{p:?}");
    assert!(pool.fragmentation(t).unwrap().runs < before.runs);
    assert_eq!(read_vol(&pool, t, 8 * MIB), data);
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
    assert!(pool.scrub().unwrap().errors.is_empty());
}

/// One writer (random block writes and snapshots) and one defragmenter
/// (passes with small steps) at once: the volume ends as the writer left
/// it and every snapshot as it was when taken.
#[test]
fn racing_writes_and_snapshots_win() {
    let (_dev, pool) = new_pool(512);
    let pool = Arc::new(pool);
    let v = pool.create_volume("v", 8 * MIB, BS as u32).unwrap().id;
    let data = fragmented(&pool, v, 8, 10, 5);
    let stop = Arc::new(AtomicBool::new(false));
    let first_pass = Arc::new(AtomicBool::new(false));
    let defrag = {
        let (pool, stop, first) = (pool.clone(), stop.clone(), first_pass.clone());
        std::thread::spawn(move || {
            let mut moved = 0;
            while !stop.load(Ordering::Relaxed) {
                moved += full_pass(&pool, v, 256 << 10).bytes_moved;
                first.store(true, Ordering::Relaxed);
            }
            moved
        })
    };
    // The writer starts once the defragmenter has made a pass: on a loaded
    // machine the 300 writes could otherwise end before its first pass
    // (and the check that it moved anything would fail for no fault).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !first_pass.load(Ordering::Relaxed) {
        assert!(
            std::time::Instant::now() < deadline,
            "no defragmentation pass"
        );
        std::thread::yield_now();
    }
    let mut live = data;
    let mut snaps = Vec::new();
    let mut x = 99u64;
    for r in 1..=300u64 {
        let b = xorshift(&mut x) % (8 * MIB / BS);
        // Whole blocks and pieces (a 4 KiB write into a mapped block).
        let (off, d) = if r % 3 == 0 {
            let mut d = block(b, r);
            d.truncate(4096);
            (b * BS + 8192, d)
        } else {
            (b * BS, block(b, r))
        };
        pool.write(v, off, &d).unwrap();
        live[off as usize..off as usize + d.len()].copy_from_slice(&d);
        if r % 50 == 0 {
            let s = pool
                .create_snapshot("v", &format!("s{r}"), serde_json::Value::Null)
                .unwrap()
                .id;
            snaps.push((s, live.clone()));
        }
        if r % 100 == 0 {
            // Snapshots age out, so blocks become the volume's alone again.
            let (s, _) = snaps.remove(0);
            pool.delete_snapshot(s).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let moved = defrag.join().unwrap();
    assert!(moved > 0, "the defragmenter never moved anything");
    assert_eq!(read_vol(&pool, Target::Volume(v), 8 * MIB), live);
    for (s, want) in &snaps {
        assert_eq!(&read_vol(&pool, Target::Snapshot(*s), 8 * MIB), want);
    }
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
}

/// A stalled pool refuses a step like a write (it could not be made
/// durable), and the step runs once the device recovers. Failing syncs,
/// not writes: a step that skipped the gate would succeed.
#[test]
fn a_stalled_pool_refuses_steps() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDev::new(128 << 20));
    Pool::format(&*mem, &FormatOptions::default()).unwrap();
    let pool = Pool::open(
        Arc::new(FaultDev::new(mem.clone(), dir.path())),
        &OpenOptions::default(),
    )
    .unwrap();
    let v = pool.create_volume("v", 8 * MIB, BS as u32).unwrap().id;
    let data = fragmented(&pool, v, 8, 10, 9);
    std::fs::write(dir.path().join("pool-eio-sync"), b"").unwrap();
    let stall = pool.commit().unwrap_err();
    assert_ne!(pool.health().unwrap().state, PoolState::Ok);
    let e = pool.defragment_step(v, 0, 8 * MIB).unwrap_err();
    assert_eq!(e.errno(), stall.errno(), "{e} vs {stall}");
    std::fs::remove_file(dir.path().join("pool-eio-sync")).unwrap();
    pool.flush().unwrap();
    assert_eq!(pool.health().unwrap().state, PoolState::Ok);
    assert!(full_pass(&pool, v, 8 * MIB).bytes_moved > 0);
    assert_eq!(read_vol(&pool, Target::Volume(v), 8 * MIB), data);
    assert!(pool.fsck().unwrap().is_clean());
}

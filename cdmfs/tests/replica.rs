//! The engine's support for receiving replication: `Pool::write_known`
//! (a block mapped by fingerprint, the reference logged like a dedup hit,
//! so power cuts keep refcounts right) and `Pool::revert_volume` (the live
//! tree reset to a snapshot in O(1), durable at the next flush, safe with
//! writers in flight).

use std::sync::Arc;

use cdmfs::{
    BlockDev, CrashDev, DataPolicy, Error, FormatOptions, GateDev, MemDev, OpenOptions, Pool,
    Target,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const DEDUP: DataPolicy = DataPolicy {
    dedup: true,
    compression: 0,
    encryption: None,
};

/// Distinct, never-zero contents for block `k` of a source.
fn block(k: u64, bs: usize) -> Vec<u8> {
    (0..bs as u64)
        .map(|i| ((k.wrapping_mul(131) ^ i.wrapping_mul(7)) % 251) as u8 + 1)
        .collect()
}

fn read(p: &Pool, t: Target) -> Vec<u8> {
    let (size, _) = p.geometry(t).unwrap();
    let mut buf = vec![0u8; size as usize];
    p.read(t, 0, &mut buf).unwrap();
    buf
}

fn fsck_clean(p: &Pool, what: &str) {
    let rep = p.fsck().unwrap();
    assert!(rep.is_clean(), "{what}: fsck: {:#?}", rep.errors);
}

/// Power cuts at random points of a run of `write_known` calls and flushes
/// (flushes of these are intent-log records): after each, the pool opens
/// (replaying the log), fsck is clean (no reference leaked or dropped
/// twice), every target block holds its old contents or the known ones,
/// and every block known before the last completed flush is there.
#[test]
fn write_known_survives_power_cuts_with_refcounts_right() {
    let bs = 16384usize;
    let blocks = 48u64;
    let mut replays = 0;
    for seed in 0..40u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let crash = Arc::new(CrashDev::new(32 << 20));
        Pool::format(&*crash, &FormatOptions { max_fanout: 4 }).unwrap();
        let dev: Arc<dyn BlockDev> = crash.clone();
        let p = Pool::open(dev, &OpenOptions::default()).unwrap();
        let src = p
            .create_volume_with("src", blocks * bs as u64, bs as u32, DEDUP)
            .unwrap();
        let dst = p
            .create_volume_with("dst", blocks * bs as u64, bs as u32, DEDUP)
            .unwrap();
        for k in 0..blocks {
            p.write(src.id, k * bs as u64, &block(k, bs)).unwrap();
        }
        // The target starts with other contents, some blocks with pieces.
        p.write(dst.id, 0, &vec![0xeeu8; blocks as usize * bs])
            .unwrap();
        p.write(dst.id, 5 * bs as u64 + 4096, &[0xdd; 4096])
            .unwrap();
        p.flush().unwrap();
        p.commit().unwrap();
        crash.cut_after(rng.gen_range(0..60));
        let mut durable = 0u64;
        let mut done = 0u64;
        let mut order: Vec<u64> = (0..blocks).collect();
        order.shuffle(&mut rng);
        for &k in &order {
            let fp = *blake3::hash(&block(k, bs)).as_bytes();
            match p.write_known(dst.id, k * bs as u64, &fp) {
                Ok(true) => done += 1,
                Ok(false) => panic!("seed {seed}: block {k} not found by its fingerprint"),
                Err(_) if crash.is_dead() => break,
                Err(e) => panic!("seed {seed}: write_known failed before the cut: {e}"),
            }
            if rng.gen_ratio(1, 4) {
                match p.flush() {
                    Ok(()) => durable = done,
                    Err(_) if crash.is_dead() => break,
                    Err(e) => panic!("seed {seed}: flush failed before the cut: {e}"),
                }
            }
        }
        if !crash.is_dead() {
            crash.cut_now();
        }
        drop(p);
        let image = crash.crash_image(seed);
        let dev: Arc<dyn BlockDev> = Arc::new(MemDev::from_image(image));
        let p = Pool::open(dev, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("seed {seed}: reopen failed: {e}"));
        replays += (p.log_stats().1 > 0) as u64;
        fsck_clean(&p, &format!("seed {seed}"));
        let got = read(&p, Target::Volume(dst.id));
        let mut known = 0;
        for k in 0..blocks {
            let b = &got[k as usize * bs..(k as usize + 1) * bs];
            if b == block(k, bs).as_slice() {
                known += 1;
            } else {
                let mut old = vec![0xeeu8; bs];
                if k == 5 {
                    old[4096..8192].fill(0xdd);
                }
                assert_eq!(b, old.as_slice(), "seed {seed}: block {k} is neither");
            }
        }
        let first: Vec<u64> = order[..durable as usize].to_vec();
        for k in first {
            let b = &got[k as usize * bs..(k as usize + 1) * bs];
            assert_eq!(
                b,
                block(k, bs).as_slice(),
                "seed {seed}: flushed block {k} lost"
            );
        }
        assert!(known >= durable);
        // The pool goes on working: delete both and nothing is left over.
        p.delete_volume("dst", false).unwrap();
        p.delete_volume("src", false).unwrap();
        p.commit().unwrap();
        fsck_clean(&p, &format!("seed {seed} after deleting"));
    }
    assert!(
        replays > 5,
        "too few recoveries replayed the log: {replays}"
    );
}

#[test]
fn revert_then_write_flush_and_reopen() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: 4 }).unwrap();
    let p = Pool::open(dev.clone(), &OpenOptions::default()).unwrap();
    let v = p.create_volume("v", 1 << 20, 65536).unwrap();
    p.write(v.id, 0, &block(1, 1 << 20)).unwrap();
    let s1 = p.create_snapshot("v", "", serde_json::json!({})).unwrap();
    let want1 = read(&p, Target::Snapshot(s1.id));
    p.write(v.id, 70_000, &[3; 200_000]).unwrap();
    p.write(v.id, 4096, &[4; 4096]).unwrap();
    p.grow_volume("v", 2 << 20).unwrap();
    p.write(v.id, 1 << 20, &[5; 65536]).unwrap();
    p.commit().unwrap();
    let info = p.revert_volume("v", Some(s1.id)).unwrap();
    assert_eq!(info.size, 1 << 20);
    assert_eq!(info.allocated_bytes, s1.allocated_bytes);
    assert_eq!(read(&p, Target::Volume(v.id)), want1);
    // Writes after the revert change the volume, not the snapshot.
    p.write(v.id, 8192, &[6; 8192]).unwrap();
    p.flush().unwrap();
    let mut want = want1.clone();
    want[8192..16384].fill(6);
    drop(p);
    let p = Pool::open(dev.clone(), &OpenOptions::default()).unwrap();
    assert_eq!(read(&p, Target::Volume(v.id)), want);
    assert_eq!(read(&p, Target::Snapshot(s1.id)), want1);
    fsck_clean(&p, "after reopen");
    // To nothing: all holes, nothing mapped; the snapshot keeps its data.
    let info = p.revert_volume("v", None).unwrap();
    assert_eq!(info.allocated_bytes, 0);
    assert!(read(&p, Target::Volume(v.id)).iter().all(|&b| b == 0));
    p.flush().unwrap();
    drop(p);
    let p = Pool::open(dev, &OpenOptions::default()).unwrap();
    assert!(read(&p, Target::Volume(v.id)).iter().all(|&b| b == 0));
    assert_eq!(read(&p, Target::Snapshot(s1.id)), want1);
    // Deleting the snapshot now frees everything it alone held.
    p.delete_snapshot(s1.id).unwrap();
    p.commit().unwrap();
    fsck_clean(&p, "after deleting the snapshot");
}

#[test]
fn revert_takes_own_snapshots_or_the_origin_only() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let p = Pool::open(dev, &OpenOptions::default()).unwrap();
    let a = p.create_volume("a", 1 << 20, 4096).unwrap();
    p.write(a.id, 0, &[1; 8192]).unwrap();
    let sa = p
        .create_snapshot("a", "", serde_json::json!({}))
        .unwrap()
        .id;
    p.create_volume("b", 1 << 20, 4096).unwrap();
    assert!(matches!(
        p.revert_volume("b", Some(sa)),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        p.revert_volume("b", Some(12345)),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        p.revert_volume("nope", None),
        Err(Error::NotFound(_))
    ));
    let c = p.clone_snapshot(sa, "c").unwrap();
    p.write(c.id, 0, &[2; 4096]).unwrap();
    p.revert_volume("c", Some(sa)).unwrap();
    assert_eq!(
        read(&p, Target::Volume(c.id)),
        read(&p, Target::Snapshot(sa))
    );
    p.commit().unwrap();
    fsck_clean(&p, "after reverts");
}

/// Reverts while writers (whole blocks, partial blocks, pieces) run on the
/// same volume: every write lands wholly before or after a revert, so the
/// refcounts stay right and, once the writers stop, a last revert gives
/// the snapshot exactly.
#[test]
fn revert_with_writers_in_flight() {
    let dev = Arc::new(MemDev::new(128 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: 4 }).unwrap();
    let p = Arc::new(Pool::open(dev, &OpenOptions::default()).unwrap());
    let v = p.create_volume("v", 2 << 20, 65536).unwrap();
    p.write(v.id, 0, &block(9, 2 << 20)).unwrap();
    let s = p
        .create_snapshot("v", "", serde_json::json!({}))
        .unwrap()
        .id;
    let want = read(&p, Target::Snapshot(s));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 50 {
                    let off = rng.gen_range(0..(2u64 << 20) - 70_000);
                    let len = [4096usize, 8192, 65536, 70_000][rng.gen_range(0..4)];
                    p.write(v.id, off, &vec![t as u8 + 1; len]).unwrap();
                    n += 1;
                }
            })
        })
        .collect();
    for _ in 0..40 {
        p.revert_volume("v", Some(s)).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    p.revert_volume("v", Some(s)).unwrap();
    assert_eq!(read(&p, Target::Volume(v.id)), want);
    p.commit().unwrap();
    fsck_clean(&p, "after reverts with writers");
}

/// A partial write reads the block it patches; a revert that slipped in
/// between that read and the mapping would leave the pre-revert bytes of
/// the rest of the block in the reverted volume. The writer is stopped in
/// its read while a revert is started, then let go: the block must read as
/// the snapshot's (the revert came after the write) every time.
#[test]
fn a_revert_never_lands_inside_a_write() {
    let dev = Arc::new(GateDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let p = Arc::new(Pool::open(dev.clone(), &OpenOptions::default()).unwrap());
    let v = p.create_volume("v", 1 << 20, 65536).unwrap();
    p.write(v.id, 0, &[1; 65536]).unwrap();
    let s = p
        .create_snapshot("v", "", serde_json::json!({}))
        .unwrap()
        .id;
    for round in 0..20 {
        p.write(v.id, 0, &[2; 65536]).unwrap();
        dev.arm();
        let q = p.clone();
        // Unaligned bytes of a mapped block: a piece that reads its unit.
        let writer = std::thread::spawn(move || q.write(v.id, 1000, &[3; 100]));
        dev.wait_reached();
        let q = p.clone();
        let reverter = std::thread::spawn(move || q.revert_volume("v", Some(s)));
        dev.release();
        writer.join().unwrap().unwrap();
        reverter.join().unwrap().unwrap();
        let mut got = vec![0u8; 65536];
        p.read(Target::Volume(v.id), 0, &mut got).unwrap();
        assert!(
            got.iter().all(|&b| b == 1),
            "round {round}: the reverted block holds bytes of the write's view before the revert"
        );
    }
    p.commit().unwrap();
    fsck_clean(&p, "after the rounds");
}

/// A device whose reads, once armed with n, pass n - 1 more times and then
/// fail once with EIO.
struct FailDev {
    inner: MemDev,
    countdown: std::sync::atomic::AtomicU64,
}

impl BlockDev for FailDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let c = self
            .countdown
            .fetch_update(SeqCst, SeqCst, |c| c.checked_sub(1));
        if c == Ok(1) {
            return Err(std::io::Error::other("injected read error"));
        }
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

/// A revert drops the old tree, reading nodes the small cache evicted; a
/// read that fails there (at every point in turn) must leave the pool
/// consistent: the revert fails, the pool reloads its durable state (the
/// volume as it was), fsck is clean. Before the fix the record still named
/// the half-freed old root and the snapshot root's new reference leaked.
#[test]
fn a_revert_that_fails_partway_leaves_the_pool_consistent() {
    use std::sync::atomic::Ordering::SeqCst;
    let bs = 4096usize;
    let mut failures = 0;
    for k in 1.. {
        let dev = Arc::new(FailDev {
            inner: MemDev::new(64 << 20),
            countdown: std::sync::atomic::AtomicU64::new(0),
        });
        Pool::format(&*dev, &FormatOptions { max_fanout: 4 }).unwrap();
        let opts = OpenOptions {
            cache_nodes: 16,
            ..OpenOptions::default()
        };
        let p = Pool::open(dev.clone(), &opts).unwrap();
        let v = p.create_volume("v", 2 << 20, bs as u32).unwrap();
        p.write(v.id, 0, &[1; 4096]).unwrap();
        let s = p
            .create_snapshot("v", "", serde_json::json!({}))
            .unwrap()
            .id;
        let old: Vec<u8> = (0..512).flat_map(|k| block(k, bs)).collect();
        p.write(v.id, 0, &old).unwrap();
        p.commit().unwrap();
        // Evict the volume's nodes from the cache.
        let w = p.create_volume("w", 2 << 20, bs as u32).unwrap();
        p.write(w.id, 0, &vec![7; 2 << 20]).unwrap();
        p.commit().unwrap();
        let snap = read(&p, Target::Snapshot(s));
        dev.countdown.store(k, SeqCst);
        let r = p.revert_volume("v", Some(s));
        let passed = dev.countdown.swap(0, SeqCst) > 0;
        match r {
            Ok(_) => {
                assert!(passed, "k={k}: the injected read error was swallowed");
                assert_eq!(read(&p, Target::Volume(v.id)), snap);
                p.commit().unwrap();
                fsck_clean(&p, "after a revert");
                break;
            }
            Err(e) => {
                failures += 1;
                // A failed pool reloads at the next commit.
                p.commit()
                    .unwrap_or_else(|e2| panic!("k={k}: {e}; then {e2}"));
                assert_eq!(read(&p, Target::Volume(v.id)), old, "k={k}: {e}");
                fsck_clean(&p, &format!("k={k}: after a failed revert ({e})"));
            }
        }
    }
    assert!(
        failures > 1,
        "the revert read too little to test: {failures}"
    );
}

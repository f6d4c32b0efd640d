//! Concurrency and resource bounds: readers racing writers and commits,
//! group commit, and a node cache that does not grow with the pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use cdmfs::{FileDev, FormatOptions, MemDev, OpenOptions, Pool, Target};

/// Waits until `done()` holds; panics after a generous ten minutes (a hang,
/// not a slow machine). Tests run their threads until an observable amount
/// of work is done, not for a while.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !done() {
        assert!(t.elapsed().as_secs() < 600, "gave up waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn node_cache_stays_bounded() {
    let dev = Arc::new(MemDev::new(512 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let opts = OpenOptions {
        cache_nodes: 64,
        dirty_limit: 512,
        key: None,
    };
    let pool = Pool::open(dev.clone(), &opts).unwrap();
    let v = pool.create_volume("big", 256 << 20, 4096).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..200u64 {
        pool.write(v.id, i << 20, &chunk).unwrap();
    }
    pool.close().unwrap();
    // 51200 extents need ~350 leaves; the cache keeps 64 nodes at most.
    let pool = Pool::open(dev, &opts).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..200u64 {
        pool.read(Target::Volume(v.id), i << 20, &mut buf).unwrap();
        assert!(buf == chunk);
        assert!(pool.cached_nodes().unwrap() <= 64);
    }
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean());
    assert!(
        rep.volume_nodes > 300,
        "{} nodes: the test needs more nodes than the cache holds",
        rep.volume_nodes
    );
}

#[test]
fn concurrent_flushes_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let dev = FileDev::create(&path, 256 << 20).unwrap();
    Pool::format(&dev, &FormatOptions::default()).unwrap();
    let pool = Arc::new(Pool::open(Arc::new(dev), &OpenOptions::default()).unwrap());
    let gen0 = pool.space().unwrap().generation;
    let threads = 8u64;
    let rounds = 40u64;
    let vols: Vec<u64> = (0..threads)
        .map(|t| {
            pool.create_volume(&format!("v{t}"), 16 << 20, 4096)
                .unwrap()
                .id
        })
        .collect();
    let hs: Vec<_> = vols
        .into_iter()
        .map(|vid| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for r in 0..rounds {
                    pool.write(vid, r * 4096, &[r as u8 + 1; 4096]).unwrap();
                    pool.flush().unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let commits = pool.space().unwrap().generation - gen0;
    let flushes = threads * rounds;
    eprintln!("{flushes} flushes took {commits} commits");
    assert!(
        commits < flushes,
        "no flush shared a commit ({commits} commits for {flushes} flushes)"
    );
    assert!(pool.fsck().unwrap().is_clean());
}

/// Readers of a snapshot and of the live volume race writers and commits
/// (which free and reuse blocks) with a tiny node cache: every read returns a
/// state that existed, never a mix of freed and reused blocks.
#[test]
fn readers_race_writers_and_commits() {
    let dev = Arc::new(MemDev::new(256 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: 8 }).unwrap();
    let pool = Arc::new(
        Pool::open(
            dev,
            &OpenOptions {
                cache_nodes: 16,
                dirty_limit: 64,
                key: None,
            },
        )
        .unwrap(),
    );
    let bs = 4096usize;
    let nblocks = 2048u64;
    let v = pool
        .create_volume("v", nblocks * bs as u64, bs as u32)
        .unwrap();
    // Each block holds its version byte everywhere; version 1 initially.
    let mut all = Vec::with_capacity(nblocks as usize * bs);
    for _ in 0..nblocks {
        all.extend_from_slice(&[1u8; 4096]);
    }
    pool.write(v.id, 0, &all).unwrap();
    let snap = pool
        .create_snapshot("v", "base", serde_json::Value::Null)
        .unwrap();
    pool.flush().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for w in 0..2u64 {
        let (pool, stop) = (pool.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut x = 0x9e37_79b9u64 + w;
            let mut ver = 2u8;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x % nblocks;
                let n = 1 + (x >> 20) % 8;
                let n = n.min(nblocks - b);
                pool.write(v.id, b * 4096, &vec![ver; n as usize * 4096])
                    .unwrap();
                ver = if ver == 255 { 2 } else { ver + 1 };
                if x.is_multiple_of(5) {
                    pool.flush().unwrap();
                }
            }
        }));
    }
    for r in 0..2u64 {
        let (pool, stop, reads) = (pool.clone(), stop.clone(), reads.clone());
        hs.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 4096];
            let mut x = 77 + r;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (x >> 33) % (nblocks - 64);
                pool.read(Target::Snapshot(snap.id), b * 4096, &mut buf)
                    .unwrap();
                assert!(buf.iter().all(|&c| c == 1), "snapshot read saw later data");
                pool.read(Target::Volume(v.id), b * 4096, &mut buf).unwrap();
                for blk in buf.chunks(4096) {
                    assert!(
                        blk.iter().all(|&c| c == blk[0]) && blk[0] != 0,
                        "torn or stale block"
                    );
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Enough reads raced enough commits.
    wait_until("200 reads and 10 commits", || {
        reads.load(Ordering::Relaxed) >= 200 && pool.commit_stats().unwrap().0 >= 10
    });
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    pool.flush().unwrap();
    assert!(pool.fsck().unwrap().is_clean());
}

/// A live scrub reads committed trees without the pool lock while writers
/// overwrite, snapshots are deleted and commits free blocks: the pin keeps
/// every block it may read from being reused, so it finds no false errors.
/// (Without the pin, freed extents are reallocated under it within a few
/// commits and their old checksums no longer match.)
#[test]
fn live_scrub_is_not_fooled_by_reuse() {
    // A pool barely twice the volume: the rewrites must reuse freed blocks.
    let dev = Arc::new(MemDev::new(72 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = Arc::new(Pool::open(dev, &OpenOptions::default()).unwrap());
    let v = pool.create_volume("v", 32 << 20, 4096).unwrap();
    let a = vec![0xa5u8; 32 << 20];
    pool.write(v.id, 0, &a).unwrap();
    let s = pool
        .create_snapshot("v", "old", serde_json::json!({}))
        .unwrap();
    pool.flush().unwrap();
    // The blocks the scrub will read and the writer frees.
    let old: std::collections::HashSet<u64> = pool
        .physical_map(Target::Snapshot(s.id))
        .unwrap()
        .extents
        .iter()
        .map(|e| e.1)
        .collect();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let p2 = pool.clone();
    let calls = Arc::new(AtomicU64::new(0));
    let c2 = calls.clone();
    let scrub = std::thread::spawn(move || {
        p2.scrub_with(&|done, total| {
            assert!(done <= total);
            if c2.fetch_add(1, Ordering::SeqCst) == 0 {
                // Hold the scrub at its start (pinned) until the writer has
                // freed the old blocks and committed many times.
                started_tx.send(()).unwrap();
                go_rx
                    .recv_timeout(std::time::Duration::from_secs(600))
                    .expect("the writer finishes");
            }
        })
        .unwrap()
    });
    started_rx
        .recv_timeout(std::time::Duration::from_secs(600))
        .expect("the scrub starts");
    // Free the snapshot's and the volume's old blocks, commit many times,
    // and write new data that would land on them.
    pool.delete_snapshot(s.id).unwrap();
    // With the pin the freed space is held back, so the writer meets ENOSPC
    // before reuse would happen; that is the price of the pin.
    let mut written = 0;
    for i in 0..16u8 {
        let b = vec![i + 1; 4 << 20];
        match pool.write(v.id, ((i % 8) as u64) << 22, &b) {
            Ok(()) => pool.flush().unwrap(),
            Err(cdmfs::Error::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
        written += 1;
    }
    // The writer freed old blocks and committed past the reuse delay, but
    // nothing it wrote while the scrub was pinned landed on them.
    assert!(written >= 3, "only {written} rewrites before ENOSPC");
    let during = pool.physical_map(Target::Volume(v.id)).unwrap().extents;
    let rewritten: Vec<&(u64, u64, u32)> = during
        .iter()
        .filter(|e| e.0 < (written.min(8) as u64) << 22)
        .collect();
    assert!(!rewritten.is_empty());
    let reused: Vec<_> = rewritten.iter().filter(|e| old.contains(&e.1)).collect();
    assert!(
        reused.is_empty(),
        "{} blocks the pinned scrub may read were reused, e.g. {:?}",
        reused.len(),
        reused.first()
    );
    go_tx.send(()).unwrap();
    let rep = scrub.join().unwrap();
    assert!(
        rep.errors.is_empty(),
        "false scrub errors: {:?}",
        &rep.errors[..rep.errors.len().min(3)]
    );
    assert!(rep.extents_checked >= 8192, "{rep:?}");
    assert!(calls.load(Ordering::SeqCst) > 2);
    // After the scrub, the held-back frees are released at the next commits
    // and the writes land on them: without the pin they would have been
    // reused under the scrub.
    for i in 0..4u64 {
        pool.write(v.id, i * 4096, &[1u8; 4096]).unwrap();
        pool.flush().unwrap();
    }
    pool.write(v.id, 0, &vec![9u8; 16 << 20]).unwrap();
    pool.flush().unwrap();
    let after = pool.physical_map(Target::Volume(v.id)).unwrap().extents;
    let reused_after = after.iter().filter(|e| old.contains(&e.1)).count();
    assert!(
        reused_after > 1000,
        "only {reused_after} freed blocks were reused after the scrub"
    );
    assert!(pool.fsck().unwrap().is_clean());
    assert!(pool.scrub().unwrap().errors.is_empty());
}

#[test]
fn promote_and_catalog() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = Pool::open(dev.clone(), &OpenOptions::default()).unwrap();
    pool.create_volume("v", 1 << 20, 4096).unwrap();
    pool.write(pool.volume_id("v").unwrap(), 0, &[7u8; 8192])
        .unwrap();
    let s = pool
        .create_snapshot_at("v", "t", serde_json::json!({}), 42_000_000_000)
        .unwrap();
    assert_eq!(s.created_ns, 42_000_000_000);
    let c = pool.clone_snapshot(s.id, "c").unwrap();
    assert_eq!(c.origin, Some(s.id));
    assert!(pool.promote_clone("v").is_err(), "not a clone");
    let (vols, snaps) = pool.catalog().unwrap();
    assert_eq!(vols.len(), 2);
    assert_eq!(snaps.len(), 1);
    assert_eq!(
        vols.iter().find(|b| b.name == "c").unwrap().origin,
        Some(s.id)
    );
    assert_eq!(pool.promote_clone("c").unwrap().origin, None);
    pool.delete_snapshot(s.id).unwrap();
    pool.close().unwrap();
    let pool = Pool::open(dev, &OpenOptions::default()).unwrap();
    assert_eq!(
        pool.volume("c").unwrap().origin,
        None,
        "promotion is durable"
    );
    let mut b = vec![0u8; 8192];
    pool.read(Target::Volume(pool.volume_id("c").unwrap()), 0, &mut b)
        .unwrap();
    assert!(b.iter().all(|&x| x == 7));
    assert!(pool.fsck().unwrap().is_clean());
}

/// A device whose syncs take a while, widening the window in which a flush
/// commit writes and syncs without the pool lock.
struct SlowSync(MemDev);

impl cdmfs::BlockDev for SlowSync {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        // Land node writes late too, so readers would see stale blocks.
        std::thread::sleep(std::time::Duration::from_micros(200));
        self.0.write_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(3));
        self.0.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
}

/// Flush commits write and sync without the pool lock: readers, writers and
/// snapshots go on meanwhile, through a node cache far smaller than the
/// trees, so nodes of a commit in flight are evicted before they reach the
/// device and must be served from memory. Every read must match.
#[test]
fn io_goes_on_while_a_commit_syncs() {
    let dev = Arc::new(SlowSync(MemDev::new(256 << 20)));
    Pool::format(&dev.0, &FormatOptions { max_fanout: 8 }).unwrap();
    let opts = OpenOptions {
        cache_nodes: 16,
        dirty_limit: 4096,
        key: None,
    };
    let pool = Arc::new(Pool::open(dev.clone(), &opts).unwrap());
    let v = pool.create_volume("v", 16 << 20, 4096).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // Writers: each owns a stripe of blocks; the block's first byte says
    // which round wrote it, the rest is that byte repeated.
    for w in 0..2u64 {
        let (p, stop) = (pool.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut round = 1u8;
            while !stop.load(Ordering::SeqCst) {
                for b in (w..4096).step_by(2) {
                    p.write(v.id, b * 4096, &[round; 4096]).unwrap();
                }
                round = round.wrapping_add(1).max(1);
            }
        }));
    }
    // A flusher and a snapshotter.
    {
        let (p, stop) = (pool.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                p.flush().unwrap();
                if n % 4 == 0 {
                    p.create_snapshot("v", "s", serde_json::json!({})).unwrap();
                }
                n += 1;
            }
        }));
    }
    // Readers: every 4 KiB block is uniform.
    let reads = Arc::new(AtomicU64::new(0));
    for _ in 0..2 {
        let (p, stop, reads) = (pool.clone(), stop.clone(), reads.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = (i * 7919 % 256) * (64 << 10);
                p.read(Target::Volume(v.id), off, &mut buf).unwrap();
                for c in buf.chunks(4096) {
                    assert!(c.iter().all(|&x| x == c[0]), "torn block at {off}");
                }
                i += 1;
                reads.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Run until commits, snapshots and reads have overlapped many times.
    wait_until("30 commits, 5 snapshots and 100 reads", || {
        pool.commit_stats().unwrap().0 >= 30
            && pool.list_snapshots(Some("v")).unwrap().len() >= 5
            && reads.load(Ordering::SeqCst) >= 100
    });
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    pool.flush().unwrap();
    let snaps = pool.list_snapshots(Some("v")).unwrap();
    for s in snaps.iter().rev().take(3) {
        let mut b = vec![0u8; 4096];
        pool.read(Target::Snapshot(s.id), 0, &mut b).unwrap();
    }
    assert!(pool.fsck().unwrap().is_clean());
    assert!(pool.scrub().unwrap().errors.is_empty());
    drop(pool);
    let pool = Pool::open(dev, &opts).unwrap();
    assert!(pool.fsck().unwrap().is_clean());
}

/// Writers on their own regions with their own flushes, commits forced
/// often by a small dirty limit, then the process "dies" (the pool is
/// dropped, not closed): reopening replays the intent log over the last
/// commit and every flushed write reads back. Replaying a record allocates
/// tree nodes, which must not land on data a later record names (they did
/// before the replay claimed the whole chain first).
#[test]
fn flushed_writes_of_concurrent_writers_survive_a_dropped_pool() {
    #[path = "common/mod.rs"]
    mod common;
    use common::{stamped, vol_tag};
    const REGION: u64 = 15 << 20;
    for round in 0..8u64 {
        let dev = Arc::new(MemDev::new(256 << 20));
        Pool::format(&*dev, &FormatOptions::default()).unwrap();
        let opts = OpenOptions {
            dirty_limit: 64,
            ..OpenOptions::default()
        };
        let pool = Arc::new(Pool::open(dev.clone(), &opts).unwrap());
        let v = pool.create_volume("db", 4 * REGION, 65536).unwrap();
        pool.flush().unwrap();
        let tag = vol_tag("db");
        let mut hs = Vec::new();
        for t in 0..4u64 {
            let p = pool.clone();
            hs.push(std::thread::spawn(move || {
                let base = t * REGION;
                let mut model = vec![0u8; REGION as usize];
                let mut x = round * 7919 + t * 104_729 + 1;
                for gen in 1..=300u64 {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let len = if gen % 3 == 0 {
                        4096 * (1 + (x >> 60))
                    } else {
                        (x >> 8) % (1 << 20) + 1
                    };
                    let off = (x >> 24) % (REGION - len);
                    let d = stamped(tag, round * 1000 + gen, base + off, len as usize, true);
                    p.write(v.id, base + off, &d).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                    if gen % 7 == 0 {
                        p.flush().unwrap();
                    }
                }
                p.flush().unwrap();
                model
            }));
        }
        let models: Vec<Vec<u8>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let (records, _) = pool.log_stats();
        assert!(records > 0, "the flushes wrote no intent-log records");
        drop(pool);
        let pool = reopen_and_check(&dev, round, v.id, &models);
        assert!(pool.log_stats().1 > 0, "round {round}: nothing replayed");
    }
}

/// Reopens a dropped pool (replaying its intent log) and checks that each
/// writer's region of volume `vol` holds its model, and fsck is clean.
fn reopen_and_check(dev: &Arc<MemDev>, round: u64, vol: u64, models: &[Vec<u8>]) -> Pool {
    let pool = Pool::open(dev.clone(), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("round {round}: reopen: {e}"));
    let mut at = 0u64;
    for (t, m) in models.iter().enumerate() {
        let mut got = vec![0u8; m.len()];
        pool.read(Target::Volume(vol), at, &mut got).unwrap();
        assert!(got == *m, "round {round}: writer {t}'s region differs");
        at += m.len() as u64;
    }
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "round {round}: {:?}", rep.errors);
    pool
}

/// Dedup writers sharing a few block contents: hits on one writer's
/// blocks while another overwrites them drop and take references of the
/// same objects concurrently. After the pool is dropped (not closed), the
/// replayed intent log must redo those counts in the order they changed
/// (a hit's reference logged with its mapping rather than when taken made
/// the reopen fail with "referenced but has no refcount").
#[test]
fn concurrent_dedup_hits_and_overwrites_replay_in_order() {
    use cdmfs::DataPolicy;
    const REGION: u64 = 1 << 20;
    const BS: u64 = 65536;
    let contents: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i + 1; BS as usize]).collect();
    for round in 0..30u64 {
        let dev = Arc::new(MemDev::new(128 << 20));
        Pool::format(&*dev, &FormatOptions::default()).unwrap();
        let pool = Arc::new(Pool::open(dev.clone(), &OpenOptions::default()).unwrap());
        let policy = DataPolicy {
            dedup: true,
            ..DataPolicy::default()
        };
        let v = pool
            .create_volume_with("dd", 8 * REGION, BS as u32, policy)
            .unwrap();
        pool.flush().unwrap();
        let mut hs = Vec::new();
        for t in 0..8u64 {
            let (p, contents) = (pool.clone(), contents.clone());
            hs.push(std::thread::spawn(move || {
                let mut model = vec![0u8; REGION as usize];
                let mut x = round * 31 + t * 7 + 1;
                for i in 0..300u64 {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let b = (x >> 33) % (REGION / BS);
                    let c = &contents[((x >> 20) % contents.len() as u64) as usize];
                    p.write(v.id, t * REGION + b * BS, c).unwrap();
                    model[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(c);
                    if i % 9 == 0 {
                        p.flush().unwrap();
                    }
                }
                p.flush().unwrap();
                model
            }));
        }
        let models: Vec<Vec<u8>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        drop(pool);
        reopen_and_check(&dev, round, v.id, &models);
    }
}

//! Preallocated pool files and growing an open pool: the new space is
//! usable at once, durable with the next flush, and a crash before that
//! flush reopens the pool at its old size, consistent.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use cdmfs::{BlockDev, Error, FileDev, FormatOptions, MemDev, OpenOptions, Pool, Target};

const MIB: u64 = 1 << 20;
/// Volume block size of these tests.
const BS: u32 = 65536;

fn make(path: &Path, size: u64, prealloc: bool) -> Pool {
    let dev = if prealloc {
        FileDev::create_preallocated(path, size).unwrap()
    } else {
        FileDev::create(path, size).unwrap()
    };
    Pool::format(&dev, &FormatOptions::default()).unwrap();
    Pool::open(Arc::new(dev), &OpenOptions::default()).unwrap()
}

fn reopen(path: &Path) -> Pool {
    let dev = FileDev::open(path).unwrap();
    Pool::open(Arc::new(dev), &OpenOptions::default()).unwrap()
}

/// Distinct incompressible bytes per block (compression and dedup would
/// let the pool hold more than its size).
fn block(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..BS as usize)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes blocks `from..to`.
fn write_blocks(pool: &Pool, vol: u64, from: u64, to: u64) {
    for i in from..to {
        pool.write(vol, i * BS as u64, &block(i))
            .unwrap_or_else(|e| panic!("write of block {i}: {e}"));
    }
}

fn check_blocks(pool: &Pool, vol: u64, n: u64) {
    let mut b = vec![0u8; BS as usize];
    for i in 0..n {
        pool.read(Target::Volume(vol), i * BS as u64, &mut b)
            .unwrap();
        assert!(b == block(i), "block {i} differs");
    }
}

fn fsck_clean(pool: &Pool) {
    let r = pool.fsck().unwrap();
    assert!(r.is_clean(), "fsck: {r:?}");
}

#[test]
fn preallocated_file_has_its_blocks_and_grows_preallocated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let dev = FileDev::create_preallocated(&path, 8 * MIB).unwrap();
    assert!(dev.preallocated());
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 8 * MIB);
    assert!(meta.blocks() * 512 >= 8 * MIB, "{} blocks", meta.blocks());
    dev.grow(24 * MIB).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 24 * MIB);
    assert!(cdmfs::fully_allocated(&meta), "{} blocks", meta.blocks());
    drop(dev);
    // Found fully allocated at open: still grows preallocated.
    assert!(FileDev::open(&path).unwrap().preallocated());

    let sparse = dir.path().join("sparse");
    let dev = FileDev::create(&sparse, 8 * MIB).unwrap();
    assert!(!dev.preallocated());
    dev.grow(16 * MIB).unwrap();
    let meta = std::fs::metadata(&sparse).unwrap();
    assert_eq!(meta.len(), 16 * MIB);
    assert!(!cdmfs::fully_allocated(&meta));
}

#[test]
fn preallocation_beyond_the_free_space_is_refused_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    // More than any test machine's filesystem has.
    let e = FileDev::create_preallocated(&path, 1 << 58)
        .err()
        .expect("a 256 PiB preallocation succeeded");
    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("cannot preallocate 256.0 PiB"), "{msg}");
    assert!(msg.contains("free"), "{msg}");
    assert!(!path.exists(), "the refused pool file was left behind");

    // A refused growth leaves the file as it was.
    let dev = FileDev::create_preallocated(&path, 4 * MIB).unwrap();
    let e = dev.grow(1 << 58).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * MIB);
}

#[test]
fn grow_refuses_shrink_and_unaligned_sizes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = make(&path, 8 * MIB, true);
    let before = pool.space().unwrap();
    for bad in [4 * MIB, 8 * MIB - 4096, 8 * MIB + 512, 1 << 60] {
        match pool.grow(bad) {
            Err(Error::Invalid(m)) => assert!(!m.is_empty()),
            other => panic!("grow({bad}) answered {other:?}"),
        }
    }
    // Same size: nothing to do.
    assert_eq!(pool.grow(8 * MIB).unwrap().total_bytes, 8 * MIB);
    assert_eq!(pool.space().unwrap().total_bytes, before.total_bytes);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
}

#[test]
fn a_device_that_cannot_grow_leaves_the_pool_unchanged_and_working() {
    let dev = Arc::new(MemDev::new(8 * MIB as usize));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = Pool::open(dev, &OpenOptions::default()).unwrap();
    let v = pool.create_volume("v", 4 * MIB, BS).unwrap().id;
    match pool.grow(16 * MIB) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::Unsupported),
        other => panic!("grow of a fixed device answered {other:?}"),
    }
    assert_eq!(pool.space().unwrap().total_bytes, 8 * MIB);
    pool.write(v, 0, &block(0)).unwrap();
    pool.flush().unwrap();
    check_blocks(&pool, v, 1);
    fsck_clean(&pool);
}

/// Blocks written before a growth (1 MiB; the pool is 4 MiB), and the
/// end of those written after it (6 MiB: more than the old pool holds).
const BEFORE: u64 = 16;
const AFTER: u64 = 96;

#[test]
fn grown_space_is_used_at_once_and_durable_after_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = make(&path, 4 * MIB, true);
    let v = pool.create_volume("v", 64 * MIB, BS).unwrap().id;
    write_blocks(&pool, v, 0, BEFORE);
    pool.flush().unwrap();
    let grown = pool.grow(32 * MIB).unwrap();
    assert_eq!(grown.total_bytes, 32 * MIB);
    assert!(grown.free_bytes >= 27 * MIB, "{grown:?}");
    // More than the old size could hold.
    write_blocks(&pool, v, BEFORE, AFTER);
    pool.flush().unwrap();
    drop(pool);

    let pool = reopen(&path);
    assert_eq!(pool.space().unwrap().total_bytes, 32 * MIB);
    check_blocks(&pool, v, AFTER);
    fsck_clean(&pool);
    // And the rest of it is usable after the reopen.
    write_blocks(&pool, v, AFTER, 400);
    pool.flush().unwrap();
    check_blocks(&pool, v, 400);
    fsck_clean(&pool);
}

#[test]
fn a_growth_alone_is_committed_by_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = make(&path, 4 * MIB, false);
    pool.flush().unwrap();
    let g = pool.space().unwrap().generation;
    pool.grow(12 * MIB).unwrap();
    pool.flush().unwrap();
    assert!(
        pool.space().unwrap().generation > g,
        "the flush did not commit"
    );
    drop(pool);
    let pool = reopen(&path);
    assert_eq!(pool.space().unwrap().total_bytes, 12 * MIB);
    fsck_clean(&pool);
}

#[test]
fn a_crash_between_growth_and_commit_reopens_at_the_old_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = make(&path, 4 * MIB, true);
    let v = pool.create_volume("v", 64 * MIB, BS).unwrap().id;
    write_blocks(&pool, v, 0, BEFORE);
    pool.flush().unwrap();
    pool.grow(32 * MIB).unwrap();
    // Written into the new space, never flushed: then the power goes.
    write_blocks(&pool, v, BEFORE, AFTER);
    drop(pool);
    // The device is longer than the superblock says: that is fine.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 32 * MIB);

    let pool = reopen(&path);
    assert_eq!(pool.space().unwrap().total_bytes, 4 * MIB);
    check_blocks(&pool, v, BEFORE);
    fsck_clean(&pool);
    // The growth can be made again, and holds this time.
    assert_eq!(pool.grow(32 * MIB).unwrap().total_bytes, 32 * MIB);
    write_blocks(&pool, v, BEFORE, AFTER);
    pool.flush().unwrap();
    drop(pool);
    let pool = reopen(&path);
    assert_eq!(pool.space().unwrap().total_bytes, 32 * MIB);
    check_blocks(&pool, v, AFTER);
    fsck_clean(&pool);
}

/// Growths while writers flush (commits in flight between their phases):
/// every growth is kept — a commit that started before a growth must not
/// publish the old size over it — and the data and the pool stay sound.
#[test]
fn growths_during_concurrent_commits_all_hold() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let pool = Arc::new(make(&path, 16 * MIB, true));
    let vols: Vec<u64> = (0..2)
        .map(|i| {
            pool.create_volume(&format!("v{i}"), 4 * MIB, BS)
                .unwrap()
                .id
        })
        .collect();
    pool.flush().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Each writer rewrites its 1 MiB and flushes, over and over; it
    // returns how many rounds it made (the content names the last one).
    let writers: Vec<_> = vols
        .iter()
        .map(|&v| {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) || round < 4 {
                    round += 1;
                    for b in 0..16u64 {
                        pool.write(v, b * BS as u64, &block(round * 1000 + b))
                            .unwrap();
                    }
                    pool.flush().unwrap();
                }
                round
            })
        })
        .collect();
    let mut size = 16 * MIB;
    for _ in 0..24 {
        size += 4 * MIB;
        assert_eq!(pool.grow(size).unwrap().total_bytes, size);
        pool.flush().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let rounds: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    pool.flush().unwrap();
    drop(pool);

    let pool = reopen(&path);
    assert_eq!(pool.space().unwrap().total_bytes, size);
    let mut b = vec![0u8; BS as usize];
    for (&v, &round) in vols.iter().zip(&rounds) {
        for i in 0..16u64 {
            pool.read(Target::Volume(v), i * BS as u64, &mut b).unwrap();
            assert!(b == block(round * 1000 + i), "volume {v} block {i}");
        }
    }
    fsck_clean(&pool);
}

/// A pool file whose `sync` can be held (a commit stopped between its
/// phases) and which reports when it has been grown.
struct GateDev {
    inner: FileDev,
    gate: std::sync::Mutex<Gate>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct Gate {
    hold_sync: bool,
    in_sync: bool,
    grown: bool,
}

impl GateDev {
    fn wait_until(&self, what: impl Fn(&Gate) -> bool) {
        let mut g = self.gate.lock().unwrap();
        while !what(&g) {
            g = self.cv.wait(g).unwrap();
        }
    }
    fn set(&self, f: impl FnOnce(&mut Gate)) {
        f(&mut self.gate.lock().unwrap());
        self.cv.notify_all();
    }
}

impl BlockDev for GateDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        let mut g = self.gate.lock().unwrap();
        if g.hold_sync {
            g.in_sync = true;
            self.cv.notify_all();
            while g.hold_sync {
                g = self.cv.wait(g).unwrap();
            }
        }
        drop(g);
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn grow(&self, new_len: u64) -> std::io::Result<()> {
        self.inner.grow(new_len)?;
        self.set(|g| g.grown = true);
        Ok(())
    }
}

/// A growth made while a commit is between its phases (its superblock,
/// with the old size, prepared) is not undone when that commit publishes.
#[test]
fn a_growth_during_a_commit_in_flight_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    make(&path, 8 * MIB, true);
    let dev = Arc::new(GateDev {
        inner: FileDev::open(&path).unwrap(),
        gate: Default::default(),
        cv: Default::default(),
    });
    let pool = Arc::new(Pool::open(dev.clone(), &OpenOptions::default()).unwrap());
    let v = pool.create_volume("v", 4 * MIB, BS).unwrap().id;
    pool.write(v, 0, &block(0)).unwrap();
    dev.set(|g| g.hold_sync = true);
    let committer = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.commit())
    };
    dev.wait_until(|g| g.in_sync);
    let grower = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.grow(24 * MIB))
    };
    // The device is extended; the commit goes on only now.
    dev.wait_until(|g| g.grown);
    dev.set(|g| g.hold_sync = false);
    committer.join().unwrap().unwrap();
    assert_eq!(grower.join().unwrap().unwrap().total_bytes, 24 * MIB);
    pool.flush().unwrap();
    // Both hold the device (and its lock on the file).
    drop(pool);
    drop(dev);
    let pool = reopen(&path);
    assert_eq!(pool.space().unwrap().total_bytes, 24 * MIB);
    check_blocks(&pool, v, 1);
    fsck_clean(&pool);
}

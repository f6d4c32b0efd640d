//! Device faults and a full pool: a commit that cannot reach the device
//! stalls the pool (reads go on, writes and catalog changes are refused)
//! and is retried until it gets through, with nothing acknowledged lost;
//! a pool whose allocator is full still commits, snapshots and deletes.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cdmfs::{
    BlockDev, Error, FaultDev, FormatOptions, MemDev, OpenOptions, Pool, PoolState, Target, FAULTS,
};

const MIB: u64 = 1 << 20;

fn set(dir: &Path, fault: &str, on: bool) {
    assert!(FAULTS.contains(&fault), "{fault} is not a fault name");
    let p = dir.join(fault);
    if on {
        std::fs::write(p, b"").unwrap();
    } else {
        std::fs::remove_file(p).unwrap();
    }
}

fn fill(byte: u8, len: u64) -> Vec<u8> {
    vec![byte; len as usize]
}

fn read(pool: &Pool, t: Target, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    pool.read(t, off, &mut b).unwrap();
    b
}

/// A pool on a memory device behind a fault device.
fn faulty_pool(mem: &Arc<MemDev>, dir: &Path) -> Pool {
    let dev = Arc::new(FaultDev::new(mem.clone(), dir));
    Pool::open(dev, &OpenOptions::default()).unwrap()
}

fn reopened(image: Vec<u8>) -> Pool {
    Pool::open(Arc::new(MemDev::from_image(image)), &OpenOptions::default()).unwrap()
}

/// Runs the stall-and-recover cycle with one fault; returns the error a
/// refused write got.
fn stall_and_recover(fault: &str) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*mem, &FormatOptions::default()).unwrap();
    let pool = faulty_pool(&mem, dir.path());
    let v = pool.create_volume("db", 8 * MIB, 65536).unwrap();
    pool.write(v.id, 0, &fill(0xa1, MIB)).unwrap();
    pool.flush().unwrap();
    let durable = mem.image();
    // Applied, not yet durable, when the device starts failing.
    pool.write(v.id, MIB, &fill(0xb2, MIB)).unwrap();
    pool.write(v.id, 4096, &fill(0xb3, 8192)).unwrap();
    set(dir.path(), fault, true);
    let e = pool
        .flush()
        .expect_err("flush must fail while the device fails");
    let h = pool.health().unwrap();
    assert_ne!(h.state, PoolState::Ok, "{fault}: {h:?}");
    assert!(h.message.is_some() && h.since_unix.is_some(), "{h:?}");
    // Reads go on, from what was applied.
    assert!(
        read(&pool, Target::Volume(v.id), MIB, MIB) == fill(0xb2, MIB),
        "line {}: wrong data",
        line!()
    );
    assert!(
        read(&pool, Target::Volume(v.id), 4096, 8192) == fill(0xb3, 8192),
        "line {}: wrong data",
        line!()
    );
    // Writes and catalog changes are refused (they could not be made durable).
    let refused = pool.write(v.id, 2 * MIB, &fill(0xc4, 4096)).unwrap_err();
    assert_eq!(refused.errno(), e.errno(), "{refused} vs {e}");
    assert!(pool
        .create_snapshot("db", "s", serde_json::Value::Null)
        .is_err());
    assert!(pool.delete_volume("db", true).is_err());
    // Retries fail while the fault lasts, and are counted.
    assert!(pool.flush().is_err());
    assert!(pool.commit().is_err());
    assert!(pool.health().unwrap().commit_retries >= 2);
    // A crash now: the device holds the last good commit.
    let crashed = reopened(mem.image());
    // (The unflushed writes may be there too, if a log record got out.)
    assert!(
        read(&crashed, Target::Volume(v.id), 65536, MIB - 65536) == fill(0xa1, MIB - 65536),
        "line {}: wrong data",
        line!()
    );
    assert!(crashed.fsck().unwrap().is_clean());
    drop(crashed);
    let _ = durable;
    // The device recovers: the next flush commits, everything is back.
    set(dir.path(), fault, false);
    pool.flush().unwrap();
    assert_eq!(pool.health().unwrap().state, PoolState::Ok);
    pool.write(v.id, 2 * MIB, &fill(0xc4, 4096)).unwrap();
    let s = pool
        .create_snapshot("db", "after", serde_json::Value::Null)
        .unwrap();
    pool.flush().unwrap();
    // Dropped without a close: what was flushed is there after a reopen.
    drop(pool);
    let again = reopened(mem.image());
    let t = Target::Volume(v.id);
    let mut want = fill(0xa1, MIB);
    want[4096..4096 + 8192].copy_from_slice(&fill(0xb3, 8192));
    assert!(
        read(&again, t, 0, MIB) == want,
        "line {}: wrong data",
        line!()
    );
    assert!(
        read(&again, t, MIB, MIB) == fill(0xb2, MIB),
        "line {}: wrong data",
        line!()
    );
    assert!(
        read(&again, t, 2 * MIB, 4096) == fill(0xc4, 4096),
        "line {}: wrong data",
        line!()
    );
    assert!(
        read(&again, Target::Snapshot(s.id), MIB, MIB) == fill(0xb2, MIB),
        "line {}: wrong data",
        line!()
    );
    let rep = again.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
    refused
}

#[test]
fn no_space_on_the_device_stalls_commits_until_space_returns() {
    let e = stall_and_recover("pool-enospc");
    assert!(matches!(e, Error::NoSpace), "{e}");
}

#[test]
fn short_writes_stall_commits_until_space_returns() {
    let e = stall_and_recover("pool-short-write");
    assert!(matches!(e, Error::NoSpace), "{e}");
}

#[test]
fn failing_writes_stall_commits_until_the_device_recovers() {
    let e = stall_and_recover("pool-eio-write");
    assert_eq!(e.errno(), libc::EIO, "{e}");
}

/// Commits keep failing while new changes pile up behind the stalled one:
/// each retry folds them in, and the one that gets through carries all.
#[test]
fn changes_made_between_failed_retries_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*mem, &FormatOptions::default()).unwrap();
    let pool = faulty_pool(&mem, dir.path());
    let v = pool.create_volume("v", 4 * MIB, 4096).unwrap();
    for round in 0..5u8 {
        pool.write(v.id, round as u64 * 65536, &fill(round + 1, 65536))
            .unwrap();
        set(dir.path(), "pool-eio-write", true);
        assert!(pool.flush().is_err());
        set(dir.path(), "pool-eio-write", false);
        // One retry succeeds; the next round stalls again.
        pool.flush().unwrap();
        pool.create_snapshot("v", &format!("r{round}"), serde_json::Value::Null)
            .unwrap();
    }
    pool.flush().unwrap();
    drop(pool);
    let again = reopened(mem.image());
    for round in 0..5u8 {
        assert!(
            read(&again, Target::Volume(v.id), round as u64 * 65536, 65536)
                == fill(round + 1, 65536),
            "line {}: wrong data",
            line!()
        );
    }
    assert_eq!(again.list_snapshots(Some("v")).unwrap().len(), 5);
    assert!(again.fsck().unwrap().is_clean());
}

/// A flush that logs (no commit) fails when its record cannot be written:
/// the pool commits instead, and once the device is back the writes are
/// durable through that commit.
#[test]
fn a_log_record_that_cannot_be_written_falls_back_to_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*mem, &FormatOptions::default()).unwrap();
    let pool = faulty_pool(&mem, dir.path());
    let v = pool.create_volume("v", 4 * MIB, 65536).unwrap();
    pool.flush().unwrap();
    pool.write(v.id, 8192, &fill(7, 8192)).unwrap();
    pool.flush().unwrap();
    let (records, _) = pool.log_stats();
    assert!(records >= 1, "the flush should have logged");
    pool.write(v.id, 3 * 8192, &fill(8, 8192)).unwrap();
    set(dir.path(), "pool-eio-write", true);
    assert!(pool.flush().is_err());
    set(dir.path(), "pool-eio-write", false);
    pool.flush().unwrap();
    pool.write(v.id, 5 * 8192, &fill(9, 8192)).unwrap();
    pool.flush().unwrap();
    drop(pool);
    let again = reopened(mem.image());
    let t = Target::Volume(v.id);
    assert!(
        read(&again, t, 8192, 8192) == fill(7, 8192),
        "line {}: wrong data",
        line!()
    );
    assert!(
        read(&again, t, 3 * 8192, 8192) == fill(8, 8192),
        "line {}: wrong data",
        line!()
    );
    assert!(
        read(&again, t, 5 * 8192, 8192) == fill(9, 8192),
        "line {}: wrong data",
        line!()
    );
    assert!(again.fsck().unwrap().is_clean());
}

/// A pool opened on a device that refuses writes, with intent-log records
/// to replay: it opens, serves what the log holds, and commits later.
#[test]
fn a_pool_whose_replay_cannot_commit_opens_for_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*mem, &FormatOptions::default()).unwrap();
    let pool = faulty_pool(&mem, dir.path());
    let v = pool.create_volume("v", 4 * MIB, 65536).unwrap();
    pool.flush().unwrap();
    pool.write(v.id, 0, &fill(5, 16384)).unwrap();
    pool.flush().unwrap();
    assert!(pool.log_stats().0 >= 1);
    drop(pool); // no commit: the write is only in the log
    set(dir.path(), "pool-enospc", true);
    let pool = faulty_pool(&mem, dir.path());
    assert_eq!(pool.health().unwrap().state, PoolState::NoSpace);
    assert!(
        read(&pool, Target::Volume(v.id), 0, 16384) == fill(5, 16384),
        "line {}: wrong data",
        line!()
    );
    set(dir.path(), "pool-enospc", false);
    pool.flush().unwrap();
    assert_eq!(pool.health().unwrap().state, PoolState::Ok);
    pool.close().unwrap();
    let again = reopened(mem.image());
    assert!(
        read(&again, Target::Volume(v.id), 0, 16384) == fill(5, 16384),
        "line {}: wrong data",
        line!()
    );
    assert!(again.fsck().unwrap().is_clean());
}

/// A pool whose own space runs out: data writes get NoSpace at the
/// reserve, while commits, snapshots and deletes still work, and deleting
/// makes room again.
#[test]
fn a_full_pool_still_commits_snapshots_and_deletes() {
    let mem = Arc::new(MemDev::new(48 << 20));
    Pool::format(&*mem, &FormatOptions::default()).unwrap();
    let pool = Pool::open(mem.clone(), &OpenOptions::default()).unwrap();
    let a = pool.create_volume("a", 64 * MIB, 4096).unwrap();
    let b = pool.create_volume("b", 40 * MIB, 65536).unwrap();
    let mut written = 0u64;
    let err = loop {
        // Distinct data so nothing dedups or compresses away.
        let mut x = written | 1;
        let chunk: Vec<u8> = (0..MIB)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        match pool.write(a.id, written, &chunk) {
            Ok(()) => written += MIB,
            Err(e) => break e,
        }
        assert!(written < 64 * MIB, "the pool never filled");
    };
    assert!(matches!(err, Error::NoSpace), "{err}");
    // Then page by page, until not even 4 KiB of data fits.
    let mut page = 0u64;
    let err = loop {
        let data: Vec<u8> = (0..4096u64)
            .map(|i| (i * 7 + page * 13 + 1) as u8)
            .collect();
        match pool.write(a.id, written + page * 4096, &data) {
            Ok(()) => page += 1,
            Err(e) => break e,
        }
        assert!(page < 4096, "the pool never filled");
    };
    assert!(matches!(err, Error::NoSpace), "{err}");
    let h = pool.health().unwrap();
    assert_eq!(h.state, PoolState::Full, "{h:?}");
    // Metadata still has room: commit, snapshot, clone, small deletes.
    pool.flush().unwrap();
    let s = pool
        .create_snapshot("a", "full", serde_json::Value::Null)
        .unwrap();
    pool.flush().unwrap();
    pool.clone_snapshot(s.id, "c").unwrap();
    pool.flush().unwrap();
    assert!(pool.write(b.id, 0, &fill(1, MIB)).is_err());
    assert!(h.reserve_bytes >= MIB);
    // Deleting the data frees it within a few commits.
    pool.delete_volume("c", false).unwrap();
    pool.delete_snapshot(s.id).unwrap();
    pool.delete_volume("a", true).unwrap();
    for _ in 0..3 {
        pool.commit().unwrap();
    }
    pool.write(b.id, 0, &fill(1, MIB)).unwrap();
    pool.flush().unwrap();
    assert_eq!(pool.health().unwrap().state, PoolState::Ok);
    drop(pool);
    let again = reopened(mem.image());
    assert!(
        read(&again, Target::Volume(b.id), 0, MIB) == fill(1, MIB),
        "line {}: wrong data",
        line!()
    );
    assert!(again.fsck().unwrap().is_clean());
}

/// Reads that fail are errors of that read only; the pool is not stalled
/// and serves the read again when the device does.
#[test]
fn read_errors_fail_the_read_not_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*mem, &FormatOptions::default()).unwrap();
    let pool = faulty_pool(&mem, dir.path());
    let v = pool.create_volume("v", 4 * MIB, 65536).unwrap();
    pool.write(v.id, 0, &fill(3, MIB)).unwrap();
    pool.close().unwrap();
    let pool = faulty_pool(&mem, dir.path());
    set(dir.path(), "pool-eio-read", true);
    let mut b = vec![0u8; 65536];
    let e = pool.read(Target::Volume(v.id), 0, &mut b).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let h = pool.health().unwrap();
    assert_eq!(h.state, PoolState::Ok);
    assert!(h.io_errors.read >= 1 && h.io_errors.last.is_some(), "{h:?}");
    set(dir.path(), "pool-eio-read", false);
    assert!(
        read(&pool, Target::Volume(v.id), 0, MIB) == fill(3, MIB),
        "line {}: wrong data",
        line!()
    );
}

/// A device with a volatile cache whose failed sync drops what it held, as
/// Linux does after a writeback error (the pages are marked clean and the
/// next fsync succeeds).
struct Lossy {
    stable: Arc<MemDev>,
    cache: Mutex<BTreeMap<u64, Vec<u8>>>,
    fail_next_sync: AtomicBool,
}

impl BlockDev for Lossy {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.stable.read_at(buf, off)?;
        for (o, d) in self.cache.lock().unwrap().iter() {
            let (s, e) = (*o, *o + d.len() as u64);
            let (rs, re) = (off, off + buf.len() as u64);
            let (a, b) = (s.max(rs), e.min(re));
            if a < b {
                buf[(a - rs) as usize..(b - rs) as usize]
                    .copy_from_slice(&d[(a - s) as usize..(b - s) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.cache.lock().unwrap().insert(off, buf.to_vec());
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let pending = std::mem::take(&mut *self.cache.lock().unwrap());
        if self.fail_next_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for (o, d) in pending {
            self.stable.write_at(&d, o)?;
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.stable.len()
    }
}

fn lossy_pool() -> (Arc<MemDev>, Arc<Lossy>, Pool, u64) {
    let stable = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*stable, &FormatOptions::default()).unwrap();
    let dev = Arc::new(Lossy {
        stable: stable.clone(),
        cache: Mutex::new(BTreeMap::new()),
        fail_next_sync: AtomicBool::new(false),
    });
    let pool = Pool::open(dev.clone(), &OpenOptions::default()).unwrap();
    let v = pool.create_volume("v", 4 * MIB, 65536).unwrap();
    pool.write(v.id, 0, &fill(0x11, 65536)).unwrap();
    pool.flush().unwrap();
    (stable, dev, pool, v.id)
}

/// After a failed sync the data written since the last good one may be
/// gone: nothing may be acknowledged on top of it. The pool fails, reloads
/// its last durable state from the device at the next flush (no reopen),
/// reads what the device holds and takes writes again.
fn a_failed_sync_is_never_acknowledged(structural: bool) {
    let (stable, dev, pool, vol) = lossy_pool();
    pool.write(vol, 0, &fill(0x5a, 65536)).unwrap();
    if structural {
        // The flush then commits instead of logging.
        pool.create_snapshot("v", "s", serde_json::Value::Null)
            .unwrap();
    }
    dev.fail_next_sync.store(true, Ordering::SeqCst);
    let e = pool.flush().expect_err("a flush whose sync failed");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let h = pool.health().unwrap();
    assert_eq!(h.state, PoolState::IoError, "{h:?}");
    assert!(pool.write(vol, 65536, &fill(1, 4096)).is_err());
    // The next flush reloads from the device, then works.
    pool.flush().unwrap();
    assert_eq!(pool.health().unwrap().state, PoolState::Ok);
    let mut b = vec![0u8; 65536];
    pool.read(Target::Volume(vol), 0, &mut b)
        .expect("what the device holds reads back");
    assert!(b == fill(0x11, 65536), "the unacknowledged write is gone");
    pool.write(vol, 65536, &fill(0x77, 65536)).unwrap();
    pool.flush().unwrap();
    drop(pool);
    let again = reopened(stable.image());
    assert!(
        read(&again, Target::Volume(vol), 0, 65536) == fill(0x11, 65536),
        "line {}",
        line!()
    );
    assert!(
        read(&again, Target::Volume(vol), 65536, 65536) == fill(0x77, 65536),
        "line {}",
        line!()
    );
    let rep = again.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
}

#[test]
fn a_failed_log_sync_is_never_acknowledged_and_the_pool_reloads() {
    a_failed_sync_is_never_acknowledged(false);
}

#[test]
fn a_failed_commit_sync_is_never_acknowledged_and_the_pool_reloads() {
    a_failed_sync_is_never_acknowledged(true);
}

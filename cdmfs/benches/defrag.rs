//! Defragmentation benchmark (scripts/bench-defrag): cold single-stream
//! sequential reads of a 64 KiB-block volume, freshly written, after N
//! rounds of 1% random 64 KiB rewrites with a snapshot each round, and
//! after one defragmentation pass — first with every snapshot kept (the
//! live volume shares everything with the newest one: nothing may move),
//! then after the snapshots expired; a plain file with the same bytes in
//! the same directory is read the same way for scale, and every state is
//! compared with a control volume written once and read beside it. Reports the
//! defragmentation rate and the space it cost.
//!
//! "Cold": the pool is closed and opened again (empty node cache) and the
//! page cache dropped before each read; each figure is the median of three
//! such reads. Environment: BENCH_DIR (default
//! /var/tmp), BENCH_MIB (volume size, default 1024), BENCH_ROUNDS (default
//! 365), BENCH_QUICK=1 for 256 MiB and 50 rounds.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdmfs::{FileDev, FormatOptions, OpenOptions, Pool, Target};

const MIB: u64 = 1 << 20;
const BS: u64 = 65536;
/// Bytes per step, as the appliance's `defrag` job takes them.
const STEP: u64 = 16 * MIB;

fn drop_caches() {
    // SAFETY: sync(2) has no arguments.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len / 8).flat_map(|_| r.next().to_le_bytes()).collect()
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn open(path: &Path) -> Pool {
    let dev = FileDev::open(path).expect("pool file");
    Pool::open(Arc::new(dev), &OpenOptions::default()).expect("open")
}

/// Closes the pool, drops the caches, opens it again and reads a volume
/// sequentially 1 MiB at a time; MB/s and the reopened pool.
fn cold_once(pool: Pool, path: &Path, name: &str, size: u64) -> (f64, Pool) {
    pool.close().expect("close");
    drop_caches();
    let pool = open(path);
    let v = pool.volume(name).expect("volume").id;
    let mut buf = vec![0u8; MIB as usize];
    let s = Instant::now();
    for i in 0..size / MIB {
        pool.read(Target::Volume(v), i * MIB, &mut buf)
            .expect("read");
    }
    (mbps(size, s.elapsed()), pool)
}

/// Cold reads of the volume under test ("v") and of the control ("c",
/// written once and never touched), alternately, three times each: the
/// machine is shared, so each state is judged against the control read
/// beside it, not against a figure taken minutes earlier. Medians.
fn cold_read(mut pool: Pool, path: &Path, size: u64) -> (f64, f64, Pool) {
    let (mut v, mut c) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (x, p) = cold_once(pool, path, "v", size);
        v.push(x);
        let (y, p) = cold_once(p, path, "c", size);
        c.push(y);
        pool = p;
    }
    v.sort_by(f64::total_cmp);
    c.sort_by(f64::total_cmp);
    (v[1], c[1], pool)
}

/// Cold sequential read of a plain file, median of three.
fn plain_read(path: &Path, size: u64) -> f64 {
    let mut runs = Vec::new();
    for _ in 0..3 {
        drop_caches();
        let f = File::open(path).expect("plain file");
        let mut buf = vec![0u8; MIB as usize];
        let s = Instant::now();
        for i in 0..size / MIB {
            f.read_exact_at(&mut buf, i * MIB).expect("plain read");
        }
        runs.push(mbps(size, s.elapsed()));
    }
    runs.sort_by(f64::total_cmp);
    runs[1]
}

/// Used bytes once every deferred free is reusable.
fn settled_used(pool: &Pool) -> u64 {
    for _ in 0..4 {
        pool.commit().expect("commit");
    }
    pool.space().expect("space").used_bytes
}

/// One unthrottled pass: (bytes moved, seconds, runs after).
fn pass(pool: &Pool) -> (u64, f64, u64) {
    let v = pool.volume("v").expect("volume").id;
    let s = Instant::now();
    let (mut next, mut moved) = (0, 0);
    loop {
        let p = pool.defragment_step(v, next, STEP).expect("step");
        moved += p.bytes_moved;
        next = p.next_block;
        if p.done {
            break;
        }
    }
    pool.flush().expect("flush");
    let secs = s.elapsed().as_secs_f64();
    let runs = pool.fragmentation(Target::Volume(v)).expect("figure").runs;
    (moved, secs, runs)
}

fn main() {
    let dir =
        std::path::PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let size = env("BENCH_MIB", if quick { 256 } else { 1024 }) * MIB;
    let rounds = env("BENCH_ROUNDS", if quick { 50 } else { 365 });
    let path = dir.join("bench-defrag.pool");
    let plain = dir.join("bench-defrag.plain");
    let _ = std::fs::remove_file(&path);
    // Every round's rewrites stay (each snapshot keeps them): room for
    // the volume, all rounds and metadata.
    let pool_bytes = 2 * size + size * rounds / 100 * 5 / 4 + 512 * MIB;
    // Preallocated: a sparse pool file would be fragmented by the host
    // filesystem in the order blocks are first written, which is not what
    // is measured here.
    let dev = FileDev::create_preallocated(&path, pool_bytes).expect("pool file");
    Pool::format(&dev, &FormatOptions::default()).expect("format");
    drop(dev);
    let pool = open(&path);
    let v = pool.create_volume("v", size, BS as u32).expect("volume").id;
    let c = pool
        .create_volume("c", size, BS as u32)
        .expect("control")
        .id;
    let f = File::create(&plain).expect("plain file");
    for i in 0..size / MIB {
        let d = pattern(i + 1, MIB as usize);
        pool.write(v, i * MIB, &d).expect("write");
        f.write_all_at(&d, i * MIB).expect("plain write");
    }
    for i in 0..size / MIB {
        pool.write(c, i * MIB, &pattern(i + 1, MIB as usize))
            .expect("write control");
    }
    pool.flush().expect("flush");
    f.sync_all().expect("sync");
    drop(f);

    let plain_mbps = plain_read(&plain, size);
    let _ = std::fs::remove_file(&plain);

    let (fresh, c0, pool) = cold_read(pool, &path, size);
    let mut r = Rng(11);
    let blocks = size / BS;
    let t = Instant::now();
    for round in 0..rounds {
        for _ in 0..blocks / 100 {
            let b = r.next() % blocks;
            pool.write(v, b * BS, &pattern(round << 32 | b, BS as usize))
                .expect("rewrite");
        }
        pool.create_snapshot("v", &format!("s{round}"), serde_json::Value::Null)
            .expect("snapshot");
        pool.flush().expect("flush");
    }
    let aging = t.elapsed().as_secs_f64();
    let runs_aged = pool.fragmentation(Target::Volume(v)).expect("figure").runs;
    let (aged, c1, pool) = cold_read(pool, &path, size);

    // With every snapshot kept: the newest shares the whole volume.
    let used0 = settled_used(&pool);
    let (moved_kept, secs_kept, runs_kept) = pass(&pool);
    let used1 = settled_used(&pool);
    let (after_kept, c2, pool) = cold_read(pool, &path, size);

    // The snapshots expire (retention): the volume owns its blocks alone.
    for s in pool.list_snapshots(Some("v")).expect("snapshots") {
        pool.delete_snapshot(s.id).expect("delete snapshot");
    }
    let used2 = settled_used(&pool);
    let (moved, secs, runs_after) = pass(&pool);
    let used3 = settled_used(&pool);
    let (after, c3, pool) = cold_read(pool, &path, size);
    let clean = pool.fsck().expect("fsck").is_clean();
    pool.close().expect("close");
    let _ = std::fs::remove_file(&path);

    println!(
        "\n### Cold sequential read before and after defragmentation ({} MiB volume, 64 KiB blocks, {rounds} rounds of 1% random 64 KiB rewrites with a snapshot each, {aging:.0} s)\n",
        size / MIB
    );
    println!(
        "| state | runs | MB/s | control MB/s (fresh volume, read beside it) | vs fresh control |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| plain file, same bytes, same directory | – | {plain_mbps:.0} | {c0:.0} | {:.2}× |",
        plain_mbps / c0
    );
    println!(
        "| volume freshly written | – | {fresh:.0} | {c0:.0} | {:.2}× |",
        fresh / c0
    );
    println!(
        "| after {rounds} rounds, {rounds} snapshots | {runs_aged} | {aged:.0} | {c1:.0} | {:.2}× |",
        aged / c1
    );
    println!(
        "| + defragmentation pass, snapshots kept | {runs_kept} | {after_kept:.0} | {c2:.0} | {:.2}× |",
        after_kept / c2
    );
    println!(
        "| + snapshots expired, defragmentation pass | {runs_after} | {after:.0} | {c3:.0} | **{:.2}×** |",
        after / c3
    );
    println!("\n| pass | moved | time | moved MB/s | scanned MB/s | space after − before |");
    println!("|---|---:|---:|---:|---:|---:|");
    let row = |what: &str, moved: u64, secs: f64, before: u64, after: u64| {
        println!(
            "| {what} | {} MiB | {secs:.2} s | {:.0} | {:.0} | {:+} KiB |",
            moved / MIB,
            moved as f64 / 1e6 / secs,
            size as f64 / 1e6 / secs,
            (after as i64 - before as i64) / 1024
        );
    };
    row(
        "snapshots kept (all shared)",
        moved_kept,
        secs_kept,
        used0,
        used1,
    );
    row("snapshots expired (all unique)", moved, secs, used2, used3);
    println!(
        "\nfsck after both passes: {}",
        if clean { "clean" } else { "ERRORS" }
    );
}

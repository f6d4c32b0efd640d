//! Engine benchmark, side by side with peers in one run (scripts/bench-engine).
//!
//! 1. Sequential 1 MiB write+flush and read, 4 KiB random write and read:
//!    the engine vs plain pwrite/pread on a file in the same directory.
//! 2. Snapshot creation with 1, 4 and 16 GiB written, vs `qemu-img snapshot
//!    -c` on a qcow2 and a btrfs subvolume snapshot (+sync) of the same data.
//! 3. Sequential read after 100 snapshots interleaved with writes vs none.
//! 4. Metadata bytes per GiB of data (checksums included).
//! 5. Snapshot diff (replication's change detection) vs reading the volume.
//!
//! Environment: BENCH_DIR (default /var/tmp), BENCH_SIZES (GiB list for 2,
//! default "1,4,16"), BENCH_QUICK=1 for a short run, BENCH_ONLY (a comma
//! list of sections: throughput, cold, snapshots, chain, metadata, diff).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdmfs::{BlockDev, FileDev, FormatOptions, OpenOptions, Pool, Target};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

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

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn new_pool(path: &Path, size: u64) -> Pool {
    let _ = std::fs::remove_file(path);
    let dev = FileDev::create(path, size).expect("pool file");
    Pool::format(&dev, &FormatOptions::default()).expect("format");
    Pool::open(Arc::new(dev), &OpenOptions::default()).expect("open")
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len / 8).flat_map(|_| r.next().to_le_bytes()).collect()
}

/// One round of the four data-path workloads; returns (seq write MB/s, seq
/// read MB/s, random write IOPS, random read IOPS).
trait Target4 {
    fn write(&mut self, off: u64, d: &[u8]);
    fn read(&mut self, off: u64, b: &mut [u8]);
    fn sync(&mut self);
}

struct Plain(File);
impl Target4 for Plain {
    fn write(&mut self, off: u64, d: &[u8]) {
        self.0.write_all_at(d, off).unwrap()
    }
    fn read(&mut self, off: u64, b: &mut [u8]) {
        self.0.read_exact_at(b, off).unwrap()
    }
    fn sync(&mut self) {
        self.0.sync_data().unwrap()
    }
}

struct Engine(Pool, u64);
impl Target4 for Engine {
    fn write(&mut self, off: u64, d: &[u8]) {
        self.0.write(self.1, off, d).unwrap()
    }
    fn read(&mut self, off: u64, b: &mut [u8]) {
        self.0.read(Target::Volume(self.1), off, b).unwrap()
    }
    fn sync(&mut self) {
        self.0.flush().unwrap()
    }
}

fn round(t: &mut dyn Target4, size: u64, rand_ops: u64) -> [f64; 4] {
    let chunk = pattern(1, MIB as usize);
    let small = pattern(2, 4096);
    drop_caches();
    let s = Instant::now();
    for i in 0..size / MIB {
        t.write(i * MIB, &chunk);
    }
    t.sync();
    let sw = mbps(size, s.elapsed());
    drop_caches();
    let mut buf = vec![0u8; MIB as usize];
    let s = Instant::now();
    for i in 0..size / MIB {
        t.read(i * MIB, &mut buf);
    }
    let sr = mbps(size, s.elapsed());
    let mut r = Rng(7);
    let s = Instant::now();
    for _ in 0..rand_ops {
        t.write((r.next() % (size / 4096)) * 4096, &small);
    }
    t.sync();
    let rw = rand_ops as f64 / s.elapsed().as_secs_f64();
    drop_caches();
    let mut b4 = vec![0u8; 4096];
    let mut r = Rng(9);
    let s = Instant::now();
    for _ in 0..rand_ops {
        t.read((r.next() % (size / 4096)) * 4096, &mut b4);
    }
    let rr = rand_ops as f64 / s.elapsed().as_secs_f64();
    [sw, sr, rw, rr]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn throughput(dir: &Path, size: u64, rand_ops: u64, rounds: usize) {
    println!("\n### Data path: engine vs plain file ({} MiB, {} random 4 KiB ops, median of {} alternating rounds, cold cache before each phase)\n", size / MIB, rand_ops, rounds);
    println!(
        "| workload | plain file | cdmfs 64 KiB blocks | ratio | cdmfs 4 KiB blocks | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut res: Vec<Vec<[f64; 4]>> = vec![Vec::new(); 3];
    for _ in 0..rounds {
        let fpath = dir.join("bench-plain.raw");
        let _ = std::fs::remove_file(&fpath);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&fpath)
            .unwrap();
        f.set_len(size).unwrap();
        res[0].push(round(&mut Plain(f), size, rand_ops));
        let _ = std::fs::remove_file(&fpath);
        for (k, bs) in [(1usize, 65536u32), (2, 4096)] {
            let ppath = dir.join("bench-engine.pool");
            let pool = new_pool(&ppath, size * 3);
            let v = pool.create_volume("v", size, bs).unwrap();
            let mut e = Engine(pool, v.id);
            res[k].push(round(&mut e, size, rand_ops));
            e.0.close().unwrap();
            let _ = std::fs::remove_file(&ppath);
        }
    }
    let names = [
        "sequential 1 MiB write + flush (MB/s)",
        "sequential 1 MiB read (MB/s)",
        "4 KiB random write + flush (IOPS)",
        "4 KiB random read (IOPS)",
    ];
    for (i, n) in names.iter().enumerate() {
        let m: Vec<f64> = (0..3)
            .map(|k| median(res[k].iter().map(|r| r[i]).collect()))
            .collect();
        println!(
            "| {n} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.2}× |",
            m[0],
            m[1],
            m[1] / m[0],
            m[2],
            m[2] / m[0]
        );
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn time_cmd(c: &mut Command) -> f64 {
    let t = Instant::now();
    let st = c.status().expect("run peer command");
    assert!(st.success(), "{c:?} failed");
    t.elapsed().as_secs_f64() * 1000.0
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn snapshots(dir: &Path, sizes: &[u64], n: usize) {
    println!("\n### Snapshot creation ({n} snapshots each; ms)\n");
    println!("| data written | cdmfs create p50 / p99 | cdmfs create+commit p50 / p99 | `cdmfs snapshot create` process p50 | qemu-img snapshot -c p50 / p99 | btrfs snapshot + sync p50 / p99 |");
    println!("|---|---:|---:|---:|---:|---:|");
    let chunk = pattern(3, MIB as usize);
    let cdmfs_bin: PathBuf = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("cdmfs");
    for &gib in sizes {
        let size = gib * GIB;
        let ppath = dir.join("bench-snap.pool");
        let pool = new_pool(&ppath, size + 4 * GIB);
        let v = pool.create_volume("v", size, 65536).unwrap();
        for i in 0..size / MIB {
            pool.write(v.id, i * MIB, &chunk).unwrap();
        }
        pool.flush().unwrap();
        let (mut create, mut commit) = (Vec::new(), Vec::new());
        let mut r = Rng(5);
        for i in 0..n {
            pool.write(v.id, (r.next() % (size / 65536)) * 65536, &chunk[..65536])
                .unwrap();
            let t = Instant::now();
            pool.create_snapshot("v", &format!("s{i}"), serde_json::json!({"i": i}))
                .unwrap();
            create.push(t.elapsed().as_secs_f64() * 1000.0);
            pool.flush().unwrap();
            commit.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        pool.close().unwrap();
        let mut proc_ms = Vec::new();
        if cdmfs_bin.exists() {
            for _ in 0..10 {
                proc_ms.push(time_cmd(
                    Command::new(&cdmfs_bin)
                        .arg("-p")
                        .arg(&ppath)
                        .args(["snapshot", "create", "v"])
                        .stdout(std::process::Stdio::null()),
                ));
            }
        }
        let _ = std::fs::remove_file(&ppath);
        // qcow2 internal snapshots of the same amount of data.
        let mut q = Vec::new();
        if have("qemu-img") && have("qemu-io") {
            let qpath = dir.join("bench-snap.qcow2");
            let qs = qpath.to_str().unwrap().to_string();
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", &qs, &format!("{gib}G")])
                .status()
                .unwrap();
            let mut c = Command::new("qemu-io");
            c.args(["-f", "qcow2", &qs]);
            for g in 0..gib {
                c.args(["-c", &format!("write -q -P 0x5a {g}G 1G")]);
            }
            c.stdout(std::process::Stdio::null()).status().unwrap();
            for i in 0..10 {
                q.push(time_cmd(Command::new("qemu-img").args([
                    "snapshot",
                    "-c",
                    &format!("s{i}"),
                    &qs,
                ])));
            }
            let _ = std::fs::remove_file(&qpath);
        }
        // btrfs subvolume snapshots of a file of the same size.
        let mut b = Vec::new();
        if have("mkfs.btrfs") && unsafe { libc::geteuid() } == 0 {
            let img = dir.join("bench-btrfs.img");
            let mnt = dir.join("bench-btrfs.mnt");
            let _ = std::fs::create_dir_all(&mnt);
            let f = File::create(&img).unwrap();
            f.set_len(size + 4 * GIB).unwrap();
            drop(f);
            let ok = Command::new("mkfs.btrfs")
                .args(["-q", "-f"])
                .arg(&img)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
                && Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&img)
                    .arg(&mnt)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
            if ok {
                Command::new("btrfs")
                    .args(["-q", "subvolume", "create"])
                    .arg(mnt.join("sv"))
                    .status()
                    .unwrap();
                let f = File::create(mnt.join("sv/data")).unwrap();
                for i in 0..size / MIB {
                    f.write_all_at(&chunk, i * MIB).unwrap();
                }
                f.sync_all().unwrap();
                drop(f);
                for i in 0..10 {
                    let t = Instant::now();
                    Command::new("btrfs")
                        .args(["-q", "subvolume", "snapshot"])
                        .arg(mnt.join("sv"))
                        .arg(mnt.join(format!("s{i}")))
                        .status()
                        .unwrap();
                    unsafe { libc::sync() };
                    b.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                Command::new("umount").arg(&mnt).status().unwrap();
            }
            let _ = std::fs::remove_file(&img);
        }
        let pair = |v: &mut Vec<f64>| {
            if v.is_empty() {
                "n/a".to_string()
            } else {
                format!("{:.2} / {:.2}", pct(v, 0.5), pct(v, 0.99))
            }
        };
        let p50 = |v: &mut Vec<f64>| {
            if v.is_empty() {
                "n/a".to_string()
            } else {
                format!("{:.1}", pct(v, 0.5))
            }
        };
        let create_s = format!(
            "{:.4} / {:.4}",
            pct(&mut create, 0.5),
            pct(&mut create, 0.99)
        );
        println!(
            "| {gib} GiB | {create_s} | {} | {} | {} | {} |",
            pair(&mut commit),
            p50(&mut proc_ms),
            pair(&mut q),
            pair(&mut b)
        );
    }
}

fn chain(dir: &Path, size: u64) {
    println!("\n### Sequential read after 100 snapshots interleaved with writes ({} MiB volume, cold cache)\n", size / MIB);
    println!("Both volumes get the same writes (1% of blocks rewritten at random, 100 times); one takes a snapshot after each round. Copy-on-write relocates rewritten blocks in both, so the control isolates what the snapshots cost.\n");
    let chunk = pattern(4, MIB as usize);
    let mut results = Vec::new();
    for with_snaps in [false, true] {
        let ppath = dir.join("bench-chain.pool");
        let pool = new_pool(&ppath, size * 4);
        let v = pool.create_volume("v", size, 65536).unwrap();
        for i in 0..size / MIB {
            pool.write(v.id, i * MIB, &chunk).unwrap();
        }
        pool.flush().unwrap();
        let read_all = |pool: &Pool, t: Target| {
            let mut buf = vec![0u8; MIB as usize];
            drop_caches();
            let s = Instant::now();
            for i in 0..size / MIB {
                pool.read(t, i * MIB, &mut buf).unwrap();
            }
            mbps(size, s.elapsed())
        };
        let fresh = read_all(&pool, Target::Volume(v.id));
        let mut r = Rng(11);
        let blocks = size / 65536;
        for s in 0..100 {
            for _ in 0..blocks / 100 {
                pool.write(v.id, (r.next() % blocks) * 65536, &chunk[..65536])
                    .unwrap();
            }
            if with_snaps {
                pool.create_snapshot("v", &format!("s{s}"), serde_json::Value::Null)
                    .unwrap();
            }
            pool.flush().unwrap();
        }
        let after = read_all(&pool, Target::Volume(v.id));
        let mid = if with_snaps {
            let snap = pool.list_snapshots(Some("v")).unwrap()[50].id;
            Some(read_all(&pool, Target::Snapshot(snap)))
        } else {
            None
        };
        results.push((fresh, after, mid));
        pool.close().unwrap();
        let _ = std::fs::remove_file(&ppath);
    }
    let (f0, a0, _) = results[0];
    let (f1, a1, m1) = results[1];
    println!("| state | MB/s | ratio |");
    println!("|---|---:|---:|");
    println!(
        "| freshly written, sequential on disk | {:.0} | 1.00× |",
        (f0 + f1) / 2.0
    );
    println!(
        "| after the 100 rounds, no snapshots (control) | {a0:.0} | {:.2}× of fresh |",
        a0 / f0
    );
    println!(
        "| after the 100 rounds with 100 snapshots | {a1:.0} | **{:.2}× of control** |",
        a1 / a0
    );
    if let Some(m) = m1 {
        println!(
            "| reading snapshot 50 of 100 | {m:.0} | {:.2}× of control |",
            m / a0
        );
    }
}

/// A device that counts the reads reaching it (and their bytes), to show
/// the request sizes behind a figure.
struct Counting {
    dev: FileDev,
    reads: AtomicU64,
    bytes: AtomicU64,
}

impl BlockDev for Counting {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.reads.fetch_add(1, Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Relaxed);
        self.dev.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.dev.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.dev.len()
    }
    fn will_need(&self, ranges: &[(u64, u64)]) {
        self.dev.will_need(ranges)
    }
}

/// Read requests completed by the disk under BENCH_DIR (from
/// `/sys/dev/block/M:m/stat`), if it can be found: what the reads cost the
/// device, which timings on a shared machine hide.
fn disk_reads(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/stat")).ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// Cold sequential 1 MiB reads of a whole volume (or file): MB/s and the
/// disk's read requests per MiB (0 if unknown).
fn cold_read(dir: &Path, read: &mut dyn FnMut(u64, &mut [u8]), size: u64) -> [f64; 2] {
    let mut buf = vec![0u8; MIB as usize];
    drop_caches();
    let d0 = disk_reads(dir);
    let s = Instant::now();
    for i in 0..size / MIB {
        read(i * MIB, &mut buf);
    }
    let speed = mbps(size, s.elapsed());
    let reqs = match (d0, disk_reads(dir)) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / (size / MIB) as f64,
        _ => 0.0,
    };
    [speed, reqs]
}

/// One engine volume for [`cold`]: written sequentially in 1 MiB writes,
/// then `rounds` rounds of 1% random block rewrites, each flushed and
/// committed (as a day's periodic commits would).
/// Returns (MB/s fresh, MB/s after the rounds, device reads per MiB
/// fresh, runs per MiB after the rounds, MB/s of the rounds' writes, disk
/// read requests per MiB fresh and after).
fn cold_engine(dir: &Path, size: u64, bs: u32, rounds: u64) -> [f64; 7] {
    let ppath = dir.join("bench-cold.pool");
    let _ = std::fs::remove_file(&ppath);
    let file = FileDev::create(&ppath, size * 3).expect("pool file");
    Pool::format(&file, &FormatOptions::default()).expect("format");
    let dev = Arc::new(Counting {
        dev: file,
        reads: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    let pool = Pool::open(dev.clone(), &OpenOptions::default()).expect("open");
    let v = pool.create_volume("v", size, bs).unwrap().id;
    let chunk = pattern(21, MIB as usize);
    for i in 0..size / MIB {
        pool.write(v, i * MIB, &chunk).unwrap();
    }
    pool.flush().unwrap();
    let t = Target::Volume(v);
    let r0 = dev.reads.load(Relaxed);
    let [fresh, fresh_reqs] = cold_read(dir, &mut |o, b| pool.read(t, o, b).unwrap(), size);
    let reads = (dev.reads.load(Relaxed) - r0) as f64 / (size / MIB) as f64;
    let mut r = Rng(23);
    let blocks = size / bs as u64;
    let bs64 = bs as u64;
    let s = Instant::now();
    for _ in 0..rounds {
        for _ in 0..(blocks / 100).max(1) {
            let b = r.next() % blocks;
            pool.write(v, b * bs64, &chunk[..bs as usize]).unwrap();
        }
        // A day's periodic commits: the old extents become free.
        pool.flush().unwrap();
        pool.commit().unwrap();
    }
    let rewritten = rounds * (blocks / 100).max(1) * bs64;
    let write = mbps(rewritten, s.elapsed());
    let [after, after_reqs] = if rounds > 0 {
        cold_read(dir, &mut |o, b| pool.read(t, o, b).unwrap(), size)
    } else {
        [0.0; 2]
    };
    let s = Instant::now();
    let frag = pool.fragmentation(t).unwrap();
    let frag_ms = s.elapsed().as_secs_f64() * 1000.0;
    println!(
        "<!-- Pool::fragmentation, {bs}-byte blocks: {} extents in {frag_ms:.2} ms -->",
        frag.extents
    );
    let runs = frag.runs_per_mib();
    pool.close().unwrap();
    let _ = std::fs::remove_file(&ppath);
    [fresh, after, reads, runs, write, fresh_reqs, after_reqs]
}

/// Cold sequential reads of a fresh volume vs a plain file, and of the
/// volume after rounds of 1% random rewrites (BENCH_ROUNDS, default 100).
fn cold(dir: &Path, size: u64, reps: usize) {
    let rounds: u64 = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    println!("\n### Cold sequential 1 MiB reads: fresh volume vs plain file, and after {rounds} rounds of 1% random block rewrites (a flush and a commit per round, no snapshots) ({} MiB, median of {reps} alternating runs)\n", size / MIB);
    let chunk = pattern(21, MIB as usize);
    let mut plain = Vec::new();
    let mut eng: Vec<Vec<[f64; 7]>> = vec![Vec::new(); 2];
    for _ in 0..reps {
        let fpath = dir.join("bench-cold.raw");
        let f = File::create(&fpath).unwrap();
        for i in 0..size / MIB {
            f.write_all_at(&chunk, i * MIB).unwrap();
        }
        f.sync_all().unwrap();
        let f = File::open(&fpath).unwrap();
        plain.push(cold_read(
            dir,
            &mut |o, b| f.read_exact_at(b, o).unwrap(),
            size,
        ));
        drop(f);
        let _ = std::fs::remove_file(&fpath);
        eng[0].push(cold_engine(dir, size, 65536, rounds));
        eng[1].push(cold_engine(dir, size, 4096, 0));
    }
    println!("\n| what | MB/s | ratio | pool device reads per MiB | disk read requests per MiB | runs per MiB | rounds' writes MB/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let p = median(plain.iter().map(|r| r[0]).collect());
    let preq = median(plain.iter().map(|r| r[1]).collect());
    println!("| plain file | {p:.0} | 1.00× | | {preq:.1} | | |");
    for (k, name) in ["64 KiB blocks", "4 KiB blocks"].iter().enumerate() {
        let m = |i: usize| median(eng[k].iter().map(|r| r[i]).collect());
        println!(
            "| cdmfs {name}, fresh | {:.0} | **{:.2}×** | {:.1} | {:.1} | | |",
            m(0),
            m(0) / p,
            m(2),
            m(5)
        );
        if k == 0 && rounds > 0 {
            println!(
                "| cdmfs {name}, after {rounds} rounds | {:.0} | {:.2}× of fresh | | {:.1} | {:.2} | {:.0} |",
                m(1),
                m(1) / m(0),
                m(6),
                m(3),
                m(4)
            );
        }
    }
}

fn metadata(dir: &Path, size: u64) {
    println!("\n### Metadata per GiB of data, 64 KiB blocks, checksums included\n");
    println!("| layout | data | metadata | overhead |");
    println!("|---|---:|---:|---:|");
    let chunk = pattern(6, MIB as usize);
    let ppath = dir.join("bench-meta.pool");
    let pool = new_pool(&ppath, size * 3);
    let v = pool.create_volume("v", size, 65536).unwrap();
    for i in 0..size / MIB {
        pool.write(v.id, i * MIB, &chunk).unwrap();
    }
    pool.flush().unwrap();
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean());
    let row = |name: &str, rep: &cdmfs::FsckReport| {
        println!(
            "| {name} | {:.0} MiB | {:.0} KiB | {:.3}% |",
            rep.data_bytes as f64 / MIB as f64,
            rep.metadata_bytes() as f64 / 1024.0,
            rep.metadata_bytes() as f64 * 100.0 / rep.data_bytes as f64
        )
    };
    row("written sequentially", &rep);
    // Random order: leaves split in halves.
    let v2 = pool.create_volume("r", size, 65536).unwrap();
    let blocks = size / 65536;
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut r = Rng(13);
    for i in (1..order.len()).rev() {
        order.swap(i, (r.next() % (i as u64 + 1)) as usize);
    }
    for b in order {
        pool.write(v2.id, b * 65536, &chunk[..65536]).unwrap();
    }
    pool.delete_volume("v", false).unwrap();
    for _ in 0..3 {
        pool.flush().unwrap();
        pool.write(v2.id, 0, &chunk[..65536]).unwrap();
    }
    pool.flush().unwrap();
    let rep = pool.fsck().unwrap();
    row("written in random order", &rep);
    pool.close().unwrap();
    let _ = std::fs::remove_file(&ppath);
}

/// Incremental replication's change detection: `Pool::diff` of two
/// snapshots of a volume with 0.1% of its blocks rewritten, cold (pool
/// reopened after dropping the page cache) and warm, vs reading the whole
/// volume cold (what finding the change by comparing contents would cost
/// at least), and the tree nodes each diff reads.
fn diff(dir: &Path, size: u64, bs: u32) {
    println!(
        "\n### Snapshot diff (incremental replication): {} GiB volume, {} KiB blocks, 0.1% of blocks rewritten\n",
        size / GIB,
        bs / 1024
    );
    let ppath = dir.join("bench-diff.pool");
    let pool = new_pool(&ppath, size + size / 4);
    let v = pool.create_volume("v", size, bs).unwrap();
    let chunk = pattern(31, MIB as usize);
    for i in 0..size / MIB {
        pool.write(v.id, i * MIB, &chunk).unwrap();
    }
    pool.flush().unwrap();
    let s1 = pool
        .create_snapshot("v", "", serde_json::json!({}))
        .unwrap()
        .id;
    let blocks = size / bs as u64;
    let changed = (blocks / 1000).max(1);
    let mut r = Rng(77);
    let block = pattern(32, bs as usize);
    for _ in 0..changed {
        let b = r.next() % blocks;
        pool.write(v.id, b * bs as u64, &block).unwrap();
    }
    pool.flush().unwrap();
    let s2 = pool
        .create_snapshot("v", "", serde_json::json!({}))
        .unwrap()
        .id;
    pool.close().unwrap();
    let reopen = || {
        drop_caches();
        let dev = FileDev::open(&ppath).expect("pool file");
        Pool::open(Arc::new(dev), &OpenOptions::default()).expect("open")
    };
    let pool = reopen();
    let t = Instant::now();
    let (ranges, cold) = pool.diff_with_stats(Some(s1), s2).unwrap();
    let cold_t = t.elapsed();
    let t = Instant::now();
    let (_, warm) = pool.diff_with_stats(Some(s1), s2).unwrap();
    let warm_t = t.elapsed();
    let diff_bytes: u64 = ranges.iter().map(|r| r.1).sum();
    let t = Instant::now();
    let (_, all) = pool.diff_with_stats(None, s2).unwrap();
    let all_t = t.elapsed();
    drop(pool);
    let pool = reopen();
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    for i in 0..size / MIB {
        pool.read(Target::Snapshot(s2), i * MIB, &mut buf).unwrap();
    }
    let read_t = t.elapsed();
    drop(pool);
    let _ = std::fs::remove_file(&ppath);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("| what | time | vs reading the volume | tree nodes read | blocks reported |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| read the whole snapshot, cold | {:.0} ms | 1× | | |",
        ms(read_t)
    );
    for (name, d, st) in [
        ("diff, 0.1% changed, cold", cold_t, cold),
        ("diff, 0.1% changed, warm", warm_t, warm),
        ("diff against nothing (a full send), cold", all_t, all),
    ] {
        println!(
            "| {name} | {:.2} ms | **1/{:.0}** | {} | {} |",
            ms(d),
            read_t.as_secs_f64() / d.as_secs_f64().max(1e-9),
            st.nodes_visited,
            st.blocks
        );
    }
    println!(
        "\n{changed} blocks rewritten ({} distinct), {} bytes reported.",
        cold.blocks, diff_bytes
    );
}

fn main() {
    let dir = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let sizes: Vec<u64> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| if quick { "1".into() } else { "1,4,16".into() })
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("## cdmfs engine benchmark\n");
    println!(
        "Directory {} ({} cores). Each table compares runs made in this one invocation.",
        dir.display(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if std::env::args().any(|a| a == "--bench" || a.starts_with("--")) {
        // cargo bench passes --bench; nothing else to parse.
    }
    // BENCH_ONLY=throughput,cold,snapshots,chain,metadata,diff runs those
    // sections alone (all by default).
    let only = std::env::var("BENCH_ONLY").ok();
    let run = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|s| s == name))
    };
    if run("throughput") {
        throughput(
            &dir,
            if quick { GIB / 4 } else { GIB },
            if quick { 8192 } else { 32768 },
            3,
        );
    }
    if run("cold") {
        cold(&dir, if quick { GIB / 4 } else { GIB }, 3);
    }
    if run("snapshots") {
        snapshots(&dir, &sizes, if quick { 30 } else { 100 });
    }
    if run("chain") {
        chain(&dir, if quick { GIB / 4 } else { GIB });
    }
    if run("metadata") {
        metadata(&dir, if quick { GIB } else { 4 * GIB });
    }
    if run("diff") {
        diff(&dir, if quick { GIB } else { 4 * GIB }, 65536);
        diff(&dir, GIB, 4096);
    }
}

//! Read path and allocation locality: the fragmentation figure, sequential
//! reads merged into large device reads, and rewrites placed near their
//! logical neighbours.

use std::io;
use std::sync::{Arc, Mutex};

use cdmfs::{BlockDev, FormatOptions, Fragmentation, MemDev, OpenOptions, Pool, Target};

const MIB: u64 = 1 << 20;

fn pool_on(dev: Arc<MemDev>) -> Pool {
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    Pool::open(dev, &OpenOptions::default()).unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

#[test]
fn fragmentation_counts_extents_and_runs_in_logical_order() {
    let pool = pool_on(Arc::new(MemDev::new(64 * MIB as usize)));
    let v = pool.create_volume("v", 8 * MIB, 65536).unwrap().id;
    let t = Target::Volume(v);
    assert_eq!(pool.fragmentation(t).unwrap(), Fragmentation::default());
    // 4 MiB written in one go: 64 extents, one run.
    pool.write(v, 0, &pattern(1, 4 * MIB as usize)).unwrap();
    pool.flush().unwrap();
    let f = pool.fragmentation(t).unwrap();
    assert_eq!(
        f,
        Fragmentation {
            mapped_bytes: 4 * MIB,
            extents: 64,
            runs: 1
        }
    );
    assert_eq!(f.avg_run_bytes(), 4 * MIB);
    assert_eq!(f.extents_per_mib(), 16.0);
    // A block rewritten lands elsewhere: the run breaks in two places.
    pool.write(v, MIB, &pattern(2, 65536)).unwrap();
    let f = pool.fragmentation(t).unwrap();
    assert_eq!((f.extents, f.runs), (64, 3));
    // A logical gap breaks a run even if the device addresses follow.
    pool.write(v, 6 * MIB, &pattern(3, 65536)).unwrap();
    let f = pool.fragmentation(t).unwrap();
    assert_eq!((f.mapped_bytes, f.extents), (4 * MIB + 65536, 65));
    assert_eq!(f.runs, 4);
    // A piece (a 4 KiB write into a mapped 64 KiB block) is an extent of
    // its own and a run of its own; it maps no new bytes.
    pool.write(v, 2 * MIB + 8192, &pattern(4, 4096)).unwrap();
    let f = pool.fragmentation(t).unwrap();
    assert_eq!(
        (f.mapped_bytes, f.extents, f.runs),
        (4 * MIB + 65536, 66, 5)
    );
    // Snapshots answer too.
    let s = pool
        .create_snapshot("v", "s", serde_json::Value::Null)
        .unwrap();
    assert_eq!(pool.fragmentation(Target::Snapshot(s.id)).unwrap(), f);
}

type Ranges = Vec<(u64, u64)>;

/// A memory device that records the reads and read-ahead hints it gets.
struct Counting {
    mem: MemDev,
    reads: Mutex<Vec<(u64, u64)>>,
    hints: Mutex<Vec<(u64, u64)>>,
}

impl Counting {
    fn new(size: u64) -> Arc<Counting> {
        Arc::new(Counting {
            mem: MemDev::new(size as usize),
            reads: Mutex::new(Vec::new()),
            hints: Mutex::new(Vec::new()),
        })
    }
    /// The (reads, hints) since the last call, as (offset, length) pairs.
    fn take(&self) -> (Ranges, Ranges) {
        (
            std::mem::take(&mut *self.reads.lock().unwrap()),
            std::mem::take(&mut *self.hints.lock().unwrap()),
        )
    }
}

impl BlockDev for Counting {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.reads.lock().unwrap().push((off, buf.len() as u64));
        self.mem.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.mem.write_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.mem.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn will_need(&self, ranges: &[(u64, u64)]) {
        self.hints.lock().unwrap().extend_from_slice(ranges);
    }
}

fn counted_pool(size: u64) -> (Arc<Counting>, Pool) {
    let dev = Counting::new(size);
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = Pool::open(dev.clone(), &OpenOptions::default()).unwrap();
    (dev, pool)
}

#[test]
fn sequential_reads_of_a_fresh_volume_are_one_device_read_per_request() {
    let (dev, pool) = counted_pool(64 * MIB);
    let v = pool.create_volume("v", 16 * MIB, 65536).unwrap().id;
    let data = pattern(5, 16 * MIB as usize);
    for i in 0..16 {
        pool.write(
            v,
            i * MIB,
            &data[(i * MIB) as usize..((i + 1) * MIB) as usize],
        )
        .unwrap();
    }
    pool.flush().unwrap();
    dev.take();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..16u64 {
        pool.read(Target::Volume(v), i * MIB, &mut buf).unwrap();
        assert_eq!(buf, data[(i * MIB) as usize..((i + 1) * MIB) as usize]);
    }
    // Tree nodes are cached since the writes: every device read is data,
    // one per 1 MiB request (16 extents merged).
    let (reads, _) = dev.take();
    assert_eq!(reads.len(), 16, "{reads:?}");
    assert!(reads.iter().all(|&(_, n)| n == MIB));
}

/// Logical offset → pool byte offset of each extent of a volume.
fn extent_at(pool: &Pool, t: Target) -> Vec<(u64, u64, u64)> {
    pool.physical_map(t)
        .unwrap()
        .extents
        .into_iter()
        .map(|(l, p, n)| (l, p, n as u64))
        .collect()
}

#[test]
fn sequential_reads_prefetch_the_next_extents_in_logical_order() {
    let (dev, pool) = counted_pool(64 * MIB);
    let v = pool.create_volume("v", 16 * MIB, 65536).unwrap().id;
    let t = Target::Volume(v);
    pool.write(v, 0, &pattern(6, 16 * MIB as usize)).unwrap();
    // Every other block rewritten: the extents of the second half of
    // each pair live far from their neighbours.
    for b in (1..256u64).step_by(2) {
        pool.write(v, b * 65536, &pattern(b, 65536)).unwrap();
    }
    pool.flush().unwrap();
    let map = extent_at(&pool, t);
    dev.take();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..4u64 {
        pool.read(t, i * MIB, &mut buf).unwrap();
    }
    let (_, hints) = dev.take();
    // The extents of the next logical MiBs were hinted before being read:
    // every extent of 4..6 MiB lies in a hinted range.
    let hinted = |p: u64, n: u64| hints.iter().any(|&(o, l)| o <= p && p + n <= o + l);
    let ahead: Vec<_> = map
        .iter()
        .filter(|(l, _, _)| (4 * MIB..6 * MIB).contains(l))
        .collect();
    assert_eq!(ahead.len(), 32);
    for (l, p, n) in ahead {
        assert!(
            hinted(*p, *n),
            "extent at logical {l} (pool {p}) not read ahead"
        );
    }
    // A random read starts no read-ahead.
    pool.read(t, 11 * MIB, &mut buf).unwrap();
    let (_, hints) = dev.take();
    assert!(hints.len() <= 16, "{}", hints.len());
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Rounds of 1% random whole-block rewrites of a volume, each made
/// durable and committed (as the periodic commits of a day would), the
/// benchmark's workload at a smaller size; `model` follows the writes.
fn rewrite_rounds(pool: &Pool, v: u64, model: &mut [u8], bs: u64, rounds: u64) {
    let mut r = Xorshift(0x9e37_79b9_7f4a_7c15);
    let blocks = model.len() as u64 / bs;
    for round in 0..rounds {
        for i in 0..blocks / 100 {
            let b = r.next() % blocks;
            let data = pattern(round << 16 | i, bs as usize);
            pool.write(v, b * bs, &data).unwrap();
            model[(b * bs) as usize..((b + 1) * bs) as usize].copy_from_slice(&data);
        }
        pool.flush().unwrap();
        pool.commit().unwrap();
    }
}

fn check_reads(pool: &Pool, t: Target, model: &[u8]) {
    let mut buf = vec![0u8; MIB as usize];
    for (i, want) in model.chunks(MIB as usize).enumerate() {
        pool.read(t, i as u64 * MIB, &mut buf[..want.len()])
            .unwrap();
        assert!(buf[..want.len()] == *want, "MiB {i} differs");
    }
    assert!(pool.fsck().unwrap().is_clean());
}

#[test]
fn rewrites_land_next_to_their_logical_neighbours() {
    // 100 rounds of 1% random rewrites: about 63% of the blocks are
    // rewritten, and with next-fit every rewrite was a run of its own
    // (13.7 runs per MiB of 16 blocks). Placed by their neighbours, a
    // block rewritten twice goes back home and rewrites of neighbours
    // share a region: about 8 runs per MiB.
    let size = 64 * MIB;
    let pool = pool_on(Arc::new(MemDev::new((3 * size) as usize)));
    let v = pool.create_volume("v", size, 65536).unwrap().id;
    let t = Target::Volume(v);
    let mut model = pattern(8, size as usize);
    for (i, c) in model.chunks(MIB as usize).enumerate() {
        pool.write(v, i as u64 * MIB, c).unwrap();
    }
    pool.flush().unwrap();
    // Sequential but for the tree nodes written between the data.
    let fresh = pool.fragmentation(t).unwrap();
    assert!(fresh.runs_per_mib() < 0.25, "{fresh:?}");
    rewrite_rounds(&pool, v, &mut model, 65536, 100);
    let f = pool.fragmentation(t).unwrap();
    assert_eq!(f.mapped_bytes, size);
    assert!(
        f.runs_per_mib() < 10.0,
        "{f:?}: {:.2} runs per MiB",
        f.runs_per_mib()
    );
    check_reads(&pool, t, &model);
}

#[test]
fn a_volume_written_in_random_order_is_laid_out_in_logical_order() {
    // Every block written once, in random order (a restore or copy with
    // many streams): next-fit lays blocks out in arrival order, a run
    // each; placement gives every group of 16 blocks a region in which
    // each takes its logical slot.
    let size = 32 * MIB;
    let bs = 65536u64;
    let pool = pool_on(Arc::new(MemDev::new((3 * size) as usize)));
    let v = pool.create_volume("v", size, bs as u32).unwrap().id;
    let t = Target::Volume(v);
    let model = pattern(10, size as usize);
    let blocks = size / bs;
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut r = Xorshift(77);
    for i in (1..order.len()).rev() {
        order.swap(i, (r.next() % (i as u64 + 1)) as usize);
    }
    for b in order {
        pool.write(
            v,
            b * bs,
            &model[(b * bs) as usize..((b + 1) * bs) as usize],
        )
        .unwrap();
    }
    pool.flush().unwrap();
    let f = pool.fragmentation(t).unwrap();
    assert!(
        f.runs_per_mib() <= 1.5,
        "{f:?}: {:.2} runs per MiB",
        f.runs_per_mib()
    );
    check_reads(&pool, t, &model);
}

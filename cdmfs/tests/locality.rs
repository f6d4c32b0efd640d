//! Read path and allocation locality: the fragmentation figure, sequential
//! reads merged into large device reads, and rewrites placed near their
//! logical neighbours.

use std::sync::Arc;

use cdmfs::{FormatOptions, Fragmentation, MemDev, OpenOptions, Pool, Target};

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

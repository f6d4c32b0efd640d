//! Property tests: random operation sequences on a real pool, every read
//! compared with a simple in-memory model; fsck clean throughout.

mod common;

use std::sync::Arc;

use cdmfs::{Cipher, DataPolicy, FormatOptions, KeySource, MemDev, OpenOptions, Pool};
use common::{Harness, Op};
use proptest::prelude::*;

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (16u32..600, any::<u8>()).prop_map(|(size_kib, bs_shift)| Op::Create { size_kib, bs_shift }),
        12 => (any::<usize>(), any::<u32>(), 1u32..200_000, any::<u8>()).prop_map(|(v, off, len, seed)| Op::Write { v, off, len, seed }),
        // Database-like page writes (4 KiB-aligned or not) clustered in the
        // first 640 KiB, so pieces pile up, overlap, widen and fold.
        8 => (any::<usize>(), 0u32..160, 1u32..=16384, any::<u8>(), any::<bool>()).prop_map(|(v, page, len, seed, aligned)| {
            let (off, len) = if aligned { (page * 4096, len.div_ceil(4096) * 4096) } else { (page * 4096 + page * 37 % 4096, len) };
            Op::Write { v, off, len, seed }
        }),
        3 => (any::<usize>(), any::<u32>(), 1u32..300_000).prop_map(|(v, off, len)| Op::Zero { v, off, len }),
        3 => Just(Op::Flush),
        3 => any::<usize>().prop_map(|v| Op::Snapshot { v }),
        2 => any::<usize>().prop_map(|s| Op::Clone { s }),
        2 => any::<usize>().prop_map(|s| Op::DeleteSnapshot { s }),
        1 => any::<usize>().prop_map(|v| Op::DeleteVolume { v }),
        1 => (any::<usize>(), 1u32..200).prop_map(|(v, add_kib)| Op::Grow { v, add_kib }),
        // Defragmentation steps between writes, snapshots and clones:
        // contents never change, shared extents stay put (fsck counts).
        3 => (any::<usize>(), 0u32..64, 4u32..1024).prop_map(|(v, from, budget_kib)| Op::Defrag { v, from, budget_kib }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

fn run(ops: &[Op], fanout: u32) {
    run_with(ops, fanout, None)
}

fn run_with(ops: &[Op], fanout: u32, policy: Option<DataPolicy>) {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: fanout }).unwrap();
    let opts = OpenOptions {
        cache_nodes: 64,
        dirty_limit: 256,
        key: policy.map(|_| KeySource::Key(vec![3; 32])),
    };
    let mut h = Harness::new(dev, opts);
    if let Some(p) = policy {
        h.policy = p;
        h.repetitive = true;
    }
    h.apply(&Op::Create {
        size_kib: 300,
        bs_shift: 0,
    })
    .unwrap();
    for op in ops {
        if let Some(v) = h.apply(op).unwrap_or_else(|e| panic!("{op:?} failed: {e}")) {
            h.check_volume(&v);
        }
    }
    h.check_all(&h.model.clone());
    h.fsck_clean();
    h.apply(&Op::Reopen).unwrap();
    h.check_all(&h.model.clone());
    h.fsck_clean();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Deep trees (fan-out 4) so that splits, collapses and shared
    /// interior nodes happen within small volumes.
    #[test]
    fn deep_trees_match_model(ops in prop::collection::vec(op_strategy(), 1..80)) {
        run(&ops, 4);
    }

    /// Real node sizes.
    #[test]
    fn full_nodes_match_model(ops in prop::collection::vec(op_strategy(), 1..60)) {
        run(&ops, 0);
    }

    /// The data pipeline on (dedup, compression, encryption in every
    /// combination) over data that repeats: reads equal the model and fsck
    /// finds every reference count exact — through snapshot, clone and
    /// volume deletion, reopen and crash.
    #[test]
    fn pipeline_matches_model(
        ops in prop::collection::vec(op_strategy(), 1..70),
        dedup in any::<bool>(),
        level in prop_oneof![Just(0u8), 1u8..=29],
        cipher in prop_oneof![Just(None), Just(Some(Cipher::Aes256Xts)), Just(Some(Cipher::Sm4Xts)), Just(Some(Cipher::Aes128Xts))],
        fanout in prop_oneof![Just(4u32), Just(0u32)],
    ) {
        run_with(&ops, fanout, Some(DataPolicy { dedup, compression: level, encryption: cipher }));
    }
}

#[test]
fn snapshot_chain_and_clones_share_space() {
    let dev = Arc::new(MemDev::new(256 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = Pool::open(dev.clone(), &OpenOptions::default()).unwrap();
    let v = pool.create_volume("db", 64 << 20, 65536).unwrap();
    let data = vec![0xabu8; 32 << 20];
    pool.write(v.id, 0, &data).unwrap();
    pool.flush().unwrap();
    let used0 = pool.space().unwrap().used_bytes;
    let mut snaps = Vec::new();
    for i in 0..20u64 {
        pool.write(v.id, i * 65536, &[i as u8 + 1; 65536]).unwrap();
        snaps.push(
            pool.create_snapshot("db", &format!("s{i}"), serde_json::Value::Null)
                .unwrap()
                .id,
        );
        pool.flush().unwrap();
    }
    // 20 changed blocks plus metadata, not 20 copies.
    let grown = pool.space().unwrap().used_bytes - used0;
    assert!(
        grown < 20 * 65536 + (4 << 20),
        "snapshots cost {grown} bytes"
    );
    let c = pool.clone_snapshot(snaps[5], "dev1").unwrap();
    assert_eq!(c.unique_bytes, 0);
    let mut b = vec![0u8; 65536];
    pool.read(cdmfs::Target::Volume(c.id), 3 * 65536, &mut b)
        .unwrap();
    assert_eq!(b, vec![4u8; 65536]);
    pool.read(cdmfs::Target::Volume(c.id), 7 * 65536, &mut b)
        .unwrap();
    assert_eq!(b, vec![0xab; 65536]);
    // Deleting every snapshot and the clone returns the space.
    for s in snaps {
        pool.delete_snapshot(s).unwrap();
    }
    pool.delete_volume("dev1", false).unwrap();
    for _ in 0..3 {
        pool.flush().unwrap();
        pool.write(v.id, 0, &[1; 512]).unwrap();
    }
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
    let info = pool.volume("db").unwrap();
    assert_eq!(info.allocated_bytes, 32 << 20);
    // The small writes at offset 0 left a 4 KiB piece over block 0: the
    // volume owns it besides its blocks.
    assert_eq!(info.unique_bytes, (32 << 20) + 4096);
}

#[test]
fn regression_zero_after_snapshot() {
    run(
        &[
            Op::Write {
                v: 0,
                off: 3817848832,
                len: 16385,
                seed: 0,
            },
            Op::Zero {
                v: 0,
                off: 536399855,
                len: 1,
            },
            Op::Write {
                v: 0,
                off: 404621506,
                len: 67391,
                seed: 0,
            },
            Op::Snapshot { v: 0 },
            Op::Zero {
                v: 0,
                off: 3243437978,
                len: 90214,
            },
        ],
        4,
    );
}

/// The test data identifies itself: within and across writes, volumes and
/// generations no two sectors are equal, so a read served from the wrong
/// offset, volume or an older write never matches the model; `repetitive`
/// data repeats only at DEDUP_REPEAT (and across volumes, for dedup); a bad
/// sector decodes to where it came from.
#[test]
fn test_data_sectors_identify_themselves() {
    use common::{describe_sector, pattern, repetitive, vol_tag, DEDUP_REPEAT, SECTOR};
    use std::collections::{BTreeMap, HashSet};
    let s = SECTOR as usize;
    let mut seen = HashSet::new();
    for vol in ["v0", "v1"] {
        for gen in [1u64, 2] {
            let d = pattern(vol, gen, 0, 512 << 10);
            for c in d.chunks(s) {
                assert!(seen.insert(c.to_vec()), "a sector repeats");
            }
        }
    }
    // An unaligned write holds the same sectors as an aligned one.
    assert_eq!(
        pattern("v0", 7, 1000, 3000),
        pattern("v0", 7, 0, 4000)[1000..]
    );
    // Dedup data: no repeat within DEDUP_REPEAT, a repeat at it, and the
    // same blocks at the same offsets for seeds of one class.
    let r = repetitive(5, 0, 2 * DEDUP_REPEAT as usize);
    let (a, b) = r.split_at(DEDUP_REPEAT as usize);
    assert_eq!(a, b);
    let distinct: HashSet<&[u8]> = a.chunks(s).collect();
    assert_eq!(distinct.len(), a.len() / s);
    assert_eq!(repetitive(13, 8192, 4096), repetitive(5, 8192, 4096));
    assert_ne!(repetitive(6, 8192, 4096), repetitive(5, 8192, 4096));
    // Decoding.
    let names: BTreeMap<u64, String> = [(vol_tag("v1"), "v1".to_string())].into();
    let d = pattern("v1", 42, 0, 8192);
    assert_eq!(
        describe_sector(&d[4096..4608], &names),
        "volume v1, offset 4096, generation 42"
    );
    assert_eq!(describe_sector(&[0u8; 512], &names), "zeros");
    // A sector whose header mixes two sectors, and one whose filler does.
    let mut torn = d[..512].to_vec();
    torn[..16].copy_from_slice(&d[512..528]);
    assert!(describe_sector(&torn, &names).starts_with("no valid stamp"));
    let mut mixed = d[..512].to_vec();
    mixed[256..].copy_from_slice(&d[768..1024]);
    assert!(describe_sector(&mixed, &names).ends_with("(filler differs)"));
}

/// Page writes into a mapped volume with large blocks store only the pages
/// (a snapshot's growth is what was written, not a block per page), the
/// pieces per block stay bounded however many land, and everything reads
/// back.
#[test]
fn page_writes_store_only_the_pages_and_pieces_stay_bounded() {
    use common::{stamped, vol_tag};
    use rand::{Rng, SeedableRng};
    let dev = Arc::new(MemDev::new(256 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let pool = Pool::open(dev.clone(), &OpenOptions::default()).unwrap();
    const SIZE: usize = 16 << 20;
    let v = pool.create_volume("db", SIZE as u64, 65536).unwrap();
    let tag = vol_tag("db");
    let mut model = stamped(tag, 1, 0, SIZE, true);
    pool.write(v.id, 0, &model).unwrap();
    pool.create_snapshot("db", "full", serde_json::Value::Null)
        .unwrap();
    pool.flush().unwrap();
    // 1% of the 8 KiB pages change between two snapshots.
    let mut r = rand::rngs::StdRng::seed_from_u64(7);
    let used0 = pool.space().unwrap().used_bytes;
    let pages = SIZE / 8192 / 100;
    for g in 0..pages as u64 {
        let off = r.gen_range(0..SIZE / 8192) * 8192;
        let d = stamped(tag, 2 + g, off as u64, 8192, true);
        pool.write(v.id, off as u64, &d).unwrap();
        model[off..off + 8192].copy_from_slice(&d);
    }
    pool.create_snapshot("db", "next", serde_json::Value::Null)
        .unwrap();
    pool.flush().unwrap();
    let grown = pool.space().unwrap().used_bytes - used0;
    // The pages, plus the leaves and paths they touched (at most one 4 KiB
    // node per page, three levels). A whole 64 KiB block per page would be
    // 8 times the pages.
    let written = (pages * 8192) as u64;
    assert!(
        grown <= written + pages as u64 * 3 * 4096,
        "1% of the pages cost {grown} bytes for {written} written"
    );
    // Many more random 4 KiB writes: pieces pile up and fold, but a block
    // never holds more than a whole-block extent and 8 pieces.
    for g in 0..20_000u64 {
        let off = r.gen_range(0..SIZE / 4096) * 4096;
        let d = stamped(tag, 1000 + g, off as u64, 4096, true);
        pool.write(v.id, off as u64, &d).unwrap();
        model[off..off + 4096].copy_from_slice(&d);
    }
    let map = pool.physical_map(cdmfs::Target::Volume(v.id)).unwrap();
    let blocks = SIZE / 65536;
    assert!(
        map.extents.len() <= blocks * 9,
        "{} extents for {blocks} blocks",
        map.extents.len()
    );
    assert!(map.extents.len() > blocks, "no pieces were made");
    pool.close().unwrap();
    let pool = Pool::open(dev, &OpenOptions::default()).unwrap();
    let got = common::read_all(&pool, cdmfs::Target::Volume(v.id), SIZE).unwrap();
    if let Some(d) = common::first_difference(&got, &model, &Default::default()) {
        panic!("after page writes: {d}");
    }
    let rep = pool.fsck().unwrap();
    assert!(rep.is_clean(), "{:?}", rep.errors);
}

//! Power-cut tests: run a random workload on a device that loses power after
//! a random number of writes, tearing every write not yet synced. After
//! reopening, the pool must hold exactly the last flushed state (or the state
//! of the flush that was under way), every snapshot must read back exactly,
//! and fsck must be clean.
//!
//! `CDMFS_CRASH_CUTS` sets the number of cut points (default 240);
//! `scripts/crash-soak` runs thousands.

mod common;

use std::sync::Arc;

use cdmfs::{
    BlockDev, Cipher, CrashDev, DataPolicy, FormatOptions, KeySource, MemDev, OpenOptions, Pool,
};
use common::{random_op, Harness, Model, Op};
use rand::{Rng, SeedableRng};

fn one_cut(seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let crash = Arc::new(CrashDev::new(48 << 20));
    let fanout = if seed.is_multiple_of(2) { 4 } else { 0 };
    Pool::format(&*crash, &FormatOptions { max_fanout: fanout }).unwrap();
    crash.sync().unwrap();
    // Commits happen only at flushes in this test, so the model knows which
    // states may survive.
    // Every third cut runs with the whole data pipeline on.
    let pipeline = seed % 3 == 1;
    let opts = OpenOptions {
        cache_nodes: 128,
        dirty_limit: 1 << 30,
        key: pipeline.then(|| KeySource::Key(vec![seed as u8; 32])),
    };
    let mut h = Harness::new(crash.clone(), opts.clone());
    if pipeline {
        h.policy = DataPolicy {
            dedup: true,
            compression: 8,
            encryption: Some(Cipher::Aes256Xts),
        };
        h.repetitive = true;
    }
    h.apply(&Op::Create {
        size_kib: 400,
        bs_shift: (seed % 3) as u8,
    })
    .unwrap();
    h.apply(&Op::Flush).unwrap();
    crash.cut_after(rng.gen_range(0..600));
    let mut in_flight: Option<Model> = None;
    for _ in 0..400 {
        let op = random_op(&mut rng, false);
        let before = h.model.clone();
        if h.apply(&op).is_err() {
            if matches!(op, Op::Flush) {
                in_flight = Some(before);
            }
            break;
        }
    }
    if !crash.is_dead() {
        crash.cut_now();
    }
    drop(h.pool.take());
    let image = crash.crash_image(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let dev: Arc<dyn BlockDev> = Arc::new(MemDev::from_image(image));
    let pool = Pool::open(dev.clone(), &opts)
        .unwrap_or_else(|e| panic!("seed {seed}: reopen failed: {e}"));
    let survivor = Harness {
        dev,
        pool: Some(pool),
        model: h.durable.clone(),
        durable: h.durable.clone(),
        opts,
        policy: h.policy,
        repetitive: h.repetitive,
    };
    let ok_durable = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        survivor.check_all(&h.durable)
    }));
    if ok_durable.is_err() {
        let m = in_flight.unwrap_or_else(|| {
            panic!("seed {seed}: state after the cut is not the last flushed state")
        });
        survivor.check_all(&m);
    }
    let rep = survivor.pool().fsck().unwrap();
    assert!(
        rep.is_clean(),
        "seed {seed}: fsck after the cut: {:#?}",
        rep.errors
    );
    // The pool keeps working after recovery.
    let p = survivor.pool.unwrap();
    let v = p.create_volume("after-cut", 1 << 20, 4096).unwrap();
    p.write(v.id, 4096, &[7u8; 9000]).unwrap();
    p.close().unwrap();
}

#[test]
fn power_cuts_at_random_points() {
    let cuts: u64 = std::env::var("CDMFS_CRASH_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(240);
    let base: u64 = std::env::var("CDMFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for seed in base..base + cuts {
        one_cut(seed);
    }
}

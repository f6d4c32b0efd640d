//! The tier's jobs against a real S3 server (s3s-fs on loopback, or the
//! server `CDM_S3_*` names: scripts/test-s3-garage) and a
//! pool on a file: old points' own data packed into few large objects,
//! read back bit-exact through the cache (cold, then warm), damage in the
//! store named by scrub, recall, repack and GC, wrong credentials and a
//! store that goes away.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cdm_e2e::s3::{flip_object_byte, read_object, S3Server};
use cdm_tier::{
    engine_reader, gc_and_repack, recall_point, tier_points, CacheConfig, Control, JobError,
    PackCache, PackSizes, S3Config, S3Store, TierError, TierMetrics, TierReader, PACKS_DIR,
};
use cdmfs::{Cipher, DataPolicy, FileDev, FormatOptions, KeySource, OpenOptions, Pool, Target};

const MIB: u64 = 1 << 20;
const BS: u64 = 65536;

fn block(b: u64, version: u64) -> Vec<u8> {
    let mut x = (b << 20 | version) * 2 + 1;
    let mut v = Vec::with_capacity(BS as usize);
    while v.len() < BS as usize / 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.resize(BS as usize, (b % 241) as u8);
    v
}

struct Fixture {
    _dir: tempfile::TempDir,
    pool: Pool,
    store: Arc<S3Store>,
    metrics: Arc<TierMetrics>,
    cache_dir: std::path::PathBuf,
    vol: u64,
    s1: u64,
    s2: u64,
    /// Contents of s1, s2 and the volume.
    gens: Vec<Vec<u8>>,
}

fn config(s3: &S3Server) -> S3Config {
    let mut c = s3.config();
    c.retries = 1;
    c.timeout = std::time::Duration::from_secs(5);
    c
}

/// A 32 MiB volume: s1, then its first 16 MiB rewritten, s2, then 8 MiB
/// more rewritten. s1 owns 16 MiB alone; s1+s2 own 24 MiB.
fn fixture(s3: &S3Server, policy: DataPolicy) -> Fixture {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("pool");
    let key = policy.encryption.map(|_| KeySource::Key(vec![0x42; 32]));
    let dev = FileDev::create(&path, 256 * MIB).unwrap();
    Pool::format(&dev, &FormatOptions::default()).unwrap();
    let pool = Pool::open(
        Arc::new(dev),
        &OpenOptions {
            key,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let vol = pool
        .create_volume_with("db", 32 * MIB, BS as u32, policy)
        .unwrap()
        .id;
    let mut data: Vec<u8> = (0..32 * MIB / BS).flat_map(|b| block(b, 0)).collect();
    // Written in 1 MiB requests, as a host would.
    for (i, c) in data.chunks(MIB as usize).enumerate() {
        pool.write(vol, i as u64 * MIB, c).unwrap();
    }
    let s1 = pool
        .create_snapshot("db", "s1", serde_json::json!({}))
        .unwrap()
        .id;
    let mut gens = vec![data.clone()];
    for b in 0..16 * MIB / BS {
        let d = block(b, 1);
        data[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&d);
    }
    for (i, c) in data[..(16 * MIB) as usize].chunks(MIB as usize).enumerate() {
        pool.write(vol, i as u64 * MIB, c).unwrap();
    }
    let s2 = pool
        .create_snapshot("db", "s2", serde_json::json!({}))
        .unwrap()
        .id;
    gens.push(data.clone());
    for b in 16 * MIB / BS..24 * MIB / BS {
        let d = block(b, 2);
        data[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&d);
    }
    for (i, c) in data[(16 * MIB) as usize..(24 * MIB) as usize]
        .chunks(MIB as usize)
        .enumerate()
    {
        pool.write(vol, 16 * MIB + i as u64 * MIB, c).unwrap();
    }
    gens.push(data);
    pool.flush().unwrap();
    let metrics = Arc::new(TierMetrics::default());
    let store = Arc::new(S3Store::with_metrics(config(s3), metrics.clone()).unwrap());
    let cache_dir = dir.path().join("cache");
    let f = Fixture {
        _dir: dir,
        pool,
        store,
        metrics,
        cache_dir,
        vol,
        s1,
        s2,
        gens,
    };
    f.attach(64 * MIB);
    f
}

impl Fixture {
    /// A fresh cache of `budget` bytes in front of the store.
    fn attach(&self, budget: u64) {
        let _ = std::fs::remove_dir_all(&self.cache_dir);
        let cache = PackCache::open(
            CacheConfig::new(&self.cache_dir, budget),
            self.metrics.clone(),
        )
        .unwrap();
        let reader = Arc::new(TierReader::new(self.store.clone(), cache));
        self.pool.set_tier(Some(engine_reader(reader)));
    }

    fn read(&self, t: Target) -> cdmfs::Result<Vec<u8>> {
        let mut b = vec![0u8; (32 * MIB) as usize];
        // In 1 MiB reads, sequentially, as a restore would.
        for (i, c) in b.chunks_mut(MIB as usize).enumerate() {
            self.pool.read(t, i as u64 * MIB, c)?;
        }
        Ok(b)
    }

    fn check(&self) {
        assert!(
            self.read(Target::Snapshot(self.s1)).unwrap() == self.gens[0],
            "s1"
        );
        assert!(
            self.read(Target::Snapshot(self.s2)).unwrap() == self.gens[1],
            "s2"
        );
        assert!(
            self.read(Target::Volume(self.vol)).unwrap() == self.gens[2],
            "volume"
        );
        let r = self.pool.fsck().unwrap();
        assert!(r.is_clean(), "{:?}", r.errors);
    }

    fn packs(&self) -> Vec<(String, u64)> {
        self.store.list(PACKS_DIR).unwrap()
    }
}

fn ctl() -> (AtomicBool, impl Fn(u64, u64) + Sync) {
    (AtomicBool::new(false), |_: u64, _: u64| {})
}

#[test]
fn old_points_tier_into_few_objects_and_read_back() {
    let s3 = S3Server::start();
    let f = fixture(&s3, DataPolicy::default());
    let (cancel, progress) = ctl();
    let c = Control {
        cancel: &cancel,
        progress: &progress,
    };
    let used0 = f.pool.space().unwrap().used_bytes;
    let sizes = PackSizes {
        pack_bytes: 16 * MIB,
        commit_bytes: 64 * MIB,
    };
    let rep = tier_points(&f.pool, &f.store, &[f.s1], sizes, &c).unwrap();
    // 256 objects of 64 KiB in one 16 MiB pack: 1 PUT and 1 HEAD where
    // one object per chunk would cost 256 of each.
    assert_eq!(
        (rep.objects, rep.bytes, rep.packs),
        (256, 16 * MIB, 1),
        "{rep:?}"
    );
    assert_eq!(f.packs().len(), 1);
    assert!(f.pool.snapshot(f.s1).unwrap().tiered);
    for _ in 0..4 {
        f.pool.commit().unwrap();
    }
    let used1 = f.pool.space().unwrap().used_bytes;
    // 16 MiB freed, less the few tree nodes copy-on-write rewrote.
    assert!(
        used0 - used1 >= 16 * MIB - BS,
        "freed {} bytes",
        used0 - used1
    );

    // Cold: every chunk comes from the store; warm: from the cache.
    let gets0 = f.metrics.requests(cdm_tier::Op::Get);
    f.check();
    let cold = f.metrics.requests(cdm_tier::Op::Get) - gets0;
    assert!((1..=32).contains(&cold), "{cold} GETs for 16 MiB cold");
    // Read-ahead still in flight finishes first.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let gets1 = f.metrics.requests(cdm_tier::Op::Get);
    assert!(f.read(Target::Snapshot(f.s1)).unwrap() == f.gens[0]);
    assert_eq!(
        f.metrics.requests(cdm_tier::Op::Get),
        gets1,
        "warm reads hit the cache"
    );

    // An instant recovery: a clone of the tiered point, written locally.
    let clone = f.pool.clone_snapshot(f.s1, "instant").unwrap().id;
    f.pool.write(clone, 5 * MIB + 123, b"hello").unwrap();
    let mut want = f.gens[0].clone();
    want[(5 * MIB + 123) as usize..(5 * MIB + 128) as usize].copy_from_slice(b"hello");
    assert!(f.read(Target::Volume(clone)).unwrap() == want);
    f.pool.delete_volume("instant", true).unwrap();

    // Damage behind our back: scrub names the point and the offset.
    let (key, _) = &f.packs()[0];
    let at = 3 * BS as usize + 1000;
    flip_object_byte(&f.store, key, at, 0x55);
    let scrub = f.pool.scrub().unwrap();
    assert_eq!(scrub.errors.len(), 1, "{:?}", scrub.errors);
    assert!(scrub.errors[0].target.ends_with(&format!("@{}", f.s1)));
    assert!(scrub.errors[0]
        .what
        .contains("tiered data checksum mismatch"));
    flip_object_byte(&f.store, key, at, 0x55);
    assert!(f.pool.scrub().unwrap().errors.is_empty());

    // Recall: the point reads with the store gone.
    let r = recall_point(&f.pool, &f.store, f.s1, &c).unwrap();
    assert_eq!((r.objects, r.bytes), (256, 16 * MIB));
    assert!(r.requests <= 2, "{r:?}");
    assert!(!f.pool.snapshot(f.s1).unwrap().tiered);
    f.pool.set_tier(None);
    f.check();
}

#[test]
fn encrypted_volumes_put_no_plaintext_in_the_store() {
    let s3 = S3Server::start();
    let policy = DataPolicy {
        compression: 3,
        encryption: Some(Cipher::Aes256Xts),
        dedup: true,
    };
    let f = fixture(&s3, policy);
    let (cancel, progress) = ctl();
    let c = Control {
        cancel: &cancel,
        progress: &progress,
    };
    let rep = tier_points(&f.pool, &f.store, &[f.s1, f.s2], PackSizes::default(), &c).unwrap();
    assert!(rep.objects > 0 && rep.packs == 1, "{rep:?}");
    f.check();
    let mut all = Vec::new();
    for (key, _) in f.packs() {
        all.extend(read_object(&f.store, &key));
    }
    for b in (0..16 * MIB / BS).step_by(7) {
        let needle = &f.gens[0][(b * BS) as usize..(b * BS) as usize + 48];
        assert!(!all.windows(48).any(|w| w == needle), "block {b} in clear");
    }
}

#[test]
fn repack_and_gc_reclaim_what_deleted_points_left() {
    let s3 = S3Server::start();
    let f = fixture(&s3, DataPolicy::default());
    let (cancel, progress) = ctl();
    let c = Control {
        cancel: &cancel,
        progress: &progress,
    };
    // One pack holding s1's 16 MiB and s2's 8 MiB.
    let rep = tier_points(&f.pool, &f.store, &[f.s1, f.s2], PackSizes::default(), &c).unwrap();
    assert_eq!((rep.bytes, rep.packs), (24 * MIB, 1), "{rep:?}");
    // An orphan from a run that died before its commit.
    f.store.put(&cdm_tier::pack_key(999), b"orphan").unwrap();
    // s1 goes: two thirds of the pack are garbage.
    f.pool.delete_snapshot(f.s1).unwrap();
    f.pool.commit().unwrap();
    let g = gc_and_repack(&f.pool, &f.store, 0.5, PackSizes::default(), &c).unwrap();
    assert_eq!(g.repacked_packs, 1, "{g:?}");
    assert_eq!(g.repacked_bytes, 8 * MIB);
    assert_eq!(g.gc.deleted, 2, "the old pack and the orphan: {g:?}");
    let packs = f.packs();
    assert_eq!(packs.len(), 1);
    assert_eq!(packs[0].1, 8 * MIB);
    assert!(f.read(Target::Snapshot(f.s2)).unwrap() == f.gens[1]);
    assert!(f.pool.fsck().unwrap().is_clean());
    // s2 goes too: nothing is referenced, GC empties the prefix.
    f.pool.delete_snapshot(f.s2).unwrap();
    f.pool.commit().unwrap();
    let g = gc_and_repack(&f.pool, &f.store, 0.5, PackSizes::default(), &c).unwrap();
    assert_eq!((g.repacked_packs, g.gc.deleted), (0, 1), "{g:?}");
    assert!(f.packs().is_empty());
}

#[test]
fn wrong_credentials_move_nothing() {
    let s3 = S3Server::start();
    let f = fixture(&s3, DataPolicy::default());
    let (cancel, progress) = ctl();
    let c = Control {
        cancel: &cancel,
        progress: &progress,
    };
    let mut bad = config(&s3);
    bad.secret_key = "not-the-secret".into();
    let bad = S3Store::new(bad).unwrap();
    match tier_points(&f.pool, &bad, &[f.s1], PackSizes::default(), &c) {
        Err(JobError::Store(TierError::BadCredentials { .. })) => {}
        other => panic!("expected refused credentials, got {other:?}"),
    }
    assert!(f.pool.tier_entries().unwrap().is_empty());
    assert!(
        f.pool.tier_packs().unwrap().is_empty(),
        "reservations released"
    );
    assert!(!f.pool.snapshot(f.s1).unwrap().tiered);
    f.check();
}

/// Kills the server: s3s-fs only (scripts/test-s3-garage leaves it out).
#[test]
fn a_lost_store_fails_only_its_reads() {
    let mut s3 = S3Server::start();
    let f = fixture(&s3, DataPolicy::default());
    let (cancel, progress) = ctl();
    let c = Control {
        cancel: &cancel,
        progress: &progress,
    };
    tier_points(&f.pool, &f.store, &[f.s1], PackSizes::default(), &c).unwrap();
    f.attach(64 * MIB);
    s3.kill();
    let err = f.read(Target::Snapshot(f.s1)).unwrap_err();
    assert!(matches!(err, cdmfs::Error::Tier(_)), "{err}");
    // Everything local still reads.
    assert!(f.read(Target::Snapshot(f.s2)).unwrap() == f.gens[1]);
    assert!(f.read(Target::Volume(f.vol)).unwrap() == f.gens[2]);
    s3.restart();
    f.check();
}

//! Raw sends in one process (`docs/replication.md`, "Raw sends"): A's
//! pool has a key, B's and C's have none. A child of `tests`, whose
//! appliances and helpers it uses.

use cdmfs::{Cipher, DataPolicy, KeySource};

use super::*;
use crate::replication::error::ReplError;

/// Text that must never appear in a pool that holds only ciphertext.
const TEXT: &[u8] = b"THE-DISTINCTIVE-PLAINTEXT-OF-VOLUME-V-ON-A";

fn key() -> KeySource {
    KeySource::Key(vec![0x42; 32])
}

fn encrypted() -> DataPolicy {
    DataPolicy {
        dedup: true,
        compression: 0,
        encryption: Some(Cipher::Aes256Xts),
    }
}

/// Sends `volume` from `from` (identity `from_id`) to `to`, raw or not.
fn send(
    from: &Tgt,
    from_id: &str,
    to: &Tgt,
    volume: &str,
    raw: bool,
) -> Result<Vec<TransferRecord>, ReplError> {
    let http = to.http();
    let cancel = AtomicBool::new(false);
    run(SendRequest {
        pool: &from.pool,
        state: &from.state,
        identity: from_id,
        volume,
        peer_name: "peer",
        http: &http,
        keep_last: None,
        keep_days: None,
        raw,
        throttle: &Throttle::unlimited(),
        cancel: &cancel,
        progress: &|_, _| {},
        log: &|l| eprintln!("sender {from_id}: {l}"),
    })
}

/// Writes [`TEXT`] over and over into block `block` of `vol`.
fn write_text(pool: &Pool, vol: &str, block: u64) {
    let id = pool.volume_id(vol).unwrap();
    let buf: Vec<u8> = TEXT.iter().copied().cycle().take(BS as usize).collect();
    pool.write(id, block * BS as u64, &buf).unwrap();
}

/// Whether the pool file in `dir` holds [`TEXT`] anywhere.
fn pool_file_has_text(dir: &Path) -> bool {
    let bytes = std::fs::read(dir.join("pool")).unwrap();
    bytes.windows(TEXT.len()).any(|w| w == TEXT)
}

#[test]
fn raw_sends_cascade_open_with_the_source_key_and_fail_back_incrementally() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids: Vec<String> = dirs.iter().map(|d| identity_of(d.path())).collect();
    let peer = |i: usize, name: &str| PeerId {
        name: name.into(),
        identity: ids[i].clone(),
        cert_sha256: format!("cert-{i}"),
    };
    // A is called by B (the way back), B by A, C by B. Only A has a key.
    let a = Tgt::start_keyed(dirs[0].path(), peer(1, "b"), Some(key()));
    let b = Tgt::start(dirs[1].path(), peer(0, "a"));
    let c = Tgt::start(dirs[2].path(), peer(1, "b"));
    a.pool
        .create_volume_with("v", SIZE, BS, encrypted())
        .unwrap();
    // The check below can find the text in a pool file: A's plain volume.
    a.pool.create_volume("plain", SIZE, BS).unwrap();
    write_text(&a.pool, "plain", 0);
    write_random(&a.pool, "v", &mut rng, 800);
    write_text(&a.pool, "v", 5);
    let p1 = snap(&a.pool, "v", "p1");
    write_random(&a.pool, "v", &mut rng, 80);
    write_text(&a.pool, "v", 9);
    let p2 = snap(&a.pool, "v", "p2");
    a.pool.flush().unwrap();
    assert!(pool_file_has_text(dirs[0].path()));

    // Re-encryption needs a key B lacks; a raw send needs none.
    let e = send(&a, &ids[0], &b, "v", false).unwrap_err();
    assert!(e.is("key_required"), "{e}");
    let recs = send(&a, &ids[0], &b, "v", true).unwrap();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r.raw && r.result == "ok"), "{recs:?}");
    let info = b.pool.volume("v").unwrap();
    let seal = info.seal.clone().expect("B's replica is sealed");
    assert!(!info.seal_key_loaded);
    assert_eq!(info.policy.encryption, None);
    assert!(info.policy.dedup && info.policy.compression > 0);
    let on_b = replicas::points(&b.pool, "v", &ids[1]).unwrap();
    assert_eq!(on_b.len(), 2);
    let mut buf = vec![0u8; BS as usize];
    let e = b
        .pool
        .read(Target::Snapshot(on_b[0].0.id), 5 * BS as u64, &mut buf)
        .unwrap_err();
    assert!(matches!(e, cdmfs::Error::SealKeyRequired(_)), "{e}");
    b.pool.flush().unwrap();
    assert!(!pool_file_has_text(dirs[1].path()));

    // B→C: B holds no key, so it sends what it stores, whatever asked.
    let recs = send(&b, &ids[1], &c, "v", false).unwrap();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r.raw), "{recs:?}");
    assert!(recs[0].message.contains("sent raw"), "{}", recs[0].message);
    assert_eq!(c.pool.volume("v").unwrap().seal.as_ref(), Some(&seal));
    c.pool.flush().unwrap();
    assert!(!pool_file_has_text(dirs[2].path()));
    // A wrong key is refused; A's key opens every point on C.
    let e = c
        .pool
        .load_seal_key(&seal, &KeySource::Key(vec![7; 32]))
        .unwrap_err();
    assert!(matches!(e, cdmfs::Error::WrongKey(_)), "{e}");
    c.pool.load_seal_key(&seal, &key()).unwrap();
    let on_c = replicas::points(&c.pool, "v", &ids[2]).unwrap();
    for ((s, pid), orig) in on_c.iter().zip([p1, p2]) {
        assert_eq!(pid, &format!("{}:{orig}", ids[0]));
        assert!(same_point(&a.pool, orig, &c.pool, s.id));
    }
    c.pool
        .read(Target::Snapshot(on_c[1].0.id), 9 * BS as u64, &mut buf)
        .unwrap();
    assert_eq!(&buf[..TEXT.len()], TEXT);

    // An incremental sends about the changed blocks only.
    let id = a.pool.volume_id("v").unwrap();
    for k in 0..10u64 {
        rng.fill_bytes(&mut buf);
        a.pool.write(id, k * 11 * BS as u64, &buf).unwrap();
    }
    let p3 = snap(&a.pool, "v", "p3");
    let r = &send(&a, &ids[0], &b, "v", true).unwrap()[0];
    assert!(!r.full && r.raw);
    assert!(r.bytes_sent < 20 * BS as u64, "{}", r.bytes_sent);
    assert!(r.bytes_sent > 10 * BS as u64, "{}", r.bytes_sent);
    // A transfer that is not raw never lands in the sealed replica.
    write_text(&a.pool, "v", 3);
    snap(&a.pool, "v", "p4");
    let e = send(&a, &ids[0], &b, "v", false).unwrap_err();
    assert!(e.is("seal_mismatch"), "{e}");
    assert!(e.message.contains("sealed"), "{e}");

    // Failover: B's replica is promoted; with A's key B writes to it.
    replicas::promote(&b.state, &b.pool, "v").unwrap();
    let bid = b.pool.volume_id("v").unwrap();
    let e = b.pool.write(bid, 0, &buf).unwrap_err();
    assert!(matches!(e, cdmfs::Error::SealKeyRequired(_)), "{e}");
    b.pool.load_seal_key(&seal, &key()).unwrap();
    for k in 0..20u64 {
        rng.fill_bytes(&mut buf);
        b.pool.write(bid, k * 7 * BS as u64, &buf).unwrap();
    }
    let b1 = snap(&b.pool, "v", "b1");
    replicas::demote(&a.state, &a.pool, "v", &peer(1, "b")).unwrap();
    // Back to A from the newest common point (A's p3), not in full: B
    // sends it sealed, A unseals it with its own key.
    let recs = send(&b, &ids[1], &a, "v", false).unwrap();
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert!(r.raw && !r.full && r.full_resend.is_none(), "{r:?}");
    assert_eq!(r.base.as_deref(), Some(format!("{}:{p3}", ids[0]).as_str()));
    assert!(r.bytes_sent < 30 * BS as u64, "{}", r.bytes_sent);
    let info = a.pool.volume("v").unwrap();
    assert!(info.seal.is_none());
    assert_eq!(info.policy.encryption, Some(Cipher::Aes256Xts));
    let (s, pid) = replicas::points(&a.pool, "v", &ids[0])
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(pid, format!("{}:{b1}", ids[1]));
    assert!(same_point(&b.pool, b1, &a.pool, s.id));
}

#[test]
fn raw_refusals_plain_volumes_foreign_seals_and_appliances_without_the_key() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids: Vec<String> = dirs.iter().map(|d| identity_of(d.path())).collect();
    let peer = |i: usize, name: &str| PeerId {
        name: name.into(),
        identity: ids[i].clone(),
        cert_sha256: format!("cert-{i}"),
    };
    let a = Tgt::start_keyed(dirs[0].path(), peer(1, "b"), Some(key()));
    let b = Tgt::start(dirs[1].path(), peer(0, "a"));
    // X has a key of its own and receives from B.
    let x = Tgt::start_keyed(
        dirs[2].path(),
        peer(1, "b"),
        Some(KeySource::Key(vec![9; 32])),
    );
    // A raw send of a plain volume: there is no ciphertext to send.
    a.pool.create_volume("plain", SIZE, BS).unwrap();
    write_random(&a.pool, "plain", &mut rng, 50);
    snap(&a.pool, "plain", "p1");
    let e = send(&a, &ids[0], &b, "plain", true).unwrap_err();
    assert!(e.is("invalid"), "{e}");
    assert!(e.message.contains("not encrypted"), "{e}");
    assert!(b.pool.volume("plain").is_err());
    // A sealed volume goes to X raw; X has another key and cannot read it.
    a.pool
        .create_volume_with("v", SIZE, BS, encrypted())
        .unwrap();
    write_random(&a.pool, "v", &mut rng, 100);
    snap(&a.pool, "v", "p1");
    send(&a, &ids[0], &b, "v", true).unwrap();
    send(&b, &ids[1], &x, "v", false).unwrap();
    let on_x = replicas::points(&x.pool, "v", "x").unwrap();
    let mut buf = vec![0u8; BS as usize];
    let e = x
        .pool
        .read(Target::Snapshot(on_x[0].0.id), 0, &mut buf)
        .unwrap_err();
    assert!(matches!(e, cdmfs::Error::SealKeyRequired(_)), "{e}");
    // X's copy promoted and demoted again, then fed a raw point while it
    // is an ordinary replica of B: X cannot unseal it.
    replicas::promote(&x.state, &x.pool, "v").unwrap();
    x.pool.delete_volume("v", true).unwrap();
    x.pool.create_volume("v", SIZE, BS).unwrap();
    replicas::mark(&x.state, "v", &peer(1, "b")).unwrap();
    let e = send(&b, &ids[1], &x, "v", false).unwrap_err();
    assert!(e.is("key_required"), "{e}");
}

#[test]
fn a_cut_raw_transfer_resumes_under_its_seal_and_only_under_it() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids: Vec<String> = dirs.iter().map(|d| identity_of(d.path())).collect();
    let a_id = PeerId {
        name: "a".into(),
        identity: ids[0].clone(),
        cert_sha256: "cert-0".into(),
    };
    let a = Tgt::start_keyed(dirs[0].path(), a_id.clone(), Some(key()));
    let b = Tgt::start(dirs[1].path(), a_id);
    a.pool
        .create_volume_with("v", SIZE, BS, encrypted())
        .unwrap();
    write_random(&a.pool, "v", &mut rng, 800);
    let p1 = snap(&a.pool, "v", "p1");
    // Cut after the first batch: the session stays, sealed, at batch 1.
    b.faults.cut_after.store(1, Ordering::SeqCst);
    send(&a, &ids[0], &b, "v", true).unwrap_err();
    let s = sessions::get(&b.state, "v").unwrap().unwrap();
    assert_eq!(s.acked, 1);
    assert!(s.seal.is_some() && !s.unseal);
    b.faults.cut_after.store(0, Ordering::SeqCst);
    // A send that is not raw does not take it up: its token binds no seal.
    let e = send(&a, &ids[0], &b, "v", false).unwrap_err();
    assert!(e.is("seal_mismatch"), "{e}");
    let rec = e.records.last().unwrap();
    assert!(rec.message.contains("stale session"), "{}", rec.message);
    // The raw point starts over (its session was discarded) and lands.
    b.faults.puts.store(0, Ordering::SeqCst);
    b.faults.cut_after.store(1, Ordering::SeqCst);
    send(&a, &ids[0], &b, "v", true).unwrap_err();
    b.faults.cut_after.store(0, Ordering::SeqCst);
    let r = &send(&a, &ids[0], &b, "v", true).unwrap()[0];
    assert_eq!(r.resumed_from_batch, Some(2), "{r:?}");
    let on_b = replicas::points(&b.pool, "v", "b").unwrap();
    b.pool
        .load_seal_key(b.pool.volume("v").unwrap().seal.as_ref().unwrap(), &key())
        .unwrap();
    assert!(same_point(&a.pool, p1, &b.pool, on_b[0].0.id));
}

/// What a peer may not do with data sealed under this appliance's key.
#[path = "tests_raw_guard.rs"]
mod guard;

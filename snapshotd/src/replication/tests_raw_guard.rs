//! A peer holding this appliance's ciphertext must not get it decrypted
//! into a volume it can read (review finding 1), nor make this appliance
//! act on a seal record it did not check (finding 4).

use super::*;

/// A (keyed) raw-sends x, with [`TEXT`] in block 5, to P; P plain-sends
/// its own y to A. Returns (A, P, ids, dirs).
fn setup(p_key: Option<KeySource>, seed: u64) -> (Tgt, Tgt, Vec<String>, Vec<tempfile::TempDir>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids: Vec<String> = dirs.iter().map(|d| identity_of(d.path())).collect();
    let peer = |i: usize, name: &str| PeerId {
        name: name.into(),
        identity: ids[i].clone(),
        cert_sha256: format!("cert-{i}"),
    };
    let a = Tgt::start_keyed(dirs[0].path(), peer(1, "p"), Some(key()));
    let keyed = p_key.is_some();
    let p = Tgt::start_keyed(dirs[1].path(), peer(0, "a"), p_key);
    a.pool
        .create_volume_with("x", SIZE, BS, encrypted())
        .unwrap();
    write_random(&a.pool, "x", &mut rng, 50);
    write_text(&a.pool, "x", 5);
    snap(&a.pool, "x", "x1");
    send(&a, &ids[0], &p, "x", true).unwrap();
    if keyed {
        p.pool
            .create_volume_with("y", SIZE, BS, encrypted())
            .unwrap();
    } else {
        p.pool.create_volume("y", SIZE, BS).unwrap();
    }
    write_random(&p.pool, "y", &mut rng, 20);
    snap(&p.pool, "y", "y1");
    send(&p, &ids[1], &a, "y", false).unwrap();
    assert!(a.pool.volume("y").unwrap().seal.is_none());
    (a, p, ids, dirs)
}

/// P clones its sealed copy of x as `name` and takes a point of it.
fn clone_x_as(p: &Tgt, ids: &[String], name: &str) {
    let xs = replicas::points(&p.pool, "x", &ids[1]).unwrap()[0].0.id;
    if p.pool.volume(name).is_ok() {
        p.pool.delete_volume(name, true).unwrap();
    }
    p.pool.clone_snapshot(xs, name).unwrap();
    snap(&p.pool, name, "evil");
}

/// A's y: its points' ids, and whether its live tree holds [`TEXT`].
fn y_on_a(a: &Tgt) -> (Vec<u64>, bool) {
    let pts: Vec<u64> = replicas::points(&a.pool, "y", "")
        .unwrap()
        .iter()
        .map(|(s, _)| s.id)
        .collect();
    let id = a.pool.volume_id("y").unwrap();
    let mut buf = vec![0u8; BS as usize];
    a.pool
        .read(Target::Volume(id), 5 * BS as u64, &mut buf)
        .unwrap();
    (pts, &buf[..TEXT.len()] == TEXT)
}

fn assert_refused(a: &Tgt, p: &Tgt, ids: &[String], volume: &str) {
    let e = send(p, &ids[1], a, volume, false).unwrap_err();
    assert!(e.is("seal_mismatch"), "{e}");
    assert!(
        e.message.contains("delete the target's copy")
            || e.message.contains("volume it was sent from"),
        "{e}"
    );
}

#[test]
fn a_peer_cannot_have_another_volume_unsealed_into_its_replica() {
    let (a, p, ids, _d) = setup(Some(KeySource::Key(vec![9; 32])), 99);
    let before = y_on_a(&a);
    assert!(!before.1);
    // P (without A's key) replaces its y by a clone of its sealed copy of
    // x: the transfer is under A's own key but not from A's y.
    clone_x_as(&p, &ids, "y");
    assert_refused(&a, &p, &ids, "y");
    assert_eq!(y_on_a(&a), before, "the refused transfer changed A's y");
    // Nor as a new volume: no sealed replica under A's own key, which A
    // would read.
    clone_x_as(&p, &ids, "z");
    assert_refused(&a, &p, &ids, "z");
    assert!(matches!(a.pool.volume("z"), Err(cdmfs::Error::NotFound(_))));
}

#[test]
fn a_keyless_peer_cannot_have_another_volume_unsealed_into_a_plain_replica() {
    let (a, p, ids, _d) = setup(None, 97);
    clone_x_as(&p, &ids, "z");
    assert_refused(&a, &p, &ids, "z");
    assert!(matches!(a.pool.volume("z"), Err(cdmfs::Error::NotFound(_))));
    let before = y_on_a(&a);
    clone_x_as(&p, &ids, "y");
    assert_refused(&a, &p, &ids, "y");
    assert_eq!(y_on_a(&a), before, "the refused transfer changed A's y");
}

/// A session-open body for `volume` with `seal`.
fn open_body(volume: &str, seal: &cdmfs::SealRec) -> serde_json::Value {
    serde_json::json!({
        "id": "ab".repeat(16),
        "volume": volume,
        "size": SIZE,
        "block_size": BS,
        "base": null,
        "point": crate::replication::sessions::PointMeta {
            point: "p:1".into(),
            label: "l".into(),
            metadata: serde_json::Value::Null,
            created_ns: 1,
        },
        "keep_last": null,
        "keep_days": null,
        "token": "00",
        "seal": seal,
    })
}

#[test]
fn a_peer_seal_record_is_checked_when_a_session_opens() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids: Vec<String> = dirs.iter().map(|d| identity_of(d.path())).collect();
    let pa = PeerId {
        name: "a".into(),
        identity: ids[0].clone(),
        cert_sha256: "c0".into(),
    };
    let a = Tgt::start_keyed(dirs[0].path(), pa.clone(), Some(key()));
    let b = Tgt::start(dirs[1].path(), pa);
    a.pool
        .create_volume_with("v", SIZE, BS, encrypted())
        .unwrap();
    let id = a.pool.volume_id("v").unwrap();
    let good = a.pool.seal_for_send(Target::Volume(id)).unwrap();
    let mut costly = good.clone();
    costly.crypto.kdf = "argon2id".into();
    costly.crypto.m_kib = 4 << 20;
    let mut unknown = good.clone();
    unknown.crypto.kdf = "rot13".into();
    let mut geometry = good.clone();
    geometry.block_size = 8192;
    let http = b.http();
    for (seal, why) in [
        (&costly, "Argon2id cost"),
        (&unknown, "unknown key derivation"),
        (&geometry, "blocks of 8192"),
    ] {
        let e = http
            .post_json::<_, serde_json::Value>(
                "/repl/v1/sessions",
                &open_body("v", seal),
                &Throttle::unlimited(),
            )
            .unwrap_err();
        assert!(e.is("bad_request") && e.message.contains(why), "{e}");
        assert!(matches!(b.pool.volume("v"), Err(cdmfs::Error::NotFound(_))));
    }
}

/// An encrypted source whose last block is short grows: the next raw point
/// goes in full (the sealed replica cannot lengthen that block), the
/// transfer record says so, and the link goes on incrementally.
#[test]
fn a_grown_source_with_a_short_last_block_is_sent_in_full_once() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(98);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids: Vec<String> = dirs.iter().map(|d| identity_of(d.path())).collect();
    let pa = PeerId {
        name: "a".into(),
        identity: ids[0].clone(),
        cert_sha256: "c0".into(),
    };
    let a = Tgt::start_keyed(dirs[0].path(), pa.clone(), Some(key()));
    let b = Tgt::start(dirs[1].path(), pa);
    a.pool
        .create_volume_with("v", SIZE + 512, BS, encrypted())
        .unwrap();
    write_random(&a.pool, "v", &mut rng, 50);
    let id = a.pool.volume_id("v").unwrap();
    a.pool.write(id, SIZE, &[0x77u8; 512]).unwrap();
    snap(&a.pool, "v", "p1");
    send(&a, &ids[0], &b, "v", true).unwrap();
    a.pool.grow_volume("v", 2 * SIZE).unwrap();
    a.pool.write(id, SIZE + 4096, &[0x55u8; 4096]).unwrap();
    let p2 = snap(&a.pool, "v", "p2");
    let recs = send(&a, &ids[0], &b, "v", true).unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert!(recs[0].full && recs[0].base.is_none(), "{recs:?}");
    assert!(
        recs[0]
            .full_resend
            .as_deref()
            .is_some_and(|w| w.contains("grew")),
        "{recs:?}"
    );
    write_random(&a.pool, "v", &mut rng, 5);
    let p3 = snap(&a.pool, "v", "p3");
    let recs = send(&a, &ids[0], &b, "v", true).unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert!(!recs[0].full && recs[0].base.is_some(), "{recs:?}");
    // With A's key, B's points read as A's.
    let seal = b.pool.volume("v").unwrap().seal.unwrap();
    b.pool.load_seal_key(&seal, &key()).unwrap();
    let on_b = replicas::points(&b.pool, "v", &ids[1]).unwrap();
    assert_eq!(on_b.len(), 3);
    for (theirs, ours) in on_b[1..].iter().zip([p2, p3]) {
        let mut x = vec![0u8; (2 * SIZE) as usize];
        let mut y = x.clone();
        a.pool.read(Target::Snapshot(ours), 0, &mut x).unwrap();
        b.pool
            .read(Target::Snapshot(theirs.0.id), 0, &mut y)
            .unwrap();
        assert!(x == y, "point {} differs", theirs.1);
    }
}

#[test]
fn a_raw_send_of_a_volume_of_an_odd_size_is_refused_plainly() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids: Vec<String> = dirs.iter().map(|d| identity_of(d.path())).collect();
    let pa = PeerId {
        name: "a".into(),
        identity: ids[0].clone(),
        cert_sha256: "c0".into(),
    };
    let a = Tgt::start_keyed(dirs[0].path(), pa.clone(), Some(key()));
    let b = Tgt::start(dirs[1].path(), pa);
    a.pool
        .create_volume_with("v", SIZE + 100, BS, encrypted())
        .unwrap();
    snap(&a.pool, "v", "p1");
    // Link creation checks the volume the same way.
    let info = a.pool.volume("v").unwrap();
    let e = crate::replication::send::check_raw(&info).unwrap_err();
    assert!(e.message.contains("a raw link sends sealed blocks"), "{e}");
    let e = send(&a, &ids[0], &b, "v", true).unwrap_err();
    assert!(
        e.is("invalid") && e.message.contains("a raw link sends sealed blocks"),
        "{e}"
    );
    assert!(matches!(b.pool.volume("v"), Err(cdmfs::Error::NotFound(_))));
}

//! Tests of the replication review's findings, with the helpers of
//! `tests.rs` (its child module).

use super::*;

/// A request to `path` as the peer `who` (`NAME/IDENTITY/CERT`): the
/// status and body of the answer.
fn call_as(
    b: &Tgt,
    who: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    let http = b.http();
    let req = http
        .agent
        .request(method, &format!("{}{path}", http.base))
        .set("x-test-peer", who);
    let r = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

/// Finding 1: a peer claiming another's identity (under its own name, or
/// under the other's name with its own certificate) cannot see the
/// other's replica, its session or token, nor replace it.
#[test]
fn a_peer_claiming_another_identity_cannot_read_or_take_over_its_replica() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    a.send(&b, "v").unwrap();
    // A's unfinished transfer of p2: its session and token are on B.
    write_random(&a.pool, "v", &mut rng, 400);
    snap(&a.pool, "v", "p2");
    b.faults.cut_after.store(1, Ordering::SeqCst);
    assert!(a.send(&b, "v").is_err());
    b.faults.cut_after.store(0, Ordering::SeqCst);
    let session = sessions::get(&b.state, "v").unwrap().unwrap();
    assert!(session.done.is_none());
    let (own, body) = call_as(
        &b,
        &format!("a/{}/a-cert", a.id),
        "GET",
        "/repl/v1/volumes/v",
        None,
    );
    assert_eq!(own, 200);
    assert!(body.contains(&session.token), "A sees its own session");
    for imposter in [
        format!("site-c/{}/c-cert", a.id),
        format!("a/{}/c-cert", a.id),
    ] {
        let (status, body) = call_as(&b, &imposter, "GET", "/repl/v1/volumes/v", None);
        assert_eq!(status, 409, "{imposter}: {body}");
        assert!(body.contains("not_a_replica"), "{body}");
        assert!(
            !body.contains(&a.id) && !body.contains(&session.token),
            "{body}"
        );
        let (status, body) = call_as(
            &b,
            &imposter,
            "DELETE",
            &format!("/repl/v1/sessions/{}", session.id),
            None,
        );
        assert_eq!(status, 409, "{imposter}: {body}");
        let open = json!({"id": sessions::new_id(), "volume": "v", "size": SIZE,
            "block_size": BS, "policy": {}, "base": null, "keep_last": 1,
            "keep_days": null, "token": "cc",
            "point": {"point": "c:1", "label": "x", "metadata": {}, "created_ns": 9}});
        let (status, body) = call_as(&b, &imposter, "POST", "/repl/v1/sessions", Some(&open));
        assert_eq!(status, 409, "{imposter}: {body}");
        assert!(body.contains("not_a_replica"), "{body}");
    }
    assert_eq!(sessions::get(&b.state, "v").unwrap(), Some(session));
    // A resumes and finishes as if nothing happened.
    a.send(&b, "v").unwrap();
    assert_points_match(&a, &b, "v");
}

/// A raw request of the transfer protocol as A.
fn raw(
    b: &Tgt,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Vec<u8>, super::super::error::ReplError> {
    b.http()
        .send(method, path, headers, body, &Throttle::unlimited())
}

/// Finding 3: the blocks a fingerprint answer maps (zeros, known data)
/// become durable with the batch's data (one commit per batch), and the
/// answer does not outlive a kill that lost them: a receiver killed right
/// after answering refuses the data until the fingerprints come again,
/// and never commits the point without those blocks.
#[test]
fn blocks_mapped_by_a_fingerprint_answer_survive_a_kill() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let (a, dir) = setup(&mut rng);
    let vid = a.pool.volume_id("v").unwrap();
    let known = vec![0x5au8; BS as usize];
    a.pool.write(vid, 0, &vec![0x11u8; BS as usize]).unwrap();
    a.pool.write(vid, BS as u64, &known).unwrap();
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    a.send(&b, "v").unwrap();
    let base = replicas::points(&a.pool, "v", &a.id).unwrap()[0].1.clone();
    // The next point by hand: block 0 becomes zeros, block 2 a copy of
    // block 1 (which the target holds).
    let id = sessions::new_id();
    let open = json!({"id": id, "volume": "v", "size": SIZE, "block_size": BS,
        "policy": {}, "base": base, "keep_last": null, "keep_days": null, "token": "aa",
        "point": {"point": "a:2", "label": "p2", "metadata": {}, "created_ns": u64::MAX / 2}});
    let t = Throttle::unlimited();
    let _: serde_json::Value = b.http().post_json("/repl/v1/sessions", &open, &t).unwrap();
    let fps = wire::Fingerprints {
        block_size: BS,
        entries: vec![
            wire::entry_of(0, &[0u8; BS as usize]),
            wire::entry_of(2 * BS as u64, &known),
        ],
    }
    .encode();
    let path = format!("/repl/v1/sessions/{id}/batches/1");
    let map = raw(
        &b,
        "POST",
        &format!("{path}/fingerprints"),
        &[(PREV_HEADER, "aa")],
        &fps,
    )
    .unwrap();
    assert_eq!(wire::decode_lacking(&map, 2).unwrap(), [false, false]);
    // Killed right after answering: the answer is gone with the blocks it
    // mapped, so the data alone is refused and the fingerprints go again.
    let b = b.restart(a.me());
    let body = wire::encode_data(&[], 1).unwrap();
    let e = raw(
        &b,
        "PUT",
        &path,
        &[(PREV_HEADER, "aa"), (TOKEN_HEADER, "bb")],
        &body,
    )
    .unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (409, "out_of_order"), "{e:?}");
    let map = raw(
        &b,
        "POST",
        &format!("{path}/fingerprints"),
        &[(PREV_HEADER, "aa")],
        &fps,
    )
    .unwrap();
    assert_eq!(wire::decode_lacking(&map, 2).unwrap(), [false, false]);
    raw(
        &b,
        "PUT",
        &path,
        &[(PREV_HEADER, "aa"), (TOKEN_HEADER, "bb")],
        &body,
    )
    .unwrap();
    let done = raw(
        &b,
        "POST",
        &format!("/repl/v1/sessions/{id}/commit"),
        &[(PREV_HEADER, "bb")],
        &[],
    )
    .unwrap();
    let done: serde_json::Value = serde_json::from_slice(&done).unwrap();
    let snap_id = done["snapshot"].as_u64().unwrap();
    let mut got = vec![0u8; 3 * BS as usize];
    b.pool.read(Target::Snapshot(snap_id), 0, &mut got).unwrap();
    assert!(
        got[..BS as usize].iter().all(|x| *x == 0),
        "block 0 is zeros"
    );
    assert!(
        got[2 * BS as usize..] == known[..],
        "block 2 is the known block"
    );
}

/// Finding 5: a full resend of a source volume smaller than the replica
/// (deleted and made again smaller) is accepted, not refused forever.
#[test]
fn a_full_resend_of_a_smaller_source_is_accepted() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    a.send(&b, "v").unwrap();
    a.pool.delete_volume("v", true).unwrap();
    a.pool.create_volume("v", SIZE / 2, BS).unwrap();
    write_random(&a.pool, "v", &mut rng, 300);
    snap(&a.pool, "v", "p2");
    let recs = a.send(&b, "v").unwrap();
    assert_eq!(recs.len(), 1);
    assert!(
        recs[0].full && recs[0].full_resend.is_some(),
        "a full resend"
    );
    assert_points_match(&a, &b, "v");
    assert_eq!(b.pool.volume("v").unwrap().size, SIZE / 2);
}

/// Finding 2: promote waits for the receiver's request in progress (and
/// a request after it finds no replica), so a commit cannot label a
/// promoted volume's snapshot and a batch cannot land in it.
#[test]
fn promote_waits_for_the_receiver_and_then_refuses_its_requests() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    a.send(&b, "v").unwrap();
    // A receiver request in progress holds the lock.
    let busy = super::super::receive::exclusive();
    let (tx, rx) = std::sync::mpsc::channel();
    let (state, pool) = (b.state.clone(), b.pool.clone());
    let promoting = std::thread::spawn(move || {
        let r = replicas::promote(&state, &pool, "v");
        let _ = tx.send(());
        r
    });
    // Still waiting after a generous half second; it can only pass early
    // if promote ignored the receiver.
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(500))
            .is_err(),
        "promote ran while a receiver request was in progress"
    );
    drop(busy);
    promoting.join().unwrap().unwrap();
    snap(&a.pool, "v", "p2");
    assert!(a.send(&b, "v").unwrap_err().is("not_a_replica"));
}

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

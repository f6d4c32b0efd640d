//! A full disk and a failing device never take the appliance down: the
//! pool stalls (reads and snapshot exports go on, writes get ENOSPC or EIO,
//! changes 507 or 503), `/health`, `/metrics` and an alert say so, and when
//! space returns or the device recovers it commits again without a restart,
//! with every flushed write intact. A full pool (its own space, not the
//! host's) still snapshots and deletes, and a delete's space is reusable
//! within two commit intervals. The first test loop-mounts a small ext4
//! filesystem: it needs root.

use cdm_e2e::*;
use nbd_proto::client::{Client, ClientError};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn chunk(seed: u64) -> Vec<u8> {
    random_bytes(MIB as usize, seed)
}

fn check(c: &mut Client, off: u64, seed: u64, what: &str) {
    let mut buf = vec![0u8; MIB as usize];
    c.read(off, &mut buf)
        .unwrap_or_else(|e| panic!("{what}: NBD read at {off}: {e}"));
    assert!(buf == chunk(seed), "{what}: data at {off} differs");
}

fn errno(e: &ClientError) -> Option<u32> {
    match e {
        ClientError::Errno { errno, .. } => Some(*errno),
        _ => None,
    }
}

fn pool_state(api: &Api) -> String {
    let h = api.get("/health");
    h["pool"]["state"].as_str().unwrap_or_default().to_string()
}

fn wait_state(api: &Api, want: &str) -> Value {
    wait_for(300, &format!("pool state {want}"), || {
        let h = api.get("/health");
        (h["pool"]["state"] == want).then_some(h)
    })
}

fn events(api: &Api, kind: &str) -> Vec<Value> {
    api.get(&format!("/v1/events?type={kind}&limit=1000"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits for an event of `kind` with `data.reason` (the scheduler's tick
/// raises them).
fn wait_alert(api: &Api, kind: &str, reason: &str) {
    wait_for(120, &format!("{kind} {reason}"), || {
        events(api, kind)
            .iter()
            .any(|e| e["data"]["reason"] == reason)
            .then_some(())
    })
}

fn metric(api: &Api, line: &str) -> bool {
    let (code, body) = http(&api.base, "GET", "/metrics", Some(&api.token), None);
    assert_eq!(code, 200);
    body.as_str().unwrap_or_default().lines().any(|l| l == line)
}

#[test]
fn a_full_host_filesystem_stalls_the_pool_until_space_returns_without_a_restart() {
    let work = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let (mnt, _mounted) = small_ext4(work.path(), 96 * MIB);
    // Space the test gives back later, as an operator would.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 24 * MIB as usize]).expect("filler");
    let data = mnt.join("data");
    let mut a = Appliance::start_with(
        None,
        Some(&data),
        &[
            "--pool-size",
            "1G",
            "--pool-sparse",
            "--commit-interval",
            "1",
        ],
    );
    let api = Api::new(&a, &a.admin_token());
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "v", "size": 512 * MIB})),
    );
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "x", "size": MIB})),
    );
    let mut c = a.nbd("v");
    for i in 0..4 {
        c.write(i * MIB, &chunk(100 + i), false).expect("write");
    }
    c.flush().expect("flush");
    let s1 = api.expect(201, "POST", "/v1/volumes/v/snapshots", Some(json!({})));
    let snap = format!("v@{}", s1["id"]);

    // Fill the filesystem through NBD: a write gets ENOSPC (an error
    // reply; the connection stays), and the flush after it too.
    let mut next = 4;
    let err = loop {
        assert!(next < 512, "the host filesystem never filled");
        match c.write(next * MIB, &chunk(100 + next), false) {
            Ok(()) => next += 1,
            Err(e) => break e,
        }
        if next % 8 == 0 {
            if let Err(e) = c.flush() {
                break e;
            }
        }
    };
    assert_eq!(errno(&err), Some(28), "ENOSPC expected: {err}");
    let e = c.flush().expect_err("a flush on a full filesystem");
    assert_eq!(errno(&e), Some(28), "ENOSPC expected: {e}");
    let h = wait_state(&api, "no_space");
    assert_eq!(h["status"], "degraded", "{h}");

    // Reads go on: the volume, and a snapshot's export.
    check(&mut c, 0, 100, "volume while full");
    let mut sc = a.nbd(&snap);
    check(&mut sc, MIB, 101, "snapshot export while full");
    // Writes get ENOSPC, changes 507 no_space.
    let e = c
        .write(0, &chunk(1), false)
        .expect_err("write while stalled");
    assert_eq!(errno(&e), Some(28), "{e}");
    for (method, path, body) in [
        ("POST", "/v1/volumes/v/snapshots", Some(json!({}))),
        (
            "POST",
            "/v1/volumes",
            Some(json!({"name": "w", "size": MIB})),
        ),
        ("DELETE", "/v1/volumes/x", None),
    ] {
        let v = api.expect(507, method, path, body);
        assert_eq!(v["error"]["code"], "no_space", "{method} {path}: {v}");
    }
    assert_eq!(api.get("/v1/pool")["state"], "no_space");
    assert!(metric(&api, "cdm_pool_state{state=\"no_space\"} 1"));
    wait_alert(&api, "alert.raised", "pool_no_space");
    // The state database shares the full filesystem: the audit log and
    // events still read back.
    let audit = api.get("/v1/audit?limit=1000");
    assert!(audit.as_array().is_some_and(|a| !a.is_empty()), "{audit}");

    // Space returns on the host: the pool commits again by itself.
    std::fs::remove_file(&filler).expect("remove the filler");
    let h = wait_state(&api, "ok");
    assert!(h["pool"]["commit_retries"].as_u64() >= Some(1), "{h}");
    c.flush().expect("flush after space returned");
    for i in 0..4 {
        c.write((next + i) * MIB, &chunk(500 + i), false)
            .expect("write after space returned");
    }
    c.flush().expect("flush");
    api.expect(201, "POST", "/v1/volumes/v/snapshots", Some(json!({})));
    wait_alert(&api, "alert.cleared", "pool_no_space");
    assert!(metric(&api, "cdm_pool_state{state=\"ok\"} 1"));
    drop(c);
    drop(sc);

    // Nothing flushed was lost, across a restart too.
    a.stop();
    a.restart();
    let mut c = a.nbd("v");
    for i in 0..4 {
        check(&mut c, i * MIB, 100 + i, "after restart");
        check(&mut c, (next + i) * MIB, 500 + i, "after restart");
    }
    drop(c);
    a.stop();
    fsck_clean(&data);
}

#[test]
fn a_full_pool_still_snapshots_and_deletes_and_a_delete_frees_space_promptly() {
    let mut a = Appliance::start_with(
        None,
        None,
        &["--pool-size", "96M", "--commit-interval", "1"],
    );
    let api = Api::new(&a, &a.admin_token());
    for name in ["a", "b"] {
        api.expect(
            201,
            "POST",
            "/v1/volumes",
            Some(json!({"name": name, "size": 256 * MIB})),
        );
    }
    let mut c = a.nbd("a");
    let mut n = 0;
    let err = loop {
        assert!(n < 256, "the pool never filled");
        match c.write(n * MIB, &chunk(n), false) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(errno(&err), Some(28), "ENOSPC expected: {err}");
    c.flush().expect("a full pool still commits");
    let p = api.get("/v1/pool");
    assert_eq!(p["state"], "full", "{p}");
    assert!(p["reserve_bytes"].as_u64() >= Some(MIB), "{p}");
    wait_alert(&api, "alert.raised", "pool_full");
    let h = api.get("/health");
    assert_eq!(h["status"], "degraded", "{h}");
    // Metadata still has room: snapshot, clone, and deletes.
    let s = api.expect(201, "POST", "/v1/volumes/a/snapshots", Some(json!({})));
    api.expect(
        201,
        "POST",
        &format!("/v1/volumes/a/snapshots/{}/clones", s["id"]),
        Some(json!({"name": "c"})),
    );
    check(&mut c, 0, 0, "full pool");
    drop(c);
    let used_full = api.get("/v1/pool")["used_bytes"].as_u64().unwrap_or(0);
    api.expect(204, "DELETE", "/v1/volumes/c", None);
    api.expect(204, "DELETE", "/v1/volumes/a?force=true", None);
    let p = api.get("/v1/pool");
    assert!(p["freeing_bytes"].as_u64() > Some(32 * MIB), "{p}");
    let within = p["freeing_reusable_within_s"].as_u64().unwrap_or(0);
    assert!(
        (1..=2).contains(&within),
        "two commit intervals of 1 s: {p}"
    );
    // Reusable by periodic commits alone (nothing else happens).
    let p = wait_for(300, "freed space reusable", || {
        let p = api.get("/v1/pool");
        (p["freeing_bytes"] == 0).then_some(p)
    });
    assert!(
        p["used_bytes"].as_u64().unwrap_or(u64::MAX) < used_full / 4,
        "{p}"
    );
    let mut b = a.nbd("b");
    for i in 0..32 {
        b.write(i * MIB, &chunk(900 + i), false)
            .expect("write after the delete");
    }
    b.flush().expect("flush");
    wait_for(60, "state ok", || {
        (api.get("/v1/pool")["state"] == "ok").then_some(())
    });
    drop(b);
    a.stop();
    fsck_clean(&a.data);
}

#[test]
fn injected_device_faults_stall_and_recover_without_a_restart() {
    let faults = tempfile::tempdir().expect("fault dir");
    let fd = faults.path().to_str().expect("utf-8 path").to_string();
    let mut a = Appliance::start_with(
        None,
        None,
        &[
            "--pool-size",
            "256M",
            "--pool-sparse",
            "--commit-interval",
            "1",
            "--fault-dir",
            &fd,
        ],
    );
    let api = Api::new(&a, &a.admin_token());
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "v", "size": 64 * MIB})),
    );
    let mut c = a.nbd("v");
    c.write(0, &chunk(1), false).expect("write");
    c.flush().expect("flush");
    let fault = |name: &str, on: bool| {
        let p = faults.path().join(name);
        if on {
            write_file(&p, b"300");
        } else {
            std::fs::remove_file(&p).expect("remove fault");
        }
    };

    // Syncs fail during writes, a snapshot and a delete. What was written
    // since the last good sync may be lost with the failed writeback, so
    // the pool fails and reloads its last durable state from the device
    // (no restart) once syncs work again.
    fault("pool-eio-sync", true);
    c.write(MIB, &chunk(2), false)
        .expect("a write before the sync");
    let e = c.flush().expect_err("flush with failing syncs");
    assert_eq!(errno(&e), Some(5), "EIO expected: {e}");
    wait_state(&api, "io_error");
    let v = api.expect(503, "POST", "/v1/volumes/v/snapshots", Some(json!({})));
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
    api.expect(503, "DELETE", "/v1/volumes/v?force=true", None);
    let e = c
        .write(2 * MIB, &chunk(3), false)
        .expect_err("write while failed");
    assert_eq!(errno(&e), Some(5), "{e}");
    wait_alert(&api, "alert.raised", "pool_io_error");
    fault("pool-eio-sync", false);
    wait_state(&api, "ok");
    // The failed flush acknowledged nothing: write again.
    c.write(MIB, &chunk(2), false)
        .expect("write after the reload");
    c.flush().expect("flush after recovery");
    check(&mut c, 0, 1, "flushed before the failure");

    // Writes fail (the device refuses them: nothing accepted is in doubt):
    // the commit stalls, reads go on, and it is retried.
    c.write(4 * MIB, &chunk(5), false).expect("write");
    fault("pool-eio-write", true);
    let e = c.flush().expect_err("flush with failing writes");
    assert_eq!(errno(&e), Some(5), "EIO expected: {e}");
    wait_state(&api, "io_error");
    check(&mut c, MIB, 2, "read while writes fail");
    check(&mut c, 4 * MIB, 5, "read while writes fail");
    fault("pool-eio-write", false);
    wait_state(&api, "ok");
    c.flush().expect("flush after the writes recovered");

    // Slow syncs: slower, never an error.
    fault("pool-slow-sync", true);
    c.write(2 * MIB, &chunk(3), false)
        .expect("write with slow syncs");
    c.flush().expect("flush with slow syncs");
    api.expect(201, "POST", "/v1/volumes/v/snapshots", Some(json!({})));
    fault("pool-slow-sync", false);

    // Failing reads: that read fails, the connection and the pool stay.
    fault("pool-eio-read", true);
    let mut buf = vec![0u8; MIB as usize];
    // (Reads of data the page cache holds may still succeed; the pool
    // reads the device for data it did not just write after a restart.)
    let _ = c.read(0, &mut buf);
    fault("pool-eio-read", false);
    check(&mut c, 0, 1, "read after the read fault");

    // Writes fail while a commit is due, then a kill -9 mid-stall: what
    // was flushed is there after the restart.
    c.write(3 * MIB, &chunk(4), false).expect("write");
    fault("pool-eio-write", true);
    let e = c.flush().expect_err("flush with failing writes");
    assert_eq!(errno(&e), Some(5), "EIO expected: {e}");
    wait_state(&api, "io_error");
    drop(c);
    a.kill();
    fault("pool-eio-write", false);
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    assert_eq!(pool_state(&api), "ok");
    let mut c = a.nbd("v");
    check(&mut c, 0, 1, "after kill -9");
    check(&mut c, MIB, 2, "after kill -9");
    check(&mut c, 2 * MIB, 3, "after kill -9");
    check(&mut c, 4 * MIB, 5, "after kill -9");
    drop(c);
    a.stop();
    fsck_clean(&a.data);
}

/// The state database, the pending journals and a preallocated pool share
/// a filesystem that something else fills: no audit record and no event is
/// lost (a state reserve is released for them at the first ENOSPC), every
/// change answered 201 has both, and the reserve is made again once there
/// is room.
#[test]
fn a_full_data_filesystem_loses_no_audit_record_or_event() {
    let work = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let (mnt, _mounted) = small_ext4(work.path(), 128 * MIB);
    let data = mnt.join("data");
    let mut a = Appliance::start_with(
        None,
        Some(&data),
        &["--pool-size", "32M", "--commit-interval", "1"],
    );
    let api = Api::new(&a, &a.admin_token());
    wait_for(60, "the state reserve", || {
        data.join("state-reserve").exists().then_some(())
    });
    // Something else fills the filesystem.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![7u8; MIB as usize];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut made = Vec::new();
    for i in 0..40 {
        let name = format!("v{i}");
        let (code, body) = http(
            &api.base,
            "POST",
            "/v1/volumes",
            Some(&api.token),
            Some(&json!({"name": name, "size": MIB}).to_string()),
        );
        match code {
            201 => made.push(name),
            // Refused because its audit record could not be kept: nothing
            // changed, nothing to lose.
            503 => {}
            _ => panic!("POST /v1/volumes {name} answered {code}: {body}"),
        }
    }
    assert!(
        !made.is_empty(),
        "no change went through on a full filesystem"
    );
    let audit = api.get("/v1/audit?limit=10000");
    let creates = audit.as_array().map_or(0, |a| {
        a.iter()
            .filter(|r| r["method"] == "POST" && r["path"] == "/v1/volumes" && r["status"] == 201)
            .count()
    });
    assert_eq!(
        creates,
        made.len(),
        "an audit record per volume made: {audit}"
    );
    let events = events(&api, "volume.created");
    for name in &made {
        assert!(
            events.iter().any(|e| e["subject"] == name.as_str()),
            "no volume.created event for {name}"
        );
    }
    assert!(metric(&api, "cdm_events_lost_total 0"), "events lost");
    assert!(metric(&api, "cdm_audit_lost_total 0"), "audit records lost");
    // Room again: the reserve is made again.
    std::fs::remove_file(&filler).expect("remove the filler");
    wait_for(120, "the state reserve made again", || {
        data.join("state-reserve").exists().then_some(())
    });
    a.stop();
    fsck_clean(&data);
}

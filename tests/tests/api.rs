//! The appliance as its admins use it: snapshotd's HTTP API over real HTTP,
//! with real NBD clients (qemu-io, our client) on the volumes it manages.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cdm_e2e::webhook::{header, Receiver};
use cdm_e2e::*;
use nbd_proto::client::{Client, ClientOptions};
use serde_json::{json, Value};

fn qemu_io(a: &Appliance, export: &str, cmd: &str) -> String {
    // Snapshot exports are read-only: open them so.
    // One runner for every qemu-io check: it also fails on "Pattern
    // verification failed", which older qemu-io reports with exit status 0.
    let uri = a.unix_uri(export);
    let mut args: Vec<&str> = if export.contains('@') {
        vec!["-r"]
    } else {
        vec![]
    };
    args.extend(["-f", "raw", "-c", cmd, &uri]);
    cdm_e2e::stamp::qemu_io(&args)
}

/// Waits for webhook `id`'s first delivery that ended `failed`.
fn failed_delivery(api: &Api, id: u64, what: &str) -> Value {
    wait_for(120, what, || {
        let d = api.get(&format!("/v1/webhooks/{id}/deliveries"));
        d.as_array()
            .unwrap()
            .iter()
            .find(|x| x["state"] == "failed")
            .cloned()
    })
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s["id"].as_u64().expect("id"))
        .collect()
}

fn event_types(api: &Api) -> Vec<String> {
    api.get("/v1/events?limit=1000")
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn lifecycle_volume_snapshot_clone_through_nbd() {
    require("qemu-io");
    let a = Appliance::start(None);
    let tok_path = a.data.join("admin.token");
    let mode = std::fs::metadata(&tok_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin.token must be private");
    let (s, h) = http(&a.url(), "GET", "/health", None, None);
    assert_eq!(s, 200);
    assert_eq!(h["status"], "ok");
    let api = Api::new(&a, &a.admin_token());

    let v = api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "db", "size": 64 << 20})),
    );
    assert_eq!(v["kind"], "stage");
    assert_eq!(v["export"], "db");
    assert_eq!(v["block_size"], 65536);
    qemu_io(&a, "db", "write -P 0x11 0 1M");
    let snap = api.expect(
        201,
        "POST",
        "/v1/volumes/db/snapshots",
        Some(json!({"label": "after full", "metadata": {"lsn": "0/16B3F28"}})),
    );
    let sid = snap["id"].as_u64().unwrap();
    assert_eq!(snap["export"], format!("db@{sid}"));
    assert_eq!(snap["metadata"]["lsn"], "0/16B3F28");
    qemu_io(&a, "db", "write -P 0x22 0 1M");

    let c = api.expect(
        201,
        "POST",
        &format!("/v1/volumes/db/snapshots/{sid}/clones"),
        Some(json!({"name": "db-test"})),
    );
    assert_eq!(c["kind"], "clone");
    assert_eq!(c["origin"]["snapshot"], sid);
    assert_eq!(c["origin"]["volume"], "db");
    qemu_io(&a, "db-test", "read -P 0x11 0 1M");
    qemu_io(&a, &format!("db@{sid}"), "read -P 0x11 0 1M");
    qemu_io(&a, "db", "read -P 0x22 0 1M");
    qemu_io(&a, "db-test", "write -P 0x33 0 64k");
    qemu_io(&a, &format!("db@{sid}"), "read -P 0x11 0 1M");
    // Snapshots are read-only over NBD.
    let err = run_fail(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(a.unix_uri(&format!("db@{sid}"))),
    );
    assert!(!err.is_empty());

    let snaps = api.get("/v1/volumes/db/snapshots");
    assert_eq!(snaps[0]["clones"], json!(["db-test"]));
    assert_eq!(api.get("/v1/clones").as_array().unwrap().len(), 1);

    // A connected client: exports show it, deletion is refused unless forced.
    let ep = format!("unix:{}", a.sock.display());
    let mut client = Client::connect(&ep, Some("db-test"), &ClientOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    client.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
    let ex = api.get("/v1/exports");
    let e = ex
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "db-test")
        .expect("clone export")
        .clone();
    assert_eq!(e["clients"].as_array().unwrap().len(), 1, "{e}");
    assert!(e["uris"][0]
        .as_str()
        .unwrap()
        .starts_with("nbd+unix:///db-test?socket="));
    assert!(ex
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == format!("db@{sid}") && e["read_only"] == true));
    let err = api.expect(409, "DELETE", "/v1/clones/db-test", None);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("exported"));
    // The volume has a snapshot with a clone: refused too.
    api.expect(409, "DELETE", "/v1/volumes/db", None);
    api.expect(
        409,
        "DELETE",
        &format!("/v1/volumes/db/snapshots/{sid}"),
        None,
    );
    client.disconnect().unwrap();
    wait_for(120, "client to leave", || {
        let ex = api.get("/v1/exports");
        ex.as_array()
            .unwrap()
            .iter()
            .all(|e| e["clients"].as_array().unwrap().is_empty())
            .then_some(())
    });

    // Promote: the clone no longer pins its origin.
    let p = api.expect(200, "POST", "/v1/clones/db-test/promote", None);
    assert_eq!(p["kind"], "stage");
    assert!(p["origin"].is_null());
    api.expect(409, "POST", "/v1/clones/db-test/promote", None);
    api.expect(409, "DELETE", "/v1/clones/db-test", None); // not a clone any more
    api.expect(409, "DELETE", "/v1/volumes/db", None); // still has a snapshot
    api.expect(
        204,
        "DELETE",
        &format!("/v1/volumes/db/snapshots/{sid}"),
        None,
    );
    api.expect(204, "DELETE", "/v1/volumes/db", None);
    qemu_io(&a, "db-test", "read -P 0x33 0 64k");
    qemu_io(&a, "db-test", "read -P 0x11 64k 960k");
    // The server notices qemu-io's disconnect a moment after it exits.
    wait_for(120, "qemu-io to leave", || {
        (api.get("/v1/volumes/db-test")["clients"] == 0).then_some(())
    });
    api.expect(204, "DELETE", "/v1/volumes/db-test", None);
    assert!(api.get("/v1/volumes").as_array().unwrap().is_empty());

    let t = event_types(&api);
    for want in [
        "user.created",
        "pool.opened",
        "volume.created",
        "snapshot.created",
        "clone.created",
        "export.connected",
        "export.disconnected",
        "clone.promoted",
        "snapshot.deleted",
        "volume.deleted",
    ] {
        assert!(t.iter().any(|x| x == want), "no {want} event in {t:?}");
    }
    // Filters: module wildcard, after.
    let vs = api.get("/v1/events?type=volume.*&limit=100");
    assert!(vs
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["type"].as_str().unwrap().starts_with("volume.")));
    let last = api.get("/v1/events?limit=1")[0]["id"].as_u64().unwrap();
    assert!(api
        .get(&format!("/v1/events?after={last}"))
        .as_array()
        .unwrap()
        .is_empty());

    let pool = api.get("/v1/pool");
    assert!(pool["total_bytes"].as_u64().unwrap() >= 4 << 30);
    let doc = api.get("/v1/openapi.json");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v1/volumes",
        "/v1/volumes/{name}/snapshots/{id}/clones",
        "/v1/users/{name}/tokens",
    ] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    assert!(doc["components"]["schemas"]["VolumeCreate"].is_object());

    let (s, m) = http(&a.url(), "GET", "/metrics", Some(&a.admin_token()), None);
    assert_eq!(s, 200);
    let m = m.as_str().unwrap().to_string();
    for want in [
        "cdm_pool_used_bytes",
        "cdm_pool_commits_total",
        "cdm_nbd_bytes_total{export=\"db\",op=\"write\"}",
        "cdm_nbd_request_duration_seconds_bucket{export=\"db\",op=\"write\",le=\"+Inf\"}",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    // qemu-io's flush of its writes went to the intent log, not a commit.
    let records: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("cdm_pool_log_records_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cdm_pool_log_records_total in:\n{m}"));
    assert!(records > 0, "no flush was an intent-log record:\n{m}");
}

#[test]
fn auth_roles_audit_and_bad_requests() {
    let a = Appliance::start(None);
    let base = a.url();
    let admin = Api::new(&a, &a.admin_token());

    // 401s.
    let (s, v) = http(&base, "GET", "/v1/volumes", None, None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    for bad in ["nope", "cdm_zz_zz", "cdm_0123456789ab_00", ""] {
        let (s, _) = http(&base, "GET", "/v1/volumes", Some(bad), None);
        assert_eq!(s, 401, "token {bad:?}");
    }
    let (s, _) = http(&base, "GET", "/metrics", None, None);
    assert_eq!(s, 401);

    // Users and tokens.
    admin.expect(
        201,
        "POST",
        "/v1/users",
        Some(json!({"name": "op", "role": "operator", "password": "operator-pass"})),
    );
    admin.expect(
        201,
        "POST",
        "/v1/users",
        Some(json!({"name": "aud", "role": "auditor", "password": "auditor-pass"})),
    );
    admin.expect(
        201,
        "POST",
        "/v1/users",
        Some(json!({"name": "opdel", "role": "operator", "grants": ["delete"]})),
    );
    admin.expect(
        409,
        "POST",
        "/v1/users",
        Some(json!({"name": "op", "role": "operator"})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/users",
        Some(json!({"name": "x", "role": "root"})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/users",
        Some(json!({"name": "y", "role": "operator", "grants": ["everything"]})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/users",
        Some(json!({"name": "z", "role": "operator", "password": "short"})),
    );
    let t = admin.expect(
        201,
        "POST",
        "/v1/users/op/tokens",
        Some(json!({"name": "ci"})),
    );
    let op = Api {
        base: base.clone(),
        token: t["token"].as_str().unwrap().to_string(),
    };
    let t = admin.expect(
        201,
        "POST",
        "/v1/users/opdel/tokens",
        Some(json!({"name": "ci"})),
    );
    let opdel = Api {
        base: base.clone(),
        token: t["token"].as_str().unwrap().to_string(),
    };
    let (s, l) = http(
        &base,
        "POST",
        "/v1/login",
        None,
        Some(r#"{"name":"aud","password":"auditor-pass"}"#),
    );
    assert_eq!(s, 201, "{l}");
    let aud = Api {
        base: base.clone(),
        token: l["token"].as_str().unwrap().to_string(),
    };
    let (s, _) = http(
        &base,
        "POST",
        "/v1/login",
        None,
        Some(r#"{"name":"aud","password":"wrong-password"}"#),
    );
    assert_eq!(s, 401);
    let (s, _) = http(
        &base,
        "POST",
        "/v1/login",
        None,
        Some(r#"{"name":"ghost","password":"whatever1"}"#),
    );
    assert_eq!(s, 401);

    // Roles.
    aud.get("/v1/volumes");
    aud.expect(
        403,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "v", "size": 1 << 20})),
    );
    aud.get("/v1/audit");
    aud.expect(403, "GET", "/v1/users", None);
    op.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "v", "size": 1 << 20})),
    );
    op.expect(201, "POST", "/v1/volumes/v/snapshots", Some(json!({})));
    op.expect(403, "DELETE", "/v1/volumes/v?force=true", None);
    op.expect(403, "GET", "/v1/audit", None);
    op.expect(
        403,
        "POST",
        "/v1/users",
        Some(json!({"name": "evil", "role": "admin"})),
    );
    op.expect(
        403,
        "PUT",
        "/v1/pool/policy",
        Some(json!({"quota_bytes": 1})),
    );
    op.expect(403, "GET", "/v1/users/aud/tokens", None);
    let own = op.expect(
        201,
        "POST",
        "/v1/users/op/tokens",
        Some(json!({"name": "second"})),
    );
    assert_eq!(op.get("/v1/users/op/tokens").as_array().unwrap().len(), 2);
    opdel.expect(204, "DELETE", "/v1/volumes/v?force=true", None);

    // Bad requests: names, sizes, JSON, limits, routes.
    for (name, code) in [
        ("../etc", 400),
        (".hidden", 400),
        ("a b", 400),
        ("x@1", 400),
        ("", 400),
    ] {
        let (s, v) = admin.call(
            "POST",
            "/v1/volumes",
            Some(json!({"name": name, "size": 1 << 20})),
        );
        assert_eq!(s, code, "{name:?}: {v}");
        assert_eq!(v["error"]["code"], "bad_request");
    }
    for path in [
        "/v1/volumes/..%2F..%2Fetc%2Fpasswd",
        "/v1/volumes/a%40b/snapshots",
        "/v1/volumes/%00",
    ] {
        let (s, v) = admin.call("GET", path, None);
        assert_eq!(s, 400, "{path}: {v}");
    }
    // Dot segments are resolved before routing: never a volume named "..".
    let (s, v) = admin.call("GET", "/v1/volumes/%2E%2E", None);
    assert!(s == 400 || s == 404, "{s} {v}");
    assert!(v["error"]["code"].is_string());
    admin.expect(
        400,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "b", "size": 1 << 20, "block_size": 1000})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "b", "size": 0})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "b", "size": 1 << 20, "colour": "red"})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "b", "size": 1 << 20, "compression": 30})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "b", "size": 1 << 20, "encryption": "rot13"})),
    );
    // Encryption without a key (snapshotd started without --key-file).
    let u = admin.expect(
        409,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "b", "size": 1 << 20, "encryption": "aes-256-xts"})),
    );
    assert!(
        u["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("--key-file"),
        "{u}"
    );
    admin.expect(201, "POST", "/v1/volumes", Some(json!({"name": "b", "size": 1 << 20, "dedup": false, "compression": 0, "encryption": "none"})));
    admin.expect(
        409,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "b", "size": 1 << 20})),
    );
    admin.expect(404, "GET", "/v1/volumes/nothere", None);
    admin.expect(404, "GET", "/v1/volumes/b/snapshots/999", None);
    admin.expect(400, "GET", "/v1/volumes/b/snapshots/abc", None);
    admin.expect(404, "GET", "/v1/nothing", None);
    admin.expect(400, "PATCH", "/v1/volumes/b", Some(json!({"size": 1024})));
    let g = admin.expect(
        200,
        "PATCH",
        "/v1/volumes/b",
        Some(json!({"size": 2 << 20})),
    );
    assert_eq!(g["size"], 2 << 20);
    let tok = a.admin_token();
    for body in [
        "{",
        "{\"name\": 5}",
        "[]",
        "null",
        "{\"name\":\"c\",\"size\":-1}",
    ] {
        let (s, v) = http(&base, "POST", "/v1/volumes", Some(&tok), Some(body));
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["error"]["code"], "invalid_json", "{body}: {v}");
    }
    // A body declared over 1 MiB is refused before any of it is sent; a
    // client that sent it all and got a broken pipe could not see why.
    let head = format!(
        "POST /v1/volumes HTTP/1.1\r\nHost: cdm\r\nAuthorization: Bearer {tok}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        2 << 20
    );
    let (s, v) = http_head_only(&base, &head);
    assert_eq!(s, 413, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    // Snapshot metadata: up to 255 KiB is kept, more is refused (the body
    // itself is under the 1 MiB limit).
    admin.expect(
        201,
        "POST",
        "/v1/volumes/b/snapshots",
        Some(json!({"metadata": {"x": "a".repeat(200 << 10)}})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/volumes/b/snapshots",
        Some(json!({"metadata": {"x": "a".repeat(600 << 10)}})),
    );
    admin.expect(
        400,
        "POST",
        "/v1/volumes/b/snapshots",
        Some(json!({"metadata": [1, 2]})),
    );

    // The audit log names who changed what, including refusals.
    let audit = admin.get("/v1/audit?limit=1000");
    let rows = audit.as_array().unwrap();
    assert!(rows.iter().any(|r| r["user"] == "op"
        && r["method"] == "POST"
        && r["path"] == "/v1/volumes"
        && r["status"] == 201));
    assert!(rows
        .iter()
        .any(|r| r["user"] == "op" && r["method"] == "DELETE" && r["status"] == 403));
    assert!(rows
        .iter()
        .any(|r| r["user"] == "opdel" && r["method"] == "DELETE" && r["status"] == 204));
    let only_op = admin.get("/v1/audit?user=op&limit=1000");
    assert!(only_op
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["user"] == "op"));

    // Revocation: logout, token deletion and user deletion end access.
    aud.expect(204, "POST", "/v1/logout", None);
    aud.expect(401, "GET", "/v1/volumes", None);
    let own_id = own["id"].as_str().unwrap();
    op.expect(
        204,
        "DELETE",
        &format!("/v1/users/op/tokens/{own_id}"),
        None,
    );
    op.get("/v1/volumes");
    admin.expect(204, "DELETE", "/v1/users/op", None);
    op.expect(401, "GET", "/v1/volumes", None);
    admin.expect(409, "DELETE", "/v1/users/admin", None);
    let types = event_types(&admin);
    for want in [
        "user.login",
        "user.login_failed",
        "user.logout",
        "token.created",
        "token.deleted",
        "user.deleted",
    ] {
        assert!(types.iter().any(|x| x == want), "no {want} event");
    }
}

fn snapshot_ids(api: &Api, vol: &str) -> Vec<u64> {
    ids(&api.get(&format!("/v1/volumes/{vol}/snapshots")))
}

fn advance(api: &Api, secs: u64) {
    api.expect(
        200,
        "POST",
        "/v1/clock",
        Some(json!({"advance_secs": secs})),
    );
}

#[test]
fn schedules_retention_and_quota_on_a_fake_clock() {
    require("qemu-io");
    let a = Appliance::start(Some(FAST_CONFIG));
    let api = Api::new(&a, &a.admin_token());
    assert_eq!(api.get("/v1/clock")["fake"], true);

    // Hourly snapshots, keep the last 3.
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "h", "size": 16 << 20})),
    );
    api.expect(
        400,
        "PUT",
        "/v1/volumes/h/policy",
        Some(json!({"schedule": {"interval_secs": 5}})),
    );
    api.expect(
        400,
        "PUT",
        "/v1/volumes/h/policy",
        Some(json!({"schedule": {"cron": "61 * * * *"}})),
    );
    api.expect(404, "PUT", "/v1/volumes/none/policy", Some(json!({})));
    let p =
        json!({"schedule": {"interval_secs": 3600}, "retention": {"keep_last": 3, "min_keep": 1}});
    assert_eq!(
        api.expect(200, "PUT", "/v1/volumes/h/policy", Some(p.clone())),
        p
    );
    assert_eq!(api.get("/v1/volumes/h/policy"), p);
    assert!(snapshot_ids(&api, "h").is_empty());
    let mut taken = 0;
    for i in 0..5u8 {
        qemu_io(&a, "h", &format!("write -P {} 0 64k", i + 1));
        advance(&api, 3600);
        taken += 1;
        let want = taken.min(3);
        let now = wait_for(120, "scheduled snapshot", || {
            let s = api.get("/v1/volumes/h/snapshots");
            let n = s.as_array().unwrap().len();
            let newest_ok = s.as_array().unwrap().last().is_some_and(|x| {
                x["label"].as_str().unwrap_or("").starts_with("auto-")
                    && x["metadata"]["scheduled"] == true
            });
            (n == want && newest_ok && event_count(&api, "snapshot.created") == taken).then_some(s)
        });
        // The newest scheduled snapshot holds what was written before it.
        let id = now.as_array().unwrap().last().unwrap()["id"]
            .as_u64()
            .unwrap();
        qemu_io(&a, &format!("h@{id}"), &format!("read -P {} 0 64k", i + 1));
    }
    let expired: Vec<Value> = api
        .get("/v1/events?type=snapshot.expired&limit=100")
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(expired.len(), 2);
    assert!(expired
        .iter()
        .all(|e| e["data"]["reason"] == "retention" && e["actor"] == "scheduler"));

    // Age: keep 2 days, but never fewer than 1, and never one with clones.
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "d", "size": 16 << 20})),
    );
    let s1 = api.expect(
        201,
        "POST",
        "/v1/volumes/d/snapshots",
        Some(json!({"label": "s1"})),
    )["id"]
        .as_u64()
        .unwrap();
    let s2 = api.expect(
        201,
        "POST",
        "/v1/volumes/d/snapshots",
        Some(json!({"label": "s2"})),
    )["id"]
        .as_u64()
        .unwrap();
    let s3 = api.expect(
        201,
        "POST",
        "/v1/volumes/d/snapshots",
        Some(json!({"label": "s3"})),
    )["id"]
        .as_u64()
        .unwrap();
    api.expect(
        201,
        "POST",
        &format!("/v1/volumes/d/snapshots/{s1}/clones"),
        Some(json!({"name": "d-dev"})),
    );
    api.expect(
        200,
        "PUT",
        "/v1/volumes/d/policy",
        Some(json!({"retention": {"keep_days": 2}})),
    );
    advance(&api, 86_400);
    // A retention sweep that starts after the clock moved, and has ended:
    // not "the scheduler probably ticked by now".
    let swept = run_job(&api, json!({"kind": "retention"}));
    assert_eq!(swept["state"], "succeeded", "{swept}");
    assert_eq!(
        snapshot_ids(&api, "d"),
        vec![s1, s2, s3],
        "nothing is 2 days old yet"
    );
    // An idle client of the snapshot about to expire: retention ends its
    // connection at once, not at its next request.
    let s2_export = format!("d@{s2}");
    let gauge = format!("cdm_nbd_clients{{export=\"{s2_export}\"}}");
    let metrics = || {
        let (st, m) = http(&a.url(), "GET", "/metrics", Some(&a.admin_token()), None);
        assert_eq!(st, 200);
        m.as_str().unwrap_or_default().to_string()
    };
    let mut idle = Client::connect(
        &format!("unix:{}", a.sock.display()),
        Some(&s2_export),
        &ClientOptions::default(),
    )
    .unwrap();
    assert!(metrics().contains(&gauge), "the idle client is listed");
    advance(&api, 2 * 86_400);
    wait_for(120, "age expiry", || {
        (snapshot_ids(&api, "d") == vec![s1, s3]).then_some(())
    });
    wait_for(
        120,
        "the expired snapshot's idle client disconnected",
        || (!metrics().contains(&gauge)).then_some(()),
    );
    let mut buf = [0u8; 512];
    assert!(idle.read(0, &mut buf).is_err(), "the connection has ended");
    let s4 = api.expect(
        201,
        "POST",
        "/v1/volumes/d/snapshots",
        Some(json!({"label": "s4"})),
    )["id"]
        .as_u64()
        .unwrap();
    advance(&api, 3 * 86_400);
    wait_for(120, "age expiry keeps the newest", || {
        (snapshot_ids(&api, "d") == vec![s1, s4]).then_some(())
    });

    // Pool quota: oldest snapshots go first; each volume keeps its newest.
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "q", "size": 256 << 20})),
    );
    let mut qs = Vec::new();
    for i in 0..4u8 {
        qemu_io(&a, "q", &format!("write -P {} 0 48M", 0x40 + i));
        qs.push(
            api.expect(201, "POST", "/v1/volumes/q/snapshots", Some(json!({})))["id"]
                .as_u64()
                .unwrap(),
        );
    }
    let used = api.get("/v1/pool")["used_bytes"].as_u64().unwrap();
    assert!(used > 190 << 20, "used {used}");
    // Room for about two generations of q: the two oldest must go.
    api.expect(
        200,
        "PUT",
        "/v1/pool/policy",
        Some(json!({"quota_bytes": used - (90 << 20)})),
    );
    let done = run_job(&api, json!({"kind": "retention"}));
    assert_eq!(done["state"], "succeeded", "{done}");
    let left = snapshot_ids(&api, "q");
    assert_eq!(left, qs[2..].to_vec(), "quota expiry took {done}");
    let q_exp = api.get("/v1/events?type=snapshot.expired&limit=100");
    assert_eq!(
        q_exp
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"]["reason"] == "quota" && e["data"]["volume"] == "q")
            .count(),
        2
    );
    // Older snapshots of other volumes went first (their newest stay).
    assert_eq!(snapshot_ids(&api, "h").len(), 1);
    // A quota nothing more can meet raises one alert and keeps every volume's newest snapshot.
    api.expect(
        200,
        "PUT",
        "/v1/pool/policy",
        Some(json!({"quota_bytes": 1 << 20})),
    );
    wait_for(120, "quota alert", || {
        (event_count(&api, "alert.raised") >= 1).then_some(())
    });
    // Two more whole sweeps, each started after the alert and ended, still
    // over the quota: a per-sweep alert would show here.
    for _ in 0..2 {
        let j = run_job(&api, json!({"kind": "retention"}));
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    assert_eq!(
        event_count(&api, "alert.raised"),
        1,
        "one alert, not one per sweep"
    );
    assert_eq!(snapshot_ids(&api, "q"), vec![qs[3]]);
    assert_eq!(snapshot_ids(&api, "h").len(), 1);
    assert_eq!(
        snapshot_ids(&api, "d"),
        vec![s1, s4],
        "clone origin and newest survive"
    );
    // The clock is real without --fake-clock: covered by the lifecycle test's appliance.
}

/// Starts a job and waits for it to leave `running`; returns its record.
fn run_job(api: &Api, body: Value) -> Value {
    let job = api.expect(202, "POST", "/v1/jobs", Some(body));
    let jid = job["id"].as_u64().expect("job id");
    wait_for(120, "job to end", || {
        let j = api.get(&format!("/v1/jobs/{jid}"));
        (j["state"] != "running").then_some(j)
    })
}

fn event_count(api: &Api, kind: &str) -> usize {
    api.get(&format!("/v1/events?type={kind}&limit=10000"))
        .as_array()
        .map(|v| v.len())
        .unwrap_or(0)
}

#[test]
fn webhooks_are_signed_retried_and_never_slow_io() {
    use hmac::{Hmac, Mac};
    require("qemu-io");
    // Attempts that never time out on their own: a delivery to the
    // hanging receiver below is stuck until the test releases it, so that
    // I/O that waited for deliveries would hang (and fail the test), not
    // merely be slower than some guessed number of milliseconds.
    let cfg = FAST_CONFIG.replace("timeout_ms = 2000", "timeout_ms = 3600000");
    assert_ne!(cfg, FAST_CONFIG);
    let a = Appliance::start(Some(&cfg));
    let api = Api::new(&a, &a.admin_token());
    let rx = Receiver::with(2, false);
    let secret = "0123456789abcdef-secret";
    api.expect(
        400,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": "ftp://x/", "events": ["*"]})),
    );
    api.expect(
        400,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": "http://h/", "events": ["Volume Created"]})),
    );
    api.expect(
        400,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": "http://h/", "secret": "short"})),
    );
    let hook = api.expect(
        201,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": format!("http://127.0.0.1:{}/hook", rx.port), "events": ["volume.*"], "secret": secret})),
    );
    assert_eq!(hook["secret"], secret);
    let hid = hook["id"].as_u64().unwrap();
    assert!(
        api.get(&format!("/v1/webhooks/{hid}"))["secret"].is_null(),
        "secret shown once"
    );

    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "w", "size": 1 << 20})),
    );
    api.expect(201, "POST", "/v1/volumes/w/snapshots", Some(json!({}))); // not subscribed
    let d = wait_for(120, "delivery after retries", || {
        let d = api.get(&format!("/v1/webhooks/{hid}/deliveries"));
        (d.as_array()
            .unwrap()
            .first()
            .is_some_and(|x| x["state"] == "delivered"))
        .then_some(d)
    });
    let d0 = &d.as_array().unwrap()[0];
    assert_eq!(d0["attempts"], 3, "{d0}");
    assert_eq!(d0["event_type"], "volume.created");
    assert_eq!(d0["last_status"], 200);
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "two 500s then a 200; only volume.* events");
    for (h, body) in &got {
        assert_eq!(header(h, "x-cdm-event"), Some("volume.created"));
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(header(h, "x-cdm-signature"), Some(want.as_str()));
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["event"]["type"], "volume.created");
        assert_eq!(v["event"]["subject"], "w");
        assert_eq!(v["event"]["actor"], "admin");
    }

    // A receiver that never answers and one that is gone: deliveries wait
    // on their own threads; NBD I/O and API calls do not.
    let dead_port = ClosedPort::new();
    let dead_port_no = dead_port.port;
    let slow = Receiver::with(0, true);
    for port in [slow.port, dead_port_no] {
        api.expect(
            201,
            "POST",
            "/v1/webhooks",
            Some(json!({"url": format!("http://127.0.0.1:{port}/"), "events": ["*"]})),
        );
    }
    api.expect(
        201,
        "POST",
        "/v1/volumes/w/snapshots",
        Some(json!({"label": "first"})),
    );
    // Observed, not assumed: a delivery is stuck in the hanging receiver.
    wait_for(120, "a delivery held by the hanging receiver", || {
        (!slow.got.lock().unwrap().is_empty()).then_some(())
    });
    for i in 0..5 {
        // Each of these emits events for both hooks while deliveries are
        // stuck; had they waited for a delivery they would never return.
        api.expect(
            201,
            "POST",
            "/v1/volumes/w/snapshots",
            Some(json!({"label": format!("s{i}")})),
        );
        qemu_io(&a, "w", "write -P 0x5a 0 256k");
    }
    assert!(
        !slow.got.lock().unwrap().is_empty(),
        "the hanging receiver still holds its deliveries"
    );
    slow.release();
    let hooks = api.get("/v1/webhooks");
    let dead = hooks
        .as_array()
        .unwrap()
        .iter()
        .find(|h| {
            h["url"]
                .as_str()
                .unwrap()
                .contains(&dead_port_no.to_string())
        })
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let failed = failed_delivery(&api, dead, "dead receiver given up");
    assert_eq!(failed["attempts"], 4);
    assert!(failed["last_error"].as_str().is_some());
    api.expect(204, "DELETE", &format!("/v1/webhooks/{dead}"), None);
    api.expect(404, "GET", &format!("/v1/webhooks/{dead}"), None);
    let (_, m) = http(&a.url(), "GET", "/metrics", Some(&a.admin_token()), None);
    assert!(m
        .as_str()
        .unwrap()
        .contains("cdm_webhook_deliveries{state=\"failed\"}"));
}

#[test]
fn restart_keeps_state_and_sigterm_loses_no_flushed_data() {
    let mut a = Appliance::start(Some(LOCAL_WEBHOOKS));
    let admin_tok = a.admin_token();
    let api = Api::new(&a, &admin_tok);
    api.expect(
        201,
        "POST",
        "/v1/users",
        Some(json!({"name": "ops", "role": "operator", "password": "operator-pass"})),
    );
    let t = api.expect(
        201,
        "POST",
        "/v1/users/ops/tokens",
        Some(json!({"name": "cron"})),
    );
    let ops_tok = t["token"].as_str().unwrap().to_string();
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "pg", "size": 64 << 20, "block_size": 4096})),
    );
    let p =
        json!({"schedule": {"cron": "0 2 * * *"}, "retention": {"keep_days": 14, "min_keep": 2}});
    api.expect(200, "PUT", "/v1/volumes/pg/policy", Some(p.clone()));
    api.expect(
        201,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": "http://127.0.0.1:9/", "events": ["alert.*"]})),
    );
    api.expect(
        200,
        "PUT",
        "/v1/pool/policy",
        Some(json!({"quota_bytes": 3u64 << 30})),
    );

    // Writers flush as they go; SIGTERM lands in the middle. The writer
    // never stops by itself (it wraps round the volume), so it is certainly
    // writing when SIGTERM comes, and only the cut can end it.
    const SLOTS: u64 = 16_000;
    let ep = format!("unix:{}", a.sock.display());
    let flushed = Arc::new(AtomicU64::new(0));
    let f2 = flushed.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&ep, Some("pg"), &ClientOptions::default()).unwrap();
        let mut i = 0u64;
        loop {
            let block = random_bytes(4096, i);
            if let Err(e) = c.write((i % SLOTS) * 4096, &block, false) {
                return (i, e);
            }
            i += 1;
            if i.is_multiple_of(16) {
                if let Err(e) = c.flush() {
                    return (i, e);
                }
                f2.store(i, Ordering::SeqCst);
            }
        }
    });
    wait_for(120, "writes under way", || {
        (flushed.load(Ordering::SeqCst) >= 512).then_some(())
    });
    let snap = api.expect(
        201,
        "POST",
        "/v1/volumes/pg/snapshots",
        Some(json!({"label": "mid-write"})),
    )["id"]
        .as_u64()
        .unwrap();
    a.stop(); // SIGTERM: must exit 0 with writes in flight
    let (attempted, cut) = writer.join().unwrap();
    let n = flushed.load(Ordering::SeqCst);
    assert!(
        n >= 512 && attempted >= n,
        "{attempted} writes, {n} flushed"
    );
    eprintln!("writer cut by SIGTERM after {attempted} writes ({n} flushed): {cut}");

    a.restart();
    assert_eq!(a.admin_token(), admin_tok, "the admin token is made once");
    let api = Api::new(&a, &admin_tok);
    let ops = Api {
        base: a.url(),
        token: ops_tok,
    };
    assert_eq!(ops.get("/v1/volumes")[0]["name"], "pg");
    assert_eq!(api.get("/v1/volumes/pg/policy"), p);
    assert_eq!(api.get("/v1/pool")["policy"]["quota_bytes"], 3u64 << 30);
    assert_eq!(api.get("/v1/webhooks").as_array().unwrap().len(), 1);
    assert_eq!(api.get("/v1/users").as_array().unwrap().len(), 2);
    assert_eq!(
        api.get(&format!("/v1/volumes/pg/snapshots/{snap}"))["label"],
        "mid-write"
    );
    assert!(api.get("/v1/audit?limit=1000").as_array().unwrap().len() >= 5);
    let ep = format!("unix:{}", a.sock.display());
    let mut c = Client::connect(&ep, Some("pg"), &ClientOptions::default()).unwrap();
    // Each slot holds its last flushed write, or a later one the writer
    // sent before the cut (those may or may not have landed).
    let mut buf = vec![0u8; 4096];
    for slot in 0..SLOTS.min(n) {
        c.read(slot * 4096, &mut buf).unwrap();
        let last_flushed = slot + (n - 1 - slot) / SLOTS * SLOTS;
        let landed = (last_flushed..=attempted)
            .step_by(SLOTS as usize)
            .any(|k| buf == random_bytes(4096, k));
        assert!(
            landed,
            "slot {slot}: flushed write {last_flushed} lost ({n} flushed, {attempted} sent)"
        );
    }
    c.disconnect().unwrap();
    a.stop();
}

fn cdmctl(a: &Appliance, args: &[&str]) -> std::process::Output {
    a.cdmctl(args)
}

fn ok_json(a: &Appliance, args: &[&str]) -> Value {
    let mut v = vec!["--json"];
    v.extend_from_slice(args);
    let o = cdmctl(a, &v);
    assert!(
        o.status.success(),
        "cdmctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("cdmctl {args:?} printed no JSON: {e}"))
}

#[test]
fn cdmctl_drives_the_appliance_with_exit_codes() {
    require("qemu-io");
    let a = Appliance::start(None);
    let v = ok_json(
        &a,
        &[
            "volume",
            "create",
            "pg",
            "--size",
            "64M",
            "--block-size",
            "16K",
        ],
    );
    assert_eq!(
        (v["size"].as_u64(), v["block_size"].as_u64()),
        (Some(64 << 20), Some(16384))
    );
    qemu_io(&a, "pg", "write -P 0x42 0 2M");
    let s = ok_json(
        &a,
        &[
            "snapshot",
            "create",
            "pg",
            "--label",
            "nightly",
            "--metadata",
            r#"{"lsn":"0/1"}"#,
        ],
    );
    let sid = s["id"].as_u64().unwrap().to_string();
    assert_eq!(s["metadata"]["lsn"], "0/1");
    ok_json(&a, &["clone", "create", "pg", &sid, "pg-dev"]);
    qemu_io(&a, "pg-dev", "read -P 0x42 0 2M");
    // Human tables name what they list.
    let o = cdmctl(&a, &["volume", "list"]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.starts_with("NAME") && t.contains("pg-dev") && t.contains(&format!("pg@{sid}")),
        "{t}"
    );
    let o = cdmctl(&a, &["snapshot", "list", "pg"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("nightly"));
    // A job with --wait ends with its outcome.
    let j = ok_json(&a, &["job", "start", "scrub", "--wait"]);
    assert_eq!(j["state"], "succeeded");
    assert_eq!(j["result"]["error_count"], 0);
    assert!(j["result"]["bytes_checked"].as_u64().unwrap() >= 2 << 20);
    ok_json(
        &a,
        &[
            "volume",
            "set-policy",
            "pg",
            "--cron",
            "0 2 * * *",
            "--keep-days",
            "14",
            "--min-keep",
            "2",
        ],
    );
    assert_eq!(
        ok_json(&a, &["volume", "policy", "pg"])["retention"]["keep_days"],
        14
    );
    let u = ok_json(&a, &["user", "create", "aud", "--role", "auditor"]);
    assert_eq!(u["role"], "auditor");
    let t = ok_json(&a, &["token", "create", "aud", "ro", "--expires-in", "1d"]);
    let aud_token = t["token"].as_str().unwrap().to_string();
    assert!(
        ok_json(&a, &["event", "list", "--type", "snapshot.*"])
            .as_array()
            .unwrap()
            .len()
            == 1
    );
    assert!(!ok_json(&a, &["audit", "list", "--user", "admin"])
        .as_array()
        .unwrap()
        .is_empty());

    // Exit codes.
    let code = |o: std::process::Output| o.status.code().unwrap_or(-1);
    assert_eq!(code(cdmctl(&a, &["volume", "show", "missing"])), 4);
    assert_eq!(
        code(cdmctl(&a, &["volume", "create", "pg", "--size", "1M"])),
        5
    );
    assert_eq!(
        code(cdmctl(&a, &["volume", "delete", "pg"])),
        5,
        "has snapshots"
    );
    assert_eq!(
        code(cdmctl(
            &a,
            &["volume", "create", "bad/name", "--size", "1M"]
        )),
        6
    );
    assert_eq!(
        code(cdmctl(
            &a,
            &[
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--encryption",
                "sm4-xts"
            ]
        )),
        5,
        "409: no key"
    );
    assert_eq!(code(cdmctl(&a, &["volume", "create", "x"])), 2, "usage");
    assert_eq!(
        code(cdmctl(
            &a,
            &["--token", &aud_token, "volume", "create", "y", "--size", "1M"]
        )),
        3,
        "auditor may not write"
    );
    assert_eq!(
        code(cdmctl(&a, &["--token", "cdm_00_00", "volume", "list"])),
        3
    );
    let o = Command::new(bin("cdmctl"))
        .args(["--url", &a.url(), "volume", "list"])
        .env_remove("CDM_TOKEN")
        .env_remove("CDM_TOKEN_FILE")
        .current_dir(a.dir.path())
        .output()
        .unwrap();
    assert_eq!(code(o), 3, "no token anywhere");
    let closed = ClosedPort::new();
    let dead = format!("http://127.0.0.1:{}", closed.port);
    let o = Command::new(bin("cdmctl"))
        .args(["--url", &dead, "--token", "cdm_00_00", "volume", "list"])
        .output()
        .unwrap();
    assert_eq!(code(o), 7, "server unreachable");
    let o = cdmctl(&a, &["volume", "show", "missing"]);
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("cdmctl: volume missing not found"));
    // Delete through a background job (once qemu-io's session has ended).
    wait_for(120, "qemu-io to leave", || {
        (ok_json(&a, &["volume", "show", "pg-dev"])["clients"] == 0).then_some(())
    });
    let j = ok_json(
        &a,
        &[
            "job",
            "start",
            "delete-volume",
            "--volume",
            "pg-dev",
            "--wait",
        ],
    );
    assert_eq!(j["state"], "succeeded");
    let o = cdmctl(
        &a,
        &["job", "start", "delete-volume", "--volume", "pg", "--wait"],
    );
    assert_eq!(code(o), 1, "refused without force: the job fails");
    assert_eq!(
        ok_json(&a, &["volume", "list"]).as_array().unwrap().len(),
        1
    );
    let o = cdmctl(&a, &["metrics"]);
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("cdm_nbd_bytes_total{export=\"pg\",op=\"write\"} 2097152"));
}

#[test]
fn pending_webhook_deliveries_survive_a_restart() {
    use hmac::{Hmac, Mac};
    // Retries for long enough that the delivery is still pending at restart.
    let cfg = "scheduler_tick_ms = 100\n[webhooks]\nbackoff_ms = 200\nmax_backoff_ms = 400\nmax_attempts = 1000\ntimeout_ms = 1000\nallow_private = true\n";
    let mut a = Appliance::start(Some(cfg));
    let api = Api::new(&a, &a.admin_token());
    // Nothing listens there yet, and nothing else can take the port.
    let closed = ClosedPort::new();
    let port = closed.port;
    let secret = "restart-secret-0123456789";
    let h = api.expect(
        201,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": format!("http://127.0.0.1:{port}/"), "events": ["volume.created"], "secret": secret})),
    );
    let hid = h["id"].as_u64().unwrap();
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "late", "size": 1 << 20})),
    );
    wait_for(120, "failed attempts", || {
        let d = api.get(&format!("/v1/webhooks/{hid}/deliveries"));
        d[0]["attempts"]
            .as_u64()
            .is_some_and(|n| n >= 2)
            .then_some(())
    });
    a.stop();
    // The receiver comes up while the daemon is down.
    let rx = Receiver::on(closed.listen(), 0, false);
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    let d = wait_for(120, "delivery after restart", || {
        let d = api.get(&format!("/v1/webhooks/{hid}/deliveries"));
        (d[0]["state"] == "delivered").then_some(d)
    });
    assert!(d[0]["attempts"].as_u64().unwrap() >= 3, "{d}");
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "delivered once");
    let (h, body) = &got[0];
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(header(h, "x-cdm-signature"), Some(want.as_str()));
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["event"]["subject"], "late");
    a.stop();
}

/// `POST /v1/login`: status, `Retry-After` and body.
fn login(base: &str, name: &str, password: &str) -> (u16, Option<String>, Value) {
    let body = json!({"name": name, "password": password}).to_string();
    let r = match ureq::post(&format!("{base}/v1/login"))
        .set("Content-Type", "application/json")
        .send_string(&body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("login: {e}"),
    };
    let status = r.status();
    let retry = r.header("Retry-After").map(str::to_string);
    (status, retry, r.into_json().unwrap_or(Value::Null))
}

#[test]
fn login_brute_force_is_locked_out_with_an_alert() {
    let a = Appliance::start(None);
    let api = Api::new(&a, &a.admin_token());
    for u in ["victim", "bystander"] {
        api.expect(
            201,
            "POST",
            "/v1/users",
            Some(json!({"name": u, "role": "operator", "password": format!("{u}-password")})),
        );
    }
    let base = a.url();
    for i in 0..5 {
        let (s, _, v) = login(&base, "victim", "guess-1234");
        assert_eq!(s, 401, "attempt {i}: {v}");
    }
    let (s, _, v) = login(&base, "victim", "guess-1234");
    assert_eq!(s, 429, "{v}");
    // The right password is refused too while locked out.
    let (s, retry, v) = login(&base, "victim", "victim-password");
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["code"], "too_many_requests");
    let secs: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    let alerts = api.get("/v1/events?type=alert.raised&limit=100");
    let lockouts: Vec<&Value> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == "victim" && e["data"]["reason"] == "login_lockout")
        .collect();
    assert_eq!(lockouts.len(), 1, "one alert per lockout: {alerts}");
    // Another user (from the same address) is not affected.
    let (s, _, v) = login(&base, "bystander", "bystander-password");
    assert_eq!(s, 201, "{v}");
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn data_directory_and_files_are_private_whatever_the_umask() {
    // The umask snapshotd inherits; 022 would give 0755/0644.
    unsafe { libc::umask(0o022) };
    let mut a = Appliance::start(None);
    assert_eq!(mode(&a.data), 0o700);
    for f in ["pool", "state.redb", "admin.token"] {
        assert_eq!(mode(&a.data.join(f)), 0o600, "{f}");
    }
    // Looser modes from an older version are tightened at start.
    a.stop();
    let loosen = std::fs::Permissions::from_mode;
    std::fs::set_permissions(&a.data, loosen(0o755)).unwrap();
    std::fs::set_permissions(a.data.join("pool"), loosen(0o644)).unwrap();
    a.restart();
    assert_eq!(mode(&a.data), 0o700);
    assert_eq!(mode(&a.data.join("pool")), 0o600);
    assert!(a.log().contains("tightened"), "{}", a.log());
}

#[test]
fn key_files_readable_by_others_are_refused_unless_allowed() {
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("key");
    write_file(&key, &[7u8; 32]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = snapshotd_refused(
        &work.path().join("data"),
        work.path(),
        &["--key-file".as_ref(), key.as_os_str()],
    );
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
    // The config's allow_insecure_key_file starts it, with a warning.
    let cfg = format!(
        "key_file = \"{}\"\nallow_insecure_key_file = true\n",
        key.display()
    );
    let a = Appliance::start(Some(&cfg));
    assert!(a.log().contains("INSECURE"), "{}", a.log());
    drop(a);
    // So does --allow-insecure-key-file.
    let ready = work.path().join("ready");
    let mut child = Command::new(bin("snapshotd"))
        .arg("--data")
        .arg(work.path().join("data2"))
        .arg("--key-file")
        .arg(&key)
        .arg("--allow-insecure-key-file")
        .args([
            "--nbd",
            &format!("unix:{}", work.path().join("y.sock").display()),
            "--api",
            "127.0.0.1:0",
            "--pool-size",
            "1G",
        ])
        .arg("--ready-file")
        .arg(&ready)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run snapshotd");
    let v = wait_ready(
        &ready,
        &mut child,
        "snapshotd with an insecure key file",
        String::new,
    );
    let api = v["api"].as_str().expect("API address");
    // The address reported is the one serving the API.
    let (status, _) = http(&format!("http://{api}"), "GET", "/health", None, None);
    assert_eq!(status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn webhooks_to_loopback_and_link_local_are_refused_by_default() {
    let mut a = Appliance::start(Some(LOCAL_WEBHOOKS));
    let api = Api::new(&a, &a.admin_token());
    let rx = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/hook", rx.local_addr().unwrap().port());
    // Allowed by the setting: created, then kept across a restart without it.
    let hook = api.expect(
        201,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": url, "events": ["volume.*"]})),
    );
    let hid = hook["id"].as_u64().unwrap();
    a.stop();
    a.config = None;
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    for bad in [
        url.as_str(),
        "http://[::1]:8080/",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost/",
    ] {
        let v = api.expect(
            400,
            "POST",
            "/v1/webhooks",
            Some(json!({"url": bad, "events": ["*"]})),
        );
        assert_eq!(v["error"]["code"], "bad_request");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("allow_private"),
            "{v}"
        );
    }
    // The stored one is checked again at delivery: failed, not retried.
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "v", "size": 8 << 20})),
    );
    let d = failed_delivery(&api, hid, "refused delivery");
    assert_eq!(d["attempts"], 1);
    assert!(
        d["last_error"].as_str().unwrap().contains("loopback"),
        "{d}"
    );
}

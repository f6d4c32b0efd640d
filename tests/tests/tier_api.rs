//! The object tier's control plane (issue 21) against the real snapshotd:
//! `PUT/GET/DELETE /v1/tier` with roles, the secret key never in an answer,
//! an event, the audit log or the daemon's log, and never in clear under
//! the data directory (before and after a restart); bad inputs refused with
//! their reason; the policy's tiering fields; every snapshot's `location`;
//! the `tier`, `recall` and `tier-gc` jobs checked (400, 404, 409
//! `not_configured`) and run to their recorded failure when the store is
//! unreachable; `cdmctl tier` and `cdmctl job start tier`. Tiering itself
//! is `tier_e2e.rs`.

use std::io::Read;
use std::path::Path;

use cdm_e2e::*;
use serde_json::{json, Value};

const SECRET: &str = "Zk3/x9QpLm2+TierSecretKey+0123456789abcdefXYZ";
const ACCESS: &str = "GK31c2f218a2e44f485b94239e";

/// A small sparse pool: the secret scan reads every byte under DATA.
fn appliance() -> Appliance {
    Appliance::start_with(None, None, &["--pool-size", "1G", "--pool-sparse"])
}

fn config() -> Value {
    json!({"endpoint": "http://127.0.0.1:3900", "bucket": "cdm-tier",
        "access_key": ACCESS, "secret_key": SECRET, "path_style": true})
}

/// A user of `role` and an API client with its token.
fn user(a: &Appliance, admin: &Api, name: &str, role: &str) -> Api {
    admin.expect(
        201,
        "POST",
        "/v1/users",
        Some(json!({"name": name, "role": role})),
    );
    let t = admin.expect(
        201,
        "POST",
        &format!("/v1/users/{name}/tokens"),
        Some(json!({"name": "t"})),
    );
    Api::new(a, t["token"].as_str().expect("token"))
}

/// Files under `dir` (recursively) whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&p).expect("stat");
            if meta.is_dir() {
                todo.push(p);
            } else if meta.is_file() && file_holds(&p, needle) {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// Streams `p` in 1 MiB chunks, overlapping by the needle's length.
fn file_holds(p: &Path, needle: &[u8]) -> bool {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return false;
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = carry.len().saturating_sub(needle.len());
        carry.drain(..keep);
    }
}

fn assert_no_secret(what: &str, v: &Value) {
    let text = v.to_string();
    assert!(
        !text.contains(SECRET),
        "{what} shows the secret key: {text}"
    );
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn tier_config_round_trips_with_roles_and_the_secret_never_shown_or_stored_in_clear() {
    let mut a = appliance();
    let admin = Api::new(&a, &a.admin_token());
    let op = user(&a, &admin, "op", "operator");
    let aud = user(&a, &admin, "aud", "auditor");

    let v = admin.expect(404, "GET", "/v1/tier", None);
    assert_eq!(error_code(&v), "not_configured");
    let v = admin.expect(404, "DELETE", "/v1/tier", None);
    assert_eq!(error_code(&v), "not_configured");

    // Only an admin configures it.
    for who in [&op, &aud] {
        let v = who.expect(403, "PUT", "/v1/tier", Some(config()));
        assert_no_secret("a 403", &v);
    }
    admin.expect(404, "GET", "/v1/tier", None);

    let uuid = admin.get("/v1/pool")["uuid"]
        .as_str()
        .expect("pool uuid")
        .to_string();
    // Virtual-host addressing needs a host name, not an IP address: a
    // client for it cannot be built, so it is refused with the reason.
    let mut vhost = config();
    vhost["path_style"] = json!(false);
    let e = admin.expect(400, "PUT", "/v1/tier", Some(vhost));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("127.0.0.1"),
        "{e}"
    );
    let view = admin.expect(200, "PUT", "/v1/tier", Some(config()));
    assert_no_secret("PUT /v1/tier", &view);
    assert_eq!(view["configured"], true);
    assert_eq!(view["secret_key_set"], true);
    assert_eq!(view["access_key"], ACCESS);
    assert_eq!(view["endpoint"], "http://127.0.0.1:3900");
    assert_eq!(view["region"], "us-east-1");
    assert_eq!(view["path_style"], true);
    assert_eq!(view["prefix"], format!("cdm/{uuid}/"));
    assert_eq!(view["cache_bytes"], 1u64 << 30);
    assert_eq!(view["pack_mib"], 32);
    assert!(view.get("secret_key").is_none(), "{view}");

    // Every role reads it, the same, without the secret.
    for who in [&admin, &op, &aud] {
        let v = who.get("/v1/tier");
        assert_eq!(v, view);
    }
    // Events, the audit log and the daemon's log carry no secret either.
    let events = admin.get("/v1/events?type=tier.*");
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    assert_eq!(events[0]["type"], "tier.configured");
    assert_no_secret("the events", &admin.get("/v1/events"));
    let audit = admin.get("/v1/audit");
    assert!(audit.to_string().contains("/v1/tier"), "{audit}");
    assert_no_secret("the audit log", &audit);

    // Nothing under the data directory holds it in clear, before and after
    // a restart (the state database written again, the key file reread).
    let none: Vec<String> = Vec::new();
    assert_eq!(files_holding(&a.data, SECRET.as_bytes()), none);
    a.stop();
    a.restart();
    assert_eq!(files_holding(&a.data, SECRET.as_bytes()), none);
    assert!(
        !a.log().contains(SECRET),
        "the daemon logged the secret key"
    );
    let key = a.data.join("secrets.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key)
        .expect("DATA/secrets.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let admin = Api::new(&a, &a.admin_token());
    assert_eq!(admin.get("/v1/tier"), view);

    // Replaced whole: options given, the rest back to their defaults.
    let mut c2 = config();
    c2["region"] = json!("garage");
    c2["path_style"] = json!(true);
    c2["prefix"] = json!("backups/site-a");
    c2["pack_mib"] = json!(16);
    c2["cache_bytes"] = json!(128u64 << 20);
    c2["max_requests_per_sec"] = json!(200);
    c2["max_mib_per_sec"] = json!(50);
    let v2 = admin.expect(200, "PUT", "/v1/tier", Some(c2));
    assert_eq!(
        (
            &v2["region"],
            &v2["path_style"],
            &v2["prefix"],
            &v2["pack_mib"]
        ),
        (
            &json!("garage"),
            &json!(true),
            &json!("backups/site-a/"),
            &json!(16)
        )
    );
    assert_eq!(v2["max_requests_per_sec"], 200);
    assert_eq!(v2["max_mib_per_sec"], 50);

    // Deleting is an admin's too; then it is gone.
    let op = Api::new(&a, &op.token);
    let aud = Api::new(&a, &aud.token);
    op.expect(403, "DELETE", "/v1/tier", None);
    aud.expect(403, "DELETE", "/v1/tier", None);
    admin.get("/v1/tier");
    admin.expect(204, "DELETE", "/v1/tier", None);
    let v = aud.expect(404, "GET", "/v1/tier", None);
    assert_eq!(error_code(&v), "not_configured");
    let kinds: Vec<String> = admin
        .get("/v1/events?type=tier.*")
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        kinds,
        ["tier.configured", "tier.configured", "tier.deleted"]
    );
    a.stop();
}

#[test]
fn bad_tier_configurations_are_refused_with_the_reason() {
    let a = appliance();
    let admin = Api::new(&a, &a.admin_token());
    for (change, reason) in [
        (
            json!({"endpoint": "ftp://127.0.0.1"}),
            "http:// or https://",
        ),
        (json!({"endpoint": "127.0.0.1:3900"}), "endpoint"),
        (json!({"endpoint": "http://k:s@h"}), "user or password"),
        (json!({"bucket": ""}), "bucket \"\" is empty"),
        (json!({"bucket": "Has_Upper"}), "a-z"),
        (json!({"region": "eu west"}), "region"),
        (json!({"access_key": ""}), "access_key is empty"),
        (json!({"prefix": "/abs"}), "relative"),
        (json!({"cache_bytes": 1 << 20}), "cache_bytes"),
        (json!({"pack_mib": 8}), "16 to 64"),
        (json!({"pack_mib": 65}), "16 to 64"),
        (json!({"max_mib_per_sec": 0}), "max_mib_per_sec"),
    ] {
        let mut body = config();
        if let (Some(o), Some(c)) = (body.as_object_mut(), change.as_object()) {
            o.extend(c.clone());
        }
        let v = admin.expect(400, "PUT", "/v1/tier", Some(body));
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(reason), "{change}: {msg}");
        assert_no_secret("a refusal", &v);
    }
    // A secret with a space is refused without being echoed.
    let mut body = config();
    body["secret_key"] = json!("sec ret-value");
    let v = admin.expect(400, "PUT", "/v1/tier", Some(body));
    assert!(!v.to_string().contains("sec ret-value"), "{v}");
    // Missing and unknown fields: the JSON is refused.
    let mut body = config();
    body.as_object_mut().map(|o| o.remove("secret_key"));
    let v = admin.expect(400, "PUT", "/v1/tier", Some(body));
    assert_eq!(error_code(&v), "invalid_json");
    let mut body = config();
    body["secret"] = json!("x");
    admin.expect(400, "PUT", "/v1/tier", Some(body));
    // Nothing was stored by any of them.
    admin.expect(404, "GET", "/v1/tier", None);
}

#[test]
fn policy_tiering_fields_round_trip_and_snapshots_say_where_they_are() {
    let mut a = appliance();
    let admin = Api::new(&a, &a.admin_token());
    admin.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "db", "size": 64u64 << 20})),
    );
    let p = json!({"retention": {"keep_last": 10, "min_keep": 1},
        "tier_after_days": 30, "tier_keep_last": 5});
    let got = admin.expect(200, "PUT", "/v1/volumes/db/policy", Some(p));
    assert_eq!(
        (&got["tier_after_days"], &got["tier_keep_last"]),
        (&json!(30), &json!(5))
    );
    for (field, bad) in [("tier_after_days", 0), ("tier_keep_last", 0)] {
        let v = admin.expect(
            400,
            "PUT",
            "/v1/volumes/db/policy",
            Some(json!({field: bad})),
        );
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(field), "{msg}");
    }
    admin.expect(
        400,
        "PUT",
        "/v1/volumes/db/policy",
        Some(json!({"tier_after_days": -1})),
    );
    // The refusals changed nothing; the fields survive a restart.
    a.stop();
    a.restart();
    let admin = Api::new(&a, &a.admin_token());
    let p = admin.get("/v1/volumes/db/policy");
    assert_eq!(
        (&p["tier_after_days"], &p["tier_keep_last"]),
        (&json!(30), &json!(5))
    );

    // cdmctl sets and shows them.
    let o = a.cdmctl(&[
        "volume",
        "set-policy",
        "db",
        "--tier-after-days",
        "7",
        "--keep-last",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("tier after days: 7"), "{text}");
    let p = admin.get("/v1/volumes/db/policy");
    assert_eq!(p["tier_after_days"], 7);
    assert!(p.get("tier_keep_last").is_none(), "{p}");

    // Every point says where its data is: in the pool, until tiered.
    let s = admin.expect(
        201,
        "POST",
        "/v1/volumes/db/snapshots",
        Some(json!({"label": "one"})),
    );
    assert_eq!(s["location"], "local");
    let id = s["id"].as_u64().expect("snapshot id");
    assert_eq!(
        admin.get(&format!("/v1/volumes/db/snapshots/{id}"))["location"],
        "local"
    );
    let list = admin.get("/v1/volumes/db/snapshots");
    assert_eq!(list[0]["location"], "local");
    let o = a.cdmctl(&["snapshot", "list", "db"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains("LOCATION") && text.contains("local"),
        "{text}"
    );
    a.stop();
}

fn wait_job(api: &Api, id: u64) -> Value {
    wait_for(60, "the job to end", || {
        let j = api.get(&format!("/v1/jobs/{id}"));
        matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(j)
    })
}

#[test]
fn tier_jobs_are_checked_then_routed_to_the_engine_hooks() {
    let a = appliance();
    let admin = Api::new(&a, &a.admin_token());
    admin.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "db", "size": 64u64 << 20})),
    );
    let sid = admin.expect(201, "POST", "/v1/volumes/db/snapshots", Some(json!({})))["id"]
        .as_u64()
        .expect("snapshot id");
    let job = |status: u16, body: Value| admin.expect(status, "POST", "/v1/jobs", Some(body));

    // Missing fields: 400, whether or not a tier is configured.
    let v = job(400, json!({"kind": "tier"}));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("\"volume\""),
        "{v}"
    );
    let v = job(400, json!({"kind": "recall", "volume": "db"}));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("\"snapshot\""),
        "{v}"
    );
    job(400, json!({"kind": "tier-gc", "volume": "db"}));
    // Unknown volume or point: 404.
    job(404, json!({"kind": "tier", "volume": "nope"}));
    job(
        404,
        json!({"kind": "tier", "volume": "db", "snapshot": 999}),
    );
    job(
        404,
        json!({"kind": "recall", "volume": "db", "snapshot": 999}),
    );
    // No tier configured: 409 not_configured.
    for body in [
        json!({"kind": "tier", "volume": "db"}),
        json!({"kind": "recall", "volume": "db", "snapshot": sid}),
        json!({"kind": "tier-gc"}),
    ] {
        let v = job(409, body.clone());
        assert_eq!(error_code(&v), "not_configured", "{body}: {v}");
    }
    // An auditor may not start them.
    let aud = user(&a, &admin, "aud", "auditor");
    aud.expect(403, "POST", "/v1/jobs", Some(json!({"kind": "tier-gc"})));

    // Configured: a whole volume needs a tiering rule to have anything due.
    admin.expect(200, "PUT", "/v1/tier", Some(config()));
    let v = job(400, json!({"kind": "tier", "volume": "db"}));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no tiering rule"),
        "{v}"
    );
    admin.expect(
        200,
        "PUT",
        "/v1/volumes/db/policy",
        Some(json!({"tier_keep_last": 3})),
    );
    // A recall of a point that is not tiered: nothing to do, 400.
    let v = job(
        400,
        json!({"kind": "recall", "volume": "db", "snapshot": sid}),
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not tiered"),
        "{v}"
    );
    // Then each job starts, records what it is for, and ends failed with
    // the reason: nothing listens at the configured endpoint.
    for body in [
        json!({"kind": "tier", "volume": "db"}),
        json!({"kind": "tier", "volume": "db", "snapshot": sid}),
        json!({"kind": "tier-gc"}),
    ] {
        let j = job(202, body.clone());
        assert_eq!(j["kind"], body["kind"]);
        let done = wait_job(&admin, j["id"].as_u64().expect("job id"));
        assert_eq!(done["state"], "failed", "{body}: {done}");
        assert!(
            done["message"]
                .as_str()
                .unwrap_or("")
                .contains("unreachable"),
            "{body}: {done}"
        );
        assert_eq!(
            done["params"]["snapshot"],
            body.get("snapshot").cloned().unwrap_or(Value::Null)
        );
        assert_no_secret("a job", &done);
    }
    // The same through cdmctl: the job's failure is its exit status.
    let o = a.cdmctl(&[
        "job",
        "start",
        "tier",
        "db",
        "--snapshot",
        &sid.to_string(),
        "--wait",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("unreachable"), "{err}");
    let o = a.cdmctl(&["job", "start", "tier"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"volume\""));
}

#[test]
fn cdmctl_tier_sets_shows_and_deletes() {
    let a = appliance();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("secret");
    write_file(&secret_file, format!("{SECRET}\n").as_bytes());
    let o = a.cdmctl(&[
        "--json",
        "tier",
        "set",
        "--endpoint",
        "https://s3.example.com/",
        "--bucket",
        "cdm-tier",
        "--access-key",
        ACCESS,
        "--secret-key-file",
        &secret_file.display().to_string(),
        "--path-style",
        "--pack-mib",
        "48",
        "--cache-bytes",
        "2G",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!out.contains(SECRET), "{out}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["endpoint"], "https://s3.example.com");
    assert_eq!(
        (&v["path_style"], &v["pack_mib"]),
        (&json!(true), &json!(48))
    );
    assert_eq!(v["cache_bytes"], 2u64 << 30);

    let o = a.cdmctl(&["tier", "show"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success());
    for want in [
        "bucket: cdm-tier",
        "addressing: path-style",
        "secret key: set",
        ACCESS,
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
    assert!(!text.contains(SECRET), "{text}");

    // A bad value is the API's 400, said by cdmctl, with a non-zero exit.
    let o = a.cdmctl(&[
        "tier",
        "set",
        "--endpoint",
        "ftp://x",
        "--bucket",
        "cdm-tier",
        "--access-key",
        ACCESS,
        "--secret-key-file",
        &secret_file.display().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("http:// or https://"));
    // An empty secret file is refused before anything is sent.
    let empty = dir.path().join("empty");
    write_file(&empty, b"\n");
    let o = a.cdmctl(&[
        "tier",
        "set",
        "--endpoint",
        "http://h",
        "--bucket",
        "cdm-tier",
        "--access-key",
        ACCESS,
        "--secret-key-file",
        &empty.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(2));

    let o = a.cdmctl(&["tier", "delete"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = a.cdmctl(&["tier", "show"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no object-storage tier is configured"));
}

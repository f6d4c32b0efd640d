//! The control plane's appliance side (`docs/control-plane.md`) against the
//! real snapshotd: enrolment, hosts, applications, protection policies,
//! the job queue, RPO states, events, webhooks and metrics. The tests speak
//! the agent protocol over HTTP themselves, as an agent does (real agents
//! running real backups are the whole-flow test's), and move the fake
//! clock to make hosts silent, backoffs pass and points age.

use cdm_e2e::*;

mod control_util;
use control_util::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

/// Every request a webhook receiver got: headers and body.
type Got = cdm_e2e::webhook::Received;

/// A webhook receiver on 127.0.0.1 (`tests/src/webhook.rs`).
fn receiver() -> (u16, Got) {
    let r = cdm_e2e::webhook::Receiver::start();
    (r.port, r.got.clone())
}

/// The event of the first signed delivery of type `kind` the receiver got.
fn delivered(got: &Got, secret: &str, kind: &str) -> Value {
    wait_for(120, &format!("a webhook delivery of {kind}"), || {
        let g = got.lock().expect("lock");
        g.iter().find_map(|(h, body)| {
            let header = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if header("x-cdm-event").as_deref() != Some(kind) {
                return None;
            }
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
            mac.update(body);
            let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            assert_eq!(header("x-cdm-signature"), Some(want), "signature of {kind}");
            serde_json::from_slice::<Value>(body)
                .ok()
                .map(|v| v["event"].clone())
        })
    })
}

#[test]
fn enrolment_tokens_are_one_use_and_expire_and_hosts_go_offline() {
    let (a, api) = start(&[]);
    let t = token(&api, json!({}));
    let body = json!({"token": t, "name": "db1", "hostname": "db1.example", "version": "1", "os": "linux"});
    let (s, v) = enrol_raw(&a, body.clone());
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        v["host"], "db1",
        "the agent's name when the token names none"
    );
    let h = Agent {
        base: a.url(),
        token: v["credential"].as_str().unwrap().to_string(),
        name: "db1".into(),
    };
    // Reused: refused, and the message says why.
    let (s, v) = enrol_raw(&a, body);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_token")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{v}"
    );
    // Unknown.
    let (s, _) = enrol_raw(&a, json!({"token": "cdm_enrol_00", "hostname": "x"}));
    assert_eq!(s, 401);
    // Expired on the appliance's clock.
    let t = token(&api, json!({"ttl_seconds": 60}));
    advance(&api, 61);
    let (s, v) = enrol_raw(&a, json!({"token": t, "hostname": "late"}));
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );
    api.expect(
        400,
        "POST",
        "/v1/hosts/enrolments",
        Some(json!({"ttl_seconds": 8 * 86400})),
    );
    // A name taken by an enrolled host.
    let t = token(&api, json!({"name": "db1"}));
    let (s, v) = enrol_raw(&a, json!({"token": t, "hostname": "other"}));
    assert_eq!(s, 409, "{v}");

    // What a host credential may do: its protocol and its agent's needs.
    h.heartbeat(true, &[], json!([]));
    h.expect(200, "GET", "/v1/volumes", None);
    for (m, p, b) in [
        ("GET", "/v1/users", None),
        ("GET", "/v1/audit", None),
        ("GET", "/v1/webhooks", None),
        ("POST", "/v1/hosts/enrolments", Some(json!({}))),
        ("DELETE", "/v1/hosts/db1", None),
        (
            "POST",
            "/v1/protection-policies",
            Some(json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 7200})),
        ),
        ("POST", "/v1/jobs", Some(json!({"kind": "scrub"}))),
        (
            "POST",
            "/v1/users",
            Some(json!({"name": "x", "role": "admin"})),
        ),
    ] {
        let (s, v) = h.call(m, p, b);
        assert_eq!(s, 403, "{m} {p} with a host credential: {v}");
    }
    // The agent protocol is a host's only.
    api.expect(403, "POST", "/v1/agent/heartbeat", Some(json!({})));
    // No user is made a host.
    api.expect(
        400,
        "POST",
        "/v1/users",
        Some(json!({"name": "h", "role": "host", "password": "12345678"})),
    );

    // Online while heard from; offline after three silent heartbeats.
    let hv = api.get("/v1/hosts/db1");
    assert_eq!(hv["state"], "online", "{hv}");
    assert_eq!(hv["hostname"], "db1.example");
    assert_eq!(hv["capabilities"], json!(["postgresql", "files"]));
    assert!(hv["last_seen"].as_str().is_some(), "{hv}");
    advance(&api, 31);
    assert_eq!(host_state(&api, "db1"), "offline");
    h.heartbeat(false, &[], json!([]));
    assert_eq!(host_state(&api, "db1"), "online");
    let hosts = api.get("/v1/hosts");
    assert_eq!(hosts.as_array().unwrap().len(), 1, "{hosts}");

    // Retired: the credential is refused at once.
    api.expect(204, "DELETE", "/v1/hosts/db1", None);
    let (s, _) = h.call("POST", "/v1/agent/heartbeat", Some(json!({})));
    assert_eq!(s, 401);
    let (s, _) = h.call("GET", "/v1/volumes", None);
    assert_eq!(s, 401);
    assert_eq!(host_state(&api, "db1"), "retired");
    assert!(!events_of(&api, "host.retired").is_empty());
    // The name may be enrolled again.
    let h2 = enrol(&a, &api, "db1");
    h2.heartbeat(true, &[], json!([]));
    assert_eq!(host_state(&api, "db1"), "online");
}

#[test]
fn applications_are_discovered_registered_and_take_policies() {
    let (a, api) = start(&[]);
    let h = enrol(&a, &api, "db1");
    let found = json!([{"kind": "postgresql", "name": "16/main", "config": {"host": "/run/postgresql", "port": 5432}, "size_bytes": 1000}]);
    h.heartbeat(true, &[], found);
    let apps = api.get("/v1/applications?host=db1");
    let list = apps.as_array().unwrap();
    assert_eq!(list.len(), 1, "{apps}");
    let d = &list[0];
    assert_eq!(d["volume"], "db1-postgresql-16_main");
    assert_eq!(d["discovered"], true);
    assert_eq!(d["rpo"]["state"], "unprotected");
    // Discovered again with a new size: updated, not added.
    h.heartbeat(false, &[], json!([{"kind": "postgresql", "name": "16/main", "config": {"host": "/run/postgresql", "port": 5432}, "size_bytes": 2000}]));
    let apps = api.get("/v1/applications");
    assert_eq!(apps.as_array().unwrap().len(), 1, "{apps}");
    assert_eq!(apps[0]["size_bytes"], 2000);
    // Gone from discovery: kept.
    h.heartbeat(false, &[], json!([]));
    assert_eq!(api.get("/v1/applications").as_array().unwrap().len(), 1);
    assert!(api
        .get("/v1/applications?host=other")
        .as_array()
        .unwrap()
        .is_empty());

    // By hand; the same one twice is refused, a taken volume name gets a suffix.
    let id = app(&api, "db1", "16 main");
    let v = api.get(&format!("/v1/applications/{id}"));
    assert_eq!(v["volume"], "db1-postgresql-16_main-2", "{v}");
    assert_eq!(v["discovered"], false);
    api.expect(
        409,
        "POST",
        "/v1/applications",
        Some(json!({"host": "db1", "kind": "postgresql", "name": "16 main"})),
    );
    api.expect(
        404,
        "POST",
        "/v1/applications",
        Some(json!({"host": "nohost", "kind": "postgresql", "name": "x"})),
    );
    api.expect(
        400,
        "POST",
        "/v1/applications",
        Some(json!({"host": "db1", "kind": "oracle", "name": "x"})),
    );
    api.expect(404, "GET", "/v1/applications/999", None);

    // Policies: checked, assigned, changed for all, not deleted while used.
    for bad in [
        json!({"name": "p", "rpo_seconds": 60}),
        json!({"name": "p", "interval_seconds": 3600, "cron": "0 * * * *", "rpo_seconds": 60}),
        json!({"name": "p", "interval_seconds": 10, "rpo_seconds": 60}),
        json!({"name": "p", "cron": "nonsense", "rpo_seconds": 60}),
        json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 60, "windows": [{"start": "25:00", "end": "01:00"}]}),
        json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 60, "bandwidth_windows": ["8-18"]}),
        json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 60, "volume": {"block_size": 1000}}),
    ] {
        api.expect(400, "POST", "/v1/protection-policies", Some(bad));
    }
    let p = json!({"name": "hourly", "interval_seconds": 3600, "keep_last": 3, "rpo_seconds": 7200,
                   "bandwidth_mibps": 50, "volume": {"dedup": true, "compression": 3},
                   "replication": {"target": "later"}, "drill_interval_seconds": 86400});
    policy(&api, p.clone());
    api.expect(409, "POST", "/v1/protection-policies", Some(p));
    let got = api.get("/v1/protection-policies/hourly");
    assert_eq!(got["retries"], 2, "{got}");
    assert_eq!(got["replication"]["target"], "later");
    api.expect(
        404,
        "PUT",
        &format!("/v1/applications/{id}/policy"),
        Some(json!({"policy": "none"})),
    );
    let v = assign(&api, id, Some("hourly"));
    assert_eq!(v["policy"], "hourly");
    assert_eq!(v["rpo"]["state"], "ok", "{v}");
    assert_eq!(v["rpo"]["rpo_seconds"], 7200);
    api.expect(
        200,
        "PUT",
        "/v1/protection-policies/hourly",
        Some(json!({"name": "hourly", "interval_seconds": 3600, "rpo_seconds": 600})),
    );
    assert_eq!(
        api.get(&format!("/v1/applications/{id}"))["rpo"]["rpo_seconds"],
        600
    );
    api.expect(409, "DELETE", "/v1/protection-policies/hourly", None);
    assign(&api, id, None);
    api.expect(204, "DELETE", "/v1/protection-policies/hourly", None);
    // Deleting an application keeps nothing else from working.
    api.expect(204, "DELETE", &format!("/v1/applications/{id}"), None);
    api.expect(404, "GET", &format!("/v1/applications/{id}"), None);
}

#[test]
fn scheduled_backups_go_to_the_right_host_inside_the_windows() {
    let (a, api) = start(&[]);
    let h1 = enrol(&a, &api, "h1");
    let h2 = enrol(&a, &api, "h2");
    let now = api.get("/v1/clock")["now_unix"].as_u64().unwrap();
    // A window from two to three hours from now (UTC time of day).
    let hhmm = |t: u64| format!("{:02}:{:02}", t % 86400 / 3600, t % 3600 / 60);
    let (from, to) = (now + 2 * 3600, now + 3 * 3600);
    policy(
        &api,
        json!({"name": "night", "interval_seconds": 3600, "rpo_seconds": 2 * 86400,
                        "windows": [{"start": hhmm(from), "end": hhmm(to)}],
                        "volume": {"block_size": 65536, "dedup": true}, "bandwidth_mibps": 20}),
    );
    policy(
        &api,
        json!({"name": "any", "interval_seconds": 3600, "rpo_seconds": 7200}),
    );
    let late = app(&api, "h2", "windowed");
    let free = app(&api, "h1", "free");
    assign(&api, late, Some("night"));
    assign(&api, free, Some("any"));
    // Nothing is due before an interval passed.
    assert!(jobs(&api, "kind=backup").is_empty());
    advance(&api, 3600 + 60);
    h1.heartbeat(false, &[], json!([]));
    // The free one is queued for its host; in the same pass the windowed
    // one was due too, but outside its window.
    let j = wait_for(60, "the first scheduled backup", || {
        jobs(&api, &format!("application={free}")).first().cloned()
    });
    assert_eq!(
        (j["state"].as_str(), j["host"].as_str()),
        (Some("queued"), Some("h1")),
        "{j}"
    );
    assert_eq!(j["kind"], "backup");
    assert_eq!(j["attempt"], 1);
    assert!(jobs(&api, &format!("application={late}")).is_empty());
    assert!(h2.pull().is_empty(), "a job of h1 went to h2");
    let got = h1.pull();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["application"]["id"], free);
    assert_eq!(got[0]["params"]["metadata"]["policy"], "any");
    assert_eq!(got[0]["params"]["metadata"]["job"], j["id"]);

    // Into the window: the windowed one is queued, for h2, with its policy's settings.
    advance(&api, 3600);
    let j = wait_for(60, "the windowed backup", || {
        jobs(&api, &format!("application={late}")).first().cloned()
    });
    assert_eq!(j["host"], "h2", "{j}");
    h2.heartbeat(false, &[], json!([]));
    let got = h2.pull();
    assert_eq!(got.len(), 1, "{got:?}");
    let g = &got[0];
    assert_eq!(
        g["volume_settings"],
        json!({"block_size": 65536, "dedup": true})
    );
    assert_eq!(g["bandwidth_mibps"], 20);
    assert_eq!(g["application"]["volume"], "h2-postgresql-windowed");
    assert_eq!(g["params"]["metadata"]["application"], late);
    assert!(g["params"]["label"]
        .as_str()
        .unwrap()
        .starts_with("backup-"));
    assert_eq!(job(&api, j["id"].as_u64().unwrap())["state"], "running");
}

#[test]
fn one_backup_per_application_under_racing_requests() {
    let (a, api) = start(&[]);
    let h = enrol(&a, &api, "db1");
    h.heartbeat(true, &[], json!([]));
    let id = app(&api, "db1", "main");
    let base = a.url();
    let tok = a.admin_token();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (b, t) = (base.clone(), tok.clone());
            std::thread::spawn(move || {
                http(
                    &b,
                    "POST",
                    &format!("/v1/applications/{id}/backups"),
                    Some(&t),
                    None,
                )
            })
        })
        .collect();
    let answers: Vec<(u16, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok: Vec<_> = answers.iter().filter(|(s, _)| *s == 202).collect();
    assert_eq!(ok.len(), 1, "{answers:?}");
    for (s, v) in answers.iter().filter(|(s, _)| *s != 202) {
        assert_eq!(
            (*s, v["error"]["code"].as_str()),
            (409, Some("busy")),
            "{v}"
        );
    }
    // A policy on it queues no second one while it is queued or running.
    policy(
        &api,
        json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 7200}),
    );
    assign(&api, id, Some("p"));
    let other = app(&api, "db1", "other");
    assign(&api, other, Some("p"));
    advance(&api, 3600);
    wait_for(60, "the other application's scheduled backup", || {
        jobs(&api, &format!("application={other}")).first().cloned()
    });
    assert_eq!(jobs(&api, &format!("application={id}")).len(), 1);
    let got = h.pull();
    assert_eq!(got.len(), 2, "{got:?}");
    let j = ok[0].1["id"].as_u64().unwrap();
    assert_eq!(got[0]["id"], j, "oldest first");
    api.expect(409, "POST", &format!("/v1/applications/{id}/backups"), None);
    let (s, v) = h.finish(j, json!({"state": "succeeded", "result": {"snapshot": 1}}));
    assert_eq!(s, 200, "{v}");
    api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None);
}

#[test]
fn limits_per_host_and_per_appliance_hand_out_oldest_first() {
    let (a, api) = start(&["--max-jobs", "2", "--max-jobs-per-host", "1"]);
    let hs: Vec<Agent> = ["h1", "h2", "h3"]
        .iter()
        .map(|n| enrol(&a, &api, n))
        .collect();
    let mut ids = Vec::new();
    for i in 0..3 {
        let app = app(&api, "h1", &format!("a{i}"));
        let j = api.expect(
            202,
            "POST",
            &format!("/v1/applications/{app}/backups"),
            None,
        );
        ids.push(j["id"].as_u64().unwrap());
    }
    let a2 = app(&api, "h2", "b");
    api.expect(202, "POST", &format!("/v1/applications/{a2}/backups"), None);
    let a3 = app(&api, "h3", "c");
    api.expect(202, "POST", &format!("/v1/applications/{a3}/backups"), None);
    let got = hs[0].pull();
    assert_eq!(got.len(), 1, "per-host limit: {got:?}");
    assert_eq!(got[0]["id"], ids[0], "oldest first");
    assert!(hs[0].pull().is_empty(), "per-host limit");
    assert_eq!(hs[1].pull().len(), 1);
    assert!(hs[2].pull().is_empty(), "appliance limit");
    assert_eq!(jobs(&api, "state=queued").len(), 3);
    let (s, _) = hs[0].finish(ids[0], json!({"state": "failed", "error": "boom"}));
    assert_eq!(s, 200);
    // The slot freed goes to whoever asks first: h3 now, then h1's next.
    assert_eq!(hs[2].pull().len(), 1);
    assert!(hs[0].pull().is_empty(), "appliance limit");
    let metrics = api_text(&a, "/metrics");
    assert!(metrics.contains("cdm_jobs_queued 2"), "{metrics}");
}

#[test]
fn progress_logs_finish_cancel_and_restores() {
    let (a, api) = start(&[]);
    let h1 = enrol(&a, &api, "h1");
    let h2 = enrol(&a, &api, "h2");
    let id = app(&api, "h1", "main");
    let vol = api.get(&format!("/v1/applications/{id}"))["volume"]
        .as_str()
        .unwrap()
        .to_string();
    let j = api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None)["id"]
        .as_u64()
        .unwrap();
    // Not handed out yet: no progress, no finish.
    assert_eq!(h1.progress(j, &[]).0, 409);
    assert_eq!(h1.pull().len(), 1);
    let (s, v) = h1.progress(j, &["pg_backup_start", "copying"]);
    assert_eq!((s, v["cancel"].as_bool()), (200, Some(false)), "{v}");
    assert_eq!(job(&api, j)["progress"], 0.25);
    assert_eq!(h2.progress(j, &[]).0, 404, "another host's job");
    // What the agent does: the volume, then the point after the backup.
    h1.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": vol, "size": 1 << 20})),
    );
    h1.expect(201, "POST", &format!("/v1/volumes/{vol}/snapshots"),
        Some(json!({"label": "backup", "metadata": {"application": id, "job": j, "lsn": "0/3000028"}})));
    let (s, v) = h1.finish(
        j,
        json!({"state": "succeeded", "result": {"snapshot": 1}, "log": ["pg_backup_stop"]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "succeeded");
    // Idempotent for the same outcome, refused for another.
    assert_eq!(h1.finish(j, json!({"state": "succeeded"})).0, 200);
    assert_eq!(
        h1.finish(j, json!({"state": "failed", "error": "x"})).0,
        409
    );
    assert_eq!(h1.progress(j, &["late"]).0, 409);
    let log = api.get(&format!("/v1/jobs/{j}/log"));
    let lines: Vec<&str> = log["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    // The refused other outcome's error is kept in the log all the same.
    assert_eq!(
        lines,
        ["pg_backup_start", "copying", "pg_backup_stop", "agent: x"]
    );
    let pts = api.get(&format!("/v1/applications/{id}/points"));
    assert_eq!(pts.as_array().unwrap().len(), 1, "{pts}");
    assert_eq!(pts[0]["metadata"]["lsn"], "0/3000028");
    assert!(pts[0]["created"].as_str().unwrap().ends_with('Z'));
    let snap = pts[0]["snapshot"].as_u64().unwrap();

    // Cancel: a queued job at once; a running one through its agent.
    let q = api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None)["id"]
        .as_u64()
        .unwrap();
    let c = api.expect(200, "POST", &format!("/v1/jobs/{q}/cancel"), None);
    assert_eq!(c["state"], "cancelled", "{c}");
    api.expect(409, "POST", &format!("/v1/jobs/{q}/cancel"), None);
    assert!(h1.pull().is_empty());
    let r = api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None)["id"]
        .as_u64()
        .unwrap();
    assert_eq!(h1.pull().len(), 1);
    let c = api.expect(200, "POST", &format!("/v1/jobs/{r}/cancel"), None);
    assert_eq!(c["state"], "running");
    let (s, v) = h1.progress(r, &[]);
    assert_eq!((s, v["cancel"].as_bool()), (200, Some(true)));
    assert_eq!(h1.finish(r, json!({"state": "cancelled"})).0, 200);
    assert_eq!(job(&api, r)["state"], "cancelled");
    // A local job cannot be cancelled; a finished one neither.
    let s = api.expect(202, "POST", "/v1/jobs", Some(json!({"kind": "scrub"})))["id"]
        .as_u64()
        .unwrap();
    wait_for(60, "the scrub", || {
        (job(&api, s)["state"] != "running").then_some(())
    });
    api.expect(409, "POST", &format!("/v1/jobs/{s}/cancel"), None);
    // Filters.
    assert_eq!(
        jobs(&api, &format!("application={id}&state=cancelled")).len(),
        2
    );
    assert_eq!(jobs(&api, "kind=scrub").len(), 1);
    assert_eq!(jobs(&api, "host=h1").len(), 3);
    assert!(jobs(&api, "host=h2").is_empty());

    // A restore of h1's point on h2.
    api.expect(
        400,
        "POST",
        &format!("/v1/applications/{id}/restores"),
        Some(json!({"kind": "teleport"})),
    );
    api.expect(
        400,
        "POST",
        &format!("/v1/applications/{id}/restores"),
        Some(json!({"kind": "regular"})),
    );
    api.expect(
        400,
        "POST",
        &format!("/v1/applications/{id}/restores"),
        Some(json!({"kind": "clone", "name": "../x"})),
    );
    api.expect(
        404,
        "POST",
        &format!("/v1/applications/{id}/restores"),
        Some(json!({"kind": "clone", "host": "h9"})),
    );
    let rj = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{id}/restores"),
        Some(json!({"kind": "clone", "host": "h2", "name": "copy", "port": 5499})),
    );
    assert_eq!(
        (rj["kind"].as_str(), rj["host"].as_str()),
        (Some("restore"), Some("h2")),
        "{rj}"
    );
    assert!(h1.pull().is_empty());
    let got = h2.pull();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0]["params"],
        json!({"kind": "clone", "volume": vol, "snapshot": snap, "name": "copy", "port": 5499, "target": null})
    );
    // The agent's clone: its own to delete, not another host's.
    h2.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots/{snap}/clones"),
        Some(json!({"name": "copy"})),
    );
    assert_eq!(h1.call("DELETE", "/v1/clones/copy", None).0, 403);
    let rid = rj["id"].as_u64().unwrap();
    let (s, _) = h2.finish(rid, json!({"state": "succeeded", "result": {"host": "/tmp/x", "port": 5499, "socket_dir": "/tmp/x", "clone": "copy"}}));
    assert_eq!(s, 200);
    assert_eq!(job(&api, rid)["result"]["port"], 5499);
    h2.expect(204, "DELETE", "/v1/clones/copy", None);
}

#[test]
fn vanished_hosts_restarted_agents_and_retired_hosts_fail_their_jobs() {
    let (a, api) = start(&[]);
    let h1 = enrol(&a, &api, "h1");
    let h2 = enrol(&a, &api, "h2");
    let h3 = enrol(&a, &api, "h3");
    let backup = |host: &str, name: &str| {
        let id = app(&api, host, name);
        api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None)["id"]
            .as_u64()
            .unwrap()
    };
    // h2's agent restarts: its first heartbeat lists what it still runs.
    let j2a = backup("h2", "a");
    let j2b = backup("h2", "b");
    assert_eq!(h2.pull().len(), 2);
    h2.heartbeat(true, &[j2b], json!([]));
    let v = job(&api, j2a);
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["message"], "the agent on h2 restarted while the job ran");
    assert_eq!(job(&api, j2b)["state"], "running");
    let ev = events_of(&api, "job.failed");
    let e = ev
        .iter()
        .find(|e| e["data"]["id"] == j2a)
        .expect("job.failed event");
    assert_eq!(
        (e["data"]["host"].as_str(), e["data"]["kind"].as_str()),
        (Some("h2"), Some("backup")),
        "{e}"
    );
    assert!(e["data"]["application"].as_u64().is_some(), "{e}");

    // h3 retired: queued jobs cancelled, running ones failed, at once.
    let j3a = backup("h3", "a");
    assert_eq!(h3.pull().len(), 1);
    let j3b = backup("h3", "b");
    api.expect(204, "DELETE", "/v1/hosts/h3", None);
    let (ra, rb) = (job(&api, j3a), job(&api, j3b));
    assert_eq!(
        (ra["state"].as_str(), ra["message"].as_str()),
        (Some("failed"), Some("host retired")),
        "{ra}"
    );
    assert_eq!(
        (rb["state"].as_str(), rb["message"].as_str()),
        (Some("cancelled"), Some("host retired")),
        "{rb}"
    );
    assert_eq!(h3.finish(j3a, json!({"state": "succeeded"})).0, 401);

    // h1 goes silent while running one job with another queued: the running
    // one fails at once, the queued one once h1 is offline longer than an hour.
    let j1a = backup("h1", "a");
    assert_eq!(h1.pull().len(), 1);
    let j1b = backup("h1", "b");
    h2.heartbeat(false, &[j2b], json!([]));
    advance(&api, 40);
    let v = wait_for(60, "the running job of the silent host to fail", || {
        let v = job(&api, j1a);
        (v["state"] == "failed").then_some(v)
    });
    assert_eq!(v["message"], "host h1 went offline");
    assert_eq!(job(&api, j1b)["state"], "queued");
    advance(&api, 3600);
    let v = wait_for(60, "the queued job of the silent host to fail", || {
        let v = job(&api, j1b);
        (v["state"] == "failed").then_some(v)
    });
    assert_eq!(v["message"], "host h1 is offline");
    // The agent that comes back learns its job is over.
    assert_eq!(h1.progress(j1a, &[]).0, 409);
}

#[test]
fn jobs_survive_an_appliance_restart() {
    let (mut a, api) = start(&[]);
    let h = enrol(&a, &api, "db1");
    let id = app(&api, "db1", "a");
    let other = app(&api, "db1", "b");
    let run = api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None)["id"]
        .as_u64()
        .unwrap();
    assert_eq!(h.pull().len(), 1);
    let queued = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{other}/backups"),
        None,
    )["id"]
        .as_u64()
        .unwrap();
    h.progress(run, &["before the restart"]);
    a.stop();
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    let h = Agent { base: a.url(), ..h };
    assert_eq!(job(&api, run)["state"], "running");
    assert_eq!(job(&api, queued)["state"], "queued");
    // The agent kept running its job and reports to the new process.
    h.heartbeat(false, &[run], json!([]));
    let (s, v) = h.progress(run, &["after the restart"]);
    assert_eq!(s, 200, "{v}");
    assert_eq!(h.finish(run, json!({"state": "succeeded"})).0, 200);
    let got = h.pull();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], queued);
    let log = api.get(&format!("/v1/jobs/{run}/log"));
    assert_eq!(log["lines"].as_array().unwrap().len(), 2, "{log}");
    assert_eq!(job(&api, run)["state"], "succeeded");
}

#[test]
fn retries_back_off_and_rpo_states_raise_events_webhooks_and_metrics() {
    let (a, api) = start(&[]);
    let (port, got) = receiver();
    let secret = "s3cret-for-tests";
    api.expect(
        201,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": format!("http://127.0.0.1:{port}/hook"),
        "events": ["application.*", "job.failed"], "secret": secret})),
    );
    let h = enrol(&a, &api, "db1");
    h.heartbeat(true, &[], json!([]));
    policy(
        &api,
        json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 7200, "retries": 1, "keep_last": 2}),
    );
    let id = app(&api, "db1", "main");
    let vol = api.get(&format!("/v1/applications/{id}"))["volume"]
        .as_str()
        .unwrap()
        .to_string();
    assign(&api, id, Some("p"));
    advance(&api, 3600);
    h.heartbeat(false, &[], json!([]));
    let first = wait_for(60, "the scheduled backup", || {
        jobs(&api, &format!("application={id}")).first().cloned()
    });
    let j1 = first["id"].as_u64().unwrap();
    assert_eq!(h.pull().len(), 1);
    let (s, v) = h.finish(j1, json!({"state": "failed", "error": "database stopped"}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["message"], "database stopped");
    // The retry is queued at once, not handed out before its backoff.
    let all = jobs(&api, &format!("application={id}"));
    let retry = all
        .iter()
        .find(|j| j["state"] == "queued")
        .expect("a retry")
        .clone();
    assert_eq!(retry["attempt"], 2);
    let fin = job(&api, j1)["finished_unix"].as_u64().unwrap();
    assert_eq!(retry["not_before_unix"].as_u64(), Some(fin + 60));
    assert_eq!(
        api.get(&format!("/v1/applications/{id}"))["rpo"]["state"],
        "failing"
    );
    let d = delivered(&got, secret, "application.failing");
    assert_eq!(
        (d["data"]["id"].as_u64(), d["data"]["host"].as_str()),
        (Some(id), Some("db1")),
        "{d}"
    );
    let d = delivered(&got, secret, "job.failed");
    assert_eq!(
        (
            d["data"]["application"].as_u64(),
            d["data"]["host"].as_str()
        ),
        (Some(id), Some("db1")),
        "{d}"
    );
    assert!(h.pull().is_empty(), "handed out before the backoff");
    advance(&api, 61);
    h.heartbeat(false, &[], json!([]));
    let got2 = h.pull();
    assert_eq!(got2.len(), 1);
    let j2 = got2[0]["id"].as_u64().unwrap();
    assert_eq!(got2[0]["attempt"], 2);
    // The last attempt the policy allows: no third.
    assert_eq!(
        h.finish(j2, json!({"state": "failed", "error": "still stopped"}))
            .0,
        200
    );
    assert!(jobs(&api, &format!("application={id}&state=queued")).is_empty());

    // A good backup: recovered.
    let j3 = api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None)["id"]
        .as_u64()
        .unwrap();
    assert_eq!(h.pull().len(), 1);
    h.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": vol, "size": 1 << 20})),
    );
    h.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots"),
        Some(json!({"label": "b"})),
    );
    assert_eq!(h.finish(j3, json!({"state": "succeeded"})).0, 200);
    let app_v = api.get(&format!("/v1/applications/{id}"));
    assert_eq!(app_v["rpo"]["state"], "ok", "{app_v}");
    assert_eq!(app_v["rpo"]["last_job"]["id"], j3);
    let d = delivered(&got, secret, "application.recovered");
    assert_eq!(d["data"]["state"], "ok");

    // Its newest point older than the RPO: late.
    advance(&api, 7201);
    let v = wait_for(60, "the application to turn late", || {
        let v = api.get(&format!("/v1/applications/{id}"));
        (v["rpo"]["state"] == "late").then_some(v)
    });
    assert!(v["rpo"]["age_seconds"].as_u64().unwrap() > 7200, "{v}");
    let d = delivered(&got, secret, "application.late");
    assert_eq!(
        (
            d["data"]["name"].as_str(),
            d["data"]["rpo_seconds"].as_u64()
        ),
        (Some("main"), Some(7200)),
        "{d}"
    );
    assert_eq!(
        events_of(&api, "application.late").len(),
        1,
        "announced once"
    );

    let m = api_text(&a, "/metrics");
    for want in [
        format!("cdm_application_rpo_state{{application=\"{id}\",host=\"db1\",name=\"main\",state=\"late\"}} 1"),
        format!("cdm_application_rpo_state{{application=\"{id}\",host=\"db1\",name=\"main\",state=\"ok\"}} 0"),
        "cdm_jobs{kind=\"backup\",state=\"failed\"} 2".to_string(),
        "cdm_jobs{kind=\"backup\",state=\"succeeded\"} 1".to_string(),
        "cdm_host_online{host=\"db1\"} 0".to_string(),
        "cdm_application_last_point_age_seconds{".to_string(),
        "cdm_jobs_queued ".to_string(),
    ] {
        assert!(m.contains(&want), "{want} missing from:\n{m}");
    }
}

#[test]
fn policy_retention_keeps_the_application_volume_to_keep_last() {
    let (a, api) = start(&[]);
    let h = enrol(&a, &api, "db1");
    policy(
        &api,
        json!({"name": "p", "interval_seconds": 86400, "rpo_seconds": 172800, "keep_last": 2}),
    );
    let id = app(&api, "db1", "main");
    let vol = api.get(&format!("/v1/applications/{id}"))["volume"]
        .as_str()
        .unwrap()
        .to_string();
    h.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": vol, "size": 1 << 20})),
    );
    for i in 0..4 {
        h.expect(
            201,
            "POST",
            &format!("/v1/volumes/{vol}/snapshots"),
            Some(json!({"label": format!("b{i}")})),
        );
    }
    assign(&api, id, Some("p"));
    let pts = wait_for(60, "retention to keep two points", || {
        let p = api.get(&format!("/v1/applications/{id}/points"));
        (p.as_array().unwrap().len() == 2).then_some(p)
    });
    let labels: Vec<&str> = pts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["b3", "b2"], "newest first, the newest kept");
}

fn ctl(a: &Appliance, args: &[&str]) -> String {
    let out = a.cdmctl(args);
    assert!(
        out.status.success(),
        "cdmctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ctl_json(a: &Appliance, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let s = ctl(a, &all);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("cdmctl {args:?}: {e}: {s}"))
}

#[test]
fn cdmctl_drives_hosts_applications_policies_jobs_and_restores() {
    let (a, api) = start(&[]);
    let t = ctl_json(
        &a,
        &["host", "enrol-token", "--name", "db1", "--ttl", "600"],
    );
    let tok = t["token"].as_str().unwrap();
    let (s, v) = enrol_raw(&a, json!({"token": tok, "hostname": "db1.example"}));
    assert_eq!(s, 201, "{v}");
    let h = Agent {
        base: a.url(),
        token: v["credential"].as_str().unwrap().to_string(),
        name: "db1".into(),
    };
    h.heartbeat(
        true,
        &[],
        json!([{"kind": "postgresql", "name": "main", "config": {"port": 5432}}]),
    );
    let hosts = ctl(&a, &["host", "list"]);
    assert!(hosts.contains("db1") && hosts.contains("online"), "{hosts}");
    assert_eq!(
        ctl_json(&a, &["host", "show", "db1"])["hostname"],
        "db1.example"
    );

    ctl(
        &a,
        &[
            "policy",
            "create",
            "hourly",
            "--interval",
            "3600",
            "--rpo",
            "7200",
            "--keep-last",
            "3",
            "--window",
            "00:00-23:59",
            "--dedup",
            "true",
        ],
    );
    let p = ctl_json(&a, &["policy", "show", "hourly"]);
    assert_eq!(
        (p["keep_last"].as_u64(), p["volume"]["dedup"].as_bool()),
        (Some(3), Some(true)),
        "{p}"
    );
    assert!(ctl(&a, &["policy", "list"]).contains("every 3600 s"));
    let added = ctl_json(
        &a,
        &[
            "app",
            "add",
            "--host",
            "db1",
            "--kind",
            "files",
            "--name",
            "etc",
            "--config",
            "{\"path\": \"/etc\"}",
        ],
    );
    let id = added["id"].as_u64().unwrap();
    let apps = ctl(&a, &["app", "list", "--host", "db1"]);
    assert!(
        apps.contains("db1-postgresql-main") && apps.contains("db1-files-etc"),
        "{apps}"
    );
    let v = ctl_json(&a, &["app", "set-policy", &id.to_string(), "hourly"]);
    assert_eq!(v["policy"], "hourly");
    let v = ctl_json(&a, &["app", "set-policy", &id.to_string(), "--none"]);
    assert!(v["policy"].is_null());
    let j = ctl_json(&a, &["app", "backup", &id.to_string()]);
    let jid = j["id"].as_u64().unwrap();
    assert_eq!(j["state"], "queued");
    let listed = ctl_json(
        &a,
        &[
            "job",
            "list",
            "--application",
            &id.to_string(),
            "--state",
            "queued",
        ],
    );
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(h.pull().len(), 1);
    h.progress(jid, &["a line from the agent"]);
    assert!(ctl(&a, &["job", "log", &jid.to_string()]).contains("a line from the agent"));
    let c = ctl_json(&a, &["job", "cancel", &jid.to_string()]);
    assert_eq!(c["cancel_requested"], true);
    assert_eq!(h.finish(jid, json!({"state": "cancelled"})).0, 200);
    // Cancelling again: a conflict, exit 5.
    let out = a.cdmctl(&["job", "cancel", &jid.to_string()]);
    assert_eq!(out.status.code(), Some(5));

    let vol = added["volume"].as_str().unwrap();
    h.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": vol, "size": 1 << 20})),
    );
    h.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots"),
        Some(json!({"label": "b1"})),
    );
    assert!(ctl(&a, &["app", "points", &id.to_string()]).contains("b1"));
    let r = ctl_json(
        &a,
        &[
            "restore",
            "start",
            &id.to_string(),
            "--kind",
            "regular",
            "--target",
            "/srv/etc",
        ],
    );
    assert_eq!(
        (r["kind"].as_str(), r["host"].as_str()),
        (Some("restore"), Some("db1")),
        "{r}"
    );
    assert_eq!(r["params"]["target"], "/srv/etc");
    let rl = ctl_json(&a, &["restore", "list", "--application", &id.to_string()]);
    assert_eq!(rl.as_array().unwrap().len(), 1);
    ctl(&a, &["host", "retire", "db1"]);
    assert_eq!(host_state(&api, "db1"), "retired");
    assert_eq!(job(&api, r["id"].as_u64().unwrap())["state"], "cancelled");

    let doc = api.get("/v1/openapi.json");
    for p in [
        "/v1/hosts/enrolments",
        "/v1/hosts/{name}",
        "/v1/agent/enrol",
        "/v1/agent/jobs",
        "/v1/agent/jobs/{id}/finish",
        "/v1/applications/{id}/restores",
        "/v1/protection-policies/{name}",
        "/v1/jobs/{id}/log",
        "/v1/jobs/{id}/cancel",
        "/v1/volumes",
    ] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    assert!(doc["components"]["schemas"]["ProtectionPolicy"].is_object());
}

//! The control plane's answers to its review (`docs/control-plane.md`,
//! "Limits"): host credentials reach only their own data, long polls hold
//! no thread, handed-out jobs that no agent runs end, oversized logs never
//! cost a job's outcome, retired names stay their owner's, RPO alerts
//! always get their recovery. Against the real snapshotd, speaking the
//! agent protocol over HTTP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cdm_e2e::*;
use serde_json::{json, Value};
use sha2::Digest;

mod control_util;
use control_util::*;

fn backup(api: &Api, app: u64) -> u64 {
    api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app}/backups"),
        None,
    )["id"]
        .as_u64()
        .expect("job id")
}

fn volume_of(api: &Api, app: u64) -> String {
    api.get(&format!("/v1/applications/{app}"))["volume"]
        .as_str()
        .expect("volume")
        .to_string()
}

fn log_lines(api: &Api, job: u64) -> Vec<String> {
    api.get(&format!("/v1/jobs/{job}/log"))["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["line"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The DER bytes of the first certificate of a PEM text.
fn pem_der(pem: &str) -> Vec<u8> {
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in b64.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | val(c) as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn host_credentials_reach_only_their_own_data() {
    let (a, api) = start(&[]);
    // The enrolment answer carries the fingerprint of the CA to pin.
    let t = api.expect(201, "POST", "/v1/hosts/enrolments", Some(json!({})));
    let (s, pem) = http(&a.url(), "GET", "/v1/ca", None, None);
    assert_eq!(s, 200);
    let der = pem_der(pem.as_str().expect("PEM"));
    assert_eq!(
        t["ca_sha256"].as_str(),
        Some(hex::encode(sha2::Sha256::digest(&der)).as_str()),
        "{t}"
    );
    let doc = api.get("/v1/openapi.json");
    assert!(
        doc["paths"]["/v1/ca"]["get"].is_object(),
        "/v1/ca documented"
    );

    let h1 = enrol(&a, &api, "h1");
    let h2 = enrol(&a, &api, "h2");
    let a1 = app(&api, "h1", "one");
    let a2 = app(&api, "h2", "two");
    let (v1, v2) = (volume_of(&api, a1), volume_of(&api, a2));
    let vol = |name: &str| json!({"name": name, "size": 1 << 20});
    // Nobody else's stage volume made in advance, no volume of no application.
    assert_eq!(h1.call("POST", "/v1/volumes", Some(vol(&v2))).0, 403);
    assert_eq!(h1.call("POST", "/v1/volumes", Some(vol("free"))).0, 403);
    h1.expect(201, "POST", "/v1/volumes", Some(vol(&v1)));
    h2.expect(201, "POST", "/v1/volumes", Some(vol(&v2)));
    let s1 = h1.expect(
        201,
        "POST",
        &format!("/v1/volumes/{v1}/snapshots"),
        Some(json!({})),
    )["id"]
        .as_u64()
        .unwrap();
    let s2 = h2.expect(
        201,
        "POST",
        &format!("/v1/volumes/{v2}/snapshots"),
        Some(json!({})),
    )["id"]
        .as_u64()
        .unwrap();
    // h1 neither fakes h2's points, nor reads them, nor clones them.
    for (m, p, b) in [
        (
            "POST",
            format!("/v1/volumes/{v2}/snapshots"),
            Some(json!({})),
        ),
        ("GET", format!("/v1/volumes/{v2}"), None),
        ("GET", format!("/v1/volumes/{v2}/snapshots"), None),
        ("GET", format!("/v1/volumes/{v2}/snapshots/{s2}"), None),
        (
            "GET",
            format!("/v1/volumes/{v2}/snapshots/{s2}/files?path=/"),
            None,
        ),
        (
            "GET",
            format!("/v1/volumes/{v2}/snapshots/{s2}/files/content?path=/etc/passwd"),
            None,
        ),
        (
            "POST",
            format!("/v1/volumes/{v2}/snapshots/{s2}/clones"),
            Some(json!({"name": "stolen"})),
        ),
    ] {
        let (s, v) = h1.call(m, &p, b);
        assert_eq!(s, 403, "{m} {p}: {v}");
    }
    assert_eq!(
        api.get(&format!("/v1/volumes/{v2}/snapshots"))
            .as_array()
            .unwrap()
            .len(),
        1,
        "no snapshot of h2 was made by h1"
    );
    // No clone of its own named like another host's future stage volume.
    let a3 = app(&api, "h2", "later");
    let v3 = volume_of(&api, a3);
    let (s, v) = h1.call(
        "POST",
        &format!("/v1/volumes/{v1}/snapshots/{s1}/clones"),
        Some(json!({"name": v3})),
    );
    assert_eq!(s, 409, "{v}");
    // A stage volume's name skips the pool's volumes, whoever made them.
    api.expect(201, "POST", "/v1/volumes", Some(vol("h1-postgresql-pre")));
    let a4 = app(&api, "h1", "pre");
    assert_eq!(volume_of(&api, a4), "h1-postgresql-pre-2");

    // A restore of h2's point on h1: exactly that point, while it runs.
    let rj = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{a2}/restores"),
        Some(json!({"kind": "clone", "host": "h1", "name": "copy", "snapshot": s2})),
    )["id"]
        .as_u64()
        .unwrap();
    let clone = |name: &str| {
        h1.call(
            "POST",
            &format!("/v1/volumes/{v2}/snapshots/{s2}/clones"),
            Some(json!({"name": name})),
        )
    };
    assert_eq!(clone("copy").0, 403, "not before the job runs");
    assert_eq!(h1.pull().len(), 1);
    h1.expect(
        200,
        "GET",
        &format!("/v1/volumes/{v2}/snapshots/{s2}"),
        None,
    );
    assert_eq!(clone("other").0, 403, "only the clone the job names");
    assert_eq!(
        h1.call("GET", &format!("/v1/volumes/{v2}/snapshots"), None)
            .0,
        403
    );
    assert_eq!(
        h1.call(
            "POST",
            &format!("/v1/volumes/{v2}/snapshots"),
            Some(json!({}))
        )
        .0,
        403
    );
    assert_eq!(clone("copy").0, 201);
    assert_eq!(h1.finish(rj, json!({"state": "succeeded"})).0, 200);
    let (s, _) = h1.call("GET", &format!("/v1/volumes/{v2}/snapshots/{s2}"), None);
    assert_eq!(s, 403, "the grant ends with the job");
    // Its clone stays its own.
    h1.expect(200, "GET", "/v1/volumes/copy", None);
    h1.expect(204, "DELETE", "/v1/clones/copy", None);
}

#[test]
fn parked_polls_of_a_hundred_hosts_leave_the_api_answering() {
    let (a, api) = start(&[]);
    let hosts: Vec<Agent> = (0..100)
        .map(|i| enrol(&a, &api, &format!("p{i}")))
        .collect();
    // Each credential verified once before (Argon2 is not what is measured).
    for h in &hosts {
        assert!(h.pull().is_empty());
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let polls: Vec<_> = hosts
        .iter()
        .map(|h| {
            let (base, token, n) = (h.base.clone(), h.token.clone(), answered.clone());
            std::thread::spawn(move || {
                let r = http(&base, "GET", "/v1/agent/jobs?wait=30", Some(&token), None);
                n.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    wait_for(120, "100 parked polls", || {
        let m = api_text(&a, "/metrics");
        m.contains("cdm_agent_polls_waiting 100\n").then_some(())
    });
    // 50 ordinary calls, each authenticated, all answered while they wait.
    for i in 0..50 {
        match i % 3 {
            0 => {
                api.get("/v1/hosts");
            }
            1 => {
                api.get("/v1/applications");
            }
            _ => {
                api.expect(201, "POST", "/v1/hosts/enrolments", Some(json!({})));
            }
        }
    }
    assert_eq!(
        answered.load(Ordering::SeqCst),
        0,
        "the calls were answered before any parked poll"
    );
    // A job for one host ends that host's poll at once with it, the others
    // keep waiting; a new poll of a host ends its old one with nothing.
    let id = app(&api, "p7", "db");
    let j = backup(&api, id);
    let (s, got) = polls.into_iter().nth(7).unwrap().join().unwrap();
    assert_eq!(s, 200);
    assert_eq!(got[0]["id"], j, "{got}");
    assert_eq!(answered.load(Ordering::SeqCst), 1);
    let (base, token) = (hosts[3].base.clone(), hosts[3].token.clone());
    let again = std::thread::spawn(move || {
        http(&base, "GET", "/v1/agent/jobs?wait=30", Some(&token), None)
    });
    wait_for(60, "the old poll of p3 to end", || {
        (answered.load(Ordering::SeqCst) == 2).then_some(())
    });
    let id = app(&api, "p3", "db");
    let j = backup(&api, id);
    let (s, got) = again.join().unwrap();
    assert_eq!((s, got[0]["id"].as_u64()), (200, Some(j)), "{got}");
}

#[test]
fn a_pull_hands_out_at_most_the_agents_free_slots() {
    let (a, api) = start(&["--max-jobs-per-host", "4"]);
    let h = enrol(&a, &api, "h");
    let ids: Vec<u64> = (0..3)
        .map(|i| backup(&api, app(&api, "h", &format!("a{i}"))))
        .collect();
    assert!(h
        .expect(200, "GET", "/v1/agent/jobs?slots=0", None)
        .as_array()
        .unwrap()
        .is_empty());
    let got = h.expect(200, "GET", "/v1/agent/jobs?slots=1", None);
    assert_eq!(got.as_array().unwrap().len(), 1, "{got}");
    assert_eq!(got[0]["id"], ids[0]);
    // Without slots: as many as the appliance's limits allow.
    assert_eq!(h.pull().len(), 2);
}

#[test]
fn jobs_no_agent_runs_end_and_retry() {
    let (a, api) = start(&[]);
    let h = enrol(&a, &api, "h");
    policy(
        &api,
        json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 7200, "retries": 2}),
    );
    let id = app(&api, "h", "db");
    assign(&api, id, Some("p"));
    advance(&api, 3600);
    let j = wait_for(60, "the policy backup", || {
        jobs(&api, "state=queued")
            .first()
            .map(|j| j["id"].as_u64().unwrap())
    });
    // Handed out, but the answer never reached the agent.
    assert_eq!(h.pull().len(), 1);
    h.heartbeat(false, &[], json!([]));
    assert_eq!(job(&api, j)["state"], "running", "just handed out");
    // Past the grace (two heartbeats, at least 30 s).
    advance(&api, 31);
    h.heartbeat(false, &[], json!([]));
    let v = job(&api, j);
    assert_eq!(v["state"], "failed", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("does not run the job"),
        "{v}"
    );
    // Retried like any failure, after the backoff.
    let retry = jobs(&api, "state=queued");
    assert_eq!(retry.len(), 1, "{retry:?}");
    assert_eq!(retry[0]["attempt"], 2);
    // The agent's own finish, late: the same outcome (no error), and its
    // log and real error are kept.
    let (s, _) = h.finish(
        j,
        json!({"state": "failed", "error": "pg down", "log": ["tried"]}),
    );
    assert_eq!(s, 200);
    assert_eq!(log_lines(&api, j), ["tried", "agent: pg down"]);
}

#[test]
fn silent_jobs_fail_and_unstopped_cancels_end() {
    let (a, api) = start(&["--job-stall-seconds", "3", "--cancel-grace-seconds", "1"]);
    let h = enrol(&a, &api, "h");
    let j1 = backup(&api, app(&api, "h", "a"));
    assert_eq!(h.pull().len(), 1);
    assert_eq!(h.progress(j1, &["started"]).0, 200);
    let v = wait_for(120, "the silent job to fail", || {
        let v = job(&api, j1);
        (v["state"] != "running").then_some(v)
    });
    assert_eq!(
        (v["state"].as_str(), v["message"].as_str()),
        (
            Some("failed"),
            Some("no progress from the agent on h for 3 s")
        ),
        "{v}"
    );
    // A cancel the agent never hears of (it does not report) still ends.
    let j2 = backup(&api, app(&api, "h", "b"));
    assert_eq!(h.pull().len(), 1);
    api.expect(200, "POST", &format!("/v1/jobs/{j2}/cancel"), None);
    let v = wait_for(120, "the cancel to end the job", || {
        let v = job(&api, j2);
        (v["state"] != "running").then_some(v)
    });
    assert_eq!(v["state"], "cancelled", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("the agent did not stop it within 1 s"),
        "{v}"
    );
}

#[test]
fn oversized_logs_keep_head_and_tail_and_never_cost_the_outcome() {
    let (a, api) = start(&[]);
    let h = enrol(&a, &api, "h");
    let j = backup(&api, app(&api, "h", "a"));
    assert_eq!(h.pull().len(), 1);
    let line = |i: usize| format!("{i:05} {}", "x".repeat(1000));
    // A 2 MiB progress batch, then a 3 MiB log with the outcome.
    let batch: Vec<String> = (0..2000).map(line).collect();
    let (s, v) = h.call(
        "POST",
        &format!("/v1/agent/jobs/{j}/progress"),
        Some(json!({"done": 1, "total": 2, "log": batch})),
    );
    assert_eq!(s, 200, "{v}");
    let last: Vec<String> = (2000..5000).map(line).collect();
    let (s, v) = h.finish(j, json!({"state": "succeeded", "log": last}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(job(&api, j)["state"], "succeeded");
    let lines = log_lines(&api, j);
    assert_eq!(lines.len(), 2001, "head, the note, tail");
    assert_eq!(lines[0], line(0));
    assert_eq!(lines[999], line(999));
    assert!(
        lines[1000].starts_with("[3000 lines dropped"),
        "{}",
        lines[1000]
    );
    assert_eq!(lines[1001], line(4000));
    assert_eq!(lines[2000], line(4999));
    // Other requests keep their limit: refused from the declared length,
    // before the body (a client still sending would get a broken pipe).
    let head = format!(
        "POST /v1/protection-policies HTTP/1.1\r\nHost: cdm\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        a.admin_token(),
        2 << 20
    );
    let (s, v) = http_head_only(&a.url(), &head);
    assert_eq!(s, 413, "{v}");
}

#[test]
fn policies_are_bounded_and_retired_names_stay_their_owners() {
    let (a, api) = start(&[]);
    for body in [
        json!({"name": "p", "interval_seconds": u64::MAX, "rpo_seconds": 3600}),
        json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": u64::MAX}),
    ] {
        api.expect(400, "POST", "/v1/protection-policies", Some(body));
    }
    enrol(&a, &api, "h1");
    api.expect(204, "DELETE", "/v1/hosts/h1", None);
    // A token that names no host may not take over the retired name (its
    // applications and volumes would follow).
    let t = api.expect(201, "POST", "/v1/hosts/enrolments", Some(json!({})))["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = http(
        &a.url(),
        "POST",
        "/v1/agent/enrol",
        None,
        Some(
            &json!({"token": t, "hostname": "h1", "name": "h1", "version": "0", "os": "linux"})
                .to_string(),
        ),
    );
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--name h1"),
        "{v}"
    );
    // A token made for that name may.
    enrol(&a, &api, "h1");
}

#[test]
fn an_alert_gets_its_recovery_even_through_unprotected() {
    let (a, api) = start(&[]);
    enrol(&a, &api, "h");
    policy(
        &api,
        json!({"name": "p", "interval_seconds": 3600, "rpo_seconds": 600}),
    );
    let id = app(&api, "h", "db");
    assign(&api, id, Some("p"));
    advance(&api, 601);
    wait_for(60, "application.late", || {
        (!events_of(&api, "application.late").is_empty()).then_some(())
    });
    assign(&api, id, None);
    // A point made while unprotected, then the policy again: ok.
    let vol = volume_of(&api, id);
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": vol, "size": 1 << 20})),
    );
    api.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots"),
        Some(json!({})),
    );
    assign(&api, id, Some("p"));
    let e: Value = wait_for(60, "application.recovered", || {
        events_of(&api, "application.recovered").first().cloned()
    });
    assert_eq!(e["data"]["id"], id, "{e}");
}

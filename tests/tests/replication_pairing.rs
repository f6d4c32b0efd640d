//! Replication's control side end to end with the real binaries: two (or
//! three) snapshotd with `--name` and a replication listener pair with a
//! one-use token (both ways: each then trusts the other's client
//! certificate); used, expired and wrong-CA tokens are refused; the
//! replication listener refuses a client without a certificate, with one of
//! an unpaired CA, or with an unpinned one of a paired CA, and stops
//! trusting a peer the moment it is unpaired; links are created, listed,
//! paused, resumed and deleted through cdmctl.

use std::path::Path;
use std::process::Command;

use cdm_e2e::*;
use serde_json::{json, Value};

fn start(name: &str) -> Appliance {
    Appliance::start_with(
        Some(FAST_CONFIG),
        None,
        &[
            "--pool-size",
            "1G",
            "--pool-sparse",
            "--name",
            name,
            "--replication",
            "127.0.0.1:0",
        ],
    )
}

fn api(a: &Appliance, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let b = body.map(|b| b.to_string());
    http(&a.url(), method, path, Some(&a.admin_token()), b.as_deref())
}

fn pair_token(a: &Appliance, ttl: Option<u64>) -> String {
    let (s, v) = api(
        a,
        "POST",
        "/v1/replication/pairings",
        Some(json!({"ttl_seconds": ttl})),
    );
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().expect("token").to_string()
}

fn pair(a: &Appliance, name: &str, url: &str, token: &str) -> (u16, Value) {
    api(
        a,
        "POST",
        "/v1/replication/peers",
        Some(json!({"name": name, "url": url, "token": token})),
    )
}

/// `GET /repl/whoami` on `to`'s replication listener with curl, showing
/// the client certificate `cert`/`key` if given: `(curl's exit code, the
/// HTTP status or 0, the body)`.
fn whoami(to: &Appliance, cert: Option<(&Path, &Path)>) -> (i32, u16, String) {
    let addr = to.replication.as_ref().expect("replication listener");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "30",
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(to.ca_file());
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    cmd.arg(format!("https://{addr}/repl/whoami"));
    let out = output(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        body.to_string(),
    )
}

fn client_cert(a: &Appliance) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = a.data.join("tls");
    (d.join("client.crt"), d.join("client.key"))
}

fn peers(a: &Appliance) -> Vec<Value> {
    let (s, v) = api(a, "GET", "/v1/replication/peers", None);
    assert_eq!(s, 200, "{v}");
    v.as_array().expect("peers").clone()
}

#[test]
fn pairing_trust_and_links() {
    let _g = shared();
    require("curl");
    let a = start("site-a");
    let mut b = start("site-b");
    let c = start("site-c");
    let (ac, ak) = client_cert(&a);
    let (cc, ck) = client_cert(&c);

    // Nobody is paired: every client certificate is refused by B.
    let (code, status, _) = whoami(&b, Some((&ac, &ak)));
    assert!(code != 0 || status != 200, "unpaired A reached B: {status}");

    // Pairing: a token made on B, used from A against B's HTTPS API.
    let token = pair_token(&b, None);
    assert!(token.starts_with("cdmpair1."), "{token}");
    let (s, v) = pair(&a, "b", &b.https_url(), &token);
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["name"], "b");
    let b_repl = b.replication.clone().expect("B's replication listener");
    assert_eq!(v["replication_endpoint"], json!(b_repl));

    // Both sides know each other: B knows A by A's own name, with A's
    // replication endpoint (its address as B saw it).
    let on_b = peers(&b);
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    assert_eq!(on_b[0]["name"], "site-a");
    assert_eq!(
        on_b[0]["replication_endpoint"],
        json!(a.replication.clone().expect("A's listener"))
    );
    let on_a = peers(&a);
    assert_ne!(on_a[0]["identity"], on_b[0]["identity"]);

    // mTLS both ways: B knows A's certificate, A knows B's.
    let (code, status, body) = whoami(&b, Some((&ac, &ak)));
    assert_eq!((code, status), (0, 200), "{body}");
    let who: Value = serde_json::from_str(&body).expect("whoami JSON");
    assert_eq!(who["peer"], "site-a");
    assert_eq!(who["name"], "site-b");
    assert_eq!(who["identity"], on_a[0]["identity"]);
    assert_eq!(who["peer_identity"], on_b[0]["identity"]);
    let (bc, bk) = client_cert(&b);
    let (code, status, body) = whoami(&a, Some((&bc, &bk)));
    assert_eq!((code, status), (0, 200), "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["peer"], "b");

    // Refused: no certificate; the certificate of an unpaired appliance.
    let (code, status, _) = whoami(&b, None);
    assert!(code != 0 && status != 200, "no certificate got {status}");
    let (code, status, _) = whoami(&b, Some((&cc, &ck)));
    assert!(code != 0 && status != 200, "C's certificate got {status}");

    // A certificate of A's CA that is not the one pinned: 403 unpaired.
    if which("openssl") {
        let (cert, key) = forge_client(&a);
        let (code, status, body) = whoami(&b, Some((&cert, &key)));
        assert_eq!((code, status), (0, 403), "{body}");
        assert!(body.contains("unpaired"), "{body}");
    }

    // A used token is refused, and so is an expired one.
    let (s, v) = pair(&c, "b", &b.https_url(), &token);
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_token", "{v}");
    let short = pair_token(&b, Some(5));
    let (s, _) = api(&b, "POST", "/v1/clock", Some(json!({"advance_secs": 10})));
    assert_eq!(s, 200);
    let (s, v) = pair(&c, "b", &b.https_url(), &short);
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );
    // A token of B used against C: C's CA is not the one it names.
    let for_b = pair_token(&b, None);
    let (s, v) = pair(&a, "c", &c.https_url(), &for_b);
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["code"], "ca_mismatch", "{v}");
    assert_eq!(peers(&c).len(), 0);
    // ... and that token is still good for B (nothing was sent to C).
    let (s, v) = pair(&c, "b", &b.https_url(), &for_b);
    assert_eq!(s, 201, "{v}");
    assert_eq!(peers(&b).len(), 2);

    // Trust survives a restart of B.
    b.stop();
    b.restart();
    let (code, status, body) = whoami(&b, Some((&ac, &ak)));
    assert_eq!((code, status), (0, 200), "after restart: {body}");

    // Links through cdmctl, on A towards B.
    let (s, v) = api(
        &a,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "db", "size": 16 << 20})),
    );
    assert_eq!(s, 201, "{v}");
    let l = cdmctl_json(
        &a,
        &[
            "replication",
            "link",
            "create",
            "b",
            "--volume",
            "db",
            "--interval",
            "600",
            "--keep-last",
            "3",
            "--window",
            "08:00-18:00=10",
            "--bandwidth",
            "40",
            // Created paused: an interval link's first run starts at once,
            // and this test checks the records, not a run.
            "--paused",
        ],
    );
    let id = l["id"].as_u64().expect("link id");
    assert_eq!(l["schedule"], json!({"interval_seconds": 600}));
    assert_eq!(l["rpo_seconds"], 1200);
    assert_eq!(l["state"], "paused");
    assert_eq!(l["lag_seconds"], Value::Null);
    let list = cdmctl_json(&a, &["replication", "link", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let ids = id.to_string();
    let p = cdmctl_json(&a, &["replication", "link", "pause", &ids]);
    assert_eq!(
        (p["enabled"].clone(), p["state"].clone()),
        (json!(false), json!("paused"))
    );
    let r = cdmctl_json(&a, &["replication", "link", "resume", &ids]);
    // Resumed, the due first run may already have started.
    assert!(
        r["state"] == "idle" || r["state"] == "running",
        "resumed link: {r}"
    );
    assert_eq!(r["enabled"], json!(true), "{r}");
    let t = cdmctl_json(&a, &["replication", "link", "transfers", &ids]);
    assert!(t.is_array(), "{t}");
    // Bad links are refused: an unknown peer, a bad window.
    let (s, _) = api(
        &a,
        "POST",
        "/v1/replication/links",
        Some(json!({"volume": "db", "peer": "nobody"})),
    );
    assert_eq!(s, 404);
    let (s, _) = api(
        &a,
        "POST",
        "/v1/replication/links",
        Some(json!({"volume": "db", "peer": "b", "bandwidth_windows": ["8-18"]})),
    );
    assert_eq!(s, 400);
    // A peer with links cannot be unpaired.
    let out = a.cdmctl(&["replication", "unpair", "b"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = a.cdmctl(&["replication", "link", "delete", &ids]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cdmctl_json(&a, &["replication", "link", "list"]), json!([]));

    // Unpairing drops trust at once.
    let out = b.cdmctl(&["replication", "unpair", "site-a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, status, _) = whoami(&b, Some((&ac, &ak)));
    assert!(
        code != 0 || status == 403,
        "unpaired A still reached B: {status}"
    );
    assert_ne!(status, 200);
    // C, still paired, still reaches B.
    let (code, status, body) = whoami(&b, Some((&cc, &ck)));
    assert_eq!((code, status), (0, 200), "{body}");
}

fn cdmctl_json(a: &Appliance, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = a.cdmctl(&all);
    assert!(
        out.status.success(),
        "cdmctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cdmctl JSON")
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A client certificate signed by `a`'s CA but never pinned by anyone.
fn forge_client(a: &Appliance) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = a.dir.path();
    let (key, csr, crt, ext) = (
        dir.join("forged.key"),
        dir.join("forged.csr"),
        dir.join("forged.crt"),
        dir.join("forged.ext"),
    );
    write_file(&ext, b"extendedKeyUsage=clientAuth\n");
    let tls = a.data.join("tls");
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args(["-subj", "/CN=site-a"]));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(tls.join("ca.crt"))
        .arg("-CAkey")
        .arg(tls.join("ca.key"))
        .args(["-CAcreateserial"])
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&crt));
    (crt, key)
}

/// A volume demoted to a replica of a peer is read-only through the API and
/// NBD (its points stay readable and clonable); promoted, it is writable
/// again.
#[test]
fn replica_volumes_are_read_only_until_promoted() {
    let _g = shared();
    let a = start("site-a");
    let b = start("site-b");
    let token = pair_token(&b, None);
    let (s, v) = pair(&a, "b", &b.https_url(), &token);
    assert_eq!(s, 201, "{v}");

    let (s, v) = api(
        &b,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "db", "size": 4 << 20})),
    );
    assert_eq!(s, 201, "{v}");
    let data = random_bytes(65536, 7);
    {
        let mut n = b.nbd("db");
        n.write(0, &data, true).expect("write before demote");
    }
    let (s, v) = api(
        &b,
        "POST",
        "/v1/volumes/db/snapshots",
        Some(json!({"label": "p1"})),
    );
    assert_eq!(s, 201, "{v}");
    let snap = v["id"].as_u64().expect("snapshot id");

    // Demoted: a replica of A (B knows A as site-a).
    let (s, v) = api(
        &b,
        "POST",
        "/v1/volumes/db/demote",
        Some(json!({"peer": "nobody"})),
    );
    assert_eq!(s, 404, "{v}");
    let out = b.cdmctl(&["--json", "volume", "demote", "db", "--peer", "site-a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("volume JSON");
    assert_eq!(v["kind"], "replica");

    // Refused through the API...
    let (s, v) = api(
        &b,
        "POST",
        "/v1/volumes/db/snapshots",
        Some(json!({"label": "p2"})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("replica")),
        "{v}"
    );
    let (s, v) = api(
        &b,
        "PATCH",
        "/v1/volumes/db",
        Some(json!({"size": 8 << 20})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("replica")),
        "{v}"
    );
    // ... and over NBD, where its live export is read-only but readable.
    let mut n = b.nbd("db");
    assert!(n.read_only(), "a replica's export must say read-only");
    assert!(n.write(0, &random_bytes(4096, 8), true).is_err());
    let mut back = vec![0u8; data.len()];
    n.read(0, &mut back).expect("read the replica");
    assert!(back == data, "the replica's contents changed");
    drop(n);
    // Its points are exported and clonable as any others.
    let mut p = b.nbd(&format!("db@{snap}"));
    p.read(0, &mut back).expect("read the replica's point");
    assert!(back == data);
    drop(p);
    let (s, v) = api(
        &b,
        "POST",
        &format!("/v1/volumes/db/snapshots/{snap}/clones"),
        Some(json!({"name": "db-test"})),
    );
    assert_eq!(s, 201, "{v}");

    // Promoted: an ordinary writable volume again; a second promote is 409.
    let out = b.cdmctl(&["--json", "volume", "promote", "db"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("volume JSON");
    assert_eq!(v["kind"], "stage");
    let (s, v) = api(&b, "POST", "/v1/volumes/db/promote", None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("not_a_replica")),
        "{v}"
    );
    let mut n = b.nbd("db");
    assert!(!n.read_only());
    n.write(0, &random_bytes(4096, 9), true)
        .expect("write after promote");
    // A volume with a client cannot be demoted (the client could write).
    let (s, v) = api(
        &b,
        "POST",
        "/v1/volumes/db/demote",
        Some(json!({"peer": "site-a"})),
    );
    assert_eq!(s, 409, "{v}");
}

fn events(a: &Appliance, kind: &str) -> Vec<Value> {
    let (s, v) = api(a, "GET", &format!("/v1/events?type={kind}&limit=100"), None);
    assert_eq!(s, 200, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

fn transfers(a: &Appliance, link: u64) -> Vec<Value> {
    let (s, v) = api(
        a,
        "GET",
        &format!("/v1/replication/links/{link}/transfers"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

fn wait_job(a: &Appliance, id: u64) -> Value {
    wait_for(300, &format!("job {id}"), || {
        let (_, j) = api(a, "GET", &format!("/v1/jobs/{id}"), None);
        (j["state"] != "running").then_some(j)
    })
}

/// The control side of a link's runs with the real data path: an "after
/// every point" link runs when a point appears and as a `replicate` job
/// when asked; transfers are recorded; the target's copy is a read-only
/// replica; lag passes the RPO (late, alert) and comes back (recovered);
/// metrics count it all; a promoted target fails the link with the reason.
/// (The data itself, A→B→C and faults, is `replication_*` of the tests.)
#[test]
fn link_runs_lag_and_failover_controls() {
    let _g = shared();
    let a = start("site-a");
    let b = start("site-b");
    let token = pair_token(&b, None);
    let (s, v) = pair(&a, "b", &b.https_url(), &token);
    assert_eq!(s, 201, "{v}");

    let (s, v) = api(
        &a,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "db", "size": 8 << 20})),
    );
    assert_eq!(s, 201, "{v}");
    let first = random_bytes(1 << 20, 1);
    a.nbd("db").write(0, &first, true).expect("write");
    let (s, v) = api(
        &a,
        "POST",
        "/v1/volumes/db/snapshots",
        Some(json!({"label": "p1"})),
    );
    assert_eq!(s, 201, "{v}");
    let (s, l) = api(
        &a,
        "POST",
        "/v1/replication/links",
        Some(json!({"volume": "db", "peer": "b", "rpo_seconds": 600})),
    );
    assert_eq!(s, 201, "{l}");
    let id = l["id"].as_u64().expect("link id");
    assert_eq!(l["schedule"], "after_every_point");

    // The scheduler runs it: the existing point is sent in full.
    let t = wait_for(300, "the first transfer", || {
        let t = transfers(&a, id);
        (!t.is_empty()).then_some(t)
    });
    assert_eq!(t[0]["result"], "ok", "{t:?}");
    assert_eq!(t[0]["full"], true);
    // On B: a read-only replica holding the point.
    let (_, bv) = api(&b, "GET", "/v1/volumes/db", None);
    assert_eq!(bv["kind"], "replica", "{bv}");
    let (_, snaps) = api(&b, "GET", "/v1/volumes/db/snapshots", None);
    let bsnap = snaps[0]["id"].as_u64().expect("replica point");
    assert_eq!(snaps[0]["label"], "p1");
    let mut back = vec![0u8; first.len()];
    b.nbd(&format!("db@{bsnap}"))
        .read(0, &mut back)
        .expect("read");
    assert!(back == first, "the replica's point differs");
    let mut live = b.nbd("db");
    assert!(live.read_only());
    assert!(live.write(0, &[1u8; 4096], true).is_err());
    drop(live);

    // A new point is sent by itself, on the first as base.
    a.nbd("db")
        .write(4 << 20, &random_bytes(65536, 2), true)
        .expect("write");
    let (s, _) = api(
        &a,
        "POST",
        "/v1/volumes/db/snapshots",
        Some(json!({"label": "p2"})),
    );
    assert_eq!(s, 201);
    let t = wait_for(300, "the second transfer", || {
        let t = transfers(&a, id);
        (t.len() >= 2).then_some(t)
    });
    assert_eq!(
        (t[0]["result"].as_str(), t[0]["full"].as_bool()),
        (Some("ok"), Some(false)),
        "{t:?}"
    );
    assert!(t[0]["base"].as_str().is_some(), "{t:?}");
    assert!(!events(&a, "replication.completed").is_empty());

    // Run by hand (once the scheduled run is over): a replicate job,
    // nothing left to send.
    wait_for(300, "the scheduled run's end", || {
        let (_, l) = api(&a, "GET", &format!("/v1/replication/links/{id}"), None);
        (l["state"] == "idle").then_some(())
    });
    let (s, j) = api(&a, "POST", &format!("/v1/replication/links/{id}/run"), None);
    assert_eq!(s, 202, "{j}");
    assert_eq!(j["kind"], "replicate");
    let j = wait_job(&a, j["id"].as_u64().unwrap());
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(transfers(&a, id).len(), 2);
    let (_, l) = api(&a, "GET", &format!("/v1/replication/links/{id}"), None);
    assert_eq!(l["state"], "idle", "{l}");
    assert!(l["lag_seconds"].as_u64().is_some_and(|s| s < 600), "{l}");

    // Late: past the RPO on A's clock; then a new point brings it back.
    let (s, _) = api(&a, "POST", "/v1/clock", Some(json!({"advance_secs": 700})));
    assert_eq!(s, 200);
    wait_for(60, "replication.late", || {
        (!events(&a, "replication.late").is_empty()).then_some(())
    });
    let alerts = events(&a, "alert.raised");
    assert!(
        alerts
            .iter()
            .any(|e| e["data"]["kind"] == "replication_late"),
        "{alerts:?}"
    );
    let (s, _) = api(
        &a,
        "POST",
        "/v1/volumes/db/snapshots",
        Some(json!({"label": "p3"})),
    );
    assert_eq!(s, 201);
    wait_for(300, "replication.recovered", || {
        (!events(&a, "replication.recovered").is_empty()).then_some(())
    });
    let (_, m) = http(&a.url(), "GET", "/metrics", Some(&a.admin_token()), None);
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(
        m.contains(&format!(
            "cdm_replication_transfers_total{{link=\"{id}\",result=\"ok\"}} 3"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "cdm_replication_lag_seconds{{link=\"{id}\",volume=\"db\",peer=\"b\"}}"
        )),
        "{m}"
    );

    // Failover: B's copy promoted, A's link fails with the reason.
    let (s, v) = api(&b, "POST", "/v1/volumes/db/promote", None);
    assert_eq!(s, 200, "{v}");
    let (s, _) = api(
        &a,
        "POST",
        "/v1/volumes/db/snapshots",
        Some(json!({"label": "p4"})),
    );
    assert_eq!(s, 201);
    let l = wait_for(300, "the link failing", || {
        let (_, l) = api(&a, "GET", &format!("/v1/replication/links/{id}"), None);
        (l["state"] == "failing").then_some(l)
    });
    assert!(
        l["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not_a_replica")),
        "{l}"
    );
    let failed = events(&a, "replication.failed");
    assert!(
        failed.iter().any(|e| e["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not_a_replica"))),
        "{failed:?}"
    );
}

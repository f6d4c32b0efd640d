//! Recovery drills (`docs/control-plane.md`, "Drills") end to end: the
//! real snapshotd, a real `cdm-agent serve` and a real PostgreSQL 15. A
//! good point passes every check with its RTO and RPO measured; a probe
//! with the wrong count fails; a point whose heap was damaged on purpose
//! fails `pg_amcheck` and raises the alert and a signed webhook; a drill
//! that hangs is stopped at its time limit; two drills at once use two
//! clones; no clone or attachment is left behind, also after the agent is
//! killed mid-drill. A policy's drill schedule runs on the fake clock.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cdm_e2e::pg::{psql, Pg};
use cdm_e2e::webhook::{header, Receiver};
use cdm_e2e::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

mod control_util;
use control_util::*;

/// A `cdm-agent serve` with its own state directory.
struct ServeAgent {
    state: tempfile::TempDir,
    url: String,
    sock: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl ServeAgent {
    fn new(app: &Appliance) -> ServeAgent {
        let state = tempfile::Builder::new()
            .prefix("cdm-drill-agent-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let log = state.path().join("agent.log");
        ServeAgent {
            state,
            url: app.url(),
            sock: app.sock.clone(),
            child: None,
            log,
        }
    }

    fn agent(&self) -> Command {
        let mut c = Command::new(bin("cdm-agent"));
        c.args(["--url", &self.url, "--nbd"])
            .arg(format!("unix:{}", self.sock.display()))
            .arg("--state-dir")
            .arg(self.state.path())
            .env_remove("CDM_TOKEN")
            .env_remove("CDM_TOKEN_FILE")
            .env_remove("CDM_ENROL_TOKEN")
            .env_remove("CDM_AGENT_CONFIG")
            .env_remove("CDM_CA_FILE")
            .env("RUST_LOG", "info");
        c
    }

    fn start(&mut self, serve_args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            self.agent()
                .arg("serve")
                .args(serve_args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start cdm-agent serve"),
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The names of what is attached on this host.
    fn attachments(&self) -> Vec<String> {
        let out = output(self.agent().args(["--json", "list"]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for ServeAgent {
    fn drop(&mut self) {
        self.kill();
        for n in self.attachments() {
            let _ = output(self.agent().args(["--json", "detach", &n]));
        }
    }
}

/// Waits for job `id` to end.
fn job_done(api: &Api, id: u64, agent: &ServeAgent) -> Value {
    wait_for(900, &format!("job {id} to end"), || {
        let j = api.get(&format!("/v1/jobs/{id}"));
        (!matches!(j["state"].as_str(), Some("queued" | "running"))).then_some(j)
    });
    let j = api.get(&format!("/v1/jobs/{id}"));
    assert_ne!(j["state"], "failed", "{j}\n{}", agent.log());
    j
}

/// Starts a drill and waits for its report.
fn drill(api: &Api, app: u64, body: Value, agent: &ServeAgent) -> Value {
    let j = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app}/drills"),
        Some(body),
    );
    assert_eq!(j["kind"], "drill");
    let id = j["id"].as_u64().unwrap();
    job_done(api, id, agent);
    api.get(&format!("/v1/drills/{id}"))
}

fn check<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {d:#}"))
}

/// No drill clone on the appliance, no drill attachment on the host.
fn nothing_left(api: &Api, agent: &ServeAgent) {
    wait_for(120, "drill clones to be deleted", || {
        let c = api.get("/v1/clones");
        let left: Vec<&Value> = c
            .as_array()?
            .iter()
            .filter(|v| v["name"].as_str().is_some_and(|n| n.starts_with("drill-")))
            .collect();
        left.is_empty().then_some(())
    });
    let att = agent.attachments();
    assert!(
        att.iter().all(|a| !a.starts_with("drill-")),
        "attachments left: {att:?}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let root = agent.state.path().display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&root)),
        "mounts left under {root}:\n{mounts}"
    );
}

/// The signed delivery of event `kind` (its HMAC checked).
fn delivered(r: &Receiver, secret: &str, kind: &str) -> Value {
    wait_for(120, &format!("a webhook delivery of {kind}"), || {
        let g = r.got.lock().unwrap();
        g.iter().find_map(|(h, body)| {
            if header(h, "x-cdm-event") != Some(kind) {
                return None;
            }
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(body);
            let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            assert_eq!(header(h, "x-cdm-signature"), Some(want.as_str()));
            serde_json::from_slice::<Value>(body)
                .ok()
                .map(|v| v["event"].clone())
        })
    })
}

/// An enrolled agent, the cluster's application and one point of it.
fn setup(a: &Appliance, api: &Api, pg: &Pg, name: &str) -> (ServeAgent, u64, u64) {
    let t = token(api, json!({"name": name}));
    let mut agent = ServeAgent::new(a);
    agent.start(&["--enrol", &t, "--max-jobs", "4"]);
    let appl = wait_for(120, "the cluster to be discovered", || {
        let apps = api.get(&format!("/v1/applications?host={name}"));
        apps.as_array()?
            .iter()
            .find(|x| x["kind"] == "postgresql" && x["config"]["port"] == pg.port)
            .cloned()
    });
    let app = appl["id"].as_u64().unwrap();
    let j = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app}/backups"),
        None,
    );
    let j = job_done(api, j["id"].as_u64().unwrap(), &agent);
    assert_eq!(j["state"], "succeeded", "{j}");
    let pts = api.get(&format!("/v1/applications/{app}/points"));
    let snap = pts[0]["snapshot"].as_u64().unwrap();
    (agent, app, snap)
}

#[test]
fn drills_prove_good_points_and_fail_wrong_damaged_and_hung_ones() {
    let (a, api) = start(&["--max-jobs-per-host", "4"]);
    let hook = Receiver::start();
    let secret = "drill-webhook-secret-0123";
    api.expect(
        201,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": hook.url(), "events": ["drill.*", "alert.raised"], "secret": secret})),
    );
    let pg = Pg::init(1);
    let (agent, app, snap) = setup(&a, &api, &pg, "db1");
    let rows = psql(&pg.sock, pg.port, "SELECT count(*) FROM pgbench_accounts");
    let used_before = api.get("/v1/pool")["used_bytes"].as_u64();

    // A good point: every check passes, RTO and RPO measured. The drill's
    // server runs in its own network namespace: it cannot reach a port
    // listening on this host's loopback (production's, a publisher's).
    let outside = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let net_probe = format!(
        "CREATE TEMP TABLE net(x text); COPY net FROM PROGRAM 'bash -c \"(: </dev/tcp/127.0.0.1/{}) 2>/dev/null && echo connected || echo isolated\"'; SELECT x FROM net",
        outside.local_addr().unwrap().port()
    );
    let d = drill(
        &api,
        app,
        json!({"probes": [{"sql": "SELECT count(*) FROM pgbench_accounts", "expect": format!(">= {rows}")},
                          {"sql": net_probe, "expect": "isolated"}]}),
        &agent,
    );
    assert_eq!(d["passed"], true, "{d:#}\n{}", agent.log());
    assert_eq!(
        (d["application"].as_u64(), d["snapshot"].as_u64()),
        (Some(app), Some(snap))
    );
    let rto = d["rto_seconds"].as_f64().expect("rto measured");
    assert!(rto > 0.0, "{d}");
    assert!(d["rpo_seconds"].is_u64(), "{d}");
    for c in ["start", "consistent", "pg_amcheck", "scrub"] {
        assert_eq!(check(&d, c)["passed"], true, "{c}: {d:#}");
    }
    let probe = check(&d, "probe: SELECT count(*) FROM pgbench_accounts");
    assert_eq!(probe["passed"], true, "{probe}");
    let net = check(&d, &format!("probe: {net_probe}"));
    assert_eq!(net["passed"], true, "{net}");
    assert!(
        check(&d, "scrub")["output"]
            .as_str()
            .unwrap()
            .contains("bytes"),
        "{d}"
    );
    assert_eq!(
        delivered(&hook, secret, "drill.passed")["data"]["id"],
        d["id"]
    );
    nothing_left(&api, &agent);
    // Nothing was copied: the clone shared the point's blocks.
    if let (Some(b), Some(now)) = (used_before, api.get("/v1/pool")["used_bytes"].as_u64()) {
        assert!(now < b + (64 << 20), "pool used {b} → {now}");
    }
    let m = api_text(&a, "/metrics");
    assert!(
        m.contains(&format!("cdm_drill_last_passed{{application=\"{app}\"}} 1")),
        "{m}"
    );
    assert!(m.contains(&format!(
        "cdm_drill_last_rto_seconds{{application=\"{app}\"}}"
    )));

    // A probe whose count is wrong fails the drill, the other checks pass.
    let d = drill(
        &api,
        app,
        json!({"probes": [{"sql": "SELECT count(*) FROM pgbench_branches", "expect": "= 5"}]}),
        &agent,
    );
    assert_eq!(d["passed"], false, "{d:#}");
    let p = check(&d, "probe: SELECT count(*) FROM pgbench_branches");
    assert_eq!(p["passed"], false);
    assert!(p["output"].as_str().unwrap().contains("\"1\""), "{p}");
    assert_eq!(check(&d, "pg_amcheck")["passed"], true, "{d:#}");
    let m = api_text(&a, "/metrics");
    assert!(
        m.contains(&format!("cdm_drill_last_passed{{application=\"{app}\"}} 0")),
        "{m}"
    );

    // Two drills at once: two clones, both pass.
    let ids: Vec<u64> = (0..2)
        .map(|_| {
            api.expect(
                202,
                "POST",
                &format!("/v1/applications/{app}/drills"),
                Some(json!({})),
            )["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let both = wait_for(300, "both drills to run at once", || {
        let js: Vec<Value> = ids.iter().map(|i| job(&api, *i)).collect();
        js.iter().all(|j| j["state"] != "queued").then_some(js)
    });
    assert_ne!(both[0]["params"]["name"], both[1]["params"]["name"]);
    for id in &ids {
        job_done(&api, *id, &agent);
        let d = api.get(&format!("/v1/drills/{id}"));
        assert_eq!(d["passed"], true, "{d:#}");
    }
    nothing_left(&api, &agent);

    // A drill that hangs (a probe that never answers) is stopped at its
    // limit and cleaned up.
    let d = drill(
        &api,
        app,
        json!({"probes": [{"sql": "SELECT pg_sleep(1000)", "expect": ""}], "timeout_seconds": 25}),
        &agent,
    );
    assert_eq!(d["passed"], false, "{d:#}");
    let t = check(&d, "time_limit");
    assert!(t["output"].as_str().unwrap().contains("pg_sleep"), "{t}");
    nothing_left(&api, &agent);

    // A damaged point: a clone of the point whose table heap got garbage
    // in a page's line pointers, snapshotted, drilled.
    let file = psql(
        &pg.sock,
        pg.port,
        "SELECT pg_relation_filepath('pgbench_accounts')",
    );
    let vol = d["volume"].as_str().unwrap().to_string();
    let bad = altered_point(&a, &api, &agent, &vol, snap, "damaged", |root| {
        damage(&root.join("pgdata").join(&file))
    });
    let d = drill(&api, app, json!({"snapshot": bad}), &agent);
    assert_eq!(d["passed"], false, "{d:#}");
    assert_eq!(d["snapshot"].as_u64(), Some(bad));
    let am = check(&d, "pg_amcheck");
    assert_eq!(am["passed"], false, "{d:#}");
    assert!(!am["output"].as_str().unwrap().is_empty());
    let ev = delivered(&hook, secret, "drill.failed");
    assert_eq!(ev["data"]["application"], app);
    let alert = wait_for(60, "the drill_failed alert", || {
        events_of(&api, "alert.raised")
            .into_iter()
            .find(|e| e["data"]["kind"] == "drill_failed" && e["data"]["drill"] == d["id"])
    });
    assert_eq!(alert["data"]["passed"], false);
    delivered(&hook, secret, "alert.raised");
    // The damaged point itself and the application's point are untouched.
    assert_eq!(
        api.get("/v1/volumes/damaged/snapshots")
            .as_array()
            .unwrap()
            .len(),
        1
    );
    nothing_left(&api, &agent);

    // A point whose WAL is gone cannot start: the drill fails with
    // PostgreSQL's reason, and the other checks do not run.
    let nowal = altered_point(&a, &api, &agent, &vol, snap, "nowal", |root| {
        for e in std::fs::read_dir(root.join("pgdata/pg_wal"))
            .unwrap()
            .flatten()
        {
            if e.file_type().unwrap().is_file() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    });
    let d = drill(&api, app, json!({"snapshot": nowal}), &agent);
    assert_eq!(d["passed"], false, "{d:#}");
    let st = check(&d, "start");
    assert_eq!(st["passed"], false, "{d:#}");
    assert!(
        st["output"].as_str().unwrap().contains("did not start"),
        "{st}"
    );
    assert!(d["rto_seconds"].is_null(), "{d}");
    assert_eq!(d["checks"].as_array().unwrap().len(), 1, "{d:#}");
    nothing_left(&api, &agent);
    // The application's own point was never touched.
    let pts = api.get(&format!("/v1/applications/{app}/points"));
    assert_eq!(pts.as_array().unwrap().len(), 1, "{pts}");
    assert_eq!(pts[0]["snapshot"].as_u64(), Some(snap));

    // History, newest first, per application.
    let all = api.get(&format!("/v1/drills?application={app}"));
    assert_eq!(all.as_array().unwrap().len(), 7, "{all:#}");
    assert_eq!(all[0]["id"], d["id"]);
    assert!(api
        .get("/v1/drills?application=999")
        .as_array()
        .unwrap()
        .is_empty());
    // cdmctl reads the same reports.
    let out = output(
        Command::new(bin("cdmctl"))
            .args([
                "--url",
                &a.url(),
                "--token",
                &a.admin_token(),
                "drill",
                "show",
            ])
            .arg(d["id"].to_string()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[FAILED] start"), "{text}");
}

/// A snapshot of a clone of point `snap` (named `name`) changed by `f`
/// through a mount of it (`cdm-agent attach`, as the admin).
fn altered_point(
    a: &Appliance,
    api: &Api,
    agent: &ServeAgent,
    vol: &str,
    snap: u64,
    name: &str,
    f: impl FnOnce(&Path),
) -> u64 {
    api.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots/{snap}/clones"),
        Some(json!({"name": name})),
    );
    let mnt = agent.state.path().join(format!("alter-{name}"));
    let att = output(
        agent
            .agent()
            .env("CDM_TOKEN", a.admin_token())
            .args([
                "--json",
                "attach",
                name,
                "--name",
                &format!("alter-{name}"),
                "--mount",
            ])
            .arg(&mnt),
    );
    assert!(
        att.status.success(),
        "{}",
        String::from_utf8_lossy(&att.stderr)
    );
    f(&mnt);
    let det = output(agent.agent().env("CDM_TOKEN", a.admin_token()).args([
        "--json",
        "detach",
        &format!("alter-{name}"),
    ]));
    assert!(
        det.status.success(),
        "{}",
        String::from_utf8_lossy(&det.stderr)
    );
    snapshot(api, name, json!({"label": name}))
}

/// The line pointers of the heap's second page made to point past the
/// page's end (its header stays valid, so the server starts and reads
/// it): what `pg_amcheck` must find.
fn damage(heap: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    // lp_off 8000, lp_flags LP_NORMAL, lp_len 400: ends beyond 8192.
    let lp: u32 = 8000 | (1 << 15) | (400 << 17);
    let bytes: Vec<u8> = (0..16).flat_map(|_| lp.to_le_bytes()).collect();
    let mut f = std::fs::OpenOptions::new().write(true).open(heap).unwrap();
    f.seek(SeekFrom::Start(8192 + 24)).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_killed_agent_leaves_no_drill_behind() {
    let (a, api) = start(&[]);
    let pg = Pg::init(1);
    let (mut agent, app, _) = setup(&a, &api, &pg, "db2");
    // A drill hanging in its probe: clone made, attached, PostgreSQL running.
    let hung = || {
        let j = api.expect(
            202,
            "POST",
            &format!("/v1/applications/{app}/drills"),
            Some(json!({"probes": [{"sql": "SELECT pg_sleep(1000)", "expect": "x"}]})),
        );
        let id = j["id"].as_u64().unwrap();
        wait_for(300, "the drill's probe to run", || {
            let lines = api.get(&format!("/v1/jobs/{id}/log"));
            lines["lines"]
                .as_array()?
                .iter()
                .any(|l| {
                    l["line"]
                        .as_str()
                        .is_some_and(|s| s.contains("probe SELECT pg_sleep"))
                })
                .then_some(())
        });
        (id, format!("drill-{app}-{id}"))
    };
    // Cancelled: the drill's process tears down before it exits.
    let (id, name) = hung();
    let pgdata = agent.state.path().join("mnt").join(&name).join("pgdata");
    assert!(pgdata.join("postmaster.pid").exists());
    api.expect(200, "POST", &format!("/v1/jobs/{id}/cancel"), None);
    wait_for(120, "the drill job to be cancelled", || {
        (job(&api, id)["state"] == "cancelled").then_some(())
    });
    nothing_left(&api, &agent);
    assert!(!pgdata.join("postmaster.pid").exists());
    let ps = sh("ps -eo args");
    assert!(!ps.contains(&name), "{ps}");

    // Killed with its agent: the restarted agent cleans up.
    let (id, name) = hung();
    assert!(agent.attachments().contains(&name));
    let pgdata = agent.state.path().join("mnt").join(&name).join("pgdata");
    assert!(pgdata.join("postmaster.pid").exists());
    agent.kill();
    // The restarted agent stops the drill's server and detaches; the
    // appliance fails the job and deletes the clone.
    agent.start(&[]);
    let j = wait_for(120, "the drill job to fail", || {
        let j = job(&api, id);
        (j["state"] == "failed").then_some(j)
    });
    assert!(j["message"].as_str().unwrap().contains("restarted"), "{j}");
    let d = api.get(&format!("/v1/drills/{id}"));
    assert_eq!(d["passed"], false);
    wait_for(120, "the stale attachment to be cleaned up", || {
        (!agent.attachments().contains(&name)).then_some(())
    });
    nothing_left(&api, &agent);
    assert!(!pgdata.join("postmaster.pid").exists());
    let ps = sh("ps -eo args");
    assert!(!ps.contains(&name), "{ps}");
}

#[test]
fn policies_schedule_drills_on_the_appliance_clock() {
    let (a, api) = start(&[]);
    let h = enrol(&a, &api, "db3");
    h.heartbeat(true, &[], json!([]));
    let id = app(&api, "db3", "main");
    policy(
        &api,
        json!({"name": "gold", "interval_seconds": 86400, "rpo_seconds": 172800,
               "drill_interval_seconds": 3600, "drill_rto_seconds": 30,
               "drill_probes": [{"sql": "SELECT 1", "expect": "1"}], "drill_timeout_seconds": 120}),
    );
    // Bad drill settings are refused.
    let (s, v) = api.call(
        "POST",
        "/v1/protection-policies",
        Some(
            json!({"name": "bad", "interval_seconds": 3600, "rpo_seconds": 7200,
                    "drill_point": "oldest"}),
        ),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(assign(&api, id, Some("gold"))["policy"], "gold");
    // A point to drill: the volume with one snapshot, as a backup leaves it.
    let vol = api.get(&format!("/v1/applications/{id}"))["volume"]
        .as_str()
        .unwrap()
        .to_string();
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": vol, "size": 1 << 20})),
    );
    let snap = snapshot(&api, &vol, json!({}));
    let drills = || jobs(&api, &format!("application={id}&kind=drill"));
    advance(&api, 1800);
    advance(&api, 1801);
    h.heartbeat(false, &[], json!([]));
    let j = wait_for(60, "the scheduled drill", || drills().into_iter().next());
    assert_eq!(j["created_by"], "scheduler");
    assert_eq!(j["params"]["snapshot"].as_u64(), Some(snap));
    assert_eq!(j["params"]["timeout_seconds"], 120);
    assert_eq!(j["params"]["probes"][0]["sql"], "SELECT 1");
    assert_eq!(j["params"]["name"], format!("drill-{id}-{}", j["id"]));
    // The agent runs it and reports; the report compares the RTO target.
    let jid = j["id"].as_u64().unwrap();
    let got = h.pull();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["kind"], "drill");
    // A clone the agent leaves behind is deleted by the appliance when
    // the job ends.
    let clone = format!("drill-{id}-{jid}");
    h.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots/{snap}/clones"),
        Some(json!({"name": clone})),
    );
    let (s, v) = h.finish(
        jid,
        json!({"state": "succeeded", "result": {"passed": true, "rto_seconds": 45.0,
            "checks": [{"name": "start", "passed": true, "output": "", "seconds": 45.0}]}}),
    );
    assert_eq!(s, 200, "{v}");
    let d = api.get(&format!("/v1/drills/{jid}"));
    assert_eq!(d["passed"], false, "{d:#}");
    assert_eq!(d["rto_target"], 30);
    assert_eq!(check(&d, "rto_target")["passed"], false);
    assert!(d["message"].as_str().unwrap().contains("rto_target"), "{d}");
    wait_for(60, "the appliance to delete the drill's clone", || {
        let c = api.get("/v1/clones");
        (!c.as_array()?.iter().any(|v| v["name"] == clone.as_str())).then_some(())
    });
    // One drill per interval: the next one an hour later.
    assert_eq!(drills().len(), 1);
    advance(&api, 3600);
    h.heartbeat(false, &[], json!([]));
    wait_for(60, "the next scheduled drill", || {
        (drills().len() == 2).then_some(())
    });
    // Files-kind applications are not drilled by agents.
    let f = api.expect(
        201,
        "POST",
        "/v1/applications",
        Some(json!({"host": "db3", "kind": "files", "name": "etc", "config": {"path": "/etc"}})),
    );
    let (s, v) = api.call(
        "POST",
        &format!("/v1/applications/{}/drills", f["id"]),
        Some(json!({})),
    );
    assert_eq!(s, 409, "{v}");
}

/// The appliance drills a file tree itself: the point cloned, the ext4 on
/// it checked read-only, inspected, a file probe read, the point
/// scrubbed, the clone deleted; a point whose filesystem metadata was
/// damaged fails its fsck.
#[test]
fn file_trees_are_drilled_on_the_appliance() {
    for t in [
        "losetup",
        "blkid",
        "mkfs.ext4",
        "e2fsck",
        "nbdcopy",
        "qemu-io",
    ] {
        require(t);
    }
    let work = tempfile::Builder::new()
        .prefix("cdm-drill-files-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path();
    let fuse = w.join("fuse");
    let config = format!("mount = \"{}\"\n{FAST_CONFIG}", fuse.display());
    let a = Appliance::start_with(Some(&config), None, &["--pool-size", "4G", "--pool-sparse"]);
    let api = Api::new(&a, &a.admin_token());
    let h = enrol(&a, &api, "fs1");
    h.heartbeat(true, &[], json!([]));
    let f = api.expect(
        201,
        "POST",
        "/v1/applications",
        Some(json!({"host": "fs1", "kind": "files", "name": "etc", "config": {"path": "/etc"}})),
    );
    let id = f["id"].as_u64().unwrap();
    let vol = f["volume"].as_str().unwrap().to_string();
    sh(&format!(
        "mkdir -p {d}/src/etc && echo 'db_port = 5432' > {d}/src/etc/app.conf && \
         mkfs.ext4 -q -b 4096 -d {d}/src {d}/ext4.img 64M",
        d = w.display()
    ));
    let sum = sh(&format!(
        "sha256sum {}/src/etc/app.conf | cut -c1-64",
        w.display()
    ));
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": vol, "size": 64 << 20})),
    );
    run(Command::new("nbdcopy")
        .arg(w.join("ext4.img"))
        .arg(a.unix_uri(&vol)));
    let good = snapshot(&api, &vol, json!({}));
    let drill_local = |body: Value| -> Value {
        let j = api.expect(
            202,
            "POST",
            &format!("/v1/applications/{id}/drills"),
            Some(body),
        );
        assert_eq!(j["kind"], "drill");
        let jid = j["id"].as_u64().unwrap();
        wait_for(300, "the drill to end", || {
            let j = job(&api, jid);
            (!matches!(j["state"].as_str(), Some("queued" | "running"))).then_some(())
        });
        api.get(&format!("/v1/drills/{jid}"))
    };
    let d = drill_local(json!({"probes": [
        {"path": "/etc/app.conf", "sha256": sum.trim()},
        {"path": "/etc/app.conf", "contains": "db_port"}]}));
    assert_eq!(d["passed"], true, "{d:#}");
    assert_eq!(d["host"], "appliance");
    assert!(d["rto_seconds"].as_f64().is_some(), "{d}");
    assert_eq!(check(&d, "fsck: disk (ext4)")["passed"], true, "{d:#}");
    assert_eq!(check(&d, "inspect")["passed"], true);
    assert_eq!(check(&d, "scrub")["passed"], true);
    assert_eq!(check(&d, "file: /etc/app.conf")["passed"], true);
    // A probe for a file that is not there fails.
    let d = drill_local(json!({"probes": [{"path": "/etc/missing.conf"}]}));
    assert_eq!(d["passed"], false, "{d:#}");
    assert_eq!(check(&d, "file: /etc/missing.conf")["passed"], false);
    // Damaged group descriptors: e2fsck -n finds them.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 4096 4096"])
        .arg(a.unix_uri(&vol)));
    let bad = snapshot(&api, &vol, json!({}));
    let d = drill_local(json!({"snapshot": bad}));
    assert_eq!(d["passed"], false, "{d:#}");
    assert_eq!(check(&d, "fsck: disk (ext4)")["passed"], false, "{d:#}");
    assert_eq!(
        events_of(&api, "drill.failed").len(),
        2,
        "{:?}",
        events_of(&api, "drill.failed")
    );
    // The good point is still good, and no clone is left.
    let d = drill_local(json!({"snapshot": good}));
    assert_eq!(d["passed"], true, "{d:#}");
    // A policy's drill schedule covers file trees too (the appliance runs
    // them): due one interval after the policy is assigned.
    policy(
        &api,
        json!({"name": "files-drill", "interval_seconds": 86400, "rpo_seconds": 172800,
               "drill_interval_seconds": 3600, "drill_timeout_seconds": 300}),
    );
    assign(&api, id, Some("files-drill"));
    advance(&api, 3601);
    let j = wait_for(60, "the scheduled drill of the file tree", || {
        jobs(&api, &format!("application={id}&kind=drill"))
            .into_iter()
            .find(|j| j["created_by"] == "scheduler")
    });
    let jid = j["id"].as_u64().unwrap();
    let d = wait_for(300, "the scheduled drill's report", || {
        let (s, d) = api.call("GET", &format!("/v1/drills/{jid}"), None);
        (s == 200).then_some(d)
    });
    assert_eq!(d["host"], "appliance", "{d:#}");
    check(&d, "fsck: disk (ext4)");
    let clones = api.get("/v1/clones");
    assert!(clones.as_array().unwrap().is_empty(), "{clones}");
}

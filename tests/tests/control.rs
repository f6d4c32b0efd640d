//! The appliance runs protection end to end (issue 15): two hosts, each a
//! `cdm-agent serve` process with its own state directory and identity and
//! its own PostgreSQL cluster; one policy (hourly, keep 3) on the fake
//! clock; the backups the appliance schedules and the agents run; the
//! catalog of points; an agent that stops → its application turns late
//! (event and signed webhook) and recovers when the agent returns; a failing
//! backup (database stopped) → a failed job with the reason, alert and
//! webhook; a restore of host A's point started on host B answers queries
//! with host A's data.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use cdm_e2e::pg::*;
use cdm_e2e::webhook::Receiver;
use cdm_e2e::*;
use serde_json::{json, Value};

/// `cdm-agent serve` with a state directory of its own, killed when
/// dropped; whatever it left attached is detached then.
struct ServeAgent {
    name: String,
    url: String,
    nbd: String,
    admin_token: PathBuf,
    state: tempfile::TempDir,
    child: Option<Child>,
}

impl ServeAgent {
    /// Enrols with `token` on its first start.
    fn start(app: &Appliance, name: &str, token: &str) -> ServeAgent {
        let mut a = ServeAgent {
            name: name.to_string(),
            url: app.url(),
            nbd: format!("unix:{}", app.sock.display()),
            admin_token: app.data.join("admin.token"),
            state: tempfile::Builder::new()
                .prefix("cdm-serve-")
                .tempdir_in("/var/tmp")
                .unwrap(),
            child: None,
        };
        a.spawn(Some(token));
        a
    }

    fn log_path(&self) -> PathBuf {
        self.state.path().join("serve.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self, token: Option<&str>) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut c = Command::new(bin("cdm-agent"));
        c.args(["--url", &self.url, "--nbd", &self.nbd, "--state-dir"])
            .arg(self.state.path())
            .args(["serve", "--name", &self.name, "--discover", "none"])
            .env_remove("CDM_TOKEN")
            .env_remove("CDM_TOKEN_FILE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(t) = token {
            c.args(["--enrol", t]);
        }
        self.child = Some(c.spawn().expect("start cdm-agent serve"));
    }

    /// SIGKILL, like a host that goes away.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again with the credential it keeps.
    fn restart(&mut self) {
        self.spawn(None);
    }

    /// `cdm-agent` on this host's state directory, as the admin.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("cdm-agent"))
            .args(["--url", &self.url, "--nbd", &self.nbd, "--token-file"])
            .arg(&self.admin_token)
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--json")
            .args(args)
            .env_remove("CDM_TOKEN")
            .output()
            .expect("run cdm-agent")
    }
}

impl Drop for ServeAgent {
    fn drop(&mut self) {
        self.kill();
        if let Ok(Value::Array(v)) = serde_json::from_slice::<Value>(&self.cli(&["list"]).stdout) {
            for a in v {
                if let Some(n) = a["name"].as_str() {
                    let _ = self.cli(&["detach", n, "--delete-clone"]);
                }
            }
        }
    }
}

fn enrol(api: &Api, name: &str) -> String {
    let v = api.expect(
        201,
        "POST",
        "/v1/hosts/enrolments",
        Some(json!({ "name": name })),
    );
    v["token"].as_str().expect("enrolment token").to_string()
}

fn host_state(api: &Api, name: &str) -> String {
    api.get("/v1/hosts")
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .map(|h| h["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn wait_online(api: &Api, agent: &ServeAgent) {
    wait_for(120, &format!("{} online", agent.name), || {
        (host_state(api, &agent.name) == "online").then_some(())
    });
}

fn application(api: &Api, id: u64) -> Value {
    api.get(&format!("/v1/applications/{id}"))
}

fn rpo(api: &Api, id: u64) -> String {
    application(api, id)["rpo"]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn jobs(api: &Api, app: u64) -> Vec<Value> {
    api.get(&format!("/v1/jobs?application={app}"))
        .as_array()
        .unwrap()
        .clone()
}

/// Waits until job `id` has ended; returns it.
fn finished(api: &Api, id: u64, agents: &[&ServeAgent]) -> Value {
    let mut last = Value::Null;
    let done = (0..2400).find_map(|_| {
        let j = api.get(&format!("/v1/jobs/{id}"));
        if ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or("")) {
            return Some(j);
        }
        last = j;
        std::thread::sleep(std::time::Duration::from_millis(100));
        None
    });
    done.unwrap_or_else(|| {
        let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
        panic!(
            "job {id} did not end: {last}\nagents:\n{}",
            logs.join("\n---\n")
        )
    })
}

/// Waits until application `app` has no backup queued or running and at
/// least `n` backups that succeeded; returns the number that succeeded.
fn backups_settled(api: &Api, app: u64, n: usize, agents: &[&ServeAgent]) -> usize {
    let mut last = Vec::new();
    for _ in 0..3000 {
        let js = jobs(api, app);
        let backups: Vec<&Value> = js.iter().filter(|j| j["kind"] == "backup").collect();
        let busy = backups
            .iter()
            .any(|j| j["state"] == "queued" || j["state"] == "running");
        let ok = backups.iter().filter(|j| j["state"] == "succeeded").count();
        if !busy && ok >= n {
            return ok;
        }
        if let Some(f) = backups.iter().find(|j| j["state"] == "failed") {
            panic!("a backup of application {app} failed: {f}");
        }
        last = js;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
    panic!(
        "application {app}: backups did not settle at {n}: {last:?}\nagents:\n{}",
        logs.join("\n---\n")
    )
}

fn points(api: &Api, app: u64) -> Vec<Value> {
    api.get(&format!("/v1/applications/{app}/points"))
        .as_array()
        .unwrap()
        .clone()
}

fn advance(api: &Api, secs: u64) {
    api.expect(
        200,
        "POST",
        "/v1/clock",
        Some(json!({ "advance_secs": secs })),
    );
}

/// The webhook delivery of event `kind` whose data names `key` = `id`.
fn delivered(rx: &Receiver, kind: &str, key: &str, id: u64) -> Value {
    wait_for(120, &format!("webhook {kind} for {key} {id}"), || {
        rx.bodies()
            .into_iter()
            .find(|b| b["event"]["type"] == kind && b["event"]["data"][key] == id)
            .map(|b| b["event"].clone())
    })
}

fn register(api: &Api, host: &str, pg: &Pg) -> u64 {
    let v = api.expect(
        201,
        "POST",
        "/v1/applications",
        Some(json!({
            "host": host,
            "kind": "postgresql",
            "name": "main",
            "config": {"host": pg.sock, "port": pg.port, "user": "postgres"},
        })),
    );
    assert_eq!(v["host"], host);
    assert_eq!(v["rpo"]["state"], "unprotected", "{v}");
    v["id"].as_u64().expect("application id")
}

#[test]
fn two_hosts_protected_by_one_policy_late_failing_and_cross_host_restore() {
    let app = Appliance::start(Some(FAST_CONFIG));
    let api = Api::new(&app, &app.admin_token());
    let rx = Receiver::start();
    api.expect(
        201,
        "POST",
        "/v1/webhooks",
        Some(
            json!({"url": rx.url(), "events": ["application.*", "job.failed"], "secret": "control-plane-test-secret"}),
        ),
    );

    let (pa, pb) = (Pg::init(1), Pg::init(1));
    let a = ServeAgent::start(&app, "host-a", &enrol(&api, "host-a"));
    let mut b = ServeAgent::start(&app, "host-b", &enrol(&api, "host-b"));
    wait_online(&api, &a);
    wait_online(&api, &b);
    let ida = register(&api, "host-a", &pa);
    let idb = register(&api, "host-b", &pb);
    api.expect(
        201,
        "POST",
        "/v1/protection-policies",
        Some(json!({"name": "hourly", "interval_seconds": 3600, "keep_last": 3, "rpo_seconds": 5400})),
    );
    for id in [ida, idb] {
        api.expect(
            200,
            "PUT",
            &format!("/v1/applications/{id}/policy"),
            Some(json!({"policy": "hourly"})),
        );
    }

    // Four hours of the policy (the first backup is due one interval after
    // the assignment): the appliance queues, the agents run. The fake clock
    // moves only while nothing runs: a jump makes every host look silent.
    let mut done = (0, 0);
    for round in 0..4 {
        pa.pgbench(50);
        pb.pgbench(50);
        advance(&api, 3600);
        let na = backups_settled(&api, ida, done.0 + 1, &[&a, &b]);
        let nb = backups_settled(&api, idb, done.1 + 1, &[&a, &b]);
        done = (na, nb);
        assert_eq!(rpo(&api, ida), "ok", "round {round}");
        assert_eq!(rpo(&api, idb), "ok", "round {round}");
    }
    // keep_last 3, applied to each application's volume.
    for (id, host) in [(ida, "host-a"), (idb, "host-b")] {
        let ps = wait_for(60, "retention of the application's points", || {
            let ps = points(&api, id);
            (ps.len() == 3).then_some(ps)
        });
        let v = application(&api, id);
        for p in &ps {
            assert_eq!(p["volume"], v["volume"], "{p}");
            assert_eq!(p["metadata"]["application"], id, "{p}");
        }
        let js = jobs(&api, id);
        assert!(js.iter().all(|j| j["host"] == host), "{js:?}");
    }

    // Host B goes away: its application turns late, A stays ok.
    b.kill();
    advance(&api, 3600);
    wait_for(120, "host-b offline", || {
        (host_state(&api, "host-b") == "offline").then_some(())
    });
    advance(&api, 3600);
    let late = delivered(&rx, "application.late", "id", idb);
    assert_eq!(late["data"]["host"], "host-b", "{late}");
    assert_eq!(rpo(&api, idb), "late");
    backups_settled(&api, ida, done.0 + 1, &[&a]);
    assert_eq!(rpo(&api, ida), "ok");
    // Signed like every delivery.
    let signed = rx.got.lock().unwrap().iter().all(|(h, _)| {
        h.iter()
            .any(|(k, v)| k == "x-cdm-signature" && v.starts_with("sha256="))
    });
    assert!(signed, "unsigned webhook delivery");

    // It returns: the next backup runs and the application recovers.
    b.restart();
    wait_online(&api, &b);
    let (st, _) = api.call(
        "POST",
        &format!("/v1/applications/{idb}/backups"),
        Some(json!({})),
    );
    assert!(st == 202 || st == 409, "on-demand backup: {st}");
    delivered(&rx, "application.recovered", "id", idb);
    assert_eq!(rpo(&api, idb), "ok");

    // A failing backup: the database is down.
    pa.stop();
    let j = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{ida}/backups"),
        Some(json!({})),
    );
    let jid = j["id"].as_u64().unwrap();
    let j = finished(&api, jid, &[&a, &b]);
    assert_eq!(j["state"], "failed", "{j}");
    let msg = j["message"].as_str().unwrap_or("").to_lowercase();
    assert!(
        msg.contains("connect") || msg.contains("postgres") || msg.contains("socket"),
        "the reason is not said: {j}"
    );
    let failed = delivered(&rx, "job.failed", "id", jid);
    assert_eq!(failed["data"]["application"], ida, "{failed}");
    wait_for(60, "application A failing", || {
        (rpo(&api, ida) == "failing").then_some(())
    });
    let log = api.get(&format!("/v1/jobs/{jid}/log"));
    assert!(
        log["lines"].as_array().is_some_and(|l| !l.is_empty()),
        "the failed job kept no log: {log}"
    );
    let (_, text) = http_text(&app.url(), "/metrics", &app.admin_token());
    assert!(
        text.contains("cdm_application_rpo_state"),
        "no RPO metric in {text}"
    );

    // The database is back: a good backup, and A recovers.
    pa.start();
    let want = psql(&pa.sock, pa.port, STATE);
    let j = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{ida}/backups"),
        Some(json!({})),
    );
    let j = finished(&api, j["id"].as_u64().unwrap(), &[&a, &b]);
    assert_eq!(j["state"], "succeeded", "{j}");
    delivered(&rx, "application.recovered", "id", ida);

    // Host A's newest point restored on host B: B's PostgreSQL answers with
    // A's data.
    let port = pg_port();
    let j = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{ida}/restores"),
        Some(json!({"kind": "instant", "host": "host-b", "name": "a-on-b", "port": port})),
    );
    let j = finished(&api, j["id"].as_u64().unwrap(), &[&a, &b]);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["host"], "host-b", "{j}");
    let r = &j["result"];
    let sock = r["postgres"]["socket_dir"]
        .as_str()
        .or_else(|| r["socket_dir"].as_str())
        .unwrap_or_else(|| panic!("no socket directory in {r}"));
    assert_eq!(psql(std::path::Path::new(sock), port, STATE), want);
    assert_ne!(
        want,
        psql(&pb.sock, pb.port, STATE),
        "A and B hold the same data"
    );
    let out = b.cli(&["detach", "a-on-b", "--delete-clone"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(a);
}

fn http_text(base: &str, path: &str, token: &str) -> (u16, String) {
    match ureq::get(&format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

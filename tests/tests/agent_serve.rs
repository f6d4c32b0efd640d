//! `cdm-agent serve` end to end, against the real snapshotd and a real
//! PostgreSQL: enrolment and the stored credential, heartbeats and the
//! discovery of a running cluster, an on-demand backup job whose point
//! carries the job's metadata, a restart without the token, retirement
//! (exit 4); a cancelled job and an agent killed mid-job (SIGKILL) that
//! both leave no point, their child processes gone, and a correct next
//! run; a `vm` application's backup job (the VMs of its category, each
//! disk a point); an agent at its `--max-jobs` never running more; the
//! log archiver a policy with `archive_logs` starts, watched through the
//! application's `log_archive` (streaming, failing while its server is
//! down, recovered) and stopped with its task or the service. Also
//! what needs no control plane: refused starts (exit 3) and the backups'
//! `--metadata` and stage-volume options the jobs rely on.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cdm_e2e::pg::{psql, Pg};
use cdm_e2e::*;
use serde_json::{json, Value};

/// A `cdm-agent serve` process with its own state directory (its own
/// host identity).
struct ServeAgent {
    state: tempfile::TempDir,
    url: String,
    sock: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl ServeAgent {
    fn new(app: &Appliance) -> ServeAgent {
        ServeAgent::at(app, app.url())
    }

    /// An agent that reaches the appliance at `url`.
    fn at(app: &Appliance, url: String) -> ServeAgent {
        let state = tempfile::Builder::new()
            .prefix("cdm-serve-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let log = state.path().join("agent.log");
        ServeAgent {
            state,
            url,
            sock: app.sock.clone(),
            child: None,
            log,
        }
    }

    fn cmd(&self, serve_args: &[&str]) -> Command {
        let mut c = Command::new(bin("cdm-agent"));
        c.args(["--url", &self.url, "--nbd"])
            .arg(format!("unix:{}", self.sock.display()))
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("serve")
            .args(serve_args)
            .env_remove("CDM_TOKEN")
            .env_remove("CDM_TOKEN_FILE")
            .env_remove("CDM_ENROL_TOKEN")
            .env_remove("CDM_AGENT_CONFIG")
            .env_remove("CDM_CA_FILE")
            .env("RUST_LOG", "info");
        c
    }

    fn start(&mut self, serve_args: &[&str]) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            self.cmd(serve_args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start cdm-agent serve"),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Waits for the service to exit by itself; its exit code.
    fn wait_exit(&mut self) -> i32 {
        let mut c = self.child.take().expect("running");
        let st = wait_for(120, "the agent to exit", || c.try_wait().unwrap());
        st.code().unwrap_or(-1)
    }

    fn signal(&mut self, sig: i32) -> i32 {
        let mut c = self.child.take().expect("running");
        // SAFETY: signals our own child.
        unsafe { libc::kill(c.id() as i32, sig) };
        let st = c.wait().unwrap();
        st.code().unwrap_or(-1)
    }
}

impl Drop for ServeAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // What a killed job left attached.
        let agent = |args: &[&str]| {
            Command::new(bin("cdm-agent"))
                .args(["--url", &self.url, "--state-dir"])
                .arg(self.state.path())
                .arg("--json")
                .args(args)
                .output()
        };
        if let Ok(out) = agent(&["list"]) {
            if let Ok(Value::Array(v)) = serde_json::from_slice::<Value>(&out.stdout) {
                for a in v {
                    if let Some(n) = a["name"].as_str() {
                        let _ = agent(&["detach", n]);
                    }
                }
            }
        }
    }
}

/// The pids whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if f.get(1).and_then(|x| x.parse::<i32>().ok()) == Some(pid) && f[0] != "Z" {
            v.push(p);
        }
    }
    v
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .trim_start()
        .chars()
        .next();
    !matches!(state, None | Some('Z') | Some('X'))
}

fn enrol_token(api: &Api) -> String {
    let v = api.expect(201, "POST", "/v1/hosts/enrolments", Some(json!({})));
    v["token"].as_str().unwrap().to_string()
}

/// The application the agent discovered for `pg`.
fn discovered(api: &Api, host: &str, pg: &Pg) -> Value {
    wait_for(120, "the cluster to be discovered", || {
        let apps = api.get(&format!("/v1/applications?host={host}"));
        apps.as_array()?
            .iter()
            .find(|a| {
                a["kind"] == "postgresql"
                    && a["config"]["port"] == pg.port
                    && a["config"]["host"] == pg.sock.display().to_string()
            })
            .cloned()
    })
}

/// Waits for job `id` to end; on a hang, says where it stood.
fn job_done(api: &Api, id: u64, agent: &ServeAgent) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let j = api.get(&format!("/v1/jobs/{id}"));
        if !matches!(j["state"].as_str(), Some("queued" | "running")) {
            return j;
        }
        if std::time::Instant::now() > deadline {
            let log = api.get(&format!("/v1/jobs/{id}/log"));
            panic!(
                "job {id} did not end: {j}\nits log: {log}\nagent: {}",
                agent.log()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn points(api: &Api, app: u64) -> Vec<Value> {
    api.get(&format!("/v1/applications/{app}/points"))
        .as_array()
        .unwrap()
        .clone()
}

fn host_state(api: &Api, host: &str) -> String {
    api.get(&format!("/v1/hosts/{host}"))["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn serve_refuses_to_start_without_enrolment() {
    let app = Appliance::start(None);
    let mut a = ServeAgent::new(&app);
    // Never enrolled, no token: exit 3 at once, saying what to do.
    a.start(&[]);
    assert_eq!(a.wait_exit(), 3, "{}", a.log());
    assert!(a.log().contains("no enrolment token"), "{}", a.log());
    // A token the appliance does not know: refused, exit 3, no credential.
    a.start(&["--enrol", "cdm_enrol_not_a_token", "--discover", "none"]);
    assert_eq!(a.wait_exit(), 3, "{}", a.log());
    assert!(a.log().contains("refused the enrolment"), "{}", a.log());
    assert!(!a.state.path().join("serve/credential.json").exists());
    // HTTPS with another appliance's CA: refused at once (exit 3), the
    // certificate named as the reason, no credential.
    let other = Appliance::start(None);
    let api = Api::new(&app, &app.admin_token());
    let token = enrol_token(&api);
    let mut b = ServeAgent::at(&app, app.https_url());
    let wrong = other.ca_file();
    b.start(&[
        "--enrol",
        &token,
        "--discover",
        "none",
        "--ca-file",
        wrong.to_str().unwrap(),
    ]);
    assert_eq!(b.wait_exit(), 3, "{}", b.log());
    assert!(b.log().contains("certificate"), "{}", b.log());
    assert!(!b.state.path().join("serve/credential.json").exists());
}

#[test]
fn backups_record_extra_metadata_and_make_stage_volumes_as_asked() {
    let app = Appliance::start(None);
    let api = Api::new(&app, &app.admin_token());
    let state = tempfile::Builder::new()
        .prefix("cdm-agent-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = state.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_file(&src.join("a.txt"), b"hello");
    let agent = |args: &[&str]| {
        let mut c = Command::new(bin("cdm-agent"));
        c.args(["--url", &app.url(), "--token-file"])
            .arg(app.data.join("admin.token"))
            .arg("--nbd")
            .arg(format!("unix:{}", app.sock.display()))
            .arg("--state-dir")
            .arg(state.path())
            .arg("--json")
            .args(args)
            .env_remove("CDM_TOKEN");
        output(&mut c)
    };
    let src_s = src.to_str().unwrap();
    let out = agent(&[
        "backup",
        "files",
        "--volume",
        "meta1",
        "--size",
        "1G",
        "--label",
        "job 7",
        "--metadata",
        r#"{"job": 7, "policy": "gold", "application": 3}"#,
        "--dedup",
        "true",
        "--compression",
        "3",
        "--stage-block-size",
        "16384",
        src_s,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    let id = v["snapshot"].as_u64().unwrap();
    let snap = api.get(&format!("/v1/volumes/meta1/snapshots/{id}"));
    assert_eq!(snap["label"], "job 7");
    let m = &snap["metadata"];
    assert_eq!(
        (
            m["job"].clone(),
            m["policy"].clone(),
            m["application"].clone()
        ),
        (json!(7), json!("gold"), json!(3))
    );
    assert_eq!(
        m["kind"], "files",
        "merged into what the agent records: {m}"
    );
    let vol = api.get("/v1/volumes/meta1");
    assert_eq!(
        (
            vol["dedup"].clone(),
            vol["compression"].clone(),
            vol["block_size"].clone()
        ),
        (json!(true), json!(3), json!(16384))
    );
    // Not an object: refused before anything is done.
    let out = agent(&[
        "backup",
        "files",
        "--volume",
        "meta2",
        "--size",
        "1G",
        "--metadata",
        "[1]",
        src_s,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON object"));
    assert_eq!(api.call("GET", "/v1/volumes/meta2", None).0, 404);
}

#[test]
fn serve_enrols_discovers_and_runs_backup_jobs_until_retired() {
    let app = Appliance::start(None);
    let api = Api::new(&app, &app.admin_token());
    let pg = Pg::init(1);
    // Over HTTPS, the appliance's CA given once and pinned.
    let mut a = ServeAgent::at(&app, app.https_url());
    let token = enrol_token(&api);
    let ca = app.ca_file();
    a.start(&[
        "--enrol",
        &token,
        "--name",
        "db1",
        "--ca-file",
        ca.to_str().unwrap(),
    ]);
    // Online from the first heartbeat (enrolment alone reports nothing).
    wait_for(120, "host db1 online after its first heartbeat", || {
        let (s, v) = api.call("GET", "/v1/hosts/db1", None);
        (s == 200 && v["state"] == "online" && v["capabilities"].as_array()?.len() == 5)
            .then_some(())
    });
    let h = api.get("/v1/hosts/db1");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        h["capabilities"]
            .as_array()
            .unwrap()
            .contains(&json!("postgresql")),
        "{h}"
    );
    assert!(!h["os"].as_str().unwrap_or("").is_empty(), "{h}");
    // The credential: private, and the token is spent.
    let cred = a.state.path().join("serve/credential.json");
    assert_eq!(std::fs::metadata(&cred).unwrap().mode() & 0o777, 0o600);
    let c: Value = serde_json::from_slice(&std::fs::read(&cred).unwrap()).unwrap();
    assert_eq!(c["host"], "db1");
    let pinned = a.state.path().join("serve/ca.crt");
    assert_eq!(std::fs::read(&pinned).unwrap(), std::fs::read(&ca).unwrap());
    // The running cluster, found through /proc and its postmaster.pid.
    let appl = discovered(&api, "db1", &pg);
    assert_eq!(appl["discovered"], true);
    assert_eq!(appl["config"]["pgdata"], pg.data.display().to_string());
    assert!(appl["size_bytes"].as_u64().unwrap() > 1 << 20, "{appl}");
    let app_id = appl["id"].as_u64().unwrap();
    // An on-demand backup: a job the agent runs; its point carries the
    // job's metadata and the backup's LSNs.
    let job = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app_id}/backups"),
        None,
    );
    let job_id = job["id"].as_u64().unwrap();
    let done = job_done(&api, job_id, &a);
    assert_eq!(done["state"], "succeeded", "{done}\n{}", a.log());
    let pts = points(&api, app_id);
    assert_eq!(pts.len(), 1, "{pts:?}");
    let m = &pts[0]["metadata"];
    assert_eq!(m["job"], job_id, "{m}");
    assert_eq!(m["application"], app_id, "{m}");
    assert_eq!(m["kind"], "postgres");
    assert!(m["stop_lsn"].is_string(), "{m}");
    let log = api.get(&format!("/v1/jobs/{job_id}/log"));
    let lines: Vec<&str> = log["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["line"].as_str())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("backup postgres")),
        "{lines:?}"
    );
    // A restart without the token: the stored credential; the next job
    // runs too.
    assert_eq!(a.signal(libc::SIGTERM), 0, "{}", a.log());
    a.start(&[]);
    wait_for(120, "the first heartbeat after the restart", || {
        a.log()
            .matches("first heartbeat acknowledged")
            .nth(1)
            .map(|_| ())
    });
    let job2 = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app_id}/backups"),
        None,
    );
    let done2 = job_done(&api, job2["id"].as_u64().unwrap(), &a);
    assert_eq!(done2["state"], "succeeded", "{done2}\n{}", a.log());
    assert_eq!(points(&api, app_id).len(), 2);
    // Retired: the credential is refused at once, the agent says so and
    // exits 4 (systemd does not restart it).
    api.expect(204, "DELETE", "/v1/hosts/db1", None);
    assert_eq!(a.wait_exit(), 4, "{}", a.log());
    assert!(a.log().contains("retired"), "{}", a.log());
    assert_ne!(host_state(&api, "db1"), "online");
}

/// A `vm` application: its backup job backs up every VM of its category
/// (two of three VMs of an inventory), each disk into a stage volume
/// named after the application's volume, and the job's result is the
/// `vm backup` summary.
#[test]
fn vm_applications_back_up_the_vms_of_their_category() {
    require("qemu-img");
    let app = Appliance::start(None);
    let api = Api::new(&app, &app.admin_token());
    let dir = tempfile::Builder::new()
        .prefix("cdm-serve-vms-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // Raw disks with distinct contents (a category by name needs no
    // operating system in them).
    let mut vms = Vec::new();
    for (n, byte) in [("web1", 0x11u8), ("web2", 0x22), ("db1", 0x33)] {
        let mut data = vec![0u8; 4 << 20];
        for (i, b) in data[..1 << 20].iter_mut().enumerate() {
            *b = byte ^ (i % 251) as u8;
        }
        let img = dir.path().join(format!("{n}.img"));
        write_file(&img, &data);
        vms.push(json!({"name": n, "disks": [img.display().to_string()]}));
    }
    let inv = dir.path().join("vms.json");
    write_file(&inv, json!({ "vm": vms }).to_string().as_bytes());
    let mut a = ServeAgent::new(&app);
    let token = enrol_token(&api);
    a.start(&["--enrol", &token, "--name", "hv1", "--discover", "none"]);
    wait_for(120, "host hv1 online with the vm capability", || {
        let (s, v) = api.call("GET", "/v1/hosts/hv1", None);
        (s == 200 && v["state"] == "online" && v["capabilities"].as_array()?.contains(&json!("vm")))
            .then_some(())
    });
    let appl = api.expect(
        201,
        "POST",
        "/v1/applications",
        Some(json!({
            "host": "hv1",
            "kind": "vm",
            "name": "web",
            "config": {"inventory": inv.display().to_string(), "category": "keyword:web", "parallel": 2},
        })),
    );
    let app_id = appl["id"].as_u64().unwrap();
    let volume = appl["volume"].as_str().unwrap().to_string();
    let job = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app_id}/backups"),
        None,
    );
    let job_id = job["id"].as_u64().unwrap();
    let done = job_done(&api, job_id, &a);
    let log = api.get(&format!("/v1/jobs/{job_id}/log"));
    assert_eq!(
        done["state"],
        "succeeded",
        "{done}
{log}
{}",
        a.log()
    );
    let r = &done["result"];
    assert_eq!(r["category"], "keyword:web", "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    let names: Vec<&str> = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web1", "web2"], "{r}");
    assert!(
        log.to_string().contains("vm backup"),
        "the log says what ran: {log}"
    );
    for (n, byte) in [("web1", 0x11u8), ("web2", 0x22)] {
        let vol = format!("{volume}-{n}-disk0");
        let snaps = api.get(&format!("/v1/volumes/{vol}/snapshots"));
        let snaps = snaps.as_array().unwrap();
        assert_eq!(snaps.len(), 1, "{vol}: {snaps:?}");
        assert_eq!(snaps[0]["metadata"]["vm"]["name"], n, "{}", snaps[0]);
        // The point holds the VM's disk.
        let out = output(
            Command::new("qemu-img")
                .args(["dd", "-f", "raw", "-O", "raw", "bs=4096", "count=1"])
                .arg(format!(
                    "if={}",
                    app.unix_uri(snaps[0]["export"].as_str().unwrap())
                ))
                .arg(format!(
                    "of={}",
                    dir.path().join(format!("{n}.head")).display()
                )),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let head = std::fs::read(dir.path().join(format!("{n}.head"))).unwrap();
        let want: Vec<u8> = (0..4096).map(|i| byte ^ (i % 251) as u8).collect();
        assert_eq!(head, want, "{vol}");
    }
    // The VM outside the category: not backed up.
    assert_eq!(
        api.call("GET", &format!("/v1/volumes/{volume}-db1-disk0"), None)
            .0,
        404
    );
}

/// `--max-jobs 1`: while one job runs the agent does not poll; when it
/// ends, two jobs are queued and the poll asks for one (`slots=1`). The
/// agent never runs two at once: a job handed out beyond its limit is
/// failed with the reason (an appliance that honours `slots` hands it out
/// later instead).
#[test]
fn an_agent_never_runs_more_jobs_than_its_max_jobs() {
    let app = Appliance::start(None);
    let api = Api::new(&app, &app.admin_token());
    let dir = tempfile::Builder::new()
        .prefix("cdm-serve-slots-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = vec![0u8; 24 << 20];
    for b in data.iter_mut() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (x >> 56) as u8;
    }
    let mut a = ServeAgent::new(&app);
    let token = enrol_token(&api);
    a.start(&[
        "--enrol",
        &token,
        "--name",
        "fs1",
        "--discover",
        "none",
        "--max-jobs",
        "1",
    ]);
    wait_for(120, "host fs1 online", || {
        let (s, v) = api.call("GET", "/v1/hosts/fs1", None);
        (s == 200 && v["state"] == "online").then_some(())
    });
    let mut ids = Vec::new();
    for n in ["a", "b", "c"] {
        let d = dir.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        write_file(&d.join("data"), if n == "a" { &data } else { b"small" });
        let v = api.expect(
            201,
            "POST",
            "/v1/applications",
            Some(json!({"host": "fs1", "kind": "files", "name": n,
                "config": {"path": d.display().to_string()}})),
        );
        ids.push(v["id"].as_u64().unwrap());
    }
    api.expect(
        201,
        "POST",
        "/v1/protection-policies",
        Some(json!({
            "name": "slow", "interval_seconds": 86400, "rpo_seconds": 86400 * 2,
            "bandwidth_mibps": 1
        })),
    );
    api.expect(
        200,
        "PUT",
        &format!("/v1/applications/{}/policy", ids[0]),
        Some(json!({"policy": "slow"})),
    );
    let (slow, _) = slow_backup(&api, ids[0], &a);
    let queued: Vec<u64> = ids[1..]
        .iter()
        .map(|id| {
            api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None)["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    api.expect(200, "POST", &format!("/v1/jobs/{slow}/cancel"), None);
    assert_eq!(job_done(&api, slow, &a)["state"], "cancelled");
    let mut succeeded = 0;
    for id in &queued {
        let j = job_done(&api, *id, &a);
        match j["state"].as_str() {
            Some("succeeded") => succeeded += 1,
            _ => assert!(
                j["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("agent at its --max-jobs limit"),
                "{j}\n{}",
                a.log()
            ),
        }
    }
    assert!(succeeded >= 1, "{}", a.log());
    // The agent's own account: each job ended before the next started.
    let log = a.log();
    let mut running = 0;
    for l in log.lines() {
        if l.contains("job started") {
            running += 1;
            assert_eq!(running, 1, "two jobs at once:\n{log}");
        } else if l.contains("job ended") {
            running -= 1;
        }
    }
    assert_eq!(running, 0, "{log}");
}

/// A backup job slow enough to be caught running (1 MiB/s).
fn slow_backup(api: &Api, app_id: u64, agent: &ServeAgent) -> (u64, i32) {
    let job = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app_id}/backups"),
        None,
    );
    let id = job["id"].as_u64().unwrap();
    let child = wait_for(120, "the job's process", || {
        let j = api.get(&format!("/v1/jobs/{id}"));
        assert!(
            matches!(j["state"].as_str(), Some("queued" | "running")),
            "{j}"
        );
        (j["state"] == "running").then_some(())?;
        children(agent.pid()).into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("backup"))
                .unwrap_or(false)
        })
    });
    // The copy is under way: the job's log has the child's first lines.
    wait_for(120, "the job's log", || {
        let log = api.get(&format!("/v1/jobs/{id}/log"));
        (log["lines"].as_array()?.len() >= 2).then_some(())
    });
    (id, child)
}

#[test]
fn cancelled_and_killed_jobs_leave_no_point_and_the_next_run_is_correct() {
    let app = Appliance::start(None);
    let api = Api::new(&app, &app.admin_token());
    let pg = Pg::init(2);
    let mut a = ServeAgent::new(&app);
    let token = enrol_token(&api);
    a.start(&["--enrol", &token, "--name", "db2"]);
    let appl = discovered(&api, "db2", &pg);
    let app_id = appl["id"].as_u64().unwrap();
    api.expect(
        201,
        "POST",
        "/v1/protection-policies",
        Some(json!({
            "name": "slow", "interval_seconds": 86400, "rpo_seconds": 86400 * 2,
            "keep_last": 3, "bandwidth_mibps": 1
        })),
    );
    api.expect(
        200,
        "PUT",
        &format!("/v1/applications/{app_id}/policy"),
        Some(json!({"policy": "slow"})),
    );
    // Cancelled: the child is stopped, the job ends cancelled, no point.
    let (id, child) = slow_backup(&api, app_id, &a);
    api.expect(200, "POST", &format!("/v1/jobs/{id}/cancel"), None);
    let j = job_done(&api, id, &a);
    assert_eq!(j["state"], "cancelled", "{j}\n{}", a.log());
    wait_for(120, "the cancelled job's process to end", || {
        (!alive(child)).then_some(())
    });
    assert!(points(&api, app_id).is_empty());
    // Killed: SIGKILL to the agent takes its job's process with it; no
    // point, and the job fails with the reason once the agent is back.
    let (id, child) = slow_backup(&api, app_id, &a);
    assert_eq!(a.signal(libc::SIGKILL), -1);
    wait_for(120, "the killed agent's job process to end", || {
        (!alive(child)).then_some(())
    });
    assert!(points(&api, app_id).is_empty());
    a.start(&[]);
    let j = job_done(&api, id, &a);
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["message"].as_str().unwrap_or("").contains("restarted"),
        "{j}"
    );
    // The next run is correct: full speed, one point, the data restores.
    api.expect(
        200,
        "PUT",
        &format!("/v1/applications/{app_id}/policy"),
        Some(json!({"policy": null})),
    );
    pg.pgbench(50);
    let state = psql(
        &pg.sock,
        pg.port,
        "SELECT sum(delta), count(*) FROM pgbench_history",
    );
    let job = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app_id}/backups"),
        None,
    );
    let j = job_done(&api, job["id"].as_u64().unwrap(), &a);
    assert_eq!(j["state"], "succeeded", "{j}\n{}", a.log());
    let pts = points(&api, app_id);
    assert_eq!(pts.len(), 1, "{pts:?}");
    // Restored on this host as a clone: the job's result names the socket.
    let r = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app_id}/restores"),
        Some(json!({
            "kind": "clone", "host": "db2", "name": "db2-check", "port": 5999
        })),
    );
    let j = job_done(&api, r["id"].as_u64().unwrap(), &a);
    assert_eq!(j["state"], "succeeded", "{j}\n{}", a.log());
    let res = &j["result"];
    let sock = PathBuf::from(res["socket_dir"].as_str().unwrap());
    assert_eq!(res["host"], res["socket_dir"]);
    assert_eq!(
        psql(
            &sock,
            5999,
            "SELECT sum(delta), count(*) FROM pgbench_history"
        ),
        state
    );
    assert!(Path::new(&sock).exists());
}

/// The table's rows as one digest.
fn ledger(sock: &Path, port: u16) -> String {
    psql(
        sock,
        port,
        "SELECT count(*) || ':' || coalesce(md5(string_agg(id::text, ',' ORDER BY id)), '') FROM ledger",
    )
}

/// `Application.log_archive` of application `id`.
fn log_archive(api: &Api, id: u64) -> Value {
    api.get(&format!("/v1/applications/{id}"))["log_archive"].clone()
}

/// The events of `kind` about application `id`.
fn app_events(api: &Api, kind: &str, id: u64) -> Vec<Value> {
    api.get(&format!("/v1/events?type={kind}&limit=1000"))
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["id"] == id)
        .cloned()
        .collect()
}

/// Waits for the application's archive to be `state` (with its last view).
fn archive_state(api: &Api, id: u64, state: &str, agent: &ServeAgent) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let l = log_archive(api, id);
        if l["state"] == state {
            return l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the archive did not become {state}: {l}\nagent: {}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The pids of `agent`'s log archivers (`cdm-agent … logs …` children).
fn archivers(agent: &ServeAgent) -> Vec<i32> {
    children(agent.pid())
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .any(|a| a == b"logs")
        })
        .collect()
}

#[test]
fn point_in_time_restores_run_as_jobs_and_bad_targets_are_refused() {
    // Heartbeats every 2 s: archive states reach the appliance quickly.
    let app = Appliance::start_with(
        None,
        None,
        &[
            "--pool-size",
            "4G",
            "--pool-sparse",
            "--heartbeat-seconds",
            "2",
        ],
    );
    let api = Api::new(&app, &app.admin_token());
    let pg = Pg::init(1);
    psql(
        &pg.sock,
        pg.port,
        "CREATE TABLE ledger (id int PRIMARY KEY)",
    );
    let mut a = ServeAgent::new(&app);
    let token = enrol_token(&api);
    a.start(&["--enrol", &token, "--name", "db3"]);
    let appl = discovered(&api, "db3", &pg);
    let app_id = appl["id"].as_u64().unwrap();
    let vol = appl["volume"].as_str().unwrap().to_string();
    assert_eq!(appl["log_archive"], Value::Null, "no policy, no archive");
    let restores = format!("/v1/applications/{app_id}/restores");
    let at = |t: &str| json!({"kind": "instant", "target_time": t});
    // Nothing to start from yet.
    api.expect(409, "POST", &restores, Some(at("2026-01-01T00:00:00Z")));
    // Malformed or misplaced targets.
    for body in [
        at("yesterday"),
        at("2026-11-30T10:00:00"),
        json!({"kind": "instant", "target_gtid": "0-1-5"}),
        json!({"kind": "instant", "target_lsn": "16/B374D8480000000000"}),
        json!({"kind": "instant", "target_name": "a'b"}),
        json!({"kind": "regular", "target": "/tmp/x", "target_time": "2026-11-30T10:00:00Z"}),
        json!({"kind": "instant", "snapshot": 1, "target_time": "2026-11-30T10:00:00Z"}),
        json!({"kind": "instant", "target_time": "2026-11-30T10:00:00Z", "target_lsn": "0/1"}),
    ] {
        api.expect(400, "POST", &restores, Some(body));
    }
    // The archiver, started by the appliance through the policy: the
    // agent runs it after the next heartbeat.
    assert!(archivers(&a).is_empty());
    api.expect(
        201,
        "POST",
        "/v1/protection-policies",
        Some(json!({"name": "wal", "interval_seconds": 86400, "rpo_seconds": 86400, "archive_logs": true})),
    );
    assert_eq!(api.get("/v1/protection-policies/wal")["archive_logs"], true);
    api.expect(
        200,
        "PUT",
        &format!("/v1/applications/{app_id}/policy"),
        Some(json!({"policy": "wal"})),
    );
    let l = archive_state(&api, app_id, "streaming", &a);
    let first = l["covered_unix"].as_u64().expect("covered_unix");
    assert!(
        l["covered"].as_str().is_some_and(|c| c.ends_with('Z')),
        "{l}"
    );
    wait_for(120, "the archive's coverage to advance", || {
        (log_archive(&api, app_id)["covered_unix"].as_u64()? > first).then_some(())
    });
    assert_eq!(archivers(&a).len(), 1, "one archiver");
    let status = a
        .state
        .path()
        .join("mnt")
        .join(format!("{vol}-log"))
        .join("status.json");
    let covered = || -> i64 {
        std::fs::read(&status)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["covered_us"].as_i64())
            .unwrap_or(0)
    };
    let job = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app_id}/backups"),
        None,
    );
    let j = job_done(&api, job["id"].as_u64().unwrap(), &a);
    assert_eq!(j["state"], "succeeded", "{j}\n{}", a.log());
    // The point's snapshot time is whole seconds: the target comes after.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    psql(
        &pg.sock,
        pg.port,
        "INSERT INTO ledger SELECT generate_series(1, 100)",
    );
    let t1 = pg.server_time();
    let s1 = ledger(&pg.sock, pg.port);
    std::thread::sleep(std::time::Duration::from_millis(20));
    psql(
        &pg.sock,
        pg.port,
        "INSERT INTO ledger SELECT generate_series(101, 200)",
    );
    let t2 = cdm_api::instant::parse_rfc3339(&pg.server_time()).unwrap();
    wait_for(120, "the archive to cover the workload", || {
        (covered() >= t2).then_some(())
    });
    let r = api.expect(
        202,
        "POST",
        &restores,
        Some(json!({"kind": "clone", "target_time": t1, "name": "pitr-api", "port": 5998})),
    );
    let j = job_done(&api, r["id"].as_u64().unwrap(), &a);
    assert_eq!(j["state"], "succeeded", "{j}\n{}", a.log());
    let sock = PathBuf::from(j["result"]["socket_dir"].as_str().unwrap());
    assert_eq!(ledger(&sock, 5998), s1, "{j}");
    // On another host (disaster recovery): its agent may read the points
    // and the archive while the job runs, and nothing more.
    let mut b = ServeAgent::new(&app);
    let token = enrol_token(&api);
    b.start(&["--enrol", &token, "--name", "dr5"]);
    wait_for(120, "the second host to be online", || {
        let (code, h) = api.call("GET", "/v1/hosts/dr5", None);
        (code == 200 && h["state"] == "online").then_some(())
    });
    let r = api.expect(
        202,
        "POST",
        &restores,
        Some(json!({"kind": "clone", "host": "dr5", "target_time": t1, "name": "pitr-dr", "port": 5997})),
    );
    let j = job_done(&api, r["id"].as_u64().unwrap(), &b);
    assert_eq!(j["state"], "succeeded", "{j}\n{}", b.log());
    let sock = PathBuf::from(j["result"]["socket_dir"].as_str().unwrap());
    assert_eq!(ledger(&sock, 5997), s1, "{j}");
    // The job over, the host's reach is gone.
    let cred: Value = serde_json::from_slice(
        &std::fs::read(b.state.path().join("serve/credential.json")).unwrap(),
    )
    .unwrap();
    let dr = cdm_e2e::http(
        &app.url(),
        "POST",
        &format!("/v1/volumes/{vol}-log/snapshots"),
        cred["credential"].as_str(),
        Some("{}"),
    );
    assert_eq!(dr.0, 403, "{dr:?}");
    // The log volume is the application's: no other application takes it.
    let clash = api.call(
        "POST",
        "/v1/applications",
        Some(json!({"host": "db3", "kind": "files", "name": "clash",
            "config": {"path": "/tmp"}, "volume": format!("{vol}-log")})),
    );
    assert_eq!(clash.0, 409, "{clash:?}");
    // Each restore removed its read of the archive; a host never deletes
    // a point, even of its own application.
    let reads = api.get(&format!("/v1/volumes/{vol}-log/snapshots"));
    assert_eq!(reads.as_array().map(Vec::len), Some(0), "{reads}");
    let own: Value = serde_json::from_slice(
        &std::fs::read(a.state.path().join("serve/credential.json")).unwrap(),
    )
    .unwrap();
    let first_point = points(&api, app_id)[0]["snapshot"].as_u64().unwrap();
    let del = cdm_e2e::http(
        &app.url(),
        "DELETE",
        &format!("/v1/volumes/{vol}/snapshots/{first_point}"),
        own["credential"].as_str(),
        None,
    );
    assert_eq!(del.0, 403, "{del:?}");
    // Before the first point: refused by the appliance, with where the
    // range starts; after the archive: the job fails with the range.
    let (code, body) = api.call("POST", &restores, Some(at("2001-01-01T00:00:00Z")));
    assert_eq!(code, 400, "{body}");
    assert!(
        body.to_string().contains("before the first point"),
        "{body}"
    );
    let r = api.expect(202, "POST", &restores, Some(at("2999-01-01T00:00:00Z")));
    let j = job_done(&api, r["id"].as_u64().unwrap(), &a);
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j.to_string().contains("after the last archived WAL"), "{j}");
    // The server stops: the archive fails, says why, and an event says it.
    let before = archivers(&a);
    pg.stop();
    let l = archive_state(&api, app_id, "failing", &a);
    assert!(l["error"].as_str().is_some_and(|e| !e.is_empty()), "{l}");
    wait_for(60, "log_archive.failing", || {
        app_events(&api, "log_archive.failing", app_id)
            .first()
            .cloned()
    });
    assert!(app_events(&api, "log_archive.recovered", app_id).is_empty());
    // It starts again: streaming, recovered, covering what is new.
    pg.start();
    archive_state(&api, app_id, "streaming", &a);
    let e = wait_for(60, "log_archive.recovered", || {
        app_events(&api, "log_archive.recovered", app_id)
            .first()
            .cloned()
    });
    assert_eq!(e["data"]["state"], "streaming", "{e}");
    assert_eq!(app_events(&api, "log_archive.failing", app_id).len(), 1);
    let now = cdm_api::instant::parse_rfc3339(&pg.server_time()).unwrap();
    wait_for(120, "the archive to cover the restarted server", || {
        (covered() >= now).then_some(())
    });
    // The policy stops archiving: the agent stops its archiver.
    let mut p = api.get("/v1/protection-policies/wal");
    p["archive_logs"] = json!(false);
    api.expect(200, "PUT", "/v1/protection-policies/wal", Some(p));
    wait_for(120, "the archiver to stop", || {
        archivers(&a).is_empty().then_some(())
    });
    assert_eq!(log_archive(&api, app_id), Value::Null);
    for p in before {
        assert!(!alive(p), "archiver {p} outlived its task");
    }
    // Archiving again, then the agent stops: its archiver ends with it.
    p = api.get("/v1/protection-policies/wal");
    p["archive_logs"] = json!(true);
    api.expect(200, "PUT", "/v1/protection-policies/wal", Some(p));
    archive_state(&api, app_id, "streaming", &a);
    let pids = archivers(&a);
    assert_eq!(pids.len(), 1, "one archiver");
    let streamers: Vec<i32> = pids.iter().flat_map(|p| children(*p)).collect();
    assert_eq!(a.signal(libc::SIGTERM), 0, "{}", a.log());
    for p in pids.iter().chain(&streamers) {
        assert!(!alive(*p), "process {p} outlived the agent service");
    }
}

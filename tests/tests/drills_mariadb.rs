//! Recovery drills of a MariaDB application (`docs/control-plane.md`,
//! "Drills") end to end: the real snapshotd, a real `cdm-agent serve`
//! that discovered a real MariaDB 10.11, a backup point. A drill whose
//! probe reads the bank's constant total passes every check (start,
//! `mariadb-check`, probe, scrub) with its RTO and RPO; a probe that does
//! not match fails the drill and is named; a point whose table's `.ibd`
//! got a page overwritten fails `mariadb-check`. Nothing is left behind:
//! no clone, no attachment, no `mariadbd` on a drill's copy.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use cdm_e2e::maria::*;
use cdm_e2e::*;
use serde_json::{json, Value};

mod control_util;
use cdm_e2e::maria::Agent;
use control_util::*;

/// A `cdm-agent serve` child, killed when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_of(agent: &Agent) -> String {
    std::fs::read_to_string(agent.state.path().join("serve.log")).unwrap_or_default()
}

/// Waits for job `id` to end (not failed: a failed drill is a report).
fn job_done(api: &Api, id: u64, agent: &Agent) -> Value {
    let j = wait_for(900, &format!("job {id} to end"), || {
        let j = job(api, id);
        (!matches!(j["state"].as_str(), Some("queued" | "running"))).then_some(j)
    });
    assert_ne!(j["state"], "failed", "{j}\n{}", log_of(agent));
    j
}

/// Starts a drill and waits for its report.
fn drill(api: &Api, app: u64, body: Value, agent: &Agent) -> Value {
    let j = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app}/drills"),
        Some(body),
    );
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

/// The pids of `mariadbd` processes whose command line names a drill's
/// copy (`…/mnt/drill-…`).
fn drill_servers() -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("mariadbd") && cmd.contains("/mnt/drill-") {
            pids.push(pid);
        }
    }
    pids
}

/// No drill clone on the appliance, no drill attachment, mount or server
/// on the host.
fn nothing_left(api: &Api, agent: &Agent) {
    wait_for(120, "drill clones to be deleted", || {
        let c = api.get("/v1/clones");
        let left = c
            .as_array()?
            .iter()
            .any(|v| v["name"].as_str().is_some_and(|n| n.starts_with("drill-")));
        (!left).then_some(())
    });
    let att = agent.ok(&["list"]);
    assert!(
        att.as_array()
            .unwrap()
            .iter()
            .all(|a| !a["name"].as_str().unwrap_or("").starts_with("drill-")),
        "attachments left: {att}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("/mnt/drill-"), "mounts left:\n{mounts}");
    assert_eq!(drill_servers(), Vec::<u32>::new(), "mariadbd left running");
}

/// Overwrites 4 KiB in the middle of page 100 of an InnoDB tablespace:
/// the page's checksum no longer matches, which a full read finds.
fn damage(ibd: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(ibd).unwrap();
    f.seek(SeekFrom::Start(100 * 16384 + 4096)).unwrap();
    f.write_all(&[0xa5; 4096]).unwrap();
    f.sync_all().unwrap();
}

/// A snapshot of a clone of `vol@snap` (named `name`) whose `filler`
/// table was damaged through a mount of it.
fn damaged_point(api: &Api, agent: &Agent, vol: &str, snap: u64, name: &str) -> u64 {
    api.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots/{snap}/clones"),
        Some(json!({"name": name})),
    );
    let mnt = agent.state.path().join(format!("alter-{name}"));
    let att = format!("alter-{name}");
    let m = mnt.display().to_string();
    agent.ok(&["attach", name, "--name", &att, "--mount", &m]);
    damage(&mnt.join("mariadb/bank/filler.ibd"));
    agent.ok(&["detach", &att]);
    snapshot(api, name, json!({"label": name}))
}

#[test]
fn mariadb_drills_prove_good_points_and_fail_wrong_and_damaged_ones() {
    let _load = shared();
    let (a, api) = start(&[]);
    let agent = Agent::new(&a);
    let m = Maria::init();
    let t = token(&api, json!({}));
    let _serve = Serve(
        Command::new(bin("cdm-agent"))
            .args(["--url", &agent.url, "--nbd"])
            .arg(format!("unix:{}", agent.sock.display()))
            .arg("--state-dir")
            .arg(agent.state.path())
            .args([
                "serve",
                "--enrol",
                &t,
                "--name",
                "mdrill",
                "--discover",
                "mariadb",
            ])
            .env_remove("CDM_TOKEN")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(agent.state.path().join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let appl = wait_for(120, "the server to be discovered", || {
        api.get("/v1/applications?host=mdrill")
            .as_array()?
            .iter()
            .find(|x| x["kind"] == "mariadb" && x["name"] == m.data.display().to_string())
            .cloned()
    });
    let app = appl["id"].as_u64().unwrap();
    run_script(&m.sock, &transfers(5, 100));
    let j = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{app}/backups"),
        None,
    );
    let j = job_done(&api, j["id"].as_u64().unwrap(), &agent);
    assert_eq!(j["state"], "succeeded", "{j}");
    let pts = api.get(&format!("/v1/applications/{app}/points"));
    let snap = pts[0]["snapshot"].as_u64().unwrap();
    let total = (OPENING * ACCOUNTS as i64).to_string();

    // A good point: the server starts isolated, every table checks, the
    // bank's total is the constant it opened with.
    let sum = "SELECT SUM(bal) FROM bank.acct";
    let d = drill(
        &api,
        app,
        json!({"probes": [{"sql": sum, "expect": format!("= {total}")}]}),
        &agent,
    );
    assert_eq!(d["passed"], true, "{d:#}\n{}", log_of(&agent));
    assert_eq!(d["snapshot"].as_u64(), Some(snap));
    assert!(
        d["rto_seconds"].as_f64().expect("rto measured") > 0.0,
        "{d}"
    );
    assert!(d["rpo_seconds"].is_u64(), "{d}");
    for c in ["start", "mariadb-check", "scrub"] {
        assert_eq!(check(&d, c)["passed"], true, "{c}: {d:#}");
    }
    let mc = check(&d, "mariadb-check")["output"].as_str().unwrap();
    assert!(mc.contains("tables checked"), "{mc}");
    let p = check(&d, &format!("probe: {sum}"));
    assert_eq!(p["passed"], true, "{p}");
    assert!(p["output"].as_str().unwrap().contains(&total), "{p}");
    nothing_left(&api, &agent);

    // A probe that does not match fails the drill, named; the rest pass.
    let count = "SELECT COUNT(*) FROM acct";
    let d = drill(
        &api,
        app,
        json!({"probes": [{"sql": count, "database": "bank", "expect": "= 5"}]}),
        &agent,
    );
    assert_eq!(d["passed"], false, "{d:#}");
    let p = check(&d, &format!("probe: {count}"));
    assert_eq!(p["passed"], false, "{p}");
    assert!(
        p["output"]
            .as_str()
            .unwrap()
            .contains(&format!("\"{ACCOUNTS}\"")),
        "{p}"
    );
    assert_eq!(check(&d, "mariadb-check")["passed"], true, "{d:#}");
    assert_eq!(check(&d, "start")["passed"], true, "{d:#}");
    nothing_left(&api, &agent);

    // A damaged point: mariadb-check finds the page.
    let vol = d["volume"].as_str().unwrap().to_string();
    let bad = damaged_point(&api, &agent, &vol, snap, "damaged");
    let d = drill(&api, app, json!({"snapshot": bad}), &agent);
    assert_eq!(d["passed"], false, "{d:#}");
    assert_eq!(d["snapshot"].as_u64(), Some(bad));
    let mc = check(&d, "mariadb-check");
    assert_eq!(mc["passed"], false, "{d:#}");
    assert!(
        mc["output"].as_str().unwrap().contains("filler"),
        "{d:#}\n{}",
        log_of(&agent)
    );
    nothing_left(&api, &agent);

    // The application's own point was never touched.
    let pts = api.get(&format!("/v1/applications/{app}/points"));
    assert_eq!(pts.as_array().unwrap().len(), 1, "{pts}");
    assert_eq!(pts[0]["snapshot"].as_u64(), Some(snap));
}

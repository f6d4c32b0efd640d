//! cdm-agent and a real MariaDB 10.11 (a throwaway server, never the
//! system service): a full backup and three incrementals taken while a
//! bank workload runs (transfers with a constant total, a gapless
//! journal), every point restored instantly and found at exactly its
//! consistency point, two clones that diverge, a regular restore; and
//! the faults: MariaDB down, wrong password, a stage disk too small, a
//! prepare that fails — a clear error, no point, the previous one intact.

use std::path::{Path, PathBuf};

use cdm_e2e::maria::*;
use cdm_e2e::*;
use serde_json::Value;

fn backup(agent: &Agent, m: &Maria, volume: &str, extra: &[&str]) -> Value {
    let mut args = vec!["backup", "mariadb", "--volume", volume];
    args.extend(extra);
    let conn = m.agent_args();
    args.extend(conn.iter().map(String::as_str));
    agent.ok(&args)
}

fn meta(app: &Appliance, volume: &str, id: u64) -> Value {
    Api::new(app, &app.admin_token()).get(&format!("/v1/volumes/{volume}/snapshots/{id}"))
        ["metadata"]
        .clone()
}

/// Starts a clone (instant or named) of `snap`; its socket.
fn start_clone(agent: &Agent, how: &str, snap: &str, name: &str) -> PathBuf {
    let v = agent.ok(&["restore", how, snap, "--name", name, "--port", "3399"]);
    assert_eq!(v["bytes_copied"], 0);
    PathBuf::from(v["mariadb"]["socket"].as_str().expect("socket"))
}

/// What a point must show: the journal's length that its GTID implies
/// (each transfer is one transaction, nothing else writes the binlog),
/// the same first transfers as the source, and the bank's invariants.
struct Expect {
    journal: u64,
    digest: String,
}

fn check_point(sock: &Path, e: &Expect) {
    let n = check_bank(sock);
    assert_eq!(n, e.journal, "journal length at the point");
    assert_eq!(journal_digest(sock, n), e.digest);
}

#[test]
fn mariadb_full_and_incrementals_restore_to_their_points() {
    let _load = shared();
    let app = Appliance::start(None);
    let agent = Agent::new(&app);
    let m = Maria::init();
    // Quiet now: journal length and GTID move together from here on.
    let (j0, g0) = (check_bank(&m.sock), m.gtid_seq());
    let mut points: Vec<(String, u64)> = Vec::new();
    let mut full_delta = 0;
    let mut last_id = 0;
    for round in 0..4u64 {
        let before = check_bank(&m.sock);
        let wl = Workload::start(&m, round + 1);
        // The backup starts while transfers commit.
        wait_for(120, "the workload to commit", || {
            (sql(&m.sock, "SELECT COUNT(*) FROM journal")
                .parse::<u64>()
                .ok()?
                > before)
                .then_some(())
        });
        let size: &[&str] = if round == 0 { &["--size", "2G"] } else { &[] };
        let v = backup(&agent, &m, "mstage", size);
        eprintln!("point {round}: {v}");
        wl.stop();
        let id = v["snapshot"].as_u64().unwrap();
        let md = meta(&app, "mstage", id);
        assert_eq!(md["kind"], "mariadb");
        let gtid = md["binlog"]["gtid"].as_str().expect("GTID in metadata");
        assert!(md["binlog"]["file"]
            .as_str()
            .unwrap()
            .starts_with("binlog."));
        assert!(md["binlog"]["position"].as_u64().unwrap() > 0);
        assert!(
            md["checkpoints"]["to_lsn"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 0
        );
        let delta = v["delta_bytes"].as_u64().unwrap();
        if round == 0 {
            assert_eq!(v["backup"], "full", "{v}");
            full_delta = delta;
        } else {
            assert_eq!(v["backup"], "incremental", "{v}");
            assert_eq!(md["base_snapshot"].as_u64(), Some(last_id), "{md}");
            assert!(delta < full_delta, "delta {delta} vs full {full_delta}");
        }
        last_id = id;
        let seq = gtid_seq(gtid);
        // Transfers committed between two points.
        assert!(seq > points.last().map_or(g0, |p| p.1), "{md}");
        points.push((v["export"].as_str().unwrap().to_string(), seq));
    }
    // The source moves on; every point still shows its own state.
    Workload::start(&m, 99).stop();
    let expect = |seq: u64| {
        let journal = j0 + (seq - g0);
        Expect {
            journal,
            digest: journal_digest(&m.sock, journal),
        }
    };
    for (i, (snap, seq)) in points.iter().enumerate() {
        let name = format!("inst{i}");
        let t = std::time::Instant::now();
        let sock = start_clone(&agent, "instant", snap, &name);
        eprintln!("instant restore of {snap}: {:?}", t.elapsed());
        check_point(&sock, &expect(*seq));
        agent.ok(&["detach", &name, "--delete-clone"]);
    }
    // Two clones of one point diverge.
    let (snap, seq) = &points[2];
    let sa = start_clone(&agent, "clone", snap, "dev-a");
    let sb = start_clone(&agent, "clone", snap, "dev-b");
    run_script(&sa, &transfers(7, 50));
    sql(
        &sb,
        "DELETE FROM journal WHERE seq > 10; CREATE TABLE only_b (x INT)",
    );
    let e = expect(*seq);
    // (A clone's AUTO_INCREMENT resumes past ids that transactions
    // rolled back at the point had taken: InnoDB never hands them out
    // again, so the clone's new rows are not gapless; the total is kept.)
    assert_eq!(
        sql(
            &sa,
            "SELECT (SELECT COUNT(*) FROM journal), (SELECT SUM(bal) FROM acct)"
        ),
        format!("{}\t{}", e.journal + 50, OPENING * ACCOUNTS as i64)
    );
    assert_eq!(sql(&sb, "SELECT COUNT(*) FROM journal"), "10");
    assert_eq!(
        sql(
            &sa,
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'only_b'"
        ),
        "0"
    );
    agent.ok(&["detach", "dev-a", "--delete-clone"]);
    agent.ok(&["detach", "dev-b", "--delete-clone"]);
    // The point itself never changed.
    let sock = start_clone(&agent, "instant", snap, "again");
    check_point(&sock, &e);
    agent.ok(&["detach", "again", "--delete-clone"]);
    // Regular restore: a copy in a fresh directory that starts and matches.
    let target = tempfile::Builder::new()
        .prefix("cdm-restore-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (snap, seq) = &points[3];
    let v = agent.ok(&[
        "restore",
        "regular",
        snap,
        "--target",
        target.path().to_str().unwrap(),
        "--start-port",
        "3398",
    ]);
    assert!(v["bytes_copied"].as_u64().unwrap() > 20 << 20, "{v}");
    let sock = PathBuf::from(v["mariadb"]["socket"].as_str().unwrap());
    assert!(sock.starts_with(target.path()));
    check_point(&sock, &expect(*seq));
    let pid = std::fs::read_to_string(target.path().join("run/mariadbd.pid")).unwrap();
    // SAFETY: kill(2) on the server the restore started.
    unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGTERM) };
    wait_for(120, "the restored server to stop", || {
        (!Path::new(&format!("/proc/{}", pid.trim())).exists()).then_some(())
    });
}

#[test]
fn tables_created_between_backups_come_with_the_next_incremental() {
    // mariadb-backup's incremental prepare *moves* the files of tables
    // created since the base into the data directory (rename(2)): the
    // delta must live on the stage disk's filesystem, or the prepare fails
    // with EXDEV and no incremental can ever succeed again.
    let _load = shared();
    let app = Appliance::start(None);
    let agent = Agent::new(&app);
    let m = Maria::init();
    let full = backup(&agent, &m, "newt", &["--size", "2G"]);
    assert_eq!(full["backup"], "full", "{full}");
    sql(
        &m.sock,
        "CREATE TABLE bank.fresh (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB; \
         INSERT INTO bank.fresh VALUES (1, 'one'), (2, 'two')",
    );
    let inc = backup(&agent, &m, "newt", &[]);
    assert_eq!(inc["backup"], "incremental", "{inc}");
    let sock = start_clone(&agent, "instant", inc["export"].as_str().unwrap(), "fresh");
    assert_eq!(
        sql(&sock, "SELECT GROUP_CONCAT(v ORDER BY id) FROM bank.fresh"),
        "one,two"
    );
    agent.ok(&["detach", "fresh", "--delete-clone"]);
    // The delta does not stay on the stage disk (nor in the point).
    let a = agent.ok(&[
        "attach",
        inc["export"].as_str().unwrap(),
        "--name",
        "look",
        "--read-only",
    ]);
    let mnt = PathBuf::from(a["mount"].as_str().unwrap());
    assert!(mnt.join("mariadb").exists());
    assert!(!mnt.join(".cdm-mariadb-delta").exists());
    agent.ok(&["detach", "look"]);
}

/// A directory whose `mariadb-backup` damages the delta it is asked to
/// apply (the first `.delta` file's header) and then runs the real one:
/// a prepare that fails on a damaged scratch.
fn damaging_prepare(dir: &Path) -> String {
    let script = dir.join("mariadb-backup");
    std::fs::write(
        &script,
        "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in --incremental-dir=*)\n  \
         f=$(find \"${a#--incremental-dir=}\" -name '*.delta' | head -n 1)\n  \
         printf JUNK | dd of=\"$f\" bs=1 conv=notrunc 2>/dev/null;;\nesac; done\n\
         exec /usr/bin/mariadb-backup \"$@\"\n",
    )
    .unwrap();
    sh(&format!("chmod 755 {}", script.display()));
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn mariadb_faults_fail_clearly_and_keep_the_previous_point() {
    let _load = shared();
    let app = Appliance::start(None);
    let agent = Agent::new(&app);
    let mut m = Maria::init();
    let conn = m.agent_args();
    let with_conn = |a: &[&str]| -> Vec<String> {
        a.iter()
            .map(|s| s.to_string())
            .chain(conn.iter().cloned())
            .collect()
    };
    let fail = |a: &[String]| agent.fail(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let snapshots = |v: &str| {
        Api::new(&app, &app.admin_token()).get(&format!("/v1/volumes/{v}"))["snapshots"].clone()
    };

    // A dedicated backup user with the documented privileges works; the
    // wrong password is refused before anything is made.
    m.sql(
        "CREATE USER bk@localhost IDENTIFIED BY 'right'; \
         GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO bk@localhost",
    );
    let pw = agent.state.path().join("pw");
    std::fs::write(&pw, "wrong\n").unwrap();
    let as_bk = |size: &str| {
        with_conn(&[
            "backup",
            "mariadb",
            "--volume",
            "mf",
            "--size",
            size,
            "--user",
            "bk",
            "--password-file",
            pw.to_str().unwrap(),
        ])
    };
    let e = fail(&as_bk("1G"));
    assert!(e.contains("Access denied") && e.contains("bk"), "{e}");
    assert_eq!(app.cdmctl(&["volume", "show", "mf"]).status.code(), Some(4));
    std::fs::write(&pw, "right\n").unwrap();
    let first = agent.ok(&as_bk("1G").iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(first["backup"], "full");
    let at_first = check_bank(&m.sock);

    // Not enough space on the stage disk: a clear error, no point.
    let e = fail(&with_conn(&[
        "backup", "mariadb", "--volume", "tiny", "--size", "48M",
    ]));
    assert!(
        e.contains("no point taken") && e.contains("No space left"),
        "{e}"
    );
    assert_eq!(snapshots("tiny"), 0);
    assert_eq!(agent.ok(&["list"]), Value::Array(vec![]));

    // A prepare that fails on a damaged delta: no point, the previous
    // one intact, and the next backup a full one (the stage disk is not
    // the last point any more).
    Workload::start(&m, 5).stop();
    run_script(&m.sock, &transfers(11, 300));
    let bin = tempfile::tempdir().unwrap();
    let path = damaging_prepare(bin.path());
    let out = output(
        agent
            .cmd(
                &with_conn(&["backup", "mariadb", "--volume", "mf"])
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
            .env("PATH", &path),
    );
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("--prepare failed") && e.contains("no point taken"),
        "{e}"
    );
    assert_eq!(snapshots("mf"), 1);
    let sock = start_clone(&agent, "instant", first["export"].as_str().unwrap(), "kept");
    assert_eq!(check_bank(&sock), at_first);
    agent.ok(&["detach", "kept", "--delete-clone"]);
    let first_id = first["snapshot"].as_u64().unwrap();
    assert!(
        e.contains(&format!("rolled back to point {first_id}")),
        "{e}"
    );
    let now = check_bank(&m.sock);
    let next = backup(&agent, &m, "mf", &[]);
    assert_eq!(next["backup"], "incremental", "{next}");
    let next_id = next["snapshot"].as_u64().unwrap();
    assert_eq!(meta(&app, "mf", next_id)["base_snapshot"], first_id);
    let sock = start_clone(&agent, "instant", next["export"].as_str().unwrap(), "next");
    assert_eq!(check_bank(&sock), now);
    agent.ok(&["detach", "next", "--delete-clone"]);
    // And the one after it incremental again.
    run_script(&m.sock, &transfers(12, 100));
    assert_eq!(backup(&agent, &m, "mf", &[])["backup"], "incremental");

    // The revert route: not this volume's snapshot (404), refused while
    // the volume is attached (409), and what it does once it is not.
    let api = Api::new(&app, &app.admin_token());
    let revert = |status: u16, snap: u64| {
        api.expect(
            status,
            "POST",
            "/v1/volumes/mf/revert",
            Some(serde_json::json!({"snapshot": snap})),
        )
    };
    let other = agent.ok(
        &with_conn(&["backup", "mariadb", "--volume", "mf2", "--size", "1G"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    revert(404, other["snapshot"].as_u64().unwrap());
    revert(404, 999_999);
    let mnt = agent.state.path().join("mf-mnt");
    agent.ok(&[
        "attach",
        "mf",
        "--name",
        "mfa",
        "--mount",
        mnt.to_str().unwrap(),
    ]);
    let busy = revert(409, first_id);
    assert!(
        busy["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exported"),
        "{busy}"
    );
    agent.ok(&["detach", "mfa"]);
    let v = revert(200, first_id);
    assert_eq!(v["name"], "mf", "{v}");
    // The stage disk is the first point again, not the newest one.
    let next = backup(&agent, &m, "mf", &[]);
    assert_eq!(next["backup"], "full", "{next}");
    assert!(
        next["why_full"].as_str().unwrap().contains("is not point"),
        "{next}"
    );

    // MariaDB down: a clear error, nothing made.
    m.stop();
    let e = fail(&with_conn(&[
        "backup", "mariadb", "--volume", "never", "--size", "1G",
    ]));
    assert!(
        e.contains("cannot query MariaDB") && e.contains("mysqld.sock"),
        "{e}"
    );
    assert_eq!(
        app.cdmctl(&["volume", "show", "never"]).status.code(),
        Some(4)
    );
    assert_eq!(snapshots("mf"), 4);
}

/// A `cdm-agent serve` child, killed when dropped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for job `id` to end.
fn job_done(api: &Api, id: u64, log: &Path) -> Value {
    let j = wait_for(600, "the job to end", || {
        let j = api.get(&format!("/v1/jobs/{id}"));
        (!matches!(j["state"].as_str(), Some("queued" | "running"))).then_some(j)
    });
    assert_eq!(
        j["state"],
        "succeeded",
        "{j}\nagent: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    j
}

#[test]
fn serve_discovers_mariadb_and_runs_its_backup_and_restore_jobs() {
    let _load = shared();
    let app = Appliance::start(None);
    let api = Api::new(&app, &app.admin_token());
    let agent = Agent::new(&app);
    let m = Maria::init();
    let token = api.expect(
        201,
        "POST",
        "/v1/hosts/enrolments",
        Some(serde_json::json!({})),
    )["token"]
        .as_str()
        .unwrap()
        .to_string();
    let log = agent.state.path().join("serve.log");
    let _serve = Serve(
        std::process::Command::new(bin("cdm-agent"))
            .args(["--url", &agent.url, "--nbd"])
            .arg(format!("unix:{}", agent.sock.display()))
            .arg("--state-dir")
            .arg(agent.state.path())
            .args([
                "serve",
                "--enrol",
                &token,
                "--name",
                "mhost",
                "--discover",
                "mariadb",
            ])
            .env_remove("CDM_TOKEN")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The running server, found through /proc: its data directory and
    // the socket of its command line.
    let appl = wait_for(120, "the server to be discovered", || {
        api.get("/v1/applications?host=mhost")
            .as_array()?
            .iter()
            .find(|a| a["kind"] == "mariadb" && a["name"] == m.data.display().to_string())
            .cloned()
    });
    assert_eq!(appl["config"]["socket"], m.sock.display().to_string());
    assert!(appl["size_bytes"].as_u64().unwrap() > 10 << 20, "{appl}");
    let id = appl["id"].as_u64().unwrap();
    // Two on-demand backups: a full, then an incremental onto it.
    for (round, want) in ["full", "incremental"].iter().enumerate() {
        run_script(&m.sock, &transfers(40 + round as u64, 100));
        let j = api.expect(202, "POST", &format!("/v1/applications/{id}/backups"), None);
        let job = j["id"].as_u64().unwrap();
        job_done(&api, job, &log);
        let pts = api.get(&format!("/v1/applications/{id}/points"));
        let pts = pts.as_array().unwrap();
        assert_eq!(pts.len(), round + 1);
        let md = &pts.iter().find(|p| p["metadata"]["job"] == job).unwrap()["metadata"];
        assert_eq!(md["kind"], "mariadb");
        assert_eq!(md["backup"], *want, "{md}");
        assert_eq!(md["application"], id);
    }
    let journal = check_bank(&m.sock);
    // A clone restore job: its result names the clone's socket.
    let r = api.expect(
        202,
        "POST",
        &format!("/v1/applications/{id}/restores"),
        Some(serde_json::json!({"kind": "clone", "host": "mhost", "name": "mclone"})),
    );
    let j = job_done(&api, r["id"].as_u64().unwrap(), &log);
    let sock = PathBuf::from(j["result"]["socket"].as_str().expect("socket"));
    assert_eq!(check_bank(&sock), journal);
    agent.ok(&["detach", "mclone", "--delete-clone"]);
}

//! Point-in-time recovery of a real PostgreSQL 15: `cdm-agent logs
//! postgres` streams the WAL (pg_receivewal through a slot) into the log
//! volume while batches commit across two backups; the state is recorded
//! at several moments (server time, LSN, a named restore point), and each
//! is restored — from the nearest earlier point, WAL replayed to the
//! target — and compared exactly. A target before the first point or
//! after the archive is refused with the range; a missing segment is
//! named and never replayed past, while targets before it still restore.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cdm_e2e::maria::Agent;
use cdm_e2e::pg::*;
use cdm_e2e::*;
use serde_json::Value;

/// What the table holds: rows and a digest of them.
fn state(sock: &Path, port: u16) -> String {
    psql(
        sock,
        port,
        "SELECT count(*) || ':' || coalesce(md5(string_agg(id || '=' || v, ',' ORDER BY id)), '') FROM ledger",
    )
    .trim()
    .to_string()
}

/// One committed batch in a WAL segment of its own, so a test can remove
/// exactly one batch's segment; the LSN right after its commit.
fn batch(pg: &Pg, n: u32) -> String {
    psql(
        &pg.sock,
        pg.port,
        &format!(
            "INSERT INTO ledger SELECT g, 'batch{n}-' || g FROM generate_series({}, {}) g",
            n * 1000,
            n * 1000 + 99
        ),
    );
    let lsn = psql(&pg.sock, pg.port, "SELECT pg_current_wal_lsn()")
        .trim()
        .to_string();
    psql(&pg.sock, pg.port, "SELECT pg_switch_wal()");
    lsn
}

/// A moment recorded: its time, the LSN of the last commit, the state.
struct Moment {
    time: String,
    lsn: String,
    state: String,
}

fn moment(pg: &Pg, lsn: String) -> Moment {
    // Strictly after the last commit, strictly before the next one.
    std::thread::sleep(Duration::from_millis(20));
    let m = Moment {
        time: pg.server_time(),
        lsn,
        state: state(&pg.sock, pg.port),
    };
    std::thread::sleep(Duration::from_millis(20));
    m
}

struct Archiver(Option<Child>);

impl Archiver {
    fn start(agent: &Agent, pg: &Pg) -> Archiver {
        let mut args = vec![
            "logs",
            "postgres",
            "--volume",
            "pg",
            "--prune-interval",
            "1",
        ];
        let conn = pg.agent_args();
        args.extend(conn.iter().map(String::as_str));
        let log = std::fs::File::create(agent.state.path().join("archiver.out")).unwrap();
        let c = agent
            .cmd(&args)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Archiver(Some(c))
    }

    /// SIGTERM, and the archiver's own clean exit (it detaches the log
    /// volume).
    fn stop(mut self) {
        let c = self.0.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let out = wait_output(c, "archiver");
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// The archive's status as the running archiver wrote it.
fn covered(agent: &Agent) -> Option<String> {
    let p: PathBuf = agent.state.path().join("mnt/pg-log/status.json");
    let v: Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    v["covered_us"].as_i64().map(|us| us.to_string())
}

/// Waits until the archive vouches for everything up to `m`.
fn wait_covered(agent: &Agent, m: &Moment) {
    let want = time_us(&m.time);
    let t = Instant::now();
    loop {
        if covered(agent).and_then(|c| c.parse::<i64>().ok()) >= Some(want) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the archive never covered {}: {}",
            m.time,
            std::fs::read_to_string(agent.state.path().join("archiver.out")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn time_us(t: &str) -> i64 {
    cdm_api::instant::parse_rfc3339(t).expect("time")
}

/// Restores to a target, checks the state, drops the clone; the result.
fn restore_to(agent: &Agent, flag: &str, target: &str, want: &str, name: &str) -> Value {
    let port = pg_port();
    let v = agent.ok(&[
        "restore",
        "pitr",
        "pg",
        flag,
        target,
        "--name",
        name,
        "--port",
        &port.to_string(),
    ]);
    let sock = PathBuf::from(v["postgres"]["socket_dir"].as_str().expect("socket"));
    assert_eq!(state(&sock, port), want, "restored to {flag} {target}: {v}");
    // Promoted: a writable database, not a standby.
    assert_eq!(psql(&sock, port, "SELECT pg_is_in_recovery()").trim(), "f");
    agent.ok(&["detach", name, "--delete-clone"]);
    v
}

#[test]
fn postgres_restores_to_times_lsns_and_restore_points() {
    let _load = shared();
    let app = Appliance::start(None);
    let agent = Agent::new(&app);
    let pg = Pg::init(1);
    psql(
        &pg.sock,
        pg.port,
        "CREATE TABLE ledger (id int PRIMARY KEY, v text)",
    );
    let archiver = Archiver::start(&agent, &pg);
    // Streaming before the first point: the archive starts where the
    // server was when the archiver first connected.
    let first = moment(&pg, String::new());
    wait_covered(&agent, &first);
    let conn = pg.agent_args();
    let backup = |label: &str| {
        let mut args = vec![
            "backup", "postgres", "--volume", "pg", "--size", "2G", "--label", label,
        ];
        args.extend(conn.iter().map(String::as_str));
        agent.ok(&args)["snapshot"].as_u64().expect("snapshot")
    };
    let p1 = backup("one");
    // Point 1's snapshot time is whole seconds: the moments come after it.
    std::thread::sleep(Duration::from_millis(1100));
    let l1 = batch(&pg, 1);
    let m1 = moment(&pg, l1);
    psql(
        &pg.sock,
        pg.port,
        "SELECT pg_create_restore_point('after_one')",
    );
    let l2 = batch(&pg, 2);
    let m2 = moment(&pg, l2);
    let p2 = backup("two");
    std::thread::sleep(Duration::from_millis(1100));
    let l3 = batch(&pg, 3);
    let m3 = moment(&pg, l3);
    let l4 = batch(&pg, 4);
    let m4 = moment(&pg, l4);
    // Idle from here: a target after the last commit is the final state.
    std::thread::sleep(Duration::from_millis(300));
    let m5 = moment(&pg, m4.lsn.clone());
    assert_eq!(m5.state, m4.state);
    wait_covered(&agent, &m5);

    let v = restore_to(&agent, "--target-time", &m1.time, &m1.state, "r1");
    assert_eq!(v["point"].as_u64(), Some(p1), "{v}");
    let v = restore_to(&agent, "--target-time", &m3.time, &m3.state, "r3");
    assert_eq!(v["point"].as_u64(), Some(p2), "{v}");
    restore_to(&agent, "--target-lsn", &m2.lsn, &m2.state, "r2");
    restore_to(&agent, "--target-name", "after_one", &m1.state, "rp");
    let v = restore_to(&agent, "--target-time", &m5.time, &m4.state, "r5");
    assert!(
        v["reaches"]
            .as_str()
            .unwrap_or("")
            .contains("end of the archive"),
        "{v}"
    );

    // Out of range: refused with the range, nothing left behind.
    let early = agent.fail(&[
        "restore",
        "pitr",
        "pg",
        "--target-time",
        "2001-01-01T00:00:00Z",
        "--name",
        "early",
    ]);
    assert!(early.contains("before the first point"), "{early}");
    assert!(early.contains("restores to any time from"), "{early}");
    let late = agent.fail(&[
        "restore",
        "pitr",
        "pg",
        "--target-time",
        "2999-01-01T00:00:00Z",
        "--name",
        "late",
    ]);
    assert!(late.contains("after the last archived WAL"), "{late}");
    let gone = agent.fail(&[
        "restore",
        "pitr",
        "pg",
        "--target-name",
        "nowhere",
        "--name",
        "n",
    ]);
    assert!(gone.contains("no restore point named"), "{gone}");
    let api = Api::new(&app, &app.admin_token());
    let vols = api.get("/v1/volumes").to_string();
    for n in ["early", "late", "n", "early-logread", "late-logread"] {
        assert!(
            !vols.contains(&format!("\"name\":\"{n}\"")),
            "{n} left: {vols}"
        );
    }

    // Retention: point 1 deleted, the WAL only it needed goes from the
    // archive; a time before point 2 is now before the first point.
    let wal = agent.state.path().join("mnt/pg-log/wal");
    let first_needed = psql(
        &pg.sock,
        pg.port,
        &format!(
            "SELECT pg_walfile_name('{}')",
            api.get(&format!("/v1/volumes/pg/snapshots/{p2}"))["metadata"]["stop_lsn"]
                .as_str()
                .unwrap()
        ),
    )
    .trim()
    .to_string();
    let oldest = || {
        std::fs::read_dir(&wal)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() == 24)
            .min()
            .unwrap_or_default()
    };
    assert!(oldest() < first_needed, "nothing to prune in the test");
    api.expect(
        204,
        "DELETE",
        &format!("/v1/volumes/pg/snapshots/{p1}"),
        None,
    );
    let t = Instant::now();
    while oldest() != first_needed {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not pruned: {}",
            oldest()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let early = agent.fail(&[
        "restore",
        "pitr",
        "pg",
        "--target-time",
        &m1.time,
        "--name",
        "pruned",
    ]);
    assert!(early.contains("before the first point"), "{early}");

    // A gap: batch 4's segment removed from the archive.
    let seg = psql(
        &pg.sock,
        pg.port,
        &format!("SELECT pg_walfile_name('{}')", m4.lsn),
    )
    .trim()
    .to_string();
    // WAL after batch 4's segment, so its absence is a gap and not the
    // end of the archive.
    let l6 = batch(&pg, 6);
    let m6 = moment(&pg, l6);
    wait_covered(&agent, &m6);
    archiver.stop();
    let a = agent.ok(&["attach", "pg-log", "--name", "gap"]);
    let mnt = PathBuf::from(a["mount"].as_str().unwrap());
    let f = mnt.join("wal").join(&seg);
    assert!(
        f.exists(),
        "{} missing before the test removes it",
        f.display()
    );
    std::fs::remove_file(&f).unwrap();
    agent.ok(&["detach", "gap"]);
    let err = agent.fail(&[
        "restore",
        "pitr",
        "pg",
        "--target-time",
        &m4.time,
        "--name",
        "pastgap",
    ]);
    assert!(err.contains(&seg) && err.contains("is missing"), "{err}");
    // Up to the gap, restores still work.
    let v = restore_to(&agent, "--target-lsn", &m3.lsn, &m3.state, "beforegap");
    assert_eq!(v["point"].as_u64(), Some(p2), "{v}");
}

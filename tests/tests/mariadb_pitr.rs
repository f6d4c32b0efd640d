//! MariaDB point-in-time restores with a real MariaDB 10.11 and a real
//! appliance: `cdm-agent logs mariadb` streams the binlogs into the log
//! volume while a bank workload runs (a constant total, a gapless
//! journal) across a full and an incremental backup, binlog rotations
//! and a server restart; restores to recorded times and GTIDs show
//! exactly the recorded state; targets outside the archive are refused
//! with its range, and a binlog file removed from the archive is named
//! by the restore that would need it.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use cdm_api::instant::rfc3339_us;
use cdm_e2e::maria::*;
use cdm_e2e::*;
use serde_json::Value;

const VOLUME: &str = "mp";

/// What the source showed at a moment: its time, GTID and bank.
#[derive(Debug)]
struct Moment {
    us: i64,
    gtid: String,
    journal: u64,
    digest: String,
}

fn server_us(sock: &Path) -> i64 {
    sql(
        sock,
        "SET time_zone = '+00:00'; SELECT CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)",
    )
    .parse()
    .expect("server time")
}

/// Records the source's state at a time that falls in a second after
/// every transaction committed so far (binlog stamps are whole seconds,
/// and a time target leaves out its own second).
fn moment(m: &Maria) -> Moment {
    let s0: i64 = m.sql("SELECT UNIX_TIMESTAMP()").parse().expect("seconds");
    let us = wait_for(10, "the server's clock to pass a second", || {
        let us = server_us(&m.sock);
        (us.div_euclid(1_000_000) > s0).then_some(us)
    });
    let journal = check_bank(&m.sock);
    Moment {
        us,
        gtid: m.sql("SELECT @@gtid_binlog_pos"),
        journal,
        digest: journal_digest(&m.sock, journal),
    }
}

/// `cdm-agent logs mariadb` in the background.
fn start_archiver(agent: &Agent, m: &Maria) -> Child {
    let sock = m.sock.display().to_string();
    agent
        .cmd(&["logs", "mariadb", "--volume", VOLUME, "--socket", &sock])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cdm-agent logs")
}

fn status_path(agent: &Agent) -> PathBuf {
    agent
        .state
        .path()
        .join("mnt")
        .join(format!("{VOLUME}-log"))
        .join("status.json")
}

fn binlog_num(f: &str) -> u64 {
    f.rsplit('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits until the archiver says the archive holds everything the server
/// has written so far, up to a time at or after `until_us` (its status,
/// written after a sync).
fn wait_covered(agent: &Agent, m: &Maria, archiver: &mut Child, until_us: i64) {
    let st = m.sql("SHOW MASTER STATUS");
    let mut f = st.split('\t');
    let want = (
        binlog_num(f.next().unwrap()),
        f.next().unwrap().parse::<u64>().unwrap(),
    );
    let p = status_path(agent);
    wait_for(120, "the archive to cover the server's position", || {
        if let Ok(Some(s)) = archiver.try_wait() {
            panic!("the archiver exited: {s}");
        }
        let v: Value = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
        let c = v["covered_binlog"].as_array()?;
        let at = (binlog_num(c[0].as_str()?), c[1].as_u64()?);
        (at >= want && v["covered_us"].as_i64()? >= until_us).then_some(())
    });
}

fn backup(agent: &Agent, m: &Maria, extra: &[&str]) -> Value {
    let sock = m.sock.display().to_string();
    let mut args = vec!["backup", "mariadb", "--volume", VOLUME, "--socket", &sock];
    args.extend(extra);
    agent.ok(&args)
}

/// A restore to `target` (`--target-time` or `--target-gtid`) checked
/// against what the source showed; the restore's result.
fn restore_to(agent: &Agent, flag: &str, target: &str, name: &str, want: &Moment) -> Value {
    let v = agent.ok(&[
        "restore", "pitr", VOLUME, flag, target, "--name", name, "--port", "3399",
    ]);
    eprintln!("restore to {target}: {v}");
    let sock = PathBuf::from(v["mariadb"]["socket"].as_str().expect("socket"));
    let n = check_bank(&sock);
    assert_eq!(n, want.journal, "journal length at {target}: {v}");
    assert_eq!(
        journal_digest(&sock, n),
        want.digest,
        "transfers at {target}"
    );
    assert_eq!(v["applied_to"].as_str(), Some(want.gtid.as_str()), "{v}");
    assert!(v["recovery"]["replay_seconds"].as_f64().is_some(), "{v}");
    agent.ok(&["detach", name, "--delete-clone"]);
    v
}

fn at(us: i64) -> String {
    rfc3339_us(us)
}

/// The archiver's refusals before it streams: wrong credentials, and a
/// user that may read the binlog position but not stream it (its
/// password from a file), named with the privilege it lacks.
fn archiver_refuses_users(agent: &Agent, m: &Maria) {
    let sock = m.sock.display().to_string();
    let e = agent.fail(&[
        "logs", "mariadb", "--volume", VOLUME, "--socket", &sock, "--user", "nobody",
    ]);
    assert!(e.contains("nobody"), "{e}");
    m.sql(
        "CREATE USER cdm_mon@localhost IDENTIFIED BY 'p#w d'; \
         GRANT BINLOG MONITOR ON *.* TO cdm_mon@localhost",
    );
    let pw = agent.state.path().join("mon.pw");
    std::fs::write(&pw, "p#w d\n").unwrap();
    let e = agent.fail(&[
        "logs",
        "mariadb",
        "--volume",
        VOLUME,
        "--socket",
        &sock,
        "--user",
        "cdm_mon",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert!(e.contains("REPLICATION SLAVE"), "{e}");
}

/// What the workload left: the points, the moments A..E and the binlog
/// file B was recorded in.
struct History {
    p1: Value,
    p2: Value,
    moments: Vec<Moment>,
    b_file: String,
}

/// Points and moments across binlog rotations and a server restart, with
/// the archiver running.
fn make_history(agent: &Agent, m: &mut Maria) -> History {
    let p1 = backup(agent, m, &["--size", "2G"]);
    assert_eq!(p1["backup"], "full");
    let mut moments = Vec::new();
    run_script(&m.sock, &transfers(1, 60));
    moments.push(moment(m)); // A: after point 1, in its binlog
    m.sql("FLUSH BINARY LOGS");
    run_script(&m.sock, &transfers(2, 60));
    moments.push(moment(m)); // B: in a binlog of its own
    let b_file = m.sql("SHOW MASTER STATUS");
    let b_file = b_file.split('\t').next().unwrap().to_string();
    m.sql("FLUSH BINARY LOGS");
    // Point 2 is taken while transfers commit: the restores from it
    // replay from its position in the middle of them.
    let wl = Workload::start(m, 3);
    wait_for(60, "the workload to commit", || {
        (sql(&m.sock, "SELECT COUNT(*) FROM journal")
            .parse::<u64>()
            .ok()?
            > moments[1].journal)
            .then_some(())
    });
    let p2 = backup(agent, m, &[]);
    wl.stop();
    assert_eq!(p2["backup"], "incremental", "{p2}");
    moments.push(moment(m)); // C: after point 2
    let p2_seq = gtid_seq(p2["binlog"]["gtid"].as_str().expect("point 2's GTID"));
    assert!(
        p2_seq < gtid_seq(&moments[2].gtid),
        "no transfer after point 2"
    );
    // A restart: the server opens a new binlog, the streamer starts again.
    m.stop();
    m.start();
    run_script(&m.sock, &transfers(4, 60));
    moments.push(moment(m)); // D
    run_script(&m.sock, &transfers(5, 60));
    moments.push(moment(m)); // E: the last
    History {
        p1,
        p2,
        moments,
        b_file,
    }
}

/// Targets outside the archive: refused with the range it has.
fn refusals(agent: &Agent, app: &Appliance, m: &Maria, h: &History) {
    let first_us = p1_created(app, &h.p1);
    let e = agent.fail(&[
        "restore",
        "pitr",
        VOLUME,
        "--target-time",
        &at(first_us - 3_600_000_000),
        "--name",
        "early",
    ]);
    assert!(e.contains("before the first point"), "{e}");
    assert!(e.contains("this archive restores to any time from"), "{e}");
    let e = agent.fail(&[
        "restore",
        "pitr",
        VOLUME,
        "--target-time",
        &at(server_us(&m.sock) + 3_600_000_000),
        "--name",
        "late",
    ]);
    let last = &h.moments[4].gtid;
    assert!(e.contains("after the end of the archive"), "{e}");
    assert!(e.contains(&format!("last GTID {last}")), "{e}");
    let (ds, _) = last.rsplit_once('-').unwrap();
    let e = agent.fail(&[
        "restore",
        "pitr",
        VOLUME,
        "--target-gtid",
        &format!("{ds}-{}", gtid_seq(last) + 1000),
        "--name",
        "late",
    ]);
    assert!(e.contains("is not in the archive"), "{e}");
}

/// B's binlog removed from the (stopped) archive: what needs it is
/// refused naming it, what does not still restores.
fn gap(agent: &Agent, h: &History) {
    let lv = format!("{VOLUME}-log");
    let a = agent.ok(&["attach", &lv]);
    let mnt = PathBuf::from(a["mount"].as_str().expect("mount"));
    std::fs::remove_file(mnt.join("binlog").join(&h.b_file)).expect("B's binlog archived");
    agent.ok(&["detach", &lv]);
    let e = agent.fail(&[
        "restore",
        "pitr",
        VOLUME,
        "--target-time",
        &at(h.moments[1].us),
        "--name",
        "gap",
    ]);
    assert!(e.contains(&format!("{} is missing", h.b_file)), "{e}");
    // A's transactions are all before the gap: a GTID target there restores.
    let a = &h.moments[0];
    restore_to(agent, "--target-gtid", &a.gtid, "before", a);
    // Nothing was left behind by the refusals.
    assert_eq!(agent.ok(&["list"]), Value::Array(vec![]));
    // Point 2 is past the gap: restores from it still work.
    let d = &h.moments[3];
    restore_to(agent, "--target-time", &at(d.us), "after", d);
}

/// The same server restarted without a binlog: the archiver refuses it.
fn refused_without_binlog(agent: &Agent, m: &mut Maria) {
    m.stop();
    let mut plain = std::process::Command::new("mariadbd")
        .arg("--no-defaults")
        .arg(format!("--datadir={}", m.data.display()))
        .arg(format!("--socket={}", m.sock.display()))
        .arg(format!("--pid-file={}", m.dir.path().join("pid").display()))
        .arg(format!(
            "--log-error={}",
            m.dir.path().join("plain.log").display()
        ))
        .arg(format!("--tmpdir={}", m.dir.path().join("tmp").display()))
        .args(["--server-id=1", "--skip-networking", "--user=root"])
        .stdin(Stdio::null())
        .spawn()
        .expect("mariadbd");
    wait_for(120, "mariadbd without a binlog to answer", || {
        let out = std::process::Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", m.sock.display()))
            .args(["-uroot", "--batch", "--skip-column-names"])
            .args(["-e", "SELECT @@log_bin"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "0").then_some(())
    });
    let sock = m.sock.display().to_string();
    let e = agent.fail(&["logs", "mariadb", "--volume", VOLUME, "--socket", &sock]);
    assert!(e.contains("@@log_bin is off"), "{e}");
    // SAFETY: kill(2) on the server this test started.
    unsafe { libc::kill(plain.id() as i32, libc::SIGTERM) };
    let _ = plain.wait();
}

#[test]
fn mariadb_restores_to_times_and_gtids_from_archived_binlogs() {
    let _load = shared();
    let app = Appliance::start(None);
    let agent = Agent::new(&app);
    let mut m = Maria::init();
    // Row events up to the restart below (which brings back the default,
    // MIXED: statements): replay is checked with both.
    m.sql("SET GLOBAL binlog_format = 'ROW'");
    archiver_refuses_users(&agent, &m);
    let mut archiver = start_archiver(&agent, &m);
    let h = make_history(&agent, &mut m);
    // The last moment is after the last transaction: a restore to it
    // needs the archiver's word that nothing followed until then.
    let last_us = h.moments.last().map_or(0, |x| x.us);
    wait_covered(&agent, &m, &mut archiver, last_us);

    for (i, mo) in h.moments.iter().enumerate() {
        let v = restore_to(&agent, "--target-time", &at(mo.us), &format!("t{i}"), mo);
        let point = if i < 2 { &h.p1 } else { &h.p2 };
        assert_eq!(v["point"], point["snapshot"], "{v}");
    }
    // A GTID in the middle of a batch: that many transfers after B.
    let b = &h.moments[1];
    let (ds, n) = b.gtid.rsplit_once('-').unwrap();
    let mid = Moment {
        us: 0,
        gtid: format!("{ds}-{}", n.parse::<u64>().unwrap() + 37),
        journal: b.journal + 37,
        digest: journal_digest(&m.sock, b.journal + 37),
    };
    restore_to(&agent, "--target-gtid", &mid.gtid, "g1", &mid);
    let d = &h.moments[3];
    restore_to(&agent, "--target-gtid", &d.gtid, "g2", d);
    refusals(&agent, &app, &m, &h);

    // Stopped, the archiver detaches its volume and says how far it got.
    // SAFETY: kill(2) on the archiver this test started.
    unsafe { libc::kill(archiver.id() as i32, libc::SIGTERM) };
    let out = wait_output(archiver, "the archiver to stop");
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("archiver result");
    assert!(v["restarts"].as_u64().unwrap() >= 1, "{v}");
    gap(&agent, &h);
    refused_without_binlog(&agent, &mut m);
}

fn p1_created(app: &Appliance, p1: &Value) -> i64 {
    let id = p1["snapshot"].as_u64().unwrap();
    let s = Api::new(app, &app.admin_token()).get(&format!("/v1/volumes/{VOLUME}/snapshots/{id}"));
    s["created_unix"].as_i64().unwrap() * 1_000_000
}

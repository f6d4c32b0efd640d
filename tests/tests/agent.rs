//! cdm-agent end to end: a real PostgreSQL 15 (initdb, pgbench) backed up
//! incremental-forever into a stage disk attached through NBD + FUSE +
//! loop, every snapshot recovered instantly and checked against what was
//! committed, clones that diverge, a regular restore; file and block
//! backups (qemu-nbd with a persistent dirty bitmap); bandwidth limits;
//! and the faults: database down, wrong password, stage disk full, the
//! appliance killed mid-backup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cdm_e2e::pg::*;
use cdm_e2e::AgentCli as Agent;
use cdm_e2e::*;
use serde_json::Value;

fn backup_pg(agent: &Agent, pg: &Pg, volume: &str, extra: &[&str]) -> Value {
    let mut args = vec!["backup", "postgres", "--volume", volume];
    args.extend(extra);
    let conn = pg.agent_args();
    let conn: Vec<&str> = conn.iter().map(String::as_str).collect();
    args.extend(conn);
    agent.ok(&args)
}

/// Instant recovery of `snap`: the state the clone's PostgreSQL shows.
fn instant_state(agent: &Agent, snap: &str, name: &str) -> (String, f64) {
    // The clone's server listens on its own socket directory only.
    let port = pg_port();
    let v = agent.ok(&[
        "restore",
        "instant",
        snap,
        "--name",
        name,
        "--port",
        &port.to_string(),
    ]);
    assert_eq!(v["bytes_copied"], 0);
    // Attached through the FUSE file (no nbd.ko here) under a loop device
    // in direct-I/O mode.
    let list = agent.ok(&["list"]);
    let a = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"));
    let dev = a["device"].as_str().unwrap();
    assert!(dev.starts_with("/dev/loop"), "{a}");
    let dio = std::fs::read_to_string(format!(
        "/sys/block/{}/loop/dio",
        dev.trim_start_matches("/dev/")
    ))
    .unwrap();
    assert_eq!(dio.trim(), "1", "{dev} without direct I/O");
    let sock = PathBuf::from(v["postgres"]["socket_dir"].as_str().unwrap());
    let state = psql(&sock, port, STATE);
    agent.ok(&["detach", name, "--delete-clone"]);
    (state, v["seconds_to_first_query"].as_f64().unwrap())
}

#[test]
fn postgres_incremental_forever_with_instant_clone_and_regular_recovery() {
    let _load = shared();
    let app = Appliance::start(None);
    let agent = Agent::new(&app);
    let pg = Pg::init(4);
    let mut snaps: Vec<(String, String)> = Vec::new();
    let mut full_written = 0;
    for round in 0..4 {
        if round > 0 {
            pg.pgbench(400);
        }
        let committed = psql(&pg.sock, pg.port, STATE);
        let size: Vec<&str> = if round == 0 {
            vec!["--size", "1G"]
        } else {
            vec![]
        };
        let v = backup_pg(&agent, &pg, "pgstage", &size);
        let written = v["bytes_written"].as_u64().unwrap();
        let read = v["bytes_read"].as_u64().unwrap();
        if round == 0 {
            assert_eq!(v["merge"]["fingerprints"], "not used: first run");
            full_written = written;
            assert!(written > 40 << 20, "full copy wrote {written}");
        } else {
            // Incremental: every block read, only the changed ones written.
            assert_eq!(v["merge"]["fingerprints"], "trusted");
            assert!(read >= full_written, "{read} < {full_written}");
            assert!(
                written * 5 < full_written,
                "incremental wrote {written} of {full_written}"
            );
            assert!(v["changed_blocks"].as_u64().unwrap() > 0);
        }
        // The snapshot records the database and its consistent point.
        let snap = v["export"].as_str().unwrap().to_string();
        let id = v["snapshot"].as_u64().unwrap();
        let meta = Api::new(&app, &app.admin_token())
            .get(&format!("/v1/volumes/pgstage/snapshots/{id}"))["metadata"]
            .clone();
        assert_eq!(meta["kind"], "postgres");
        assert_eq!(meta["stop_lsn"], v["postgres"]["stop_lsn"]);
        assert!(meta["backup_label"]
            .as_str()
            .unwrap()
            .contains("START WAL LOCATION"));
        assert!(
            meta["database"]["system_identifier"]
                .as_str()
                .unwrap()
                .len()
                > 5
        );
        snaps.push((snap, committed));
    }
    // The source moves on; every snapshot still shows its own point.
    pg.pgbench(200);
    for (i, (snap, committed)) in snaps.iter().enumerate() {
        let (state, secs) = instant_state(&agent, snap, &format!("inst{i}"));
        assert_eq!(&state, committed, "instant recovery of {snap}");
        // Instant = nothing copied (asserted in instant_state); the time
        // is reported, not bounded (no wall-clock ceiling in a test).
        assert!(secs > 0.0, "{secs}");
    }
    // Two clones of one snapshot diverge independently.
    let (snap, committed) = &snaps[2];
    let (pa, pb) = (pg_port(), pg_port());
    let a = agent.ok(&[
        "restore",
        "clone",
        snap,
        "--name",
        "dev-a",
        "--port",
        &pa.to_string(),
    ]);
    let b = agent.ok(&[
        "restore",
        "clone",
        snap,
        "--name",
        "dev-b",
        "--port",
        &pb.to_string(),
    ]);
    let sa = PathBuf::from(a["postgres"]["socket_dir"].as_str().unwrap());
    let sb = PathBuf::from(b["postgres"]["socket_dir"].as_str().unwrap());
    psql(
        &sa,
        pa,
        "CREATE TABLE only_a(x int); INSERT INTO only_a VALUES (42)",
    );
    psql(&sb, pb, "DELETE FROM pgbench_history");
    assert_eq!(psql(&sa, pa, "SELECT x FROM only_a"), "42");
    assert_eq!(&psql(&sa, pa, STATE), committed);
    assert!(psql(&sb, pb, STATE).starts_with("0,0,"));
    assert_eq!(
        psql(
            &sb,
            pb,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'only_a'"
        ),
        "0"
    );
    let listed = agent.ok(&["list"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    agent.ok(&["detach", "dev-a", "--delete-clone"]);
    agent.ok(&["detach", "dev-b", "--delete-clone"]);
    // The snapshot itself never changed.
    assert_eq!(&instant_state(&agent, snap, "again").0, committed);
    // Regular restore: a copy in a fresh directory that starts and matches.
    let target = tempfile::Builder::new()
        .prefix("cdm-restore-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let port = pg_port();
    let (snap, committed) = &snaps[1];
    let v = agent.ok(&[
        "restore",
        "regular",
        snap,
        "--target",
        target.path().to_str().unwrap(),
        "--start-port",
        &port.to_string(),
    ]);
    assert!(v["bytes_copied"].as_u64().unwrap() > 40 << 20);
    let sock = target.path().join("run");
    assert_eq!(&psql(&sock, port, STATE), committed);
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_bin("pg_ctl"))
        .arg("-D")
        .arg(target.path().join("pgdata"))
        .args(["-m", "fast", "-w", "stop"]));
    // A non-empty target is refused.
    let e = agent.fail(&[
        "restore",
        "regular",
        snap,
        "--target",
        target.path().to_str().unwrap(),
    ]);
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn postgres_faults_fail_clearly_and_lose_nothing() {
    let _load = shared();
    let mut app = Appliance::start(None);
    let mut agent = Agent::new(&app);
    let pg = Pg::init(3);
    // Not running: nothing is attached or created. (pg listens on a unix
    // socket only: no server has this port's socket in that directory.)
    let closed = pg_port().to_string();
    let e = agent.fail(&[
        "backup",
        "postgres",
        "--volume",
        "never",
        "--size",
        "1G",
        "--host",
        pg.sock.to_str().unwrap(),
        "--port",
        &closed,
    ]);
    assert!(e.contains("cannot connect to PostgreSQL"), "{e}");
    assert_eq!(
        app.cdmctl(&["volume", "show", "never"]).status.code(),
        Some(4)
    );
    // Wrong credentials.
    psql(&pg.sock, pg.port, "CREATE ROLE bk LOGIN REPLICATION PASSWORD 'right'; GRANT pg_read_all_settings, pg_checkpoint TO bk; GRANT EXECUTE ON FUNCTION pg_backup_start, pg_backup_stop TO bk");
    let hba = pg.data.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("local all bk scram-sha-256\n{text}")).unwrap();
    psql(&pg.sock, pg.port, "SELECT pg_reload_conf()");
    let pw = agent.state.path().join("pw");
    std::fs::write(&pw, "wrong\n").unwrap();
    let mut args = vec![
        "backup",
        "postgres",
        "--volume",
        "never",
        "--size",
        "1G",
        "--user",
        "bk",
        "--password-file",
        pw.to_str().unwrap(),
    ];
    let conn = pg.agent_args();
    args.extend(conn.iter().map(String::as_str));
    let e = agent.fail(&args);
    assert!(e.contains("28P01") && e.contains("bk"), "{e}");
    // Stage disk too small: a clear error, pg_backup_stop called, no
    // snapshot, no slot left behind.
    let e = agent.fail(&{
        let mut a = vec!["backup", "postgres", "--volume", "tiny", "--size", "24M"];
        a.extend(conn.iter().map(String::as_str));
        a
    });
    assert!(
        e.contains("stage disk is full") && e.contains("pg_backup_stop called"),
        "{e}"
    );
    assert_eq!(
        Api::new(&app, &app.admin_token()).get("/v1/volumes/tiny")["snapshots"],
        0
    );
    assert_eq!(
        psql(
            &pg.sock,
            pg.port,
            "SELECT count(*) FROM pg_replication_slots"
        ),
        "0"
    );
    assert_eq!(agent.ok(&["list"]), Value::Array(vec![]));

    // The appliance dies mid-backup.
    let first = backup_pg(&agent, &pg, "pgf", &["--size", "1G"]);
    let committed = psql(&pg.sock, pg.port, STATE);
    pg.pgbench(300);
    // Rewrite a lot so the throttled backup is still copying when the
    // appliance goes.
    psql(&pg.sock, pg.port, "VACUUM FULL pgbench_accounts");
    let mut slow = agent.cmd(&{
        let mut a = vec!["--limit", "2", "backup", "postgres", "--volume", "pgf"];
        a.extend(conn.iter().map(String::as_str));
        a
    });
    let child = slow
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Observed, not assumed: the merge into the stage disk has begun (its
    // in-progress marker is on the mounted stage disk). Stopped there, the
    // backup is certainly mid-copy when the appliance goes.
    let marker = wait_for(300, "the backup to start merging", || {
        merge_marker(agent.state.path())
    });
    let pid = child.id() as i32;
    // SAFETY: signals to the child we spawned.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert!(marker.exists(), "the merge ended before it was stopped");
    // Seen in the page cache is not yet on the appliance (the agent may be
    // stopped between creating the marker and syncing it): make it
    // durable, so the cut is certainly one the next run must notice.
    run(Command::new("sync").arg("-f").arg(&marker));
    app.kill();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // The watchdog fails a backup that hangs instead of failing.
    let out = wait_output(child, "the backup cut by the appliance's death");
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("no snapshot taken") || e.contains("not snapshotted"),
        "{e}"
    );
    // No slot left, nothing attached.
    assert_eq!(
        psql(
            &pg.sock,
            pg.port,
            "SELECT count(*) FROM pg_replication_slots"
        ),
        "0"
    );
    app.restart();
    agent.url = app.url();
    assert_eq!(agent.ok(&["list"]), Value::Array(vec![]));
    // The previous snapshot is intact.
    let snaps = Api::new(&app, &app.admin_token()).get("/v1/volumes/pgf/snapshots");
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    let snap = first["export"].as_str().unwrap();
    assert_eq!(instant_state(&agent, snap, "after-crash").0, committed);
    // The next backup completes and is right.
    let now = psql(&pg.sock, pg.port, STATE);
    let v = backup_pg(&agent, &pg, "pgf", &[]);
    assert_ne!(
        v["merge"]["fingerprints"], "trusted",
        "a cut run's fingerprints must not be trusted"
    );
    let (state, _) = instant_state(&agent, v["export"].as_str().unwrap(), "next");
    assert_eq!(state, now);
}

/// The merge's in-progress marker (`.cdm/in-progress`) on a stage disk
/// the agent has mounted under `STATE/mnt`, once a run has written it.
fn merge_marker(state: &Path) -> Option<PathBuf> {
    let out = output(Command::new("find").arg(state.join("mnt")).args([
        "-maxdepth",
        "4",
        "-path",
        "*/.cdm/in-progress",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(PathBuf::from)
}

fn tree_listing(root: &Path) -> String {
    sh(&format!(
        "cd {} && find . -path ./.cdm -prune -o -path ./lost+found -prune -o -printf '%p %y %m %u %s %l\\n' | sort && find . -path ./.cdm -prune -o -type f -print0 | sort -z | xargs -0r md5sum",
        root.display()
    ))
}

#[test]
fn files_and_block_backups_with_bandwidth_limits() {
    // Throttled timings: alone among this binary's tests.
    let _alone = exclusive();
    require("qemu-nbd");
    require("qemu-io");
    let app = Appliance::start(None);
    let agent = Agent::new(&app);
    let src = tempfile::Builder::new()
        .prefix("cdm-src-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let s = src.path();
    sh(&format!(
        "cd {0} && mkdir -p a/b empty && head -c 3000000 /dev/urandom > a/big && echo hi > a/b/small && \
         ln -s ../a/big a/b/link && head -c 100000 /dev/urandom > gone && truncate -s 50M sparse && \
         printf x | dd of=sparse bs=1 seek=20000000 conv=notrunc 2>/dev/null && chown 1234:5678 a/b/small && chmod 640 a/b/small",
        s.display()
    ));
    let v1 = agent.ok(&[
        "backup",
        "files",
        "--volume",
        "fs",
        "--size",
        "512M",
        s.to_str().unwrap(),
    ]);
    let l1 = tree_listing(s);
    // Change: append, overwrite in the middle, shrink, remove, new dir.
    sh(&format!(
        "cd {0} && printf more >> a/b/small && printf XXXX | dd of=a/big bs=1 seek=1000000 conv=notrunc 2>/dev/null && \
         truncate -s 1000 gone && rm -r empty && mkdir -p new/deeper && echo n > new/deeper/f && chmod 700 a",
        s.display()
    ));
    let v2 = agent.ok(&["backup", "files", "--volume", "fs", s.to_str().unwrap()]);
    assert_eq!(v2["merge"]["fingerprints"], "trusted");
    assert!(v2["bytes_written"].as_u64().unwrap() < 64 * 1024, "{v2}");
    let l2 = tree_listing(s);
    // Each snapshot restores exactly what was there.
    for (v, listing) in [(&v1, &l1), (&v2, &l2)] {
        let t = tempfile::Builder::new()
            .prefix("cdm-rt-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let dst = t.path().join("out");
        agent.ok(&[
            "restore",
            "regular",
            v["export"].as_str().unwrap(),
            "--target",
            dst.to_str().unwrap(),
        ]);
        assert_eq!(&tree_listing(&dst.join("files")), listing);
    }
    // A snapshot attached read-only shows the same tree.
    let ro = agent.ok(&["attach", v1["export"].as_str().unwrap()]);
    let mnt = PathBuf::from(ro["mount"].as_str().unwrap());
    assert_eq!(tree_listing(&mnt.join("files")), l1);
    assert!(std::fs::write(mnt.join("files/x"), b"x").is_err());
    // Busy: detach refuses (never a lazy unmount) and keeps the record.
    let mut busy = Command::new("sleep")
        .arg("60")
        .current_dir(mnt.join("files"))
        .spawn()
        .unwrap();
    let e = agent.fail(&["detach", ro["name"].as_str().unwrap()]);
    assert!(e.contains("busy"), "{e}");
    assert_eq!(agent.ok(&["list"]).as_array().unwrap().len(), 1);
    let _ = busy.kill();
    let _ = busy.wait();
    agent.ok(&["detach", ro["name"].as_str().unwrap()]);
    assert_eq!(agent.ok(&["list"]), Value::Array(vec![]));

    // A stage disk by hand: created, a filesystem made on first use,
    // kept across detach and attach.
    let m = agent.ok(&["attach", "scratch", "--create", "64M"]);
    assert_eq!(m["fstype"], "ext4");
    let mnt = PathBuf::from(m["mount"].as_str().unwrap());
    std::fs::write(mnt.join("kept"), b"across attaches").unwrap();
    agent.ok(&["detach", "scratch"]);
    let m = agent.ok(&["attach", "scratch"]);
    assert_eq!(
        std::fs::read(PathBuf::from(m["mount"].as_str().unwrap()).join("kept")).unwrap(),
        b"across attaches"
    );
    agent.ok(&["detach", "scratch"]);

    // Bandwidth: 12 MiB at 4 MiB/s takes at least about three seconds (a
    // lower bound holds under any load; the bucket may start with a
    // quarter second saved).
    sh(&format!(
        "head -c 12582912 /dev/urandom > {}/a/new-big",
        s.display()
    ));
    let t = Instant::now();
    let v3 = agent.ok(&[
        "--limit",
        "4",
        "backup",
        "files",
        "--volume",
        "fs",
        s.to_str().unwrap(),
    ]);
    let secs = t.elapsed().as_secs_f64();
    assert!(secs > 2.4, "{secs}");
    // Time spent waiting is reported, and part of the run's time. (How
    // much depends on how fast the rest of the run was: not bounded.)
    let throttled = v3["merge"]["throttled_seconds"].as_f64().unwrap();
    assert!(
        throttled > 0.0 && throttled <= secs,
        "{throttled} {secs}: {v3}"
    );
    // A window that covers the whole day wins over the limit: 4 MiB at
    // 1 MiB/s, at least about four seconds.
    sh(&format!(
        "head -c 4194304 /dev/urandom > {}/a/new-big",
        s.display()
    ));
    let t = Instant::now();
    agent.ok(&[
        "--limit",
        "100",
        "--window",
        "00:00-24:00=1",
        "backup",
        "files",
        "--volume",
        "fs",
        s.to_str().unwrap(),
    ]);
    assert!(t.elapsed().as_secs_f64() > 3.0);

    // One backup per volume at a time.
    sh(&format!(
        "head -c 8388608 /dev/urandom > {}/a/new-big",
        s.display()
    ));
    let slow = agent
        .cmd(&[
            "--limit",
            "2",
            "backup",
            "files",
            "--volume",
            "fs",
            s.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Observed, not assumed: the first backup holds its lock (a probe
    // cannot take it), and is stopped while the second one runs.
    let lock = agent.state.path().join("locks/fs.lock");
    wait_for(300, "the first backup to hold its lock", || {
        (lock.exists() && !can_lock(&lock)).then_some(())
    });
    let pid = slow.id() as i32;
    // SAFETY: signals to the child we spawned.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let e = agent.fail(&["backup", "files", "--volume", "fs", s.to_str().unwrap()]);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(e.contains("another backup of fs is running"), "{e}");
    let out = wait_output(slow, "the first backup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The configuration file instead of flags.
    let cfg = agent.state.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "url = \"{}\"\ntoken_file = \"{}\"\nnbd = \"unix:{}\"\nstate_dir = \"{}\"\n[bandwidth]\nlimit_mibps = 50\n",
            agent.url,
            agent.token.display(),
            agent.sock.display(),
            agent.state.path().display()
        ),
    )
    .unwrap();
    let out = run(Command::new(bin("cdm-agent")).args([
        "--json",
        "--config",
        cfg.to_str().unwrap(),
        "backup",
        "files",
        "--volume",
        "fs",
        s.to_str().unwrap(),
    ]));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["merge"]["fingerprints"], "trusted");
    std::fs::write(&cfg, "url = 1\n").unwrap();
    let out = output(Command::new(bin("cdm-agent")).args([
        "--json",
        "--config",
        cfg.to_str().unwrap(),
        "list",
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("agent.toml"));

    // Block: a qcow2 with a persistent dirty bitmap, served by qemu-nbd.
    let img = s.join("vm.qcow2");
    let isock = s.join("qnbd.sock");
    sh(&format!(
        "qemu-img create -q -f qcow2 {0} 64M && qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -P 0x22 40M 1M' {0} >/dev/null && \
         qemu-img bitmap --add {0} b0",
        img.display()
    ));
    let serve = |img: &Path| {
        let _ = std::fs::remove_file(&isock);
        let c = Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-B", "b0", "-t", "-k"])
            .arg(&isock)
            .arg(img)
            .spawn()
            .unwrap();
        wait_for(120, "qemu-nbd", || isock.exists().then_some(()));
        c
    };
    let uri = format!("nbd+unix:///?socket={}", isock.display());
    let mut q = serve(&img);
    let b1 = agent.ok(&["backup", "block", "--volume", "vm", &uri, "--bitmap", "b0"]);
    assert_eq!(b1["block"]["mode"], "full");
    // Only allocated data was read.
    assert_eq!(b1["bytes_read"].as_u64().unwrap(), 5 << 20, "{b1}");
    let cmp = |export: &str| {
        run(Command::new("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &app.unix_uri(export),
            &uri,
        ]))
    };
    cmp(b1["export"].as_str().unwrap());
    // SIGTERM: qemu-nbd stores the persistent bitmap as it exits.
    unsafe { libc::kill(q.id() as i32, libc::SIGTERM) };
    let _ = q.wait();
    // Guest writes recorded by the bitmap; one block overwritten with zeros.
    sh(&format!(
        "qemu-io -f qcow2 -c 'write -P 0x33 8M 128K' -c 'write -z 40M 64K' {0} >/dev/null",
        img.display()
    ));
    q = serve(&img);
    let b2 = agent.ok(&["backup", "block", "--volume", "vm", &uri, "--bitmap", "b0"]);
    assert_eq!(b2["block"]["mode"], "dirty-bitmap");
    assert!(b2["bytes_read"].as_u64().unwrap() <= 256 << 10, "{b2}");
    assert_eq!(b2["bytes_written"].as_u64().unwrap(), 128 << 10, "{b2}");
    assert_eq!(
        b2["block"]["bytes_zeroed"].as_u64().unwrap(),
        64 << 10,
        "{b2}"
    );
    cmp(b2["export"].as_str().unwrap());
    // Without the bitmap: fingerprints, nothing changed, nothing written.
    let b3 = agent.ok(&["backup", "block", "--volume", "vm", &uri]);
    assert_eq!(b3["block"]["mode"], "fingerprints");
    assert_eq!(b3["bytes_written"], 0);
    // The bitmap is used again only if the last run saw it too (b3 did
    // not ask for it): this run reads everything.
    let b4 = agent.ok(&["backup", "block", "--volume", "vm", &uri, "--bitmap", "b0"]);
    assert_eq!(b4["block"]["mode"], "fingerprints");
    let b5 = agent.ok(&["backup", "block", "--volume", "vm", &uri, "--bitmap", "b0"]);
    assert_eq!(b5["block"]["mode"], "dirty-bitmap");
    // SIGTERM: qemu-nbd stores the persistent bitmap as it exits.
    unsafe { libc::kill(q.id() as i32, libc::SIGTERM) };
    let _ = q.wait();
    // A raw image file: holes are skipped (SEEK_HOLE).
    let raw = s.join("disk.raw");
    sh(&format!(
        "truncate -s 32M {0} && printf abc | dd of={0} bs=1 seek=10485760 conv=notrunc 2>/dev/null",
        raw.display()
    ));
    let r1 = agent.ok(&["backup", "block", "--volume", "raw", raw.to_str().unwrap()]);
    assert!(r1["bytes_read"].as_u64().unwrap() <= 1 << 20, "{r1}");
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &app.unix_uri(r1["export"].as_str().unwrap()),
        raw.to_str().unwrap(),
    ]));
    // A cut run's fingerprints are not trusted.
    std::fs::write(agent.state.path().join("block/raw.inprogress"), b"x").unwrap();
    let r2 = agent.ok(&["backup", "block", "--volume", "raw", raw.to_str().unwrap()]);
    assert_eq!(r2["block"]["mode"], "compare");
    assert_eq!(r2["bytes_written"], 0);
    // A file backup never makes a filesystem over a volume holding data.
    let e = agent.fail(&["backup", "files", "--volume", "raw", s.to_str().unwrap()]);
    assert!(e.contains("not blank"), "{e}");
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &app.unix_uri("raw"),
        raw.to_str().unwrap(),
    ]));
}

/// Whether an exclusive flock on `p` can be taken now (then released).
fn can_lock(p: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(p) else {
        return false;
    };
    // SAFETY: flock(2) on a descriptor we own; released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A cluster made the Debian way (`pg_createcluster`: configuration in
/// /etc/postgresql, peer authentication, the ssl-cert group for the
/// snakeoil key); dropped when the test ends.
struct DebianCluster {
    version: String,
    name: String,
    port: u16,
}

impl DebianCluster {
    fn create() -> DebianCluster {
        require("pg_createcluster");
        let version = pg_bin("initdb")
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let name = format!("cdmtest{}", std::process::id());
        // pg_createcluster picks a port no other cluster here uses, and
        // tells us; the server gets no TCP listener (socket only), so the
        // port is only the socket's name in /var/run/postgresql.
        run(Command::new("pg_createcluster").args([&version, &name]));
        let listed = run(Command::new("pg_lsclusters").args(["-h", &version, &name]));
        let port = listed
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("pg_lsclusters: {listed}"));
        let c = DebianCluster {
            version,
            name,
            port,
        };
        // Let root connect as postgres over the socket (peer map).
        let etc = format!("/etc/postgresql/{}/{}", c.version, c.name);
        sh(&format!(
            "echo \"listen_addresses = ''\" >> {etc}/postgresql.conf && \
             echo 'cdm root postgres' >> {etc}/pg_ident.conf && \
             sed -i 's/^local\\( *\\)all\\( *\\)postgres\\( *\\)peer$/local all postgres peer map=cdm/' {etc}/pg_hba.conf"
        ));
        run(Command::new("pg_ctlcluster").args([&c.version, &c.name, "start"]));
        c
    }
}

impl Drop for DebianCluster {
    fn drop(&mut self) {
        let _ = output(Command::new("pg_dropcluster").args(["--stop", &self.version, &self.name]));
    }
}

#[test]
fn debian_packaged_cluster_backs_up_and_recovers_with_its_etc_configuration() {
    let _load = shared();
    let app = Appliance::start(None);
    let agent = Agent::new(&app);
    let c = DebianCluster::create();
    let sock = Path::new("/var/run/postgresql");
    let port = c.port.to_string();
    let pgbench = |args: &[&str]| {
        run(Command::new(pg_bin("pgbench"))
            .args(["-h", "/var/run/postgresql", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres"))
    };
    pgbench(&["-i", "-q", "-s", "2"]);
    let mut snaps = Vec::new();
    for round in 0..2 {
        if round > 0 {
            pgbench(&["-n", "-t", "200"]);
        }
        let committed = psql(sock, c.port, STATE);
        let size: Vec<&str> = if round == 0 {
            vec!["--size", "1G"]
        } else {
            vec![]
        };
        let mut args = vec!["backup", "postgres", "--volume", "deb"];
        args.extend(size);
        let port = c.port.to_string();
        args.extend(["--port", port.as_str()]);
        let v = agent.ok(&args);
        assert!(v["merge"]["files"].as_u64().unwrap() > 100);
        snaps.push((v["export"].as_str().unwrap().to_string(), committed));
    }
    for (i, (snap, committed)) in snaps.iter().enumerate() {
        // The clone listens on its own socket directory only.
        let port = pg_port();
        let v = agent.ok(&[
            "restore",
            "instant",
            snap,
            "--name",
            &format!("deb{i}"),
            "--port",
            &port.to_string(),
        ]);
        let mnt = PathBuf::from(v["mount"].as_str().unwrap());
        // The configuration came from /etc, with the paths into the
        // original cluster commented out.
        assert!(mnt.join("pgconf/postgresql.conf").exists());
        let conf = std::fs::read_to_string(mnt.join("pgdata/postgresql.conf")).unwrap();
        assert!(conf.contains("# (cdm-agent) data_directory"), "{conf}");
        assert_eq!(&psql(&mnt.join("run"), port, STATE), committed);
        agent.ok(&["detach", &format!("deb{i}"), "--delete-clone"]);
    }
}

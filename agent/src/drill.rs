//! A recovery drill of a PostgreSQL or MariaDB point (`cdm-agent drill`):
//! a writable clone of the point (O(1) on the appliance, nothing copied),
//! attached, the server started on it in isolation (its own socket, no
//! TCP listener, its own empty network namespace, archiving, binlog and
//! replication off), the checks — for PostgreSQL the server reached a
//! consistent state and `pg_amcheck` over every database (heap and B-tree
//! indexes), for MariaDB `mariadb-check --extended` of every table — the
//! user's probes, a scrub of the point's extents on the appliance — and
//! the teardown: the server stopped, the clone detached and deleted, on
//! success, failure and timeout alike.
//!
//! The work runs in a thread of its own; this process's main thread
//! watches the time limit and, when it passes, stops the server (which
//! ends any query or check waiting on it), tears down and reports, so a
//! drill that hangs never outlives its limit. RTO is the time from the
//! drill's start to the first answered query.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use cdm_api::drills::{probe_matches, DrillCheck, DrillProbe};
use serde_json::{json, Value};

use crate::attach::{self, AttachRequest, Attachment};
use crate::error::Result;
use crate::{maria, ops, pg, Ctx};

/// Prefix of a drill's attachment and clone names: what a restarted
/// agent finds left behind and cleans up.
pub const PREFIX: &str = "drill-";
/// Longest output kept per check.
const OUTPUT_MAX: usize = 4096;

/// What `cdm-agent drill` is asked.
#[derive(Clone, Debug)]
pub struct DrillArgs {
    /// VOLUME@ID.
    pub snapshot: String,
    /// The clone's (and attachment's) name: `drill-APP-JOB`.
    pub name: String,
    pub timeout: Duration,
    pub probes: Vec<DrillProbe>,
    pub port: u16,
}

/// What the drill made so far, for the teardown, and what it found.
#[derive(Default)]
struct Shared {
    checks: Vec<DrillCheck>,
    rto: Option<f64>,
    clone: bool,
    attachment: Option<Attachment>,
    disk: Option<Child>,
    /// A check program running now (killed at the time limit).
    running: Option<u32>,
    /// The step in progress, for the report of a drill stopped at its limit.
    step: String,
    /// The time limit passed: the worker stops at its next step.
    stopped: bool,
}

type State = Arc<Mutex<Shared>>;

fn lock(s: &State) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn clip(mut s: String) -> String {
    if s.len() > OUTPUT_MAX {
        let mut cut = OUTPUT_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" …");
    }
    s
}

/// Records a check (and logs it for the job's log).
fn check(s: &State, name: &str, passed: bool, output: String, t: Instant) {
    let seconds = t.elapsed().as_secs_f64();
    tracing::info!(
        check = name,
        passed,
        seconds,
        "{}",
        output.lines().next().unwrap_or("")
    );
    lock(s).checks.push(DrillCheck {
        name: name.to_string(),
        passed,
        output: clip(output),
        seconds,
    });
}

/// Begins a step; false once the time limit passed.
fn step(s: &State, what: &str) -> bool {
    let mut g = lock(s);
    if g.stopped {
        return false;
    }
    tracing::info!("drill: {what}");
    g.step = what.to_string();
    true
}

/// Runs the drill; its report (never an error: a failed drill is a report
/// that says so, and its clone is gone either way).
pub fn run(ctx: Arc<Ctx>, a: DrillArgs) -> Result<Value> {
    let t0 = Instant::now();
    let (vol, id) = ops::parse_snapshot(&a.snapshot)?;
    ops::check_name(&a.name)?;
    if !a.name.starts_with(PREFIX) {
        crate::fail!(
            Invalid,
            "a drill's clone is named {PREFIX}…, not {:?}",
            a.name
        );
    }
    let mut a = a;
    if a.port == 0 {
        a.port = free_port()?;
    }
    on_term();
    let s: State = Arc::new(Mutex::new(Shared::default()));
    let (tx, rx) = mpsc::channel();
    {
        let (s, ctx, a, vol) = (s.clone(), ctx.clone(), a.clone(), vol.clone());
        std::thread::Builder::new()
            .name("drill".into())
            .spawn(move || {
                work(&ctx, &a, &vol, id, &s, t0);
                let _ = tx.send(());
            })
            .map_err(|e| crate::err!(Host, "cannot start the drill: {e}"))?;
    }
    let ended = wait(&rx, t0 + a.timeout);
    if ended != Ended::Finished {
        let mut g = lock(&s);
        g.stopped = true;
        let at = g.step.clone();
        let (name, why) = match ended {
            Ended::Stopped => (
                "stopped",
                "the drill was stopped (cancelled, or its agent is stopping)".to_string(),
            ),
            Ended::Crashed => ("checks", "the drill's checks ended early".to_string()),
            _ => (
                "time_limit",
                format!("the drill did not finish within {} s", a.timeout.as_secs()),
            ),
        };
        g.checks.push(DrillCheck {
            name: name.into(),
            passed: false,
            output: format!("{why} (it was at: {at}): stopped and cleaned up"),
            seconds: t0.elapsed().as_secs_f64(),
        });
        tracing::warn!(step = %at, "drill: {why}");
    }
    let cleanup = teardown(&ctx, &a.name, &s, ended != Ended::Finished);
    let g = lock(&s);
    let mut checks = g.checks.clone();
    if let Err(e) = &cleanup {
        checks.push(DrillCheck {
            name: "cleanup".into(),
            passed: false,
            output: e.clone(),
            seconds: 0.0,
        });
    }
    let passed = !checks.is_empty() && checks.iter().all(|c| c.passed);
    let mut report = json!({
        "kind": "drill",
        "snapshot": a.snapshot,
        "clone": a.name,
        "passed": passed,
        "rto_seconds": g.rto,
        "checks": checks,
        "bytes_copied": 0,
        "cleaned_up": cleanup.is_ok(),
        "seconds": t0.elapsed().as_secs_f64(),
    });
    if ended == Ended::Stopped {
        // The job runner then reports the job cancelled (or failed, when
        // the agent stops), not a drill that ran to its end.
        report["error"] = json!("the drill was stopped before it ended; torn down");
    }
    Ok(report)
}

/// SIGTERM or SIGINT received (a cancel, or the agent stopping: its runner
/// signals the job's process group, then kills it 30 s later).
static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    TERM.store(true, Ordering::SeqCst);
}

/// Turns SIGTERM and SIGINT into a stop of the drill with its teardown
/// (their default, dying at once, would leave the postmaster and the disk
/// server, both in sessions of their own, running on a clone that the
/// appliance then deletes under them).
fn on_term() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Finished,
    TimeLimit,
    Stopped,
    Crashed,
}

/// Waits for the worker until `deadline`, or until a signal asks to stop
/// (looked at every 100 ms).
fn wait(rx: &mpsc::Receiver<()>, deadline: Instant) -> Ended {
    loop {
        if TERM.load(Ordering::SeqCst) {
            return Ended::Stopped;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ended::TimeLimit;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(()) => return Ended::Finished,
            // The worker died (a panic): its checks are not all there.
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ended::Crashed,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// The database a drill starts on its clone, by what the point holds:
/// what differs between kinds (start, query, integrity checks, stop); the
/// frame around it (clone, attach, time limit, probes, scrub, teardown)
/// is the same.
#[derive(Clone, Debug)]
enum Db {
    Pg(pg::Running),
    Maria(maria::Running),
}

impl Db {
    /// Readies the copy on the mounted clone, isolated (nothing started).
    fn prepare(mount: &std::path::Path, port: u16, name: &str) -> Result<Db> {
        if mount.join("pgdata").exists() {
            let r = pg::prepare(mount, port, name)?;
            isolate(&r)?;
            return Ok(Db::Pg(r));
        }
        if mount.join(maria::DATADIR).exists() {
            return Ok(Db::Maria(maria::ready_copy(mount, port)?));
        }
        crate::fail!(
            Host,
            "the point holds no PostgreSQL (pgdata/) or MariaDB ({}/) data directory",
            maria::DATADIR
        )
    }

    fn name(&self) -> &'static str {
        match self {
            Db::Pg(_) => "PostgreSQL",
            Db::Maria(_) => "MariaDB",
        }
    }

    /// Saved with the attachment first, so that the teardown (and a
    /// restarted agent) stops what may have started.
    fn record(&self, att: &mut Attachment) {
        match self {
            Db::Pg(r) => att.postgres = Some(r.clone()),
            Db::Maria(r) => att.mariadb = Some(r.clone()),
        }
    }

    /// Starts the server in its own network namespace; returns once a
    /// query answered.
    fn start(&self) -> Result<Duration> {
        match self {
            Db::Pg(r) => pg::start_in(r, true),
            Db::Maria(r) => maria::start_in(r, true),
        }
    }

    /// The first column of the first row of `sql`, as text.
    fn query(&self, database: Option<&str>, sql: &str) -> std::result::Result<String, String> {
        match self {
            Db::Pg(r) => probe(&pg_conn(r, database.unwrap_or("postgres")), sql),
            Db::Maria(r) => {
                let rows = maria_conn(r)
                    .query_in(database, sql)
                    .map_err(|e| e.report())?;
                rows.into_iter()
                    .next()
                    .and_then(|row| row.into_iter().next())
                    .ok_or_else(|| "the query returned no row".to_string())
            }
        }
    }

    /// The integrity checks, each recorded; false once the time limit
    /// passed.
    fn integrity(&self, s: &State) -> bool {
        match self {
            Db::Pg(r) => {
                let user = pg::owner_name(r.uid).unwrap_or_else(|| "postgres".into());
                if !step(s, "checking the server reached a consistent state") {
                    return false;
                }
                let t = Instant::now();
                let (ok, out) = consistency(&pg_conn(r, "postgres"), r);
                check(s, "consistent", ok, out, t);
                if !step(s, "pg_amcheck over every database") {
                    return false;
                }
                let t = Instant::now();
                let (ok, out) = amcheck(&|db: &str| pg_conn(r, db), r, &user, s);
                check(s, "pg_amcheck", ok, out, t);
            }
            Db::Maria(r) => {
                if !step(s, "mariadb-check of every table (extended)") {
                    return false;
                }
                let t = Instant::now();
                let (ok, out) = maria_check(r, s);
                check(s, "mariadb-check", ok, out, t);
            }
        }
        true
    }
}

fn pg_conn(r: &pg::Running, db: &str) -> pg::Conn {
    pg::Conn {
        host: r.socket_dir.to_string_lossy().into_owned(),
        port: r.port,
        user: pg::owner_name(r.uid).unwrap_or_else(|| "postgres".into()),
        dbname: db.to_string(),
        password: None,
    }
}

/// The copy's root over its own socket: the agent runs as root and a
/// MariaDB root authenticates by `unix_socket` (Debian's default), so no
/// production password is needed on the clone.
fn maria_conn(r: &maria::Running) -> maria::Conn {
    maria::Conn {
        socket: r.socket.clone(),
        user: "root".into(),
        password: None,
    }
}

/// The drill's steps; each failure is a failed check, and the steps that
/// need what failed are skipped.
fn work(ctx: &Ctx, a: &DrillArgs, vol: &str, id: u64, s: &State, t0: Instant) {
    let Some(db) = start(ctx, a, vol, id, s, t0) else {
        return;
    };
    if !db.integrity(s) {
        return;
    }
    for p in &a.probes {
        let Some(sql) = &p.sql else {
            // The appliance refuses these; one that got through fails.
            let t = Instant::now();
            check(
                s,
                "probe",
                false,
                format!("a {} drill cannot run {p:?}: it needs \"sql\"", db.name()),
                t,
            );
            continue;
        };
        if !step(s, &format!("probe {sql}")) {
            return;
        }
        let t = Instant::now();
        let expect = p.expect.as_deref().unwrap_or("");
        let (ok, out) = match db.query(p.database.as_deref(), sql) {
            Ok(got) => (
                probe_matches(&got, expect),
                format!("got {got:?}, expected {expect:?}"),
            ),
            Err(e) => (false, e),
        };
        check(s, &format!("probe: {sql}"), ok, out, t);
    }
    if step(s, "scrub of the point's extents on the appliance") {
        let t = Instant::now();
        let (ok, out) = scrub(ctx, vol, id);
        check(s, "scrub", ok, out, t);
    }
}

/// Clone, attach, start the database: the server, once a query answered.
fn start(ctx: &Ctx, a: &DrillArgs, vol: &str, id: u64, s: &State, t0: Instant) -> Option<Db> {
    let fail = |why: String| {
        check(s, "start", false, why, t0);
        None
    };
    if !step(s, &format!("cloning {vol}@{id} as {}", a.name)) {
        return None;
    }
    if let Err(e) = ctx.api.create_clone(vol, id, &a.name) {
        return fail(format!("cannot clone the point: {e}"));
    }
    lock(s).clone = true;
    if !step(s, "attaching the clone") {
        return None;
    }
    let mount = ctx.state_dir.join("mnt").join(&a.name);
    let (mut att, child) = match attach::attach(
        ctx,
        &AttachRequest {
            name: a.name.clone(),
            export: a.name.clone(),
            writable: true,
            mount: mount.clone(),
            mkfs: None,
        },
    ) {
        Ok(x) => x,
        Err(e) => return fail(format!("cannot attach the clone: {}", e.report())),
    };
    att.clone = Some(a.name.clone());
    att.temporary = true;
    att.drill = true;
    let _ = attach::save(ctx, &att);
    {
        let mut g = lock(s);
        g.attachment = Some(att.clone());
        g.disk = child;
    }
    let db = match Db::prepare(&mount, a.port, &a.name) {
        Ok(db) => db,
        Err(e) => return fail(format!("cannot prepare the copy: {}", e.report())),
    };
    if !step(
        s,
        &format!("starting {} on the clone (isolated)", db.name()),
    ) {
        return None;
    }
    db.record(&mut att);
    let _ = attach::save(ctx, &att);
    lock(s).attachment = Some(att);
    match db.start() {
        Ok(_) => {
            let rto = t0.elapsed().as_secs_f64();
            lock(s).rto = Some(rto);
            check(
                s,
                "start",
                true,
                format!(
                    "{} answered its first query {rto:.3} s after the drill began",
                    db.name()
                ),
                t0,
            );
            Some(db)
        }
        Err(e) => fail(e.report()),
    }
}

/// What a drill's server must not do, on top of `prepare` (archiving off,
/// no TCP listener) and its own network namespace (it can connect
/// nowhere): follow a primary, start logical-replication apply
/// workers (a subscriber's point would pull from the publisher with the
/// real subscriber's slot), run pg_cron's jobs a second time. A dotted
/// name is accepted as a placeholder when pg_cron is not loaded.
/// `max_wal_senders` keeps the point's value: a standby's point (hot
/// standby) refuses to start below its primary's, and with no listener in
/// an empty network namespace no WAL sender can be reached anyway.
const ISOLATION: &str = "# cdm-agent drill\nprimary_conninfo = ''\nprimary_slot_name = ''\narchive_command = ''\nmax_logical_replication_workers = 0\ncron.launch_active_jobs = off\n";

fn isolate(r: &pg::Running) -> Result<()> {
    use std::os::unix::fs::chown;
    let auto = r.pgdata.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text.push_str(ISOLATION);
    std::fs::write(&auto, text)?;
    chown(&auto, Some(r.uid), Some(r.gid))?;
    Ok(())
}

/// A TCP port free on this host now: the drill's server (in its own
/// network namespace, without a listener) never shares production's port
/// number, so nothing that reads `port` can mistake one for the other.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| crate::err!(Host, "no free port for the drill's server: {e}"))?;
    Ok(l.local_addr()?.port())
}

fn consistency(c: &pg::Conn, r: &pg::Running) -> (bool, String) {
    let in_recovery = c.connect().and_then(|mut c| {
        let row = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .map_err(|e| crate::err!(Host, "{e}"))?;
        Ok(row.get::<_, bool>(0))
    });
    let log = std::fs::read_to_string(&r.log).unwrap_or_default();
    let said = log
        .lines()
        .filter(|l| {
            l.contains("consistent recovery state reached")
                || l.contains("ready to accept")
                || l.contains("redo done")
        })
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n");
    match in_recovery {
        Ok(false) => (
            true,
            format!("recovery ended; the server log says:\n{said}"),
        ),
        Ok(true) => (
            said.contains("consistent recovery state reached"),
            format!("still in recovery; the server log says:\n{said}"),
        ),
        Err(e) => (false, e.report()),
    }
}

/// The first column of the first row, as text.
fn probe(c: &pg::Conn, sql: &str) -> std::result::Result<String, String> {
    let mut c = c.connect().map_err(|e| e.report())?;
    let msgs = c.simple_query(sql).map_err(|e| match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    })?;
    for m in msgs {
        if let postgres::SimpleQueryMessage::Row(row) = m {
            return Ok(row.get(0).unwrap_or("NULL").to_string());
        }
    }
    Err("the query returned no row".into())
}

/// `pg_amcheck --all` (heap and B-tree indexes of every database), after
/// `CREATE EXTENSION amcheck` in each: the clone is thrown away.
fn amcheck(
    conn: &dyn Fn(&str) -> pg::Conn,
    r: &pg::Running,
    user: &str,
    s: &State,
) -> (bool, String) {
    let dbs: Vec<String> = match conn("postgres").connect().and_then(|mut c| {
        c.query("SELECT datname FROM pg_database WHERE datallowconn", &[])
            .map_err(|e| crate::err!(Host, "{e}"))
    }) {
        Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect(),
        Err(e) => return (false, e.report()),
    };
    for db in &dbs {
        let made = conn(db).connect().and_then(|mut c| {
            c.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
                .map_err(|e| crate::err!(Host, "{e}"))
        });
        if let Err(e) = made {
            return (
                false,
                format!("cannot create amcheck in {db}: {}", e.report()),
            );
        }
    }
    let prog = r.bindir.join("pg_amcheck");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={}", r.uid),
        &format!("--regid={}", r.gid),
        "--init-groups",
    ])
    .arg(&prog)
    .args(["--all", "--no-strict-names", "-h"])
    .arg(&r.socket_dir)
    .args(["-p", &r.port.to_string(), "-U", user])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run {}: {e}", prog.display())),
    };
    lock(s).running = Some(child.id());
    let out = child.wait_with_output();
    lock(s).running = None;
    match out {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let ok = o.status.success() && text.trim().is_empty();
            let said = if text.trim().is_empty() {
                format!(
                    "{} databases checked (heap and B-tree): no corruption",
                    dbs.len()
                )
            } else {
                text
            };
            (ok, format!("{said}\n(pg_amcheck {})", o.status))
        }
        Err(e) => (false, format!("pg_amcheck: {e}")),
    }
}

/// `mariadb-check --all-databases --check --extended` as the copy's root:
/// every table of every database read through (InnoDB validates each
/// index's pages and their checksums). It prints one line per table,
/// "OK" or what is wrong, and fails on an error.
fn maria_check(r: &maria::Running, s: &State) -> (bool, String) {
    let mut cmd = Command::new("mariadb-check");
    cmd.arg("--no-defaults")
        .arg(format!("--socket={}", r.socket.display()))
        .args(["--user=root", "--all-databases", "--check", "--extended"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run mariadb-check: {e}")),
    };
    lock(s).running = Some(child.id());
    let out = child.wait_with_output();
    lock(s).running = None;
    let o = match out {
        Ok(o) => o,
        Err(e) => return (false, format!("mariadb-check: {e}")),
    };
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let mut tables = 0;
    let mut bad = Vec::new();
    // A table's line ends in "OK", or names it and is followed by
    // "Error"/"error"/"warning" lines about it.
    for l in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if l.ends_with(" OK") || l.ends_with("\tOK") {
            tables += 1;
        } else {
            bad.push(l.to_string());
        }
    }
    let problems: Vec<&String> = bad
        .iter()
        .filter(|l| {
            let x = l.to_lowercase();
            x.contains("error") || x.contains("corrupt") || x.contains("warning")
        })
        .collect();
    let ok = o.status.success() && problems.is_empty() && tables > 0;
    let said = if ok {
        format!("{tables} tables checked (extended): no corruption")
    } else {
        format!("{}\n{}", bad.join("\n"), stderr.trim())
    };
    (ok, format!("{said}\n(mariadb-check {})", o.status))
}

/// The appliance re-reads the point's extents and checks their checksums.
fn scrub(ctx: &Ctx, vol: &str, id: u64) -> (bool, String) {
    // Reading a large point takes longer than an ordinary request.
    let api = ctx.api.longer_timeout(Duration::from_secs(3600));
    match api.verify_snapshot(vol, id) {
        Ok(v) if v.errors.is_empty() => (
            true,
            format!(
                "{} bytes of {vol}@{id} read back, every checksum good ({:.1} s)",
                v.bytes_checked, v.seconds
            ),
        ),
        Ok(v) => (
            false,
            format!(
                "{} bad spots in {vol}@{id}:\n{}",
                v.errors.len(),
                v.errors.join("\n")
            ),
        ),
        Err(e) => (
            false,
            format!("the appliance could not verify the point: {e}"),
        ),
    }
}

/// Stops the server (at once after a timeout), kills a running check,
/// detaches and deletes the clone. `Err` says what was left behind.
fn teardown(ctx: &Ctx, name: &str, s: &State, hurry: bool) -> std::result::Result<(), String> {
    let (att, mut disk, clone, running) = {
        let mut g = lock(s);
        g.stopped = true;
        (
            g.attachment.take(),
            g.disk.take(),
            g.clone,
            g.running.take(),
        )
    };
    tracing::info!("drill: tearing down");
    if let Some(pid) = running {
        // SAFETY: a child this process started and has not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let mut errors = Vec::new();
    if let Some(a) = &att {
        if let Err(e) = stop_db(a, hurry) {
            errors.push(e);
        }
        if let Err(e) = attach::detach(ctx, a, disk.as_mut()) {
            errors.push(e.report());
        }
    }
    if clone {
        if let Err(e) = ctx.api.delete_clone(name, true) {
            errors.push(format!("cannot delete clone {name}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Stops the attachment's database, if one was started on it.
fn stop_db(a: &Attachment, hurry: bool) -> std::result::Result<(), String> {
    if let Some(r) = &a.postgres {
        stop_pg(r, hurry)?;
    }
    if let Some(r) = &a.mariadb {
        maria::stop_with(r, hurry).map_err(|e| e.report())?;
    }
    Ok(())
}

/// `pg_ctl stop`: fast, or immediate when the drill ran out of time (a
/// query that hangs must not hold the teardown).
pub fn stop_pg(r: &pg::Running, immediate: bool) -> std::result::Result<(), String> {
    if !r.pgdata.join("postmaster.pid").exists() {
        return Ok(());
    }
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={}", r.uid),
            &format!("--regid={}", r.gid),
            "--init-groups",
        ])
        .arg(r.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(&r.pgdata)
        .args([
            "-m",
            if immediate { "immediate" } else { "fast" },
            "-w",
            "-t",
            "60",
            "stop",
        ])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "stopping PostgreSQL on {}: {}",
            r.pgdata.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run pg_ctl: {e}")),
    }
}

/// A drill's attachment: marked so, or (saved by `attach` before the
/// drill could mark it) named exactly `drill-APP-JOB` and attaching the
/// clone of that name. A user's attachment whose name merely starts with
/// `drill-` is not one.
fn left_by_drill(a: &Attachment) -> bool {
    if a.drill {
        return true;
    }
    let numbered = a
        .name
        .strip_prefix(PREFIX)
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(app, job)| {
            [app, job]
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
    numbered && a.export == a.name && a.clone.as_ref().is_none_or(|c| *c == a.name)
}

/// What an earlier run of the agent left of its drills (it crashed or was
/// killed mid-drill): their servers stopped, their attachments
/// detached, their clones deleted (best effort: the appliance deletes
/// them too). The names of what was cleaned.
pub fn cleanup_stale(ctx: &Ctx) -> Vec<String> {
    let mut done = Vec::new();
    for a in attach::list(ctx).into_iter().filter(left_by_drill) {
        if let Err(e) = stop_db(&a, true) {
            tracing::warn!(attachment = %a.name, error = %e, "stale drill: its server not stopped");
        }
        if let Err(e) = attach::detach(ctx, &a, None) {
            tracing::warn!(attachment = %a.name, error = %e.report(), "stale drill: not detached");
            continue;
        }
        if let Some(c) = &a.clone {
            if let Err(e) = ctx.api.delete_clone(c, true) {
                tracing::info!(clone = %c, error = %e, "stale drill clone not deleted here (the appliance deletes it)");
            }
        }
        tracing::info!(attachment = %a.name, "stale drill attachment cleaned up");
        done.push(a.name.clone());
    }
    let mnt: PathBuf = ctx.state_dir.join("mnt");
    for n in &done {
        let _ = std::fs::remove_dir(mnt.join(n));
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(name: &str, export: &str) -> Attachment {
        serde_json::from_value(json!({"name": name, "export": export, "writable": true,
            "device": "/dev/loop0", "fstype": "ext4", "mount": "/mnt/x", "pid": 0}))
        .unwrap()
    }

    #[test]
    fn only_drill_attachments_count_as_left_by_drills() {
        // A user's restores that merely look like drills are kept.
        assert!(!left_by_drill(&att("drill-notes", "drill-notes")));
        assert!(!left_by_drill(&att("drill-1-2", "prod@3")));
        assert!(!left_by_drill(&att("drill-1-2x", "drill-1-2x")));
        // A drill's, marked, or saved by attach before it was marked.
        let mut a = att("drill-notes", "whatever");
        a.drill = true;
        assert!(left_by_drill(&a));
        assert!(left_by_drill(&att("drill-3-17", "drill-3-17")));
    }
}

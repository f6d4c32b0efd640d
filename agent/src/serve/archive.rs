//! The log archivers the appliance asks for: after every heartbeat the
//! service starts a supervised `cdm-agent logs postgres|mariadb` child for
//! each task of the answer, stops (SIGTERM, then SIGKILL) those no longer
//! listed, and restarts one that exited, with backoff (1 s → 60 s). Each
//! archiver's state — `streaming` while its child runs and the archive's
//! coverage (`status.json`'s `covered_us`) advances, `failing` with the
//! child's error otherwise — goes out with the next heartbeat.
//!
//! Archivers are not jobs: they take no job slot. Each runs under a thread
//! of its own that lives as long as its child, so the child's
//! `PR_SET_PDEATHSIG` (SIGTERM: it still stops its streamer and detaches
//! its volume) fires only when the service itself dies.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cdm_common::lock::lock;
use serde::Deserialize;
use serde_json::{json, Value};

use super::job::{global_args, number, s, text, Globals};
use super::runner::{globals, KILL_AFTER};
use super::{Backoff, Service};

/// Restarts of an archiver that exited: 1 s, doubling, at most a minute.
const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A running archiver whose coverage has not advanced for this long is
/// failing (it samples every second: a healthy one advances each second,
/// an idle database included).
pub const STALL: Duration = Duration::from_secs(15);
/// What a new archiver may take before its first advance (making and
/// attaching the log volume, the replication slot) without failing.
pub const START_GRACE: Duration = Duration::from_secs(120);
/// How often a running archiver's status is read.
const TICK: Duration = Duration::from_millis(500);

/// `HeartbeatReply.archives[]`: an archiver the host should run.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Task {
    pub application: u64,
    pub kind: String,
    pub volume: String,
    #[serde(default)]
    pub config: Value,
}

/// The `cdm-agent` arguments of `t`'s archiver: the globals, then
/// `logs postgres|mariadb --volume V` and the connection flags from the
/// application's config, as backups map them.
pub fn args(t: &Task, g: &Globals) -> Result<Vec<OsString>, String> {
    let mut args = global_args(g);
    let c = &t.config;
    let keys: &[(&str, &str)] = match t.kind.as_str() {
        "postgresql" => {
            let host = text(c, "host").ok_or("the application's config has no \"host\"")?;
            args.extend([s("logs"), s("postgres"), s("--volume"), s(&t.volume)]);
            args.extend([s("--host"), s(host)]);
            if let Some(p) = number(c, "port") {
                args.extend([s("--port"), s(p)]);
            }
            &[
                ("user", "--user"),
                ("dbname", "--dbname"),
                ("password_file", "--password-file"),
            ]
        }
        "mariadb" => {
            args.extend([s("logs"), s("mariadb"), s("--volume"), s(&t.volume)]);
            &[
                ("socket", "--socket"),
                ("user", "--user"),
                ("password_file", "--password-file"),
            ]
        }
        k => return Err(format!("the logs of a {k:?} application are not archived")),
    };
    for (key, flag) in keys {
        if let Some(v) = text(c, key) {
            args.extend([s(flag), s(v)]);
        }
    }
    Ok(args)
}

/// Where a running archiver's log volume is mounted, with its
/// `status.json`.
pub fn archive_dir(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join("mnt").join(crate::logs::log_volume(volume))
}

/// What the service knows of one archiver; its state follows from it.
#[derive(Clone, Debug, Default)]
pub struct Watch {
    /// When the running child started (`None`: none runs).
    run_started: Option<Instant>,
    /// The newest coverage seen (Unix µs, the server's clock).
    covered_us: Option<i64>,
    /// When the coverage last advanced during the current run.
    advanced: Option<Instant>,
    /// Why the last run ended, or could not start.
    error: Option<String>,
    /// The running child's last warning.
    warning: Option<String>,
}

impl Watch {
    pub fn started(&mut self, now: Instant) {
        self.run_started = Some(now);
        self.advanced = None;
        self.warning = None;
    }

    pub fn ended(&mut self, why: String) {
        self.run_started = None;
        self.advanced = None;
        self.error = Some(why);
    }

    pub fn warned(&mut self, line: String) {
        self.warning = Some(line);
    }

    /// A coverage read from `status.json`: an advance over the last one
    /// seen clears the errors (the first one read is only a baseline: an
    /// earlier archiver may have written it).
    pub fn covered(&mut self, us: i64, now: Instant) {
        match self.covered_us {
            Some(prev) if us > prev => {
                self.advanced = Some(now);
                self.error = None;
                self.warning = None;
            }
            _ => {}
        }
        self.covered_us = Some(self.covered_us.map_or(us, |p| p.max(us)));
    }

    /// Whether the current run advanced the coverage.
    pub fn streamed(&self) -> bool {
        self.advanced.is_some()
    }

    /// `(state, error)` for the heartbeat; `None` while a new archiver
    /// starts (or before the first start).
    pub fn state(&self, now: Instant) -> Option<(&'static str, Option<String>)> {
        let failing = |why: String| Some(("failing", Some(why)));
        let Some(started) = self.run_started else {
            return self.error.clone().and_then(failing);
        };
        match self.advanced {
            Some(a) if now.duration_since(a) <= STALL => Some(("streaming", None)),
            Some(a) => failing(self.warning.clone().unwrap_or_else(|| {
                format!(
                    "the archive has not advanced for {} s",
                    now.duration_since(a).as_secs()
                )
            })),
            None if self.error.is_some() => failing(
                self.warning
                    .clone()
                    .or(self.error.clone())
                    .unwrap_or_default(),
            ),
            None if now.duration_since(started) < START_GRACE => None,
            None => failing(self.warning.clone().unwrap_or_else(|| {
                format!(
                    "the archiver has archived nothing in {} s",
                    now.duration_since(started).as_secs()
                )
            })),
        }
    }

    /// The heartbeat's `ArchiveReport` of application `id`.
    pub fn report(&self, id: u64, now: Instant) -> Option<Value> {
        let (state, error) = self.state(now)?;
        let covered = self.covered_us.filter(|c| *c > 0).map(|c| c / 1_000_000);
        Some(json!({"application": id, "state": state, "covered_unix": covered, "error": error}))
    }
}

/// What running archivers must change into `wanted`: the ids to stop
/// (gone, or their task changed) and the tasks to start.
pub fn diff(running: &BTreeMap<u64, Task>, wanted: &[Task]) -> (Vec<u64>, Vec<Task>) {
    let stop = running
        .iter()
        .filter(|(id, t)| !wanted.iter().any(|w| w.application == **id && w == *t))
        .map(|(id, _)| *id)
        .collect();
    let mut seen = std::collections::HashSet::new();
    let start = wanted
        .iter()
        .filter(|w| seen.insert(w.application))
        .filter(|w| running.get(&w.application) != Some(w))
        .cloned()
        .collect();
    (stop, start)
}

/// A stop request an archiver's thread waits on.
#[derive(Default)]
struct Ctl {
    stop: Mutex<bool>,
    cv: Condvar,
    watch: Mutex<Watch>,
}

impl Ctl {
    fn stop(&self) {
        *lock(&self.stop) = true;
        self.cv.notify_all();
    }

    fn stopped(&self) -> bool {
        *lock(&self.stop)
    }

    /// Waits up to `d`; true when asked to stop.
    fn wait(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = lock(&self.stop);
        while !*g {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            if left.is_zero() {
                return false;
            }
            g = match self.cv.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

struct Running {
    task: Task,
    ctl: Arc<Ctl>,
    thread: JoinHandle<()>,
}

/// The service's archivers.
#[derive(Default)]
pub struct Archivers {
    running: Mutex<BTreeMap<u64, Running>>,
    /// Threads of archivers being stopped: joined when the service stops.
    stopping: Mutex<Vec<JoinHandle<()>>>,
}

impl Archivers {
    /// The heartbeat's `archives`: one report per archiver past its start.
    pub fn reports(&self) -> Vec<Value> {
        let now = Instant::now();
        lock(&self.running)
            .iter()
            .filter_map(|(id, r)| lock(&r.ctl.watch).report(*id, now))
            .collect()
    }

    /// Makes the running archivers those of `wanted`.
    pub fn reconcile(&self, svc: &Arc<Service>, wanted: &[Task]) {
        if svc.stop.get().is_some() {
            return;
        }
        let mut running = lock(&self.running);
        let tasks: BTreeMap<u64, Task> = running
            .iter()
            .map(|(id, r)| (*id, r.task.clone()))
            .collect();
        let (stop, start) = diff(&tasks, wanted);
        let mut stopping = lock(&self.stopping);
        stopping.retain(|t| !t.is_finished());
        for id in stop {
            if let Some(r) = running.remove(&id) {
                tracing::info!(application = id, volume = %r.task.volume, "log archiving no longer asked for: stopping its archiver");
                r.ctl.stop();
                stopping.push(r.thread);
            }
        }
        for t in start {
            let ctl = Arc::new(Ctl::default());
            let (s, c, task) = (svc.clone(), ctl.clone(), t.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("archive-{}", t.application))
                .spawn(move || supervise(&s, &task, &c));
            match spawned {
                Ok(thread) => {
                    tracing::info!(application = t.application, kind = %t.kind, volume = %t.volume, "starting the log archiver");
                    running.insert(
                        t.application,
                        Running {
                            task: t,
                            ctl,
                            thread,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(application = t.application, error = %e, "cannot start a thread for the log archiver")
                }
            }
        }
    }

    /// Stops every archiver and waits for their children to end.
    pub fn stop_all(&self) {
        let running = std::mem::take(&mut *lock(&self.running));
        let mut threads = std::mem::take(&mut *lock(&self.stopping));
        for (_, r) in running {
            r.ctl.stop();
            threads.push(r.thread);
        }
        for t in threads {
            let _ = t.join();
        }
    }

    /// The ids of the archivers running.
    pub fn ids(&self) -> Vec<u64> {
        lock(&self.running).keys().copied().collect()
    }
}

/// The child's hooks: no blocked signal, SIGTERM when the thread that
/// started it (its supervisor, which outlives it unless the service dies)
/// ends, a process group of its own (SIGKILL reaches its streamer too).
fn hooks(cmd: &mut Command) {
    super::runner::child_hooks_with(cmd, libc::SIGTERM)
}

enum Msg {
    Line(String),
    Stdout(String),
}

/// The text of a log line of the child: no colours, no time stamp, level
/// or target (`… WARN cdm_agent::logs: pg_receivewal exited` → the rest);
/// `Some` only for warnings and errors.
pub fn warning_of(line: &str) -> Option<String> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: up to the final letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let (_, rest) = [" WARN ", " ERROR "]
        .iter()
        .find_map(|l| plain.split_once(l))?;
    let rest = rest.trim();
    let rest = match rest.split_once(": ") {
        Some((target, msg)) if !target.contains(' ') => msg,
        _ => rest,
    };
    Some(rest.trim().to_string()).filter(|r| !r.is_empty())
}

/// Runs `t`'s archiver until asked to stop: starts, watches, restarts.
fn supervise(svc: &Arc<Service>, t: &Task, ctl: &Ctl) {
    let mut backoff = Backoff::new(RESTART_MIN, RESTART_MAX);
    let status = archive_dir(&svc.opts.state_dir, &t.volume);
    while !ctl.stopped() {
        let why = match args(t, &globals(svc)) {
            Ok(a) => run_once(svc, t, ctl, &a, &status),
            Err(e) => Some(e),
        };
        let Some(why) = why else {
            break;
        };
        if lock(&ctl.watch).streamed() {
            backoff.reset();
        }
        tracing::warn!(application = t.application, volume = %t.volume, error = %why, "the log archiver ended: restarting it");
        lock(&ctl.watch).ended(why);
        if ctl.wait(backoff.pause()) {
            break;
        }
    }
}

/// One run of the child; `None` when it was asked to stop, else why it
/// ended.
fn run_once(
    svc: &Service,
    t: &Task,
    ctl: &Ctl,
    args: &[OsString],
    status: &Path,
) -> Option<String> {
    let mut cmd = Command::new(&svc.opts.exe);
    cmd.args(args)
        .env("CDM_TOKEN", &svc.credential)
        .env_remove("CDM_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    hooks(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Some(format!("cannot start the archiver: {e}")),
    };
    lock(&ctl.watch).started(Instant::now());
    let rx = readers(&mut child);
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut stdout = String::new();
    let mut termed: Option<Instant> = None;
    let mut killed = false;
    let exit = loop {
        while let Ok(m) = rx.try_recv() {
            take(m, t, ctl, &mut tail, &mut stdout);
        }
        if let Some(us) = crate::logs::read_status(status).map(|s| s.covered_us) {
            lock(&ctl.watch).covered(us, Instant::now());
        }
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(application = t.application, error = %e, "cannot wait for the log archiver");
                break None;
            }
        }
        let now = Instant::now();
        if termed.is_none() && ctl.stopped() {
            // SAFETY: kill on our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            termed = Some(now);
        }
        if let Some(at) = termed {
            if !killed && now.duration_since(at) >= KILL_AFTER {
                tracing::warn!(
                    application = t.application,
                    "the log archiver ignored SIGTERM: SIGKILL"
                );
                // SAFETY: its own process group (setpgid in `hooks`).
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                killed = true;
            }
        }
        std::thread::sleep(TICK);
    };
    // What the readers still hold (bounded: a streamer it left behind
    // could keep the pipes open).
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(m) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        take(m, t, ctl, &mut tail, &mut stdout);
    }
    if termed.is_some() {
        tracing::info!(application = t.application, "log archiver stopped");
        return None;
    }
    Some(why_ended(exit, &stdout, &tail))
}

fn take(m: Msg, t: &Task, ctl: &Ctl, tail: &mut VecDeque<String>, stdout: &mut String) {
    match m {
        Msg::Stdout(s) => *stdout = s,
        Msg::Line(l) => {
            let Some(w) = warning_of(&l) else {
                return;
            };
            tracing::warn!(application = t.application, "log archiver: {w}");
            lock(&ctl.watch).warned(w.clone());
            tail.push_back(w);
            while tail.len() > 3 {
                tail.pop_front();
            }
        }
    }
}

/// Why a child ended: its JSON error, else its last warnings, else its
/// exit status.
pub fn why_ended(exit: Option<ExitStatus>, stdout: &str, tail: &VecDeque<String>) -> String {
    let printed = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<Value>(l).ok());
    if let Some(e) = printed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
    {
        return e.to_string();
    }
    if !tail.is_empty() {
        return tail.iter().cloned().collect::<Vec<_>>().join(" | ");
    }
    match exit {
        Some(s) => format!("the archiver ended by itself ({s})"),
        None => "the archiver could not be waited for".into(),
    }
}

/// Threads that read the child's stderr (by line) and stdout (whole).
fn readers(child: &mut Child) -> mpsc::Receiver<Msg> {
    let (tx, rx) = mpsc::channel();
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let _ = tx.send(Msg::Line(String::from_utf8_lossy(&buf).into_owned()));
                buf.clear();
            }
        });
    }
    if let Some(mut out) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            let _ = tx.send(Msg::Stdout(String::from_utf8_lossy(&v).into_owned()));
        });
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: u64, kind: &str, config: Value) -> Task {
        Task {
            application: id,
            kind: kind.into(),
            volume: format!("db1-{kind}-{id}"),
            config,
        }
    }

    fn g() -> Globals {
        Globals {
            url: "https://a:8443".into(),
            nbd: "a:10809".into(),
            state_dir: "/var/lib/cdm-agent".into(),
            ca_file: Some("/var/lib/cdm-agent/ca.pem".into()),
        }
    }

    fn strings(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn command_lines_map_the_config_like_backups() {
        let t = task(
            3,
            "postgresql",
            json!({"host": "/run/pg", "port": 5434, "user": "postgres", "pgdata": "/var/lib/pg", "password_file": "/etc/pw"}),
        );
        let a = strings(&args(&t, &g()).unwrap());
        assert_eq!(
            a,
            [
                "--json",
                "--url",
                "https://a:8443",
                "--nbd",
                "a:10809",
                "--state-dir",
                "/var/lib/cdm-agent",
                "--ca-file",
                "/var/lib/cdm-agent/ca.pem",
                "logs",
                "postgres",
                "--volume",
                "db1-postgresql-3",
                "--host",
                "/run/pg",
                "--port",
                "5434",
                "--user",
                "postgres",
                "--password-file",
                "/etc/pw"
            ]
        );
        let m = task(
            4,
            "mariadb",
            json!({"socket": "/run/mysqld/m.sock", "datadir": "/d"}),
        );
        let a = strings(&args(&m, &g()).unwrap());
        assert_eq!(
            &a[9..],
            [
                "logs",
                "mariadb",
                "--volume",
                "db1-mariadb-4",
                "--socket",
                "/run/mysqld/m.sock"
            ]
        );
        assert!(args(&task(5, "postgresql", json!({})), &g())
            .unwrap_err()
            .contains("\"host\""));
        assert!(args(&task(6, "files", json!({"path": "/"})), &g()).is_err());
    }

    #[test]
    fn reconciling_starts_the_new_stops_the_gone_and_restarts_the_changed() {
        let a = task(1, "postgresql", json!({"host": "/run/pg"}));
        let b = task(2, "postgresql", json!({"host": "/run/pg", "port": 5433}));
        let running = BTreeMap::from([(1, a.clone()), (2, b.clone())]);
        assert_eq!(diff(&running, &[a.clone(), b.clone()]), (vec![], vec![]));
        let c = task(3, "mariadb", json!({}));
        assert_eq!(
            diff(&running, &[a.clone(), c.clone()]),
            (vec![2], vec![c.clone()])
        );
        let b2 = task(2, "postgresql", json!({"host": "/run/pg", "port": 5434}));
        assert_eq!(
            diff(&running, &[a.clone(), b2.clone()]),
            (vec![2], vec![b2])
        );
        assert_eq!(diff(&running, &[]), (vec![1, 2], vec![]));
        // A task listed twice runs once.
        assert_eq!(
            diff(&BTreeMap::new(), &[c.clone(), c.clone()]),
            (vec![], vec![c])
        );
    }

    #[test]
    fn states_follow_the_child_and_its_coverage() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Watch::default();
        assert_eq!(w.state(t0), None, "not started");
        w.started(t0);
        w.covered(1_000_000, at(1));
        assert_eq!(w.state(at(2)), None, "a baseline is no advance: starting");
        w.covered(2_000_000, at(3));
        assert_eq!(w.state(at(4)), Some(("streaming", None)));
        let r = w.report(9, at(4)).unwrap();
        assert_eq!(r["covered_unix"], 2);
        assert_eq!(r["state"], "streaming");
        // The server stops: the child runs on, the coverage stands still.
        w.warned("sampling the server's WAL position: connection refused".into());
        assert_eq!(w.state(at(3) + STALL).unwrap().0, "streaming");
        assert_eq!(
            w.state(at(4) + STALL),
            Some((
                "failing",
                Some("sampling the server's WAL position: connection refused".into())
            ))
        );
        // It comes back.
        w.covered(3_000_000, at(30));
        assert_eq!(w.state(at(31)), Some(("streaming", None)));
        // The child exits: failing with its error, through the restart,
        // until the coverage advances again.
        w.ended("cannot connect to the server".into());
        let failing = Some(("failing", Some("cannot connect to the server".to_string())));
        assert_eq!(w.state(at(32)), failing);
        w.started(at(33));
        assert_eq!(w.state(at(34)), failing);
        w.covered(4_000_000, at(35));
        assert_eq!(w.state(at(36)), Some(("streaming", None)));
        // A run that never archives anything fails after its grace.
        let mut w = Watch::default();
        w.started(t0);
        assert_eq!(w.state(t0 + START_GRACE - Duration::from_secs(1)), None);
        let (state, why) = w.state(t0 + START_GRACE).unwrap();
        assert_eq!(state, "failing");
        assert!(why.unwrap().contains("archived nothing"));
    }

    #[test]
    fn warnings_are_read_from_the_childs_log() {
        let l = "\u{1b}[2m2026-11-30T20:00:00.1Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2mcdm_agent::logs\u{1b}[0m\u{1b}[2m:\u{1b}[0m pg_receivewal exited (exit status: 1): could not connect\n";
        assert_eq!(
            warning_of(l).as_deref(),
            Some("pg_receivewal exited (exit status: 1): could not connect")
        );
        assert_eq!(
            warning_of("2026-11-30T20:00:00Z  INFO cdm_agent::logs: streaming WAL"),
            None
        );
        assert_eq!(
            warning_of("2026-11-30T20:00:00Z ERROR x: boom").as_deref(),
            Some("boom")
        );
    }

    #[test]
    fn why_a_child_ended() {
        let tail = VecDeque::from(["a".to_string(), "b".to_string()]);
        assert_eq!(why_ended(None, "{\"error\": \"down\"}\n", &tail), "down");
        assert_eq!(why_ended(None, "", &tail), "a | b");
        use std::os::unix::process::ExitStatusExt;
        let e = why_ended(Some(ExitStatus::from_raw(0)), "", &VecDeque::new());
        assert!(e.contains("ended by itself"), "{e}");
    }

    /// A supervised child dies with its supervisor thread (the service):
    /// SIGTERM, as `PR_SET_PDEATHSIG` says.
    #[test]
    fn children_get_sigterm_when_their_supervisor_ends() {
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut cmd = Command::new("sh");
            cmd.args([
                "-c",
                "trap 'echo term; exit 0' TERM; echo up; while :; do sleep 0.05; done",
            ])
            .stdout(Stdio::piped());
            hooks(&mut cmd);
            let mut c = cmd.spawn().unwrap();
            let mut out = BufReader::new(c.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line, "up\n");
            tx.send((c.id(), out)).unwrap();
            std::mem::forget(c);
        });
        let (pid, mut out) = rx.recv().unwrap();
        t.join().unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "term\n", "the child got SIGTERM");
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
    }
}

//! Runs one job: its `cdm-agent` child (host credential in `CDM_TOKEN`,
//! a clean signal mask, killed with the service by `PR_SET_PDEATHSIG`),
//! its stderr streamed as the job's log in batches that double as
//! keep-alives, the appliance's cancel honoured (SIGTERM, SIGKILL after
//! [`KILL_AFTER`]), and the outcome reported until the appliance takes it.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::deliver::{self, Delivery, Outcome, ServicePacer};
use super::job::{self, AgentJob, Globals, Work};
use super::joblog::LogBatch;
use super::link::Progress;
use super::{Backoff, Claim, ServeError, Service, Stop};

/// Between SIGTERM and SIGKILL.
pub const KILL_AFTER: Duration = Duration::from_secs(30);
/// Starts job `raw` in a thread of its own (unless it already runs here).
pub fn start(svc: &Arc<Service>, raw: Value) {
    let Some(id) = raw.get("id").and_then(Value::as_u64) else {
        tracing::warn!(job = %raw, "a job without an id: ignored");
        return;
    };
    match svc.claim(id) {
        Claim::Claimed => {}
        Claim::Running => return,
        Claim::Full => {
            refuse(svc, id);
            return;
        }
    }
    let s = svc.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("job-{id}"))
        .spawn(move || {
            let mut log = LogBatch::new(Instant::now());
            let outcome = match serde_json::from_value::<AgentJob>(raw) {
                Ok(j) => run(&s, &j, &mut log),
                Err(e) => Some(Outcome::failed(format!(
                    "the agent cannot read the job: {e}"
                ))),
            };
            if let Some(o) = outcome {
                report(&s, id, &o, &mut log);
            }
            s.release(id);
        });
    if let Err(e) = spawned {
        tracing::error!(job = id, error = %e, "cannot start a thread for the job");
        svc.release(id);
    }
}

/// Makes the child start with no blocked signal, die with the thread that
/// started it (the job's thread, which lives until the child ends: with
/// the service), and lead its own process group (a cancel reaches the
/// programs it runs too).
pub fn child_hooks(cmd: &mut Command) {
    child_hooks_with(cmd, libc::SIGKILL)
}

/// [`child_hooks`], the child getting `death` when the thread that started
/// it ends (SIGTERM lets an archiver stop its streamer and detach).
pub fn child_hooks_with(cmd: &mut Command, death: libc::c_int) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook calls only async-signal-safe functions (sigmask,
    // prctl, getppid, setpgid).
    unsafe {
        cmd.pre_exec(move || {
            cdm_common::signals::clear_mask();
            if libc::prctl(libc::PR_SET_PDEATHSIG, death) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The service died before the prctl: nobody would stop us.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the agent service is gone"));
            }
            libc::setpgid(0, 0);
            Ok(())
        });
    }
}

/// Signals the child's process group.
fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill on the group the child leads (setpgid in child_hooks).
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), sig);
    }
}

enum Msg {
    Line(String),
    Stdout(String),
    StderrEnd,
}

/// Why the child is being stopped.
#[derive(Clone, Debug, PartialEq)]
enum Ending {
    Cancel,
    /// The appliance no longer runs the job (failed it meanwhile).
    Gone(String),
    Service,
}

/// Runs the job; `None` when there is nothing to report (the appliance
/// dropped the job).
fn run(svc: &Service, j: &AgentJob, log: &mut LogBatch) -> Option<Outcome> {
    let g = globals(svc);
    let plan = match job::plan(j, &g) {
        Ok(p) => p,
        Err(why) => return Some(Outcome::failed(why)),
    };
    let sub: Vec<String> = plan
        .args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .skip_while(|a| !matches!(a.as_str(), "backup" | "restore" | "vm" | "drill"))
        .collect();
    tracing::info!(job = j.id, kind = %j.kind, application = %j.application.name, attempt = j.attempt, "job started");
    log.push(&format!(
        "cdm-agent on {}: {} of {} ({}), attempt {}: cdm-agent {}",
        svc.host,
        j.kind,
        j.application.name,
        j.application.kind,
        j.attempt,
        sub.join(" ")
    ));
    let mut cmd = Command::new(&svc.opts.exe);
    cmd.args(&plan.args)
        .env("CDM_TOKEN", &svc.credential)
        .env_remove("CDM_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    child_hooks(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Some(Outcome::failed(format!(
                "cannot start the job's process: {e}"
            )))
        }
    };
    svc.set_pid(j.id, child.id());
    let rx = readers(&mut child);
    let (status, stdout, ending) = watch(svc, j.id, &mut child, &rx, log);
    let out = outcome(&plan.work, status, &stdout, ending.as_ref(), log, &svc.host);
    tracing::info!(job = j.id, state = out.as_ref().map(|o| o.state), error = ?out.as_ref().and_then(|o| o.error.clone()), "job ended");
    out
}

/// Where the service's children reach the appliance and keep their state.
pub fn globals(svc: &Service) -> Globals {
    Globals {
        url: svc.opts.url.clone(),
        nbd: svc.opts.nbd.clone(),
        state_dir: svc.opts.state_dir.clone(),
        ca_file: Some(super::credential::ca_path(&svc.opts.state_dir)).filter(|p| p.exists()),
    }
}

/// Threads that read the child's stderr (line by line) and stdout (whole).
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
            let _ = tx.send(Msg::StderrEnd);
        });
    }
    if let Some(mut out) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = out.read_to_end(&mut s);
            let _ = tx.send(Msg::Stdout(String::from_utf8_lossy(&s).into_owned()));
        });
    }
    rx
}

/// Streams the log until the child exits; stops it on cancel, when the
/// appliance drops the job, or when the service stops.
fn watch(
    svc: &Service,
    id: u64,
    child: &mut Child,
    rx: &mpsc::Receiver<Msg>,
    log: &mut LogBatch,
) -> (Option<ExitStatus>, String, Option<Ending>) {
    let mut stdout = String::new();
    let mut ending: Option<Ending> = None;
    let mut termed: Option<Instant> = None;
    let mut killed = false;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Msg::Line(l)) => log.push(&l),
            Ok(Msg::Stdout(s)) => stdout = s,
            Ok(Msg::StderrEnd) | Err(_) => {}
        }
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(job = id, error = %e, "cannot wait for the job's process");
                break None;
            }
        }
        let now = Instant::now();
        if ending.is_none() && log.due(now) {
            let batch = log.batch();
            match svc.link.progress(id, &batch.lines) {
                Ok(p) => {
                    backoff.reset();
                    log.delivered(&batch, now);
                    match p {
                        Progress::Continue => {}
                        Progress::Cancel => ending = Some(Ending::Cancel),
                        Progress::Gone(m) => ending = Some(Ending::Gone(m)),
                    }
                }
                Err(ServeError::Retired(m)) => {
                    svc.stop.trigger(Stop::Retired(m));
                    log.retry_at(now);
                }
                Err(ServeError::Refused(m)) => {
                    // Sending it again would be refused again (a 4xx is
                    // an answer): the log goes on without that batch.
                    tracing::warn!(job = id, lines = batch.lines.len(), message = %m, "the appliance refused a batch of the job's log: dropped");
                    log.delivered(&batch, now);
                }
                Err(e) => {
                    let d = backoff.pause();
                    if backoff.failures() == 1 {
                        tracing::warn!(job = id, error = %e, "progress not delivered: the job goes on");
                    }
                    log.retry_at(now + d);
                }
            }
        }
        if ending.is_none() && svc.stop.get().is_some() {
            ending = Some(Ending::Service);
        }
        if ending.is_some() && termed.is_none() {
            tracing::info!(job = id, why = ?ending, "stopping the job's process");
            signal(child, libc::SIGTERM);
            termed = Some(now);
        }
        if let Some(t) = termed {
            if !killed && now.duration_since(t) >= KILL_AFTER {
                tracing::warn!(
                    job = id,
                    "the job's process ignored SIGTERM for 30 s: SIGKILL"
                );
                signal(child, libc::SIGKILL);
                killed = true;
            }
        }
    };
    // What the readers still have: stdout ends with the child, unless a
    // program it left running holds the pipe (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got_out = !stdout.is_empty();
    let mut err_done = false;
    while !(got_out && err_done) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Msg::Line(l)) => log.push(&l),
            Ok(Msg::Stdout(s)) => {
                stdout = s;
                got_out = true;
            }
            Ok(Msg::StderrEnd) => err_done = true,
            Err(_) => break,
        }
    }
    (status, stdout, ending)
}

/// The outcome from how the child ended and what it printed.
fn outcome(
    work: &Work,
    status: Option<ExitStatus>,
    stdout: &str,
    ending: Option<&Ending>,
    log: &LogBatch,
    host: &str,
) -> Option<Outcome> {
    let printed: Option<Value> = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok());
    let ok = status.is_some_and(|s| s.success());
    if let (true, Some(v)) = (ok, &printed) {
        if v.get("error").is_none() {
            // Finished before the stop took effect: the work is done.
            return Some(Outcome {
                state: "succeeded",
                result: Some(job::result(work, v.clone())),
                error: None,
            });
        }
    }
    let why = printed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .filter(|s| !s.is_empty())
        .or_else(|| Some(log.tail_text()).filter(|t| !t.is_empty()))
        .unwrap_or_else(|| match status {
            Some(s) => format!("the job's process ended with {s} and printed no result"),
            None => "the job's process could not be waited for".to_string(),
        });
    match ending {
        Some(Ending::Cancel) => Some(Outcome {
            state: "cancelled",
            result: None,
            error: Some("cancelled".into()),
        }),
        Some(Ending::Gone(m)) => {
            tracing::warn!(message = %m, "the appliance no longer runs the job: not reported");
            None
        }
        Some(Ending::Service) => Some(Outcome::failed(format!(
            "the agent on {host} stopped while the job ran"
        ))),
        None => Some(Outcome::failed(why)),
    }
}

/// Tells the appliance the outcome (`deliver`), stopping the service if
/// the credential is refused.
fn report(svc: &Service, id: u64, o: &Outcome, log: &mut LogBatch) {
    if let Delivery::Retired(m) = deliver::deliver(&svc.link, &mut ServicePacer(svc), id, o, log) {
        svc.stop.trigger(Stop::Retired(m));
    }
}

/// The reason a job beyond `--max-jobs` is refused.
pub const AT_LIMIT: &str = "agent at its --max-jobs limit";

/// Finishes a job this agent has no room for as failed (the appliance
/// retries it), in a thread of its own: the poll goes on meanwhile.
fn refuse(svc: &Arc<Service>, id: u64) {
    tracing::warn!(
        job = id,
        max_jobs = svc.opts.max_jobs,
        "the appliance handed out a job beyond this agent's --max-jobs: refused"
    );
    let s = svc.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("refuse-{id}"))
        .spawn(move || {
            let mut log = LogBatch::new(Instant::now());
            log.push(&format!(
                "cdm-agent on {}: {AT_LIMIT} ({})",
                s.host, s.opts.max_jobs
            ));
            report(&s, id, &Outcome::failed(AT_LIMIT), &mut log);
        });
    if let Err(e) = spawned {
        tracing::error!(job = id, error = %e, "cannot start a thread to refuse the job");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn outcomes() {
        let mut log = LogBatch::new(Instant::now());
        let ok = outcome(
            &Work::Backup,
            Some(exit(0)),
            "{\"snapshot\": 3}\n",
            None,
            &log,
            "h",
        )
        .unwrap();
        assert_eq!(ok.state, "succeeded");
        assert_eq!(ok.result.unwrap()["snapshot"], 3);
        let e = outcome(
            &Work::Backup,
            Some(exit(1)),
            "{\"error\": \"database down\"}",
            None,
            &log,
            "h",
        )
        .unwrap();
        assert_eq!(e, Outcome::failed("database down"));
        log.push("first");
        log.push("thread 'main' panicked at x");
        let e = outcome(&Work::Backup, Some(exit(101)), "", None, &log, "h").unwrap();
        assert_eq!(e.error.unwrap(), "first | thread 'main' panicked at x");
        let empty = LogBatch::new(Instant::now());
        let e = outcome(&Work::Backup, Some(exit(2)), "", None, &empty, "h").unwrap();
        assert!(e.error.unwrap().contains("exit status: 2"));
        let c = outcome(
            &Work::Backup,
            Some(exit(143)),
            "",
            Some(&Ending::Cancel),
            &log,
            "h",
        )
        .unwrap();
        assert_eq!(c.state, "cancelled");
        let s = outcome(&Work::Backup, None, "", Some(&Ending::Service), &log, "db1").unwrap();
        assert_eq!(
            s.error.unwrap(),
            "the agent on db1 stopped while the job ran"
        );
        assert_eq!(
            outcome(
                &Work::Backup,
                Some(exit(1)),
                "",
                Some(&Ending::Gone("409".into())),
                &log,
                "h"
            ),
            None
        );
        // Done before a cancel took effect: done.
        let d = outcome(
            &Work::Backup,
            Some(exit(0)),
            "{\"snapshot\": 4}",
            Some(&Ending::Cancel),
            &log,
            "h",
        )
        .unwrap();
        assert_eq!(d.state, "succeeded");
    }

    /// The child's lifetime: a clean signal mask whatever the service
    /// blocks, its own process group, and death with the thread that
    /// started it.
    #[test]
    fn children_die_with_their_starter_and_start_unmasked() {
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            cdm_common::signals::block_termination();
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "grep SigBlk /proc/self/status; exec sleep 600"])
                .stdout(Stdio::piped());
            child_hooks(&mut cmd);
            let mut c = cmd.spawn().unwrap();
            let mut line = String::new();
            BufReader::new(c.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            tx.send((c.id(), line)).unwrap();
            // The thread ends with the child running: PR_SET_PDEATHSIG.
            std::mem::forget(c);
        });
        let (pid, mask) = rx.recv().unwrap();
        t.join().unwrap();
        assert!(mask.contains("0000000000000000"), "{mask}");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if let Some(pgrp) = fields.get(2) {
            assert_eq!(pgrp.parse::<u32>().unwrap(), pid, "its own process group");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next();
            if matches!(state, None | Some('Z') | Some('X')) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the child outlived the thread that started it"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
    }
}

//! `cdm-agent serve`: the long-running agent. It enrols once with a
//! one-time token and keeps the host credential in its state directory
//! (`credential`), heartbeats with what it is and what it found
//! (`heartbeat`, `discover`), pulls its jobs with a long poll and runs each
//! as a child process of this binary (`job`, `runner`); the log archivers
//! the appliance asks for in its heartbeat answers run beside them
//! (`archive`). Every connection is
//! outbound: the host opens no port. Appliance outages are waited out with
//! backoff; a refused credential (the host was retired) stops the service
//! with [`EXIT_RETIRED`].

pub mod archive;
pub mod credential;
pub mod deliver;
pub mod discover;
pub mod discover_maria;
pub mod drill;
pub mod heartbeat;
pub mod job;
pub mod joblog;
pub mod link;
pub mod runner;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cdm_common::lock::lock;
use serde_json::json;

use credential::Credential;
use link::Link;

/// Exit code: no credential and no usable enrolment token (restarting will
/// not help: systemd's unit says `RestartPreventExitStatus`).
pub const EXIT_NOT_ENROLLED: u8 = 3;
/// Exit code: the appliance refused the credential (host retired).
pub const EXIT_RETIRED: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not enrolled: {0}")]
    NotEnrolled(String),
    #[error("the appliance refused the enrolment: {0}")]
    EnrolRefused(String),
    #[error("the appliance refuses this host's credential (the host was retired or its credential revoked; enrol it again with a new token): {0}")]
    Retired(String),
    #[error("the appliance cannot be reached: {0}")]
    Unreachable(String),
    #[error("the appliance refused the call: {0}")]
    Refused(String),
}

impl ServeError {
    pub fn io(path: &Path, source: std::io::Error) -> ServeError {
        ServeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServeError::NotEnrolled(_) | ServeError::EnrolRefused(_) => EXIT_NOT_ENROLLED,
            ServeError::Retired(_) => EXIT_RETIRED,
            _ => 1,
        }
    }
}

/// `cdm-agent serve`'s settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub url: String,
    pub nbd: String,
    pub state_dir: PathBuf,
    pub enrol: Option<String>,
    pub name: Option<String>,
    /// `None`: no discovery (`--discover none`).
    pub discover: Option<discover::Roots>,
    pub max_jobs: usize,
    /// The appliance's CA (`--ca-file`): pinned (copied into the state
    /// directory), then only the pinned copy is trusted.
    pub ca_file: Option<PathBuf>,
    /// This binary, run for each job.
    pub exe: PathBuf,
    /// `/etc/os-release`.
    pub os_release: PathBuf,
}

/// Why the service stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    Signal(i32),
    Retired(String),
}

/// A stop request every thread can wait on (with a timeout: it is also
/// the service's only way to pause).
#[derive(Default)]
pub struct StopFlag {
    why: Mutex<Option<Stop>>,
    cv: Condvar,
}

impl StopFlag {
    pub fn trigger(&self, why: Stop) {
        let mut g = lock(&self.why);
        if g.is_none() {
            *g = Some(why);
        }
        self.cv.notify_all();
    }

    pub fn get(&self) -> Option<Stop> {
        lock(&self.why).clone()
    }

    /// Waits up to `d`; true when the service is stopping.
    pub fn wait(&self, d: Duration) -> bool {
        // `Duration::MAX` (wait for good) has no deadline.
        let deadline = Instant::now().checked_add(d);
        let mut g = lock(&self.why);
        while g.is_none() {
            let left = match deadline {
                Some(t) => match t.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => l,
                    _ => return false,
                },
                None => Duration::from_secs(3600),
            };
            g = match self.cv.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

/// Exponential backoff: 1, 2, 4 … up to `max`.
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The pause after one more failure.
    pub fn pause(&mut self) -> Duration {
        let d = self
            .base
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        d
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// What [`Service::claim`] found.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    Claimed,
    /// The job already runs here (handed out twice).
    Running,
    /// `--max-jobs` jobs run already.
    Full,
}

/// What the service's threads share.
pub struct Service {
    pub opts: Options,
    pub host: String,
    pub credential: String,
    pub os: String,
    pub link: Link,
    pub discover: Option<discover::Roots>,
    pub stop: StopFlag,
    /// Running jobs: id → child pid (0 until it started).
    running: Mutex<BTreeMap<u64, u32>>,
    slots: Condvar,
    /// The log archivers (no job slot of their own).
    pub archivers: archive::Archivers,
}

impl Service {
    pub fn running_ids(&self) -> Vec<u64> {
        lock(&self.running).keys().copied().collect()
    }

    /// Claims a slot for job `id`: never more than `--max-jobs` at once,
    /// whatever the appliance hands out.
    fn claim(&self, id: u64) -> Claim {
        let mut g = lock(&self.running);
        if g.contains_key(&id) {
            return Claim::Running;
        }
        if g.len() >= self.opts.max_jobs {
            return Claim::Full;
        }
        g.insert(id, 0);
        Claim::Claimed
    }

    /// Slots free for new jobs.
    fn free_slots(&self) -> usize {
        self.opts.max_jobs.saturating_sub(lock(&self.running).len())
    }

    fn set_pid(&self, id: u64, pid: u32) {
        lock(&self.running).insert(id, pid);
    }

    fn release(&self, id: u64) {
        lock(&self.running).remove(&id);
        self.slots.notify_all();
    }

    /// Waits until fewer than `max_jobs` run (or the service stops);
    /// true when there is room.
    fn wait_for_slot(&self) -> bool {
        let mut g = lock(&self.running);
        loop {
            if self.stop.get().is_some() {
                return false;
            }
            if g.len() < self.opts.max_jobs {
                return true;
            }
            g = match self.slots.wait_timeout(g, Duration::from_secs(1)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Waits until no job runs, at most `d`.
    fn wait_idle(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = lock(&self.running);
        while !g.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = match self
                .slots
                .wait_timeout(g, (deadline - now).min(Duration::from_secs(1)))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

/// The stored credential, or a new one from the enrolment token (retried
/// while the appliance cannot be reached).
fn credential(
    opts: &Options,
    ca: Option<&Path>,
    os: &str,
    stop: &StopFlag,
) -> Result<Credential, ServeError> {
    if let Some(c) = credential::load(&opts.state_dir)? {
        if c.url.trim_end_matches('/') != opts.url.trim_end_matches('/') {
            tracing::warn!(enrolled_with = %c.url, url = %opts.url, "the appliance's address changed since enrolment: using the new one");
        }
        if opts.enrol.is_some() {
            tracing::info!(host = %c.host, "already enrolled: the enrolment token is not used");
        }
        return Ok(c);
    }
    let Some(token) = opts
        .enrol
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return Err(ServeError::NotEnrolled(format!(
            "no credential in {} and no enrolment token: make one on the appliance (cdmctl host enrol-token) and give it with --enrol",
            credential::path(&opts.state_dir).display()
        )));
    };
    let body = json!({
        "token": token,
        "name": opts.name,
        "hostname": heartbeat::hostname(),
        "version": heartbeat::version(),
        "os": os,
    });
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let e = loop {
        match Link::enrol(&opts.url, ca, &body) {
            Ok(e) => break e,
            // A certificate the CA does not vouch for will not change by
            // waiting: say so and stop.
            Err(ServeError::Unreachable(m)) if m.contains("certificate") => {
                return Err(ServeError::EnrolRefused(m));
            }
            Err(ServeError::Unreachable(m)) => {
                let d = backoff.pause();
                tracing::warn!(error = %m, retry_in = ?d, "enrolment: the appliance cannot be reached");
                if stop.wait(d) {
                    return Err(ServeError::Unreachable(m));
                }
            }
            Err(e) => return Err(e),
        }
    };
    let c = Credential {
        url: opts.url.clone(),
        host: e.host,
        credential: e.credential,
        heartbeat_seconds: e.heartbeat_seconds,
        enrolled_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    credential::save(&opts.state_dir, &c)?;
    tracing::info!(host = %c.host, "enrolled");
    Ok(c)
}

/// Runs the service until a termination signal (`Ok`) or a refused
/// credential (`Err(Retired)`).
pub fn run(opts: Options) -> Result<(), ServeError> {
    // Before any thread exists: every thread inherits the blocked mask and
    // only the signal thread takes termination signals.
    cdm_common::signals::block_termination();
    let early = Arc::new(StopFlag::default());
    {
        let s = early.clone();
        std::thread::spawn(move || {
            let sig = cdm_common::signals::wait_for_termination();
            s.trigger(Stop::Signal(sig));
        });
    }
    std::fs::create_dir_all(&opts.state_dir).map_err(|e| ServeError::io(&opts.state_dir, e))?;
    let os = heartbeat::os_name(&opts.os_release);
    if let Some(src) = &opts.ca_file {
        if credential::pin_ca(&opts.state_dir, src)? {
            tracing::info!(ca = %src.display(), "the appliance's CA is pinned");
        }
    }
    let pinned = credential::ca_path(&opts.state_dir);
    let ca = pinned.exists().then_some(pinned.as_path());
    let cred = credential(&opts, ca, &os, &early)?;
    let svc = Arc::new(Service {
        host: cred.host.clone(),
        link: Link::new(&opts.url, &cred.credential, ca)?,
        credential: cred.credential.clone(),
        os,
        discover: opts.discover.clone(),
        opts,
        stop: StopFlag::default(),
        running: Mutex::new(BTreeMap::new()),
        slots: Condvar::new(),
        archivers: archive::Archivers::default(),
    });
    {
        // Signals reach the service's own flag too.
        let (e, s) = (early.clone(), svc.clone());
        std::thread::spawn(move || {
            e.wait(Duration::MAX);
            if let Some(why) = e.get() {
                s.stop.trigger(why);
            }
        });
    }
    // The first heartbeat before the first poll: it tells the appliance
    // that no job of an earlier run survives, before this run takes any.
    // A job the appliance handed to a poll of a run that died is failed by
    // the appliance itself (one poll per host: this run's first poll ends
    // a dead one; each heartbeat reconciles the jobs it lists).
    let mut beats = heartbeat::Beats::new();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let interval = loop {
        match beats.beat(&svc) {
            Ok(i) => break i,
            Err(ServeError::Retired(m)) => return Err(ServeError::Retired(m)),
            Err(e) => {
                let d = backoff.pause();
                tracing::warn!(error = %e, retry_in = ?d, "first heartbeat failed");
                if svc.stop.wait(d) {
                    return finish_stop(&svc);
                }
            }
        }
    };
    // No job of an earlier run survives it: what its drills left goes.
    drill::cleanup_stale(&svc);
    tracing::info!(host = %svc.host, url = %svc.opts.url, max_jobs = svc.opts.max_jobs, "serving");
    {
        let s = svc.clone();
        std::thread::spawn(move || heartbeat::run(s, beats, interval));
    }
    {
        let s = svc.clone();
        std::thread::spawn(move || poll(s));
    }
    svc.stop.wait(Duration::MAX);
    finish_stop(&svc)
}

/// Stops what runs and says why the service ends.
fn finish_stop(svc: &Arc<Service>) -> Result<(), ServeError> {
    let why = svc.stop.get();
    tracing::info!(?why, jobs = ?svc.running_ids(), archivers = ?svc.archivers.ids(), "stopping");
    // Archivers are told first: they end their streamers and detach their
    // log volumes while the jobs stop.
    svc.archivers.stop_all();
    // Job threads see the stop, end their children (SIGTERM, then SIGKILL)
    // and report the jobs failed; their wait is bounded by the kill delay.
    if !svc.wait_idle(runner::KILL_AFTER + Duration::from_secs(15)) {
        tracing::warn!(jobs = ?svc.running_ids(), "jobs still running at exit: their children die with the service");
    }
    match why {
        Some(Stop::Retired(m)) => {
            tracing::error!(host = %svc.host, "{m}: the appliance refuses this host's credential (the host was retired); stopping for good — enrol again with a new token to come back");
            Err(ServeError::Retired(m))
        }
        _ => Ok(()),
    }
}

/// Pulls jobs while there is room for one, each run in its own thread.
fn poll(svc: Arc<Service>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let wait = Duration::from_secs(link::MAX_WAIT - 5);
    while svc.wait_for_slot() {
        match svc.link.jobs(wait.as_secs(), svc.free_slots().max(1)) {
            Ok(jobs) => {
                if backoff.failures() > 0 {
                    tracing::info!("the appliance answers again");
                }
                backoff.reset();
                for j in jobs {
                    runner::start(&svc, j);
                }
            }
            Err(ServeError::Retired(m)) => {
                svc.stop.trigger(Stop::Retired(m));
                return;
            }
            Err(e) => {
                let d = backoff.pause();
                if backoff.failures() == 1 || backoff.failures().is_multiple_of(10) {
                    tracing::warn!(error = %e, retry_in = ?d, failures = backoff.failures(), "polling for jobs failed");
                }
                if svc.stop.wait(d) {
                    return;
                }
            }
        }
    }
}

/// `HOST:10809` of an API URL: the default NBD address.
pub fn default_nbd(url: &str) -> String {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or("127.0.0.1")
        .split(['/', ':'])
        .next()
        .unwrap_or("127.0.0.1");
    format!("{host}:10809")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let v: Vec<u64> = (0..8).map(|_| b.pause().as_secs()).collect();
        assert_eq!(v, [1, 2, 4, 8, 16, 30, 30, 30]);
        for _ in 0..100 {
            b.pause();
        }
        assert_eq!(b.pause(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.pause(), Duration::from_secs(1));
    }

    #[test]
    fn stop_flag_wakes_waiters_and_keeps_the_first_reason() {
        let f = Arc::new(StopFlag::default());
        assert!(!f.wait(Duration::from_millis(1)));
        let g = f.clone();
        let t = std::thread::spawn(move || g.wait(Duration::MAX));
        f.trigger(Stop::Retired("gone".into()));
        f.trigger(Stop::Signal(15));
        assert!(t.join().unwrap());
        assert_eq!(f.get(), Some(Stop::Retired("gone".into())));
    }

    fn service(max_jobs: usize) -> Service {
        Service {
            opts: Options {
                url: "http://127.0.0.1:9".into(),
                nbd: "127.0.0.1:10809".into(),
                state_dir: "/nonexistent".into(),
                enrol: None,
                name: None,
                discover: None,
                max_jobs,
                ca_file: None,
                exe: "/bin/false".into(),
                os_release: "/etc/os-release".into(),
            },
            host: "h".into(),
            credential: "c".into(),
            os: "linux".into(),
            link: Link::new("http://127.0.0.1:9", "c", None).unwrap(),
            discover: None,
            stop: StopFlag::default(),
            running: Mutex::new(BTreeMap::new()),
            slots: Condvar::new(),
            archivers: archive::Archivers::default(),
        }
    }

    /// The appliance may hand out more than the agent asked for: the
    /// agent never runs more than `--max-jobs`.
    #[test]
    fn never_more_jobs_than_max_jobs() {
        let s = service(2);
        assert_eq!(s.free_slots(), 2);
        assert_eq!(s.claim(1), Claim::Claimed);
        assert_eq!(s.claim(1), Claim::Running);
        assert_eq!(s.free_slots(), 1);
        assert_eq!(s.claim(2), Claim::Claimed);
        assert_eq!(s.free_slots(), 0);
        assert_eq!(s.claim(3), Claim::Full);
        assert_eq!(s.running_ids(), [1, 2]);
        s.release(1);
        assert_eq!(s.claim(3), Claim::Claimed);
    }

    #[test]
    fn nbd_address_from_the_url() {
        assert_eq!(
            default_nbd("https://app.example:8443/"),
            "app.example:10809"
        );
        assert_eq!(default_nbd("http://127.0.0.1:8080"), "127.0.0.1:10809");
    }
}

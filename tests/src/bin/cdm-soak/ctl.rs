//! What the load threads and the controller share: the phase (running,
//! down for a kill, a full disk, quiesced), the current API, the models,
//! the counters and the failures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::daemon::Api;
use crate::model::{Snapshot, Volume};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Run,
    /// The host filesystem is full: ENOSPC and 507 are right answers.
    Full,
    /// snapshotd is being killed and restarted: errors are expected; the
    /// load threads park until the next epoch.
    Down,
    /// The load stops for the final checks (parked).
    Quiesce,
    Stop,
}

struct State {
    phase: Phase,
    epoch: u64,
    parked: usize,
}

pub struct Gate {
    state: Mutex<State>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a load thread checks in before each operation: parks while
    /// the daemon is down or the load quiesced. Returns the phase and
    /// epoch the operation runs in, or `None` when the soak ends.
    pub fn checkpoint(&self) -> Option<(Phase, u64)> {
        let mut s = self.lock();
        if matches!(s.phase, Phase::Down | Phase::Quiesce) {
            s.parked += 1;
            self.cv.notify_all();
            while matches!(s.phase, Phase::Down | Phase::Quiesce) {
                s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
        }
        match s.phase {
            Phase::Stop => None,
            p => Some((p, s.epoch)),
        }
    }

    pub fn phase(&self) -> (Phase, u64) {
        let s = self.lock();
        (s.phase, s.epoch)
    }

    pub fn set(&self, phase: Phase) {
        let mut s = self.lock();
        // A new epoch begins when the load resumes after a kill or
        // quiesce: connections of the old one are gone.
        let parked = |p: Phase| matches!(p, Phase::Down | Phase::Quiesce);
        if parked(s.phase) && !parked(phase) {
            s.epoch += 1;
        }
        s.phase = phase;
        self.cv.notify_all();
    }

    /// Waits until `n` load threads are parked; false after `timeout`
    /// (a hung thread).
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.parked < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Whether an error of an operation begun in `epoch` is explained by a
    /// kill or quiesce since (then it is no failure).
    pub fn disturbed(&self, epoch: u64) -> bool {
        let s = self.lock();
        s.epoch != epoch || matches!(s.phase, Phase::Down | Phase::Quiesce | Phase::Stop)
    }

    /// Sleeps up to `d`, waking early when the phase changes away from
    /// running (so a kill or the end does not wait for a pause).
    pub fn pause(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut s = self.lock();
        let epoch = s.epoch;
        while s.epoch == epoch && matches!(s.phase, Phase::Run | Phase::Full) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Failures printed as they happen (all are counted).
const PRINTED_FAILURES: usize = 20;

/// Counters for the summary.
#[derive(Default)]
pub struct Stats {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub reads: AtomicU64,
    pub verified_sectors: AtomicU64,
    pub snapshots: AtomicU64,
    pub retention_snapshots: AtomicU64,
    pub clones: AtomicU64,
    pub snapshot_deletes: AtomicU64,
    pub clone_deletes: AtomicU64,
    pub busy_deletes: AtomicU64,
    pub api_reads: AtomicU64,
    pub enospc_replies: AtomicU64,
    pub no_space_answers: AtomicU64,
    pub kills: AtomicU64,
    pub episodes: AtomicU64,
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A clone the API acknowledged: a copy of its origin snapshot.
pub struct Clone {
    pub name: String,
    pub origin: Arc<Snapshot>,
    /// A delete was sent and its answer lost (a kill): may be gone.
    pub maybe_gone: bool,
}

/// An acknowledged snapshot and whether a delete of it may have landed.
pub struct SnapEntry {
    pub snap: Arc<Snapshot>,
    pub maybe_gone: bool,
}

pub struct Ctx {
    pub gate: Gate,
    pub api: RwLock<Api>,
    pub endpoint: String,
    pub vols: Vec<Arc<Volume>>,
    /// Volumes the snapshot loop snapshots and clones (indexes in `vols`);
    /// the others belong to the retention policy.
    pub snap_vols: Vec<usize>,
    pub retention_vol: usize,
    pub snaps: Mutex<Vec<SnapEntry>>,
    pub clones: Mutex<Vec<Clone>>,
    pub stats: Stats,
    failures: Mutex<Vec<(bool, String)>>,
    pub started: Instant,
}

impl Ctx {
    pub fn new(endpoint: String, api: Api, vols: Vec<Arc<Volume>>, retention_vol: usize) -> Ctx {
        let snap_vols = (0..vols.len()).filter(|&i| i != retention_vol).collect();
        Ctx {
            gate: Gate {
                state: Mutex::new(State {
                    phase: Phase::Run,
                    epoch: 0,
                    parked: 0,
                }),
                cv: Condvar::new(),
            },
            api: RwLock::new(api),
            endpoint,
            vols,
            snap_vols,
            retention_vol,
            snaps: Mutex::new(Vec::new()),
            clones: Mutex::new(Vec::new()),
            stats: Stats::default(),
            failures: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    pub fn api(&self) -> Api {
        self.api.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_api(&self, api: Api) {
        *self.api.write().unwrap_or_else(|e| e.into_inner()) = api;
    }

    /// Records a failure of a check of the controller (printed at once).
    pub fn fail(&self, what: impl Into<String>) {
        self.record(what.into(), true);
    }

    /// Records a failure of a load thread: a broken daemon fails every
    /// request, so only the first ones are printed as they come.
    pub fn fail_load(&self, what: impl Into<String>) {
        self.record(what.into(), false);
    }

    fn record(&self, what: String, check: bool) {
        let t = self.started.elapsed().as_secs_f64();
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let loads = f.iter().filter(|(c, _)| !c).count();
        if check || loads < PRINTED_FAILURES {
            eprintln!("soak: FAILURE at {t:.0}s: {what}");
        } else if loads == PRINTED_FAILURES {
            eprintln!("soak: more failures of the load follow (counted, not printed)");
        }
        f.push((check, format!("[{t:.0}s] {what}")));
    }

    /// All failures: (of a controller check, text).
    pub fn failures(&self) -> Vec<(bool, String)> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn snaps(&self) -> std::sync::MutexGuard<'_, Vec<SnapEntry>> {
        self.snaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn clones(&self) -> std::sync::MutexGuard<'_, Vec<Clone>> {
        self.clones.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn log(&self, what: &str) {
        eprintln!(
            "soak: [{:.0}s] {what}",
            self.started.elapsed().as_secs_f64()
        );
    }
}

//! Defragmentation jobs and the fragmentation figure of volumes.
//!
//! A `defrag` job steps through a volume with [`cdmfs::Pool::defragment_step`]
//! (which rewrites only blocks the volume owns alone, so snapshots keep
//! sharing and the pool does not grow), sleeping between steps so that it
//! rewrites at most `rate_mb_s` (default [`DEFAULT_RATE_MB_S`]): it is low
//! priority by construction, leaving the device to restores and backups.
//! Each step is an ordinary write, so a job stopped by a crash or a restart
//! loses nothing; a new job starts over (ranges already contiguous cost a
//! tree lookup, no I/O) or from `from_block` (a running job's progress is
//! `done` blocks of `total`).
//!
//! The fragmentation figure walks a volume's tree (about 1 ms per 10,000
//! extents with the nodes cached): `GET /v1/volumes/{name}` computes it
//! each time, `/metrics` reuses a figure up to [`FRAG_TTL`] old so a
//! scrape every 15 s does not walk every tree.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cdm_api::auth::Caller;
use cdm_api::types::{Fragmentation, Job, JobCreate};
use cdm_api::{ApiError, ApiResult};
use cdmfs::Target;
use serde_json::json;

use super::{engine, lock, st, Appliance};
use crate::error::Error;

/// Default rewrite rate of a `defrag` job, MB/s.
pub const DEFAULT_RATE_MB_S: u64 = 50;
/// Most bytes one step rewrites: bounds how long it holds its range lock
/// (writes to those blocks wait for the copy, ~0.1 s), and the longer the
/// steps the longer the runs (each step allocates its own).
const STEP_BYTES: u64 = 16 << 20;
/// How old a fragmentation figure `/metrics` may report.
pub const FRAG_TTL: Duration = Duration::from_secs(300);

/// Figures computed lately and the volumes being defragmented.
#[derive(Default)]
pub(crate) struct DefragState {
    figures: Mutex<HashMap<u64, (Instant, cdmfs::Fragmentation)>>,
    running: Mutex<HashSet<u64>>,
}

/// The API's form of the engine's figure.
pub(crate) fn to_api(f: &cdmfs::Fragmentation) -> Fragmentation {
    Fragmentation {
        mapped_bytes: f.mapped_bytes,
        extents: f.extents,
        runs: f.runs,
        extents_per_mib: f.extents_per_mib(),
        runs_per_mib: f.runs_per_mib(),
        avg_run_bytes: f.avg_run_bytes(),
    }
}

/// Removes a volume from the running set when its job ends, however.
struct Running<'a>(&'a DefragState, u64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.0.running).remove(&self.1);
    }
}

impl Appliance {
    /// A volume's fragmentation now (and remembered for `/metrics`).
    pub(crate) fn fragmentation_now(&self, id: u64) -> cdmfs::Result<cdmfs::Fragmentation> {
        let f = self.pool.fragmentation(Target::Volume(id))?;
        lock(&self.defrag.figures).insert(id, (Instant::now(), f));
        Ok(f)
    }

    /// A volume's fragmentation at most [`FRAG_TTL`] old.
    pub(crate) fn fragmentation_cached(&self, id: u64) -> cdmfs::Result<cdmfs::Fragmentation> {
        let cached = lock(&self.defrag.figures)
            .get(&id)
            .filter(|(t, _)| t.elapsed() < FRAG_TTL)
            .map(|(_, f)| *f);
        match cached {
            Some(f) => Ok(f),
            None => self.fragmentation_now(id),
        }
    }

    /// Forgets figures of volumes that are gone.
    pub(crate) fn fragmentation_retain(&self, ids: &HashSet<u64>) {
        lock(&self.defrag.figures).retain(|id, _| ids.contains(id));
    }

    /// `POST /v1/jobs {"kind":"defrag","volume":NAME,"rate_mb_s"?:N,"from_block"?:B}`.
    pub(super) fn job_defrag(&self, c: &Caller, req: &JobCreate) -> ApiResult<Job> {
        let Some(name) = req.volume.clone() else {
            return Err(ApiError::bad_request("defrag needs \"volume\""));
        };
        let rate = req.rate_mb_s.unwrap_or(DEFAULT_RATE_MB_S);
        if rate == 0 {
            return Err(ApiError::bad_request("rate_mb_s must be at least 1"));
        }
        let v = self.pool.volume(&name).map_err(engine)?;
        if !lock(&self.defrag.running).insert(v.id) {
            return Err(ApiError::conflict(format!(
                "volume {name} is being defragmented already"
            )));
        }
        let me = self.self_arc()?;
        let from = req.from_block.unwrap_or(0);
        let id = v.id;
        let started = self.jobs.start("defrag", &c.user, move |p| {
            let _running = Running(&me.defrag, id);
            me.run_defrag(&name, id, from, rate, p)
        });
        match started {
            Ok(j) => Ok(j),
            Err(e) => {
                lock(&self.defrag.running).remove(&v.id);
                Err(st(e))
            }
        }
    }

    /// The body of a `defrag` job: steps, rate limit, figures before and
    /// after.
    fn run_defrag(
        &self,
        name: &str,
        id: u64,
        from: u64,
        rate_mb_s: u64,
        p: &crate::jobs::Progress,
    ) -> crate::error::Result<serde_json::Value> {
        let ctx = |e: cdmfs::Error| Error::from(e).context(format!("defragmenting {name}"));
        let before = self.fragmentation_now(id).map_err(ctx)?;
        let t0 = Instant::now();
        let rate = rate_mb_s as f64 * 1e6;
        let (mut next, mut moved, mut extents, mut shared) = (from, 0u64, 0u64, 0u64);
        loop {
            let s = self
                .pool
                .defragment_step(id, next, STEP_BYTES)
                .map_err(ctx)?;
            moved += s.bytes_moved;
            extents += s.extents_moved;
            shared += s.shared_blocks;
            p.set(s.next_block, s.blocks);
            if s.done {
                break;
            }
            next = s.next_block;
            // The rate limit: never ahead of `rate` bytes per second since
            // the start (steps that moved nothing cost no sleep).
            let due = Duration::from_secs_f64(moved as f64 / rate);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        // Durable now rather than at the next periodic commit.
        self.pool.flush().map_err(ctx)?;
        let after = self.fragmentation_now(id).map_err(ctx)?;
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            volume = name,
            moved,
            runs_before = before.runs,
            runs_after = after.runs,
            "defragmented"
        );
        Ok(json!({
            "volume": name,
            "bytes_moved": moved,
            "extents_moved": extents,
            "shared_blocks_left": shared,
            "seconds": secs,
            "mb_per_s": if secs > 0.0 { moved as f64 / 1e6 / secs } else { 0.0 },
            "before": to_api(&before),
            "after": to_api(&after),
        }))
    }
}

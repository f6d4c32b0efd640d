//! Long operations run on their own threads with progress the API reports.
//! A job's record is stored when it starts and when it ends; progress lives
//! in memory. Local jobs still running when the daemon stopped are marked
//! failed at the next start. Agent jobs (`backup`, `restore`, with a
//! `host`) are the same records, kept by `crate::control`'s queue: they
//! survive a restart, since their agents keep running them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cdm_api::types::Job;
use cdm_common::lock::lock;
use serde_json::{json, Value};

use crate::clock::Clock;
use crate::events::Events;
use crate::state::{State, StateError, Sync, JOBS};

pub struct Jobs {
    state: Arc<State>,
    clock: Arc<Clock>,
    events: Arc<Events>,
    running: Mutex<HashMap<u64, Job>>,
}

/// Handed to a job's body to report progress.
pub struct Progress {
    jobs: Arc<Jobs>,
    id: u64,
}

impl Progress {
    /// The job's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn set(&self, done: u64, total: u64) {
        if let Some(j) = lock(&self.jobs.running).get_mut(&self.id) {
            j.done = done;
            j.total = total;
            j.progress = if total == 0 {
                0.0
            } else {
                (done as f64 / total as f64).min(1.0)
            };
        }
    }
}

impl Jobs {
    pub fn new(state: Arc<State>, clock: Arc<Clock>, events: Arc<Events>) -> Arc<Jobs> {
        // A local job recorded as running belongs to a previous process.
        if let Ok(stale) = state.scan::<Job>(JOBS, 0, usize::MAX, false, |j| {
            j.state == "running" && j.host.is_none()
        }) {
            for mut j in stale {
                j.state = "failed".into();
                j.message = "interrupted: the daemon stopped while it ran".into();
                j.finished_unix = Some(clock.now());
                let _ = state.put(JOBS, j.id, &j, Sync::Now);
            }
        }
        Arc::new(Jobs {
            state,
            clock,
            events,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Starts `body` on a new thread; its Ok value becomes the job's result.
    pub fn start<F>(self: &Arc<Self>, kind: &str, by: &str, body: F) -> Result<Job, StateError>
    where
        F: FnOnce(&Progress) -> crate::error::Result<Value> + Send + 'static,
    {
        self.start_for(kind, by, None, None, body)
    }

    /// [`Jobs::start`] for a job about one application, with the params
    /// that say what it does (kept in its record: what a restarted daemon
    /// needs to clean up after it).
    pub fn start_for<F>(
        self: &Arc<Self>,
        kind: &str,
        by: &str,
        application: Option<u64>,
        params: Option<Value>,
        body: F,
    ) -> Result<Job, StateError>
    where
        F: FnOnce(&Progress) -> crate::error::Result<Value> + Send + 'static,
    {
        let now = self.clock.now();
        let job = self.state.append(JOBS, Sync::Now, |id| Job {
            id,
            kind: kind.to_string(),
            state: "running".into(),
            progress: 0.0,
            done: 0,
            total: 0,
            message: String::new(),
            created_by: by.to_string(),
            created_unix: now,
            started_unix: Some(now),
            application,
            params,
            ..Job::default()
        })?;
        lock(&self.running).insert(job.id, job.clone());
        self.events.emit(
            "job.created",
            &format!("job {}", job.id),
            by,
            json!({"id": job.id, "kind": kind}),
        );
        let me = self.clone();
        let id = job.id;
        let kind_s = kind.to_string();
        let by_s = by.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                let p = Progress {
                    jobs: me.clone(),
                    id,
                };
                let out = body(&p);
                let Some(mut j) = lock(&me.running).remove(&id) else {
                    return;
                };
                j.finished_unix = Some(me.clock.now());
                match out {
                    Ok(v) => {
                        j.state = "succeeded".into();
                        j.progress = 1.0;
                        j.done = j.total.max(j.done);
                        j.message = "done".into();
                        j.result = Some(v);
                    }
                    Err(e) => {
                        j.state = "failed".into();
                        j.message = e.to_string();
                    }
                }
                if let Err(e) = me.state.put(JOBS, id, &j, Sync::Now) {
                    tracing::error!(job = id, error = %e, "cannot record job outcome");
                }
                me.events.emit(
                    &format!("job.{}", j.state),
                    &format!("job {id}"),
                    &by_s,
                    json!({"id": id, "kind": kind_s, "message": j.message}),
                );
            });
        if let Err(e) = spawned {
            let mut j = lock(&self.running).remove(&id).unwrap_or(job.clone());
            j.state = "failed".into();
            j.message = format!("cannot start a thread: {e}");
            self.state.put(JOBS, id, &j, Sync::Now)?;
            return Ok(j);
        }
        Ok(job)
    }

    pub fn get(&self, id: u64) -> Result<Option<Job>, StateError> {
        if let Some(j) = lock(&self.running).get(&id) {
            return Ok(Some(j.clone()));
        }
        self.state.get(JOBS, id)
    }

    /// The newest `limit` jobs that pass `f`, newest first.
    pub fn list_where(
        &self,
        limit: usize,
        f: impl Fn(&Job) -> bool,
    ) -> Result<Vec<Job>, StateError> {
        let mut v: Vec<Job> = self.state.scan(JOBS, 0, limit, true, f)?;
        let running = lock(&self.running);
        for j in v.iter_mut() {
            if let Some(r) = running.get(&j.id) {
                *j = r.clone();
            }
        }
        v.reverse();
        Ok(v)
    }
}

//! The pool, the appliance clock, metrics and health.

use cdm_api::auth::Caller;
use cdm_api::backend::Backend;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use serde_json::{json, Value};

use std::sync::atomic::{AtomicU64, Ordering};

use super::{engine, lock, st, Appliance};

/// Seconds between the periodic commits (snapshotd's `commit_interval`),
/// for saying when freed space is reusable.
pub static COMMIT_INTERVAL_S: AtomicU64 = AtomicU64::new(5);
use crate::state::{Sync, META};

impl Appliance {
    /// The space report, made again only when the pool has changed.
    pub(super) fn reduction_report(&self) -> ApiResult<cdmfs::ReductionReport> {
        let mut cached = lock(&self.reduction);
        let generation = self.pool.changes().map_err(engine)?;
        if let Some((g, r)) = cached.as_ref() {
            if *g == generation {
                return Ok(r.clone());
            }
        }
        let r = self.pool.reduction().map_err(engine)?;
        *cached = Some((generation, r.clone()));
        Ok(r)
    }

    pub(super) fn pool_get(&self) -> ApiResult<PoolInfo> {
        let sp = self.pool.space().map_err(engine)?;
        let health = self.pool.health().map_err(engine)?;
        let interval = COMMIT_INTERVAL_S.load(Ordering::Relaxed).max(1);
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let policy = self
            .state
            .get::<_, PoolPolicy>(META, "pool_policy")
            .map_err(st)?
            .unwrap_or_default();
        Ok(PoolInfo {
            uuid: hex::encode(self.pool.uuid().map_err(engine)?),
            total_bytes: sp.total_bytes,
            used_bytes: sp.used_bytes,
            free_bytes: sp.free_bytes,
            generation: sp.generation,
            volumes: vols.len(),
            snapshots: snaps.len(),
            policy,
            encryption_key: match self.pool.key_state().map_err(engine)? {
                (false, false) => "none",
                (_, true) => "unlocked",
                (true, false) => "locked",
            }
            .into(),
            preallocated: self.pool_preallocated(),
            reduction: {
                let r = self.reduction_report()?;
                let conv = |b: &cdmfs::Reduction| ReductionFigures {
                    logical_bytes: b.logical_bytes,
                    after_dedup_bytes: b.after_dedup_bytes,
                    after_compression_bytes: b.after_compression_bytes,
                    ratio: (b.ratio() * 100.0).round() / 100.0,
                };
                PoolReduction {
                    pool: conv(&r.pool),
                    data_allocated_bytes: r.data_allocated_bytes,
                    volumes: r
                        .volumes
                        .iter()
                        .map(|v| VolumeReductionFigures {
                            name: v.name.clone(),
                            figures: conv(&v.bytes),
                        })
                        .collect(),
                }
            },
            state: health.state.as_str().into(),
            state_message: health.message,
            freeing_bytes: sp.freeing_bytes,
            // A periodic commit runs every interval while space waits.
            freeing_reusable_within_s: sp.freeing_commits * interval,
            reserve_bytes: health.reserve_bytes,
        })
    }

    /// The pool's part of `/health`.
    pub(super) fn pool_health(&self) -> ApiResult<Value> {
        let h = self.pool.health().map_err(engine)?;
        // Real time: the engine stamps errors with it (not the fake clock).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = h.io_errors.last.as_ref();
        // Recent device errors make the appliance degraded even where the
        // pool still commits (reads of damaged data fail).
        let recent_errors = last.is_some_and(|(t, _)| now.saturating_sub(*t) < 300);
        let degraded = h.state != cdmfs::PoolState::Ok || recent_errors;
        Ok(json!({
            "status": if degraded { "degraded" } else { "ok" },
            "pool": {
                "state": h.state.as_str(),
                "message": h.message,
                "since_unix": h.since_unix,
                "commit_retries": h.commit_retries,
                "reserve_bytes": h.reserve_bytes,
                "io_errors": {
                    "read": h.io_errors.read,
                    "write": h.io_errors.write,
                    "sync": h.io_errors.sync,
                    "last": last.map(|(t, m)| json!({"time_unix": t, "message": m})),
                },
            },
        }))
    }

    pub(super) fn pool_set_policy(&self, c: &Caller, p: PoolPolicy) -> ApiResult<PoolInfo> {
        if p.quota_bytes == Some(0) {
            return Err(ApiError::bad_request(
                "quota_bytes must be above 0 (or absent for none)",
            ));
        }
        self.state
            .put(META, "pool_policy", &p, Sync::Now)
            .map_err(st)?;
        self.events
            .emit("pool.updated", "pool", &c.user, json!({"policy": p}));
        self.pool()
    }

    /// Whether the pool file has every block on the host filesystem (one
    /// stat; a block device counts as preallocated: it is all there).
    fn pool_preallocated(&self) -> bool {
        let Some(path) = self.pool_file.get() else {
            return false;
        };
        match std::fs::metadata(path) {
            Ok(m) => !m.file_type().is_file() || cdmfs::fully_allocated(&m),
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot stat the pool file");
                false
            }
        }
    }

    /// Grows the pool and commits the new size before answering.
    pub(super) fn pool_grow(&self, c: &Caller, size: u64) -> ApiResult<PoolInfo> {
        let before = self.pool.space().map_err(engine)?.total_bytes;
        self.pool.grow(size).map_err(grow_error)?;
        self.commit()?;
        if size > before {
            tracing::info!(from = before, to = size, by = %c.user, "pool grown");
            self.events.emit(
                "pool.grown",
                "pool",
                &c.user,
                json!({"from_bytes": before, "to_bytes": size}),
            );
        }
        self.pool()
    }

    pub(super) fn clock_get(&self) -> ApiResult<Clock> {
        Ok(Clock {
            now_unix: self.clock.now(),
            fake: self.clock.is_fake(),
        })
    }

    pub(super) fn clock_advance(&self, c: &Caller, secs: u64) -> ApiResult<Clock> {
        if secs > 100 * 365 * 86_400 {
            return Err(ApiError::bad_request("advance at most 100 years"));
        }
        if !self.clock.advance(secs) {
            return Err(ApiError::not_found(
                "the clock is real; start snapshotd with --fake-clock to move it",
            ));
        }
        tracing::warn!(secs, by = %c.user, "fake clock advanced");
        self.clock()
    }

    pub(super) fn metrics_render(&self) -> ApiResult<String> {
        crate::metrics::render(self).map_err(engine)
    }

    pub(super) fn health_get(&self) -> ApiResult<Value> {
        // A failed pool (reloading after a failed sync) has no generation
        // to show, but its health is what an operator needs.
        let generation = self.pool.space().ok().map(|sp| sp.generation);
        let mut v = self.pool_health()?;
        if let Some(o) = v.as_object_mut() {
            o.insert("pool_generation".into(), generation.into());
            o.insert("nbd_clients".into(), self.nbd.clients().len().into());
            let logs = self.logs_health();
            // Records kept aside mean the state database is failing.
            let aside = ["events_pending", "audit_pending"]
                .iter()
                .any(|k| logs[*k].as_u64().unwrap_or(0) > 0);
            if aside {
                o.insert("status".into(), "degraded".into());
            }
            o.insert("logs".into(), logs);
        }
        Ok(v)
    }
}

/// A device that could not be extended: the host filesystem's lack of room
/// is 507 `no_space`, a device that cannot grow (a block device) 409.
fn grow_error(e: cdmfs::Error) -> ApiError {
    match &e {
        cdmfs::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            ApiError::new(507, "no_space", e.to_string())
        }
        cdmfs::Error::Io(io) if io.kind() == std::io::ErrorKind::Unsupported => {
            ApiError::conflict(e.to_string())
        }
        _ => engine(e),
    }
}

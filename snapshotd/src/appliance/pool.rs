//! The pool, the appliance clock, metrics and health.

use cdm_api::auth::Caller;
use cdm_api::backend::Backend;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use serde_json::{json, Value};

use super::{engine, lock, st, Appliance};
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
        })
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
        let sp = self.pool.space().map_err(engine)?;
        Ok(
            json!({"pool_generation": sp.generation, "nbd_clients": self.nbd.clients().len(),
            "logs": self.logs_health()}),
        )
    }
}

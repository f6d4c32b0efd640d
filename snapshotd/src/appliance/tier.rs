//! The object tier's routes (`/v1/tier`) and jobs (`tier`, `recall`,
//! `tier-gc`): validation, the stored configuration, events; the work
//! itself is `crate::tier`'s.

use cdm_api::auth::Caller;
use cdm_api::tier::{not_configured, TierBackend, TierConfigPut, TierConfigView, TierJob};
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use serde_json::json;

use super::{engine, Appliance};
use crate::tier::TierSettings;

/// An API error for a failure of the stored configuration or its secret.
fn stored(e: crate::error::Error) -> ApiError {
    match e {
        crate::error::Error::State(s) => super::st(s),
        e => ApiError::internal(e.to_string()),
    }
}

impl Appliance {
    /// The configuration jobs use; 409 `not_configured` without one.
    fn tier_settings(&self) -> ApiResult<TierSettings> {
        self.state.tier_config().map_err(stored)?.ok_or_else(|| {
            let mut e = not_configured();
            e.status = 409;
            e
        })
    }

    /// Starts a tier job: fields checked (400), its volume and point found
    /// (404), a configuration set (409), something to do (400: a `tier` of
    /// a whole volume needs a tiering rule in its policy), then the job
    /// runs in the background and its record says how it ended.
    pub(super) fn job_tier(&self, user: &str, job: TierJob) -> ApiResult<Job> {
        let (volume, snapshot) = match &job {
            TierJob::Tier { volume, snapshot } => (Some(volume.clone()), *snapshot),
            TierJob::Recall { volume, snapshot } => (Some(volume.clone()), Some(*snapshot)),
            TierJob::Gc => (None, None),
        };
        if let Some(v) = &volume {
            cdm_api::routes::check_name("volume", v)?;
            self.pool.volume_id(v).map_err(engine)?;
            if let Some(id) = snapshot {
                self.snapshot_of(v, id)?;
            }
        }
        let settings = self.tier_settings()?;
        if let TierJob::Recall { snapshot, .. } = &job {
            if !self.pool.snapshot(*snapshot).map_err(engine)?.tiered {
                return Err(ApiError::bad_request(format!(
                    "point {snapshot} is not tiered: nothing to recall"
                )));
            }
        }
        let policy = match &volume {
            Some(v) => self.policy_get(v)?,
            None => SnapshotPolicy::default(),
        };
        if let TierJob::Tier {
            volume,
            snapshot: None,
        } = &job
        {
            if policy.tier_after_days.is_none() && policy.tier_keep_last.is_none() {
                return Err(ApiError::bad_request(format!(
                    "volume {volume} has no tiering rule in its policy (tier_after_days or \
                     tier_keep_last): set one, or give \"snapshot\" to tier one point"
                )));
            }
        }
        let pool = self.pool.clone();
        let now = self.clock.now();
        let params = json!({"volume": volume, "snapshot": snapshot});
        let kind = job.kind();
        self.jobs
            .start_for(kind, user, None, Some(params), move |p| match job {
                TierJob::Tier { volume, snapshot } => {
                    crate::tier::run_tier(&pool, &settings, &policy, &volume, snapshot, now, p)
                }
                TierJob::Recall { volume, snapshot } => {
                    crate::tier::run_recall(&pool, &settings, &volume, snapshot, p)
                }
                TierJob::Gc => crate::tier::run_gc(&pool, &settings, p),
            })
            .map_err(super::st)
    }
}

impl Appliance {
    /// Every `every`, a `tier` job for each volume whose policy makes
    /// points due that are not tiered yet (none while a tier job runs).
    pub fn start_tier_sweep(
        me: &std::sync::Arc<Appliance>,
        every: std::time::Duration,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        let me = std::sync::Arc::downgrade(me);
        let spawned = std::thread::Builder::new()
            .name("tier-sweep".into())
            .spawn(move || loop {
                let mut left = every;
                while !left.is_zero() {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let nap = left.min(std::time::Duration::from_millis(200));
                    std::thread::sleep(nap);
                    left -= nap;
                }
                let Some(a) = me.upgrade() else { return };
                a.tier_sweep();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the tier sweep");
        }
    }

    fn tier_sweep(&self) {
        if !matches!(self.state.tier_config(), Ok(Some(_))) || crate::tier::runtime().busy() {
            return;
        }
        let vols = match self.pool.list_volumes_brief() {
            Ok(v) => v,
            Err(e) => return tracing::error!(error = %e, "tier sweep: cannot list volumes"),
        };
        let now = self.clock.now();
        for v in vols {
            let Ok(policy) = self.policy_get(&v.name) else {
                continue;
            };
            if policy.tier_after_days.is_none() && policy.tier_keep_last.is_none() {
                continue;
            }
            let due = crate::tier::due_points(&self.pool, &v.name, &policy, now);
            let rt = crate::tier::runtime();
            if !due.is_ok_and(|d| d.iter().any(|s| !s.tiered && !rt.settled(s.id))) {
                continue;
            }
            let job = TierJob::Tier {
                volume: v.name.clone(),
                snapshot: None,
            };
            match self.job_tier("scheduler", job) {
                Ok(j) => tracing::info!(volume = %v.name, job = j.id, "tier sweep started a job"),
                Err(e) => tracing::error!(volume = %v.name, error = %e.message, "tier sweep"),
            }
        }
    }
}

impl TierBackend for Appliance {
    fn tier_config(&self) -> ApiResult<TierConfigView> {
        self.state
            .tier_view()
            .map_err(stored)?
            .ok_or_else(not_configured)
    }

    fn set_tier_config(&self, c: &Caller, req: TierConfigPut) -> ApiResult<TierConfigView> {
        let uuid = hex::encode(self.pool.uuid().map_err(engine)?);
        let settings = TierSettings {
            config: req.validated(&uuid)?,
            updated_unix: self.clock.now(),
        };
        // Packs already in the store stay where they are: while the pool
        // references any, the place (endpoint, bucket, prefix) is fixed —
        // reads, recalls and GC would look elsewhere, and a GC under
        // another pool's prefix would delete that pool's packs.
        if let Some(old) = self.state.tier_config().map_err(stored)? {
            let (a, b) = (&old.config, &settings.config);
            if (&a.endpoint, &a.bucket, &a.prefix) != (&b.endpoint, &b.bucket, &b.prefix)
                && self.tier_has_data()?
            {
                return Err(ApiError::conflict(format!(
                    "points' data is in bucket {} under {} at {}: the endpoint, bucket and \
                     prefix cannot change while the pool references packs there (credentials, \
                     region, limits, cache and pack size can)",
                    a.bucket,
                    a.prefix.as_deref().unwrap_or(""),
                    a.endpoint
                )));
            }
        }
        // A client that cannot be built (virtual-host addressing on an IP
        // address, an unreadable endpoint) is refused before it is stored;
        // reads of tiered points go through the new store from now on.
        crate::tier::runtime()
            .activate(&self.pool, &settings)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let view = self.state.set_tier_config(&settings).map_err(stored)?;
        // The view carries no secret: safe for events and webhooks.
        self.events.emit(
            "tier.configured",
            &view.bucket,
            &c.user,
            json!({"endpoint": view.endpoint, "bucket": view.bucket, "prefix": view.prefix}),
        );
        Ok(view)
    }

    fn delete_tier_config(&self, c: &Caller) -> ApiResult<()> {
        let view = self.tier_config()?;
        if self.tier_has_data()? {
            return Err(ApiError::conflict(format!(
                "points' data is in bucket {} under {}: recall the tiered points first, \
                 or it would become unreachable",
                view.bucket, view.prefix
            )));
        }
        if !self.state.delete_tier_config().map_err(stored)? {
            return Err(not_configured());
        }
        crate::tier::runtime().deactivate(&self.pool);
        self.events.emit(
            "tier.deleted",
            &view.bucket,
            &c.user,
            json!({"bucket": view.bucket}),
        );
        Ok(())
    }

    fn tier_has_data(&self) -> ApiResult<bool> {
        crate::tier::tier_has_data(&self.pool).map_err(stored)
    }
}

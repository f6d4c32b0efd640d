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
    pub(super) fn job_tier(&self, c: &Caller, job: TierJob) -> ApiResult<Job> {
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
        let params = json!({"volume": volume, "snapshot": snapshot});
        let kind = job.kind();
        self.jobs
            .start_for(kind, &c.user, None, Some(params), move |p| match job {
                TierJob::Tier { volume, snapshot } => {
                    crate::tier::run_tier(&pool, &settings, &policy, &volume, snapshot, p)
                }
                TierJob::Recall { volume, snapshot } => {
                    crate::tier::run_recall(&pool, &settings, &volume, snapshot, p)
                }
                TierJob::Gc => crate::tier::run_gc(&pool, &settings, p),
            })
            .map_err(super::st)
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

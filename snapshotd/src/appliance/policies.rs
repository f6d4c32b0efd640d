//! Each volume's snapshot schedule and retention.

use cdm_api::auth::Caller;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use serde_json::json;

use super::{engine, st, Appliance};
use crate::scheduler::{next_run, SnapshotPolicyRec};
use crate::state::{Sync, POLICIES};

impl Appliance {
    pub(super) fn policy_get(&self, volume: &str) -> ApiResult<SnapshotPolicy> {
        self.pool.volume_id(volume).map_err(engine)?;
        Ok(self
            .state
            .get::<_, (String, SnapshotPolicyRec)>(POLICIES, volume)
            .map_err(st)?
            .map(|(_, r)| r.policy)
            .unwrap_or_default())
    }

    pub(super) fn policy_set(
        &self,
        c: &Caller,
        volume: &str,
        p: SnapshotPolicy,
    ) -> ApiResult<SnapshotPolicy> {
        self.pool.volume_id(volume).map_err(engine)?;
        if p.retention.keep_last == Some(0) {
            return Err(ApiError::bad_request("keep_last must be at least 1"));
        }
        if p.retention.keep_days == Some(0) {
            return Err(ApiError::bad_request("keep_days must be at least 1"));
        }
        p.check_tiering()?;
        let next = next_run(&p, self.clock.now())?;
        let rec = SnapshotPolicyRec {
            policy: p.clone(),
            next_run_unix: next,
        };
        self.state
            .put(POLICIES, volume, &(volume.to_string(), rec), Sync::Now)
            .map_err(st)?;
        self.events.emit(
            "policy.updated",
            volume,
            &c.user,
            json!({"policy": p, "next_run_unix": next}),
        );
        Ok(p)
    }
}

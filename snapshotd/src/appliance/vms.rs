//! The VM inventory agents classified.

use cdm_api::auth::Caller;
use cdm_api::backend::Backend;
use cdm_api::types::*;
use cdm_api::ApiResult;
use serde_json::json;

use super::{st, Appliance};

impl Appliance {
    pub(super) fn vms_put(&self, c: &Caller, vms: Vec<VmRecord>) -> ApiResult<Vec<VmRecord>> {
        let items: Vec<(String, VmRecord)> =
            vms.iter().map(|v| (v.name.clone(), v.clone())).collect();
        self.state
            .replace_all(crate::state::VMS, &items)
            .map_err(st)?;
        self.events
            .emit("vms.updated", "vms", &c.user, json!({"vms": vms.len()}));
        self.list_vms()
    }

    pub(super) fn vms_list(&self) -> ApiResult<Vec<VmRecord>> {
        self.state.all(crate::state::VMS).map_err(st)
    }
}

impl Appliance {
    /// The points of VM `vm` (a walk of the snapshot catalog); 404 when
    /// it has none and the inventory does not know it.
    pub(super) fn vm_points_of(&self, vm: &str) -> ApiResult<Vec<cdm_api::vm_recovery::VmPoint>> {
        let snaps = self.pool.list_snapshots(None).map_err(super::engine)?;
        let p = cdm_api::vm_recovery::points(
            vm,
            snaps.iter().map(|s| cdm_api::vm_recovery::SnapRef {
                volume: &s.volume,
                id: s.id,
                created_unix: s.created_ns / 1_000_000_000,
                metadata: &s.metadata,
            }),
        );
        if p.is_empty() && !self.vms_list()?.iter().any(|v| v.name == vm) {
            return Err(cdm_api::ApiError::not_found(format!(
                "VM {vm} is not known"
            )));
        }
        Ok(p)
    }
}

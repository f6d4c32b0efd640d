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

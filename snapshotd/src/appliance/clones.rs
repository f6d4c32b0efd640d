//! Writable clones of snapshots.

use cdm_api::auth::{Caller, Role};
use cdm_api::backend::Backend;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use serde_json::json;

use super::{engine, st, Appliance};
use crate::state::{Sync, HOST_CLONES};

impl Appliance {
    pub(super) fn clone_create(
        &self,
        c: &Caller,
        volume: &str,
        snapshot: u64,
        name: &str,
    ) -> ApiResult<Volume> {
        if c.role == Role::Host {
            self.host_volume_access(
                c,
                volume,
                super::control::HostUse::Clone(snapshot),
                Some(name),
            )?;
            // No clone named like an application's stage volume: its
            // backups would land in this host's clone.
            if let Some(owner) = self.control.volume_owner(name)? {
                return Err(ApiError::conflict(format!(
                    "{name} is the volume of an application of host {owner}: name the clone otherwise"
                )));
            }
        }
        let s = self.snapshot_of(volume, snapshot)?;
        // A clone of a sealed point would be as unreadable as the point.
        let what = format!("snapshot {volume}@{snapshot}");
        crate::replication::keys::require_key(s.seal.as_ref(), s.seal_key_loaded, &what)?;
        let v = self.pool.clone_snapshot(snapshot, name).map_err(engine)?;
        self.commit()?;
        // A host may delete the clones it made, and only those.
        if c.role == Role::Host {
            self.state
                .put(HOST_CLONES, name, &c.user, Sync::Now)
                .map_err(st)?;
        }
        self.events.emit(
            "clone.created",
            name,
            &c.user,
            json!({"origin": format!("{volume}@{snapshot}")}),
        );
        Ok(self.to_volume(v))
    }

    pub(super) fn clone_list(&self) -> ApiResult<Vec<Volume>> {
        Ok(self
            .list_volumes()?
            .into_iter()
            .filter(|v| v.kind == "clone")
            .collect())
    }

    pub(super) fn clone_promote(&self, c: &Caller, name: &str) -> ApiResult<Volume> {
        let v = self.pool.promote_clone(name).map_err(|e| match e {
            cdmfs::Error::Invalid(m) => ApiError::conflict(m),
            e => engine(e),
        })?;
        self.commit()?;
        self.events.emit("clone.promoted", name, &c.user, json!({}));
        Ok(self.to_volume(v))
    }

    pub(super) fn clone_delete(&self, c: &Caller, name: &str, force: bool) -> ApiResult<()> {
        if c.role == Role::Host {
            let maker: Option<String> = self.state.get(HOST_CLONES, name).map_err(st)?;
            if maker.as_deref() != Some(c.user.as_str()) {
                return Err(ApiError::forbidden(format!(
                    "{} did not make clone {name}: a host deletes only its own clones",
                    c.user
                )));
            }
        }
        let v = self.pool.volume(name).map_err(engine)?;
        if v.origin.is_none() {
            return Err(ApiError::conflict(format!(
                "volume {name} is not a clone; delete it with DELETE /v1/volumes/{name}"
            )));
        }
        self.remove_volume(&c.user, name, force, "clone")?;
        self.state.remove(HOST_CLONES, name).map_err(st)?;
        Ok(())
    }
}

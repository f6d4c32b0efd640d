//! Stage disks: create, list, grow and delete (with the checks that keep
//! snapshots, clones and clients safe).

use std::collections::HashMap;

use cdm_api::auth::Caller;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use cdmfs::VolumeInfo;
use serde_json::json;

use super::{engine, lock, Appliance, UNIQUE_TTL};
use crate::state::POLICIES;

impl Appliance {
    /// Volume name of each snapshot id, from the catalog (no tree walks).
    pub(super) fn snapshot_volumes(&self) -> ApiResult<HashMap<u64, String>> {
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let names: HashMap<u64, String> = vols.into_iter().map(|v| (v.id, v.name)).collect();
        Ok(snaps
            .into_iter()
            .filter_map(|s| names.get(&s.volume_id).map(|n| (s.id, n.clone())))
            .collect())
    }

    pub(super) fn to_volume(&self, v: VolumeInfo) -> Volume {
        let map = self.snapshot_volumes().unwrap_or_default();
        self.to_volume_with(v, &map)
    }

    pub(super) fn to_volume_with(&self, v: VolumeInfo, snap_vol: &HashMap<u64, String>) -> Volume {
        let origin = v.origin.map(|sid| Origin {
            volume: snap_vol.get(&sid).cloned(),
            snapshot: sid,
        });
        let clients = self.clients_of(&v.name).len();
        let kind = if self.is_replica(&v.name) {
            "replica"
        } else if origin.is_some() {
            "clone"
        } else {
            "stage"
        };
        Volume {
            export: v.name.clone(),
            name: v.name,
            id: v.id,
            kind: kind.into(),
            size: v.size,
            block_size: v.block_size,
            created_unix: v.created_ns / 1_000_000_000,
            origin,
            allocated_bytes: v.allocated_bytes,
            unique_bytes: v.unique_bytes,
            snapshots: v.snapshots,
            dedup: v.policy.dedup,
            compression: v.policy.compression,
            encryption: v.policy.encryption.map_or("none", |c| c.name()).into(),
            sealed: v.seal.is_some(),
            key_loaded: v.seal.is_none() || v.seal_key_loaded,
            clients,
            fragmentation: None,
        }
    }

    /// Volume deletion shared by the API route, clones and jobs.
    pub fn remove_volume(&self, who: &str, name: &str, force: bool, kind: &str) -> ApiResult<()> {
        let v = self.pool.volume(name).map_err(engine)?;
        let mounted = self.mounts_of(name, None);
        if !mounted.is_empty() {
            return Err(ApiError::conflict(format!(
                "{kind} {name} (or a snapshot of it) is mounted ({}); unmount it first",
                mounted.join(", ")
            )));
        }
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let mine: Vec<u64> = snaps
            .iter()
            .filter(|s| s.volume_id == v.id)
            .map(|s| s.id)
            .collect();
        let prefix = format!("{name}@");
        let busy: Vec<String> = self
            .nbd
            .clients()
            .into_iter()
            .filter(|c| c.export == name || c.export.starts_with(&prefix))
            .map(|c| format!("{} on {}", c.peer, c.export))
            .collect();
        let clones: Vec<String> = vols
            .iter()
            .filter(|c| c.origin.is_some_and(|o| mine.contains(&o)))
            .map(|c| c.name.clone())
            .collect();
        if !force {
            if !busy.is_empty() {
                return Err(ApiError::conflict(format!(
                    "{kind} {name} is exported to {} client(s) ({}); disconnect them or force",
                    busy.len(),
                    busy.join(", ")
                )));
            }
            if !clones.is_empty() {
                return Err(ApiError::conflict(format!(
                    "{kind} {name} has clones of its snapshots ({}); delete or promote them, or force",
                    clones.join(", ")
                )));
            }
            if !mine.is_empty() {
                return Err(ApiError::conflict(format!(
                    "{kind} {name} has {} snapshot(s); delete them or force",
                    mine.len()
                )));
            }
        }
        // Not while the replication receiver applies a request to it: a
        // handler checked it was a replica and must not write into a
        // volume made again under its name.
        let receiver = crate::replication::receive::exclusive();
        self.pool.delete_volume(name, true).map_err(engine)?;
        // Forced past its clients: end their connections now rather than
        // fail each of their requests (after deleting, so none reconnects).
        self.nbd.disconnect_export(name);
        self.commit()?;
        let _ = self.state.remove(POLICIES, name);
        // A volume made again under this name is no replica.
        if let Err(e) = crate::replication::replicas::unmark(&self.state, name) {
            tracing::error!(volume = name, error = %e, "cannot forget the deleted replica");
        }
        drop(receiver);
        self.events.emit(
            &format!("{kind}.deleted"),
            name,
            who,
            json!({"snapshots_deleted": mine.len(), "forced": force}),
        );
        Ok(())
    }

    /// The policy of a new volume: the request's fields over the pool defaults.
    pub(super) fn policy_for(&self, req: &VolumeCreate) -> ApiResult<cdmfs::DataPolicy> {
        let mut p = self.defaults;
        if let Some(d) = req.dedup {
            p.dedup = d;
        }
        if let Some(c) = req.compression {
            if c > cdmfs::MAX_LEVEL {
                return Err(ApiError::bad_request(
                    "compression level must be 0 (off) to 29",
                ));
            }
            p.compression = c;
        }
        match req.encryption.as_deref() {
            None => {}
            Some("none") => p.encryption = None,
            Some(e) => {
                p.encryption = Some(cdmfs::Cipher::parse(e).map_err(|_| {
                    ApiError::bad_request(format!(
                        "unknown encryption {e:?}: use one of {ENCRYPTIONS:?}"
                    ))
                })?)
            }
        }
        if p.encryption.is_some() && !self.pool.key_state().map_err(engine)?.1 {
            return Err(ApiError::conflict(
                "encryption needs a key: start snapshotd with --key-file or --passphrase-file",
            ));
        }
        Ok(p)
    }

    pub(super) fn volume_create(&self, c: &Caller, req: VolumeCreate) -> ApiResult<Volume> {
        // A host makes only the stage volumes of its own applications.
        if c.role == cdm_api::auth::Role::Host {
            self.host_volume_access(c, &req.name, super::control::HostUse::Write, None)?;
        }
        let policy = self.policy_for(&req)?;
        let bs = req.block_size.unwrap_or(cdmfs::DEFAULT_BLOCK_SIZE);
        let v = self
            .pool
            .create_volume_with(&req.name, req.size, bs, policy)
            .map_err(engine)?;
        self.commit()?;
        self.events.emit(
            "volume.created",
            &v.name,
            &c.user,
            json!({"size": v.size, "block_size": v.block_size, "policy": v.policy}),
        );
        Ok(self.to_volume(v))
    }

    pub(super) fn volume_list(&self) -> ApiResult<Vec<Volume>> {
        let v = self.pool.list_volumes_brief().map_err(engine)?;
        let map = self.snapshot_volumes()?;
        let now = std::time::Instant::now();
        let mut out = Vec::with_capacity(v.len());
        for mut v in v {
            let cached = lock(&self.unique)
                .get(&v.id)
                .filter(|(t, _)| now.duration_since(*t) < UNIQUE_TTL)
                .map(|(_, u)| *u);
            v.unique_bytes = match cached {
                Some(u) => u,
                None => match self.pool.volume(&v.name) {
                    Ok(full) => {
                        lock(&self.unique).insert(v.id, (now, full.unique_bytes));
                        full.unique_bytes
                    }
                    Err(cdmfs::Error::NotFound(_)) => continue, // deleted meanwhile
                    Err(e) => return Err(engine(e)),
                },
            };
            out.push(self.to_volume_with(v, &map));
        }
        Ok(out)
    }

    pub(super) fn volume_get(&self, name: &str) -> ApiResult<Volume> {
        let v = self.pool.volume(name).map_err(engine)?;
        lock(&self.unique).insert(v.id, (std::time::Instant::now(), v.unique_bytes));
        let frag = match self.fragmentation_now(v.id) {
            Ok(f) => Some(super::defrag::to_api(&f)),
            Err(cdmfs::Error::NotFound(_)) => None, // deleted meanwhile
            Err(e) => return Err(engine(e)),
        };
        let mut out = self.to_volume(v);
        out.fragmentation = frag;
        Ok(out)
    }

    pub(super) fn volume_grow(&self, c: &Caller, name: &str, size: u64) -> ApiResult<Volume> {
        self.refuse_replica(name)?;
        let v = self.pool.grow_volume(name, size).map_err(engine)?;
        self.commit()?;
        self.events
            .emit("volume.updated", name, &c.user, json!({"size": size}));
        Ok(self.to_volume(v))
    }

    /// `POST /v1/volumes/{name}/revert`: refused while a client has the
    /// live volume exported (its cache and filesystem would no longer
    /// match the blocks under it) or it is mounted here, and for a
    /// replica, which only its receiver writes (checked under the
    /// receiver's lock, as promote does, so no transfer commits meanwhile).
    pub(super) fn volume_revert(&self, c: &Caller, name: &str, snapshot: u64) -> ApiResult<Volume> {
        let _receiver = crate::replication::receive::exclusive();
        self.refuse_replica(name)?;
        let v = self.pool.volume(name).map_err(engine)?;
        let owned = self.pool.snapshot(snapshot).map_err(engine)?.volume_id == v.id;
        if !owned {
            return Err(ApiError::not_found(format!(
                "snapshot {snapshot} is not a snapshot of volume {name}"
            )));
        }
        let mounted = self.mounts_of(name, None);
        if !mounted.is_empty() {
            return Err(ApiError::conflict(format!(
                "volume {name} is mounted ({}); unmount it first",
                mounted.join(", ")
            )));
        }
        let busy: Vec<String> = self
            .nbd
            .clients()
            .into_iter()
            .filter(|c| c.export == name)
            .map(|c| c.peer.to_string())
            .collect();
        if !busy.is_empty() {
            return Err(ApiError::conflict(format!(
                "volume {name} is exported to {} client(s) ({}); disconnect them first",
                busy.len(),
                busy.join(", ")
            )));
        }
        let v = self
            .pool
            .revert_volume(name, Some(snapshot))
            .map_err(engine)?;
        self.commit()?;
        self.events.emit(
            "volume.updated",
            name,
            &c.user,
            json!({"reverted_to": snapshot}),
        );
        Ok(self.to_volume(v))
    }

    pub(super) fn volume_delete(&self, c: &Caller, name: &str, force: bool) -> ApiResult<()> {
        let v = self.pool.volume(name).map_err(engine)?;
        let kind = if v.origin.is_some() {
            "clone"
        } else {
            "volume"
        };
        self.remove_volume(&c.user, name, force, kind)
    }
}

//! Snapshots of a volume.

use cdm_api::auth::Caller;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use cdmfs::SnapshotInfo;
use serde_json::json;

use super::{engine, Appliance};

impl Appliance {
    pub(super) fn to_snapshot(&self, s: SnapshotInfo) -> ApiResult<Snapshot> {
        let (vols, _) = self.pool.catalog().map_err(engine)?;
        let mut v = Self::to_snapshot_with(s, &vols);
        Self::set_held_by(&mut v, &self.holds_now());
        Ok(v)
    }

    /// The points replication links hold now, for the API's view (none if
    /// they cannot be read: a listing does not fail for it).
    fn holds_now(&self) -> crate::replication::holds::Holds {
        let Some(r) = self.replication.get() else {
            return Default::default();
        };
        r.holds().unwrap_or_else(|e| {
            tracing::warn!(error = %e.message, "cannot read the replication holds");
            Default::default()
        })
    }

    fn set_held_by(s: &mut Snapshot, holds: &crate::replication::holds::Holds) {
        s.held_by = holds.of(s.id).iter().map(|h| h.link).collect();
        s.held_by.sort_unstable();
        s.held_by.dedup();
    }

    pub(super) fn to_snapshot_with(s: SnapshotInfo, vols: &[cdmfs::Brief]) -> Snapshot {
        let clones = vols
            .iter()
            .filter(|v| v.origin == Some(s.id))
            .map(|v| v.name.clone())
            .collect();
        let location = crate::tier::snapshot_location(&s).to_string();
        Snapshot {
            export: format!("{}@{}", s.volume, s.id),
            id: s.id,
            volume: s.volume,
            label: s.label,
            created_unix: s.created_ns / 1_000_000_000,
            metadata: s.metadata,
            size: s.size,
            block_size: s.block_size,
            allocated_bytes: s.allocated_bytes,
            unique_bytes: s.unique_bytes,
            sealed: s.seal.is_some(),
            key_loaded: s.seal.is_none() || s.seal_key_loaded,
            clones,
            held_by: Vec::new(),
            location,
        }
    }

    pub(super) fn snapshot_of(&self, volume: &str, id: u64) -> ApiResult<SnapshotInfo> {
        let s = self.pool.snapshot(id).map_err(engine)?;
        if s.volume != volume {
            return Err(ApiError::not_found(format!(
                "snapshot {id} of volume {volume} not found"
            )));
        }
        Ok(s)
    }

    pub(super) fn snapshot_create(
        &self,
        c: &Caller,
        volume: &str,
        req: SnapshotCreate,
    ) -> ApiResult<Snapshot> {
        // A replica's points are the ones it receives.
        self.refuse_replica(volume)?;
        let meta = req.metadata.unwrap_or_else(|| json!({}));
        if !meta.is_object() {
            return Err(ApiError::bad_request("metadata must be a JSON object"));
        }
        let label = req.label.unwrap_or_default();
        if label.len() > 256 || label.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "label must be at most 256 bytes without control characters",
            ));
        }
        let s = self
            .pool
            .create_snapshot_at(volume, &label, meta, self.clock.now_ns())
            .map_err(engine)?;
        self.commit()?;
        self.events.emit(
            "snapshot.created",
            &format!("{volume}@{}", s.id),
            &c.user,
            json!({"volume": volume, "id": s.id, "label": label}),
        );
        self.to_snapshot(s)
    }

    pub(super) fn snapshot_list(&self, volume: &str) -> ApiResult<Vec<Snapshot>> {
        let v = self.pool.list_snapshots(Some(volume)).map_err(engine)?;
        let (vols, _) = self.pool.catalog().map_err(engine)?;
        let holds = self.holds_now();
        Ok(v.into_iter()
            .map(|s| {
                let mut v = Self::to_snapshot_with(s, &vols);
                Self::set_held_by(&mut v, &holds);
                v
            })
            .collect())
    }

    pub(super) fn snapshot_get(&self, volume: &str, id: u64) -> ApiResult<Snapshot> {
        self.to_snapshot(self.snapshot_of(volume, id)?)
    }

    /// 409 `held` for the base of a replication link's next transfer
    /// (`docs/replication.md`, "Holds").
    fn refuse_held(&self, export: &str, id: u64) -> ApiResult<()> {
        let Some(r) = self.replication.get() else {
            return Ok(());
        };
        let holds = r.holds()?;
        if holds.is_held(id) {
            return Err(ApiError::new(
                409,
                "held",
                format!(
                    "snapshot {export} is the replication base of {}: without it their next \
                     transfer is a full resend; force to delete it anyway",
                    holds.describe(id)
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn snapshot_delete(
        &self,
        c: &Caller,
        volume: &str,
        id: u64,
        force: bool,
    ) -> ApiResult<()> {
        let s = self.to_snapshot(self.snapshot_of(volume, id)?)?;
        let mounted = self.mounts_of(volume, Some(id));
        if !mounted.is_empty() {
            return Err(ApiError::conflict(format!(
                "snapshot {} is mounted ({}); unmount it first",
                s.export,
                mounted.join(", ")
            )));
        }
        let clients = self.clients_of(&s.export);
        if !force && !clients.is_empty() {
            return Err(ApiError::conflict(format!(
                "snapshot {} is exported to {} client(s); disconnect them or force",
                s.export,
                clients.len()
            )));
        }
        if !force && !s.clones.is_empty() {
            return Err(ApiError::conflict(format!(
                "snapshot {} has clones ({}); delete or promote them, or force",
                s.export,
                s.clones.join(", ")
            )));
        }
        if !force {
            self.refuse_held(&s.export, id)?;
        }
        self.pool.delete_snapshot(id).map_err(engine)?;
        // Forced past its clients: end their connections now.
        self.nbd.disconnect_export(&s.export);
        self.commit()?;
        self.events.emit(
            "snapshot.deleted",
            &s.export,
            &c.user,
            json!({"volume": volume, "id": id, "forced": force}),
        );
        Ok(())
    }
}

//! Replication's routes (`docs/replication.md`): the [`ReplicationBackend`]
//! over the appliance's [`crate::replication::Replication`] service.

use cdm_api::auth::Caller;
use cdm_api::replication::*;
use cdm_api::replication_backend::ReplicationBackend;
use cdm_api::types::{Job, Volume};
use cdm_api::{ApiError, ApiResult};
use serde_json::json;

use super::Appliance;
use crate::replication::error::ReplError;
use crate::replication::http::PeerId;
use crate::replication::{replicas, Replication};

impl Appliance {
    /// The replication service (set at start).
    fn repl(&self) -> ApiResult<&Replication> {
        self.replication
            .get()
            .map(|r| r.as_ref())
            .ok_or_else(|| ApiError::unavailable("replication is not set up yet"))
    }
}

impl ReplicationBackend for Appliance {
    fn create_pairing(&self, c: &Caller, req: PairingCreate) -> ApiResult<PairingToken> {
        self.repl()?.create_pairing(c, req)
    }
    fn pair(&self, req: PairRequest, client: Option<std::net::IpAddr>) -> ApiResult<PairReply> {
        self.repl()?.pair(req, client)
    }
    fn create_peer(&self, c: &Caller, req: PeerCreate) -> ApiResult<Peer> {
        self.repl()?.create_peer(c, req)
    }
    fn list_peers(&self) -> ApiResult<Vec<Peer>> {
        self.repl()?.peers()
    }
    fn delete_peer(&self, c: &Caller, name: &str) -> ApiResult<()> {
        self.repl()?.delete_peer(c, name)
    }
    fn create_link(&self, c: &Caller, req: LinkCreate) -> ApiResult<Link> {
        self.repl()?.create_link(c, req)
    }
    fn list_links(&self) -> ApiResult<Vec<Link>> {
        self.repl()?.links()
    }
    fn link(&self, id: u64) -> ApiResult<Link> {
        self.repl()?.link(id)
    }
    fn set_link_enabled(&self, c: &Caller, id: u64, enabled: bool) -> ApiResult<Link> {
        self.repl()?.set_link_enabled(c, id, enabled)
    }
    fn delete_link(&self, c: &Caller, id: u64) -> ApiResult<()> {
        self.repl()?.delete_link(c, id)
    }
    fn transfers(&self, id: u64) -> ApiResult<Vec<Transfer>> {
        self.repl()?.transfers(id)
    }
    fn run_link(&self, c: &Caller, id: u64) -> ApiResult<Job> {
        self.repl()?.run_link(id, &c.user)
    }
    fn promote_volume(&self, c: &Caller, name: &str) -> ApiResult<Volume> {
        self.volume_promote(c, name)
    }
    fn demote_volume(&self, c: &Caller, name: &str, req: VolumeDemote) -> ApiResult<Volume> {
        self.volume_demote(c, name, req)
    }
    fn load_volume_key(&self, c: &Caller, name: &str, req: VolumeKey) -> ApiResult<Volume> {
        crate::replication::keys::load(&self.pool, name, &req)?;
        // Who loaded it, never what (the audit log has the request).
        self.events
            .emit("volume.key_loaded", name, &c.user, json!({"volume": name}));
        self.volume_get(name)
    }
    fn unload_volume_key(&self, c: &Caller, name: &str) -> ApiResult<Volume> {
        crate::replication::keys::unload(&self.pool, name)?;
        self.events.emit(
            "volume.key_unloaded",
            name,
            &c.user,
            json!({"volume": name}),
        );
        self.volume_get(name)
    }
}

/// The API's form of a data-path refusal.
fn repl_err(e: ReplError) -> ApiError {
    let code: &'static str = match e.code.as_str() {
        "not_found" => return ApiError::not_found(e.message),
        "not_a_replica" => "not_a_replica",
        "busy" => "busy",
        "conflict" => "conflict",
        "no_space" => return ApiError::new(507, "no_space", e.message),
        "state" => return ApiError::unavailable(e.message),
        _ => return ApiError::internal(e.to_string()),
    };
    ApiError::new(409, code, e.message)
}

impl Appliance {
    /// Whether `volume` is a replica (unknown counts as one where it
    /// matters: see [`Appliance::refuse_replica`]).
    pub(super) fn is_replica(&self, volume: &str) -> bool {
        matches!(replicas::get(&self.state, volume), Ok(Some(_)))
    }

    /// 409 `replica` for a change to a replica volume, which only the
    /// receiver writes.
    pub(super) fn refuse_replica(&self, volume: &str) -> ApiResult<()> {
        match replicas::get(&self.state, volume).map_err(repl_err)? {
            None => Ok(()),
            Some(r) => Err(ApiError::new(
                409,
                "replica",
                format!(
                    "volume {volume} is a read-only replica fed by {}: promote it first \
                     (POST /v1/volumes/{volume}/promote)",
                    r.peer
                ),
            )),
        }
    }

    /// `POST /v1/volumes/{name}/promote`.
    pub(super) fn volume_promote(&self, c: &Caller, name: &str) -> ApiResult<Volume> {
        replicas::promote(&self.state, &self.pool, name).map_err(repl_err)?;
        self.events.emit(
            "replication.promoted",
            name,
            &c.user,
            json!({"volume": name}),
        );
        self.volume_get(name)
    }

    /// `POST /v1/volumes/{name}/demote`: refused while clients have it
    /// open (they could write to it).
    pub(super) fn volume_demote(
        &self,
        c: &Caller,
        name: &str,
        req: VolumeDemote,
    ) -> ApiResult<Volume> {
        let peer = crate::replication::peers::get(&self.state, &req.peer)
            .map_err(super::st)?
            .ok_or_else(|| ApiError::not_found(format!("peer {} not found", req.peer)))?;
        let open = self.clients_of(name);
        if !open.is_empty() {
            return Err(ApiError::conflict(format!(
                "volume {name} is exported to {} client(s): disconnect them first",
                open.len()
            )));
        }
        let id = PeerId {
            name: peer.name.clone(),
            identity: peer.identity.clone(),
            cert_sha256: peer.client_cert_sha256.clone(),
        };
        replicas::demote(&self.state, &self.pool, name, &id).map_err(repl_err)?;
        self.events.emit(
            "replication.demoted",
            name,
            &c.user,
            json!({"volume": name, "peer": peer.name}),
        );
        self.volume_get(name)
    }
}

//! Replication's routes (`docs/replication.md`): the [`ReplicationBackend`]
//! over the appliance's [`crate::replication::Replication`] service.

use cdm_api::auth::Caller;
use cdm_api::replication::*;
use cdm_api::replication_backend::ReplicationBackend;
use cdm_api::{ApiError, ApiResult};

use super::Appliance;
use crate::replication::Replication;

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
}

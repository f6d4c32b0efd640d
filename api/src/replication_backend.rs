//! What replication's routes need from the appliance (a part of
//! [`crate::backend::Backend`]): pairing, peers, links, transfers, and the
//! promotion and demotion of replica volumes, the keys of sealed ones.

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::replication::*;
use crate::types::{Job, Volume};

fn off() -> ApiError {
    ApiError::not_found("this server does no replication")
}

/// Replication between appliances (`docs/replication.md`). Every method
/// has a default that says the server does none, so a backend without
/// replication (the API's tests) needs no code for it.
pub trait ReplicationBackend {
    fn create_pairing(&self, _caller: &Caller, _req: PairingCreate) -> ApiResult<PairingToken> {
        Err(off())
    }
    /// The pairing call of another appliance; `client` is the TCP peer's
    /// address. 401 `invalid_token` for an unknown, used or expired token.
    fn pair(&self, _req: PairRequest, _client: Option<std::net::IpAddr>) -> ApiResult<PairReply> {
        Err(off())
    }
    /// Pairs with the appliance at `req.url` (calls its `pair`).
    fn create_peer(&self, _caller: &Caller, _req: PeerCreate) -> ApiResult<Peer> {
        Err(off())
    }
    fn list_peers(&self) -> ApiResult<Vec<Peer>> {
        Err(off())
    }
    /// 409 while links use it.
    fn delete_peer(&self, _caller: &Caller, _name: &str) -> ApiResult<()> {
        Err(off())
    }
    fn create_link(&self, _caller: &Caller, _req: LinkCreate) -> ApiResult<Link> {
        Err(off())
    }
    fn list_links(&self) -> ApiResult<Vec<Link>> {
        Err(off())
    }
    fn link(&self, _id: u64) -> ApiResult<Link> {
        Err(off())
    }
    fn set_link_enabled(&self, _caller: &Caller, _id: u64, _enabled: bool) -> ApiResult<Link> {
        Err(off())
    }
    fn delete_link(&self, _caller: &Caller, _id: u64) -> ApiResult<()> {
        Err(off())
    }
    /// 409 `busy` while a run of the link is going.
    fn run_link(&self, _caller: &Caller, _id: u64) -> ApiResult<Job> {
        Err(off())
    }
    /// Newest first.
    fn transfers(&self, _id: u64) -> ApiResult<Vec<Transfer>> {
        Err(off())
    }
    fn promote_volume(&self, _caller: &Caller, _name: &str) -> ApiResult<Volume> {
        Err(off())
    }
    fn demote_volume(
        &self,
        _caller: &Caller,
        _name: &str,
        _req: VolumeDemote,
    ) -> ApiResult<Volume> {
        Err(off())
    }
    /// Loads the key of a sealed volume (in memory): 400 `not_sealed`,
    /// 409 `wrong_key`.
    fn load_volume_key(&self, _caller: &Caller, _name: &str, _req: VolumeKey) -> ApiResult<Volume> {
        Err(off())
    }
    /// Forgets the key of a sealed volume.
    fn unload_volume_key(&self, _caller: &Caller, _name: &str) -> ApiResult<Volume> {
        Err(off())
    }
}

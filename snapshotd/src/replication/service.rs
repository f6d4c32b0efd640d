//! The replication service of one appliance: who it is (name, identity,
//! client certificate), whom it trusts (peers), and what it runs (links).
//! The API's replication routes, the replication listener and the
//! scheduler's replication tick all go through it.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cdm_api::{ApiError, ApiResult};
use cdmfs::Pool;

use super::peers::Trust;
use crate::appliance::st;
use crate::clock::Clock;
use crate::events::Events;
use crate::jobs::Jobs;
use crate::state::State;
use crate::tls::ClientMaterial;

/// A link's run in progress.
pub(crate) struct Running {
    /// Its job, once started.
    pub job: Option<u64>,
    pub cancel: Arc<AtomicBool>,
}

pub struct Replication {
    pub pool: Arc<Pool>,
    pub state: Arc<State>,
    pub events: Arc<Events>,
    pub clock: Arc<Clock>,
    pub jobs: Arc<Jobs>,
    /// `--name`.
    pub name: String,
    /// The pool's UUID in hex.
    pub identity: String,
    pub client: ClientMaterial,
    /// The CA certificate `GET /v1/ca` serves, which pairing tokens name.
    pub server_ca: String,
    /// The zstd level of new volumes here (raw replicas take it).
    pub compression: u8,
    pub trust: Arc<Trust>,
    /// The replication listener's port, once bound.
    pub port: OnceLock<u16>,
    /// The control plane (policy links read its applications).
    pub control: OnceLock<Arc<crate::control::Control>>,
    /// Runs in progress by link id.
    pub(crate) runs: Mutex<HashMap<u64, Running>>,
    /// The newest snapshot of each after-every-point link's volume that a
    /// run was started for, so each new point starts one run.
    pub(crate) seen: Mutex<HashMap<(u64, String), u64>>,
    /// Bytes and transfers per link since the start, for `/metrics`.
    pub(crate) counters: Mutex<HashMap<u64, super::runs::Counters>>,
    me: Weak<Replication>,
}

/// What [`Replication::new`] needs.
pub struct Setup {
    pub pool: Arc<Pool>,
    pub state: Arc<State>,
    pub events: Arc<Events>,
    pub clock: Arc<Clock>,
    pub jobs: Arc<Jobs>,
    pub name: String,
    pub client: ClientMaterial,
    pub server_ca: String,
    /// The pool's default zstd level for new volumes (0: off).
    pub compression: u8,
}

/// The pool's identity: its UUID in hex.
pub fn identity(pool: &Pool) -> cdmfs::Result<String> {
    Ok(hex::encode(pool.uuid()?))
}

impl Replication {
    pub fn new(s: Setup) -> Result<Arc<Replication>, crate::error::Error> {
        for t in [super::peers::PEERS, super::pairing::PAIRINGS] {
            s.state.ensure_table(t)?;
        }
        s.state.ensure_table(super::links::LINKS)?;
        s.state.ensure_table(super::links::TRANSFERS)?;
        let identity = identity(&s.pool)?;
        let trust = Trust::new();
        trust.reload(&s.state)?;
        Ok(Arc::new_cyclic(|me| Replication {
            pool: s.pool,
            state: s.state,
            events: s.events,
            clock: s.clock,
            jobs: s.jobs,
            name: s.name,
            identity,
            client: s.client,
            server_ca: s.server_ca,
            compression: s.compression,
            trust,
            port: OnceLock::new(),
            control: OnceLock::new(),
            runs: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            me: me.clone(),
        }))
    }

    /// Itself as an `Arc`, for jobs that outlive the request.
    pub(crate) fn arc(&self) -> ApiResult<Arc<Replication>> {
        self.me
            .upgrade()
            .ok_or_else(|| ApiError::unavailable("the appliance is shutting down"))
    }

    /// The CA bundle this appliance hands to peers: its own CA (which
    /// signs its client certificate) and the one its server certificate
    /// chains to, if another (`--tls-cert`).
    pub fn ca_bundle(&self) -> String {
        let own = self.client.ca_pem.trim();
        let served = self.server_ca.trim();
        if crate::tls::ca_sha256(own) == crate::tls::ca_sha256(served) {
            format!("{own}\n")
        } else {
            format!("{served}\n{own}\n")
        }
    }

    /// Re-reads the peers into the listener's trust.
    pub(crate) fn reload_trust(&self) -> ApiResult<()> {
        self.trust.reload(&self.state).map_err(st)
    }
}

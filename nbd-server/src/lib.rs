//! NBD for cdm: the protocol codec ([`proto`]), a server over cdmfs volumes
//! and snapshots ([`server`]), and a client ([`client`]).

pub mod client;
pub mod proto;
pub mod server;
pub mod stats;
pub mod tls;

/// Moved to [`cdm_common::signals`]; kept here for the callers that still
/// name it through this crate.
pub use cdm_common::signals;

pub use client::{Client, ClientError, ClientOptions};
pub use server::{ClientInfo, ConnEvent, Listener, Server, ServerConfig};

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise (the daemons).
pub fn init_logging() {
    cdm_common::log::init(cdm_common::log::LevelFilter::INFO);
}

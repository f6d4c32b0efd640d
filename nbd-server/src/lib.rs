//! NBD for cdm: the protocol codec ([`proto`]), a server over cdmfs volumes
//! and snapshots ([`server`]), and a client ([`client`]).

pub mod client;
pub mod proto;
pub mod server;
pub mod signals;
pub mod stats;
pub mod tls;

pub use client::{Client, ClientError, ClientOptions};
pub use server::{ClientInfo, ConnEvent, Listener, Server, ServerConfig};

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise (the daemons).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

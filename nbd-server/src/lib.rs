//! NBD for cdm: the protocol codec ([`proto`]), a server over cdmfs volumes
//! and snapshots ([`server`]), and a client ([`client`]).

pub mod client;
pub mod proto;
pub mod server;
pub mod signals;
pub mod tls;

pub use client::{Client, ClientError, ClientOptions};
pub use server::{ClientInfo, Listener, Server, ServerConfig};

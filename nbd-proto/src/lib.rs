//! The NBD protocol without a storage engine: the wire codec ([`codec`]) and
//! a synchronous client ([`client`]) and a pipelined one ([`pipelined`]:
//! many requests in flight over several connections). Tools that only speak NBD (the agent,
//! the inspector, tests) depend on this crate rather than on `nbd-server`,
//! which links the engine.

pub mod client;
pub mod codec;
pub mod pipelined;
pub mod tls;

pub use client::{Address, Client, ClientError, ClientOptions};
pub use codec::ProtoError;
pub use pipelined::Pipelined;
pub use tls::ClientTls;

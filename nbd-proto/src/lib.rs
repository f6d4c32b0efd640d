//! The NBD protocol without a storage engine: the wire codec ([`codec`]) and
//! a synchronous client ([`client`]). Tools that only speak NBD (the agent,
//! the inspector, tests) depend on this crate rather than on `nbd-server`,
//! which links the engine.

pub mod client;
pub mod codec;

pub use client::{Address, Client, ClientError, ClientOptions};
pub use codec::ProtoError;

//! An NBD server for cdm: exports served through one interface
//! ([`export::Export`], found by an [`export::ExportCatalog`]), cdmfs
//! volumes and snapshots being one implementation. The protocol codec and
//! the client are in the `nbd-proto` crate.
//!
//! By protocol phase: [`handshake`] (greeting, options), [`transmission`]
//! (requests), [`listener`] (sockets); [`server`] holds what they share.

pub mod export;
mod handshake;
pub mod listener;
mod ratelimit;
pub mod server;
pub mod stats;
pub mod tls;
mod transmission;

#[cfg(test)]
mod tests;

pub use export::pool::{PoolCatalog, PoolExport};
pub use export::{BlockSize, Export, ExportCatalog, ExportEntry, ExportError, Extent, ZeroFlags};
pub use listener::Listener;
pub use server::{ClientInfo, ConnEvent, Server, ServerConfig};

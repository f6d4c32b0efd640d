//! Replication between appliances (`docs/replication.md`): pairing, peers,
//! the mutually authenticated listener, links and their schedules (the
//! control side), and the transfer protocol (the data path).

pub mod exports;
pub mod holds;
pub mod keys;
pub mod links;
pub mod listener;
pub mod pairing;
pub mod peers;
pub mod runs;
pub mod schedule;
pub mod service;

pub use service::Replication;

// The data path: transport, replica records, pacing. Until the control
// side (pairing, links) calls them, parts are unused in the binary.
#[allow(dead_code)]
pub mod error;
#[allow(dead_code)]
pub mod http;
#[allow(dead_code)]
pub mod receive;
#[allow(dead_code)]
pub mod replicas;
#[allow(dead_code)]
pub mod resume;
#[allow(dead_code)]
pub mod send;
#[allow(dead_code)]
pub mod sessions;
#[allow(dead_code)]
pub mod throttle;
#[allow(dead_code)]
pub mod wire;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

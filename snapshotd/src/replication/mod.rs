//! Replication between appliances (`docs/replication.md`): pairing, peers,
//! the mutually authenticated listener, links and their schedules (the
//! control side), and the transfer protocol (the data path).

pub mod links;
pub mod listener;
pub mod pairing;
pub mod peers;
pub mod service;

pub use service::Replication;

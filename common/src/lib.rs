//! The rules every cdm binary shares, written once: what a name may be
//! ([`names`]), how sizes are read and printed ([`size`]), how locks are
//! taken ([`lock`]), how logging starts ([`log`]), how termination
//! signals are handled ([`signals`]) and how a file is replaced atomically
//! ([`fs`]).
//!
//! This crate depends on no other cdm crate, so the engine, the NBD
//! server, the daemon, the API and the agent can all use it.

pub mod fs;
pub mod lock;
pub mod log;
pub mod names;
pub mod signals;
pub mod size;

//! Disks as readers, for the appliance, the agent and the inspector alike:
//! partition tables and ext4 file-level reading over any byte source, the
//! host's loop-device and mount plumbing, and one FUSE server that exposes
//! disks as files (the appliance's pool view and the agent's NBD
//! attachment are both catalogs served by it). Knows neither the engine
//! nor NBD.

pub mod browse;
pub mod fuse;
pub mod host;
pub mod partition;

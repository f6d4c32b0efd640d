//! cdm-agent as a library: the pieces the `cdm-agent` binary puts
//! together, and the parsers the fuzz targets reach.

pub mod attach;
pub mod block;
pub mod config;
pub mod drill;
pub mod error;
pub mod kernel_nbd;
pub mod logs;
pub mod maria;
pub mod maria_backup;
pub mod maria_logs;
pub mod maria_pitr;
pub mod merge;
pub mod nbdfile;
pub mod ops;
pub mod pg;
pub mod pitr;
pub mod qcow2;
pub mod qmp;
pub mod serve;
pub mod statefile;
pub mod throttle;
pub mod vm;
pub mod vm_live;
pub mod vm_restore;

use std::path::PathBuf;

pub use error::{Error, ErrorKind};

/// What every command needs.
pub struct Ctx {
    pub api: cdm_api::client::Client,
    /// Appliance NBD address.
    pub nbd: String,
    pub state_dir: PathBuf,
    pub bandwidth: throttle::Bandwidth,
    pub json: bool,
    pub progress: bool,
    /// The appliance's CA pinned with `--ca-file`: passed on to the
    /// processes the agent starts (`serve-disk`).
    pub ca_file: Option<PathBuf>,
    /// STARTTLS against that CA for every NBD connection to the appliance
    /// over TCP.
    pub nbd_tls: Option<nbd_proto::ClientTls>,
}

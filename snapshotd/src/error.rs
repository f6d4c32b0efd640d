//! The daemon's error for work done outside a request's answer: scheduled
//! snapshots and retention, instant mounts, and the bodies of jobs. API
//! handlers answer with `cdm_api::ApiError` (a status and a code); this
//! type keeps what failed underneath (the engine, the state store, the
//! host) as its source, and displays as the message an operator reads in a
//! job, a mount record or the log.

use cdm_api::ApiError;

use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] cdmfs::Error),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A file or a process could not be used.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A request-level refusal met on the way (a bad source name, a
    /// volume in use); displays as its message.
    #[error("{}", .0.message)]
    Api(ApiError),
    /// The host's tools (loop devices, mount, blkid) said no.
    #[error(transparent)]
    Host(#[from] cdm_disk::host::HostError),
    /// The host holds nothing to mount, said in words.
    #[error("{0}")]
    NoFilesystem(String),
    /// A stored secret could not be sealed or opened.
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    /// A condition of the daemon's own, said in words.
    #[error("{0}")]
    Failed(String),
    /// What the daemon was doing when `source` failed.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Says what was being done: displays as `context: self`.
    pub fn context(self, context: impl Into<String>) -> Error {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Error {
        Error::Api(e)
    }
}

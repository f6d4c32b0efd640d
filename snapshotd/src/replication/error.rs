//! The error of the replication data path: a stable code (the contract's
//! `no_space`, `not_a_replica`, `bad_checksum`, `unpaired`, `network`,
//! `cancelled`, ...) for links and events, and a message for people.

use crate::state::StateError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ReplError {
    pub code: String,
    pub message: String,
    /// The HTTP status the peer answered (0: no answer, or a local error).
    pub status: u16,
    /// From `send::run`: the records of the points sent before the error,
    /// and the failed (or cancelled) one last.
    pub records: Vec<super::send::TransferRecord>,
}

impl ReplError {
    pub fn new(code: &str, message: impl Into<String>) -> ReplError {
        ReplError {
            code: code.to_string(),
            message: message.into(),
            status: 0,
            records: Vec::new(),
        }
    }

    pub fn is(&self, code: &str) -> bool {
        self.code == code
    }
}

impl From<StateError> for ReplError {
    fn from(e: StateError) -> Self {
        ReplError::new("state", e.to_string())
    }
}

/// Engine errors by what a link should say about them.
impl From<cdmfs::Error> for ReplError {
    fn from(e: cdmfs::Error) -> Self {
        use cdmfs::Error as E;
        let code = match &e {
            E::NoSpace => "no_space",
            E::Io(io)
                if io.raw_os_error() == Some(libc::ENOSPC)
                    || io.kind() == std::io::ErrorKind::StorageFull =>
            {
                "no_space"
            }
            E::NotFound(_) => "not_found",
            E::KeyRequired | E::SealKeyRequired(_) | E::WrongKey(_) => "key_required",
            E::Invalid(_) | E::OutOfRange { .. } => "invalid",
            E::Exists(_) | E::Busy(_) | E::ReadOnly(_) => "conflict",
            _ => "engine",
        };
        ReplError::new(code, e.to_string())
    }
}

//! What can go wrong talking to the store, by what the caller does about
//! it: a job fails with the reason (credentials, bucket), a read gets an
//! I/O error, a retry loop tries again ([`TierError::retryable`]).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TierError {
    #[error("object store unreachable: {0}")]
    Unreachable(String),
    #[error("object store refused the credentials ({code}): {message}")]
    BadCredentials { code: String, message: String },
    #[error("bucket {0:?} does not exist")]
    NoSuchBucket(String),
    #[error("object store answered HTTP {status} {code}: {message}")]
    Http {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{key}: asked for {expected} bytes at {offset}, got {got}")]
    ShortRead {
        key: String,
        offset: u64,
        expected: u64,
        got: u64,
    },
    #[error("{key}: uploaded {expected} bytes but the store holds {got:?}")]
    NotVerified {
        key: String,
        expected: u64,
        got: Option<u64>,
    },
    #[error("object store configuration: {0}")]
    Config(String),
    #[error("object store answer not understood: {0}")]
    Protocol(String),
}

impl TierError {
    /// Worth another attempt: the network, a timeout, the server's own
    /// failures (5xx) and its requests to slow down (429, SlowDown). Never
    /// another 4xx: the same request would get the same answer.
    pub fn retryable(&self) -> bool {
        match self {
            TierError::Unreachable(_) => true,
            TierError::Http { status, code, .. } => {
                *status >= 500 || *status == 429 || code == "SlowDown"
            }
            _ => false,
        }
    }

    /// The error as an `io::Error` for a reader (the engine's `TierRead`):
    /// the kind tells an unreachable store from a missing or short object.
    pub fn into_io(self) -> std::io::Error {
        use std::io::ErrorKind;
        let kind = match &self {
            TierError::Unreachable(_) => ErrorKind::TimedOut,
            TierError::ShortRead { .. } | TierError::Http { status: 416, .. } => {
                ErrorKind::UnexpectedEof
            }
            TierError::Http { status: 404, .. } => ErrorKind::NotFound,
            TierError::BadCredentials { .. } => ErrorKind::PermissionDenied,
            _ => ErrorKind::Other,
        };
        std::io::Error::new(kind, self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, code: &str) -> TierError {
        TierError::Http {
            status,
            code: code.into(),
            message: String::new(),
        }
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(TierError::Unreachable("x".into()).retryable());
        assert!(http(500, "InternalError").retryable());
        assert!(http(503, "SlowDown").retryable());
        assert!(http(429, "").retryable());
        assert!(http(400, "SlowDown").retryable());
        assert!(!http(404, "NoSuchKey").retryable());
        assert!(!http(400, "BadDigest").retryable());
        assert!(!http(416, "InvalidRange").retryable());
        let creds = TierError::BadCredentials {
            code: "AccessDenied".into(),
            message: String::new(),
        };
        assert!(!creds.retryable());
        assert!(!TierError::NoSuchBucket("b".into()).retryable());
    }
}

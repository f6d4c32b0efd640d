//! The agent library's error: what kind of thing failed (for a caller that
//! decides on it), what the agent was doing (the context, said to the
//! user), and the cause underneath when there is one. `anyhow` stays at the
//! binary's edge (`main.rs`), which prints the whole chain.

use std::fmt;
use std::path::Path;

/// A cause, kept whole for [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What failed, coarse enough to decide on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A value from the user or the configuration is not acceptable (a
    /// name, a time window, a rate, a configuration file).
    Invalid,
    /// A file could not be read or written.
    Io,
    /// Something on this host did not go as asked: a mount, a loop device,
    /// the disk server.
    Host,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Io => "I/O",
            ErrorKind::Host => "host",
        })
    }
}

/// Kind, context and source. Displays as its context; the cause is its
/// [`source`](std::error::Error::source) (see [`Error::report`]).
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<BoxError>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with no cause underneath.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }
    /// An error caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Error {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }
    pub fn invalid(context: impl Into<String>) -> Error {
        Error::new(ErrorKind::Invalid, context)
    }
    pub fn host(context: impl Into<String>) -> Error {
        Error::new(ErrorKind::Host, context)
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn context(&self) -> &str {
        &self.context
    }
    /// The context and every cause under it, `: `-separated (what a user
    /// reads; the binary's `{:#}` prints the same).
    pub fn report(&self) -> String {
        let mut s = self.context.clone();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}

/// Maps an I/O error on `path` to an [`ErrorKind::Io`] error naming it.
pub fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::with_source(ErrorKind::Io, path.display().to_string(), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_walks_the_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = Error::with_source(ErrorKind::Io, "/etc/x.toml", io);
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.to_string(), "/etc/x.toml");
        assert_eq!(e.report(), "/etc/x.toml: gone");
        assert_eq!(Error::invalid("bad").report(), "bad");
    }
}

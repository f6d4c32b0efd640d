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
/// [`source`](std::error::Error::source) (see [`Error::report`]). The
/// alternate form (`{:#}`) prints the whole chain, as `anyhow` does, so a
/// message that embeds an inner error keeps reading the same.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<BoxError>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            f.write_str(&self.report())
        } else {
            f.write_str(&self.context)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
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
    /// An error from another crate's `e`, its whole chain as the message.
    pub fn flat(kind: ErrorKind, e: &(dyn std::error::Error + 'static)) -> Error {
        Error::new(kind, chain_text(e))
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
        push_causes(&mut s, std::error::Error::source(self));
        s
    }
}

/// `e` and every cause under it, `: `-separated, each said once: what the
/// binary prints for any error (see [`push_causes`]).
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    push_causes(&mut s, e.source());
    s
}

/// Appends `: cause` for each cause from `cur` down, except a cause whose
/// text already ends what is written: many errors (the NBD client's `I/O:
/// {0}`, PostgreSQL's `db error: {cause}`) print their cause and also
/// return it as their source, and a user should read it once.
fn push_causes(s: &mut String, mut cur: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(e) = cur {
        let t = e.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = e.source();
    }
}

/// Errors met by `?` without a context of their own keep reading as they
/// did: their text and every cause under it become the message.
macro_rules! from_flat {
    ($($t:ty => $kind:ident),* $(,)?) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::flat(ErrorKind::$kind, &e)
            }
        }
    )*};
}

from_flat! {
    std::io::Error => Io,
    std::num::ParseIntError => Invalid,
    serde_json::Error => Host,
    postgres::Error => Host,
    nbd_proto::client::ClientError => Host,
    cdm_api::client::ClientError => Host,
    crate::merge::MergeError => Io,
    cdm_disk::host::HostError => Host,
}

/// One-line context for a `Result` carrying any error (std, PostgreSQL,
/// NBD client, appliance client, or this crate's own).
pub trait Context<T> {
    /// Wraps the error as the source of `kind` with the context `c()`.
    fn context_with<C: Into<String>>(self, kind: ErrorKind, c: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<BoxError>> Context<T> for std::result::Result<T, E> {
    fn context_with<C: Into<String>>(self, kind: ErrorKind, c: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::with_source(kind, c(), e))
    }
}

/// `Error::new(ErrorKind::$kind, format!(...))`: a message made here.
#[macro_export]
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*))
    };
}

/// Returns early with [`err!`].
#[macro_export]
macro_rules! fail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::err!($kind, $($arg)*))
    };
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
        assert_eq!(format!("{e:#}"), "/etc/x.toml: gone");
        assert_eq!(Error::invalid("bad").report(), "bad");
        // A cause that prints its own cause is not repeated.
        let nbd = nbd_proto::ClientError::Io(std::io::Error::other("reset"));
        let e = Error::with_source(ErrorKind::Host, "stage flush", nbd);
        assert_eq!(format!("{e:#}"), "stage flush: I/O: reset");
    }
}

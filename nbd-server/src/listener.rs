//! Sockets (as nbdkit's `sockets.c`): TCP and unix listeners, sockets
//! passed by systemd socket activation, and the accept loop that gives each
//! connection its thread.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use crate::server::Server;

/// A listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// `HOST:PORT` or `unix:PATH` (a stale socket file is replaced).
    pub fn bind(addr: &str) -> io::Result<Listener> {
        if let Some(path) = addr.strip_prefix("unix:") {
            let _ = std::fs::remove_file(path);
            Ok(Listener::Unix(UnixListener::bind(path)?))
        } else {
            Ok(Listener::Tcp(TcpListener::bind(addr)?))
        }
    }

    /// Binds every address, unless the service manager passed sockets
    /// (then [`crate::server::serve_until_signal`] uses those and this returns none).
    pub fn bind_all(addrs: &[String]) -> io::Result<Vec<Listener>> {
        if std::env::var_os("LISTEN_FDS").is_some() {
            return Ok(Vec::new());
        }
        addrs
            .iter()
            .map(|a| {
                Listener::bind(a)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))
            })
            .collect()
    }

    /// Listening sockets passed by systemd socket activation (`LISTEN_PID`,
    /// `LISTEN_FDS`), if any.
    pub fn from_env() -> io::Result<Vec<Listener>> {
        use std::os::fd::FromRawFd;
        let pid_ok = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id());
        let n: i32 = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if !pid_ok || n <= 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for fd in 3..3 + n {
            let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: fd was handed to us by the service manager; addr/len are valid out-params.
            let rc = unsafe {
                libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len)
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            // SAFETY: the fd is a listening socket we now own.
            if addr.ss_family as i32 == libc::AF_UNIX {
                out.push(Listener::Unix(unsafe { UnixListener::from_raw_fd(fd) }));
            } else {
                out.push(Listener::Tcp(unsafe { TcpListener::from_raw_fd(fd) }));
            }
        }
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        Ok(out)
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix".into()),
        }
    }
}

/// A JSON string literal of `s` (quotes, backslashes and control
/// characters escaped): the ready file holds socket paths, which may
/// contain anything, and this crate has no JSON library.
pub fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Removes a ready file left by an earlier run, so that whoever waits for
/// it never reads the addresses of a process that is gone.
pub fn clear_ready_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `json` (the bound addresses) to `path` atomically: to a
/// temporary file beside it, then renamed, so a reader sees either no file
/// or the whole text. Called once every listener is bound, which is what
/// lets a caller ask for port 0 and learn the port the kernel chose
/// instead of guessing a free one (and racing for it).
pub fn write_ready_file(path: &Path, json: &str) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(json.as_bytes())?;
        f.write_all(b"\n")?;
    }
    std::fs::rename(&tmp, path)
}

type Split = (
    Box<dyn crate::tls::RawConn>,
    Box<dyn Read + Send>,
    Box<dyn Write + Send>,
);

fn split_tcp(s: TcpStream) -> io::Result<Split> {
    s.set_nodelay(true)?;
    let (r, w) = (s.try_clone()?, s.try_clone()?);
    Ok((
        Box::new(s),
        Box::new(r),
        Box::new(io::BufWriter::with_capacity(256 << 10, w)),
    ))
}

fn split_unix(s: UnixStream) -> io::Result<Split> {
    let (r, w) = (s.try_clone()?, s.try_clone()?);
    Ok((
        Box::new(s),
        Box::new(r),
        Box::new(io::BufWriter::with_capacity(256 << 10, w)),
    ))
}

impl Server {
    /// Accepts connections until shutdown, a thread per connection.
    pub fn serve(self: &Arc<Self>, l: Listener) -> io::Result<()> {
        loop {
            let (streams, peer) = match &l {
                Listener::Tcp(t) => {
                    let (s, a) = t.accept()?;
                    (split_tcp(s), a.to_string())
                }
                Listener::Unix(u) => {
                    let (s, _) = u.accept()?;
                    (split_unix(s), "unix".to_string())
                }
            };
            if self.is_shutdown() {
                return Ok(());
            }
            let (raw, r, w) = match streams {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set up connection");
                    continue;
                }
            };
            let me = self.clone();
            std::thread::spawn(move || {
                tracing::debug!(%peer, "client connected");
                if let Err(e) = me.handle_socket(raw, r, w, &peer) {
                    tracing::info!(%peer, error = %e, "connection ended");
                }
            });
        }
    }
}

#[cfg(test)]
mod ready_tests {
    use super::*;

    #[test]
    fn json_string_escapes_what_json_requires() {
        assert_eq!(json_string("unix:/a b"), r#""unix:/a b""#);
        // A quote, a backslash, a newline and a control character.
        assert_eq!(json_string("q\"b\\\n\u{1}"), r#""q\"b\\\u000a\u0001""#);
    }

    #[test]
    fn ready_file_is_replaced_whole_and_cleared() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ready");
        clear_ready_file(&p).unwrap(); // absent: fine
        write_ready_file(&p, r#"{"nbd": ["127.0.0.1:1"]}"#).unwrap();
        write_ready_file(&p, r#"{"nbd": ["127.0.0.1:2"]}"#).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"nbd\": [\"127.0.0.1:2\"]}\n"
        );
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        clear_ready_file(&p).unwrap();
        assert!(!p.exists());
    }
}

//! Sockets (as nbdkit's `sockets.c`): TCP and unix listeners, sockets
//! passed by systemd socket activation, and the accept loop that gives each
//! connection its thread.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
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

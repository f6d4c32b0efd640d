//! An NBD server over an [`ExportCatalog`]. One thread reads each
//! connection's requests and hands them to a few worker threads, which reply
//! in any order under a write lock (the nbdkit model).
//!
//! This file holds the server's state and a connection's life; the phases
//! are in [`crate::handshake`] (greeting and options), [`crate::transmission`]
//! (requests) and [`crate::listener`] (sockets).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use cdmfs::Pool;
use nbd_proto::codec::ProtoError;

use crate::export::pool::PoolCatalog;
use crate::export::{ExportCatalog, ExportError};
use crate::handshake::Outcome;
use crate::listener::Listener;
use crate::stats::{ExportStats, StatsSnapshot};

/// A client entering or leaving transmission on an export.
#[derive(Clone, Debug)]
pub enum ConnEvent {
    Connected(ClientInfo),
    Disconnected(ClientInfo),
}

/// Called on [`ConnEvent`]s, without any server lock held.
pub type EventHook = Arc<dyn Fn(ConnEvent) + Send + Sync>;

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// Export served for the empty name (`nbd://host/`).
    pub default_export: Option<String>,
    /// Worker threads per connection (0: handle requests inline, in order).
    pub workers: usize,
    /// Serve every export read-only.
    pub read_only: bool,
    /// Bytes of requests in flight per connection before reading pauses.
    pub max_inflight_bytes: u64,
    /// TLS (STARTTLS); None: plaintext only.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Told when clients attach to and leave exports.
    pub on_event: Option<EventHook>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("default_export", &self.default_export)
            .field("workers", &self.workers)
            .field("read_only", &self.read_only)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("tls", &self.tls.is_some())
            .field("on_event", &self.on_event.is_some())
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            default_export: None,
            workers: 4,
            read_only: false,
            max_inflight_bytes: 256 << 20,
            tls: None,
            on_event: None,
        }
    }
}

/// A connected client, for listings.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub peer: String,
    pub export: String,
    pub since_unix: u64,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Refused(String),
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Commit(#[from] ExportError),
}

pub struct Server {
    pub(crate) catalog: Arc<dyn ExportCatalog>,
    pub(crate) cfg: ServerConfig,
    shutdown: AtomicBool,
    next_id: AtomicU64,
    clients: Mutex<HashMap<u64, (ClientInfo, Arc<Hangup>)>>,
    /// I/O counters per export name.
    stats: Mutex<HashMap<String, Arc<ExportStats>>>,
    /// Requests being processed, across connections (for [`Server::drain`]).
    pub(crate) inflight: AtomicU64,
    /// Addresses [`start`] listens on, to wake blocked accepts at shutdown.
    listening: Mutex<Vec<String>>,
}

pub(crate) type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// Ends a connection from outside its reader thread, when its export was
/// deleted. Shutting the socket's read side wakes the reader with an end
/// of stream while replies to requests in flight still go out; requests
/// already read get `ESHUTDOWN`; closing the socket follows when the
/// connection's threads are done.
pub(crate) struct Hangup {
    /// A duplicate of the connection's socket (none for plain streams:
    /// then the reader stops after its next request).
    sock: Option<OwnedFd>,
    closing: AtomicBool,
    /// "peer on export", for the one log line.
    pub(crate) who: String,
}

/// What the handshake knows of the connection it runs on.
pub(crate) struct Link<'a> {
    pub(crate) peer: &'a str,
    /// The socket, for hanging up (none for plain streams).
    pub(crate) sock: Option<&'a OwnedFd>,
    pub(crate) tls_active: bool,
    pub(crate) tls_possible: bool,
}

/// A client in the server's table, from just before the reply that lets
/// it into transmission until it leaves. Registering before that reply
/// means `disconnect_export` cannot miss a client that has just connected.
pub(crate) struct Registration {
    server: Arc<Server>,
    id: u64,
    pub(crate) info: ClientInfo,
    pub(crate) hangup: Arc<Hangup>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.server.clients).remove(&self.id);
        self.server
            .notify(ConnEvent::Disconnected(self.info.clone()));
    }
}

impl Server {
    /// Enters a client of `export` in the table (see `Registration`).
    pub(crate) fn register(self: &Arc<Self>, link: &Link, export: &str) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let since_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let info = ClientInfo {
            id,
            peer: link.peer.to_string(),
            export: export.to_string(),
            since_unix,
        };
        let sock = link.sock.and_then(|s| s.try_clone().ok());
        let hangup = Arc::new(Hangup::new(sock, format!("{} on {export}", link.peer)));
        lock(&self.clients).insert(id, (info.clone(), hangup.clone()));
        self.notify(ConnEvent::Connected(info.clone()));
        Registration {
            server: self.clone(),
            id,
            info,
            hangup,
        }
    }
}

impl Hangup {
    pub(crate) fn new(sock: Option<OwnedFd>, who: String) -> Hangup {
        Hangup {
            sock,
            closing: AtomicBool::new(false),
            who,
        }
    }

    /// Starts ending the connection; true the first time only (so the
    /// caller logs once per connection).
    pub(crate) fn hang_up(&self) -> bool {
        if self.closing.swap(true, Ordering::SeqCst) {
            return false;
        }
        if let Some(fd) = &self.sock {
            // SAFETY: fd is our own open duplicate of the socket. An error
            // (the client already left) needs no handling.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) };
        }
        true
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

/// A duplicate of `raw`'s socket, for [`Hangup`]; its own descriptor, so it
/// stays valid whoever closes `raw` (the TLS pump thread, say).
fn dup_socket(raw: &dyn crate::tls::RawConn) -> Option<OwnedFd> {
    // SAFETY: raw is alive for this call, so its descriptor is open.
    let fd = unsafe { BorrowedFd::borrow_raw(raw.as_raw_fd()) };
    fd.try_clone_to_owned().ok()
}

pub(crate) use cdm_common::lock::lock;

/// Writes `parts` as one reply under the connection's write lock, then flushes.
pub(crate) fn send(w: &SharedWriter, parts: &[&[u8]]) -> io::Result<()> {
    let mut g = lock(w);
    for p in parts {
        g.write_all(p)?;
    }
    g.flush()
}

/// Fills `buf`; false on a clean end of stream before the first byte.
pub(crate) fn read_exact_or_eof(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl Server {
    /// A server of a pool's volumes and snapshots.
    pub fn new(pool: Arc<Pool>, cfg: ServerConfig) -> Arc<Server> {
        Server::with_catalog(Arc::new(PoolCatalog::new(pool)), cfg)
    }

    /// A server of whatever `catalog` opens.
    pub fn with_catalog(catalog: Arc<dyn ExportCatalog>, cfg: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            catalog,
            cfg,
            shutdown: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            clients: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            inflight: AtomicU64::new(0),
            listening: Mutex::new(Vec::new()),
        })
    }

    pub fn catalog(&self) -> &Arc<dyn ExportCatalog> {
        &self.catalog
    }

    /// Stops accepting; connections see ESHUTDOWN on new requests. Accept
    /// threads blocked in accept(2) are woken by a connection to each
    /// address [`start`] listens on, notice the flag and exit.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for a in lock(&self.listening).iter() {
            match a.strip_prefix("unix:") {
                Some(p) => {
                    let _ = UnixStream::connect(p);
                }
                None => {
                    // A wildcard listener is reachable on loopback.
                    let a = a
                        .replace("0.0.0.0:", "127.0.0.1:")
                        .replace("[::]:", "[::1]:");
                    let _ = TcpStream::connect(a);
                }
            }
        }
    }

    /// After [`Server::shutdown`], waits until no request is being
    /// processed; false if `timeout` passed first.
    pub fn drain(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.inflight.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// I/O counters of every export a client has opened, by name.
    pub fn io_stats(&self) -> Vec<(String, StatsSnapshot)> {
        let mut v: Vec<(String, StatsSnapshot)> = lock(&self.stats)
            .iter()
            .map(|(n, s)| (n.clone(), s.snapshot()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn stats_for(&self, export: &str) -> Arc<ExportStats> {
        lock(&self.stats)
            .entry(export.to_string())
            .or_default()
            .clone()
    }

    fn notify(&self, e: ConnEvent) {
        if let Some(h) = &self.cfg.on_event {
            h(e);
        }
    }

    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut v: Vec<ClientInfo> = lock(&self.clients)
            .values()
            .map(|(c, _)| c.clone())
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Disconnects the clients of export `name` and of its snapshots
    /// (`name@...`), after answering their requests in flight (those still
    /// to run get `ESHUTDOWN`): for a volume or snapshot just deleted, whose
    /// clients would otherwise get an error for every request they send.
    /// Returns how many connections were told to end.
    pub fn disconnect_export(&self, name: &str) -> usize {
        let prefix = format!("{name}@");
        let doomed: Vec<Arc<Hangup>> = lock(&self.clients)
            .values()
            .filter(|(c, _)| c.export == name || c.export.starts_with(&prefix))
            .map(|(_, h)| h.clone())
            .collect();
        for h in &doomed {
            if h.hang_up() {
                tracing::info!(client = %h.who, "export deleted: disconnecting its client");
            }
        }
        doomed.len()
    }

    /// Serves one connection over plain streams (no TLS possible).
    pub fn handle(
        self: &Arc<Self>,
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        peer: &str,
    ) -> Result<(), ConnError> {
        self.run(r, w, None, peer)
    }

    /// Serves one connection; `raw` is the socket itself, for STARTTLS.
    pub fn handle_socket(
        self: &Arc<Self>,
        raw: Box<dyn crate::tls::RawConn>,
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        peer: &str,
    ) -> Result<(), ConnError> {
        self.run(r, w, Some(raw), peer)
    }

    fn run(
        self: &Arc<Self>,
        mut r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        mut raw: Option<Box<dyn crate::tls::RawConn>>,
        peer: &str,
    ) -> Result<(), ConnError> {
        let mut w: SharedWriter = Arc::new(Mutex::new(w));
        let sock = raw.as_deref().and_then(dup_socket);
        let Some(no_zeroes) = self.greet(&mut *r, &w)? else {
            return Ok(());
        };
        let mut tls_active = false;
        loop {
            let link = Link {
                peer,
                sock: sock.as_ref(),
                tls_active,
                tls_possible: raw.is_some(),
            };
            match self.negotiate(&mut *r, &w, no_zeroes, link)? {
                Outcome::Closed => return Ok(()),
                Outcome::StartTls => {
                    let (Some(sock), Some(tls)) = (raw.take(), self.cfg.tls.as_ref()) else {
                        return Err(ConnError::Refused(
                            "STARTTLS without a socket or TLS settings".into(),
                        ));
                    };
                    drop(r);
                    drop(w);
                    let plain = crate::tls::start(sock, tls.config.clone())?;
                    r = Box::new(plain.try_clone()?);
                    w = Arc::new(Mutex::new(Box::new(io::BufWriter::with_capacity(
                        256 << 10,
                        plain,
                    ))));
                    tls_active = true;
                }
                Outcome::Go(mut sess, reg) => {
                    sess.stats = self.stats_for(&reg.info.export);
                    sess.hangup = reg.hangup.clone();
                    return self.transmit(Arc::from(sess), &mut *r, w);
                    // `reg` drops here: the client is forgotten.
                }
            }
        }
    }
}

/// Starts serving `listeners` (or the socket-activation sockets, if any
/// were passed) on their own threads, and a thread that commits every
/// export every `commit_every`. Returns the addresses served.
pub fn start(
    server: &Arc<Server>,
    mut listeners: Vec<Listener>,
    commit_every: std::time::Duration,
) -> io::Result<Vec<String>> {
    let activated = Listener::from_env()?;
    if !activated.is_empty() {
        listeners = activated;
    }
    let mut addrs = Vec::new();
    for l in listeners {
        let a = l.local_addr();
        tracing::info!(addr = %a, "serving NBD");
        addrs.push(a);
        let s = server.clone();
        std::thread::spawn(move || {
            if let Err(e) = s.serve(l) {
                tracing::error!(error = %e, "listener failed");
            }
        });
    }
    lock(&server.listening).extend(addrs.iter().cloned());
    // Background commits bound what a crash can lose for clients that never flush.
    // A commit the device refused (full, failing) is retried here, so the
    // pool recovers by itself when the device does: failures are logged
    // once, and again only when they stop.
    let me = server.clone();
    std::thread::spawn(move || {
        let mut failing = false;
        loop {
            std::thread::sleep(commit_every);
            if me.is_shutdown() {
                break;
            }
            match me.catalog.flush_all() {
                Err(e) if !failing => {
                    tracing::error!(error = %e, "periodic commit failed; retrying every interval");
                    failing = true;
                }
                Err(e) => tracing::debug!(error = %e, "periodic commit failed again"),
                Ok(()) if failing => {
                    tracing::warn!("periodic commits succeed again");
                    failing = false;
                }
                Ok(()) => {}
            }
        }
    });
    Ok(addrs)
}

/// [`start`], then waits for SIGTERM/SIGINT/SIGHUP; stops accepting, lets
/// requests in flight finish (up to 10 s) and makes everything durable.
/// Call [`cdm_common::signals::block_termination`] first, before any thread starts.
pub fn serve_until_signal(
    server: &Arc<Server>,
    listeners: Vec<Listener>,
    commit_every: std::time::Duration,
) -> Result<(), ServeError> {
    start(server, listeners, commit_every)?;
    wait_for_signal_then_commit(server)
}

/// The second half of [`serve_until_signal`], for a caller that has
/// something to do between [`start`] and the wait (announce the bound
/// addresses).
pub fn wait_for_signal_then_commit(server: &Arc<Server>) -> Result<(), ServeError> {
    let sig = cdm_common::signals::wait_for_termination();
    tracing::info!(sig, "terminating: committing the pool");
    server.shutdown();
    if !server.drain(std::time::Duration::from_secs(10)) {
        tracing::warn!("requests still in flight after 10 s; committing anyway");
    }
    Ok(server.catalog.flush_all()?)
}

//! An NBD server over a cdmfs pool. One thread reads each connection's
//! requests and hands them to a few worker threads, which reply in any order
//! under a write lock (the nbdkit model). All connections share one pool, so
//! a FLUSH on one is visible on all (CAN_MULTI_CONN).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::SystemTime;

use cdmfs::{Pool, Target};

use crate::proto::*;
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

pub struct Server {
    pool: Arc<Pool>,
    cfg: ServerConfig,
    shutdown: AtomicBool,
    next_id: AtomicU64,
    clients: Mutex<HashMap<u64, ClientInfo>>,
    /// I/O counters per export name.
    stats: Mutex<HashMap<String, Arc<ExportStats>>>,
    /// Requests being processed, across connections (for [`Server::drain`]).
    inflight: AtomicU64,
    /// Addresses [`start`] listens on, to wake blocked accepts at shutdown.
    listening: Mutex<Vec<String>>,
}

struct Session {
    target: Target,
    size: u64,
    read_only: bool,
    structured: bool,
    extended: bool,
    base_alloc: bool,
    stats: Arc<ExportStats>,
}

enum Outcome {
    Closed,
    StartTls,
    Go(Session, String),
}

struct Negotiated {
    structured: bool,
    extended: bool,
    no_zeroes: bool,
    /// Export the meta context selection applies to, if base:allocation was selected.
    meta: Option<String>,
}

type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `parts` as one reply under the connection's write lock, then flushes.
fn send(w: &SharedWriter, parts: &[&[u8]]) -> io::Result<()> {
    let mut g = lock(w);
    for p in parts {
        g.write_all(p)?;
    }
    g.flush()
}

fn read_exact_or_eof(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<bool> {
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

fn nbd_errno(e: &cdmfs::Error) -> u32 {
    match e.errno() {
        libc::EPERM => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        _ => EIO,
    }
}

impl Server {
    pub fn new(pool: Arc<Pool>, cfg: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            pool,
            cfg,
            shutdown: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            clients: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            inflight: AtomicU64::new(0),
            listening: Mutex::new(Vec::new()),
        })
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
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
        let mut v: Vec<ClientInfo> = lock(&self.clients).values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    fn export_names(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Ok(vols) = self.pool.list_volumes() {
            for v in vols {
                out.push((v.name.clone(), format!("volume, {} bytes", v.size)));
            }
        }
        if let Ok(snaps) = self.pool.list_snapshots(None) {
            for s in snaps {
                out.push((
                    format!("{}@{}", s.volume, s.id),
                    format!("snapshot {:?} (read-only)", s.label),
                ));
            }
        }
        out
    }

    fn lookup(&self, name: &str) -> Result<(Target, u64, u32, bool), String> {
        let name = if name.is_empty() {
            self.cfg
                .default_export
                .as_deref()
                .ok_or("no default export; give an export name")?
        } else {
            name
        };
        let t = self.pool.resolve(name).map_err(|e| e.to_string())?;
        let (size, bs) = self.pool.geometry(t).map_err(|e| e.to_string())?;
        let ro = self.cfg.read_only || matches!(t, Target::Snapshot(_));
        Ok((t, size, bs, ro))
    }

    fn tflags(ro: bool, structured: bool) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
        if ro {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        if structured {
            f |= TF_SEND_DF;
        }
        f
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
        let Some(no_zeroes) = self.greet(&mut *r, &w)? else {
            return Ok(());
        };
        let mut tls_active = false;
        loop {
            match self.negotiate(&mut *r, &w, no_zeroes, tls_active, raw.is_some())? {
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
                Outcome::Go(mut sess, name) => {
                    sess.stats = self.stats_for(&name);
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let since = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let info = ClientInfo {
                        id,
                        peer: peer.to_string(),
                        export: name,
                        since_unix: since,
                    };
                    lock(&self.clients).insert(id, info.clone());
                    self.notify(ConnEvent::Connected(info.clone()));
                    let res = self.transmit(Arc::new(sess), &mut *r, w);
                    lock(&self.clients).remove(&id);
                    self.notify(ConnEvent::Disconnected(info));
                    return res;
                }
            }
        }
    }

    /// Sends the greeting and reads the client flags; Some(no_zeroes).
    fn greet(&self, r: &mut dyn Read, w: &SharedWriter) -> Result<Option<bool>, ConnError> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        send(w, &[&hello])?;
        let mut cf = [0u8; 4];
        if !read_exact_or_eof(r, &mut cf)? {
            return Ok(None);
        }
        let cflags = u32::from_be_bytes(cf);
        if cflags & !(C_FIXED_NEWSTYLE | C_NO_ZEROES) != 0 {
            return Err(ConnError::Refused(format!(
                "unknown client flags {cflags:#x}"
            )));
        }
        Ok(Some(cflags & C_NO_ZEROES != 0))
    }

    /// The option haggling phase, from the first option (or the first after
    /// STARTTLS, which discards what was negotiated before).
    fn negotiate(
        &self,
        r: &mut dyn Read,
        w: &SharedWriter,
        no_zeroes: bool,
        tls_active: bool,
        tls_possible: bool,
    ) -> Result<Outcome, ConnError> {
        let send = |b: &[u8]| send(w, &[b]);
        let tls_required = self.cfg.tls.as_ref().is_some_and(|t| t.required) && !tls_active;
        let mut n = Negotiated {
            structured: false,
            extended: false,
            no_zeroes,
            meta: None,
        };
        loop {
            let mut h = [0u8; 16];
            if !read_exact_or_eof(r, &mut h)? {
                return Ok(Outcome::Closed);
            }
            let oh = parse_opt_header(&h)?;
            if oh.length > MAX_OPTION {
                // Too large to be a real option: refuse without reading it.
                send(&encode_opt_reply(
                    oh.option,
                    REP_ERR_TOO_BIG,
                    b"option too large",
                ))?;
                return Err(ConnError::Refused(format!(
                    "option {} of {} bytes",
                    oh.option, oh.length
                )));
            }
            let mut data = vec![0u8; oh.length as usize];
            r.read_exact(&mut data)?;
            let reply = |typ: u32, d: &[u8]| send(&encode_opt_reply(oh.option, typ, d));
            let err = |typ: u32, msg: &str| send(&encode_opt_reply(oh.option, typ, msg.as_bytes()));
            if self.is_shutdown() && oh.option != OPT_ABORT {
                err(REP_ERR_SHUTDOWN, "server is shutting down")?;
                continue;
            }
            if tls_required && !matches!(oh.option, OPT_STARTTLS | OPT_ABORT) {
                if oh.option == OPT_EXPORT_NAME {
                    return Err(ConnError::Refused(
                        "EXPORT_NAME before STARTTLS on a TLS-only server".into(),
                    ));
                }
                err(REP_ERR_TLS_REQD, "this server requires TLS: use STARTTLS")?;
                continue;
            }
            match oh.option {
                OPT_EXPORT_NAME => {
                    if n.extended {
                        return Err(ConnError::Refused(
                            "EXPORT_NAME after extended headers".into(),
                        ));
                    }
                    let name = String::from_utf8(data)
                        .map_err(|_| ConnError::Refused("export name is not UTF-8".into()))?;
                    let (t, size, _bs, ro) = self.lookup(&name).map_err(ConnError::Refused)?;
                    let mut b = size.to_be_bytes().to_vec();
                    b.extend_from_slice(&Self::tflags(ro, n.structured).to_be_bytes());
                    if !n.no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    send(&b)?;
                    let base_alloc = n.meta.as_deref() == Some(name.as_str());
                    return Ok(Outcome::Go(
                        Session {
                            target: t,
                            size,
                            read_only: ro,
                            structured: n.structured,
                            extended: false,
                            base_alloc,
                            stats: Arc::default(),
                        },
                        name,
                    ));
                }
                OPT_ABORT => {
                    let _ = reply(REP_ACK, &[]);
                    return Ok(Outcome::Closed);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        err(REP_ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    for (name, _desc) in self.export_names() {
                        let mut b = (name.len() as u32).to_be_bytes().to_vec();
                        b.extend_from_slice(name.as_bytes());
                        reply(REP_SERVER, &b)?;
                    }
                    reply(REP_ACK, &[])?;
                }
                OPT_STARTTLS => {
                    if self.cfg.tls.is_none() || !tls_possible {
                        err(REP_ERR_POLICY, "TLS is not configured on this server")?;
                    } else if tls_active {
                        err(REP_ERR_INVALID, "TLS is already active")?;
                    } else if !data.is_empty() {
                        err(REP_ERR_INVALID, "STARTTLS takes no data")?;
                    } else {
                        reply(REP_ACK, &[])?;
                        return Ok(Outcome::StartTls);
                    }
                }
                OPT_INFO | OPT_GO => {
                    let (name, infos) = match parse_info_request(&data) {
                        Ok(x) => x,
                        Err(e) => {
                            err(REP_ERR_INVALID, &e.to_string())?;
                            continue;
                        }
                    };
                    let (t, size, bs, ro) = match self.lookup(&name) {
                        Ok(x) => x,
                        Err(msg) => {
                            err(REP_ERR_UNKNOWN, &msg)?;
                            continue;
                        }
                    };
                    reply(
                        REP_INFO,
                        &info_export(size, Self::tflags(ro, n.structured || n.extended)),
                    )?;
                    if infos.contains(&INFO_NAME) {
                        reply(REP_INFO, &info_string(INFO_NAME, &name))?;
                    }
                    if infos.contains(&INFO_DESCRIPTION) {
                        let d = match t {
                            Target::Volume(_) => "cdm volume".to_string(),
                            Target::Snapshot(id) => format!("cdm snapshot {id} (read-only)"),
                        };
                        reply(REP_INFO, &info_string(INFO_DESCRIPTION, &d))?;
                    }
                    // Always sent: our limits differ from the defaults.
                    reply(
                        REP_INFO,
                        &info_block_size(1, bs.clamp(512, 64 << 10), MAX_PAYLOAD),
                    )?;
                    reply(REP_ACK, &[])?;
                    if oh.option == OPT_GO {
                        let base_alloc = n.meta.as_deref() == Some(name.as_str());
                        let sess = Session {
                            target: t,
                            size,
                            read_only: ro,
                            structured: n.structured || n.extended,
                            extended: n.extended,
                            base_alloc,
                            stats: Arc::default(),
                        };
                        return Ok(Outcome::Go(sess, name));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        err(REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")?;
                    } else if n.extended {
                        err(
                            REP_ERR_EXT_HEADER_REQD,
                            "extended headers are already in use",
                        )?;
                    } else {
                        n.structured = true;
                        reply(REP_ACK, &[])?;
                    }
                }
                OPT_EXTENDED_HEADERS => {
                    if !data.is_empty() {
                        err(REP_ERR_INVALID, "EXTENDED_HEADERS takes no data")?;
                    } else {
                        n.extended = true;
                        reply(REP_ACK, &[])?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if !n.structured && !n.extended {
                        err(REP_ERR_INVALID, "negotiate structured replies first")?;
                        continue;
                    }
                    let (name, queries) = match parse_meta_request(&data) {
                        Ok(x) => x,
                        Err(e) => {
                            err(REP_ERR_INVALID, &e.to_string())?;
                            continue;
                        }
                    };
                    if let Err(msg) = self.lookup(&name) {
                        err(REP_ERR_UNKNOWN, &msg)?;
                        continue;
                    }
                    let set = oh.option == OPT_SET_META_CONTEXT;
                    let matches = if set {
                        queries.iter().any(|q| q == BASE_ALLOCATION)
                    } else {
                        queries.is_empty()
                            || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
                    };
                    if set {
                        n.meta = if matches { Some(name) } else { None };
                    }
                    if matches {
                        let mut b = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        reply(REP_META_CONTEXT, &b)?;
                    }
                    reply(REP_ACK, &[])?;
                }
                other => err(REP_ERR_UNSUP, &format!("option {other} is not supported"))?,
            }
        }
    }

    fn transmit(
        self: &Arc<Self>,
        sess: Arc<Session>,
        r: &mut dyn Read,
        w: SharedWriter,
    ) -> Result<(), ConnError> {
        let hlen = request_len(sess.extended);
        let budget = Arc::new((Mutex::new(0u64), Condvar::new()));
        let max_inflight = self.cfg.max_inflight_bytes.max(MAX_PAYLOAD as u64 * 2);
        let (tx, rx) = mpsc::sync_channel::<(Request, Vec<u8>, u64)>(128);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for _ in 0..self.cfg.workers {
            let (me, sess, w, rx, budget) = (
                self.clone(),
                sess.clone(),
                w.clone(),
                rx.clone(),
                budget.clone(),
            );
            workers.push(std::thread::spawn(move || loop {
                let job = lock(&rx).recv();
                let Ok((req, payload, cost)) = job else { break };
                let res = me.process(&sess, &req, &payload, &w);
                let (m, cv) = &*budget;
                *lock(m) -= cost;
                cv.notify_all();
                if res.is_err() {
                    // The client went away; the reader notices too.
                    break;
                }
            }));
        }
        let mut result = Ok(());
        let mut hdr = [0u8; 32];
        loop {
            match read_exact_or_eof(r, &mut hdr[..hlen]) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
            let req = match parse_request(&hdr[..hlen], sess.extended) {
                Ok(q) => q,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            if req.payload > MAX_PAYLOAD as u64 {
                result = Err(ConnError::Refused(format!(
                    "payload of {} bytes exceeds the advertised maximum",
                    req.payload
                )));
                break;
            }
            let mut payload = vec![0u8; req.payload as usize];
            if let Err(e) = r.read_exact(&mut payload) {
                // A client that vanished mid-write: the partial request is dropped.
                result = Err(e.into());
                break;
            }
            if req.typ == CMD_DISC {
                break;
            }
            let cost = req.payload
                + if req.typ == CMD_READ {
                    req.length.min(MAX_PAYLOAD as u64)
                } else {
                    0
                }
                + 4096;
            if self.cfg.workers == 0 {
                if self.process(&sess, &req, &payload, &w).is_err() {
                    break;
                }
                continue;
            }
            {
                let (m, cv) = &*budget;
                let mut used = lock(m);
                while *used > 0 && *used + cost > max_inflight {
                    used = cv.wait(used).unwrap_or_else(|e| e.into_inner());
                }
                *used += cost;
            }
            if tx.send((req, payload, cost)).is_err() {
                break;
            }
        }
        drop(tx);
        for t in workers {
            let _ = t.join();
        }
        result
    }

    /// Processes one request: counted in flight, timed into the export's stats.
    fn process(
        &self,
        s: &Session,
        q: &Request,
        payload: &[u8],
        w: &SharedWriter,
    ) -> io::Result<()> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let t0 = std::time::Instant::now();
        let r = self.process_inner(s, q, payload, w);
        s.stats.record(q.typ, q.length, t0.elapsed());
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn process_inner(
        &self,
        s: &Session,
        q: &Request,
        payload: &[u8],
        w: &SharedWriter,
    ) -> io::Result<()> {
        let mut allowed = CMD_FLAG_FUA;
        if s.extended {
            allowed |= CMD_FLAG_PAYLOAD_LEN;
        }
        allowed |= match q.typ {
            CMD_READ if s.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
        let known = matches!(
            q.typ,
            CMD_READ
                | CMD_WRITE
                | CMD_FLUSH
                | CMD_TRIM
                | CMD_CACHE
                | CMD_WRITE_ZEROES
                | CMD_BLOCK_STATUS
        );
        let fail = |e: u32, msg: &str| self.reply_error(s, q, e, msg, w);
        if !known {
            return fail(EINVAL, "unknown command");
        }
        if q.flags & !allowed != 0 {
            return fail(EINVAL, "flag not valid for this command");
        }
        if q.typ != CMD_WRITE && q.payload != 0 {
            return fail(EINVAL, "unexpected payload");
        }
        if self.is_shutdown() {
            return fail(ESHUTDOWN, "server is shutting down");
        }
        let end = q.offset.checked_add(q.length);
        let in_range = end.is_some_and(|e| e <= s.size);
        let writes = matches!(q.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && s.read_only {
            return fail(EPERM, "export is read-only");
        }
        if !in_range && q.typ != CMD_FLUSH {
            let e = if matches!(q.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return fail(e, "request past the end of the export");
        }
        let vol = match s.target {
            Target::Volume(v) => v,
            Target::Snapshot(_) => 0,
        };
        let fua = |r: cdmfs::Result<()>| {
            r.and_then(|_| {
                if q.flags & CMD_FLAG_FUA != 0 {
                    self.pool.flush()
                } else {
                    Ok(())
                }
            })
        };
        let res = match q.typ {
            CMD_READ => {
                if q.length > MAX_PAYLOAD as u64 {
                    let e = if q.flags & CMD_FLAG_DF != 0 {
                        EOVERFLOW
                    } else {
                        EINVAL
                    };
                    return fail(e, "read larger than the maximum payload");
                }
                let mut buf = vec![0u8; q.length as usize];
                match self.pool.read(s.target, q.offset, &mut buf) {
                    Ok(()) => return self.reply_read(s, q, &buf, w),
                    Err(e) => Err(e),
                }
            }
            CMD_WRITE => fua(self.pool.write(vol, q.offset, payload)),
            CMD_FLUSH => self.pool.flush(),
            CMD_TRIM => fua(self.pool.trim(vol, q.offset, q.length)),
            CMD_WRITE_ZEROES => {
                if q.flags & CMD_FLAG_NO_HOLE != 0 {
                    if q.flags & CMD_FLAG_FAST_ZERO != 0 {
                        return fail(ENOTSUP, "allocated zeroes are not fast");
                    }
                    fua(self.pool.write_zeroes_allocated(vol, q.offset, q.length))
                } else {
                    fua(self.pool.write_zeroes(vol, q.offset, q.length))
                }
            }
            CMD_CACHE => Ok(()),
            CMD_BLOCK_STATUS => {
                if !s.base_alloc {
                    return fail(EINVAL, "no metadata context was negotiated");
                }
                if q.length == 0 {
                    return fail(EINVAL, "zero-length block status");
                }
                // Bound the work per request; clients ask again for the rest.
                let len = q.length.min(8 << 30);
                match self.pool.block_status(s.target, q.offset, len) {
                    Ok(runs) => return self.reply_status(s, q, &runs, w),
                    Err(e) => Err(e),
                }
            }
            _ => return fail(EINVAL, "unknown command"),
        };
        match res {
            Ok(()) => self.reply_ok(s, q, w),
            Err(e) => {
                tracing::warn!(error = %e, cmd = q.typ, offset = q.offset, "request failed");
                fail(nbd_errno(&e), &e.to_string())
            }
        }
    }

    fn reply_ok(&self, s: &Session, q: &Request, w: &SharedWriter) -> io::Result<()> {
        let b = if s.extended {
            chunk_header(
                true,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                q.cookie,
                q.offset,
                0,
            )
        } else {
            simple_reply(0, q.cookie).to_vec()
        };
        send(w, &[&b])
    }

    fn reply_error(
        &self,
        s: &Session,
        q: &Request,
        e: u32,
        msg: &str,
        w: &SharedWriter,
    ) -> io::Result<()> {
        s.stats.error();
        let b = if s.extended || (s.structured && matches!(q.typ, CMD_READ | CMD_BLOCK_STATUS)) {
            let p = error_payload(e, msg);
            let mut b = chunk_header(
                s.extended,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                q.cookie,
                q.offset,
                p.len() as u64,
            );
            b.extend_from_slice(&p);
            b
        } else {
            simple_reply(e, q.cookie).to_vec()
        };
        send(w, &[&b])
    }

    fn reply_read(
        &self,
        s: &Session,
        q: &Request,
        data: &[u8],
        w: &SharedWriter,
    ) -> io::Result<()> {
        let head = if s.structured {
            if data.is_empty() {
                chunk_header(
                    s.extended,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    q.cookie,
                    q.offset,
                    0,
                )
            } else {
                let mut h = chunk_header(
                    s.extended,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    q.cookie,
                    q.offset,
                    8 + data.len() as u64,
                );
                h.extend_from_slice(&q.offset.to_be_bytes());
                h
            }
        } else {
            simple_reply(0, q.cookie).to_vec()
        };
        let body: &[u8] = if s.structured && data.is_empty() {
            &[]
        } else {
            data
        };
        send(w, &[&head, body])
    }

    fn reply_status(
        &self,
        s: &Session,
        q: &Request,
        runs: &[cdmfs::Run],
        w: &SharedWriter,
    ) -> io::Result<()> {
        let limit = if q.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            1 << 17
        };
        let runs = &runs[..runs.len().min(limit)];
        let flags = |r: &cdmfs::Run| {
            if r.allocated {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            }
        };
        let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        let typ = if s.extended {
            p.extend_from_slice(&(runs.len() as u32).to_be_bytes());
            for r in runs {
                p.extend_from_slice(&r.len.to_be_bytes());
                p.extend_from_slice(&(flags(r) as u64).to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            for r in runs {
                p.extend_from_slice(&(r.len.min(u32::MAX as u64) as u32).to_be_bytes());
                p.extend_from_slice(&flags(r).to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS
        };
        let mut b = chunk_header(
            s.extended,
            REPLY_FLAG_DONE,
            typ,
            q.cookie,
            q.offset,
            p.len() as u64,
        );
        b.extend_from_slice(&p);
        send(w, &[&b])
    }
}

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
    /// (then [`serve_until_signal`] uses those and this returns none).
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

/// Starts serving `listeners` (or the socket-activation sockets, if any
/// were passed) on their own threads, and a thread that commits the pool
/// every `commit_every`. Returns the addresses served.
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
    let p = server.pool().clone();
    let me = server.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(commit_every);
        if me.is_shutdown() {
            break;
        }
        if let Err(e) = p.flush() {
            tracing::error!(error = %e, "periodic commit failed");
            break;
        }
    });
    Ok(addrs)
}

/// [`start`], then waits for SIGTERM/SIGINT/SIGHUP; stops accepting, lets
/// requests in flight finish (up to 10 s) and makes everything durable.
/// Call [`crate::signals::block_termination`] first, before any thread starts.
pub fn serve_until_signal(
    server: &Arc<Server>,
    listeners: Vec<Listener>,
    commit_every: std::time::Duration,
) -> cdmfs::Result<()> {
    start(server, listeners, commit_every)?;
    let sig = crate::signals::wait_for_termination();
    tracing::info!(sig, "terminating: committing the pool");
    server.shutdown();
    if !server.drain(std::time::Duration::from_secs(10)) {
        tracing::warn!("requests still in flight after 10 s; committing anyway");
    }
    server.pool().flush()
}

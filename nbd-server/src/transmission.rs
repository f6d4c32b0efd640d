//! The transmission phase (as nbdkit's `protocol.c`): a reader thread parses
//! requests and hands them to worker threads, which check each against the
//! session, call the [`Export`] and reply under the connection's write lock.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Condvar, Mutex};

use nbd_proto::codec::*;

use crate::export::{Export, ExportError, Extent, ZeroFlags};
use crate::ratelimit::LogLimiter;
use crate::server::{lock, read_exact_or_eof, send, ConnError, Hangup, Server, SharedWriter};
use crate::stats::ExportStats;

/// What one connection in transmission works on, as negotiated.
pub(crate) struct Session {
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    structured: bool,
    extended: bool,
    base_alloc: bool,
    /// Largest READ and WRITE accepted (the advertised maximum block size).
    max_payload: u64,
    pub(crate) stats: Arc<ExportStats>,
    /// Ends this connection when its export is deleted.
    pub(crate) hangup: Arc<Hangup>,
    /// Bounds the "request failed" lines of this connection.
    errlog: LogLimiter,
}

impl Session {
    pub(crate) fn new(
        export: Arc<dyn Export>,
        read_only: bool,
        structured: bool,
        extended: bool,
        base_alloc: bool,
    ) -> Session {
        let max_payload = export.block_size().maximum.min(MAX_PAYLOAD) as u64;
        Session {
            size: export.size(),
            export,
            read_only,
            structured,
            extended,
            base_alloc,
            max_payload,
            stats: Arc::default(),
            hangup: Arc::new(Hangup::new(None, String::new())),
            errlog: LogLimiter::default(),
        }
    }
}

/// The request reader's buffer: room for 32 requests of 4 KiB and more.
const READ_BUFFER: usize = 256 << 10;

/// A request the server answers with an error before reaching the export.
type Refusal = (u32, &'static str);

type Job = (Request, Vec<u8>, u64);

/// Bytes of requests in flight on a connection, and a wait for them to drop.
type Budget = Arc<(Mutex<u64>, Condvar)>;

impl Server {
    pub(crate) fn transmit(
        self: &Arc<Self>,
        sess: Arc<Session>,
        r: &mut dyn Read,
        w: SharedWriter,
    ) -> Result<(), ConnError> {
        let budget: Budget = Arc::new((Mutex::new(0u64), Condvar::new()));
        let max_inflight = self.cfg.max_inflight_bytes.max(MAX_PAYLOAD as u64 * 2);
        let (tx, rx) = mpsc::sync_channel::<Job>(128);
        let rx = Arc::new(Mutex::new(rx));
        let workers: Vec<_> = (0..self.cfg.workers)
            .map(|_| self.spawn_worker(sess.clone(), w.clone(), rx.clone(), budget.clone()))
            .collect();
        // Buffered: a pipelining client's requests (header and payload)
        // arrive back to back, and one read takes in many of them instead of
        // two system calls per request.
        let mut r = io::BufReader::with_capacity(READ_BUFFER, r);
        let mut result = Ok(());
        loop {
            let (req, payload) = match read_request(&sess, &mut r) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
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
                if self.process(&sess, &req, &payload, &w).is_err() || sess.hangup.is_closing() {
                    break;
                }
                continue;
            }
            {
                let (m, cv) = &*budget;
                let mut used = lock(m);
                while *used > 0 && *used + cost > max_inflight {
                    used = cdm_common::lock::wait(cv, used);
                }
                *used += cost;
            }
            if tx.send((req, payload, cost)).is_err() {
                break;
            }
            // Hung up (export deleted): the request just read gets its
            // ESHUTDOWN; reading on would only refuse more.
            if sess.hangup.is_closing() {
                break;
            }
        }
        drop(tx);
        for t in workers {
            let _ = t.join();
        }
        let dropped = sess.errlog.take_suppressed();
        if dropped > 0 {
            tracing::warn!(client = %sess.hangup.who, suppressed = dropped, "request failures not logged");
        }
        result
    }

    fn spawn_worker(
        self: &Arc<Self>,
        sess: Arc<Session>,
        w: SharedWriter,
        rx: Arc<Mutex<mpsc::Receiver<Job>>>,
        budget: Budget,
    ) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || loop {
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
        })
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
        if let Err((e, msg)) = self.check(s, q) {
            return reply_error(s, q, e, msg, w);
        }
        let x = &*s.export;
        let fua = q.flags & CMD_FLAG_FUA != 0;
        let res = match q.typ {
            CMD_READ => {
                let mut buf = vec![0u8; q.length as usize];
                match x.read(q.offset, &mut buf) {
                    Ok(()) => return reply_read(s, q, &buf, w),
                    Err(e) => Err(e),
                }
            }
            CMD_WRITE => x.write(q.offset, payload, fua),
            CMD_FLUSH => x.flush(),
            CMD_TRIM => x.trim(q.offset, q.length, fua),
            CMD_WRITE_ZEROES => {
                let flags = ZeroFlags {
                    may_trim: q.flags & CMD_FLAG_NO_HOLE == 0,
                    fast: q.flags & CMD_FLAG_FAST_ZERO != 0,
                    fua,
                };
                x.write_zeroes(q.offset, q.length, flags)
            }
            CMD_CACHE => x.cache(q.offset, q.length),
            CMD_BLOCK_STATUS => {
                // Bound the work per request; clients ask again for the rest.
                let len = q.length.min(8 << 30);
                match x.block_status(q.offset, len) {
                    Ok(runs) => return reply_status(s, q, &runs, w),
                    Err(e) => Err(e),
                }
            }
            _ => return reply_error(s, q, EINVAL, "unknown command", w),
        };
        match res {
            Ok(()) => reply_ok(s, q, w),
            Err(e) => {
                failed(s, q, &e);
                reply_error(s, q, e.errno(), &e.to_string(), w)
            }
        }
    }

    /// What the server refuses on its own: unknown commands and flags,
    /// shutdown, writes to a read-only export, ranges past the end, limits.
    fn check(&self, s: &Session, q: &Request) -> Result<(), Refusal> {
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
        if !known {
            return Err((EINVAL, "unknown command"));
        }
        if q.flags & !allowed != 0 {
            return Err((EINVAL, "flag not valid for this command"));
        }
        if q.typ != CMD_WRITE && q.payload != 0 {
            return Err((EINVAL, "unexpected payload"));
        }
        if self.is_shutdown() {
            return Err((ESHUTDOWN, "server is shutting down"));
        }
        if s.hangup.is_closing() {
            return Err((ESHUTDOWN, "the export was deleted; disconnecting"));
        }
        let end = q.offset.checked_add(q.length);
        let in_range = end.is_some_and(|e| e <= s.size);
        let writes = matches!(q.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && s.read_only {
            return Err((EPERM, "export is read-only"));
        }
        if !in_range && q.typ != CMD_FLUSH {
            let e = if matches!(q.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return Err((e, "request past the end of the export"));
        }
        match q.typ {
            CMD_READ if q.length > s.max_payload => {
                let e = if q.flags & CMD_FLAG_DF != 0 {
                    EOVERFLOW
                } else {
                    EINVAL
                };
                Err((e, "read larger than the maximum payload"))
            }
            CMD_BLOCK_STATUS if !s.base_alloc => {
                Err((EINVAL, "no metadata context was negotiated"))
            }
            CMD_BLOCK_STATUS if q.length == 0 => Err((EINVAL, "zero-length block status")),
            _ => Ok(()),
        }
    }
}

/// Logs a failed request (a few lines a second per connection at most:
/// a client of a failing disk fails every request) and hangs up on the
/// client of a deleted export, logging that once.
fn failed(s: &Session, q: &Request, e: &ExportError) {
    match e {
        ExportError::Gone(_) => {
            if s.hangup.hang_up() {
                tracing::info!(client = %s.hangup.who, error = %e, "export deleted: disconnecting its client");
            }
        }
        ExportError::Failed { .. } => {
            if let Some(suppressed) = s.errlog.admit(std::time::Instant::now()) {
                tracing::warn!(error = %e, cmd = q.typ, offset = q.offset, suppressed, "request failed");
            }
        }
        ExportError::Unsupported(_) => {}
    }
}

/// Reads the next request and its payload; None at a clean end of stream.
fn read_request(s: &Session, r: &mut dyn Read) -> Result<Option<(Request, Vec<u8>)>, ConnError> {
    let hlen = request_len(s.extended);
    let mut hdr = [0u8; 32];
    if !read_exact_or_eof(r, &mut hdr[..hlen])? {
        return Ok(None);
    }
    let req = parse_request(&hdr[..hlen], s.extended)?;
    if req.payload > s.max_payload {
        return Err(ConnError::Refused(format!(
            "payload of {} bytes exceeds the advertised maximum",
            req.payload
        )));
    }
    let mut payload = vec![0u8; req.payload as usize];
    // A client that vanished mid-write: the partial request is dropped.
    r.read_exact(&mut payload)?;
    Ok(Some((req, payload)))
}

fn reply_ok(s: &Session, q: &Request, w: &SharedWriter) -> io::Result<()> {
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

fn reply_error(s: &Session, q: &Request, e: u32, msg: &str, w: &SharedWriter) -> io::Result<()> {
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

fn reply_read(s: &Session, q: &Request, data: &[u8], w: &SharedWriter) -> io::Result<()> {
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

fn reply_status(s: &Session, q: &Request, runs: &[Extent], w: &SharedWriter) -> io::Result<()> {
    let limit = if q.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        1 << 17
    };
    let runs = &runs[..runs.len().min(limit)];
    let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    let typ = if s.extended {
        p.extend_from_slice(&(runs.len() as u32).to_be_bytes());
        for r in runs {
            p.extend_from_slice(&r.len.to_be_bytes());
            p.extend_from_slice(&(r.state as u64).to_be_bytes());
        }
        REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        for r in runs {
            p.extend_from_slice(&(r.len.min(u32::MAX as u64) as u32).to_be_bytes());
            p.extend_from_slice(&r.state.to_be_bytes());
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

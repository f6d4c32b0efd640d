//! A pipelined NBD client: many requests in flight on each connection, and
//! several connections when the server advertises CAN_MULTI_CONN. Any
//! number of threads call it at once (`&self`); each call blocks its
//! thread until its reply, so N callers keep N requests in flight. Reads
//! and writes can also be started without blocking
//! ([`Pipelined::start_read`], [`Pipelined::start_write`]): the answer
//! goes to a callback on the connection's reader thread, which is how the
//! agent's FUSE file hands requests on without a thread switch.
//!
//! Each connection has one reader thread that takes replies in whatever
//! order the server sends them and hands each to the request with its
//! cookie. Requests are written whole under the connection's writer lock.
//!
//! Flush: NBD's FLUSH covers the writes *completed* before it was sent (on
//! every connection, with CAN_MULTI_CONN). A flush here first waits until
//! every write issued before it (on any connection) has its reply, so it
//! covers all of them, then sends FLUSH on one connection.
//!
//! Faults: when a connection breaks (EOF, reset, a reply that makes no
//! sense, no reply within the timeout) every request in flight on it fails
//! with [`ClientError::Disconnected`] at once, and so does every later one
//! on it; nothing hangs and nothing reconnects (writes the server had not
//! made durable may be gone: the caller decides). Errors the server
//! reports for one request (`Errno`) leave the connection usable.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{negotiate, ClientError, ClientOptions, Negotiated, Result, Stream};
use crate::codec::*;

/// Payloads up to this size are copied behind their header and sent with
/// one write (a copy of 64 KiB costs less than a system call).
const INLINE_PAYLOAD: usize = 64 << 10;

/// The reader's buffer: several replies (or a reply and its data) per
/// system call.
const READ_BUFFER: usize = 256 << 10;

/// A poison-tolerant lock: a panicking caller must not wedge the others.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the reader hands back for one request: the read's data (empty for
/// other commands), or the error.
type Answer = Result<Vec<u8>>;

/// Who gets a request's answer: a caller blocked on a channel, or a
/// callback run on the connection's reader thread.
enum Done {
    Wait(SyncSender<Answer>),
    Call(Box<dyn FnOnce(Answer) + Send>),
}

impl Done {
    fn finish(self, a: Answer) {
        match self {
            Done::Wait(tx) => {
                let _ = tx.send(a);
            }
            Done::Call(f) => f(a),
        }
    }
}

/// A request waiting for its reply.
struct Pending {
    /// For reads: the request's offset and length (chunks are placed by
    /// offset; a simple reply carries exactly `len` bytes).
    offset: u64,
    len: usize,
    is_read: bool,
    data: Vec<u8>,
    /// The first error chunk; the request ends at the DONE chunk.
    error: Option<ClientError>,
    sent: Instant,
    done: Done,
}

#[derive(Default)]
struct State {
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    /// Why the connection is gone, once it is.
    dead: Option<String>,
}

/// One connection: a writer, a reader thread, the requests in flight.
struct Conn {
    w: Mutex<Stream>,
    /// To wake the reader at close.
    sock: Stream,
    state: Arc<Mutex<State>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    extended: bool,
}

/// The writes in flight, by issue order (for flush).
#[derive(Default)]
struct Writes {
    next: u64,
    inflight: BTreeSet<u64>,
}

#[derive(Default)]
struct WriteTracker {
    m: Mutex<Writes>,
    done: Condvar,
}

impl WriteTracker {
    fn start(&self) -> u64 {
        let mut w = lock(&self.m);
        let s = w.next;
        w.next += 1;
        w.inflight.insert(s);
        s
    }

    fn end(&self, seq: u64) {
        lock(&self.m).inflight.remove(&seq);
        self.done.notify_all();
    }

    /// Waits until every write started before this call has ended.
    fn drain(&self) {
        let mut w = lock(&self.m);
        let upto = w.next;
        while w.inflight.first().is_some_and(|&s| s < upto) {
            w = self.done.wait(w).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A pipelined client over one or more connections to one export.
pub struct Pipelined {
    conns: Vec<Conn>,
    next: AtomicUsize,
    writes: Arc<WriteTracker>,
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum payload) block sizes.
    pub block_sizes: (u32, u32, u32),
}

impl Pipelined {
    /// Connects to `export` at an address or URI with up to `connections`
    /// connections: one unless the server advertises CAN_MULTI_CONN (only
    /// then do flushes on one cover writes on the others). `opts.timeout`
    /// bounds how long a request may wait for its reply (and a send).
    pub fn connect(
        addr: &str,
        export: Option<&str>,
        opts: &ClientOptions,
        connections: usize,
    ) -> Result<Pipelined> {
        let opts = ClientOptions {
            allocation: false,
            contexts: Vec::new(),
            ..opts.clone()
        };
        let (r, w, first) = negotiate(addr, export, &opts)?;
        let n = if first.flags & TF_CAN_MULTI_CONN != 0 {
            connections.max(1)
        } else {
            1
        };
        // Built up in place: on an error, dropping it closes the
        // connections already open (and ends their reader threads).
        let mut p = Pipelined {
            conns: vec![Conn::start(r, w, &first, opts.timeout)?],
            next: AtomicUsize::new(0),
            writes: Arc::new(WriteTracker::default()),
            size: first.size,
            flags: first.flags,
            block_sizes: first.block_sizes,
        };
        for _ in 1..n {
            let (r, w, more) = negotiate(addr, export, &opts)?;
            if (more.size, more.flags) != (first.size, first.flags) {
                return Err(ClientError::Other(
                    "the export changed between connections".into(),
                ));
            }
            p.conns.push(Conn::start(r, w, &more, opts.timeout)?);
        }
        Ok(p)
    }

    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn conn(&self) -> &Conn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let max = self.max_payload();
        // Every piece in flight at once, then collected.
        let mut waits = Vec::new();
        let mut first = None;
        for (i, part) in buf.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            match self.conn().send(CMD_READ, 0, off, part.len(), &[], true) {
                Ok(rx) => waits.push(rx),
                Err(e) => {
                    first = Some(e);
                    break;
                }
            }
        }
        for (part, rx) in buf.chunks_mut(max).zip(waits) {
            match wait(rx) {
                Ok(d) if d.len() == part.len() => part.copy_from_slice(&d),
                Ok(_) => {
                    first.get_or_insert(ClientError::Other("short read reply".into()));
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes `data` at `offset` (with FUA if asked).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let seq = self.writes.start();
        let r = self.write_parts(offset, data, fua);
        self.writes.end(seq);
        r
    }

    fn write_parts(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let max = self.max_payload();
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let mut waits = Vec::new();
        let mut first = None;
        for (i, part) in data.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            match self
                .conn()
                .send(CMD_WRITE, flags, off, part.len(), part, false)
            {
                Ok(rx) => waits.push(rx),
                Err(e) => {
                    first = Some(e);
                    break;
                }
            }
        }
        // Every piece answered before the first error is returned: the
        // caller must not see the write as over while parts are in flight.
        for rx in waits {
            if let Err(e) = wait(rx) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Largest read or write [`Pipelined::start_read`] and
    /// [`Pipelined::start_write`] take (the server's maximum payload).
    pub fn max_payload(&self) -> usize {
        (self.block_sizes.2.max(512) as usize).min(MAX_PAYLOAD as usize)
    }

    /// Sends a read of `len` bytes (at most [`Pipelined::max_payload`]) at
    /// `offset` without waiting: `done` gets the data on the connection's
    /// reader thread (or at once if the connection is gone). `done` must
    /// not block.
    pub fn start_read(
        &self,
        offset: u64,
        len: usize,
        done: impl FnOnce(Result<Vec<u8>>) + Send + 'static,
    ) {
        if len > self.max_payload() {
            return done(Err(ClientError::Other(format!(
                "a read of {len} bytes is over the server's maximum payload"
            ))));
        }
        let done = Done::Call(Box::new(done));
        self.conn()
            .submit(CMD_READ, 0, offset, len, &[], true, done);
    }

    /// Sends a write of `data` (at most [`Pipelined::max_payload`] bytes)
    /// at `offset` without waiting: `done` gets the outcome on the
    /// connection's reader thread. A later [`Pipelined::flush`] waits for
    /// it like for any write. `done` must not block.
    pub fn start_write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        if data.len() > self.max_payload() {
            return done(Err(ClientError::Other(format!(
                "a write of {} bytes is over the server's maximum payload",
                data.len()
            ))));
        }
        let seq = self.writes.start();
        let writes = self.writes.clone();
        let done = Done::Call(Box::new(move |a: Answer| {
            // Ended before `done` runs: a flush the callback starts
            // covers this write.
            writes.end(seq);
            done(a.map(|_| ()))
        }));
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.conn()
            .submit(CMD_WRITE, flags, offset, data.len(), data, false, done);
    }

    /// Makes every write issued before this call durable: waits for those
    /// still in flight, then sends FLUSH.
    pub fn flush(&self) -> Result<()> {
        self.writes.drain();
        wait(self.conn().send(CMD_FLUSH, 0, 0, 0, &[], false)?).map(|_| ())
    }

    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.ranged(CMD_TRIM, 0, offset, len)
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, flags: u16) -> Result<()> {
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len)
    }

    /// A command over a range, split at 32-bit lengths (compact headers).
    fn ranged(&self, typ: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        const STEP: u64 = 1 << 30;
        let mut waits = Vec::new();
        let mut first = None;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(STEP);
            match self
                .conn()
                .send(typ, flags, offset + at, n as usize, &[], false)
            {
                Ok(rx) => waits.push(rx),
                Err(e) => {
                    first = Some(e);
                    break;
                }
            }
            at += n;
        }
        for rx in waits {
            if let Err(e) = wait(rx) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Ends every connection cleanly (NBD_CMD_DISC), after the requests in
    /// flight are answered.
    pub fn disconnect(self) {
        // Drop does it.
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        for c in &self.conns {
            c.close();
        }
    }
}

fn wait(rx: Receiver<Answer>) -> Answer {
    rx.recv().unwrap_or_else(|_| {
        Err(ClientError::Disconnected(
            "the connection's reader ended".into(),
        ))
    })
}

impl Conn {
    fn start(r: Stream, w: Stream, n: &Negotiated, timeout: Option<Duration>) -> Result<Conn> {
        let sock = w.try_clone()?;
        // The reader waits for replies forever when nothing is in flight;
        // it checks the age of what is in flight every `tick`.
        let tick = timeout.map(|t| (t / 4).max(Duration::from_millis(50)));
        r.set_read_timeout(tick)?;
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let reader = Reader {
            r: io::BufReader::with_capacity(READ_BUFFER, r),
            state: st,
            structured: n.structured,
            timeout,
        };
        let h = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader.run())?;
        Ok(Conn {
            w: Mutex::new(w),
            sock,
            state,
            reader: Mutex::new(Some(h)),
            extended: n.extended,
        })
    }

    /// Registers and sends one request; the receiver gets its answer.
    fn send(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: usize,
        payload: &[u8],
        is_read: bool,
    ) -> Result<Receiver<Answer>> {
        let (tx, rx) = sync_channel(1);
        self.submit(typ, flags, offset, len, payload, is_read, Done::Wait(tx));
        Ok(rx)
    }

    /// Registers and sends one request; `done` gets its answer (at once
    /// if the connection is gone).
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: usize,
        payload: &[u8],
        is_read: bool,
        done: Done,
    ) {
        let cookie = {
            let mut st = lock(&self.state);
            if let Some(why) = &st.dead {
                let why = why.clone();
                drop(st);
                return done.finish(Err(ClientError::Disconnected(why)));
            }
            st.next_cookie += 1;
            let cookie = st.next_cookie;
            // Registered before it is sent: the reply may come at once.
            st.pending.insert(
                cookie,
                Pending {
                    offset,
                    len,
                    is_read,
                    data: if is_read { vec![0; len] } else { Vec::new() },
                    error: None,
                    sent: Instant::now(),
                    done,
                },
            );
            cookie
        };
        let q = Request::outgoing(
            self.extended,
            typ,
            flags,
            cookie,
            offset,
            len as u64,
            payload.len() as u64,
        );
        let mut head = encode_request(&q, self.extended);
        // Small payloads go in the same system call as their header.
        let inline = payload.len() <= INLINE_PAYLOAD;
        if inline {
            head.extend_from_slice(payload);
        }
        let sent = {
            let mut w = lock(&self.w);
            w.write_all(&head)
                .and_then(|_| if inline { Ok(()) } else { w.write_all(payload) })
                .and_then(|_| w.flush())
        };
        if let Err(e) = sent {
            // A half-written request leaves the stream unusable.
            fail_all(&self.state, &format!("sending a request: {e}"));
            self.sock.shutdown();
        }
    }

    fn close(&self) {
        let dead = lock(&self.state).dead.is_some();
        if !dead {
            let q = Request::outgoing(self.extended, CMD_DISC, 0, 0, 0, 0, 0);
            let mut w = lock(&self.w);
            let _ = w.write_all(&encode_request(&q, self.extended));
            let _ = w.flush();
        }
        fail_all(&self.state, "the client was closed");
        self.sock.shutdown();
        if let Some(h) = lock(&self.reader).take() {
            let _ = h.join();
        }
    }
}

/// Marks the connection dead (keeping the first reason) and fails every
/// request in flight with it.
fn fail_all(state: &Mutex<State>, why: &str) {
    let (why, gone) = {
        let mut st = lock(state);
        let why = st.dead.get_or_insert_with(|| why.to_string()).clone();
        let gone: Vec<Pending> = st.pending.drain().map(|(_, p)| p).collect();
        (why, gone)
    };
    // Answered outside the lock: a callback may send the next request.
    for p in gone {
        p.done.finish(Err(ClientError::Disconnected(why.clone())));
    }
}

/// The reader thread of one connection.
struct Reader {
    r: io::BufReader<Stream>,
    state: Arc<Mutex<State>>,
    structured: bool,
    timeout: Option<Duration>,
}

impl Reader {
    fn run(mut self) {
        let why = loop {
            if let Err(e) = self.one() {
                break e;
            }
        };
        let text = match &why {
            ClientError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                "the server closed the connection".to_string()
            }
            other => other.to_string(),
        };
        fail_all(&self.state, &text);
    }

    /// Fills `buf`, waiting as long as needed while nothing is overdue.
    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.check_overdue()?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn check_overdue(&self) -> Result<()> {
        let st = lock(&self.state);
        if let Some(why) = &st.dead {
            return Err(ClientError::Disconnected(why.clone()));
        }
        let Some(limit) = self.timeout else {
            return Ok(());
        };
        if st.pending.values().any(|p| p.sent.elapsed() > limit) {
            return Err(ClientError::Disconnected(format!(
                "no reply from the server within {} s",
                limit.as_secs_f64()
            )));
        }
        Ok(())
    }

    /// Reads one reply (or one chunk) and delivers it.
    fn one(&mut self) -> Result<()> {
        let mut h = [0u8; 32];
        self.fill(&mut h[..16])?;
        let need = match be_u32(&h, 0)? {
            SIMPLE_REPLY_MAGIC => 16,
            STRUCTURED_REPLY_MAGIC if self.structured => 20,
            EXT_REPLY_MAGIC if self.structured => 32,
            m => return Err(ProtoError::Magic(m as u64).into()),
        };
        if need > 16 {
            self.fill(&mut h[16..need])?;
        }
        match parse_reply_header(&h[..need])?.0 {
            ReplyHeader::Simple { error, cookie } => self.simple(cookie, error),
            ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                len,
            } => self.chunk(cookie, flags, typ, len),
        }
    }

    /// Takes the pending request `cookie` out (a reply for no request is a
    /// broken stream).
    fn take(&self, cookie: u64) -> Result<Pending> {
        lock(&self.state)
            .pending
            .remove(&cookie)
            .ok_or_else(|| ClientError::Other(format!("reply for unknown request {cookie}")))
    }

    fn simple(&mut self, cookie: u64, error: u32) -> Result<()> {
        let mut p = self.take(cookie)?;
        if error != 0 {
            p.done.finish(Err(ClientError::Errno {
                errno: error,
                msg: String::new(),
            }));
            return Ok(());
        }
        if p.is_read {
            // The data follows, exactly as long as the request.
            let mut d = std::mem::take(&mut p.data);
            if let Err(e) = self.fill(&mut d) {
                return Err(p.fail(e));
            }
            p.data = d;
        }
        p.done.finish(Ok(p.data));
        Ok(())
    }

    fn chunk(&mut self, cookie: u64, flags: u16, typ: u16, len: u64) -> Result<()> {
        if len > MAX_PAYLOAD as u64 + 4096 {
            return Err(ClientError::Other(format!("reply chunk of {len} bytes")));
        }
        // Out of the map while its chunk is read (the reader alone fills it).
        let mut p = self.take(cookie)?;
        if let Err(e) = self.chunk_body(&mut p, typ, len) {
            return Err(p.fail(e));
        }
        if flags & REPLY_FLAG_DONE != 0 {
            let answer = match p.error.take() {
                Some(e) => Err(e),
                None => Ok(std::mem::take(&mut p.data)),
            };
            p.done.finish(answer);
        } else {
            lock(&self.state).pending.insert(cookie, p);
        }
        Ok(())
    }

    fn chunk_body(&mut self, p: &mut Pending, typ: u16, len: u64) -> Result<()> {
        match typ {
            REPLY_TYPE_OFFSET_DATA if p.is_read => {
                let mut o = [0u8; 8];
                self.fill(&mut o)?;
                let n = len.checked_sub(8).ok_or(ProtoError::Short)?;
                let (at, end) = place(p, u64::from_be_bytes(o), n)?;
                let mut d = std::mem::take(&mut p.data);
                let r = self.fill(&mut d[at..end]);
                p.data = d;
                r?;
            }
            REPLY_TYPE_OFFSET_HOLE if p.is_read => {
                let mut d = vec![0u8; len as usize];
                self.fill(&mut d)?;
                let (at, end) = place(p, be_u64(&d, 0)?, be_u32(&d, 8)? as u64)?;
                p.data[at..end].fill(0);
            }
            _ => {
                let mut d = vec![0u8; len as usize];
                self.fill(&mut d)?;
                if typ & 0x8000 != 0 && p.error.is_none() {
                    p.error = Some(crate::client::chunk_error(&d));
                }
            }
        }
        Ok(())
    }
}

impl Pending {
    /// Fails this request (out of the map) with the reader's error; the
    /// error goes on to fail the connection.
    fn fail(self, e: ClientError) -> ClientError {
        self.done.finish(Err(ClientError::Disconnected(format!(
            "reading a reply: {e}"
        ))));
        e
    }
}

/// Where a data or hole chunk at `at` of `n` bytes goes in the request's
/// buffer; an error if it lies outside the request.
fn place(p: &Pending, at: u64, n: u64) -> Result<(usize, usize)> {
    let start = at
        .checked_sub(p.offset)
        .ok_or(ProtoError::Invalid("chunk before request"))?;
    let end = start
        .checked_add(n)
        .filter(|&e| e <= p.len as u64)
        .ok_or(ProtoError::Invalid("chunk past request"))?;
    Ok((start as usize, end as usize))
}

#[cfg(test)]
mod tests;

//! A synchronous NBD client: fixed newstyle, structured replies or extended
//! headers, base:allocation. One request at a time per connection (for
//! many in flight, see [`crate::pipelined`]); the handshake here is shared
//! by both.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use crate::codec::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("server refused option {option}: {msg} ({code:#x})")]
    Refused { option: u32, code: u32, msg: String },
    #[error("server error {errno} ({msg})")]
    Errno { errno: u32, msg: String },
    /// The connection is gone (closed, reset, no answer in time): the
    /// request may or may not have been carried out.
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
    #[error("{0}")]
    Other(String),
    /// STARTTLS or the TLS handshake failed (wrong CA, a server without
    /// TLS).
    #[error("{0}")]
    Tls(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// What to negotiate.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub structured: bool,
    pub extended: bool,
    /// Select base:allocation for block_status.
    pub allocation: bool,
    /// More metadata contexts to select (`qemu:dirty-bitmap:NAME`), read
    /// with [`Client::block_status_of`].
    pub contexts: Vec<String>,
    /// Fail a send or a wait for the server after this long (a server that
    /// vanished without closing the connection); `None` waits forever.
    pub timeout: Option<std::time::Duration>,
    /// STARTTLS on TCP connections, verifying the server against this
    /// pinned CA (unix sockets stay plain: they never leave the machine).
    pub tls: Option<crate::tls::ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            structured: true,
            extended: false,
            allocation: true,
            contexts: Vec::new(),
            timeout: None,
            tls: None,
        }
    }
}

/// Where a server is: `HOST:PORT`, `unix:PATH`, or an NBD URI
/// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub endpoint: String,
    pub export: Option<String>,
}

impl Address {
    pub fn parse(s: &str) -> Result<Address> {
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| ClientError::Other(format!("{s}: missing ?socket=")))?;
            let export = path.trim_start_matches('/');
            let sock = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| ClientError::Other(format!("{s}: missing socket=")))?;
            return Ok(Address {
                endpoint: format!("unix:{sock}"),
                export: Some(export.to_string()),
            });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            let ep = if hostport.contains(':') {
                hostport.to_string()
            } else {
                format!("{hostport}:10809")
            };
            return Ok(Address {
                endpoint: ep,
                export: Some(export.to_string()),
            });
        }
        Ok(Address {
            endpoint: s.to_string(),
            export: None,
        })
    }
}

pub struct Client {
    r: Box<dyn Read + Send>,
    w: Box<dyn Write + Send>,
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum payload) block sizes.
    pub block_sizes: (u32, u32, u32),
    structured: bool,
    extended: bool,
    meta_id: Option<u32>,
    /// Selected contexts other than base:allocation, with their ids.
    metas: Vec<(String, u32)>,
    cookie: u64,
}

/// A connection to a server: a unix or TCP socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Ends both directions: a thread blocked reading it wakes up.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    pub(crate) fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// The socket itself (handed to the kernel's NBD client).
    pub(crate) fn into_fd(self) -> std::os::fd::OwnedFd {
        match self {
            Stream::Unix(s) => s.into(),
            Stream::Tcp(s) => s.into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

fn open_stream(endpoint: &str, timeout: Option<std::time::Duration>) -> Result<(Stream, Stream)> {
    let s = if let Some(path) = endpoint.strip_prefix("unix:") {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(timeout)?;
        s.set_write_timeout(timeout)?;
        Stream::Unix(s)
    } else {
        let s = TcpStream::connect(endpoint)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(timeout)?;
        s.set_write_timeout(timeout)?;
        Stream::Tcp(s)
    };
    let w = s.try_clone()?;
    Ok((s, w))
}

struct Handshake {
    r: Stream,
    w: Stream,
}

impl Handshake {
    fn start(
        endpoint: &str,
        timeout: Option<std::time::Duration>,
        tls: Option<&crate::tls::ClientTls>,
    ) -> Result<Handshake> {
        let (mut r, mut w) = open_stream(endpoint, timeout)?;
        let mut hello = [0u8; 18];
        r.read_exact(&mut hello)?;
        if be_u64(&hello, 0)? != NBDMAGIC {
            return Err(ProtoError::Magic(be_u64(&hello, 0)?).into());
        }
        if be_u64(&hello, 8)? != IHAVEOPT {
            return Err(ClientError::Other(
                "server does not speak newstyle negotiation".into(),
            ));
        }
        let sflags = be_u16(&hello, 16)?;
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Other(
                "server does not speak fixed newstyle".into(),
            ));
        }
        let mut cf = C_FIXED_NEWSTYLE;
        if sflags & FLAG_NO_ZEROES != 0 {
            cf |= C_NO_ZEROES;
        }
        w.write_all(&cf.to_be_bytes())?;
        let h = Handshake { r, w };
        match (tls, &h.r) {
            (Some(tls), Stream::Tcp(_)) => h.starttls(endpoint, tls, timeout),
            _ => Ok(h),
        }
    }

    /// NBD_OPT_STARTTLS, then TLS on the socket: the rest of the
    /// negotiation runs through the session.
    fn starttls(
        mut self,
        endpoint: &str,
        tls: &crate::tls::ClientTls,
        timeout: Option<std::time::Duration>,
    ) -> Result<Handshake> {
        self.send(OPT_STARTTLS, &[])?;
        match self.reply(OPT_STARTTLS) {
            Ok((REP_ACK, _)) => {}
            Ok((t, _)) => {
                return Err(ClientError::Tls(format!(
                    "unexpected reply {t} to STARTTLS from {endpoint}"
                )))
            }
            Err(ClientError::Refused { msg, .. }) => {
                return Err(ClientError::Tls(format!(
                    "the NBD server at {endpoint} does not offer TLS: {msg}"
                )))
            }
            Err(e) => return Err(e),
        }
        let Handshake { r, w } = self;
        drop(w);
        let Stream::Tcp(raw) = r else {
            return Err(ClientError::Other("STARTTLS on a unix socket".into()));
        };
        let plain = crate::tls::start_client(raw, endpoint, tls)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        plain.set_read_timeout(timeout)?;
        plain.set_write_timeout(timeout)?;
        let w = plain.try_clone()?;
        Ok(Handshake {
            r: Stream::Unix(plain),
            w: Stream::Unix(w),
        })
    }

    fn send(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        self.w.write_all(&encode_opt(opt, data))?;
        self.w.flush()?;
        Ok(())
    }

    /// Next option reply: (type, data).
    fn reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.r.read_exact(&mut h)?;
        let (o, typ, len) = parse_opt_reply(&h)?;
        if o != opt {
            return Err(ClientError::Other(format!(
                "reply for option {o} while waiting for {opt}"
            )));
        }
        if len > 16 << 20 {
            return Err(ClientError::Other("option reply too large".into()));
        }
        let mut d = vec![0u8; len as usize];
        self.r.read_exact(&mut d)?;
        if typ & 0x8000_0000 != 0 {
            let mut msg = String::from_utf8_lossy(&d).into_owned();
            if typ == REP_ERR_TLS_REQD {
                // The fix is on this side: say it.
                msg.push_str(" (the server requires TLS from this address: give the client the server's CA, e.g. --ca-file)");
            }
            return Err(ClientError::Refused {
                option: opt,
                code: typ,
                msg,
            });
        }
        Ok((typ, d))
    }

    fn simple_option(&mut self, opt: u32) -> Result<bool> {
        self.send(opt, &[])?;
        match self.reply(opt) {
            Ok((REP_ACK, _)) => Ok(true),
            Ok((t, _)) => Err(ClientError::Other(format!(
                "unexpected reply {t} to option {opt}"
            ))),
            Err(ClientError::Refused { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Client {
    /// Lists the exports of a server.
    pub fn list(endpoint: &str) -> Result<Vec<String>> {
        let mut h = Handshake::start(endpoint, None, None)?;
        h.send(OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let (typ, d) = h.reply(OPT_LIST)?;
            match typ {
                REP_SERVER => {
                    let n = be_u32(&d, 0)? as usize;
                    let name = d.get(4..4 + n).ok_or(ProtoError::Short)?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                REP_ACK => break,
                t => return Err(ClientError::Other(format!("unexpected LIST reply {t}"))),
            }
        }
        let _ = h.send(OPT_ABORT, &[]);
        Ok(names)
    }

    /// Connects to `export` at an address or URI.
    pub fn connect(addr: &str, export: Option<&str>, opts: &ClientOptions) -> Result<Client> {
        let (r, w, n) = negotiate(addr, export, opts)?;
        Ok(Client {
            r: Box::new(r),
            w: Box::new(w),
            size: n.size,
            flags: n.flags,
            block_sizes: n.block_sizes,
            structured: n.structured,
            extended: n.extended,
            meta_id: n.meta_id,
            metas: n.metas,
            cookie: 0,
        })
    }

    /// Negotiates like [`Client::connect`] (simple replies: the kernel's
    /// client speaks no structured ones) and returns the socket in the
    /// transmission phase with the export's size and transmission flags,
    /// for the kernel's NBD client to take over.
    /// With `tls`, the socket is the plaintext end of the TLS session's
    /// pump (a thread of this process), so the process must outlive the
    /// device.
    pub fn handshake_socket(
        addr: &str,
        export: Option<&str>,
        timeout: Option<std::time::Duration>,
        tls: Option<&crate::tls::ClientTls>,
    ) -> Result<(std::os::fd::OwnedFd, u64, u16)> {
        let opts = ClientOptions {
            structured: false,
            extended: false,
            allocation: false,
            contexts: Vec::new(),
            timeout,
            tls: tls.cloned(),
        };
        let (r, w, n) = negotiate(addr, export, &opts)?;
        drop(w);
        // The kernel sets its own timeouts.
        r.set_read_timeout(None)?;
        r.set_write_timeout(None)?;
        Ok((r.into_fd(), n.size, n.flags))
    }

    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }
    pub fn structured(&self) -> bool {
        self.structured
    }
    pub fn extended(&self) -> bool {
        self.extended
    }

    fn request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<u64> {
        self.cookie += 1;
        let q = Request::outgoing(
            self.extended,
            typ,
            flags,
            self.cookie,
            offset,
            length,
            payload.len() as u64,
        );
        let mut b = encode_request(&q, self.extended);
        b.extend_from_slice(payload);
        self.w.write_all(&b)?;
        self.w.flush()?;
        Ok(self.cookie)
    }

    /// Reads one reply header; returns it.
    fn header(&mut self) -> Result<ReplyHeader> {
        let mut h = [0u8; 32];
        self.r.read_exact(&mut h[..16])?;
        let need = match be_u32(&h, 0)? {
            SIMPLE_REPLY_MAGIC => 16,
            STRUCTURED_REPLY_MAGIC => 20,
            EXT_REPLY_MAGIC => 32,
            m => return Err(ProtoError::Magic(m as u64).into()),
        };
        if need > 16 {
            self.r.read_exact(&mut h[16..need])?;
        }
        Ok(parse_reply_header(&h[..need])?.0)
    }

    fn payload(&mut self, len: u64) -> Result<Vec<u8>> {
        if len > MAX_PAYLOAD as u64 + 4096 {
            return Err(ClientError::Other(format!("reply payload of {len} bytes")));
        }
        let mut d = vec![0u8; len as usize];
        self.r.read_exact(&mut d)?;
        Ok(d)
    }

    /// Waits for the reply of a command with no data.
    fn simple_wait(&mut self, cookie: u64) -> Result<()> {
        loop {
            match self.header()? {
                ReplyHeader::Simple { error, cookie: c } => {
                    check_cookie(c, cookie)?;
                    return if error == 0 {
                        Ok(())
                    } else {
                        Err(ClientError::Errno {
                            errno: error,
                            msg: String::new(),
                        })
                    };
                }
                ReplyHeader::Chunk {
                    flags,
                    typ,
                    cookie: c,
                    len,
                } => {
                    check_cookie(c, cookie)?;
                    let d = self.payload(len)?;
                    if typ & 0x8000 != 0 {
                        return Err(chunk_error(&d));
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
            }
        }
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let max = self.block_sizes.2.max(1) as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            self.read_one(offset + done as u64, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cookie = self.request(CMD_READ, 0, offset, buf.len() as u64, &[])?;
        loop {
            match self.header()? {
                ReplyHeader::Simple { error, cookie: c } => {
                    check_cookie(c, cookie)?;
                    if error != 0 {
                        return Err(ClientError::Errno {
                            errno: error,
                            msg: String::new(),
                        });
                    }
                    self.r.read_exact(buf)?;
                    return Ok(());
                }
                ReplyHeader::Chunk {
                    flags,
                    typ,
                    cookie: c,
                    len,
                } => {
                    check_cookie(c, cookie)?;
                    match typ {
                        REPLY_TYPE_OFFSET_DATA => {
                            let mut o = [0u8; 8];
                            self.r.read_exact(&mut o)?;
                            let at = u64::from_be_bytes(o)
                                .checked_sub(offset)
                                .ok_or(ProtoError::Invalid("chunk before request"))?;
                            let n = len.checked_sub(8).ok_or(ProtoError::Short)?;
                            let end = at
                                .checked_add(n)
                                .filter(|&e| e <= buf.len() as u64)
                                .ok_or(ProtoError::Invalid("chunk past request"))?;
                            self.r.read_exact(&mut buf[at as usize..end as usize])?;
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            let d = self.payload(len)?;
                            let at = be_u64(&d, 0)?
                                .checked_sub(offset)
                                .ok_or(ProtoError::Invalid("hole before request"))?;
                            let n = be_u32(&d, 8)? as u64;
                            let end = at
                                .checked_add(n)
                                .filter(|&e| e <= buf.len() as u64)
                                .ok_or(ProtoError::Invalid("hole past request"))?;
                            buf[at as usize..end as usize].fill(0);
                        }
                        t if t & 0x8000 != 0 => {
                            let d = self.payload(len)?;
                            return Err(chunk_error(&d));
                        }
                        _ => {
                            self.payload(len)?;
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
            }
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let max = self.block_sizes.2.max(1) as usize;
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(max);
            let c = self.request(
                CMD_WRITE,
                if fua { CMD_FLAG_FUA } else { 0 },
                offset + done as u64,
                n as u64,
                &data[done..done + n],
            )?;
            self.simple_wait(c)?;
            done += n;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        let c = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.simple_wait(c)
    }

    pub fn trim(&mut self, offset: u64, len: u64) -> Result<()> {
        let c = self.request(CMD_TRIM, 0, offset, len, &[])?;
        self.simple_wait(c)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, flags: u16) -> Result<()> {
        let c = self.request(CMD_WRITE_ZEROES, flags, offset, len, &[])?;
        self.simple_wait(c)
    }

    /// Allocation status from `offset`: (length, NBD_STATE_* flags) runs,
    /// possibly covering less than `len`.
    pub fn block_status(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let id = self
            .meta_id
            .ok_or_else(|| ClientError::Other("base:allocation was not negotiated".into()))?;
        self.block_status_id(id, offset, len)
    }

    /// Whether the server selected metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        self.metas.iter().any(|(n, _)| n == name)
    }

    /// Block status in a context asked for in [`ClientOptions::contexts`]
    /// (for `qemu:dirty-bitmap:NAME`, flag 1 = dirty).
    pub fn block_status_of(
        &mut self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u32)>> {
        let id = self
            .metas
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .ok_or_else(|| ClientError::Other(format!("the server does not offer {name}")))?;
        self.block_status_id(id, offset, len)
    }

    fn block_status_id(&mut self, id: u32, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let len = if self.extended {
            len
        } else {
            len.min(u32::MAX as u64 & !0xfff)
        };
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        let mut out = Vec::new();
        loop {
            match self.header()? {
                ReplyHeader::Simple { error, cookie: c } => {
                    check_cookie(c, cookie)?;
                    return Err(ClientError::Errno {
                        errno: error,
                        msg: "simple reply to block status".into(),
                    });
                }
                ReplyHeader::Chunk {
                    flags,
                    typ,
                    cookie: c,
                    len,
                } => {
                    check_cookie(c, cookie)?;
                    let d = self.payload(len)?;
                    match typ {
                        REPLY_TYPE_BLOCK_STATUS if be_u32(&d, 0)? == id => {
                            for e in d[4..].chunks_exact(8) {
                                out.push((be_u32(e, 0)? as u64, be_u32(e, 4)?));
                            }
                        }
                        REPLY_TYPE_BLOCK_STATUS_EXT if self.extended && be_u32(&d, 0)? == id => {
                            for e in d.get(8..).ok_or(ProtoError::Short)?.chunks_exact(16) {
                                out.push((be_u64(e, 0)?, be_u64(e, 8)? as u32));
                            }
                        }
                        t if t & 0x8000 != 0 => return Err(chunk_error(&d)),
                        _ => {}
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(out);
                    }
                }
            }
        }
    }

    /// Ends the session cleanly.
    pub fn disconnect(mut self) -> Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }

    /// Sends a raw request (tests of bad input).
    pub fn raw_request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<()> {
        let c = self.request(typ, flags, offset, length, payload)?;
        self.simple_wait(c)
    }
}

/// What a handshake agreed on.
#[derive(Clone, Debug)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub block_sizes: (u32, u32, u32),
    pub structured: bool,
    pub extended: bool,
    pub meta_id: Option<u32>,
    pub metas: Vec<(String, u32)>,
}

/// Connects and negotiates up to the transmission phase: the socket (a
/// reader and a writer) and what was agreed.
pub(crate) fn negotiate(
    addr: &str,
    export: Option<&str>,
    opts: &ClientOptions,
) -> Result<(Stream, Stream, Negotiated)> {
    let a = Address::parse(addr)?;
    let export = export.map(str::to_string).or(a.export).unwrap_or_default();
    let mut h = Handshake::start(&a.endpoint, opts.timeout, opts.tls.as_ref())?;
    let extended = opts.extended && h.simple_option(OPT_EXTENDED_HEADERS)?;
    let structured = extended || (opts.structured && h.simple_option(OPT_STRUCTURED_REPLY)?);
    let mut meta_id = None;
    let mut metas = Vec::new();
    let mut wanted: Vec<&str> = Vec::new();
    if opts.allocation {
        wanted.push(BASE_ALLOCATION);
    }
    wanted.extend(opts.contexts.iter().map(String::as_str));
    if structured && !wanted.is_empty() {
        h.send(OPT_SET_META_CONTEXT, &encode_meta_request(&export, &wanted))?;
        loop {
            let (typ, d) = h.reply(OPT_SET_META_CONTEXT)?;
            match typ {
                REP_META_CONTEXT => {
                    let id = be_u32(&d, 0)?;
                    let name = String::from_utf8_lossy(d.get(4..).unwrap_or_default());
                    if name == BASE_ALLOCATION {
                        meta_id = Some(id);
                    } else if opts.contexts.iter().any(|c| *c == name) {
                        metas.push((name.into_owned(), id));
                    }
                }
                REP_ACK => break,
                t => return Err(ClientError::Other(format!("unexpected reply {t}"))),
            }
        }
    }
    h.send(OPT_GO, &encode_info_request(&export, &[INFO_BLOCK_SIZE]))?;
    let (mut size, mut flags, mut bsz) = (None, 0u16, (1u32, 4096u32, MAX_PAYLOAD));
    loop {
        let (typ, d) = h.reply(OPT_GO)?;
        match typ {
            REP_INFO => match be_u16(&d, 0)? {
                INFO_EXPORT => {
                    size = Some(be_u64(&d, 2)?);
                    flags = be_u16(&d, 10)?;
                }
                INFO_BLOCK_SIZE => bsz = (be_u32(&d, 2)?, be_u32(&d, 6)?, be_u32(&d, 10)?),
                _ => {}
            },
            REP_ACK => break,
            t => return Err(ClientError::Other(format!("unexpected GO reply {t}"))),
        }
    }
    let size = size.ok_or_else(|| ClientError::Other("server sent no export size".into()))?;
    Ok((
        h.r,
        h.w,
        Negotiated {
            size,
            flags,
            block_sizes: bsz,
            structured,
            extended,
            meta_id,
            metas,
        },
    ))
}

/// The error a structured reply's error chunk carries (errno, message);
/// both clients read it.
pub(crate) fn chunk_error(d: &[u8]) -> ClientError {
    let errno = be_u32(d, 0).unwrap_or(EIO);
    let n = be_u16(d, 4).unwrap_or(0) as usize;
    let msg = d
        .get(6..6 + n)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    ClientError::Errno { errno, msg }
}

fn check_cookie(got: u64, want: u64) -> Result<()> {
    if got != want {
        return Err(ClientError::Other(format!(
            "reply cookie {got} for request {want}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn uris() {
        assert_eq!(
            Address::parse("nbd://h:99/v@3").unwrap(),
            Address {
                endpoint: "h:99".into(),
                export: Some("v@3".into())
            }
        );
        assert_eq!(
            Address::parse("nbd://h/").unwrap(),
            Address {
                endpoint: "h:10809".into(),
                export: Some("".into())
            }
        );
        assert_eq!(
            Address::parse("nbd+unix:///db?socket=/run/x.sock").unwrap(),
            Address {
                endpoint: "unix:/run/x.sock".into(),
                export: Some("db".into())
            }
        );
        assert!(Address::parse("nbd+unix:///db").is_err());
        assert_eq!(Address::parse("unix:/s").unwrap().endpoint, "unix:/s");
    }
}

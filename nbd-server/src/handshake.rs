//! The handshake: the fixed-newstyle greeting and the option haggling that
//! ends in transmission (GO, EXPORT_NAME), in TLS (STARTTLS) or in a close.
//! One function per option, as nbdkit's `protocol-handshake-newstyle.c`.

use std::io::Read;
use std::sync::Arc;

use nbd_proto::codec::*;

use crate::export::Export;
use crate::server::{read_exact_or_eof, send, ConnError, Link, Registration, Server, SharedWriter};
use crate::transmission::Session;

/// How the option haggling ended.
pub(crate) enum Outcome {
    Closed,
    StartTls,
    /// Transmission on the session, for the client registered under the
    /// export's name.
    Go(Box<Session>, Registration),
}

/// What the options so far agreed on.
struct Negotiated {
    structured: bool,
    extended: bool,
    no_zeroes: bool,
    /// Export the meta context selection applies to, if base:allocation was selected.
    meta: Option<String>,
}

/// After one option: read the next, or leave the haggling.
enum Step {
    Next,
    Done(Outcome),
}

/// The option phase of one connection.
struct Haggle<'a> {
    server: &'a Arc<Server>,
    w: &'a SharedWriter,
    n: Negotiated,
    link: Link<'a>,
}

/// An export opened for a client, with the read-only the client sees.
struct Opened {
    export: Arc<dyn Export>,
    read_only: bool,
}

fn tflags(ro: bool, structured: bool, multi_conn: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
    if multi_conn {
        f |= TF_CAN_MULTI_CONN;
    }
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

impl Server {
    /// Sends the greeting and reads the client flags; Some(no_zeroes).
    pub(crate) fn greet(
        &self,
        r: &mut dyn Read,
        w: &SharedWriter,
    ) -> Result<Option<bool>, ConnError> {
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
    pub(crate) fn negotiate(
        self: &Arc<Self>,
        r: &mut dyn Read,
        w: &SharedWriter,
        no_zeroes: bool,
        link: Link,
    ) -> Result<Outcome, ConnError> {
        let mut h = Haggle {
            server: self,
            w,
            n: Negotiated {
                structured: false,
                extended: false,
                no_zeroes,
                meta: None,
            },
            link,
        };
        loop {
            let Some((option, data)) = h.read_option(r)? else {
                return Ok(Outcome::Closed);
            };
            if let Step::Done(o) = h.dispatch(option, data)? {
                return Ok(o);
            }
        }
    }

    /// Opens `name` (the default export for the empty name).
    fn open_export(&self, name: &str) -> Result<Opened, String> {
        let name = if name.is_empty() {
            self.cfg
                .default_export
                .as_deref()
                .ok_or("no default export; give an export name")?
        } else {
            name
        };
        let export = self.catalog.open(name).map_err(|e| e.to_string())?;
        let read_only = self.cfg.read_only || export.read_only();
        Ok(Opened { export, read_only })
    }
}

impl Haggle<'_> {
    fn reply(&self, option: u32, typ: u32, d: &[u8]) -> Result<(), ConnError> {
        Ok(send(self.w, &[&encode_opt_reply(option, typ, d)])?)
    }

    fn refuse(&self, option: u32, typ: u32, msg: &str) -> Result<Step, ConnError> {
        self.reply(option, typ, msg.as_bytes())?;
        Ok(Step::Next)
    }

    /// The next option and its data; None at a clean end of stream.
    fn read_option(&self, r: &mut dyn Read) -> Result<Option<(u32, Vec<u8>)>, ConnError> {
        let mut h = [0u8; 16];
        if !read_exact_or_eof(r, &mut h)? {
            return Ok(None);
        }
        let oh = parse_opt_header(&h)?;
        if oh.length > MAX_OPTION {
            // Too large to be a real option: refuse without reading it.
            self.reply(oh.option, REP_ERR_TOO_BIG, b"option too large")?;
            return Err(ConnError::Refused(format!(
                "option {} of {} bytes",
                oh.option, oh.length
            )));
        }
        let mut data = vec![0u8; oh.length as usize];
        r.read_exact(&mut data)?;
        Ok(Some((oh.option, data)))
    }

    fn dispatch(&mut self, option: u32, data: Vec<u8>) -> Result<Step, ConnError> {
        if self.server.is_shutdown() && option != OPT_ABORT {
            return self.refuse(option, REP_ERR_SHUTDOWN, "server is shutting down");
        }
        let tls_required = self.server.cfg.tls.as_ref().is_some_and(|t| {
            t.required && !(t.plain_local && crate::tls::peer_is_local(self.link.peer))
        }) && !self.link.tls_active;
        if tls_required && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(ConnError::Refused(
                    "EXPORT_NAME before STARTTLS on a TLS-only server".into(),
                ));
            }
            return self.refuse(
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: use STARTTLS",
            );
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data),
            OPT_ABORT => {
                let _ = self.reply(option, REP_ACK, &[]);
                Ok(Step::Done(Outcome::Closed))
            }
            OPT_LIST => self.list(&data),
            OPT_STARTTLS => self.starttls(&data),
            OPT_INFO | OPT_GO => self.info_or_go(option, &data),
            OPT_STRUCTURED_REPLY => self.structured_reply(&data),
            OPT_EXTENDED_HEADERS => self.extended_headers(&data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data),
            other => self.refuse(
                option,
                REP_ERR_UNSUP,
                &format!("option {other} is not supported"),
            ),
        }
    }

    /// The old way into transmission: no reply on failure, just a close.
    fn export_name(&mut self, data: Vec<u8>) -> Result<Step, ConnError> {
        if self.n.extended {
            return Err(ConnError::Refused(
                "EXPORT_NAME after extended headers".into(),
            ));
        }
        let name = String::from_utf8(data)
            .map_err(|_| ConnError::Refused("export name is not UTF-8".into()))?;
        let o = self.server.open_export(&name).map_err(ConnError::Refused)?;
        let flags = tflags(o.read_only, self.n.structured, o.export.can_multi_conn());
        let mut b = o.export.size().to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        if !self.n.no_zeroes {
            b.extend_from_slice(&[0u8; 124]);
        }
        let reg = self.server.register(&self.link, &name);
        send(self.w, &[&b])?;
        let base_alloc = self.n.meta.as_deref() == Some(name.as_str());
        let sess = Session::new(o.export, o.read_only, self.n.structured, false, base_alloc);
        Ok(Step::Done(Outcome::Go(Box::new(sess), reg)))
    }

    fn list(&self, data: &[u8]) -> Result<Step, ConnError> {
        if !data.is_empty() {
            return self.refuse(OPT_LIST, REP_ERR_INVALID, "LIST takes no data");
        }
        for e in self.server.catalog.list() {
            let mut b = (e.name.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(e.name.as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &b)?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])?;
        Ok(Step::Next)
    }

    fn starttls(&self, data: &[u8]) -> Result<Step, ConnError> {
        let o = OPT_STARTTLS;
        if self.server.cfg.tls.is_none() || !self.link.tls_possible {
            self.refuse(o, REP_ERR_POLICY, "TLS is not configured on this server")
        } else if self.link.tls_active {
            self.refuse(o, REP_ERR_INVALID, "TLS is already active")
        } else if !data.is_empty() {
            self.refuse(o, REP_ERR_INVALID, "STARTTLS takes no data")
        } else {
            self.reply(o, REP_ACK, &[])?;
            Ok(Step::Done(Outcome::StartTls))
        }
    }

    /// NBD_OPT_INFO describes an export; NBD_OPT_GO also enters transmission.
    fn info_or_go(&self, option: u32, data: &[u8]) -> Result<Step, ConnError> {
        let (name, infos) = match parse_info_request(data) {
            Ok(x) => x,
            Err(e) => return self.refuse(option, REP_ERR_INVALID, &e.to_string()),
        };
        let o = match self.server.open_export(&name) {
            Ok(x) => x,
            Err(msg) => return self.refuse(option, REP_ERR_UNKNOWN, &msg),
        };
        let structured = self.n.structured || self.n.extended;
        let e = &o.export;
        let flags = tflags(o.read_only, structured, e.can_multi_conn());
        self.reply(option, REP_INFO, &info_export(e.size(), flags))?;
        if infos.contains(&INFO_NAME) {
            self.reply(option, REP_INFO, &info_string(INFO_NAME, &name))?;
        }
        if infos.contains(&INFO_DESCRIPTION) {
            let d = e.description();
            self.reply(option, REP_INFO, &info_string(INFO_DESCRIPTION, &d))?;
        }
        // Always sent: our limits differ from the defaults.
        let bs = e.block_size();
        let max = bs.maximum.min(MAX_PAYLOAD);
        self.reply(
            option,
            REP_INFO,
            &info_block_size(bs.minimum, bs.preferred, max),
        )?;
        if option != OPT_GO {
            self.reply(option, REP_ACK, &[])?;
            return Ok(Step::Next);
        }
        let reg = self.server.register(&self.link, &name);
        self.reply(option, REP_ACK, &[])?;
        let base_alloc = self.n.meta.as_deref() == Some(name.as_str());
        let sess = Session::new(
            o.export,
            o.read_only,
            structured,
            self.n.extended,
            base_alloc,
        );
        Ok(Step::Done(Outcome::Go(Box::new(sess), reg)))
    }

    fn structured_reply(&mut self, data: &[u8]) -> Result<Step, ConnError> {
        let o = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            self.refuse(o, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        } else if self.n.extended {
            self.refuse(
                o,
                REP_ERR_EXT_HEADER_REQD,
                "extended headers are already in use",
            )
        } else {
            self.n.structured = true;
            self.reply(o, REP_ACK, &[])?;
            Ok(Step::Next)
        }
    }

    fn extended_headers(&mut self, data: &[u8]) -> Result<Step, ConnError> {
        let o = OPT_EXTENDED_HEADERS;
        if !data.is_empty() {
            self.refuse(o, REP_ERR_INVALID, "EXTENDED_HEADERS takes no data")
        } else {
            self.n.extended = true;
            self.reply(o, REP_ACK, &[])?;
            Ok(Step::Next)
        }
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT: we only have base:allocation.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<Step, ConnError> {
        if !self.n.structured && !self.n.extended {
            return self.refuse(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
        }
        let (name, queries) = match parse_meta_request(data) {
            Ok(x) => x,
            Err(e) => return self.refuse(option, REP_ERR_INVALID, &e.to_string()),
        };
        if let Err(msg) = self.server.open_export(&name) {
            return self.refuse(option, REP_ERR_UNKNOWN, &msg);
        }
        let set = option == OPT_SET_META_CONTEXT;
        let matches = if set {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
        };
        if set {
            self.n.meta = if matches { Some(name) } else { None };
        }
        if matches {
            let mut b = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            b.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &b)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(Step::Next)
    }
}

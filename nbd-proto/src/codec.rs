//! NBD wire protocol: constants and the encoding and decoding of every
//! message a server exchanges (doc/proto.md of the NBD project, with the
//! extended-headers extension).

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454F5054;
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x25609513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e41c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e33ef;
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a278c;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const C_FIXED_NEWSTYLE: u32 = 1;
pub const C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000A;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 0x0001;
pub const TF_READ_ONLY: u16 = 0x0002;
pub const TF_SEND_FLUSH: u16 = 0x0004;
pub const TF_SEND_FUA: u16 = 0x0008;
pub const TF_SEND_TRIM: u16 = 0x0020;
pub const TF_SEND_WRITE_ZEROES: u16 = 0x0040;
pub const TF_SEND_DF: u16 = 0x0080;
pub const TF_CAN_MULTI_CONN: u16 = 0x0100;
pub const TF_SEND_CACHE: u16 = 0x0400;
pub const TF_SEND_FAST_ZERO: u16 = 0x0800;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 0x01;
pub const CMD_FLAG_NO_HOLE: u16 = 0x02;
pub const CMD_FLAG_DF: u16 = 0x04;
pub const CMD_FLAG_REQ_ONE: u16 = 0x08;
pub const CMD_FLAG_FAST_ZERO: u16 = 0x10;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 0x20;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest WRITE payload and READ length we accept (advertised).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload we read (names are at most 4096 bytes).
pub const MAX_OPTION: u32 = 64 << 10;
/// The only metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// A malformed message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    Magic(u64),
    #[error("message truncated")]
    Short,
    #[error("{0}")]
    Invalid(&'static str),
}

fn u16_at(b: &[u8], o: usize) -> Result<u16, ProtoError> {
    b.get(o..o + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(ProtoError::Short)
}
fn u32_at(b: &[u8], o: usize) -> Result<u32, ProtoError> {
    b.get(o..o + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(ProtoError::Short)
}
fn u64_at(b: &[u8], o: usize) -> Result<u64, ProtoError> {
    let s = b.get(o..o + 8).ok_or(ProtoError::Short)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_be_bytes(a))
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length (or payload length for WRITE).
    pub length: u64,
    /// Bytes of payload that follow the header.
    pub payload: u64,
}

impl Request {
    /// A client's request: with extended headers, a request carrying a
    /// payload says so (`CMD_FLAG_PAYLOAD_LEN`). Both clients build theirs here.
    pub fn outgoing(
        extended: bool,
        typ: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: u64,
    ) -> Request {
        let flags = if extended && payload > 0 {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        Request {
            flags,
            typ,
            cookie,
            offset,
            length,
            payload,
        }
    }
}

pub const fn request_len(extended: bool) -> usize {
    if extended {
        32
    } else {
        28
    }
}

/// Parses a request header (28 bytes compact, 32 extended).
pub fn parse_request(b: &[u8], extended: bool) -> Result<Request, ProtoError> {
    let magic = u32_at(b, 0)?;
    let want = if extended {
        EXT_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(ProtoError::Magic(magic as u64));
    }
    let flags = u16_at(b, 4)?;
    let typ = u16_at(b, 6)?;
    let cookie = u64_at(b, 8)?;
    let offset = u64_at(b, 16)?;
    let (length, payload) = if extended {
        let l = u64_at(b, 24)?;
        // A WRITE's length is its payload whether or not PAYLOAD_LEN is
        // set: the draft requires the flag, qemu (8.2 to 10) omits it.
        if flags & CMD_FLAG_PAYLOAD_LEN != 0 || typ == CMD_WRITE {
            (l, l)
        } else {
            (l, 0)
        }
    } else {
        // PAYLOAD_LEN means nothing without extended headers: like any
        // unknown flag it is the server's to refuse with EINVAL, and the
        // payload length follows from the command alone.
        let l = u32_at(b, 24)? as u64;
        (l, if typ == CMD_WRITE { l } else { 0 })
    };
    Ok(Request {
        flags,
        typ,
        cookie,
        offset,
        length,
        payload,
    })
}

pub fn encode_request(r: &Request, extended: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(
        &(if extended {
            EXT_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        })
        .to_be_bytes(),
    );
    b.extend_from_slice(&r.flags.to_be_bytes());
    b.extend_from_slice(&r.typ.to_be_bytes());
    b.extend_from_slice(&r.cookie.to_be_bytes());
    b.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        b.extend_from_slice(&r.length.to_be_bytes());
    } else {
        b.extend_from_slice(&(r.length as u32).to_be_bytes());
    }
    b
}

/// An option request header (after the client flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_opt_header(b: &[u8]) -> Result<OptHeader, ProtoError> {
    let magic = u64_at(b, 0)?;
    if magic != IHAVEOPT {
        return Err(ProtoError::Magic(magic));
    }
    Ok(OptHeader {
        option: u32_at(b, 8)?,
        length: u32_at(b, 12)?,
    })
}

pub fn encode_opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

pub fn encode_opt_reply(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REP_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An option reply header: (option, type, length).
pub fn parse_opt_reply(b: &[u8]) -> Result<(u32, u32, u32), ProtoError> {
    let magic = u64_at(b, 0)?;
    if magic != REP_MAGIC {
        return Err(ProtoError::Magic(magic));
    }
    Ok((u32_at(b, 8)?, u32_at(b, 12)?, u32_at(b, 16)?))
}

/// Body of NBD_OPT_INFO / NBD_OPT_GO: export name and requested info types.
pub fn parse_info_request(d: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let n = u32_at(d, 0)? as usize;
    let name = d.get(4..4 + n).ok_or(ProtoError::Short)?;
    let name =
        std::str::from_utf8(name).map_err(|_| ProtoError::Invalid("export name is not UTF-8"))?;
    let k = u16_at(d, 4 + n)? as usize;
    if d.len() != 4 + n + 2 + 2 * k {
        return Err(ProtoError::Invalid(
            "info request length does not match its contents",
        ));
    }
    let reqs = (0..k)
        .map(|i| u16_at(d, 6 + n + 2 * i))
        .collect::<Result<_, _>>()?;
    Ok((name.to_string(), reqs))
}

pub fn encode_info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// Body of NBD_OPT_{LIST,SET}_META_CONTEXT: export name and queries.
pub fn parse_meta_request(d: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let n = u32_at(d, 0)? as usize;
    let name = d.get(4..4 + n).ok_or(ProtoError::Short)?;
    let name =
        std::str::from_utf8(name).map_err(|_| ProtoError::Invalid("export name is not UTF-8"))?;
    let count = u32_at(d, 4 + n)? as usize;
    let mut o = 8 + n;
    let mut qs = Vec::new();
    for _ in 0..count {
        let l = u32_at(d, o)? as usize;
        let q = d.get(o + 4..o + 4 + l).ok_or(ProtoError::Short)?;
        qs.push(
            std::str::from_utf8(q)
                .map_err(|_| ProtoError::Invalid("query is not UTF-8"))?
                .to_string(),
        );
        o += 4 + l;
    }
    if o != d.len() {
        return Err(ProtoError::Invalid(
            "meta context request length does not match its contents",
        ));
    }
    Ok((name.to_string(), qs))
}

pub fn encode_meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

pub fn info_string(typ: u16, s: &str) -> Vec<u8> {
    let mut b = typ.to_be_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured (20-byte) or extended (32-byte) reply chunk header.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    if extended {
        b.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
    b
}

/// Payload of an error chunk.
pub fn error_payload(error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut b = Vec::with_capacity(6 + msg.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// A reply as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        typ: u16,
        cookie: u64,
        len: u64,
    },
}

/// Parses the magic-dependent reply header; `b` must hold at least 32 bytes
/// for extended replies, 20 for structured and 16 for simple ones. Returns
/// the header and its length.
pub fn parse_reply_header(b: &[u8]) -> Result<(ReplyHeader, usize), ProtoError> {
    let magic = u32_at(b, 0)?;
    match magic {
        SIMPLE_REPLY_MAGIC => Ok((
            ReplyHeader::Simple {
                error: u32_at(b, 4)?,
                cookie: u64_at(b, 8)?,
            },
            16,
        )),
        STRUCTURED_REPLY_MAGIC => Ok((
            ReplyHeader::Chunk {
                flags: u16_at(b, 4)?,
                typ: u16_at(b, 6)?,
                cookie: u64_at(b, 8)?,
                len: u32_at(b, 16)? as u64,
            },
            20,
        )),
        EXT_REPLY_MAGIC => Ok((
            ReplyHeader::Chunk {
                flags: u16_at(b, 4)?,
                typ: u16_at(b, 6)?,
                cookie: u64_at(b, 8)?,
                len: u64_at(b, 24)?,
            },
            32,
        )),
        m => Err(ProtoError::Magic(m as u64)),
    }
}

pub fn be_u32(b: &[u8], o: usize) -> Result<u32, ProtoError> {
    u32_at(b, o)
}
pub fn be_u64(b: &[u8], o: usize) -> Result<u64, ProtoError> {
    u64_at(b, o)
}
pub fn be_u16(b: &[u8], o: usize) -> Result<u16, ProtoError> {
    u16_at(b, o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        for ext in [false, true] {
            let r = Request {
                flags: CMD_FLAG_FUA,
                typ: CMD_TRIM,
                cookie: 7,
                offset: 1 << 40,
                length: 4096,
                payload: 0,
            };
            assert_eq!(parse_request(&encode_request(&r, ext), ext), Ok(r));
        }
        let w = Request {
            flags: 0,
            typ: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 512,
            payload: 512,
        };
        assert_eq!(parse_request(&encode_request(&w, false), false), Ok(w));
        // An extended WRITE without PAYLOAD_LEN (as qemu sends it) still carries its payload.
        assert_eq!(parse_request(&encode_request(&w, true), true), Ok(w));
        let mut bad = encode_request(&w, false);
        bad[0] ^= 1;
        assert!(matches!(
            parse_request(&bad, false),
            Err(ProtoError::Magic(_))
        ));
        assert_eq!(
            parse_request(&bad[..10], false),
            Err(ProtoError::Magic(0x24609513))
        );
        assert_eq!(
            parse_request(&encode_request(&w, false)[..10], false),
            Err(ProtoError::Short)
        );
        // Unknown flags parse (the server answers EINVAL); a WRITE keeps its
        // payload so the stream stays in sync.
        for flags in [0x8000, CMD_FLAG_PAYLOAD_LEN] {
            let odd = Request { flags, ..w };
            assert_eq!(parse_request(&encode_request(&odd, false), false), Ok(odd));
        }
    }

    #[test]
    fn info_and_meta_requests() {
        let b = encode_info_request("vol@3", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(parse_info_request(&b), Ok(("vol@3".into(), vec![3, 1])));
        assert!(parse_info_request(&b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        let m = encode_meta_request("v", &["base:allocation", "qemu:x"]);
        assert_eq!(
            parse_meta_request(&m),
            Ok(("v".into(), vec!["base:allocation".into(), "qemu:x".into()]))
        );
        assert!(parse_meta_request(&m[..m.len() - 2]).is_err());
        let huge = [0xffu8; 8];
        assert!(parse_meta_request(&huge).is_err());
    }
}

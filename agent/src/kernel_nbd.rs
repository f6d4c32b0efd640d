//! Attachments through the kernel's NBD client (`nbd.ko`) where the host
//! has it: the agent does the handshake on several sockets, hands them to
//! the kernel with one generic-netlink `NBD_CMD_CONNECT`, and gets
//! `/dev/nbdN`: no FUSE file, no loop device, no process in between, the
//! kernel's own multi-queue pipelining over every socket.
//!
//! [`available`] decides: the `nbd` module is loaded (or loads: `modprobe
//! nbd`) and its generic-netlink family resolves. Otherwise attachments go
//! through the FUSE file and a loop device (`crate::nbdfile`).
//!
//! The messages follow `include/uapi/linux/nbd-netlink.h` (version 1): the
//! unit tests check their bytes against that layout. Without `nbd.ko` on
//! the test machines the connect itself is not exercised in CI.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// `nbd-netlink.h`
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;
pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;
/// Free the device when it is disconnected (no stale `/dev/nbdN`).
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;

/// Whether the kernel's NBD client is there: its module loaded (tried
/// with `modprobe nbd` once) and its netlink family known.
pub fn available() -> bool {
    if !std::path::Path::new("/sys/module/nbd").exists() {
        let _ = std::process::Command::new("modprobe")
            .args(["-q", "nbd"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    std::path::Path::new("/sys/module/nbd").exists()
        && Netlink::open()
            .and_then(|mut n| n.family_id(NBD_GENL_FAMILY_NAME))
            .is_ok()
}

/// What `NBD_CMD_CONNECT` carries.
#[derive(Clone, Debug)]
pub struct Connect {
    pub size: u64,
    pub block_size: u64,
    /// The handshake's transmission flags (read-only, flush, FUA, trim…).
    pub server_flags: u16,
    pub timeout: Duration,
    /// How long the kernel waits for a dead socket to come back before it
    /// fails requests.
    pub dead_conn_timeout: Duration,
}

/// Connects `socks` (each past its handshake) as one device; its index
/// (`/dev/nbdINDEX`). The kernel takes the sockets over.
pub fn connect(c: &Connect, socks: &[OwnedFd]) -> io::Result<u32> {
    let mut n = Netlink::open()?;
    let family = n.family_id(NBD_GENL_FAMILY_NAME)?;
    let fds: Vec<u32> = socks.iter().map(|s| s.as_raw_fd() as u32).collect();
    let msg = connect_message(family, n.next_seq(), c, &fds);
    let reply = n.request(&msg)?;
    // The reply names the device the kernel chose.
    let index = attrs(reply.get(GENL_HDR..).unwrap_or_default())
        .find(|(t, _)| *t == NBD_ATTR_INDEX)
        .and_then(|(_, v)| {
            v.get(..4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        });
    index.ok_or_else(|| io::Error::other("the kernel's NBD connect named no device"))
}

/// Disconnects `/dev/nbdINDEX` (the kernel flushes and closes its sockets).
pub fn disconnect(index: u32) -> io::Result<()> {
    let mut n = Netlink::open()?;
    let family = n.family_id(NBD_GENL_FAMILY_NAME)?;
    let msg = disconnect_message(family, n.next_seq(), index);
    n.request(&msg).map(|_| ())
}

const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends one attribute (header, value, padding to 4 bytes).
fn put_attr(b: &mut Vec<u8>, typ: u16, value: &[u8]) {
    let len = 4 + value.len();
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&typ.to_ne_bytes());
    b.extend_from_slice(value);
    b.resize(b.len() + align4(len) - len, 0);
}

/// Appends a nested attribute holding what `f` appends.
fn put_nested(b: &mut Vec<u8>, typ: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = b.len();
    b.extend_from_slice(&[0; 4]);
    f(b);
    let len = (b.len() - start) as u16;
    b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    b[start + 2..start + 4].copy_from_slice(&(typ | NLA_F_NESTED).to_ne_bytes());
}

/// A generic-netlink request: netlink header, genl header, `attrs`.
fn genl_message(family: u16, seq: u32, cmd: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + GENL_HDR + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&family.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.push(cmd);
    b.push(if family == GENL_ID_CTRL {
        1
    } else {
        NBD_GENL_VERSION
    });
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(attrs);
    b
}

pub fn connect_message(family: u16, seq: u32, c: &Connect, fds: &[u32]) -> Vec<u8> {
    let mut a = Vec::new();
    put_attr(&mut a, NBD_ATTR_SIZE_BYTES, &c.size.to_ne_bytes());
    put_attr(
        &mut a,
        NBD_ATTR_BLOCK_SIZE_BYTES,
        &c.block_size.to_ne_bytes(),
    );
    put_attr(&mut a, NBD_ATTR_TIMEOUT, &c.timeout.as_secs().to_ne_bytes());
    put_attr(
        &mut a,
        NBD_ATTR_DEAD_CONN_TIMEOUT,
        &c.dead_conn_timeout.as_secs().to_ne_bytes(),
    );
    put_attr(
        &mut a,
        NBD_ATTR_SERVER_FLAGS,
        &(c.server_flags as u64).to_ne_bytes(),
    );
    put_attr(
        &mut a,
        NBD_ATTR_CLIENT_FLAGS,
        &NBD_CFLAG_DESTROY_ON_DISCONNECT.to_ne_bytes(),
    );
    put_nested(&mut a, NBD_ATTR_SOCKETS, |b| {
        for fd in fds {
            put_nested(b, NBD_SOCK_ITEM, |b| {
                put_attr(b, NBD_SOCK_FD, &fd.to_ne_bytes())
            });
        }
    });
    genl_message(family, seq, NBD_CMD_CONNECT, &a)
}

pub fn disconnect_message(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut a = Vec::new();
    put_attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
    genl_message(family, seq, NBD_CMD_DISCONNECT, &a)
}

fn getfamily_message(seq: u32, name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    put_attr(&mut a, CTRL_ATTR_FAMILY_NAME, &z);
    genl_message(GENL_ID_CTRL, seq, CTRL_CMD_GETFAMILY, &a)
}

/// The attributes in `b`: (type without flags, value).
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let h = b.get(at..at + 4)?;
        let len = u16::from_ne_bytes([h[0], h[1]]) as usize;
        let typ = u16::from_ne_bytes([h[2], h[3]]) & NLA_TYPE_MASK;
        let v = b.get(at + 4..at + len.max(4))?;
        at += align4(len.max(4));
        Some((typ, v))
    })
}

/// A generic-netlink socket.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: socket(2); the descriptor is owned from here on.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: 30,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval for SO_RCVTIMEO: a kernel that does not
        // answer fails the request instead of hanging the agent.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Netlink { fd, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// The numeric id of a generic-netlink family.
    fn family_id(&mut self, name: &str) -> io::Result<u16> {
        let seq = self.next_seq();
        let reply = self.request(&getfamily_message(seq, name))?;
        let id = attrs(reply.get(GENL_HDR..).unwrap_or_default())
            .find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID)
            .and_then(|(_, v)| v.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])));
        id.ok_or_else(|| io::Error::other(format!("no generic netlink family {name}")))
    }

    /// Sends `msg`; the payload of the reply (genl header and attributes),
    /// empty for a bare acknowledgement; the kernel's errno as an error.
    fn request(&mut self, msg: &[u8]) -> io::Result<Vec<u8>> {
        // SAFETY: `msg` is valid for its length; the kernel is the peer
        // (a zeroed sockaddr_nl).
        let sent = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut payload = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0;
            let b = &buf[..n as usize];
            while let Some(h) = b.get(at..at + NLMSG_HDR) {
                let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let typ = u16::from_ne_bytes([h[4], h[5]]);
                let body = b
                    .get(at + NLMSG_HDR..at + len)
                    .ok_or_else(|| io::Error::other("truncated netlink reply"))?;
                match typ {
                    NLMSG_ERROR => {
                        let e = body
                            .get(..4)
                            .map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
                            .unwrap_or(-libc::EIO);
                        // The acknowledgement (0) ends the exchange.
                        return if e == 0 {
                            Ok(payload)
                        } else {
                            Err(io::Error::from_raw_os_error(-e))
                        };
                    }
                    NLMSG_DONE => return Ok(payload),
                    _ => payload = body.to_vec(),
                }
                at += align4(len.max(NLMSG_HDR));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_ne_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_ne_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_ne_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// NBD_CMD_CONNECT byte for byte: nlmsghdr (len, type = family,
    /// REQUEST|ACK, seq, pid 0), genlmsghdr (cmd 1, version 1), then the
    /// u64 attributes (8 + 4 header = 12 bytes each) and the nested
    /// sockets, every attribute padded to 4 bytes.
    #[test]
    fn connect_message_layout() {
        let c = Connect {
            size: 1 << 30,
            block_size: 4096,
            server_flags: 0x010d,
            timeout: Duration::from_secs(60),
            dead_conn_timeout: Duration::from_secs(30),
        };
        let m = connect_message(0x1234, 7, &c, &[5, 9]);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), 0x1234);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!((u32_at(&m, 8), u32_at(&m, 12)), (7, 0));
        assert_eq!(&m[16..20], &[NBD_CMD_CONNECT, NBD_GENL_VERSION, 0, 0]);
        let mut at = 20;
        for (typ, v) in [
            (NBD_ATTR_SIZE_BYTES, 1u64 << 30),
            (NBD_ATTR_BLOCK_SIZE_BYTES, 4096),
            (NBD_ATTR_TIMEOUT, 60),
            (NBD_ATTR_DEAD_CONN_TIMEOUT, 30),
            (NBD_ATTR_SERVER_FLAGS, 0x010d),
            (NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DESTROY_ON_DISCONNECT),
        ] {
            assert_eq!((u16_at(&m, at), u16_at(&m, at + 2)), (12, typ));
            assert_eq!(u64_at(&m, at + 4), v);
            at += 12;
        }
        // SOCKETS { ITEM { FD 5 }, ITEM { FD 9 } }: 4 + 2 * (4 + 8) bytes.
        assert_eq!(u16_at(&m, at), 28);
        assert_eq!(u16_at(&m, at + 2), NBD_ATTR_SOCKETS | NLA_F_NESTED);
        for (i, fd) in [5u32, 9].into_iter().enumerate() {
            let item = at + 4 + i * 12;
            assert_eq!(u16_at(&m, item), 12);
            assert_eq!(u16_at(&m, item + 2), NBD_SOCK_ITEM | NLA_F_NESTED);
            assert_eq!(
                (u16_at(&m, item + 4), u16_at(&m, item + 6)),
                (8, NBD_SOCK_FD)
            );
            assert_eq!(u32_at(&m, item + 8), fd);
        }
        assert_eq!(at + 28, m.len());
        // And it parses back.
        let top: Vec<u16> = attrs(&m[20..]).map(|(t, _)| t).collect();
        assert_eq!(top, [2, 3, 4, 8, 5, 6, 7]);
    }

    #[test]
    fn disconnect_and_getfamily_messages() {
        let m = disconnect_message(0x20, 1, 3);
        assert_eq!(m.len(), 28);
        assert_eq!(&m[16..20], &[NBD_CMD_DISCONNECT, NBD_GENL_VERSION, 0, 0]);
        assert_eq!(
            (u16_at(&m, 20), u16_at(&m, 22), u32_at(&m, 24)),
            (8, NBD_ATTR_INDEX, 3)
        );
        // "nbd\0" is 4 + 4 bytes; the control family, its version 1.
        let g = getfamily_message(2, "nbd");
        assert_eq!(u16_at(&g, 4), GENL_ID_CTRL);
        assert_eq!(&g[16..18], &[CTRL_CMD_GETFAMILY, 1]);
        assert_eq!((u16_at(&g, 20), u16_at(&g, 22)), (8, CTRL_ATTR_FAMILY_NAME));
        assert_eq!(&g[24..28], b"nbd\0");
        // A name whose length is not a multiple of 4 is padded.
        let g = getfamily_message(2, "nlctrl");
        assert_eq!(u16_at(&g, 20), 11);
        assert_eq!(g.len(), 20 + 12);
    }

    /// The family lookup works against this machine's kernel (the control
    /// family always exists, `nbd` only with the module).
    #[test]
    fn resolves_a_family_and_detects_nbd() {
        let mut n = Netlink::open().expect("netlink socket");
        assert_eq!(n.family_id("nlctrl").expect("nlctrl"), GENL_ID_CTRL);
        let e = n.family_id("no-such-family").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        assert_eq!(
            available(),
            std::path::Path::new("/sys/module/nbd").exists(),
            "detection follows the module"
        );
    }
}

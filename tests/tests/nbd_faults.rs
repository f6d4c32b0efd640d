//! Bad input and faults: malformed handshakes and requests, out-of-range
//! I/O, writes to read-only exports, clients vanishing mid-write, a server
//! killed after a flush, 16 concurrent connections, and clients of a
//! volume deleted under them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use cdm_e2e::stamp;
use cdm_e2e::*;
use nbd_proto::codec::*;
use nbd_proto::{Client, ClientError, ClientOptions};

struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(srv: &NbdServer, flags: u32) -> Raw {
        let mut s = UnixStream::connect(&srv.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(
            u64::from_be_bytes(hello[0..8].try_into().unwrap()),
            NBDMAGIC
        );
        s.write_all(&flags.to_be_bytes()).unwrap();
        Raw { s }
    }
    fn opt(&mut self, opt: u32, data: &[u8]) {
        self.s.write_all(&encode_opt(opt, data)).unwrap();
    }
    /// (type, data) of the next option reply, or None at EOF.
    fn reply(&mut self) -> Option<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).ok()?;
        let (_, typ, len) = parse_opt_reply(&h).unwrap();
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).ok()?;
        Some((typ, d))
    }
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
    fn go(&mut self, export: &str) {
        self.opt(OPT_GO, &encode_info_request(export, &[]));
        loop {
            let (t, _) = self.reply().expect("GO reply");
            if t == REP_ACK {
                break;
            }
            assert!(t & 0x8000_0000 == 0, "GO refused: {t:#x}");
        }
    }
    fn request(&mut self, typ: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) {
        let q = Request {
            flags,
            typ,
            cookie: 42,
            offset,
            length: length as u64,
            payload: 0,
        };
        self.s.write_all(&encode_request(&q, false)).unwrap();
        self.s.write_all(payload).unwrap();
    }
    fn simple_reply(&mut self) -> u32 {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).unwrap();
        assert_eq!(
            u32::from_be_bytes(r[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        u32::from_be_bytes(r[4..8].try_into().unwrap())
    }
}

fn errno(r: Result<(), ClientError>) -> u32 {
    match r {
        Err(ClientError::Errno { errno, .. }) => errno,
        other => panic!("expected an NBD error, got {other:?}"),
    }
}

fn setup() -> (Env, NbdServer, u64) {
    let env = Env::new("1G");
    env.cdmfs(&["volume", "create", "db", "--size", "64M"]);
    let sid = env.cdmfs_json(&["snapshot", "create", "db"])["id"]
        .as_u64()
        .unwrap();
    let srv = env.serve(&[]);
    (env, srv, sid)
}

#[test]
fn malformed_handshakes() {
    let (_env, srv, _) = setup();
    // Unknown client flags: dropped.
    let mut r = Raw::connect(&srv, 0x80);
    assert!(r.closed());
    // Bad option magic: dropped.
    let mut r = Raw::connect(&srv, 3);
    r.s.write_all(&[0u8; 16]).unwrap();
    assert!(r.closed());
    // Unknown option: ERR_UNSUP, and negotiation goes on.
    let mut r = Raw::connect(&srv, 3);
    r.opt(99, b"junk");
    assert_eq!(r.reply().unwrap().0, REP_ERR_UNSUP);
    r.opt(OPT_STARTTLS, &[]);
    assert_eq!(r.reply().unwrap().0, REP_ERR_POLICY);
    r.opt(OPT_LIST, b"x");
    assert_eq!(r.reply().unwrap().0, REP_ERR_INVALID);
    r.opt(OPT_GO, &encode_info_request("nope", &[]));
    assert_eq!(r.reply().unwrap().0, REP_ERR_UNKNOWN);
    r.opt(OPT_GO, b"\x00\x00\x10\x00short");
    assert_eq!(r.reply().unwrap().0, REP_ERR_INVALID);
    r.opt(
        OPT_SET_META_CONTEXT,
        &encode_meta_request("db", &["base:allocation"]),
    );
    assert_eq!(
        r.reply().unwrap().0,
        REP_ERR_INVALID,
        "meta contexts need structured replies"
    );
    r.go("db");
    r.request(CMD_READ, 0, 0, 512, &[]);
    assert_eq!(r.simple_reply(), 0);
    // Oversized option: refused and dropped.
    let mut r = Raw::connect(&srv, 3);
    r.s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    r.s.write_all(&OPT_GO.to_be_bytes()).unwrap();
    r.s.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    assert_eq!(r.reply().unwrap().0, REP_ERR_TOO_BIG);
    assert!(r.closed());
    // EXPORT_NAME of an unknown export: hard disconnect (it cannot carry errors).
    let mut r = Raw::connect(&srv, 3);
    r.opt(OPT_EXPORT_NAME, b"nope");
    assert!(r.closed());
    srv.stop();
}

#[test]
fn malformed_requests() {
    let (_env, srv, sid) = setup();
    let ep = srv.endpoint();
    let mut c = Client::connect(&ep, Some("db"), &ClientOptions::default()).unwrap();
    let size = c.size;
    let mut buf = vec![0u8; 4096];
    assert_eq!(errno(c.read(size - 100, &mut buf)), EINVAL);
    assert_eq!(errno(c.write(size - 100, &buf, false)), ENOSPC);
    assert_eq!(errno(c.write_zeroes(size, 1, 0)), ENOSPC);
    assert_eq!(errno(c.trim(u64::MAX - 10, 100)), EINVAL);
    assert_eq!(errno(c.raw_request(99, 0, 0, 0, &[])), EINVAL);
    assert_eq!(errno(c.raw_request(CMD_READ, 0x4000, 0, 512, &[])), EINVAL);
    // Unknown flags on a WRITE (bit 15; PAYLOAD_LEN without extended
    // headers): EINVAL, the payload is skipped, nothing is written.
    for flags in [0x8000, CMD_FLAG_PAYLOAD_LEN, 0xffff] {
        let w = c.raw_request(CMD_WRITE, flags, 0, 4096, &[0xee; 4096]);
        assert_eq!(errno(w), EINVAL, "flags {flags:#x}");
        assert_eq!(errno(c.raw_request(CMD_READ, flags, 0, 512, &[])), EINVAL);
    }
    assert_eq!(errno(c.raw_request(CMD_READ, 0, 0, 64 << 20, &[])), EINVAL);
    // The connection still works.
    c.write(0, &[9u8; 4096], true).unwrap();
    c.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![9u8; 4096]);
    // Writes to a snapshot: EPERM; reads fine.
    let mut s =
        Client::connect(&ep, Some(&format!("db@{sid}")), &ClientOptions::default()).unwrap();
    assert!(s.read_only());
    assert_eq!(errno(s.write(0, &buf, false)), EPERM);
    assert_eq!(errno(s.trim(0, 4096)), EPERM);
    assert_eq!(errno(s.write_zeroes(0, 4096, 0)), EPERM);
    s.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0u8; 4096]);
    // BLOCK_STATUS without a negotiated context: EINVAL.
    let mut plain = Client::connect(
        &ep,
        Some("db"),
        &ClientOptions {
            allocation: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        errno(plain.raw_request(CMD_BLOCK_STATUS, 0, 0, 4096, &[])),
        EINVAL
    );
    // Extended headers: 64-bit effect lengths, structured errors.
    let mut x = Client::connect(
        &ep,
        Some("db"),
        &ClientOptions {
            extended: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(x.extended());
    let st = x.block_status(0, size).unwrap();
    assert_eq!(st.iter().map(|e| e.0).sum::<u64>(), size);
    assert_eq!(errno(x.read(size, &mut buf)), EINVAL);
    x.write(8192, &[3u8; 100], false).unwrap();
    // WRITE_ZEROES: without NO_HOLE the range becomes a hole; with NO_HOLE it
    // stays allocated (reads zero); FAST_ZERO with NO_HOLE fails fast.
    let b = 1u64 << 20;
    x.write(b, &vec![7u8; 4 << 16], true).unwrap();
    x.write_zeroes(b, 1 << 16, 0).unwrap();
    x.write_zeroes(b + (1 << 16), 1 << 16, CMD_FLAG_NO_HOLE)
        .unwrap();
    assert_eq!(
        errno(x.write_zeroes(
            b + (2 << 16),
            1 << 16,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        )),
        ENOTSUP
    );
    x.write_zeroes(b + (3 << 16), 1 << 16, CMD_FLAG_FAST_ZERO)
        .unwrap();
    let st = x.block_status(b, 4 << 16).unwrap();
    assert_eq!(
        st,
        vec![
            (1 << 16, STATE_HOLE | STATE_ZERO),
            (2 << 16, 0),
            (1 << 16, STATE_HOLE | STATE_ZERO)
        ],
        "hole, allocated zeros + untouched data, hole"
    );
    let mut z = vec![1u8; 2 << 16];
    x.read(b, &mut z).unwrap();
    assert!(z.iter().all(|&v| v == 0));
    let mut d = vec![0u8; 1 << 16];
    x.read(b + (2 << 16), &mut d).unwrap();
    assert!(d.iter().all(|&v| v == 7), "a failed FAST_ZERO changed data");
    // A write payload over the advertised maximum: the server hangs up.
    let mut r = Raw::connect(&srv, 3);
    r.go("db");
    r.request(CMD_WRITE, 0, 0, (32 << 20) + 1, &[]);
    assert!(r.closed());
    // Bad request magic: hang up.
    let mut r = Raw::connect(&srv, 3);
    r.go("db");
    r.s.write_all(&[0xffu8; 28]).unwrap();
    assert!(r.closed());
    // Everything else kept working.
    c.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![9u8; 4096]);
    srv.stop();
}

#[test]
fn vanishing_client_and_killed_server_lose_nothing_flushed() {
    let (env, srv, _) = setup();
    let ep = srv.endpoint();
    let mut c = Client::connect(&ep, Some("db"), &ClientOptions::default()).unwrap();
    let data = random_bytes(8 << 20, 7);
    c.write(1 << 20, &data, false).unwrap();
    c.flush().unwrap();
    // A client that vanishes in the middle of a write payload.
    let mut r = Raw::connect(&srv, 3);
    r.go("db");
    r.request(CMD_WRITE, 0, 1 << 20, 1 << 20, &[0xee; 1000]);
    drop(r);
    // Another connection is unaffected and sees the flushed data.
    let mut buf = vec![0u8; 8 << 20];
    let mut d = Client::connect(&ep, Some("db"), &ClientOptions::default()).unwrap();
    d.read(1 << 20, &mut buf).unwrap();
    assert!(buf == data);
    // Unflushed writes, then the server is killed (SIGKILL, no commit).
    c.write(0, &[0x55; 65536], false).unwrap();
    srv.kill();
    assert!(env.cdmfs(&["fsck"]).contains("clean"));
    let srv = env.serve(&[]);
    let mut c = Client::connect(&srv.endpoint(), Some("db"), &ClientOptions::default()).unwrap();
    c.read(1 << 20, &mut buf).unwrap();
    assert!(buf == data, "flushed data lost after a kill");
    srv.stop();
}

#[test]
fn sixteen_concurrent_connections_then_full_verification() {
    require("nbdcopy");
    let (env, srv, _) = setup();
    let ep = srv.endpoint();
    let region = 4u64 << 20;
    let deadline = Instant::now() + Duration::from_secs(6);
    let handles: Vec<_> = (0..16u64)
        .map(|t| {
            let ep = ep.clone();
            std::thread::spawn(move || {
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let opts = ClientOptions {
                    extended: t % 2 == 0,
                    ..Default::default()
                };
                let mut c = Client::connect(&ep, Some("db"), &opts).unwrap();
                let base = t * region;
                let mut model = vec![0u8; region as usize];
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    let off = rng.gen_range(0..region - 1);
                    let len = rng.gen_range(1..(region - off).min(300_000));
                    match rng.gen_range(0..10) {
                        0..=4 => {
                            // Every byte tied to its place and this write:
                            // a read from elsewhere cannot match the model.
                            let d = stamp::unaligned(t, base + off, len as usize, ops);
                            c.write(base + off, &d, rng.gen_bool(0.1)).unwrap();
                            model[off as usize..(off + len) as usize].copy_from_slice(&d);
                        }
                        5 => {
                            c.write_zeroes(base + off, len, 0).unwrap();
                            model[off as usize..(off + len) as usize].fill(0);
                        }
                        6 => c.flush().unwrap(),
                        _ => {
                            let mut b = vec![0u8; len as usize];
                            c.read(base + off, &mut b).unwrap();
                            assert!(
                                b == model[off as usize..(off + len) as usize],
                                "thread {t}: read differs"
                            );
                        }
                    }
                    ops += 1;
                }
                c.flush().unwrap();
                (model, ops)
            })
        })
        .collect();
    let mut whole = Vec::new();
    let mut total = 0;
    for h in handles {
        let (m, ops) = h.join().unwrap();
        whole.extend_from_slice(&m);
        total += ops;
    }
    assert!(total > 16 * 10, "only {total} operations ran");
    // Multi-conn consistency: a write flushed on one connection is read on another.
    let mut a = Client::connect(&ep, Some("db"), &ClientOptions::default()).unwrap();
    let mut b = Client::connect(&ep, Some("db"), &ClientOptions::default()).unwrap();
    a.write(0, b"multi-conn", false).unwrap();
    a.flush().unwrap();
    let mut got = [0u8; 10];
    b.read(0, &mut got).unwrap();
    assert_eq!(&got, b"multi-conn");
    a.write(0, &whole[..10], true).unwrap();
    // Full verification with an independent client.
    let out = env.path("all.raw");
    run(Command::new("nbdcopy").args([&srv.unix_uri("db"), out.to_str().unwrap()]));
    assert!(
        std::fs::read(&out).unwrap() == whole,
        "contents after concurrent load differ"
    );
    srv.stop();
    assert!(env.cdmfs(&["fsck"]).contains("clean"));
}

/// Whether a request on `c` fails because the connection is gone (not with
/// an NBD error on a live connection).
fn hung_up(c: &mut Client) -> bool {
    matches!(
        c.read(0, &mut [0u8; 512]),
        Err(ClientError::Io(_) | ClientError::Proto(_))
    )
}

#[test]
fn force_deleting_a_volume_disconnects_its_clients() {
    let a = Appliance::start(None);
    let api = Api::new(&a, &a.admin_token());
    let vol = serde_json::json!({"name": "doomed", "size": 64 << 20});
    api.expect(201, "POST", "/v1/volumes", Some(vol));
    let sid = api.expect(
        201,
        "POST",
        "/v1/volumes/doomed/snapshots",
        Some(serde_json::json!({})),
    )["id"]
        .as_u64()
        .unwrap();
    let ep = format!("unix:{}", a.sock.display());
    let opts = ClientOptions::default();
    let mut idle = Client::connect(&ep, Some("doomed"), &opts).unwrap();
    idle.write(0, &[5u8; 4096], true).unwrap();
    let mut snap = Client::connect(&ep, Some(&format!("doomed@{sid}")), &opts).unwrap();
    // A client that keeps reading until the server ends its connection.
    let mut busy = Client::connect(&ep, Some("doomed"), &opts).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match busy.read(0, &mut buf) {
                Ok(()) => {}
                Err(ClientError::Errno { errno, .. }) => assert_eq!(errno, ESHUTDOWN),
                Err(_) => return true,
            }
        }
        false
    });
    api.expect(409, "DELETE", "/v1/volumes/doomed", None);
    let before = a.log().lines().count();
    api.expect(204, "DELETE", "/v1/volumes/doomed?force=true", None);
    // The idle clients' next requests fail: their connections were closed.
    assert!(hung_up(&mut idle), "volume client still connected");
    assert!(hung_up(&mut snap), "snapshot client still connected");
    assert!(reader.join().unwrap(), "busy client never disconnected");
    let metrics = || http(&a.url(), "GET", "/metrics", Some(&a.admin_token()), None).1;
    wait_for(30, "no NBD clients", || {
        let m = metrics();
        (!m.as_str().unwrap_or("").contains("cdm_nbd_clients{")).then_some(())
    });
    // A line per connection at most, not one per request.
    let log = a.log();
    let new: Vec<&str> = log.lines().skip(before).collect();
    let about = new
        .iter()
        .filter(|l| l.contains("request failed") || l.contains("export deleted"))
        .count();
    assert!(
        about <= 6,
        "{about} log lines about the deleted export:\n{log}"
    );
    assert!(
        new.len() <= 30,
        "{} log lines after the delete:\n{log}",
        new.len()
    );
}

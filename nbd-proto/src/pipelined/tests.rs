//! The pipelined client against a scripted server: the server decides
//! when and in which order replies go, so pipelining, out-of-order
//! replies, flush ordering and dropped connections are checked
//! deterministically (a synchronous client would never get the second
//! request to the server, and the scripts would fail).

use super::*;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::thread;

/// A socket path of its own for each test.
fn sock_path() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "nbd-pipelined-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&p);
    p
}

/// The server side of one connection after the handshake.
struct Peer {
    s: UnixStream,
}

impl Peer {
    /// Accepts a connection and answers the handshake: structured replies
    /// if `structured`, export of `size` bytes with `flags`.
    fn accept(l: &UnixListener, size: u64, flags: u16, structured: bool) -> Peer {
        let (mut s, _) = l.accept().expect("accept");
        let mut hello = Vec::new();
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).expect("hello");
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).expect("client flags");
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).expect("option");
            let o = parse_opt_header(&h).expect("option header");
            let mut d = vec![0u8; o.length as usize];
            s.read_exact(&mut d).expect("option data");
            match o.option {
                OPT_STRUCTURED_REPLY if structured => s
                    .write_all(&encode_opt_reply(o.option, REP_ACK, &[]))
                    .unwrap(),
                OPT_GO => {
                    let info = info_export(size, flags | TF_HAS_FLAGS | TF_SEND_FLUSH);
                    s.write_all(&encode_opt_reply(OPT_GO, REP_INFO, &info))
                        .unwrap();
                    s.write_all(&encode_opt_reply(OPT_GO, REP_ACK, &[]))
                        .unwrap();
                    return Peer { s };
                }
                other => s
                    .write_all(&encode_opt_reply(other, REP_ERR_UNSUP, &[]))
                    .unwrap(),
            }
        }
    }

    /// The next request and its payload.
    fn request(&mut self) -> (Request, Vec<u8>) {
        let mut h = [0u8; 28];
        self.s.read_exact(&mut h).expect("request");
        let q = parse_request(&h, false).expect("request header");
        let mut p = vec![0u8; q.payload as usize];
        self.s.read_exact(&mut p).expect("payload");
        (q, p)
    }

    fn simple(&mut self, q: &Request, error: u32, data: &[u8]) {
        self.s.write_all(&simple_reply(error, q.cookie)).unwrap();
        self.s.write_all(data).unwrap();
    }

    fn chunk(&mut self, q: &Request, flags: u16, typ: u16, payload: &[u8]) {
        let h = chunk_header(false, flags, typ, q.cookie, 0, payload.len() as u64);
        self.s.write_all(&h).unwrap();
        self.s.write_all(payload).unwrap();
    }
}

fn connect(p: &std::path::Path, n: usize, timeout: Option<Duration>) -> Pipelined {
    let opts = ClientOptions {
        timeout,
        ..Default::default()
    };
    Pipelined::connect(&format!("unix:{}", p.display()), Some(""), &opts, n).expect("connect")
}

/// Eight reads are all at the server before it answers any, and it
/// answers them in reverse order: each caller gets its own data.
#[test]
fn many_in_flight_answered_out_of_order() {
    let path = sock_path();
    let l = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l, 1 << 20, 0, false);
        let qs: Vec<_> = (0..8).map(|_| p.request().0).collect();
        for q in qs.iter().rev() {
            assert_eq!(q.typ, CMD_READ);
            let fill = (q.offset / 4096) as u8;
            p.simple(q, 0, &vec![fill; q.length as usize]);
        }
        p
    });
    let c = Arc::new(connect(&path, 4, None));
    // No CAN_MULTI_CONN: one connection, pipelined.
    assert_eq!(c.connections(), 1);
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let c = c.clone();
            thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                c.read(i * 4096, &mut b).map(|_| b)
            })
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let b = r.join().unwrap().expect("read");
        assert!(
            b.iter().all(|&x| x == i as u8),
            "read {i} got another's data"
        );
    }
    let _peer = server.join().unwrap();
}

/// Structured replies: data and hole chunks out of order and an error
/// chunk; the error fails only its request, the connection goes on.
#[test]
fn structured_chunks_and_errors() {
    let path = sock_path();
    let l = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l, 1 << 20, 0, true);
        let (a, _) = p.request();
        let (b, _) = p.request();
        // b fails; a arrives as its second half, a hole, then the first.
        p.chunk(&b, 0, REPLY_TYPE_ERROR, &error_payload(ENOSPC, "full"));
        p.chunk(&b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
        let mut d = (a.offset + 2048).to_be_bytes().to_vec();
        d.extend_from_slice(&[7u8; 2048]);
        p.chunk(&a, 0, REPLY_TYPE_OFFSET_DATA, &d);
        let mut h = a.offset.to_be_bytes().to_vec();
        h.extend_from_slice(&1024u32.to_be_bytes());
        p.chunk(&a, 0, REPLY_TYPE_OFFSET_HOLE, &h);
        let mut d = (a.offset + 1024).to_be_bytes().to_vec();
        d.extend_from_slice(&[5u8; 1024]);
        p.chunk(&a, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &d);
        let (f, _) = p.request();
        assert_eq!(f.typ, CMD_FLUSH);
        p.chunk(&f, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
        p
    });
    let c = Arc::new(connect(&path, 1, None));
    let c2 = c.clone();
    let reader = thread::spawn(move || {
        let mut b = vec![9u8; 4096];
        c2.read(8192, &mut b).map(|_| b)
    });
    // The read is at the server before the write goes.
    wait_pending(&c, 1);
    let e = c.write(0, &[1u8; 512], false).unwrap_err();
    assert!(
        matches!(&e, ClientError::Errno { errno: ENOSPC, msg } if msg == "full"),
        "{e}"
    );
    let b = reader.join().unwrap().expect("read");
    assert!(b[..1024].iter().all(|&x| x == 0));
    assert!(b[1024..2048].iter().all(|&x| x == 5));
    assert!(b[2048..].iter().all(|&x| x == 7));
    c.flush().expect("the connection still works");
    let _peer = server.join().unwrap();
}

/// Waits until `n` requests are in flight on the first connection.
fn wait_pending(c: &Pipelined, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock(&c.conns[0].state).pending.len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} requests never got in flight"
        );
        thread::yield_now();
    }
}

/// A flush waits for the writes issued before it, on every connection:
/// the server must not see FLUSH while a write is unanswered.
#[test]
fn flush_waits_for_earlier_writes_on_all_connections() {
    let path = sock_path();
    let l = UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let mut a = Peer::accept(&l, 1 << 20, TF_CAN_MULTI_CONN, false);
        let mut b = Peer::accept(&l, 1 << 20, TF_CAN_MULTI_CONN, false);
        // The write comes on the first connection (round robin).
        let (w, data) = a.request();
        assert_eq!((w.typ, data.len()), (CMD_WRITE, 4096));
        // Let the client issue its flush now, and check the flush does not
        // arrive on either connection while the write is unanswered.
        tx.send(()).unwrap();
        for p in [&mut a, &mut b] {
            p.s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut x = [0u8; 1];
            let r = p.s.read(&mut x);
            assert!(
                matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
                "a request arrived before the write was answered: {r:?}"
            );
            p.s.set_read_timeout(None).unwrap();
        }
        a.simple(&w, 0, &[]);
        let (f, _) = b.request();
        assert_eq!(f.typ, CMD_FLUSH);
        b.simple(&f, 0, &[]);
        (a, b)
    });
    let c = Arc::new(connect(&path, 2, None));
    assert_eq!(c.connections(), 2);
    let c2 = c.clone();
    let writer = thread::spawn(move || c2.write(0, &[3u8; 4096], false));
    rx.recv().unwrap();
    c.flush().expect("flush");
    writer.join().unwrap().expect("write");
    let _peers = server.join().unwrap();
}

/// The server drops the connection with requests in flight: every one
/// fails with Disconnected, and so does every later one; nothing hangs.
#[test]
fn dropped_connection_fails_everything_in_flight() {
    let path = sock_path();
    let l = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l, 1 << 20, 0, false);
        for _ in 0..6 {
            p.request();
        }
        // Gone without a word.
        drop(p);
    });
    let c = Arc::new(connect(&path, 1, None));
    let calls: Vec<_> = (0..6u64)
        .map(|i| {
            let c = c.clone();
            thread::spawn(move || {
                if i % 2 == 0 {
                    c.write(i * 4096, &[1u8; 4096], false)
                } else {
                    c.read(i * 4096, &mut [0u8; 4096])
                }
            })
        })
        .collect();
    for t in calls {
        let e = t.join().unwrap().unwrap_err();
        assert!(matches!(e, ClientError::Disconnected(_)), "{e}");
        assert!(e.to_string().contains("connection lost"), "{e}");
    }
    server.join().unwrap();
    let e = c.flush().unwrap_err();
    assert!(matches!(e, ClientError::Disconnected(_)), "{e}");
}

/// A server that takes a request and never answers: with a timeout the
/// request fails (Disconnected) instead of waiting forever.
#[test]
fn unanswered_request_times_out() {
    let path = sock_path();
    let l = UnixListener::bind(&path).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l, 1 << 20, 0, false);
        p.request();
        // Holds the connection open until the client gave up.
        let _ = done_rx.recv();
        p
    });
    let c = connect(&path, 1, Some(Duration::from_millis(200)));
    let e = c.read(0, &mut [0u8; 512]).unwrap_err();
    assert!(
        matches!(&e, ClientError::Disconnected(m) if m.contains("no reply")),
        "{e}"
    );
    done_tx.send(()).unwrap();
    let _peer = server.join().unwrap();
}

/// A reply for a request nobody sent is a broken stream: the request in
/// flight fails, clearly.
#[test]
fn reply_for_unknown_cookie_breaks_the_connection() {
    let path = sock_path();
    let l = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l, 1 << 20, 0, false);
        let (q, _) = p.request();
        let bogus = Request {
            cookie: q.cookie + 1000,
            ..q
        };
        p.simple(&bogus, 0, &[]);
        p
    });
    let c = connect(&path, 1, None);
    let e = c.flush().unwrap_err();
    assert!(
        matches!(&e, ClientError::Disconnected(m) if m.contains("unknown request")),
        "{e}"
    );
    let _peer = server.join().unwrap();
}

/// Requests started without blocking: callbacks get their answers out of
/// order on the reader thread; a flush waits for a started write; a
/// dropped connection answers the rest with Disconnected.
#[test]
fn started_requests_answer_their_callbacks() {
    let path = sock_path();
    let l = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l, 1 << 20, 0, false);
        let qs: Vec<_> = (0..4).map(|_| p.request()).collect();
        // Reads 1 and 2 answered in reverse; the write (first) after them.
        p.simple(&qs[2].0, 0, &[2u8; 512]);
        p.simple(&qs[1].0, 0, &[1u8; 512]);
        assert_eq!((qs[0].0.typ, qs[0].1.len()), (CMD_WRITE, 512));
        p.simple(&qs[0].0, 0, &[]);
        // The flush comes only now, after the write was answered.
        let (f, _) = p.request();
        assert_eq!(f.typ, CMD_FLUSH);
        p.simple(&f, 0, &[]);
        // The fourth request (a read) is never answered: the connection
        // drops.
        assert_eq!(qs[3].0.typ, CMD_READ);
    });
    let c = Arc::new(connect(&path, 1, None));
    let (tx, rx) = std::sync::mpsc::channel::<(u64, Result<Vec<u8>>)>();
    let t = tx.clone();
    c.start_write(0, &[9u8; 512], false, move |r| {
        t.send((0, r.map(|_| Vec::new()))).unwrap()
    });
    for i in 1..=3u64 {
        let t = tx.clone();
        c.start_read(i * 512, 512, move |r| t.send((i, r)).unwrap());
    }
    // Everything is in flight before anything is answered.
    c.flush().expect("flush");
    let mut got: Vec<(u64, Result<Vec<u8>>)> = (0..3).map(|_| rx.recv().unwrap()).collect();
    got.sort_by_key(|(i, _)| *i);
    assert!(got[0].1.is_ok());
    assert_eq!(got[1].1.as_ref().unwrap(), &vec![1u8; 512]);
    assert_eq!(got[2].1.as_ref().unwrap(), &vec![2u8; 512]);
    server.join().unwrap();
    let (i, r) = rx.recv().unwrap();
    assert_eq!(i, 3);
    assert!(matches!(r, Err(ClientError::Disconnected(_))), "{r:?}");
}

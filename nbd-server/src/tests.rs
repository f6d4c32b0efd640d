//! The real server over a unix socket, serving in-memory exports, driven by
//! the `nbd_proto` client: every command through handshake, transmission
//! and the [`Export`](crate::Export) interface, without an engine.

use std::sync::Arc;

use nbd_proto::codec::*;
use nbd_proto::{Client, ClientError, ClientOptions};

use crate::export::mem::{MemCatalog, MemExport};
use crate::{Listener, Server, ServerConfig};

const SIZE: u64 = 1 << 20;

struct Fixture {
    server: Arc<Server>,
    catalog: Arc<MemCatalog>,
    disk: Arc<MemExport>,
    endpoint: String,
    _dir: tempfile::TempDir,
}

fn serve() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Arc::new(MemCatalog::new());
    let disk = catalog.insert("m", MemExport::new(SIZE));
    catalog.insert("ro", MemExport::read_only(SIZE));
    let server = Server::with_catalog(catalog.clone(), ServerConfig::default());
    let endpoint = format!("unix:{}", dir.path().join("nbd.sock").display());
    let l = Listener::bind(&endpoint).unwrap();
    let s = server.clone();
    std::thread::spawn(move || s.serve(l));
    Fixture {
        server,
        catalog,
        disk,
        endpoint,
        _dir: dir,
    }
}

fn connect(f: &Fixture, export: &str, extended: bool) -> Client {
    let opts = ClientOptions {
        extended,
        ..ClientOptions::default()
    };
    Client::connect(&f.endpoint, Some(export), &opts).unwrap()
}

fn errno(r: Result<(), ClientError>) -> u32 {
    match r {
        Err(ClientError::Errno { errno, .. }) => errno,
        other => panic!("expected an NBD error, got {other:?}"),
    }
}

fn round_trip(extended: bool) {
    let f = serve();
    let mut c = connect(&f, "m", extended);
    assert_eq!(c.size, SIZE);
    assert!(!c.read_only());
    assert_eq!(c.extended(), extended);
    assert_ne!(c.flags & TF_CAN_MULTI_CONN, 0);
    assert_ne!(c.flags & TF_SEND_TRIM, 0);
    assert_eq!(c.block_sizes, (1, 4096, MAX_PAYLOAD));

    // Write three blocks (FUA on one), read them back, see them allocated.
    let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
    c.write(4096, &data[..8192], false).unwrap();
    c.write(12288, &data[8192..], true).unwrap();
    let mut back = vec![0u8; data.len() + 8192];
    c.read(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..4096 + data.len()], &data[..]);
    assert!(back[4096 + data.len()..].iter().all(|&b| b == 0));
    assert_eq!(
        c.block_status(0, SIZE).unwrap(),
        vec![
            (4096, STATE_HOLE | STATE_ZERO),
            (12288, 0),
            (SIZE - 16384, STATE_HOLE | STATE_ZERO)
        ]
    );
    assert_eq!(f.disk.allocated_bytes(), 12288);
    c.flush().unwrap();

    // Trim a block: a hole again, reading as zeroes.
    c.trim(4096, 4096).unwrap();
    assert_eq!(
        c.block_status(0, 16384).unwrap(),
        vec![(8192, STATE_HOLE | STATE_ZERO), (8192, 0)]
    );
    // Zero part of a block (stays allocated), then a whole one with NO_HOLE.
    c.write_zeroes(8192, 100, 0).unwrap();
    c.write_zeroes(40960, 4096, CMD_FLAG_NO_HOLE).unwrap();
    let mut b = vec![1u8; 8192];
    c.read(4096, &mut b).unwrap();
    assert!(b[..4096 + 100].iter().all(|&x| x == 0));
    assert_eq!(&b[4096 + 100..], &data[4096 + 100..8192]);
    assert_eq!(f.disk.allocated_bytes(), 3 * 4096);

    // Another connection sees the same data (CAN_MULTI_CONN).
    let mut c2 = connect(&f, "m", !extended);
    let mut b2 = vec![0u8; 4096];
    c2.read(12288, &mut b2).unwrap();
    assert_eq!(&b2[..], &data[8192..]);
    c2.disconnect().unwrap();

    // What the server refuses before the export sees it.
    assert_eq!(errno(c.read(SIZE - 10, &mut [0u8; 20])), EINVAL);
    assert_eq!(errno(c.write(SIZE - 10, &[0u8; 20], false)), ENOSPC);
    assert_eq!(errno(c.raw_request(99, 0, 0, 0, &[])), EINVAL);
    let mut ro = connect(&f, "ro", extended);
    assert!(ro.read_only());
    assert_eq!(errno(ro.write(0, &[1u8; 512], false)), EPERM);
    assert_eq!(errno(ro.trim(0, 4096)), EPERM);
    c.disconnect().unwrap();
    ro.disconnect().unwrap();

    // Connections counted their requests per export.
    let stats = f.server.io_stats();
    assert_eq!(
        stats.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["m", "ro"]
    );
    f.server.shutdown();
}

#[test]
fn mem_export_round_trip_structured() {
    round_trip(false);
}

#[test]
fn mem_export_round_trip_extended() {
    round_trip(true);
}

#[test]
fn list_and_unknown_exports() {
    let f = serve();
    assert_eq!(Client::list(&f.endpoint).unwrap(), ["m", "ro"]);
    let e = Client::connect(&f.endpoint, Some("nope"), &ClientOptions::default());
    assert!(matches!(e, Err(ClientError::Refused { code, .. }) if code == REP_ERR_UNKNOWN));
    f.server.shutdown();
}

#[test]
fn unknown_flags_get_einval_and_the_connection_goes_on() {
    let f = serve();
    for extended in [false, true] {
        let mut c = connect(&f, "m", extended);
        c.write(0, &[1u8; 512], false).unwrap();
        // Bit 15 is defined for no command.
        assert_eq!(errno(c.raw_request(CMD_READ, 0x8000, 0, 512, &[])), EINVAL);
        // A WRITE's payload is read and dropped: the next request parses.
        let w = c.raw_request(CMD_WRITE, 0x8000, 0, 512, &[9u8; 512]);
        assert_eq!(errno(w), EINVAL);
        if !extended {
            // PAYLOAD_LEN is unknown without extended headers.
            let r = c.raw_request(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 512, &[]);
            assert_eq!(errno(r), EINVAL);
            let w = c.raw_request(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512, &[9u8; 512]);
            assert_eq!(errno(w), EINVAL);
        }
        // Nothing refused was written, and the connection still serves.
        let mut b = vec![0u8; 512];
        c.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 1), "extended={extended}");
        c.write(512, &[2u8; 512], false).unwrap();
        c.disconnect().unwrap();
    }
    f.server.shutdown();
}

/// Waits (up to 10 s) for the server to have no client on any export.
fn wait_no_clients(f: &Fixture) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f.server.clients().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "client still connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_client_of_a_deleted_export_is_disconnected() {
    let f = serve();
    for extended in [false, true] {
        f.catalog.insert("gone", MemExport::new(SIZE));
        let mut c = connect(&f, "gone", extended);
        c.write(0, &[1u8; 512], false).unwrap();
        f.catalog.remove("gone");
        // The request that finds the export gone fails; the server hangs up.
        assert_eq!(errno(c.write(0, &[1u8; 512], false)), ESHUTDOWN);
        wait_no_clients(&f);
        assert!(c.read(0, &mut [0u8; 512]).is_err());
    }
    f.server.shutdown();
}

#[test]
fn disconnect_export_ends_idle_clients_of_it_and_its_snapshots() {
    let f = serve();
    f.catalog.insert("v", MemExport::new(SIZE));
    f.catalog.insert("v@1", MemExport::read_only(SIZE));
    let mut keep = connect(&f, "m", false);
    let mut idle = connect(&f, "v", false);
    let mut snap = connect(&f, "v@1", true);
    assert_eq!(f.server.disconnect_export("v"), 2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while f.server.clients().len() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "clients still connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(idle.read(0, &mut [0u8; 512]).is_err());
    assert!(snap.read(0, &mut [0u8; 512]).is_err());
    // Other exports' clients are untouched.
    keep.read(0, &mut [0u8; 512]).unwrap();
    keep.disconnect().unwrap();
    f.server.shutdown();
}

/// A reader that counts its `read` calls (each one a system call on a socket).
struct CountingReader<R> {
    inner: R,
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.read(buf)
    }
}

#[test]
fn pipelined_requests_are_read_in_few_calls() {
    use crate::export::Export;
    let catalog = Arc::new(MemCatalog::new());
    let disk = catalog.insert("m", MemExport::new(SIZE));
    let server = Server::with_catalog(catalog, ServerConfig::default());
    // What a pipelining client sends at once: the handshake (EXPORT_NAME),
    // 128 writes of 4 KiB back to back, then a disconnect.
    let mut input = (C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes().to_vec();
    input.extend_from_slice(&encode_opt(OPT_EXPORT_NAME, b"m"));
    let n = 128u64;
    for i in 0..n {
        let req = Request {
            flags: 0,
            typ: CMD_WRITE,
            cookie: i,
            offset: i * 4096,
            length: 4096,
            payload: 4096,
        };
        input.extend_from_slice(&encode_request(&req, false));
        input.extend(std::iter::repeat_n(i as u8 + 1, 4096));
    }
    let disc = Request {
        flags: 0,
        typ: CMD_DISC,
        cookie: n,
        offset: 0,
        length: 0,
        payload: 0,
    };
    input.extend_from_slice(&encode_request(&disc, false));
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = CountingReader {
        inner: std::io::Cursor::new(input),
        reads: reads.clone(),
    };
    server
        .handle(Box::new(r), Box::new(std::io::sink()), "test")
        .unwrap();
    // Every write arrived...
    for i in 0..n {
        let mut b = [0u8; 4096];
        disk.read(i * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1), "block {i}");
    }
    // ...in far fewer reads than two per request (header, then payload),
    // which is what an unbuffered reader makes: a handful for the
    // handshake, then one per buffer's worth of requests.
    let calls = reads.load(std::sync::atomic::Ordering::Relaxed);
    assert!(calls < 16, "{calls} read calls for {n} requests");
}

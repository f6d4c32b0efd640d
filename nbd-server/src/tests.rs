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
    disk: Arc<MemExport>,
    endpoint: String,
    _dir: tempfile::TempDir,
}

fn serve() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let catalog = MemCatalog::new();
    let disk = catalog.insert("m", MemExport::new(SIZE));
    catalog.insert("ro", MemExport::read_only(SIZE));
    let server = Server::with_catalog(Arc::new(catalog), ServerConfig::default());
    let endpoint = format!("unix:{}", dir.path().join("nbd.sock").display());
    let l = Listener::bind(&endpoint).unwrap();
    let s = server.clone();
    std::thread::spawn(move || s.serve(l));
    Fixture {
        server,
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

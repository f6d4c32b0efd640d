//! A whole NBD server session (handshake, option haggling, transmission)
//! over a small in-memory pool; the input is everything the client sends.
//!
//! If the first input byte is odd, it selects a canned valid handshake that
//! is sent before the rest of the input, so the fuzzer reaches the
//! transmission phase at once:
//!   client flags FIXED_NEWSTYLE|NO_ZEROES, then
//!   bit 1 clear: NBD_OPT_STRUCTURED_REPLY; set: NBD_OPT_EXTENDED_HEADERS
//!   bit 2 set:   NBD_OPT_SET_META_CONTEXT base:allocation (block status)
//!   bit 3 set:   export the snapshot "v@<id>" (read-only) instead of "v"
//!   then NBD_OPT_GO for that export.
//! Otherwise the raw input is the whole conversation.
//!
//! After the session the pool is flushed and must pass fsck: no sequence of
//! client requests may leave it inconsistent.
#![no_main]

use std::cell::RefCell;
use std::io::{self, Cursor};
use std::sync::{Arc, OnceLock};

use cdmfs::{BlockDev, FormatOptions, MemDev, OpenOptions, Pool};
use libfuzzer_sys::fuzz_target;
use nbd_proto::codec::{
    encode_info_request, encode_meta_request, encode_opt, BASE_ALLOCATION, C_FIXED_NEWSTYLE,
    C_NO_ZEROES, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_NAME, OPT_EXTENDED_HEADERS, OPT_GO,
    OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
};
use nbd_server::{Server, ServerConfig};

const POOL_BYTES: usize = 8 << 20;
const VOLUME_BYTES: u64 = 1 << 20;
const MAX_INPUT: usize = 64 << 10;

struct Fixture {
    image: Vec<u8>,
    snapshot_export: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dev = Arc::new(MemDev::new(POOL_BYTES));
        Pool::format(&*dev, &FormatOptions::default()).expect("format");
        let pool =
            Pool::open(dev.clone() as Arc<dyn BlockDev>, &OpenOptions::default()).expect("open");
        let v = pool
            .create_volume("v", VOLUME_BYTES, 4096)
            .expect("create volume");
        // Some mapped data, some holes, a run spanning several blocks.
        for (i, off) in [0u64, 4096, 12288, 65536, 300_000, VOLUME_BYTES - 4096]
            .into_iter()
            .enumerate()
        {
            let data = vec![0x41 + i as u8; 5000.min((VOLUME_BYTES - off) as usize)];
            pool.write(v.id, off, &data).expect("write");
        }
        let snap = pool
            .create_snapshot("v", "s", serde_json::json!({"fuzz": true}))
            .expect("snapshot");
        pool.write(v.id, 8192, &[0x5a; 4096])
            .expect("write after snapshot");
        pool.close().expect("close");
        Fixture {
            image: dev.image(),
            snapshot_export: format!("v@{}", snap.id),
        }
    })
}

thread_local! {
    /// The previous run's device buffer, reused: allocating and faulting in
    /// a fresh 8 MiB buffer per run costs more than the whole session.
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A copy of `image` in a recycled buffer.
fn fresh_image(image: &[u8]) -> Vec<u8> {
    let mut v = SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if v.len() == image.len() {
        v.copy_from_slice(image);
        v
    } else {
        image.to_vec()
    }
}

fn recycle(dev: &MemDev) {
    let v = dev.with_bytes(std::mem::take);
    SPARE.with(|s| *s.borrow_mut() = v);
}

fn canned_prefix(mode: u8, snapshot_export: &str) -> Vec<u8> {
    let export = if mode & 8 != 0 { snapshot_export } else { "v" };
    let mut b = (C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes().to_vec();
    if mode & 2 != 0 {
        b.extend(encode_opt(OPT_EXTENDED_HEADERS, &[]));
    } else {
        b.extend(encode_opt(OPT_STRUCTURED_REPLY, &[]));
    }
    if mode & 4 != 0 {
        b.extend(encode_opt(
            OPT_SET_META_CONTEXT,
            &encode_meta_request(export, &[BASE_ALLOCATION]),
        ));
    }
    b.extend(encode_opt(
        OPT_GO,
        &encode_info_request(export, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    ));
    b
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let f = fixture();
    let input = match data.first() {
        Some(&mode) if mode & 1 != 0 => {
            let mut b = canned_prefix(mode, &f.snapshot_export);
            b.extend_from_slice(&data[1..]);
            b
        }
        _ => data.to_vec(),
    };

    let dev = Arc::new(MemDev::from_image(fresh_image(&f.image)));
    let pool = Arc::new(
        Pool::open(dev.clone() as Arc<dyn BlockDev>, &OpenOptions::default())
            .expect("open fixture pool"),
    );
    let server = Server::new(
        pool.clone(),
        ServerConfig {
            workers: 0,
            default_export: Some("v".into()),
            ..Default::default()
        },
    );
    let _ = server.handle(Box::new(Cursor::new(input)), Box::new(io::sink()), "fuzz");
    drop(server);

    pool.flush().expect("flush after session");
    let report = pool.fsck().expect("fsck after session");
    assert!(
        report.is_clean(),
        "pool inconsistent after an NBD session: {:?}",
        report.errors
    );
    drop(pool);
    recycle(&dev);
});

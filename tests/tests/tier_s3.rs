//! The object-storage tier's store side (`cdm-tier`) against a real S3
//! server on loopback (`s3s-fs`, see tests/src/s3.rs): objects, errors,
//! an outage, the read cache, read-ahead, GC and the limits.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cdm_e2e::s3::{flip_object_byte, read_object, FlipProxy, S3Server};
use cdm_e2e::wait_for;
use cdm_tier::cache::CacheConfig;
use cdm_tier::{
    gc, pack_key, Op, PackCache, S3Config, S3Store, TierError, TierMetrics, TierReader,
};

const KIB: u64 = 1024;

fn config(s: &S3Server) -> S3Config {
    let mut c = s.config();
    // A three-node cluster sharing two loaded cores (scripts/test-s3-garage)
    // takes more than 5 s over one DeleteObjects of 1,000 keys.
    c.timeout = Duration::from_secs(if s.is_external() { 60 } else { 5 });
    c.retries = 2;
    c
}

fn store(s: &S3Server) -> Arc<S3Store> {
    Arc::new(S3Store::new(config(s)).expect("store"))
}

/// Bytes that say where they are: a pack's bytes differ by pack and by
/// offset, so a chunk served for the wrong place never matches.
fn pack_bytes(pack: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 / 7) ^ (i as u64 * 31) ^ (pack * 131)) as u8)
        .collect()
}

fn n(c: &AtomicU64) -> u64 {
    TierMetrics::get(c)
}

fn reader(
    store: &Arc<S3Store>,
    dir: &std::path::Path,
    chunk: u64,
    budget: u64,
    readahead: u32,
) -> TierReader {
    let mut cfg = CacheConfig::new(dir, budget);
    cfg.chunk_size = chunk;
    cfg.readahead = readahead;
    let cache = PackCache::open(cfg, store.metrics().clone()).expect("cache");
    TierReader::new(store.clone(), cache)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn objects_round_trip_list_pages_and_batch_deletes() {
    let s = S3Server::start();
    let st = store(&s);
    st.check().expect("probe of a good target");

    let data = pack_bytes(7, 3 * 1024 * 1024 + 5);
    st.put(&pack_key(7), &data).expect("put");
    // The server's own copy is the bytes sent.
    assert_eq!(read_object(&st, &pack_key(7)), data);
    assert_eq!(st.head(&pack_key(7)).unwrap(), Some(data.len() as u64));
    assert_eq!(st.head(&pack_key(8)).unwrap(), None);
    for (off, len) in [
        (0u64, 1u64),
        (0, 4096),
        (1_000_003, 777_777),
        (data.len() as u64 - 9, 9),
    ] {
        let got = st.get_range(&pack_key(7), off, len).expect("range");
        assert_eq!(
            got,
            &data[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
    }
    // A range running past the end is a short read, one starting past it
    // a 416: both errors, never fewer bytes than asked.
    match st.get_range(&pack_key(7), data.len() as u64 - 4, 8) {
        Err(TierError::ShortRead {
            expected: 8,
            got: 4,
            ..
        }) => {}
        other => panic!("want a short read, got {other:?}"),
    }
    match st.get_range(&pack_key(7), data.len() as u64 + 10, 8) {
        Err(TierError::Http { status: 416, .. }) => {}
        other => panic!("want 416, got {other:?}"),
    }
    match st.get_range(&pack_key(99), 0, 8) {
        Err(TierError::Http {
            status: 404, code, ..
        }) => assert_eq!(code, "NoSuchKey"),
        other => panic!("want 404, got {other:?}"),
    }

    // 1,100 objects: listing takes pages (continuation tokens), deleting
    // takes two DeleteObjects requests (at most 1,000 keys each).
    let keys: Vec<String> = (0..1100u64).map(|i| format!("many/{i:05}")).collect();
    for k in &keys {
        st.put(k, k.as_bytes()).expect("small put");
    }
    let (small_pages, pages) = st.list_paged("many/", 128).expect("list");
    assert_eq!(pages, 1100usize.div_ceil(128), "pages of 128");
    let listed: Vec<String> = small_pages.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(listed, keys);
    assert!(small_pages.iter().all(|(k, size)| *size == k.len() as u64));
    assert_eq!(
        st.list("many/").unwrap().len(),
        1100,
        "default pages of 1000"
    );

    let report = st.delete_batch(&keys[..1050]).expect("batch delete");
    assert_eq!(report.deleted, 1050);
    assert_eq!(report.requests, 2);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let left: Vec<String> = st
        .list("many/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(left, keys[1050..]);
    st.delete(&keys[1050]).unwrap();
    st.delete(&keys[1050])
        .expect("deleting an absent key is no error");
    assert_eq!(st.head(&keys[1050]).unwrap(), None);

    let m = st.metrics();
    assert!(m.requests(Op::Put) >= 1101 && m.requests(Op::Delete) == 4);
    assert!(n(&m.bytes_up) >= data.len() as u64);
    let text = m.prometheus();
    assert!(
        text.contains(&format!(
            "cdm_tier_requests_total{{op=\"put\"}} {}\n",
            m.requests(Op::Put)
        )),
        "{text}"
    );
}

#[test]
fn a_body_damaged_on_the_way_is_refused_and_never_stored() {
    let s = S3Server::start();
    let proxy = FlipProxy::start(s.port());
    let mut c = config(&s);
    c.endpoint = format!("http://127.0.0.1:{}", proxy.port);
    c.retries = 0;
    let st = S3Store::new(c.clone()).unwrap();
    let data = pack_bytes(1, 200 * KIB as usize);
    // The proxy flips a bit of the body after we signed its SHA-256 and
    // MD5: the server refuses it (s3s-fs answers 500 when the payload
    // hash check fails inside its body stream; AWS and Garage say 400
    // XAmzContentSHA256Mismatch or BadDigest), and nothing is stored.
    let status = match st.put(&pack_key(1), &data) {
        Err(TierError::Http { status, .. }) if status >= 400 => status,
        other => panic!("a damaged body must be refused: {other:?}"),
    };
    assert_eq!(
        store(&s).head(&pack_key(1)).unwrap(),
        None,
        "nothing stored"
    );
    c.retries = 2;
    let st = S3Store::new(c).unwrap();
    if status >= 500 {
        // A 5xx is retried: the next attempt (on the same connection,
        // which the proxy leaves alone) lands, and the stored bytes are
        // exact.
        st.put(&pack_key(1), &data).unwrap();
        assert_eq!(n(&st.metrics().retries), 1);
        assert_eq!(read_object(&st, &pack_key(1)), data);
    } else {
        // A 4xx (Garage's 400 BadDigest) is final: not retried, and still
        // nothing stored.
        match st.put(&pack_key(1), &data) {
            Err(TierError::Http { status: 400, .. }) => {}
            other => panic!("a damaged body must be refused again: {other:?}"),
        }
        assert_eq!(n(&st.metrics().retries), 0);
        assert_eq!(store(&s).head(&pack_key(1)).unwrap(), None);
    }
}

#[test]
fn bad_credentials_and_a_missing_bucket_are_named_and_not_retried() {
    let s = S3Server::start();
    let mut c = config(&s);
    c.secret_key = "wrong-secret".into();
    let st = S3Store::new(c).unwrap();
    match st.check() {
        // Garage says AccessDenied for a bad signature.
        Err(TierError::BadCredentials { code, .. }) => assert!(
            ["SignatureDoesNotMatch", "AccessDenied"].contains(&code.as_str()),
            "{code}"
        ),
        other => panic!("wrong secret: {other:?}"),
    }
    match st.put("x", b"data") {
        Err(TierError::BadCredentials { .. }) => {}
        other => panic!("put with a wrong secret: {other:?}"),
    }
    assert_eq!(n(&st.metrics().retries), 0, "4xx are never retried");
    assert_eq!(store(&s).head("x").unwrap(), None);

    let mut c = config(&s);
    c.access_key = "nobody".into();
    match S3Store::new(c).unwrap().check() {
        // s3s answers NotSignedUp like AWS; MinIO says InvalidAccessKeyId,
        // Garage AccessDenied.
        Err(TierError::BadCredentials { code, .. }) => {
            assert!(
                ["NotSignedUp", "InvalidAccessKeyId", "AccessDenied"].contains(&code.as_str()),
                "{code}"
            )
        }
        other => panic!("unknown access key: {other:?}"),
    }

    let mut c = config(&s);
    c.bucket = "no-such-bucket".into();
    let st = S3Store::new(c).unwrap();
    match st.check() {
        Err(e @ TierError::NoSuchBucket(_)) => assert!(e.to_string().contains("no-such-bucket")),
        other => panic!("missing bucket: {other:?}"),
    }
    assert_eq!(n(&st.metrics().retries), 0);
}

#[test]
fn an_unreachable_store_fails_that_read_and_reads_work_after_restart() {
    let mut s = S3Server::start();
    let st = store(&s);
    let data = pack_bytes(1, 300 * KIB as usize);
    st.put(&pack_key(1), &data).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let r = reader(&st, cache_dir.path(), 64 * KIB, 16 << 20, 0);

    s.kill();
    let t = Instant::now();
    let e = r.read(1, 0, 4096).expect_err("read with the store down");
    let took = t.elapsed();
    assert!(e.to_string().contains("unreachable"), "{e}");
    // Connection refused at once, twice retried with backoff: well within
    // the 5 s timeout; the bound only catches a hang.
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert_eq!(n(&st.metrics().retries), 2);
    match st.check() {
        Err(TierError::Unreachable(_)) => {}
        other => panic!("check with the store down: {other:?}"),
    }

    s.restart();
    assert_eq!(r.read(1, 4096, 100_000).unwrap(), &data[4096..104_096]);
}

#[test]
fn a_hung_store_times_out_instead_of_hanging_the_reader() {
    let s = S3Server::start();
    let mut c = config(&s);
    c.timeout = Duration::from_secs(1);
    c.retries = 1;
    let st = Arc::new(S3Store::new(c).unwrap());
    let data = pack_bytes(2, 100 * KIB as usize);
    st.put(&pack_key(2), &data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = reader(&st, dir.path(), 64 * KIB, 16 << 20, 0);
    s.pause();
    let t = Instant::now();
    let e = r.read(2, 0, 1000).expect_err("read from a hung store");
    let took = t.elapsed();
    s.resume();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    // Two attempts of a 1 s timeout each, and a backoff between them.
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert_eq!(r.read(2, 0, 1000).unwrap(), &data[..1000]);
}

#[test]
fn cold_reads_fetch_warm_reads_hit_and_damaged_cache_files_are_fetched_again() {
    let s = S3Server::start();
    let st = store(&s);
    let data = pack_bytes(3, 1024 * 1024);
    st.put(&pack_key(3), &data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = reader(&st, dir.path(), 64 * KIB, 16 << 20, 0);
    let m = st.metrics().clone();
    let gets = || m.requests(Op::Get);

    // Cold: three chunks missing, fetched with one coalesced GET.
    let got = r.read(3, 10_000, 150_000).unwrap();
    assert_eq!(got, &data[10_000..160_000]);
    assert_eq!((n(&m.cache_misses), n(&m.cache_hits), gets()), (3, 0, 1));
    assert_eq!(r.cache.cached_bytes(), 3 * 64 * KIB);
    assert_eq!(dir_bytes(dir.path()), 3 * 64 * KIB);

    // Warm: the same chunks, no request.
    assert_eq!(r.read(3, 70_000, 100_000).unwrap(), &data[70_000..170_000]);
    assert_eq!((n(&m.cache_hits), gets()), (2, 1));

    // A cache file damaged on disk fails its checksum: dropped, fetched
    // again, the read exact.
    let path = r.cache.chunk_path(3, 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(r.read(3, 64 * KIB, 1000).unwrap(), &data[65_536..66_536]);
    assert_eq!((n(&m.cache_corrupt), gets()), (1, 2));
    assert_eq!(std::fs::read(&path).unwrap(), &data[65_536..131_072]);
    // A truncated one too.
    std::fs::write(&path, &bytes[..10]).unwrap();
    assert_eq!(r.read(3, 64 * KIB, 1000).unwrap(), &data[65_536..66_536]);
    assert_eq!((n(&m.cache_corrupt), gets()), (2, 3));

    // An object damaged on the server is returned as it is: the store
    // layer does not check ranges' content (the engine's extent crc does).
    let o = flip_object_byte(&st, &pack_key(3), 900_000, 0xff);
    assert_eq!(r.read(3, 899_999, 3).unwrap(), &o[899_999..900_002]);
    assert_ne!(o[900_000], data[900_000]);

    // Reading past the pack's end is an error, not fewer bytes.
    let e = r.read(3, 1024 * 1024 - 10, 20).expect_err("past the end");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert!(st
        .metrics()
        .prometheus()
        .contains("cdm_tier_cache_hit_ratio 0."));
}

#[test]
fn a_hit_checks_the_blocks_it_reads() {
    let s = S3Server::start();
    let st = store(&s);
    let data = pack_bytes(8, 1024 * 1024);
    st.put(&pack_key(8), &data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // One 1 MiB chunk: sixteen 64 KiB blocks with a checksum each.
    let r = reader(&st, dir.path(), 1024 * KIB, 16 << 20, 0);
    let m = st.metrics().clone();
    assert_eq!(r.read(8, 0, 1000).unwrap(), &data[..1000]);
    let path = r.cache.chunk_path(8, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3 * 65_536 + 5] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    // A hit in block 0 reads and checks block 0 only: served, no request.
    assert_eq!(r.read(8, 100, 1000).unwrap(), &data[100..1100]);
    assert_eq!((n(&m.cache_corrupt), m.requests(Op::Get)), (0, 1));
    // A hit across blocks 2..=4 meets the damage: dropped, fetched again.
    let off = 2 * 65_536 + 7;
    assert_eq!(
        r.read(8, off, 150_000).unwrap(),
        &data[off as usize..off as usize + 150_000]
    );
    assert_eq!((n(&m.cache_corrupt), m.requests(Op::Get)), (1, 2));
    assert_eq!(std::fs::read(&path).unwrap(), data);
}

#[test]
fn two_readers_of_a_missing_chunk_fetch_it_once() {
    let s = S3Server::start();
    let st = store(&s);
    let data = pack_bytes(4, 256 * KIB as usize);
    st.put(&pack_key(4), &data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(reader(&st, dir.path(), 256 * KIB, 16 << 20, 0));
    let go = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (r, go) = (r.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                r.read(4, i * 1000, 5000).unwrap()
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), &data[i * 1000..i * 1000 + 5000]);
    }
    let m = st.metrics();
    assert_eq!(m.requests(Op::Get), 1, "one GET for eight readers");
    assert_eq!((n(&m.cache_misses), n(&m.cache_hits)), (1, 7));
}

#[test]
fn the_budget_holds_under_many_concurrent_reads() {
    let s = S3Server::start();
    let st = store(&s);
    let packs: Vec<Vec<u8>> = (0..3)
        .map(|p| pack_bytes(p, 1024 * 1024 + 12_345))
        .collect();
    for (p, d) in packs.iter().enumerate() {
        st.put(&pack_key(p as u64), d).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let budget = 5 * 64 * KIB;
    let r = Arc::new(reader(&st, dir.path(), 64 * KIB, budget, 2));
    let packs = Arc::new(packs);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A watcher samples the directory while the readers run.
    let watcher = {
        let (stop, dir) = (stop.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Only finished chunk files count; a temporary file is
                // inside its reservation as well.
                most = most.max(dir_bytes(&dir));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (r, packs) = (r.clone(), packs.clone());
            std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                for i in 0..60 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let p = (x >> 60) % 3;
                    let len = 1 + (x >> 20) % (150 * KIB);
                    let size = packs[p as usize].len() as u64;
                    // Half the readers stream, so read-ahead runs too.
                    let off = if t % 2 == 0 {
                        (i * 40 * KIB) % (size - len)
                    } else {
                        (x >> 8) % (size - len)
                    };
                    let got = r.read(p, off, len as u32).unwrap();
                    assert!(
                        got == packs[p as usize][off as usize..(off + len) as usize],
                        "pack {p} at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = watcher.join().unwrap();
    let m = st.metrics();
    assert!(most <= budget, "directory held {most} > budget {budget}");
    assert!(dir_bytes(dir.path()) <= budget);
    assert!(r.cache.cached_bytes() <= budget);
    assert!(n(&m.cache_evictions) > 0, "eviction ran");
    assert!(n(&m.cache_hits) > 0 && n(&m.cache_misses) > 0);
    assert_eq!(n(&m.cache_corrupt), 0);
}

#[test]
fn sequential_reads_fetch_ahead_and_random_reads_do_not() {
    let s = S3Server::start();
    let st = store(&s);
    let data = pack_bytes(5, 1024 * 1024);
    st.put(&pack_key(5), &data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = reader(&st, dir.path(), 64 * KIB, 16 << 20, 4);
    let m = st.metrics().clone();

    // Two reads out of order: nothing fetched ahead.
    r.read(5, 512 * KIB, 4096).unwrap();
    r.read(5, 0, 4096).unwrap();
    // The next read continues the last: sequential, so chunks 1..=4 come
    // in the background.
    assert_eq!(
        r.read(5, 4096, (64 * KIB - 4096) as u32).unwrap(),
        &data[4096..65_536]
    );
    wait_for(60, "read-ahead of 4 chunks", || {
        (n(&m.readahead_chunks) == 4).then_some(())
    });
    for k in 1..5u64 {
        let off = k * 64 * KIB;
        assert_eq!(
            r.read(5, off, 64 * KIB as u32).unwrap(),
            &data[off as usize..(off + 64 * KIB) as usize]
        );
    }
    // Served from what read-ahead brought (and further read-ahead starts:
    // only it makes requests now).
    assert_eq!(n(&m.cache_hits), 5, "chunk 0 once, chunks 1..=4");
    assert_eq!(n(&m.cache_misses), 2, "only the two first reads missed");
}

#[test]
fn a_full_cache_disk_serves_reads_from_memory() {
    let s = S3Server::start();
    let st = store(&s);
    let data = pack_bytes(6, 1024 * 1024);
    st.put(&pack_key(6), &data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A filesystem of 128 KiB under a cache with a 16 MiB budget.
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    cdm_e2e::run(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=128k", "tmpfs"])
            .arg(&mnt),
    );
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let r = reader(&st, &mnt, 64 * KIB, 16 << 20, 0);
    for _ in 0..2 {
        assert_eq!(r.read(6, 0, 1024 * 1024).unwrap(), data);
    }
    let m = st.metrics();
    assert!(n(&m.cache_errors) > 0, "failed cache writes are counted");
    assert!(r.cache.cached_bytes() <= 128 * KIB);
}

#[test]
fn gc_deletes_exactly_the_unreferenced_packs() {
    let s = S3Server::start();
    let mut c = config(&s);
    c.prefix = format!("{}appliance-a/", s.prefix());
    let st = S3Store::new(c).unwrap();
    let mut other = config(&s);
    other.prefix = format!("{}appliance-b/", s.prefix());
    let other = S3Store::new(other).unwrap();
    for id in 1..=30u64 {
        st.put(&pack_key(id), &pack_bytes(id, 1000 + id as usize))
            .unwrap();
    }
    other
        .put(&pack_key(2), b"another appliance's pack")
        .unwrap();
    st.put("packs/not-a-pack", b"x").unwrap();
    st.put("index/0000000000000001", b"y").unwrap();
    let referenced: HashSet<u64> = (1..=30).filter(|i| i % 3 == 0).collect();

    let r = gc(&st, &referenced).expect("gc");
    assert_eq!((r.listed, r.kept, r.deleted, r.unparsed), (31, 10, 20, 1));
    assert_eq!(
        r.deleted_bytes,
        (1..=30u64)
            .filter(|i| i % 3 != 0)
            .map(|i| 1000 + i)
            .sum::<u64>()
    );
    assert!(r.failed.is_empty());
    let left: HashSet<String> = st.list("").unwrap().into_iter().map(|(k, _)| k).collect();
    let mut want: HashSet<String> = referenced.iter().map(|&i| pack_key(i)).collect();
    want.insert("packs/not-a-pack".into());
    want.insert("index/0000000000000001".into());
    assert_eq!(left, want);
    assert_eq!(
        other.head(&pack_key(2)).unwrap(),
        Some(24),
        "another prefix is untouched"
    );
    // Nothing more to do the second time.
    let again = gc(&st, &referenced).unwrap();
    assert_eq!((again.deleted, again.delete_requests), (0, 0));
}

#[test]
fn request_rate_and_bandwidth_limits_pace_the_store() {
    let s = S3Server::start();
    let mut c = config(&s);
    c.max_requests_per_sec = Some(20);
    let st = S3Store::new(c).unwrap();
    // The bucket starts with a burst of 20: 50 requests need 30 more
    // tokens at 20/s.
    let t = Instant::now();
    for _ in 0..50 {
        st.head("absent").unwrap();
    }
    let took = t.elapsed();
    assert!(took >= Duration::from_secs_f64(30.0 / 20.0), "{took:?}");

    let mut c = config(&s);
    c.max_bytes_per_sec = Some(1 << 20);
    let st = S3Store::new(c).unwrap();
    // 2 MiB up at 1 MiB/s with a burst of 256 KiB: at least 1.75 s.
    let data = pack_bytes(9, 2 << 20);
    let t = Instant::now();
    st.put(&pack_key(9), &data).unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_secs_f64(1.75), "{took:?}");
}

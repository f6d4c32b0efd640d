//! The data path end to end in one process: two pools in temporary
//! directories, the receiver's router on a loopback port (a test layer
//! stands in for the mutual-TLS listener and inserts the caller's
//! [`PeerId`]), the sender over plain HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State as AxState};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cdmfs::{Pool, Target};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

use super::http::{PeerHttp, PeerId};
use super::receive::{router, ReceiverCtx, PREV_HEADER, TOKEN_HEADER};
use super::send::{run, SendRequest, TransferRecord};
use super::throttle::Throttle;
use super::{replicas, sessions, testutil, wire};
use crate::state::State;

/// Raw (ciphertext) sends of encrypted volumes.
#[path = "tests_raw.rs"]
mod raw;

const BS: u32 = 4096;
const SIZE: u64 = 8 << 20;

/// What the test layer does to requests.
#[derive(Default)]
struct Faults {
    /// Batch `PUT`s seen.
    puts: AtomicU64,
    /// Batch `PUT`s after this many fail (0: never).
    cut_after: AtomicU64,
    /// The failing `PUT` is applied first and only its answer is lost.
    lose_reply: AtomicBool,
    /// Points committed (volume, snapshot), as `on_point` saw them.
    committed: Mutex<Vec<(String, u64)>>,
    /// Snapshots of volume "v" a cascade link from the target holds.
    held: Mutex<Vec<u64>>,
}

/// A sending appliance: its pool and state.
struct Source {
    _dir: tempfile::TempDir,
    pool: Arc<Pool>,
    state: Arc<State>,
    id: String,
}

impl Source {
    fn new() -> Source {
        let dir = tempfile::tempdir().unwrap();
        let pool = testutil::pool(dir.path());
        let state = Arc::new(State::open(&dir.path().join("state.redb"), None).unwrap());
        let id = hex::encode(pool.uuid().unwrap());
        Source {
            _dir: dir,
            pool,
            state,
            id,
        }
    }

    fn me(&self) -> PeerId {
        PeerId {
            name: "a".into(),
            identity: self.id.clone(),
            cert_sha256: "a-cert".into(),
        }
    }

    fn send(&self, t: &Tgt, volume: &str) -> Result<Vec<TransferRecord>, super::error::ReplError> {
        self.send_with(t, volume, &Throttle::unlimited(), None)
    }

    fn send_with(
        &self,
        t: &Tgt,
        volume: &str,
        throttle: &Throttle,
        keep_last: Option<u64>,
    ) -> Result<Vec<TransferRecord>, super::error::ReplError> {
        let http = t.http();
        let cancel = AtomicBool::new(false);
        run(SendRequest {
            pool: &self.pool,
            state: &self.state,
            identity: &self.id,
            volume,
            peer_name: "b",
            http: &http,
            keep_last,
            keep_days: None,
            raw: false,
            throttle,
            cancel: &cancel,
            progress: &|_, _| {},
            log: &|l| eprintln!("sender: {l}"),
        })
    }
}

/// A target appliance: pool, state and the receiver served on loopback.
struct Tgt {
    dir: PathBuf,
    pool: Arc<Pool>,
    state: Arc<State>,
    addr: SocketAddr,
    faults: Arc<Faults>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn layer(
    AxState(f): AxState<(Arc<Faults>, PeerId)>,
    mut req: Request,
    next: Next,
) -> Response {
    let (faults, me) = f;
    let peer = match req
        .headers()
        .get("x-test-peer")
        .and_then(|h| h.to_str().ok())
    {
        Some("none") => None,
        // `NAME[/IDENTITY[/CERT]]`: a peer as the listener would name it.
        Some(other) => {
            let mut it = other.split('/');
            let name = it.next().unwrap_or_default().to_string();
            let identity = it.next().map_or_else(|| name.clone(), str::to_string);
            let cert_sha256 = it.next().map_or_else(|| name.clone(), str::to_string);
            Some(PeerId {
                name,
                identity,
                cert_sha256,
            })
        }
        None => Some(me),
    };
    if let Some(p) = peer {
        req.extensions_mut().insert(p);
    }
    let is_put = req.method() == axum::http::Method::PUT;
    if is_put {
        let n = faults.puts.fetch_add(1, Ordering::SeqCst) + 1;
        let cut = faults.cut_after.load(Ordering::SeqCst);
        if cut > 0 && n > cut {
            if faults.lose_reply.load(Ordering::SeqCst) {
                let _ = next.run(req).await;
            }
            return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "cut").into_response();
        }
    }
    next.run(req).await
}

impl Tgt {
    fn start(dir: &Path, sender: PeerId) -> Tgt {
        Tgt::start_keyed(dir, sender, None)
    }

    /// A target whose pool has an encryption key.
    fn start_keyed(dir: &Path, sender: PeerId, key: Option<cdmfs::KeySource>) -> Tgt {
        let pool = testutil::pool_keyed(dir, key);
        let state = Arc::new(State::open(&dir.join("state.redb"), None).unwrap());
        let faults = Arc::new(Faults::default());
        let clock = Arc::new(crate::clock::Clock::new(false));
        let events = crate::events::Events::new(state.clone(), clock, Default::default());
        let f2 = faults.clone();
        let ctx = Arc::new(ReceiverCtx {
            pool: pool.clone(),
            state: state.clone(),
            identity: hex::encode(pool.uuid().unwrap()),
            on_point: Arc::new(move |v: &str, s: u64| {
                f2.committed.lock().unwrap().push((v.to_string(), s));
            }),
            events,
            held: {
                let f3 = faults.clone();
                Arc::new(move || {
                    // A cascade link 9 to peer C whose last transfers were these.
                    let l = crate::replication::links::LinkRec {
                        id: 9,
                        peer: "C".into(),
                        ..Default::default()
                    };
                    let recs: Vec<_> = f3
                        .held
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|s| crate::replication::links::TransferRec {
                            link: 9,
                            transfer: cdm_api::replication::Transfer {
                                volume: "v".into(),
                                snapshot: *s,
                                result: "ok".into(),
                                ..Default::default()
                            },
                        })
                        .collect();
                    Some(super::holds::compute(&[(l, vec!["v".into()])], recs))
                })
            },
            answered: Default::default(),
            compression: 0,
        });
        let app = router(ctx).layer(axum::middleware::from_fn_with_state(
            (faults.clone(), sender),
            layer,
        ));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(std_listener).unwrap();
                axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Tgt {
            dir: dir.to_path_buf(),
            pool,
            state,
            addr,
            faults,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn http(&self) -> PeerHttp {
        PeerHttp::new(ureq::agent(), format!("http://{}", self.addr))
    }

    /// Stops the server and drops the pool without closing it (what a
    /// SIGKILL leaves: what was flushed), then starts again on it.
    fn restart(mut self, sender: PeerId) -> Tgt {
        self.shutdown();
        let dir = self.dir.clone();
        drop(self);
        Tgt::start(&dir, sender)
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn write_random(pool: &Pool, vol: &str, rng: &mut rand::rngs::StdRng, blocks: usize) -> u64 {
    let id = pool.volume_id(vol).unwrap();
    let size = pool.volume(vol).unwrap().size;
    let mut changed = std::collections::HashSet::new();
    let mut buf = vec![0u8; BS as usize];
    for _ in 0..blocks {
        let b = rng.gen_range(0..size / BS as u64);
        if rng.gen_ratio(1, 10) {
            pool.write_zeroes(id, b * BS as u64, BS as u64).unwrap();
        } else {
            rng.fill_bytes(&mut buf);
            pool.write(id, b * BS as u64, &buf).unwrap();
        }
        changed.insert(b);
    }
    changed.len() as u64 * BS as u64
}

/// Bytes of the blocks whose contents differ between two snapshots: of
/// data, and of blocks that became zeros.
fn changed_bytes(pool: &Pool, s1: u64, s2: u64) -> (u64, u64) {
    let x = read_all(pool, Target::Snapshot(s1), SIZE);
    let y = read_all(pool, Target::Snapshot(s2), SIZE);
    let (mut data, mut zero) = (0, 0);
    for (p, q) in x.chunks(BS as usize).zip(y.chunks(BS as usize)) {
        if p != q {
            if q.iter().all(|b| *b == 0) {
                zero += BS as u64;
            } else {
                data += BS as u64;
            }
        }
    }
    (data, zero)
}

fn snap(pool: &Pool, vol: &str, label: &str) -> u64 {
    pool.create_snapshot(vol, label, json!({"by": "test", "label": label}))
        .unwrap()
        .id
}

fn read_all(pool: &Pool, t: Target, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    for (i, c) in out.chunks_mut(1 << 20).enumerate() {
        pool.read(t, i as u64 * (1 << 20), c).unwrap();
    }
    out
}

/// Every point of `vol` on the source is on the target with the same
/// bytes, label, creation time and the metadata plus its point id.
fn assert_points_match(a: &Source, b: &Tgt, vol: &str) {
    let theirs = replicas::points(&b.pool, vol, "target").unwrap();
    let mine = replicas::points(&a.pool, vol, &a.id).unwrap();
    assert!(!mine.is_empty());
    for (s, p) in &mine {
        let (t, _) = theirs
            .iter()
            .find(|(_, q)| q == p)
            .unwrap_or_else(|| panic!("point {p} missing on the target"));
        assert_eq!(t.label, s.label);
        assert_eq!(t.created_ns, s.created_ns);
        assert_eq!(t.metadata["label"], s.metadata["label"]);
        assert_eq!(t.metadata[replicas::POINT_KEY], p.as_str());
        assert_eq!(t.metadata[replicas::ORIGIN_KEY], "a");
        assert_eq!(t.size, s.size);
        assert!(
            read_all(&a.pool, Target::Snapshot(s.id), s.size)
                == read_all(&b.pool, Target::Snapshot(t.id), t.size),
            "point {p} differs"
        );
    }
    // The replica's live tree is its newest point.
    let (newest, _) = theirs.last().unwrap();
    let vid = b.pool.volume_id(vol).unwrap();
    assert!(
        read_all(&b.pool, Target::Volume(vid), newest.size)
            == read_all(&b.pool, Target::Snapshot(newest.id), newest.size)
    );
}

fn setup(rng: &mut rand::rngs::StdRng) -> (Source, tempfile::TempDir) {
    let a = Source::new();
    a.pool.create_volume("v", SIZE, BS).unwrap();
    write_random(&a.pool, "v", rng, 1500);
    (a, tempfile::tempdir().unwrap())
}

#[test]
fn full_then_incrementals_then_a_second_volume_of_the_same_data() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    let recs = a.send(&b, "v").unwrap();
    assert_eq!(recs.len(), 1);
    assert!(recs[0].full && recs[0].full_resend.is_none() && recs[0].result == "ok");
    assert_points_match(&a, &b, "v");
    assert_eq!(
        replicas::get(&b.state, "v").unwrap().unwrap().identity,
        a.id
    );
    // Nothing new: nothing sent.
    assert!(a.send(&b, "v").unwrap().is_empty());
    // Three incrementals at once, oldest first, each from the one before.
    let mut unique = Vec::new();
    let mut prev = recs[0].snapshot;
    for i in 2..5 {
        write_random(&a.pool, "v", &mut rng, 40);
        let s = snap(&a.pool, "v", &format!("p{i}"));
        unique.push(changed_bytes(&a.pool, prev, s));
        prev = s;
    }
    let recs = a.send(&b, "v").unwrap();
    assert_eq!(recs.len(), 3);
    for (r, (data, zero)) in recs.iter().zip(&unique) {
        assert!(!r.full);
        assert!(r.bytes_logical >= data + zero, "no change left out");
        // Random data does not compress: on the wire ≈ the changed data
        // plus fingerprints and the session's JSON; zeroed blocks cost
        // their fingerprint entry only.
        let ratio = r.bytes_sent as f64 / *data as f64;
        eprintln!(
            "incremental: {} bytes on the wire for {data} unique changed bytes \
             (+{zero} zeroed) ({ratio:.4}x)",
            r.bytes_sent
        );
        assert!(ratio <= 1.05, "{ratio}");
    }
    assert_eq!(recs[1].base.as_deref(), Some(recs[0].point.as_str()));
    assert_points_match(&a, &b, "v");
    assert_eq!(b.faults.committed.lock().unwrap().len(), 4);
    // A second volume holding the same data: its blocks are known on the
    // target (dedup), so only fingerprints cross.
    a.pool.create_volume("w", SIZE, BS).unwrap();
    let vbytes = read_all(
        &a.pool,
        Target::Volume(a.pool.volume_id("v").unwrap()),
        SIZE,
    );
    let wid = a.pool.volume_id("w").unwrap();
    for (i, c) in vbytes.chunks(1 << 20).enumerate() {
        a.pool.write(wid, i as u64 * (1 << 20), c).unwrap();
    }
    snap(&a.pool, "w", "copy");
    let recs = a.send(&b, "w").unwrap();
    let r = &recs[0];
    eprintln!(
        "same data again: {} bytes on the wire for {} logical, {} of {} blocks known",
        r.bytes_sent, r.bytes_logical, r.blocks_known, r.blocks_total
    );
    assert!(r.blocks_known > 0 && r.bytes_sent * 20 < r.bytes_logical);
    assert_points_match(&a, &b, "w");
}

#[test]
fn a_cut_transfer_resumes_after_the_last_acknowledged_batch() {
    for lose_reply in [false, true] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (a, dir) = setup(&mut rng);
        let b = Tgt::start(dir.path(), a.me());
        snap(&a.pool, "v", "p1");
        b.faults.cut_after.store(3, Ordering::SeqCst);
        b.faults.lose_reply.store(lose_reply, Ordering::SeqCst);
        let e = a.send(&b, "v").unwrap_err();
        assert_eq!(e.records.len(), 1);
        assert_eq!(e.records[0].result, "failed");
        // No point shows for the half-sent one.
        assert!(replicas::points(&b.pool, "v", "").unwrap().is_empty());
        let acked = sessions::get(&b.state, "v").unwrap().unwrap().acked;
        assert_eq!(acked, if lose_reply { 4 } else { 3 });
        // The receiver is killed and starts again on what it flushed.
        let sent_before = b.faults.puts.load(Ordering::SeqCst);
        let b = b.restart(a.me());
        let recs = a.send(&b, "v").unwrap();
        let r = &recs[0];
        assert_eq!(r.resumed_from_batch, Some(acked + 1));
        let batches = r.blocks_total.div_ceil(wire::blocks_per_batch(BS) as u64);
        let resent = sent_before + b.faults.puts.load(Ordering::SeqCst) - batches;
        eprintln!("cut (reply lost: {lose_reply}): {resent} batch(es) sent twice of {batches}");
        assert!(resent <= 1, "{resent}");
        assert_points_match(&a, &b, "v");
    }
}

/// Cuts the transfer of the point just taken after one batch.
fn cut_once(a: &Source, b: &Tgt) {
    b.faults.puts.store(0, Ordering::SeqCst);
    b.faults.cut_after.store(1, Ordering::SeqCst);
    a.send(b, "v").unwrap_err();
    b.faults.cut_after.store(0, Ordering::SeqCst);
    assert!(sessions::get(&b.state, "v").unwrap().unwrap().acked >= 1);
}

#[test]
fn forged_and_stale_resume_tokens_are_refused_and_the_point_restarts() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    a.send(&b, "v").unwrap();
    // Forged: the target's copy of the token is changed.
    write_random(&a.pool, "v", &mut rng, 600);
    snap(&a.pool, "v", "p2");
    cut_once(&a, &b);
    let mut s = sessions::get(&b.state, "v").unwrap().unwrap();
    s.token = "00".repeat(32);
    sessions::put(&b.state, &s).unwrap();
    let r = &a.send(&b, "v").unwrap()[0];
    assert_eq!(r.resumed_from_batch, None);
    assert!(r.message.contains("did not verify"), "{}", r.message);
    assert_points_match(&a, &b, "v");
    // Stale: the point being sent when the cut came is gone on the source;
    // the session for it does not fit the next one.
    write_random(&a.pool, "v", &mut rng, 600);
    let p3 = snap(&a.pool, "v", "p3");
    cut_once(&a, &b);
    a.pool.delete_snapshot(p3).unwrap();
    write_random(&a.pool, "v", &mut rng, 100);
    snap(&a.pool, "v", "p4");
    let r = &a.send(&b, "v").unwrap()[0];
    assert_eq!(r.resumed_from_batch, None);
    assert!(r.message.contains("stale session"), "{}", r.message);
    assert_points_match(&a, &b, "v");
    // A batch that does not continue from the session's token is refused.
    write_random(&a.pool, "v", &mut rng, 600);
    snap(&a.pool, "v", "p5");
    cut_once(&a, &b);
    let s = sessions::get(&b.state, "v").unwrap().unwrap();
    let e = b
        .http()
        .send(
            "PUT",
            &format!("/repl/v1/sessions/{}/batches/{}", s.id, s.acked + 1),
            &[(PREV_HEADER, "ab"), (TOKEN_HEADER, "cd")],
            b"",
            &Throttle::unlimited(),
        )
        .unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (409, "resume_refused"));
    let e = b
        .http()
        .send(
            "POST",
            "/repl/v1/sessions/00/commit",
            &[],
            b"",
            &Throttle::unlimited(),
        )
        .unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (404, "no_session"));
}

#[test]
fn refusals_bad_checksum_unpaired_other_peer_and_promoted() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    let http = b.http();
    let t = Throttle::unlimited();
    // A session by hand, then a block whose bytes are not its fingerprint.
    let id = sessions::new_id();
    let open = json!({"id": id, "volume": "x", "size": 65536, "block_size": BS,
        "policy": {}, "base": null, "keep_last": null, "keep_days": null, "token": "aa",
        "point": {"point": "a:1", "label": "l", "metadata": {}, "created_ns": 1}});
    let _: serde_json::Value = http.post_json("/repl/v1/sessions", &open, &t).unwrap();
    let good = vec![7u8; BS as usize];
    let mut bad = good.clone();
    bad[100] ^= 1;
    let fps = wire::Fingerprints {
        block_size: BS,
        entries: vec![wire::entry_of(8192, &good)],
    }
    .encode();
    let path = format!("/repl/v1/sessions/{id}/batches/1");
    let map = http
        .send(
            "POST",
            &format!("{path}/fingerprints"),
            &[(PREV_HEADER, "aa")],
            &fps,
            &t,
        )
        .unwrap();
    assert_eq!(wire::decode_lacking(&map, 1).unwrap(), [true]);
    let body = wire::encode_data(&[&bad], 1).unwrap();
    let e = http
        .send(
            "PUT",
            &path,
            &[(PREV_HEADER, "aa"), (TOKEN_HEADER, "bb")],
            &body,
            &t,
        )
        .unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (422, "bad_checksum"));
    let xid = b.pool.volume_id("x").unwrap();
    assert!(
        read_all(&b.pool, Target::Volume(xid), 65536) == vec![0u8; 65536],
        "nothing of a corrupt batch is written"
    );
    assert_eq!(sessions::get(&b.state, "x").unwrap().unwrap().acked, 0);
    let refused = |code: &str| {
        b.state
            .scan::<serde_json::Value>(crate::state::EVENTS, 0, 100, false, |e| {
                e["type"] == "replication.refused" && e["data"]["code"] == code
            })
            .unwrap()
            .len()
    };
    assert_eq!(refused("bad_checksum"), 1, "the refusal is reported");
    // Unpaired: no peer identified.
    let e = http
        .agent
        .get(&format!("{}/repl/v1/volumes/x", http.base))
        .set("x-test-peer", "none")
        .call()
        .unwrap_err();
    assert!(matches!(e, ureq::Error::Status(403, _)));
    // Another peer may not write into a's replica.
    let e = http
        .agent
        .post(&format!("{}/repl/v1/sessions", http.base))
        .set("x-test-peer", "c")
        .send_json(&open)
        .unwrap_err();
    let ureq::Error::Status(409, resp) = e else {
        panic!("{e:?}")
    };
    assert!(resp.into_string().unwrap().contains("not_a_replica"));
    assert_eq!(refused("not_a_replica"), 1);
    // A promoted replica refuses its old sender, which says why.
    snap(&a.pool, "v", "p1");
    a.send(&b, "v").unwrap();
    replicas::promote(&b.state, &b.pool, "v").unwrap();
    snap(&a.pool, "v", "p2");
    let e = a.send(&b, "v").unwrap_err();
    assert!(e.is("not_a_replica"), "{e}");
}

#[test]
fn a_target_that_lost_the_base_gets_a_full_resend_and_retention_applies() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    a.send(&b, "v").unwrap();
    for (s, _) in replicas::points(&b.pool, "v", "").unwrap() {
        b.pool.delete_snapshot(s.id).unwrap();
    }
    write_random(&a.pool, "v", &mut rng, 50);
    snap(&a.pool, "v", "p2");
    let recs = a.send(&b, "v").unwrap();
    // Both points go again, the first one in full, and the record says why.
    assert_eq!(recs.len(), 2);
    assert!(recs[0].full);
    let why = recs[0].full_resend.as_deref().unwrap();
    assert!(why.contains("holds no point"), "{why}");
    assert_points_match(&a, &b, "v");
    // Retention sent with the points: the target keeps the newest two.
    for i in 3..6 {
        write_random(&a.pool, "v", &mut rng, 20);
        snap(&a.pool, "v", &format!("p{i}"));
    }
    a.send_with(&b, "v", &Throttle::unlimited(), Some(2))
        .unwrap();
    let left: Vec<String> = replicas::points(&b.pool, "v", "")
        .unwrap()
        .into_iter()
        .map(|(s, _)| s.label)
        .collect();
    assert_eq!(left, ["p4", "p5"]);
}

#[test]
fn a_bandwidth_limit_paces_the_bytes_sent_and_cancel_stops_between_batches() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    let rate = 4u64 << 20;
    let t = Throttle::new(Box::new(move || Some(rate)));
    let start = std::time::Instant::now();
    let r = &a.send_with(&b, "v", &t, None).unwrap()[0];
    // The bucket starts empty: nothing goes faster than the limit (a
    // lower bound only, which no load on the machine can break).
    let floor = r.bytes_sent as f64 / rate as f64;
    assert!(start.elapsed().as_secs_f64() >= floor * 0.99, "{floor}");
    // Cancelled: the point stops before its next batch, said so.
    write_random(&a.pool, "v", &mut rng, 600);
    snap(&a.pool, "v", "p2");
    let http = b.http();
    let cancel = AtomicBool::new(false);
    let e = run(SendRequest {
        pool: &a.pool,
        state: &a.state,
        identity: &a.id,
        volume: "v",
        peer_name: "b",
        http: &http,
        keep_last: None,
        keep_days: None,
        raw: false,
        throttle: &Throttle::unlimited(),
        cancel: &cancel,
        progress: &|done, total| {
            assert!(done <= total);
            cancel.store(true, Ordering::SeqCst);
        },
        log: &|_| {},
    })
    .unwrap_err();
    assert!(e.is("cancelled"), "{e}");
    assert_eq!(e.records.last().unwrap().result, "cancelled");
    assert_eq!(sessions::get(&b.state, "v").unwrap().unwrap().acked, 1);
    // The next run resumes after the batch acknowledged.
    let r = &a.send(&b, "v").unwrap()[0];
    assert_eq!(r.resumed_from_batch, Some(2));
    assert_points_match(&a, &b, "v");
}

#[test]
fn a_full_target_fails_the_link_with_no_space_and_the_source_is_unaffected() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let a = Source::new();
    a.pool.create_volume("v", 64 << 20, BS).unwrap();
    let id = a.pool.volume_id("v").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..48u64 {
        rng.fill_bytes(&mut buf);
        a.pool.write(id, i << 20, &buf).unwrap();
    }
    snap(&a.pool, "v", "big");
    let dir = tempfile::tempdir().unwrap();
    testutil::small_pool(dir.path(), 32 << 20);
    let b = Tgt::start(dir.path(), a.me());
    let e = a.send(&b, "v").unwrap_err();
    assert!(e.is("no_space"), "{e}");
    assert_eq!(e.status, 507);
    assert_eq!(e.records[0].result, "failed");
    // No point on the target; the source reads as before.
    assert!(replicas::points(&b.pool, "v", "").unwrap().is_empty());
    let mut again = vec![0u8; 1 << 20];
    a.pool
        .read(Target::Volume(id), 47 << 20, &mut again)
        .unwrap();
    assert!(again == buf);
}

/// Sends `volume` from the appliance behind `from` (its pool and state,
/// identity `from_id`) to `to`.
fn send_from(
    from: &Tgt,
    from_id: &str,
    to: &Tgt,
    volume: &str,
) -> Result<Vec<TransferRecord>, super::error::ReplError> {
    let http = to.http();
    let cancel = AtomicBool::new(false);
    run(SendRequest {
        pool: &from.pool,
        state: &from.state,
        identity: from_id,
        volume,
        peer_name: "peer",
        http: &http,
        keep_last: None,
        keep_days: None,
        raw: false,
        throttle: &Throttle::unlimited(),
        cancel: &cancel,
        progress: &|_, _| {},
        log: &|l| eprintln!("sender {from_id}: {l}"),
    })
}

fn identity_of(dir: &Path) -> String {
    hex::encode(testutil::pool(dir).uuid().unwrap())
}

fn same_point(x: &Pool, xs: u64, y: &Pool, ys: u64) -> bool {
    let a = x.snapshot(xs).unwrap();
    let b = y.snapshot(ys).unwrap();
    a.size == b.size
        && read_all(x, Target::Snapshot(xs), a.size) == read_all(y, Target::Snapshot(ys), b.size)
}

#[test]
fn cascade_failover_and_reverse_replication_from_the_newest_common_point() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids: Vec<String> = dirs.iter().map(|d| identity_of(d.path())).collect();
    let peer = |i: usize, name: &str| PeerId {
        name: name.into(),
        identity: ids[i].clone(),
        cert_sha256: format!("cert-{i}"),
    };
    // A is called by B (reverse), B by A, C by B.
    let a = Tgt::start(dirs[0].path(), peer(1, "b"));
    let b = Tgt::start(dirs[1].path(), peer(0, "a"));
    let c = Tgt::start(dirs[2].path(), peer(1, "b"));
    a.pool.create_volume("v", SIZE, BS).unwrap();
    write_random(&a.pool, "v", &mut rng, 800);
    let p1 = snap(&a.pool, "v", "p1");
    write_random(&a.pool, "v", &mut rng, 80);
    let p2 = snap(&a.pool, "v", "p2");
    assert_eq!(send_from(&a, &ids[0], &b, "v").unwrap().len(), 2);
    // A→B→C: B sends what it received; C keeps the ids and the origin.
    let recs = send_from(&b, &ids[1], &c, "v").unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1].point, format!("{}:{p2}", ids[0]));
    let on_c = replicas::points(&c.pool, "v", &ids[2]).unwrap();
    for ((s, pid), orig) in on_c.iter().zip([p1, p2]) {
        assert_eq!(pid, &format!("{}:{orig}", ids[0]));
        assert_eq!(s.metadata[replicas::ORIGIN_KEY], "a");
        assert!(same_point(&a.pool, orig, &c.pool, s.id));
    }
    assert_eq!(
        replicas::get(&c.state, "v").unwrap().unwrap().identity,
        ids[1]
    );
    // Failover: B's replica is promoted and written; A's old volume is
    // demoted to a replica of B.
    replicas::promote(&b.state, &b.pool, "v").unwrap();
    let bid = b.pool.volume_id("v").unwrap();
    let mut buf = vec![0u8; BS as usize];
    for k in 0..20u64 {
        rng.fill_bytes(&mut buf);
        b.pool.write(bid, k * 7 * BS as u64, &buf).unwrap();
    }
    let b1 = snap(&b.pool, "v", "b1");
    replicas::demote(&a.state, &a.pool, "v", &peer(1, "b")).unwrap();
    // Reverse: from the newest common point (A's own p2), not in full.
    let recs = send_from(&b, &ids[1], &a, "v").unwrap();
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert!(!r.full && r.full_resend.is_none());
    assert_eq!(r.base.as_deref(), Some(format!("{}:{p2}", ids[0]).as_str()));
    assert!(r.bytes_sent < 30 * BS as u64, "{}", r.bytes_sent);
    let back = replicas::points(&a.pool, "v", &ids[0]).unwrap();
    let (s, pid) = back.last().unwrap();
    assert_eq!(pid, &format!("{}:{b1}", ids[1]));
    assert_eq!(s.metadata[replicas::ORIGIN_KEY], "b");
    assert!(same_point(&b.pool, b1, &a.pool, s.id));
    // C still follows B: B's new point goes on from p2 there too.
    let r = &send_from(&b, &ids[1], &c, "v").unwrap()[0];
    assert!(!r.full);
    // The old direction is refused: B's volume is no replica any more.
    let e = send_from(&a, &ids[0], &b, "v").unwrap_err();
    assert!(e.is("not_a_replica"), "{e}");
}

#[test]
fn large_blocks_and_a_short_last_block() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let a = Source::new();
    let bs = 65536u64;
    let size = 64 * bs + 1000;
    a.pool.create_volume("odd", size, bs as u32).unwrap();
    let id = a.pool.volume_id("odd").unwrap();
    let mut all = vec![0u8; size as usize];
    rng.fill_bytes(&mut all);
    a.pool.write(id, 0, &all).unwrap();
    let s1 = snap(&a.pool, "odd", "p1");
    let dir = tempfile::tempdir().unwrap();
    let b = Tgt::start(dir.path(), a.me());
    let r = &a.send(&b, "odd").unwrap()[0];
    assert_eq!(r.bytes_logical, size);
    // Eight whole blocks and the short last one rewritten.
    let mut blk = vec![0u8; bs as usize];
    for k in [3u64, 9, 17, 22, 30, 41, 50, 63] {
        rng.fill_bytes(&mut blk);
        a.pool.write(id, k * bs, &blk).unwrap();
    }
    rng.fill_bytes(&mut blk[..1000]);
    a.pool.write(id, 64 * bs, &blk[..1000]).unwrap();
    let s2 = snap(&a.pool, "odd", "p2");
    let r = &a.send(&b, "odd").unwrap()[0];
    let unique = 8 * bs + 1000;
    assert_eq!(r.bytes_logical, unique);
    let ratio = r.bytes_sent as f64 / unique as f64;
    eprintln!(
        "64 KiB blocks: {} bytes on the wire for {unique} unique changed bytes ({ratio:.4}x)",
        r.bytes_sent
    );
    assert!(ratio <= 1.05, "{ratio}");
    let theirs = replicas::points(&b.pool, "odd", "").unwrap();
    for ((t, _), s) in theirs.iter().zip([s1, s2]) {
        assert_eq!(t.size, size);
        assert!(
            read_all(&a.pool, Target::Snapshot(s), size)
                == read_all(&b.pool, Target::Snapshot(t.id), size)
        );
    }
}

/// Tests of the review's findings (same helpers).
#[path = "tests_review.rs"]
mod review;

#[test]
fn replica_retention_keeps_its_newest_point_and_what_a_cascade_link_holds() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let (a, dir) = setup(&mut rng);
    let b = Tgt::start(dir.path(), a.me());
    snap(&a.pool, "v", "p1");
    let one = Throttle::unlimited();
    let recs = a.send_with(&b, "v", &one, Some(1)).unwrap();
    let on_b = recs[0].target_snapshot.unwrap();
    // B's link onward (to C) last sent p1: it is that link's base.
    b.faults.held.lock().unwrap().push(on_b);
    for i in 2..4 {
        write_random(&a.pool, "v", &mut rng, 20);
        snap(&a.pool, "v", &format!("p{i}"));
    }
    let recs = a.send_with(&b, "v", &one, Some(1)).unwrap();
    assert_eq!(recs.len(), 2);
    let left: Vec<u64> = b
        .pool
        .list_snapshots(Some("v"))
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    // keep_last 1: the newest stays, and so does the held p1; p2 goes.
    let newest = recs[1].target_snapshot.unwrap();
    assert_eq!(left, vec![on_b, newest], "{recs:?}");
    // Released (the cascade link moved on): the next commit expires it.
    b.faults.held.lock().unwrap().clear();
    write_random(&a.pool, "v", &mut rng, 20);
    snap(&a.pool, "v", "p4");
    let recs = a.send_with(&b, "v", &one, Some(1)).unwrap();
    let left: Vec<u64> = b
        .pool
        .list_snapshots(Some("v"))
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, vec![recs[0].target_snapshot.unwrap()]);
}

//! The object-storage tier end to end: snapshotd with a real S3 server
//! (s3s-fs on loopback, or the server `CDM_S3_*` names:
//! scripts/test-s3-garage). Objects are counted and damaged through the
//! S3 API, under the test's own prefix, so that both servers serve. Old points tier by job and by policy, read back
//! bit-exact over NBD (nbdcopy) and as an instant-recovery clone, show
//! where their data is, survive `kill -9` in the middle of tiering, are
//! recalled; damage in the store is named by scrub; wrong credentials
//! fail the job with the reason and move nothing; GC deletes orphans.

use std::process::Command;

use cdm_e2e::s3::{flip_object_byte, S3Server};
use cdm_e2e::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn appliance() -> Appliance {
    Appliance::start_with(
        Some(FAST_CONFIG),
        None,
        &[
            "--pool-size",
            "2G",
            "--pool-sparse",
            "--tier-sweep-seconds",
            "1",
        ],
    )
}

fn tier_config(s3: &S3Server) -> Value {
    let (a, k) = s3.keys();
    json!({"endpoint": s3.endpoint(), "bucket": s3.bucket(), "region": s3.region(),
        "prefix": s3.prefix(), "access_key": a, "secret_key": k, "path_style": true,
        "pack_mib": 16, "cache_bytes": 64 * MIB})
}

/// A client of the appliance's store: the server's keys, the prefix the
/// appliance uses.
fn store(api: &Api, s3: &S3Server) -> cdm_tier::S3Store {
    let mut c = s3.config();
    c.prefix = api.get("/v1/tier")["prefix"]
        .as_str()
        .unwrap_or("")
        .to_string();
    cdm_tier::S3Store::new(c).expect("store")
}

/// Objects under the appliance's prefix, listed through the S3 API.
fn count_objects(api: &Api, s3: &S3Server) -> usize {
    store(api, s3).list("").expect("list").len()
}

fn wait_job(api: &Api, id: u64) -> Value {
    wait_for(300, "the job to end", || {
        let j = api.get(&format!("/v1/jobs/{id}"));
        matches!(j["state"].as_str(), Some("succeeded" | "failed")).then_some(j)
    })
}

fn run_job(api: &Api, body: Value) -> Value {
    let j = api.expect(202, "POST", "/v1/jobs", Some(body.clone()));
    let done = wait_job(api, j["id"].as_u64().expect("job id"));
    assert_eq!(done["state"], "succeeded", "{body}: {done}");
    done
}

/// sha256 of an export read with nbdcopy (a real NBD client).
fn export_sha(a: &Appliance, export: &str) -> String {
    let out = a.dir.path().join("copy.img");
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg(a.unix_uri(export)).arg(&out));
    let b = std::fs::read(&out).expect("copy");
    let _ = std::fs::remove_file(&out);
    hex::encode(Sha256::digest(&b))
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn location(api: &Api, vol: &str, id: u64) -> String {
    api.get(&format!("/v1/volumes/{vol}/snapshots/{id}"))["location"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// A volume written in 1 MiB writes, generation by generation: s1, then
/// the first half rewritten, s2, then a quarter more. Returns the points
/// and each one's contents.
fn history(a: &Appliance, api: &Api, vol: &str, size: u64) -> (u64, u64, Vec<Vec<u8>>) {
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": vol, "size": size})),
    );
    let mut nbd = a.nbd(vol);
    let mut data = random_bytes(size as usize, 1);
    for (i, c) in data.chunks(MIB as usize).enumerate() {
        nbd.write(i as u64 * MIB, c, false).expect("write");
    }
    nbd.flush().expect("flush");
    let snap = |label: &str| {
        api.expect(
            201,
            "POST",
            &format!("/v1/volumes/{vol}/snapshots"),
            Some(json!({"label": label})),
        )["id"]
            .as_u64()
            .expect("id")
    };
    let s1 = snap("s1");
    let mut gens = vec![data.clone()];
    let half = (size / 2) as usize;
    data[..half].copy_from_slice(&random_bytes(half, 2));
    for (i, c) in data[..half].chunks(MIB as usize).enumerate() {
        nbd.write(i as u64 * MIB, c, false).expect("write");
    }
    nbd.flush().expect("flush");
    let s2 = snap("s2");
    gens.push(data.clone());
    let q = (size / 4) as usize;
    data[half..half + q].copy_from_slice(&random_bytes(q, 3));
    for (i, c) in data[half..half + q].chunks(MIB as usize).enumerate() {
        nbd.write(half as u64 + i as u64 * MIB, c, false)
            .expect("write");
    }
    nbd.flush().expect("flush");
    gens.push(data);
    (s1, s2, gens)
}

#[test]
fn tiered_points_read_over_nbd_and_instant_recovery_then_recall() {
    require("nbdcopy");
    let s3 = S3Server::start();
    let a = appliance();
    let api = Api::new(&a, &a.admin_token());
    let (s1, s2, gens) = history(&a, &api, "db", 64 * MIB);
    api.expect(200, "PUT", "/v1/tier", Some(tier_config(&s3)));

    let done = run_job(
        &api,
        json!({"kind": "tier", "volume": "db", "snapshot": s1}),
    );
    let r = &done["result"];
    assert_eq!(r["bytes"], 32 * MIB, "{done}");
    assert_eq!(r["packs"], 2, "32 MiB in 16 MiB packs: {done}");
    assert_eq!(location(&api, "db", s1), "tiered");
    assert_eq!(location(&api, "db", s2), "local");
    // The store holds two objects for 512 extents of 64 KiB.
    assert_eq!(count_objects(&api, &s3), 2);

    // Bit-exact over NBD, cold then warm, and as an instant recovery.
    assert_eq!(export_sha(&a, &format!("db@{s1}")), sha(&gens[0]));
    assert_eq!(export_sha(&a, &format!("db@{s1}")), sha(&gens[0]));
    assert_eq!(export_sha(&a, &format!("db@{s2}")), sha(&gens[1]));
    assert_eq!(export_sha(&a, "db"), sha(&gens[2]));
    api.expect(
        201,
        "POST",
        &format!("/v1/volumes/db/snapshots/{s1}/clones"),
        Some(json!({"name": "instant"})),
    );
    assert_eq!(export_sha(&a, "instant"), sha(&gens[0]));
    let metrics = http(&a.url(), "GET", "/metrics", Some(&a.admin_token()), None).1;
    let m = metrics.as_str().unwrap_or("").to_string();
    assert!(m.contains("cdm_tier_requests_total{op=\"put\"} 2"), "{m}");
    assert!(m.contains("cdm_tier_points{location=\"tiered\"} 1"), "{m}");
    assert!(m.contains("cdm_tier_cache_hit_ratio"), "{m}");
    // A configuration is not deleted while points' data is in the store.
    api.expect(409, "DELETE", "/v1/tier", None);

    // Recall: local again, and readable with the store gone.
    api.expect(204, "DELETE", "/v1/volumes/instant", None);
    let done = run_job(
        &api,
        json!({"kind": "recall", "volume": "db", "snapshot": s1}),
    );
    assert_eq!(done["result"]["bytes"], 32 * MIB, "{done}");
    assert_eq!(location(&api, "db", s1), "local");
    // The place of the packs cannot change while the pool references
    // them (reads, recalls and GC would look elsewhere).
    let mut moved = tier_config(&s3);
    moved["endpoint"] = json!("http://127.0.0.1:9");
    let e = api.expect(409, "PUT", "/v1/tier", Some(moved));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("cannot change"),
        "{e}"
    );
    // No store any more: credentials it refuses (which works against any
    // server), and s3s-fs is gone.
    let mut gone = tier_config(&s3);
    gone["secret_key"] = json!("not-the-secret-any-more");
    api.expect(200, "PUT", "/v1/tier", Some(gone));
    drop(s3);
    assert_eq!(export_sha(&a, &format!("db@{s1}")), sha(&gens[0]));
}

#[test]
fn policy_tiers_old_points_and_kill_9_mid_tiering_loses_nothing() {
    require("nbdcopy");
    let s3 = S3Server::start();
    let mut a = appliance();
    let api = Api::new(&a, &a.admin_token());
    let (s1, s2, gens) = history(&a, &api, "db", 256 * MIB);
    api.expect(200, "PUT", "/v1/tier", Some(tier_config(&s3)));
    // The policy makes everything but the newest point due: the sweep
    // starts a tier job; kill -9 the daemon while it runs.
    api.expect(
        200,
        "PUT",
        "/v1/volumes/db/policy",
        Some(json!({"tier_keep_last": 1})),
    );
    wait_for(60, "the sweep's tier job to start", || {
        let jobs = api.get("/v1/jobs?kind=tier");
        jobs.as_array()
            .and_then(|j| j.iter().find(|j| j["state"] == "running").cloned())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    a.kill();
    fsck_clean(&a.data);
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    // Whatever the cut left, every point reads the same.
    assert_eq!(export_sha(&a, &format!("db@{s1}")), sha(&gens[0]));
    assert_eq!(export_sha(&a, &format!("db@{s2}")), sha(&gens[1]));
    assert_eq!(export_sha(&a, "db"), sha(&gens[2]));
    // The sweep finishes the work after the restart.
    wait_for(120, "s1 to be tiered", || {
        (location(&api, "db", s1) == "tiered").then_some(())
    });
    wait_for(120, "the tier jobs to end", || {
        let jobs = api.get("/v1/jobs?kind=tier");
        jobs.as_array()
            .is_some_and(|j| j.iter().all(|j| j["state"] != "running"))
            .then_some(())
    });
    assert_eq!(location(&api, "db", s2), "local", "the newest point stays");
    assert_eq!(export_sha(&a, &format!("db@{s1}")), sha(&gens[0]));
    // An orphan (a pack uploaded by a run killed before its commit, or
    // planted here): GC deletes it and keeps what is referenced.
    let store = store(&api, &s3);
    store
        .put(&cdm_tier::pack_key(0xdead), b"orphan")
        .expect("plant an orphan");
    let before = store.list(cdm_tier::PACKS_DIR).expect("list").len();
    let done = run_job(&api, json!({"kind": "tier-gc"}));
    let after = store.list(cdm_tier::PACKS_DIR).expect("list");
    assert!(after.len() < before, "{done}");
    assert!(
        after.iter().all(|(k, _)| !k.ends_with("dead")),
        "the orphan is gone: {done}"
    );
    assert_eq!(export_sha(&a, &format!("db@{s1}")), sha(&gens[0]));
    a.stop();
    fsck_clean(&a.data);
}

#[test]
fn damage_in_the_store_is_named_and_wrong_credentials_move_nothing() {
    let s3 = S3Server::start();
    let a = appliance();
    let api = Api::new(&a, &a.admin_token());
    let (s1, _, gens) = history(&a, &api, "db", 32 * MIB);
    // Wrong secret: the job fails with the reason; nothing moves.
    let mut bad = tier_config(&s3);
    bad["secret_key"] = json!("wrong-secret-wrong-secret");
    api.expect(200, "PUT", "/v1/tier", Some(bad));
    let j = api.expect(
        202,
        "POST",
        "/v1/jobs",
        Some(json!({"kind": "tier", "volume": "db", "snapshot": s1})),
    );
    let done = wait_job(&api, j["id"].as_u64().expect("id"));
    assert_eq!(done["state"], "failed");
    let msg = done["message"].as_str().unwrap_or("").to_string();
    assert!(msg.contains("credentials"), "{msg}");
    assert_eq!(location(&api, "db", s1), "local");
    assert_eq!(count_objects(&api, &s3), 0);

    api.expect(200, "PUT", "/v1/tier", Some(tier_config(&s3)));
    run_job(
        &api,
        json!({"kind": "tier", "volume": "db", "snapshot": s1}),
    );
    // Flip a byte in the pack as the store holds it.
    let st = store(&api, &s3);
    let packs = st.list(cdm_tier::PACKS_DIR).expect("list");
    let (pack, _) = packs.first().expect("a pack in the store");
    let at = (5 * MIB + 7) as usize;
    flip_object_byte(&st, pack, at, 0x40);
    let done = run_job(&api, json!({"kind": "scrub"}));
    let text = done["result"].to_string();
    assert!(text.contains(&format!("db@{s1}")), "{done}");
    assert!(text.contains("tiered data checksum mismatch"), "{done}");
    // A read of the damaged block fails; the appliance stays up.
    let out = Command::new("nbdcopy")
        .arg(a.unix_uri(&format!("db@{s1}")))
        .arg(a.dir.path().join("x.img"))
        .output()
        .expect("nbdcopy");
    assert!(!out.status.success());
    assert_eq!(
        http(&a.url(), "GET", "/v1/pool", Some(&a.admin_token()), None).0,
        200
    );
    flip_object_byte(&st, pack, at, 0x40);
    assert_eq!(export_sha(&a, &format!("db@{s1}")), sha(&gens[0]));
}

#[test]
fn kill_9_during_repack_and_gc_loses_nothing_and_leaves_nothing_dangling() {
    require("nbdcopy");
    let s3 = S3Server::start();
    let mut a = appliance();
    let api = Api::new(&a, &a.admin_token());
    let (s1, _, gens) = history(&a, &api, "db", 64 * MIB);
    api.expect(200, "PUT", "/v1/tier", Some(tier_config(&s3)));
    run_job(
        &api,
        json!({"kind": "tier", "volume": "db", "snapshot": s1}),
    );
    // A clone of the tiered point, then s1 deleted: the clone alone holds
    // the tiered objects. Rewriting 3 of every 4 blocks in it leaves each
    // pack a quarter live: GC repacks all of them.
    api.expect(
        201,
        "POST",
        &format!("/v1/volumes/db/snapshots/{s1}/clones"),
        Some(json!({"name": "c"})),
    );
    api.expect(
        204,
        "DELETE",
        &format!("/v1/volumes/db/snapshots/{s1}?force=true"),
        None,
    );
    let mut want = gens[0].clone();
    let mut nbd = a.nbd("c");
    let fresh = random_bytes((32 * MIB) as usize, 9);
    let mut k = 0;
    for blk in (0..32 * MIB / 65536).filter(|b| b % 4 != 0) {
        let at = (blk * 65536) as usize;
        nbd.write(at as u64, &fresh[k..k + 65536], false)
            .expect("write");
        want[at..at + 65536].copy_from_slice(&fresh[k..k + 65536]);
        k += 65536;
    }
    nbd.flush().expect("flush");
    drop(nbd);
    // Slow the store down so the repack is under way when the daemon dies.
    let mut slow = tier_config(&s3);
    slow["max_mib_per_sec"] = json!(4);
    api.expect(200, "PUT", "/v1/tier", Some(slow));
    let j = api.expect(202, "POST", "/v1/jobs", Some(json!({"kind": "tier-gc"})));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        api.get(&format!("/v1/jobs/{}", j["id"]))["state"],
        "running",
        "the repack should still run"
    );
    a.kill();
    fsck_clean(&a.data);
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    assert_eq!(export_sha(&a, "c"), sha(&want));
    api.expect(200, "PUT", "/v1/tier", Some(tier_config(&s3)));
    let done = run_job(&api, json!({"kind": "tier-gc"}));
    assert!(
        done["result"]["repacked_packs"].as_u64() > Some(0),
        "{done}"
    );
    assert_eq!(export_sha(&a, "c"), sha(&want));
    // Nothing dangling: a further GC finds nothing to repack or delete.
    let again = run_job(&api, json!({"kind": "tier-gc"}));
    assert_eq!(again["result"]["repacked_packs"], 0, "{again}");
    assert_eq!(again["result"]["gc"]["deleted"], 0, "{again}");
    assert_eq!(
        again["result"]["gc"]["kept"], again["result"]["gc"]["listed"],
        "{again}"
    );
    a.stop();
    fsck_clean(&a.data);
}

//! Pool space: new pools are preallocated on the host filesystem (sparse
//! only when asked, with a warning at every start), a running pool grows
//! through the API and `cdmctl pool grow` and its new space holds data
//! written over NBD across a restart, and a growth the host filesystem
//! cannot hold is refused with 507 leaving the pool unchanged and working.
//! The last test mounts a small ext4 filesystem: it needs root.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use cdm_e2e::*;
use nbd_proto::client::Client;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Bytes the host filesystem has allocated to the pool file, and its length.
fn allocation(data: &Path) -> (u64, u64) {
    let m = std::fs::metadata(data.join("pool")).expect("the pool file");
    (m.blocks() * 512, m.len())
}

/// Writes `len` bytes of seeded random data at `off`, 1 MiB a request,
/// then flushes.
fn write_span(c: &mut Client, off: u64, len: u64, seed: u64) {
    for i in 0..len / MIB {
        let data = random_bytes(MIB as usize, seed + i);
        c.write(off + i * MIB, &data, false)
            .unwrap_or_else(|e| panic!("NBD write at {}: {e}", off + i * MIB));
    }
    c.flush().expect("NBD flush");
}

fn check_span(c: &mut Client, off: u64, len: u64, seed: u64) {
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..len / MIB {
        c.read(off + i * MIB, &mut buf)
            .unwrap_or_else(|e| panic!("NBD read at {}: {e}", off + i * MIB));
        assert!(
            buf == random_bytes(MIB as usize, seed + i),
            "data at {} differs",
            off + i * MIB
        );
    }
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

const SPARSE_WARNING: &str = "sparse pool: a full host filesystem stops commits";

#[test]
fn new_pools_are_preallocated_unless_sparse_is_asked() {
    let mut a = Appliance::start_with(None, None, &["--pool-size", "256M"]);
    let (allocated, len) = allocation(&a.data);
    assert_eq!(len, 256 * MIB);
    assert!(allocated >= len, "only {allocated} bytes allocated");
    let api = Api::new(&a, &a.admin_token());
    assert_eq!(api.get("/v1/pool")["preallocated"], true);
    a.stop();
    assert_eq!(count(&a.log(), SPARSE_WARNING), 0, "{}", a.log());

    // Sparse by the configuration file, and by the flag; a warning at
    // every start.
    for (cfg, args) in [
        (Some("pool_prealloc = false\n"), vec!["--pool-size", "256M"]),
        (None, vec!["--pool-size", "256M", "--pool-sparse"]),
    ] {
        let mut a = Appliance::start_with(cfg, None, &args);
        let (allocated, len) = allocation(&a.data);
        assert_eq!(len, 256 * MIB);
        assert!(
            allocated < 64 * MIB,
            "{allocated} bytes allocated: not sparse"
        );
        let api = Api::new(&a, &a.admin_token());
        assert_eq!(api.get("/v1/pool")["preallocated"], false);
        a.stop();
        a.restart();
        a.stop();
        assert_eq!(
            count(&a.log(), SPARSE_WARNING),
            2,
            "{:?}: {}",
            args,
            a.log()
        );
    }
}

#[test]
fn a_running_pool_grows_and_its_new_space_holds_data_across_a_restart() {
    let mut a = Appliance::start_with(None, None, &["--pool-size", "64M"]);
    let api = Api::new(&a, &a.admin_token());
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "v", "size": 256 * MIB})),
    );
    let mut c = a.nbd("v");
    write_span(&mut c, 0, 32 * MIB, 1);

    // Refusals change nothing.
    for size in [32 * MIB, 160 * MIB + 1] {
        let v = api.expect(400, "POST", "/v1/pool/grow", Some(json!({ "size": size })));
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
    }
    assert_eq!(api.get("/v1/pool")["total_bytes"], 64 * MIB);

    let out = a.cdmctl(&["pool", "grow", "160M"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cdmctl pool grow: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("(preallocated)"), "{text}");
    let p = api.get("/v1/pool");
    assert_eq!(p["total_bytes"], 160 * MIB, "{p}");
    assert_eq!(p["preallocated"], true, "{p}");
    let (allocated, len) = allocation(&a.data);
    assert_eq!(len, 160 * MIB);
    assert!(allocated >= len, "the new range is not preallocated");

    // 96 MiB in all: more than the old 64 MiB pool could hold.
    write_span(&mut c, 32 * MIB, 64 * MIB, 1000);
    check_span(&mut c, 0, 32 * MIB, 1);
    check_span(&mut c, 32 * MIB, 64 * MIB, 1000);
    drop(c);

    let audit = api.get("/v1/audit?limit=1000");
    assert!(
        audit
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["path"] == "/v1/pool/grow" && e["status"] == 200),
        "no audit record of the growth: {audit}"
    );
    let doc = api.get("/v1/openapi.json");
    assert!(
        doc["paths"]["/v1/pool/grow"]["post"].is_object(),
        "openapi lacks POST /v1/pool/grow"
    );
    let events = api.get("/v1/events?type=pool.grown");
    assert_eq!(events[0]["data"]["to_bytes"], 160 * MIB, "{events}");

    a.stop();
    fsck_clean(&a.data);
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    assert_eq!(api.get("/v1/pool")["total_bytes"], 160 * MIB);
    let mut c = a.nbd("v");
    check_span(&mut c, 0, 32 * MIB, 1);
    check_span(&mut c, 32 * MIB, 64 * MIB, 1000);
    drop(c);
    a.stop();
    fsck_clean(&a.data);
}

#[test]
fn a_growth_the_host_filesystem_cannot_hold_is_507_and_changes_nothing() {
    let work = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    // Declared before the appliance: dropped (unmounted) after it stops.
    let (mnt, _mounted) = small_ext4(work.path(), 64 * MIB);
    let data = mnt.join("data");

    let mut a = Appliance::start_with(None, Some(&data), &["--pool-size", "16M"]);
    let api = Api::new(&a, &a.admin_token());
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "v", "size": 64 * MIB})),
    );
    let mut c = a.nbd("v");
    write_span(&mut c, 0, 4 * MIB, 7);

    let v = api.expect(
        507,
        "POST",
        "/v1/pool/grow",
        Some(json!({"size": 256 * MIB})),
    );
    assert_eq!(v["error"]["code"], "no_space", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("free"),
        "the message names the free space: {msg}"
    );
    let p = api.get("/v1/pool");
    assert_eq!(p["total_bytes"], 16 * MIB, "{p}");
    assert_eq!(allocation(&data).1, 16 * MIB, "the pool file changed");
    let out = a.cdmctl(&["pool", "grow", "256M"]);
    assert!(!out.status.success(), "cdmctl pool grow beyond the host");

    // Still working: writes, reads, and a growth that fits.
    write_span(&mut c, 4 * MIB, 4 * MIB, 70);
    check_span(&mut c, 0, 4 * MIB, 7);
    check_span(&mut c, 4 * MIB, 4 * MIB, 70);
    let p = api.expect(
        200,
        "POST",
        "/v1/pool/grow",
        Some(json!({"size": 24 * MIB})),
    );
    assert_eq!(p["total_bytes"], 24 * MIB, "{p}");
    drop(c);
    a.stop();
    fsck_clean(&data);
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    assert_eq!(api.get("/v1/pool")["total_bytes"], 24 * MIB);
    let mut c = a.nbd("v");
    check_span(&mut c, 0, 4 * MIB, 7);
    check_span(&mut c, 4 * MIB, 4 * MIB, 70);
    drop(c);
    a.stop();
}
